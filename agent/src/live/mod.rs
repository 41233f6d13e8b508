//! Live restore: the restored VM boots at once from the backup, served by
//! `bulwark-nbd`, while block-stream jobs copy every block into local
//! qcow2 overlays behind it; when they finish the VM runs on local disks
//! alone. Guest writes land in the overlays (on disk, never in memory) and
//! a stream never overwrites them; an outage of the server makes guest
//! reads wait (QEMU's NBD client reconnects) rather than fail.
//!
//! [`start`] makes it, [`supervise`] sees it through (the agent's job, or
//! `--wait`), [`record`] is its persisted state, [`server`] its NBD server.

pub mod reconnect;
pub mod record;
pub mod server;
pub mod start;
pub mod supervise;

use anyhow::Result;

use crate::libvirt::{Libvirt, State};
use record::{LiveRestore, Records};

/// Stops a live restore: streams cancelled, the VM destroyed, and unless
/// `keep` its definition and overlays removed; then the server stopped.
pub fn cancel(records: &Records, name: &str, uri: &str, keep: bool) -> Result<LiveRestore> {
    let lv = Libvirt::open(uri)?;
    let mut problems = Vec::new();
    let r = records.update(name, |r| {
        r.cancel()?;
        match lv.find_domain(&r.name) {
            Ok(Some(dom)) => {
                for d in &r.disks {
                    if let Ok(Some(_)) = dom.block_job(&d.target) {
                        if let Err(e) = dom.block_job_abort(&d.target) {
                            problems.push(e.to_string());
                        }
                    }
                }
                if dom.state().is_ok_and(|s| s == State::Active) {
                    if let Err(e) = dom.destroy() {
                        problems.push(e.to_string());
                    }
                }
                if !keep {
                    if let Err(e) = dom.undefine() {
                        problems.push(e.to_string());
                    }
                }
            }
            Ok(None) => {}
            Err(e) => problems.push(e.to_string()),
        }
        if !keep {
            for d in &r.disks {
                if let Err(e) = std::fs::remove_file(&d.overlay) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        problems.push(format!("{}: {e}", d.overlay.display()));
                    }
                }
            }
        }
        server::stop(r);
        Ok(())
    })?;
    for p in problems {
        tracing::warn!("cancelling {name}: {p}");
    }
    Ok(r)
}
