//! Sync jobs (`[sync.NAME]`): on each job's schedule the agent copies the
//! snapshots of `from` that its filters select into `to`, then applies the
//! destination's own retention there, all without a key. A host at the
//! backup site with no VMs runs them (pull); a VM host runs them too
//! (push). `agent status` says how far behind a destination is.

use std::sync::Arc;

use bulwark_proto::status::{Problem, SyncRun};

use super::scheduler::{earliest, now, Schedule};
use super::Agent;
use crate::config::{Role, SyncConf};
use crate::logging::Capture;
use crate::mail::Task;

/// What one run did.
struct Outcome {
    report: bulwark_store::sync::SyncReport,
    pruned: usize,
}

/// Copy, then prune the destination by its own rules.
fn sync_and_prune(cfg: &crate::config::Config, job: &SyncConf) -> anyhow::Result<Outcome> {
    let (from, to) = (&cfg.repositories[&job.from], &cfg.repositories[&job.to]);
    let src = from.backend_uncached(Role::Backup)?;
    let dst = to.backend_uncached(Role::Backup)?;
    let opts = bulwark_store::sync::SyncOptions {
        filters: job.filters(),
        remove_vanished: job.remove_vanished,
        rate_mib_per_sec: job.rate,
        keep: job.keep(),
        ..Default::default()
    };
    let report = bulwark_store::sync::run(src.as_ref(), dst.as_ref(), &opts, &())?;
    let pruned = match job.keep() {
        Some(keep) => {
            let dst = to.backend_uncached(Role::Maintenance)?;
            let plan = bulwark_store::sync::retain::plan(
                dst.as_ref(),
                &job.filters(),
                &keep,
                &chrono::Local,
            )?;
            bulwark_store::sync::retain::execute(dst.as_ref(), &plan)?
        }
        None => 0,
    };
    Ok(Outcome { report, pruned })
}

impl Agent {
    /// Starts every sync job that is due and not queued yet.
    pub(super) fn syncs_due(self: &Arc<Self>) -> Option<u64> {
        let mut next = None;
        for (name, job) in &self.cfg.sync {
            let Some(sched) = self.schedule_of(&job.schedule) else {
                continue;
            };
            let key = format!("sync/{name}");
            let last = self.last_sync(name);
            let (name, job) = (name.clone(), job.clone());
            let run = move |agent: &Arc<Agent>| agent.sync_job(&name, &job);
            next = earliest(next, self.start_due(&key, &sched, last, run));
        }
        next
    }

    fn last_sync(&self, name: &str) -> Option<u64> {
        let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        s.syncs.get(name).map(|r| r.at)
    }

    fn sync_job(&self, name: &str, job: &SyncConf) {
        let log = Capture::begin();
        tracing::info!("sync {name}: {} -> {}", job.from, job.to);
        let r = sync_and_prune(&self.cfg, job);
        let last_ok = {
            let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
            s.syncs.get(name).and_then(|r| r.last_ok)
        };
        let mut run = SyncRun {
            at: now(),
            from: job.from.clone(),
            to: job.to.clone(),
            last_ok,
            ..Default::default()
        };
        match &r {
            Ok(o) => {
                let failed = &o.report.snapshots_failed;
                run.snapshots_copied = o.report.snapshots_copied;
                run.snapshots_skipped = o.report.snapshots_skipped;
                run.snapshots_failed = failed.len();
                run.snapshots_pruned = o.pruned;
                run.bytes_copied = o.report.bytes_copied;
                run.seconds = o.report.seconds;
                run.ok = failed.is_empty();
                if run.ok {
                    run.last_ok = Some(run.at);
                } else {
                    run.error = Some(
                        failed
                            .iter()
                            .map(|f| {
                                format!("snapshot {} of {}: {}", f.snapshot, f.source, f.error)
                            })
                            .collect::<Vec<_>>()
                            .join("; "),
                    );
                }
                tracing::info!(
                    "sync {name}: copied {} snapshots ({} B), {} there already, {} failed, {} pruned at {}",
                    run.snapshots_copied,
                    run.bytes_copied,
                    run.snapshots_skipped,
                    run.snapshots_failed,
                    run.snapshots_pruned,
                    job.to
                );
            }
            Err(e) => {
                tracing::error!("sync {name} failed: {e:#}");
                run.error = Some(format!("{e:#}"));
            }
        }
        let error = run.error.clone().map(|e| match lag(&run, now()) {
            Some(l) => format!("{e} ({} is {l} behind {})", job.to, job.from),
            None => e,
        });
        if let Err(e) = self.record(|s| {
            s.syncs.insert(name.to_string(), run);
        }) {
            tracing::warn!("recording sync {name}: {e:#}");
        }
        let mail = crate::mail::Job {
            task: Task::Sync,
            vm: "",
            policy: &format!("sync:{name}"),
            repository: &job.to,
            contacts: &job.contacts,
        };
        self.alert(&mail, error.as_deref(), &log.lines());
    }

    /// Sync jobs failing, or behind by more than twice their period.
    pub(super) fn sync_problems(&self, sched: &Schedule) -> Vec<Problem> {
        let mut out = Vec::new();
        let now = now();
        for (name, job) in &self.cfg.sync {
            let Some(r) = sched.syncs.get(name) else {
                continue;
            };
            let behind = lag(r, now);
            let period = self
                .schedule_of(&job.schedule)
                .and_then(|s| s.period(&chrono::Local::now()))
                .map_or(u64::MAX, |p| p.as_secs());
            let since = r.last_ok.unwrap_or(0);
            let late = now.saturating_sub(since) > period.saturating_mul(2);
            if r.ok && !late {
                continue;
            }
            let what = match &r.error {
                Some(e) => format!("sync {name} failed: {e}"),
                None => format!("sync {name} has not completed for twice its period"),
            };
            let lag =
                behind.map_or_else(|| "never complete".to_string(), |l| format!("{l} behind"));
            out.push(Problem {
                domain: None,
                repository: Some(job.to.clone()),
                problem: format!("{what}; {} is {lag} {}", job.to, job.from),
            });
        }
        out
    }
}

/// How far a destination is behind its source: the time since its last
/// complete run (`None`: none ever completed). A run that just completed
/// is not behind.
fn lag(r: &SyncRun, now: u64) -> Option<String> {
    let ok = r.last_ok?;
    let secs = now.saturating_sub(ok);
    // Whole minutes are precise enough for "3days 2h behind".
    let rounded = secs - secs % 60;
    Some(humantime::format_duration(std::time::Duration::from_secs(rounded)).to_string())
}
