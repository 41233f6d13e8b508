//! The work the agent does: a backup of one (domain, policy) followed by
//! the prune of its group, and a GC of one repository. Each records its
//! result in the schedule and tells the contacts when it starts failing or
//! recovers (with the job's last log lines).

use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::scheduler::{now, GcRun, Run};
use super::Agent;
use bulwark_store::maintain::retention::KeepOptions;

use crate::config::RepoConf;
use crate::libvirt::Libvirt;
use crate::logging::Capture;
use crate::mail::Task;
use crate::vm::backup::{self, Options};
use crate::vm::domain;

impl Agent {
    /// Backs up `dom` by `policy` (by default the first of its policies this
    /// agent may run), then prunes its group. Waits for the VM's and the
    /// host's turn.
    pub(super) fn backup(
        &self,
        dom: &str,
        policy: Option<&str>,
        full: bool,
    ) -> Result<backup::Report> {
        if dom.is_empty() {
            bail!("no domain");
        }
        // A connection per job: one that died with libvirtd is never reused.
        let libvirt = Libvirt::open(&self.cfg.libvirt_uri)?;
        let policy_name = match policy {
            Some(p) => p.to_string(),
            None => {
                let info = domain::parse(&libvirt.domain(dom)?.xml(true)?)?;
                info.policies
                    .into_iter()
                    .find(|p| self.cfg.usable_policy(p))
                    .with_context(|| format!("{dom} names no policy this agent may run"))?
            }
        };
        let pol = self
            .cfg
            .policies
            .get(&policy_name)
            .with_context(|| format!("no policy {policy_name}"))?;
        if let Some(why) = self.cfg.refusal(&policy_name) {
            bail!("{why}");
        }
        let rc = self
            .cfg
            .repositories
            .get(&pol.repository)
            .with_context(|| format!("no repository {}", pol.repository))?;
        let _slot = self.slots.acquire(dom);
        // The start and end lines bound the slot's hold: the fleet
        // benchmark reads them (scripts/bench-200vms.sh).
        tracing::info!("backup of {dom} ({policy_name}) started");
        let log = Capture::begin();
        let started = Instant::now();
        // An unreachable repository is a failed backup like any other:
        // recorded, and mailed.
        let r = rc.open().and_then(|repo| {
            let rep = backup::backup(
                &repo,
                &Options {
                    domain: dom.to_string(),
                    full,
                    policy: Some(policy_name.clone()),
                    threads: 0,
                    state: self.state.clone(),
                    libvirt,
                },
            )?;
            Ok((repo, rep))
        });
        let key = format!("{dom}/{policy_name}");
        let prev = self.schedule_run(&key);
        let mut run = Run {
            at: now(),
            ok: r.is_ok(),
            seconds: started.elapsed().as_secs_f64(),
            last_ok: prev.as_ref().and_then(|p| p.last_ok),
            last_snapshot: prev.as_ref().and_then(|p| p.last_snapshot.clone()),
            failing_since: prev.as_ref().and_then(|p| p.failing_since),
            ..Run::default()
        };
        // What the contacts hear: the backup's error, else the prune's.
        let failure = match &r {
            Ok((repo, rep)) => {
                run.snapshot = Some(rep.snapshot.to_string());
                run.mode = Some(rep.mode.to_string());
                run.bytes_read = rep.bytes_read;
                run.bytes_stored = rep.bytes_stored;
                run.last_ok = Some(run.at);
                run.last_snapshot = Some(rep.snapshot.to_string());
                match prune_with_maintenance(rc, repo, dom, &policy_name, &pol.keep()) {
                    Ok(n) => {
                        run.pruned = n;
                        None
                    }
                    Err(e) => {
                        tracing::error!("prune of {dom} ({policy_name}) failed: {e:#}");
                        run.prune_error = Some(format!("{e:#}"));
                        Some(format!(
                            "the backup succeeded, but the prune after it failed: {e:#}"
                        ))
                    }
                }
            }
            Err(e) => {
                tracing::error!("backup of {dom} ({policy_name}) failed: {e:#}");
                run.error = Some(format!("{e:#}"));
                Some(format!("{e:#}"))
            }
        };
        run.failing_since = match failure {
            Some(_) => run.failing_since.or(Some(run.at)),
            None => None,
        };
        let ended = if run.ok { "ok" } else { "failed" };
        tracing::info!("backup of {dom} ({policy_name}) ended: {ended}");
        self.record(|s| {
            s.runs.insert(key, run);
        })?;
        let job = crate::mail::Job {
            task: Task::Backup,
            vm: dom,
            policy: &policy_name,
            repository: &pol.repository,
            contacts: &pol.contacts,
        };
        self.alert(&job, failure.as_deref(), &log.lines());
        r.map(|(_, rep)| rep)
    }

