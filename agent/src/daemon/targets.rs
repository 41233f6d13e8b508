//! Is each repository usable from this host? Checked at start and every
//! `target_check` (the same steps as `bulwark repo check-target`: endpoint,
//! credentials, bucket, repository, key), so an operator sees a broken
//! target in `agent status` before a backup fails on it.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::scheduler::now;
use super::Agent;

pub(super) use bulwark_proto::status::Target;

/// Checks every repository, then again every `target_check`, for as long
/// as the process runs.
pub(super) fn run(agent: &Arc<Agent>) {
    let every = agent
        .cfg
        .target_check()
        .unwrap_or(std::time::Duration::from_secs(300));
    loop {
        for (name, rc) in &agent.cfg.repositories {
            let r = match rc.location_as(crate::config::Role::Backup) {
                Ok(l) => crate::target::check(&l, || rc.secret()),
                Err(e) => Err(("credentials", format!("{e:#}"))),
            };
            agent.note_target(name, r);
        }
        agent.write_metrics();
        std::thread::sleep(every);
    }
}

impl Agent {
    fn note_target(&self, name: &str, r: Result<(), (&'static str, String)>) {
        let now = now();
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let before = targets.get(name).map(|t| (t.ok, t.since));
        let ok = r.is_ok();
        let since = match before {
            Some((was, since)) if was == ok => since,
            _ => now,
        };
        match (&r, before) {
            (Err((kind, e)), Some((true, _)) | None) => {
                tracing::warn!("repository {name} is not usable ({kind}): {e}")
            }
            (Ok(()), Some((false, _))) => tracing::info!("repository {name} is usable again"),
            _ => {}
        }
        let (kind, error) = match r {
            Ok(()) => (None, None),
            Err((k, e)) => (Some(k.to_string()), Some(e)),
        };
        targets.insert(
            name.to_string(),
            Target {
                ok,
                checked: now,
                since,
                kind,
                error,
            },
        );
    }

    pub(super) fn targets(&self) -> BTreeMap<String, Target> {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
