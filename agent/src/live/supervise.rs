//! Seeing a live restore through: the server kept alive while a disk
//! reads from it, each disk moved onto its backfilled file once the server
//! has restored it (then the server stops: the VM is independent of the
//! repository), each disk's stream from that file followed (and started
//! again after it stopped short), the backing gone at the end. One step per second; the
//! record is updated under its lock each step, so `status` reads progress
//! and `cancel` can stop it from another process.
//!
//! The agent runs this on a thread per restore (and again for every
//! unfinished record after its own restart); `--wait` runs it in the
//! foreground.

use std::time::Duration;

use anyhow::Result;

use super::record::{LiveDisk, LiveRestore, Records};
use super::server;
use crate::libvirt::{Domain, Libvirt};

/// Streams started on one disk before the restore is declared failed.
const MAX_PULLS: u32 = 3;

/// Supervises `name` until it is done, failed or cancelled; the final
/// record. `progress` sees the record after each step.
pub fn supervise(
    records: &Records,
    name: &str,
    uri: &str,
    password: Option<&str>,
    progress: &dyn Fn(&LiveRestore),
) -> Result<LiveRestore> {
    loop {
        let r = records.update(name, |r| step(r, uri, password))?;
        progress(&r);
        if !r.phase().active() {
            return Ok(r);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// One look at the restore; errors reaching libvirt are retried next step.
fn step(r: &mut LiveRestore, uri: &str, password: Option<&str>) -> Result<()> {
    if !r.phase().active() {
        return Ok(());
    }
    if r.disks.iter().any(LiveDisk::needs_server) && !server::alive(r) {
        tracing::warn!("{}: bulwark-nbd is not running: starting it again", r.name);
        match server::start(r, password) {
            Ok(pid) => {
                r.server_pid = Some(pid);
                r.server_restarts += 1;
                // The outage explains streams that stopped: fresh budgets.
                for d in &mut r.disks {
                    d.pulls = d.pulls.min(1);
                }
            }
            Err(e) => tracing::warn!("{}: {e:#}", r.name),
        }
    }
    let dom = match Libvirt::open(uri).and_then(|lv| lv.domain(&r.name)) {
        Ok(d) => d,
        Err(crate::libvirt::Error::NoDomain(_)) => {
            r.fail("the domain is gone")?;
            server::stop(r);
            return Ok(());
        }
        Err(e) => {
            tracing::warn!("{}: {e}", r.name);
            return Ok(());
        }
    };
    if let Err(e) = follow_backfills(r, &dom) {
        tracing::warn!("{}: {e:#}", r.name);
    }
    if r.independent_after.is_none() && !r.disks.iter().any(LiveDisk::needs_server) {
        let secs = (chrono::Utc::now().timestamp_millis() - r.started * 1000) as f64 / 1000.0;
        tracing::info!(
            "{}: no disk reads from the repository any more ({secs:.1}s): stopping the server",
            r.name
        );
        r.independent_after = Some(secs);
        server::stop(r);
    }
    if !r.phase().active() {
        return Ok(());
    }
    if let Err(e) = follow_streams(r, &dom) {
        tracing::warn!("{}: {e:#}", r.name);
    }
    if r.disks.iter().all(|d| d.local) {
        tracing::info!("{}: every disk is local: live restore done", r.name);
        server::stop(r);
        r.finished()?;
    }
    Ok(())
}

/// Each disk the server has restored into its file: the overlay's backing
/// moves from the server onto the file, and a stream from the file starts.
/// A disk whose backfill failed for good fails the restore; one whose
/// backing cannot be moved streams from the server instead, as before
/// there was a backfill.
fn follow_backfills(r: &mut LiveRestore, dom: &Domain) -> Result<()> {
    // No counters yet (a server just started) means no disk is done:
    // every disk waits for the next step, nothing is decided from them.
    let progress = r.stats().map(|s| s.backfill).unwrap_or_default();
    for i in 0..r.disks.len() {
        let d = &r.disks[i];
        let Some(base) = d.base.clone().filter(|_| d.needs_server()) else {
            continue;
        };
        let Some(p) = progress.iter().find(|p| p.disk == d.target) else {
            continue;
        };
        if let Some(e) = &p.error {
            r.fail(format!("the backfill of {} failed: {e}", d.target))?;
            return Ok(());
        }
        if !p.done {
            r.disks[i].done = p.bytes_done;
            continue;
        }
        let target = d.target.clone();
        match super::reconnect::move_onto_file(dom, &target, &base) {
            Ok(()) => {
                tracing::info!("{}: {target} reads from {} now", r.name, base.display());
                let d = &mut r.disks[i];
                d.on_base = true;
                d.done = d.size;
                // From a local file: no cap, nothing to leave to the guest.
                dom.block_pull(&target, 0)?;
                d.pulls = 1;
            }
            Err(e) => {
                tracing::warn!(
                    "{}: {target} cannot read from {}: streaming from the server: {e:#}",
                    r.name,
                    base.display()
                );
                r.disks[i].base = None;
                remove_base(&base);
                dom.block_pull(&target, r.stream_mib_per_sec)?;
                r.disks[i].pulls = 1;
            }
        }
    }
    Ok(())
}

/// The backfill's file, once nothing reads it (gone already is fine).
pub fn remove_base(base: &std::path::Path) {
    for p in [
        base.to_path_buf(),
        bulwark_store::read::restore::partial_name(base),
    ] {
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", p.display());
            }
        }
    }
}

fn follow_streams(r: &mut LiveRestore, dom: &Domain) -> Result<()> {
    for i in 0..r.disks.len() {
        // Done, or still backfilling (no stream yet).
        let d = &r.disks[i];
        if d.local || (d.needs_server() && d.base.is_some()) {
            continue;
        }
        let target = r.disks[i].target.clone();
        if let Some(p) = dom.block_job(&target)? {
            // A stream from the file moves local bytes: the disk counts
            // as restored once it is on the file.
            if !r.disks[i].on_base {
                r.disks[i].done = p.cur;
            }
            continue;
        }
        // No job: finished (the backing is gone) or stopped short.
        if !has_backing(dom, &target)? {
            super::reconnect::remove(dom, &target);
            if let Some(b) = &r.disks[i].base {
                remove_base(b);
            }
            r.disks[i].local = true;
            r.disks[i].done = r.disks[i].size;
            continue;
        }
        // libvirt may drop the backing a moment after the job ends.
        std::thread::sleep(Duration::from_millis(500));
        if dom.block_job(&target)?.is_some() || !has_backing(dom, &target)? {
            continue;
        }
        if r.disks[i].pulls >= MAX_PULLS {
            let cause = server::last_error(r).unwrap_or_else(|| "see the server log".into());
            r.fail(format!(
                "the stream of {target} stopped {} times; last failed read: {cause}",
                r.disks[i].pulls
            ))?;
            return Ok(());
        }
        tracing::warn!(
            "{}: the stream of {target} stopped short: starting it again",
            r.name
        );
        let cap = if r.disks[i].on_base {
            0
        } else {
            r.stream_mib_per_sec
        };
        dom.block_pull(&target, cap)?;
        r.disks[i].pulls += 1;
    }
    Ok(())
}

/// Whether the running domain's disk still reads through a backing.
fn has_backing(dom: &Domain, target: &str) -> Result<bool> {
    let xml = dom.xml(false)?;
    let doc = roxmltree::Document::parse(&xml)?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .find(|d| {
            d.children()
                .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target))
        })
        .and_then(|d| d.children().find(|c| c.has_tag_name("backingStore")))
        .is_some_and(|b| b.children().any(|c| c.has_tag_name("source"))))
}
