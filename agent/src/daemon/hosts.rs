//! File backups of this host (`[host.NAME]`): on each entry's schedule its
//! paths become a file snapshot of source NAME (`store::files`, the same
//! pipeline and repository as the VMs), then NAME's snapshots are pruned
//! by the entry's retention. No libvirt is needed: a physical host or a
//! backup-site host runs them alone. Recorded, mailed once per failure
//! streak and shown in `agent status` (`hosts`) and the metrics like a
//! VM's backups. A partial backup (unreadable files) is a failure: its
//! snapshot is kept, the paths are named.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use bulwark_proto::status::Problem;

use super::jobs::prune_with_maintenance;
use super::scheduler::{earliest, now, Run, Schedule};
use super::Agent;
use crate::config::{HostConf, HOST_POLICY};
use crate::logging::Capture;
use crate::mail::Task;

impl Agent {
    /// Starts every host backup that is due; the earliest next due time.
    pub(super) fn hosts_due(self: &Arc<Self>) -> Option<u64> {
        let mut next = None;
        for (name, h) in &self.cfg.host {
            let Some(sched) = self.schedule_of(&h.schedule) else {
                continue;
            };
            let last = self.last_host(name);
            let n = name.clone();
            let job = move |agent: &Arc<Agent>| agent.host_backup(&n);
            next = earliest(
                next,
                self.start_due(&format!("host/{name}"), &sched, last, job),
            );
        }
        next
    }

    fn last_host(&self, name: &str) -> Option<u64> {
        let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        s.hosts.get(name).map(|r| r.at)
    }

    /// One backup of `[host.NAME]`, pruned, recorded and (on a change of
    /// streak) mailed.
    fn host_backup(&self, name: &str) {
        let Some(h) = self.cfg.host.get(name) else {
            return;
        };
        let log = Capture::begin();
        let t = Instant::now();
        tracing::info!("file backup of host {name}");
        let r = backup_and_prune(&self.cfg, name, h);
        let prev = {
            let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
            s.hosts.get(name).cloned()
        };
        let mut run = Run {
            at: now(),
            seconds: t.elapsed().as_secs_f64(),
            last_ok: prev.as_ref().and_then(|p| p.last_ok),
            last_snapshot: prev.as_ref().and_then(|p| p.last_snapshot.clone()),
            failing_since: prev.as_ref().and_then(|p| p.failing_since),
            mode: Some(HOST_POLICY.into()),
            ..Run::default()
        };
        let failure = match &r {
            Ok(o) => {
                run.snapshot = Some(o.snapshot.clone());
                run.last_snapshot = Some(o.snapshot.clone());
                run.bytes_read = o.bytes_read;
                run.bytes_stored = o.bytes_stored;
                run.pruned = o.pruned;
                run.prune_error = o.prune_error.clone();
                run.ok = o.errors.is_empty();
                let why = match (o.errors.first(), &o.prune_error) {
                    (Some((p, e)), _) => Some(format!(
                        "the snapshot is partial: {} paths could not be read (first: {p}: {e})",
                        o.errors.len()
                    )),
                    (None, Some(e)) => Some(format!(
                        "the backup succeeded, but the prune after it failed: {e}"
                    )),
                    (None, None) => None,
                };
                run.error = why.clone().filter(|_| !run.ok);
                if run.ok {
                    run.last_ok = Some(run.at);
                }
                why
            }
            Err(e) => {
                run.error = Some(format!("{e:#}"));
                run.error.clone()
            }
        };
        match &failure {
            Some(e) => tracing::error!("file backup of host {name}: {e}"),
            None => tracing::info!(
                "file backup of host {name}: snapshot {}",
                run.snapshot.as_deref().unwrap_or("")
            ),
        }
        run.failing_since = failure.as_ref().and(run.failing_since.or(Some(run.at)));
        if let Err(e) = self.record(|s| {
            s.hosts.insert(name.to_string(), run);
        }) {
            tracing::warn!("recording the file backup of {name}: {e:#}");
        }
        let job = crate::mail::Job {
            task: Task::Backup,
            vm: name,
            policy: HOST_POLICY,
            repository: &h.repository,
            contacts: &h.contacts,
        };
        self.alert(&job, failure.as_deref(), &log.lines());
    }

    /// Host backups whose last run failed or was partial.
    pub(super) fn host_problems(&self, sched: &Schedule) -> Vec<Problem> {
        sched
            .hosts
            .iter()
            .filter(|(_, r)| !r.ok)
            .map(|(name, r)| Problem {
                domain: None,
                repository: self.cfg.host.get(name).map(|h| h.repository.clone()),
                problem: format!(
                    "file backup of host {name} failed: {}",
                    r.error.as_deref().unwrap_or("no detail")
                ),
            })
            .collect()
    }
}

/// What one host backup did.
struct Outcome {
    snapshot: String,
    bytes_read: u64,
    bytes_stored: u64,
    errors: Vec<(String, String)>,
    pruned: Option<usize>,
    prune_error: Option<String>,
}

fn backup_and_prune(cfg: &crate::config::Config, name: &str, h: &HostConf) -> Result<Outcome> {
    let rc = &cfg.repositories[&h.repository];
    let repo = rc.open()?;
    let b = bulwark_store::files::backup(&repo, &h.options(name)?)?;
    let (pruned, prune_error) =
        match prune_with_maintenance(rc, &repo, name, HOST_POLICY, &h.keep()) {
            Ok(n) => (n, None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
    Ok(Outcome {
        snapshot: b.snapshot.id.to_string(),
        bytes_read: b.bytes_read,
        bytes_stored: b.snapshot.stats.bytes_stored,
        errors: b.errors,
        pruned,
        prune_error,
    })
}
