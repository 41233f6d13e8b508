//! Lock extension of locked repositories (docs/immutability.md): on each
//! repository's `lock_schedule` (default daily) the agent opens it with the
//! maintenance credentials and, when its last pass's date comes within a
//! lock period, runs a pass. `agent status` names a repository whose locks
//! would run out before the next check.

use std::sync::Arc;

use bulwark_proto::status::{LockRun, Problem};
use chrono::{DateTime, Utc};

use super::scheduler::{earliest, next_run, now, Schedule};
use super::Agent;
use crate::config::{self, RepoConf, Role};

const DEFAULT_SCHEDULE: &str = "daily";

fn schedule_of(rc: &RepoConf) -> Option<crate::calendar::Schedule> {
    config::schedule(rc.lock_schedule.as_deref().unwrap_or(DEFAULT_SCHEDULE)).ok()
}

/// A pass when none was made, or the last one's date is less than a lock
/// period away; `Ok(None)` for a repository without locks.
fn check(rc: &RepoConf) -> anyhow::Result<Option<(DateTime<Utc>, usize)>> {
    let repo = rc.open_as(Role::Maintenance)?;
    let Some(settings) = repo.config().object_lock else {
        return Ok(None);
    };
    if let Some(p) = bulwark_store::maintain::lock::last_pass(&repo)? {
        if p.target - Utc::now() >= settings.period() {
            return Ok(Some((p.target, 0)));
        }
    }
    let r = bulwark_store::maintain::lock::extend(&repo, &|_| {})?;
    let until = r
        .target
        .ok_or_else(|| anyhow::anyhow!("a lock pass without a date"))?;
    Ok(Some((until, r.extended)))
}

impl Agent {
    /// Starts a lock check on every repository whose `lock_schedule` is due.
    pub(super) fn locks_due(self: &Arc<Self>) -> Option<u64> {
        let mut next = None;
        // Extension reads chunk lists: only where the key is.
        for (name, rc) in self.cfg.repositories.iter().filter(|(_, r)| r.has_key()) {
            let Some(sched) = schedule_of(rc) else {
                continue;
            };
            let key = format!("locks/{name}");
            let last = self.last_lock_check(name);
            let (name, rc) = (name.clone(), rc.clone());
            let job = move |agent: &Arc<Agent>| agent.check_locks(&name, &rc);
            next = earliest(next, self.start_due(&key, &sched, last, job));
        }
        next
    }

    fn last_lock_check(&self, repo: &str) -> Option<u64> {
        let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        s.locks.get(repo).map(|r| r.at)
    }

    fn check_locks(&self, name: &str, rc: &RepoConf) {
        let run = match check(rc) {
            Ok(r) => {
                if let Some((until, n)) = r.filter(|(_, n)| *n > 0) {
                    tracing::info!("locks of {name}: {n} extended until {until}");
                }
                LockRun {
                    at: now(),
                    ok: true,
                    error: None,
                    locked_until: r.map(|(t, _)| t.to_rfc3339()),
                    extended: r.map_or(0, |(_, n)| n),
                }
            }
            Err(e) => {
                tracing::error!("lock extension of {name} failed: {e:#}");
                LockRun {
                    at: now(),
                    ok: false,
                    error: Some(format!("{e:#}")),
                    locked_until: self.locked_until(name).map(|t| t.to_rfc3339()),
                    extended: 0,
                }
            }
        };
        if let Err(e) = self.record(|s| {
            s.locks.insert(name.to_string(), run);
        }) {
            tracing::warn!("recording the lock check of {name}: {e:#}");
        }
    }

    fn locked_until(&self, repo: &str) -> Option<DateTime<Utc>> {
        let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        s.locks.get(repo).and_then(until)
    }

    /// Repositories whose locks fail to extend, or would run out before
    /// the next scheduled check.
    pub(super) fn lock_problems(&self, sched: &Schedule) -> Vec<Problem> {
        let mut out = Vec::new();
        for (name, r) in &sched.locks {
            let Some(rc) = self.cfg.repositories.get(name) else {
                continue;
            };
            if let Some(e) = &r.error {
                out.push(problem(
                    name,
                    format!("locks of repository {name} could not be extended: {e}"),
                ));
            }
            let next = schedule_of(rc).and_then(|s| next_run(&s, Some(r.at)));
            if let (Some(until), Some(next)) = (until(r), next) {
                if until.timestamp() <= next as i64 {
                    out.push(problem(
                        name,
                        format!(
                        "locks of repository {name} run out at {} before the next extension at {}",
                        until.to_rfc3339(),
                        DateTime::from_timestamp(next as i64, 0).unwrap_or_default().to_rfc3339()
                    ),
                    ));
                }
            }
        }
        out
    }
}

/// When a check's locks run out; a date the agent itself wrote that does
/// not parse counts as none known (the check reports its error instead).
fn until(r: &LockRun) -> Option<DateTime<Utc>> {
    let t = r.locked_until.as_deref()?;
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn problem(repository: &str, problem: String) -> Problem {
    Problem {
        domain: None,
        repository: Some(repository.to_string()),
        problem,
    }
}
