//! Restore drills on schedule: a protected VM whose policy sets `drill`
//! has its latest snapshot booted in isolation and checked (`crate::drill`).
//! At most one drill runs on the host at once, never beside that VM's
//! backup (it takes the VM's backup slot); a failing streak is mailed once
//! like a backup's; `agent status` and the metrics show each VM's last.
//! A VM is first drilled once it has a backup, then on the schedule.

use std::sync::Arc;

use anyhow::{Context, Result};
use bulwark_proto::status::Problem;

use super::scheduler::{earliest, now, DrillRun, Schedule};
use super::Agent;
use crate::config::PolicyConf;
use crate::drill::{self, Report};
use crate::libvirt::Libvirt;
use crate::logging::Capture;
use crate::mail::Task;

impl Agent {
    /// Starts the drill of every protected VM that is due: the first of
    /// its policies with a `drill` schedule decides.
    pub(super) fn drills_due(self: &Arc<Self>) -> Option<u64> {
        let mut next = None;
        for (dom, policies) in self.protected() {
            let Some((policy, expr)) = policies.iter().find_map(|p| {
                let d = self.cfg.policies.get(p)?.drill.clone()?;
                Some((p.clone(), d))
            }) else {
                continue;
            };
            let Some(sched) = self.schedule_of(&expr) else {
                continue;
            };
            let key = format!("drill/{dom}");
            let last = self.last_drill(&dom);
            // Nothing to drill before the first backup (whose record wakes
            // the scheduler).
            let backed_up = self
                .schedule_run(&format!("{dom}/{policy}"))
                .is_some_and(|r| r.last_ok.is_some());
            if last.is_none() && !backed_up {
                continue;
            }
            let job = move |agent: &Arc<Agent>| agent.drill(&dom, &policy);
            next = earliest(next, self.start_due(&key, &sched, last, job));
        }
        next
    }

    fn last_drill(&self, dom: &str) -> Option<u64> {
        let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        s.drills.get(dom).map(|r| r.at)
    }

    /// One drill of `dom`'s latest snapshot, recorded and (on a change of
    /// streak) mailed.
    fn drill(&self, dom: &str, policy: &str) {
        let Some(pol) = self.cfg.policies.get(policy) else {
            return;
        };
        let _one = self.drill_busy.lock().unwrap_or_else(|e| e.into_inner());
        let _slot = self.slots.acquire(dom);
        let log = Capture::begin();
        tracing::info!("restore drill of {dom} ({policy})");
        let r = self.run_drill(dom, pol);
        let last_ok = {
            let s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
            s.drills.get(dom).and_then(|r| r.last_ok)
        };
        let mut run = DrillRun {
            at: now(),
            policy: policy.to_string(),
            last_ok,
            ..Default::default()
        };
        match &r {
            Ok(rep) => {
                run.ok = rep.passed;
                run.snapshot = Some(rep.snapshot.clone());
                run.seconds = rep.seconds;
                run.bytes_fetched = rep.bytes_fetched;
                run.boot_set_bytes = rep.boot_set_bytes();
                run.error = rep.failure();
                if rep.passed {
                    run.last_ok = Some(run.at);
                    tracing::info!("restore drill of {dom}: passed in {:.1} s", rep.seconds);
                } else {
                    tracing::error!(
                        "restore drill of {dom} failed: {}",
                        run.error.as_deref().unwrap_or("")
                    );
                }
            }
            Err(e) => {
                tracing::error!("restore drill of {dom} could not run: {e:#}");
                run.error = Some(format!("{e:#}"));
            }
        }
        let error = run.error.clone().filter(|_| !run.ok);
        if let Err(e) = self.record(|s| {
            s.drills.insert(dom.to_string(), run);
        }) {
            tracing::warn!("recording the drill of {dom}: {e:#}");
        }
        let job = crate::mail::Job {
            task: Task::Drill,
            vm: dom,
            policy: &format!("drill:{policy}"),
            repository: &pol.repository,
            contacts: &pol.contacts,
        };
        self.alert(&job, error.as_deref(), &log.lines());
    }

    fn run_drill(&self, dom: &str, pol: &PolicyConf) -> Result<Report> {
        let spec = pol.drill_spec()?.context("the policy has no drill")?;
        let rc = self
            .cfg
            .repositories
            .get(&pol.repository)
            .with_context(|| format!("no repository {}", pol.repository))?;
        let repo = Arc::new(rc.open()?);
        let snap = repo.while_loading_index(|| repo.find_snapshot(&format!("{dom}@latest")))?;
        let libvirt = Libvirt::open(&self.cfg.libvirt_uri)?;
        let report = drill::run(&repo, &libvirt, snap, &spec, self.state.root())?;
        // The drill ran: its report stands even if the repository cannot
        // take it now.
        if let Err(e) = drill::report::save_in_repository(&repo, &report) {
            tracing::warn!("{e:#}");
        }
        Ok(report)
    }

    /// VMs whose last drill failed.
    pub(super) fn drill_problems(&self, sched: &Schedule) -> Vec<Problem> {
        sched
            .drills
            .iter()
            .filter(|(_, r)| !r.ok)
            .map(|(vm, r)| Problem {
                domain: Some(vm.clone()),
                repository: None,
                problem: format!(
                    "restore drill failed: {}",
                    r.error.as_deref().unwrap_or("no detail")
                ),
            })
            .collect()
    }
}
