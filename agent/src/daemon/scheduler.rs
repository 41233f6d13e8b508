//! When things run: each (domain, policy) whose schedule (a calendar event
//! or an interval) has come since its last run, and each repository's GC on
//! its `gc_schedule`. A run missed while the agent was down runs once at
//! start, like a `Persistent=true` timer; a (domain, policy) that never ran
//! runs at once, so a new VM is protected from the start. The record of last
//! runs (`schedule.json` in the state dir) survives restarts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::Agent;
use crate::config;

/// Last result per `domain/policy`, and last GC per repository.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Schedule {
    pub runs: BTreeMap<String, Run>,
    #[serde(default)]
    pub gcs: BTreeMap<String, GcRun>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Run {
    /// Unix seconds of the last attempt.
    pub at: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Snapshots the prune after this backup removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct GcRun {
    pub at: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub packs_deleted: usize,
    pub bytes_deleted: u64,
    pub packs_condemned: usize,
}

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a run is due: never run, or the schedule's next time after the
/// last run has come (however long ago: a missed run runs once).
fn due(sched: &crate::calendar::Schedule, last: Option<u64>) -> bool {
    let Some(last) = last else { return true };
    let Some(last) = chrono::DateTime::from_timestamp(last as i64, 0) else {
        return true;
    };
    let last = last.with_timezone(&chrono::Local);
    sched
        .next_after(&last)
        .is_some_and(|next| next.timestamp() as u64 <= now())
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
pub(super) fn run(agent: &Agent) {
    loop {
        agent.backups_due();
        agent.gc_due();
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
        Ok(())
    }

    fn last_run(&self, key: &str) -> Option<u64> {
        let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        s.runs.get(key).map(|r| r.at)
    }

    fn last_gc(&self, repo: &str) -> Option<u64> {
        let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        s.gcs.get(repo).map(|r| r.at)
    }

    /// Backs up every protected (domain, policy) that is due. The domains
    /// come from the inventory the libvirt events keep.
    fn backups_due(&self) {
        for (dom, policies) in self.inventory.protected() {
            for p in policies {
                let Some(pol) = self.cfg.policies.get(&p) else {
                    continue;
                };
                let Ok(sched) = config::schedule(&pol.schedule) else {
                    continue; // refused when the config was loaded
                };
                if !due(&sched, self.last_run(&format!("{dom}/{p}"))) {
                    continue;
                }
                tracing::info!("scheduled backup of {dom} ({p})");
                // The result is recorded (and logged) by the job itself.
                let _ = self.backup(&dom, Some(&p), false);
            }
        }
    }

    /// Runs GC on every repository whose `gc_schedule` is due.
    fn gc_due(&self) {
        for (name, rc) in &self.cfg.repositories {
            let Some(every) = rc.gc_schedule.as_deref() else {
                continue;
            };
            let Ok(sched) = config::schedule(every) else {
                continue; // refused when the config was loaded
            };
            if !due(&sched, self.last_gc(name)) {
                continue;
            }
            self.gc(name, rc);
        }
    }
}
