//! When things run: each (domain, policy) whose schedule (a calendar event
//! or an interval) has come since its last run, and each repository's GC on
//! its `gc_schedule`. A run missed while the agent was down runs once at
//! start, like a `Persistent=true` timer; a (domain, policy) that never ran
//! runs at once, so a new VM is protected from the start. The record of last
//! runs (`schedule.json` in the state dir) survives restarts.
//!
//! Each due job runs on a thread of its own, so a long backup delays no
//! other VM's; `Slots` keeps one backup per VM and the host-wide limit.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::{Deserialize, Serialize};

pub(super) use bulwark_proto::status::{DrillRun, GcRun, LockRun, Run, SyncRun};

use super::Agent;
use crate::config;

/// Last result per `domain/policy`, and last GC per repository.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Schedule {
    pub runs: BTreeMap<String, Run>,
    #[serde(default)]
    pub gcs: BTreeMap<String, GcRun>,
    /// Last lock check per repository (`locks.rs`).
    #[serde(default)]
    pub locks: BTreeMap<String, LockRun>,
    /// Last run per sync job (`replicate.rs`).
    #[serde(default)]
    pub syncs: BTreeMap<String, SyncRun>,
    /// Last restore drill per VM (`drills.rs`).
    #[serde(default)]
    pub drills: BTreeMap<String, DrillRun>,
}

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// When a job runs next: at once if it never ran, else the schedule's next
/// time after the last run (in the past for a missed run: it runs once).
pub(super) fn next_run(sched: &crate::calendar::Schedule, last: Option<u64>) -> Option<u64> {
    let Some(last) = last else { return Some(now()) };
    let last = chrono::DateTime::from_timestamp(last as i64, 0)?.with_timezone(&chrono::Local);
    sched.next_after(&last).map(|t| t.timestamp().max(0) as u64)
}

/// Never run, or a run came due since the last one (however long ago: a
/// missed run runs once).
pub(super) fn due(sched: &crate::calendar::Schedule, last: Option<u64>) -> bool {
    let Some(last) = last else { return true };
    let Some(last) = chrono::DateTime::from_timestamp(last as i64, 0) else {
        return true;
    };
    sched.missed(
        Some(&last.with_timezone(&chrono::Local)),
        &chrono::Local::now(),
    )
}

impl Schedule {
    /// The record in `path`; an unreadable one starts afresh (the worst
    /// case is one run sooner than due).
    pub fn load(path: &Path) -> Schedule {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// Checks the schedules every `tick_seconds`, for as long as the process runs.
pub(super) fn run(agent: &Arc<Agent>) {
    loop {
        agent.backups_due();
        agent.gc_due();
        agent.locks_due();
        agent.syncs_due();
        agent.drills_due();
        agent.check_silence();
        agent.enforce_protection();
        std::thread::sleep(Duration::from_secs(agent.cfg.tick_seconds.max(1)));
    }
}

impl Agent {
    /// Updates the schedule and stores it (a lost write only means a run
    /// may repeat after a restart).
    pub(super) fn record(&self, f: impl FnOnce(&mut Schedule)) -> Result<()> {
        let mut sched = self.schedule.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut sched);
        let path = self.state.root().join("schedule.json");
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, serde_json::to_vec_pretty(&*sched)?).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
        drop(sched);
        self.write_metrics();
        Ok(())
    }

    /// A policy's schedule on this host (shifted by `schedule_spread`).
    pub(super) fn schedule_of(&self, expr: &str) -> Option<crate::calendar::Schedule> {
        // Refused when the config was loaded, so never `None` in practice.
        let sched = config::schedule(expr).ok()?;
        let spread = self.cfg.spread().ok()?;
        Some(sched.with_spread(&super::hostname(), spread))
    }

    pub(super) fn schedule_run(&self, key: &str) -> Option<Run> {
        let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        s.runs.get(key).cloned()
    }

    pub(super) fn last_run(&self, key: &str) -> Option<u64> {
        let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        s.runs.get(key).map(|r| r.at)
    }

    fn last_gc(&self, repo: &str) -> Option<u64> {
        let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        s.gcs.get(repo).map(|r| r.at)
    }

    /// Starts a backup of every protected (domain, policy) that is due and
    /// not queued yet. The domains come from the inventory the libvirt
    /// events keep.
    fn backups_due(self: &Arc<Self>) {
        for (dom, policies) in self.protected() {
            for p in policies {
                let Some(sched) = self
                    .cfg
                    .policies
                    .get(&p)
                    .and_then(|pol| self.schedule_of(&pol.schedule))
                else {
                    continue;
                };
                let key = format!("{dom}/{p}");
                if !due(&sched, self.last_run(&key)) || self.slots.queued().contains(&key) {
                    continue;
                }
                let (agent, dom) = (self.clone(), dom.clone());
                std::thread::spawn(move || {
                    let Some(_queued) = agent.slots.enqueue(&key) else {
                        return;
                    };
                    tracing::info!("scheduled backup of {dom} ({p})");
                    // The result is recorded, logged and mailed by the job.
                    let _ = agent.backup(&dom, Some(&p), false);
                });
            }
        }
    }

    /// Starts GC on every repository whose `gc_schedule` is due.
    fn gc_due(self: &Arc<Self>) {
        for (name, rc) in &self.cfg.repositories {
            let Some(sched) = rc
                .gc_schedule
                .as_deref()
                .and_then(|s| config::schedule(s).ok())
            else {
                continue;
            };
            let key = format!("gc/{name}");
            if !due(&sched, self.last_gc(name)) || self.slots.queued().contains(&key) {
                continue;
            }
            let (agent, name, rc) = (self.clone(), name.clone(), rc.clone());
            std::thread::spawn(move || {
                if let Some(_queued) = agent.slots.enqueue(&key) {
                    agent.gc(&name, &rc);
                }
            });
        }
    }

    /// Silence is a failure too: a protected (domain, policy) with no
    /// success for twice its schedule's period mails its contacts.
    fn check_silence(&self) {
        for (dom, policies) in self.protected() {
            for p in policies {
                let Some(pol) = self.cfg.policies.get(&p) else {
                    continue;
                };
                let Some(period) = self
                    .schedule_of(&pol.schedule)
                    .and_then(|s| s.period(&chrono::Local::now()))
                else {
                    continue;
                };
                self.alert_silence(&dom, &p, pol, period);
            }
        }
    }
}
