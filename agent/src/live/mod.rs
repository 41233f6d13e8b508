//! Live restore: the restored VM boots at once from the backup, served by
//! `bulwark-nbd`, while the server restores each disk into a local file
//! behind it (the backfill, as fast as `bulwark restore`). Each overlay's
//! backing then moves from the server onto its file (the VM no longer
//! needs the repository and the server stops), and once the guest is idle
//! a block-stream job copies the file into the overlay; when it finishes
//! the VM runs on its overlays alone. Guest writes land in the overlays (on disk, never in
//! memory) and neither the file nor a stream ever overwrites them; an
//! outage of the server or of the repository makes guest reads wait
//! (QEMU's NBD client reconnects; the server retries) rather than fail.
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
        // After the server: it may be writing them.
        for b in r.disks.iter().filter_map(|d| d.base.as_ref()) {
            supervise::remove_base(b);
        }
        Ok(())
    })?;
    for p in problems {
        tracing::warn!("cancelling {name}: {p}");
    }
    Ok(r)
}
