//! Seeing a live restore through: the server kept alive, each disk's
//! stream followed (and started again after it stopped short), the backing
//! gone at the end, then the server stopped. One step per second; the
//! record is updated under its lock each step, so `status` reads progress
//! and `cancel` can stop it from another process.
//!
//! The agent runs this on a thread per restore (and again for every
//! unfinished record after its own restart); `--wait` runs it in the
//! foreground.

use std::time::Duration;

use anyhow::Result;

use super::record::{LiveRestore, Records};
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
    if !server::alive(r) {
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

fn follow_streams(r: &mut LiveRestore, dom: &Domain) -> Result<()> {
    for i in 0..r.disks.len() {
        if r.disks[i].local {
            continue;
        }
        let target = r.disks[i].target.clone();
        if let Some(p) = dom.block_job(&target)? {
            r.disks[i].done = p.cur;
            continue;
        }
        // No job: finished (the backing is gone) or stopped short.
        if !has_backing(dom, &target)? {
            super::reconnect::remove(dom, &target);
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
        dom.block_pull(&target, r.stream_mib_per_sec)?;
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
