//! `agent status`: every domain on the host with its policies, last result,
//! next run and last snapshot, and anything wrong (unprotected, policy
//! refused, target unusable, failing since, silent); the repositories'
//! checks and GCs. The earlier flat fields (`runs`, `gcs`, `protected`, ...)
//! stay for scripts that read them.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use bulwark_proto::status::{DomainStatus, PolicyStatus, Problem, Run, Status};

use super::scheduler::{next_run, now};
use super::Agent;
use crate::libvirt::{Libvirt, State};

impl Agent {
    pub(super) fn status(&self) -> Status {
        let sched = self
            .schedule
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let targets = self.targets();
        let states = self.domain_states();
        let running = self.slots.running();
        let mut domains = Vec::new();
        let mut problems = Vec::new();
        for (name, named) in self.inventory.all() {
            let d = self.domain_status(&name, &named, &sched, &targets, &running, &states);
            problems.extend(d.problems.iter().map(|p| Problem {
                domain: Some(name.clone()),
                repository: None,
                problem: p.clone(),
            }));
            domains.push(d);
        }
        for (name, t) in targets.iter().filter(|(_, t)| !t.ok) {
            problems.push(Problem {
                domain: None,
                repository: Some(name.clone()),
                problem: format!(
                    "repository {name} is not usable ({}): {}",
                    t.kind.as_deref().unwrap_or("error"),
                    t.error.as_deref().unwrap_or("")
                ),
            });
        }
        problems.extend(self.lock_problems(&sched));
        problems.extend(self.sync_problems(&sched));
        problems.extend(self.drill_problems(&sched));
        problems.extend(self.host_problems(&sched));
        let refused = self
            .cfg
            .policies
            .keys()
            .filter_map(|p| self.cfg.refusal(p).map(|why| (p.clone(), why)))
            .collect();
        Status {
            host: super::hostname(),
            version: env!("CARGO_PKG_VERSION").into(),
            now: now(),
            policies: self.cfg.policies.keys().cloned().collect(),
            refused_policies: refused,
            protected: self.protected().into_iter().collect(),
            libvirt_connections: self.connections.load(Ordering::Relaxed),
            runs: sched.runs,
            gcs: sched.gcs,
            locks: sched.locks,
            syncs: sched.syncs,
            drills: sched.drills,
            hosts: sched.hosts,
            busy: !running.is_empty(),
            queued: self.slots.queued(),
            running,
            targets,
            domains,
            problems,
        }
    }

    /// Each domain's state, by name (empty if libvirtd cannot be reached:
    /// the status still answers).
    fn domain_states(&self) -> BTreeMap<String, &'static str> {
        if !self.cfg.uses_libvirt() {
            return BTreeMap::new();
        }
        let list = Libvirt::open(&self.cfg.libvirt_uri)
            .and_then(|lv| lv.domain_states())
            .map(|states| {
                states
                    .into_iter()
                    .map(|(name, s)| match s {
                        State::Active => (name, "running"),
                        State::ShutOff => (name, "shut off"),
                    })
                    .collect()
            });
        list.unwrap_or_else(|e| {
            tracing::debug!("status: domain states: {e}");
            BTreeMap::new()
        })
    }

    fn domain_status(
        &self,
        name: &str,
        named: &[String],
        sched: &super::scheduler::Schedule,
        targets: &BTreeMap<String, super::targets::Target>,
        running: &[String],
        states: &BTreeMap<String, &'static str>,
    ) -> DomainStatus {
        let mut problems: Vec<String> = Vec::new();
        let mut policies = Vec::new();
        for p in named {
            let unusable = |repository: Option<String>| PolicyStatus {
                name: p.clone(),
                usable: false,
                repository,
                ..Default::default()
            };
            let Some(pol) = self.cfg.policies.get(p) else {
                problems.push(format!("policy {p} is not defined on this host"));
                policies.push(unusable(None));
                continue;
            };
            if let Some(why) = self.cfg.refusal(p) {
                problems.push(why);
                policies.push(unusable(Some(pol.repository.clone())));
                continue;
            }
            let run = sched.runs.get(&format!("{name}/{p}"));
            problems.extend(self.policy_problems(p, pol, run, targets));
            let next = self
                .schedule_of(&pol.schedule)
                .and_then(|s| next_run(&s, run.map(|r| r.at)));
            let result = |r: &Run| {
                if r.ok && r.prune_error.is_none() {
                    "ok"
                } else {
                    "failed"
                }
            };
            policies.push(PolicyStatus {
                name: p.clone(),
                usable: true,
                repository: Some(pol.repository.clone()),
                schedule: Some(pol.schedule.clone()),
                last_run: run.map(|r| r.at),
                last_result: run.map(|r| result(r).to_string()),
                last_error: run.and_then(|r| r.error.clone().or(r.prune_error.clone())),
                last_ok: run.and_then(|r| r.last_ok),
                last_snapshot: run.and_then(|r| r.last_snapshot.clone()),
                failing_since: run.and_then(|r| r.failing_since),
                next_run: next,
            });
        }
        let protected = policies.iter().any(|p| p.usable);
        if !protected && self.cfg.enforce.require_protection {
            problems.insert(0, "unprotected: no policy of this host names it".into());
        }
        DomainStatus {
            name: name.to_string(),
            state: states.get(name).copied().unwrap_or("unknown").to_string(),
            protected,
            backing_up: running.iter().any(|r| r == name),
            policies,
            problems,
        }
    }

    /// What is wrong with a usable policy: failing, its repository not
    /// usable, or silent for twice its schedule's period.
    fn policy_problems(
        &self,
        p: &str,
        pol: &crate::config::PolicyConf,
        run: Option<&Run>,
        targets: &BTreeMap<String, super::targets::Target>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(r) = run.filter(|r| r.failing_since.is_some() || !r.ok) {
            let since = r.failing_since.unwrap_or(r.at);
            let err = r
                .error
                .as_deref()
                .or(r.prune_error.as_deref())
                .unwrap_or("");
            problems.push(format!("{p}: failing since {}: {err}", fmt_time(since)));
        }
        if let Some(t) = targets.get(&pol.repository).filter(|t| !t.ok) {
            problems.push(format!(
                "{p}: repository {} is not usable ({})",
                pol.repository,
                t.kind.as_deref().unwrap_or("error")
            ));
        }
        let period = self
            .schedule_of(&pol.schedule)
            .and_then(|s| s.period(&chrono::Local::now()));
        if let (Some(period), Some(last_ok)) = (period, run.and_then(|r| r.last_ok)) {
            if now().saturating_sub(last_ok) > 2 * period.as_secs() {
                problems.push(format!(
                    "{p}: no successful backup since {}",
                    fmt_time(last_ok)
                ));
            }
        }
        problems
    }
}

/// Unix seconds as local time, for messages.
pub(crate) fn fmt_time(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S %Z")
                .to_string()
        })
        .unwrap_or_else(|| secs.to_string())
}
