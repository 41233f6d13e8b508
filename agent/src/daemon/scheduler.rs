//! When things run: each (domain, policy) whose schedule (a calendar event
//! or an interval) has come since its last run, and each repository's GC on
//! its `gc_schedule`. A run missed while the agent was down runs once at
//! start, like a `Persistent=true` timer; a (domain, policy) that never ran
//! runs as soon as the first listing of the domains names it, so a new VM is
//! protected from the start. The record of last runs (`schedule.json` in
//! the state dir) survives restarts.
//!
//! The scheduler sleeps until the earliest time something is due, or until
//! [`Wake`] is pulled by what changes that time: a libvirt event (the
//! inventory changed), a job's end, a run recorded from the socket. The
//! sleep is capped at `tick_seconds`, which now only paces the silence
//! check and notices a clock that was stepped.
//!
//! Each due job runs on a thread of its own, so a long backup delays no
//! other VM's; `Slots` keeps one backup per VM and the host-wide limit.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
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
    /// Last file backup per `[host.NAME]` (`hosts.rs`).
    #[serde(default)]
    pub hosts: BTreeMap<String, Run>,
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

/// Pulled when what is due may have changed; the scheduler waits on it.
#[derive(Default)]
pub(super) struct Wake {
    pulled: Mutex<bool>,
    cond: Condvar,
}

impl Wake {
    pub fn pull(&self) {
        *self.pulled.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
    }

    /// Sleeps up to `max`, less if pulled (also if pulled since the last wait).
    fn wait(&self, max: Duration) {
        let mut pulled = self.pulled.lock().unwrap_or_else(|p| p.into_inner());
        if !*pulled {
            pulled = self
                .cond
                .wait_timeout_while(pulled, max, |p| !*p)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *pulled = false;
    }
}

/// How long until `at` (seconds since the epoch); zero once it has come.
fn until(at: u64) -> Duration {
    (UNIX_EPOCH + Duration::from_secs(at))
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// Starts what is due, then sleeps until the next due time or a wake, for
/// as long as the process runs.
pub(super) fn run(agent: &Arc<Agent>) {
    let cap = Duration::from_secs(agent.cfg.tick_seconds.max(1));
    loop {
        let next = [
            agent.backups_due(),
            agent.gc_due(),
            agent.locks_due(),
            agent.syncs_due(),
            agent.drills_due(),
            agent.hosts_due(),
        ]
        .into_iter()
        .flatten()
        .min();
        agent.check_silence();
        agent.enforce_protection();
        agent.wake.wait(next.map_or(cap, until).min(cap));
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
        self.wake.pull();
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

    /// Starts `job` on a thread of its own when the key's next run (after
    /// `last`, its last recorded run) has come and `key` is not queued yet.
    /// Returns when to look again: the next run while it lies ahead, none
    /// while the job is queued or running (its end wakes the scheduler). A
    /// job that ended without recording a run (libvirtd unreachable before
    /// the backup began) is retried `tick_seconds` after it started.
    pub(super) fn start_due(
        self: &Arc<Self>,
        key: &str,
        sched: &crate::calendar::Schedule,
        last: Option<u64>,
        job: impl FnOnce(&Arc<Agent>) + Send + 'static,
    ) -> Option<u64> {
        let mut next = next_run(sched, last)?;
        let started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&s) = started.get(key).filter(|&&s| last.is_none_or(|l| l < s)) {
            next = next.max(s + self.cfg.tick_seconds.max(1));
        }
        drop(started);
        if next > now() {
            return Some(next);
        }
        let queued = self.slots.enqueue(key)?;
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        started.insert(key.to_string(), now());
        drop(started);
        let agent = self.clone();
        std::thread::spawn(move || {
            job(&agent);
            drop(queued);
            agent.wake.pull();
        });
        None
    }

    /// Starts a backup of every protected (domain, policy) that is due and
    /// not queued yet; the earliest next due time. The domains come from
    /// the inventory the libvirt events keep.
    fn backups_due(self: &Arc<Self>) -> Option<u64> {
        let mut next = None;
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
                let last = self.last_run(&key);
                let dom = dom.clone();
                let job = move |agent: &Arc<Agent>| {
                    tracing::info!("scheduled backup of {dom} ({p})");
                    // The result is recorded, logged and mailed by the job.
                    let _ = agent.backup(&dom, Some(&p), false);
                };
                next = earliest(next, self.start_due(&key, &sched, last, job));
            }
        }
        next
    }

    /// Starts GC on every repository whose `gc_schedule` is due; the
    /// earliest next due time.
    fn gc_due(self: &Arc<Self>) -> Option<u64> {
        let mut next = None;
        for (name, rc) in &self.cfg.repositories {
            let Some(sched) = rc
                .gc_schedule
                .as_deref()
                .and_then(|s| config::schedule(s).ok())
            else {
                continue;
            };
            let (key, last) = (format!("gc/{name}"), self.last_gc(name));
            let (name, rc) = (name.clone(), rc.clone());
            let job = move |agent: &Arc<Agent>| agent.gc(&name, &rc);
            next = earliest(next, self.start_due(&key, &sched, last, job));
        }
        next
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

/// The earlier of two optional times.
pub(super) fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
