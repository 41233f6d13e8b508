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

use std::time::{Duration, Instant};

use anyhow::Result;

use super::record::{LiveDisk, LiveRestore, Records};
use super::server;
use crate::libvirt::blockjob::Activity;
use crate::libvirt::{Domain, Libvirt};

/// Streams started on one disk before the restore is declared failed.
const MAX_PULLS: u32 = 3;

/// When the streams from the local files start. Such a stream copies the
/// whole disk inside QEMU, and while a guest booted it slowed the boot by
/// about 15% (Debian under TCG: ready after 27.5 s against 23.9 s with the
/// stream held back); the file alone already makes the VM independent of
/// the repository, so nothing is at stake in waiting. The streams start
/// once every disk is on its file (no backfill left to compete with) and
/// the guest has been idle for [`QUIET`] (reads under
/// [`QUIET_BYTES_PER_SEC`] and its vCPUs busy less than [`QUIET_CPU`] of
/// the time: a booting guest under TCG computes for seconds without
/// reading), or [`HOLD_MAX`] after the hold began, whichever comes first.
struct StreamHold {
    began: Instant,
    /// The guest's counters when it was last seen busy.
    busy: Option<(Instant, Activity)>,
}

const QUIET: Duration = Duration::from_secs(5);
const QUIET_BYTES_PER_SEC: u64 = 1 << 20;
const QUIET_CPU: f64 = 0.5;
const HOLD_MAX: Duration = Duration::from_secs(120);

impl StreamHold {
    fn new() -> Self {
        StreamHold {
            began: Instant::now(),
            busy: None,
        }
    }

    /// Whether the streams may start, given the guest's counters (`None`:
    /// unknown, e.g. libvirt did not answer).
    fn over(&mut self, now: Instant, seen: Option<Activity>) -> bool {
        if now.duration_since(self.began) >= HOLD_MAX {
            return true;
        }
        let Some(seen) = seen else { return false };
        match self.busy {
            Some((at, was)) if now.duration_since(at) >= QUIET => {
                let secs = now.duration_since(at).as_secs_f64();
                let read = seen.read.saturating_sub(was.read) as f64 / secs;
                let cpu =
                    seen.cpu.saturating_sub(was.cpu).as_secs_f64() / (secs * f64::from(seen.vcpus));
                if read < QUIET_BYTES_PER_SEC as f64 && cpu < QUIET_CPU {
                    return true;
                }
                self.busy = Some((now, seen));
                false
            }
            Some(_) => false,
            None => {
                self.busy = Some((now, seen));
                false
            }
        }
    }
}

/// Supervises `name` until it is done, failed or cancelled; the final
/// record. `progress` sees the record after each step.
pub fn supervise(
    records: &Records,
    name: &str,
    uri: &str,
    password: Option<&str>,
    progress: &dyn Fn(&LiveRestore),
) -> Result<LiveRestore> {
    let mut hold = StreamHold::new();
    loop {
        let r = records.update(name, |r| step(r, uri, password, &mut hold))?;
        progress(&r);
        if !r.phase().active() {
            return Ok(r);
        }
        wait_for_counters(&r.stats_path(), STEP);
    }
}

/// The longest wait between two looks at a restore.
const STEP: Duration = Duration::from_secs(1);

/// Waits up to `most` for the server to rewrite its counters (it does once
/// a second, and at once when a backfill ends): a finished disk moves onto
/// its file within a few milliseconds instead of up to two seconds later
/// (a second's tick, a second's sleep), which is time the VM still hangs
/// on the bucket.
fn wait_for_counters(stats: &std::path::Path, most: Duration) {
    const POLL: Duration = Duration::from_millis(25);
    // No file (no server yet, or gone): nothing to see change, the whole
    // wait, as before. Only when to look again is decided here.
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let before = modified(stats);
    let until = std::time::Instant::now() + most;
    while std::time::Instant::now() < until {
        std::thread::sleep(POLL);
        if modified(stats) != before {
            return;
        }
    }
}

