//! `agent status`: every domain on the host with its policies, last result,
//! next run and last snapshot, and anything wrong (unprotected, policy
//! refused, target unusable, failing since, silent); the repositories'
//! checks and GCs. The earlier flat fields (`runs`, `gcs`, `protected`, ...)
//! stay for scripts that read them.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::scheduler::{next_run, now};
use super::Agent;
use crate::libvirt::{Libvirt, State};

impl Agent {
    pub(super) fn status(&self) -> Value {
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
            for p in d["problems"].as_array().into_iter().flatten() {
                problems.push(json!({"domain": name, "problem": p}));
            }
            domains.push(d);
        }
        for (name, t) in &targets {
            if !t.ok {
                problems.push(json!({"repository": name, "problem": format!(
                    "repository {name} is not usable ({}): {}",
                    t.kind.as_deref().unwrap_or("error"),
                    t.error.as_deref().unwrap_or("")
                )}));
            }
        }
        problems.extend(self.lock_problems(&sched));
        let refused: BTreeMap<&String, String> = self
            .cfg
            .policies
            .keys()
            .filter_map(|p| self.cfg.refusal(p).map(|why| (p, why)))
            .collect();
        // `"ok": true` is the reply's (control.rs), beside these.
        json!({
            "host": super::hostname(),
            "version": env!("CARGO_PKG_VERSION"),
            "now": now(),
            "policies": self.cfg.policies.keys().collect::<Vec<_>>(),
            "refused_policies": refused,
            "protected": self.protected().into_iter().collect::<BTreeMap<_, _>>(),
            "libvirt_connections": self.connections.load(Ordering::Relaxed),
            "runs": sched.runs,
            "gcs": sched.gcs,
            "locks": sched.locks,
            "busy": !running.is_empty(),
            "running": running,
            "queued": self.slots.queued(),
            "targets": targets,
            "domains": domains,
            "problems": problems,
        })
    }

    /// Each domain's state, by name (empty if libvirtd cannot be reached:
    /// the status still answers).
    fn domain_states(&self) -> BTreeMap<String, &'static str> {
        let list = Libvirt::open(&self.cfg.libvirt_uri).and_then(|lv| {
            lv.domains()?
                .iter()
                .map(|d| {
                    let s = match d.state()? {
                        State::Active => "running",
                        State::ShutOff => "shut off",
                    };
                    Ok((d.name().to_string(), s))
                })
                .collect::<crate::libvirt::Result<BTreeMap<_, _>>>()
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
    ) -> Value {
        let mut problems: Vec<String> = Vec::new();
        let mut policies = Vec::new();
        for p in named {
            let Some(pol) = self.cfg.policies.get(p) else {
                problems.push(format!("policy {p} is not defined on this host"));
                policies.push(json!({"name": p, "usable": false}));
                continue;
            };
            if let Some(why) = self.cfg.refusal(p) {
                problems.push(why);
                policies.push(json!({"name": p, "usable": false, "repository": pol.repository}));
                continue;
            }
            let run = sched.runs.get(&format!("{name}/{p}"));
            let schedule = self.schedule_of(&pol.schedule);
            let next = schedule
                .as_ref()
                .and_then(|s| next_run(s, run.map(|r| r.at)));
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
            let period = schedule.and_then(|s| s.period(&chrono::Local::now()));
            let last_ok = run.and_then(|r| r.last_ok);
            if let (Some(period), Some(last_ok)) = (period, last_ok) {
                if now().saturating_sub(last_ok) > 2 * period.as_secs() {
                    problems.push(format!(
                        "{p}: no successful backup since {}",
                        fmt_time(last_ok)
                    ));
                }
            }
            policies.push(json!({
                "name": p,
                "usable": true,
                "repository": pol.repository,
                "schedule": pol.schedule,
                "last_run": run.map(|r| r.at),
                "last_result": run.map(|r| if r.ok && r.prune_error.is_none() { "ok" } else { "failed" }),
                "last_error": run.and_then(|r| r.error.clone().or(r.prune_error.clone())),
                "last_ok": last_ok,
                "last_snapshot": run.and_then(|r| r.last_snapshot),
                "failing_since": run.and_then(|r| r.failing_since),
                "next_run": next,
            }));
        }
        let protected = policies.iter().any(|p| p["usable"] == true);
        if !protected && self.cfg.enforce.require_protection {
            problems.insert(0, "unprotected: no policy of this host names it".into());
        }
        json!({
            "name": name,
            "state": states.get(name).copied().unwrap_or("unknown"),
            "protected": protected,
            "backing_up": running.iter().any(|r| r == name),
            "policies": policies,
            "problems": problems,
        })
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