    /// One GC of repository `name`, recorded; its failure mails the
    /// contacts of every policy that targets the repository.
    pub(super) fn gc(&self, name: &str, rc: &RepoConf) {
        let _gc = self.gc_busy.lock().unwrap_or_else(|p| p.into_inner());
        let log = Capture::begin();
        let r = rc.gc_grace().and_then(|grace| {
            let repo = rc.open_as(crate::config::Role::Maintenance)?;
            let opts = bulwark_store::maintain::gc::GcOptions {
                grace,
                ..Default::default()
            };
            Ok(bulwark_store::maintain::gc::run(&repo, &opts, &|_| {})?)
        });
        let run = match &r {
            Ok(rep) => {
                tracing::info!(
                    "gc of {name}: deleted {} packs ({} B), condemned {}",
                    rep.packs_deleted,
                    rep.bytes_deleted,
                    rep.packs_condemned
                );
                GcRun {
                    at: now(),
                    ok: true,
                    error: None,
                    packs_deleted: rep.packs_deleted,
                    bytes_deleted: rep.bytes_deleted,
                    packs_condemned: rep.packs_condemned,
                }
            }
            Err(e) => {
                tracing::error!("gc of {name} failed: {e:#}");
                GcRun {
                    at: now(),
                    ok: false,
                    error: Some(format!("{e:#}")),
                    packs_deleted: 0,
                    bytes_deleted: 0,
                    packs_condemned: 0,
                }
            }
        };
        if let Err(e) = self.record(|s| {
            s.gcs.insert(name.to_string(), run);
        }) {
            tracing::warn!("recording gc of {name}: {e:#}");
        }
        let contacts = self.cfg.contacts_of(|p| p.repository == name);
        let job = crate::mail::Job {
            task: Task::Gc,
            vm: "",
            policy: &format!("gc:{name}"),
            repository: name,
            contacts: &contacts,
        };
        let err = r.as_ref().err().map(|e| format!("{e:#}"));
        self.alert(&job, err.as_deref(), &log.lines());
    }
}

/// Prunes the (domain, policy) group by the policy's numbers; `None` when
/// the policy sets none.
fn prune(
    repo: &bulwark_store::Repository,
    dom: &str,
    policy: &str,
    keep: &KeepOptions,
) -> Result<Option<usize>> {
    if !keep.any() {
        return Ok(None);
    }
    let snaps: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| s.source == dom && s.policy.as_deref() == Some(policy))
        .collect();
    let decisions = bulwark_store::maintain::prune::plan(snaps, keep, &chrono::Local)?;
    let n = bulwark_store::maintain::prune::execute(repo, &decisions)?;
    if n > 0 {
        tracing::info!("pruned {n} snapshots of {dom} ({policy})");
    }
    Ok(Some(n))
}

/// [`prune`] of the group (`source`, `policy`) with the maintenance
/// credentials when the repository names them (the backup credentials may
/// not delete).
pub(super) fn prune_with_maintenance(
    rc: &RepoConf,
    repo: &bulwark_store::Repository,
    source: &str,
    policy: &str,
    keep: &KeepOptions,
) -> Result<Option<usize>> {
    if rc.maintenance_credentials.is_none() {
        return prune(repo, source, policy, keep);
    }
    prune(
        &rc.open_as(crate::config::Role::Maintenance)?,
        source,
        policy,
        keep,
    )
}
