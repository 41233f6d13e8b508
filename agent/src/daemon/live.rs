//! The agent owns live restores: one supervisor thread each, started when
//! the CLI hands one over (`live_adopt`) and, after the agent's own
//! restart, for every record still streaming.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::Agent;
use crate::live::record::Records;
use crate::live::supervise::supervise;

impl Agent {
    fn records(&self) -> Records {
        Records::new(self.state.root())
    }

    /// Supervises `name` on a thread of its own, unless one already does.
    pub(super) fn adopt_live(self: &Arc<Self>, name: &str) -> Result<()> {
        let r = self.records().load(name)?;
        if !r.phase().active() {
            bail!("live restore {name} is not running ({})", r.phase());
        }
        if !self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string())
        {
            return Ok(());
        }
        tracing::info!("live restore {name}: supervising");
        let a = self.clone();
        let name = name.to_string();
        std::thread::spawn(move || {
            let out = supervise(&a.records(), &name, &a.cfg.libvirt_uri, None, &|_| {});
            match out {
                Ok(r) => tracing::info!("live restore {name}: {}", r.phase()),
                Err(e) => tracing::error!("live restore {name}: {e:#}"),
            }
            a.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
        });
        Ok(())
    }

    /// Picks up every unfinished live restore (after a restart).
    pub(super) fn resume_live(self: &Arc<Self>) {
        match self.records().all() {
            Ok(list) => {
                for r in list.into_iter().filter(|r| r.phase().active()) {
                    if let Err(e) = self.adopt_live(&r.name) {
                        tracing::warn!("live restore {}: {e:#}", r.name);
                    }
                }
            }
            Err(e) => tracing::warn!("live restores: {e:#}"),
        }
    }
}