/// One look at the restore; errors reaching libvirt are retried next step.
fn step(
    r: &mut LiveRestore,
    uri: &str,
    password: Option<&str>,
    hold: &mut StreamHold,
) -> Result<()> {
    if !r.phase().active() {
        return Ok(());
    }
    if r.disks.iter().any(LiveDisk::needs_server) {
        keep_server_up(r, password)?;
        if !r.phase().active() {
            return Ok(());
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
        let secs = r.seconds_since_start();
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
    if let Err(e) = follow_streams(r, &dom, hold) {
        tracing::warn!("{}: {e:#}", r.name);
    }
    if r.disks.iter().all(|d| d.local) {
        tracing::info!("{}: every disk is local: live restore done", r.name);
        server::stop(r);
        r.finished()?;
    }
    Ok(())
}

/// A server that is not running is started again (QEMU's NBD client
/// reconnects to it) until none has served for the outage wait; then the
/// restore fails with the cause the server's log names (the VM and its
/// writes stay, `restore retry` resumes). Without that bound, a
/// repository out of reach while the server opens it had the supervisor
/// start servers that each gave up after the wait, without end.
fn keep_server_up(r: &mut LiveRestore, password: Option<&str>) -> Result<()> {
    if server::alive(r) {
        if r.server_down_since_ms
            .is_some_and(|t| counters_written_since(r, t))
        {
            r.server_served();
        }
        return Ok(());
    }
    if !r.server_down(chrono::Utc::now().timestamp_millis()) {
        let why = server::last_error(r).unwrap_or_else(|| "its log names no error".into());
        let restarts = match r.server_restarts {
            1 => "1 restart".to_string(),
            n => format!("{n} restarts"),
        };
        r.fail(format!(
            "no bulwark-nbd has served for over {} s (the outage wait; {restarts}): {why}",
            r.outage_wait_secs
        ))?;
        return Ok(());
    }
    let why = server::last_error(r).map_or_else(String::new, |e| format!(" (it logged: {e})"));
    tracing::warn!(
        "{}: bulwark-nbd is not running{why}: starting it again",
        r.name
    );
    // Not waiting for it to serve: the record is locked meanwhile, and a
    // server that cannot reach the repository takes its S3 tries to give
    // up (a `restore cancel` would wait for them). The next steps see it
    // serve, or die and count against the outage wait.
    match server::spawn(r, password) {
        Ok(starting) => {
            r.server_pid = Some(starting.pid());
            r.server_restarts += 1;
            // The outage explains streams that stopped: fresh budgets.
            for d in &mut r.disks {
                d.pulls = d.pulls.min(1);
            }
        }
        Err(e) => tracing::warn!("{}: {e:#}", r.name),
    }
    Ok(())
}

/// Whether a server wrote its counters at or after `ms` (Unix
/// milliseconds): it has opened its disks, so it serves.
fn counters_written_since(r: &LiveRestore, ms: i64) -> bool {
    let Ok(modified) = std::fs::metadata(r.stats_path()).and_then(|m| m.modified()) else {
        return false;
    };
    chrono::DateTime::<chrono::Utc>::from(modified).timestamp_millis() >= ms
}

/// Each disk the server has restored into its file: the overlay's backing
/// moves from the server onto the file (its stream from the file starts
/// when the [`StreamHold`] is over).
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

fn follow_streams(r: &mut LiveRestore, dom: &Domain, hold: &mut StreamHold) -> Result<()> {
    let held = |d: &LiveDisk| d.on_base && d.pulls == 0;
    // Not while another disk's backfill runs: it needs the cores more.
    let backfilling = |d: &LiveDisk| d.needs_server() && d.base.is_some();
    if r.disks.iter().any(held) && !r.disks.iter().any(backfilling) {
        let disks: Vec<&str> = r.disks.iter().map(|d| d.target.as_str()).collect();
        // Counters libvirt cannot give only keep the hold on (at most
        // HOLD_MAX): the disks are on their local files, no data waits.
        if hold.over(Instant::now(), dom.activity(&disks).ok()) {
            tracing::info!(
                "{}: streaming from the local files ({:.0}s after the hold began)",
                r.name,
                hold.began.elapsed().as_secs_f64()
            );
            for d in r.disks.iter_mut().filter(|d| held(d)) {
                // From a local file: no cap, nothing to leave to the guest.
                dom.block_pull(&d.target, 0)?;
                d.pulls = 1;
            }
        }
    }
    for i in 0..r.disks.len() {
        // Done, still backfilling (no stream yet), or held back.
        let d = &r.disks[i];
        if d.local || backfilling(d) || held(d) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_supervisor_looks_again_as_soon_as_the_counters_change() {
        let dir = tempfile::tempdir().unwrap();
        let stats = dir.path().join("r.stats");
        // Nothing changes: the whole wait.
        let t = Instant::now();
        wait_for_counters(&stats, Duration::from_millis(300));
        assert!(t.elapsed() >= Duration::from_millis(300));
        // The server writes them (as it does when a backfill ends): at once.
        let t = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                std::fs::write(&stats, b"{}").unwrap();
            });
            wait_for_counters(&stats, Duration::from_secs(10));
        });
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[test]
    fn streams_wait_for_an_idle_guest_or_for_the_longest_hold() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mib = 1u64 << 20;
        let seen = |read: u64, cpu_ms: u64| {
            Some(Activity {
                read,
                cpu: Duration::from_millis(cpu_ms),
                vcpus: 1,
            })
        };
        let fresh = || StreamHold {
            began: t0,
            busy: None,
        };
        // Booting: reading 10 MiB/s, then computing without reading; never
        // idle.
        let mut h = fresh();
        for s in 0..20 {
            assert!(!h.over(at(s), seen(s * 10 * mib, s * 900)), "{s}s");
        }
        for s in 20..40 {
            assert!(!h.over(at(s), seen(200 * mib, s * 900)), "{s}s");
        }
        // Then idle: over once a whole window was.
        let over = (40..60).find(|&s| h.over(at(s), seen(200 * mib + s, 36_000 + (s - 40) * 50)));
        assert!(
            matches!(over, Some(s) if (45..=50).contains(&s)),
            "{over:?}"
        );

        // Counters unknown: only the longest hold ends it.
        let mut h = fresh();
        assert!(!h.over(at(119), None));
        assert!(h.over(at(120), None));
        // A guest busy for good too.
        let mut h = fresh();
        assert!(!(0..120).any(|s| h.over(at(s), seen(s * 10 * mib, s * 1000))));
        assert!(h.over(at(120), seen(1200 * mib, 120_000)));
    }
}
