//! Starting a live restore, top to bottom: plan (the full restore's
//! refusals and names), serve the snapshot (and restore each disk into a
//! local file behind it: the backfill), make the overlays, define the
//! domain on them with the snapshot as their NBD backing, start it, record.
//! Anything made before a failure is removed. The supervisor moves each
//! overlay onto its file when the backfill has finished it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bulwark_nbd::cli::ServePlan;
use bulwark_store::{Backend, Id, Repository, Snapshot};

use super::record::{LiveDisk, LiveRestore, Records, RepoSpec};
use super::{reconnect, server};
use crate::drill::report::OwnReports;
use crate::libvirt::Libvirt;
use crate::vm::restore::{self, Options, Plan, Undo};
use crate::vm::rewrite::{self, ImageFormat};

/// How long QEMU's NBD client keeps a guest's reads waiting for a
/// restarted server before failing them. libvirt 9.0 (Debian 12) drops the
/// `<reconnect>` of an NBD backing source, so [`reconnect::install`] swaps
/// in a backing node of our own that has it.
pub const RECONNECT_SECS: u32 = 60;

pub struct LiveOptions<'a> {
    pub restore: Options,
    pub records: &'a Records,
    pub repo: RepoSpec,
    /// The passphrase, when no file holds it (foreground only).
    pub password: Option<String>,
    /// Stream bandwidth cap in MiB/s (0: none).
    pub stream_mib_per_sec: u64,
    /// How long reads wait out an unreachable repository.
    pub outage_wait_secs: u64,
    /// When the command (or request) began, in Unix milliseconds: the
    /// record's start, from which `independent_after` counts.
    pub began_ms: i64,
}

/// Checks before anything is made: what a full restore checks, plus no
/// live restore of that name.
pub fn plan(libvirt: &Libvirt, snap: Snapshot, name: &str, o: &LiveOptions<'_>) -> Result<Plan> {
    if o.records.exists(name) {
        bail!("a live restore named {name} exists already (see `bulwark restore status`)");
    }
    let mut opts = o.restore.clone();
    opts.format = ImageFormat::Qcow2;
    restore::plan(libvirt, snap, name, &opts)
}

/// A live restore's server started before its snapshot is read: it opens
/// the repository and finds the snapshot while the command does the same
/// (on S3 two chains of round trips side by side, not one after the other),
/// and learns the rest from [`start`]. Stopped if dropped unused.
pub struct Early {
    starting: Option<server::Starting>,
    files: [PathBuf; 3],
    /// The snapshot's own reports (its boot set), fetched while the key
    /// unlocks, when the words name it by full id.
    reports: Option<std::thread::JoinHandle<OwnReports>>,
}

/// Starts the server of the live restore `name` of `snapshot` (the words
/// the operator gave: an id, a prefix or `SOURCE@latest`), and, for a full
/// id, the fetch of its boot set from `backend`.
pub fn early(
    snapshot: &str,
    name: &str,
    o: &LiveOptions<'_>,
    backend: Option<Arc<dyn Backend>>,
) -> Result<Early> {
    // Its socket and counters are replaced: never those of a restore
    // that exists.
    if o.records.exists(name) {
        bail!("a live restore named {name} exists already (see `bulwark restore status`)");
    }
    if name.is_empty() || name.contains('/') {
        bail!("{name:?} is not a usable domain name");
    }
    std::fs::create_dir_all(o.records.dir())?;
    let (socket, log) = (o.records.socket(name), o.records.server_log(name));
    let stats = super::record::stats_path(&log);
    let starting = server::Launch {
        name,
        snapshot: snapshot.to_string(),
        socket: &socket,
        log: &log,
        repo: &o.repo,
        outage_wait_secs: o.outage_wait_secs,
        stream_mib_per_sec: o.stream_mib_per_sec,
        record_boot_set: true,
        plan: server::Planned::Later,
    }
    .spawn(o.password.as_deref())?;
    let reports = match (backend, snapshot.parse::<Id>()) {
        (Some(b), Ok(id)) => Some(std::thread::spawn(move || {
            OwnReports::fetch(b.as_ref(), &id)
        })),
        _ => None,
    };
    Ok(Early {
        starting: Some(starting),
        files: [socket, log, stats],
        reports,
    })
}

impl Drop for Early {
    fn drop(&mut self) {
        if let Some(s) = self.starting.take() {
            s.kill();
            // Made by the server that was not used; nothing depends on them.
            for f in &self.files {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// Starts the live restore `plan` on its server (`early`, or one started
/// now): overlays, NVRAM and domain are made while the server opens its
/// disks, and the boot set is looked up and handed to it meanwhile.
pub fn start(
    repo: &Arc<Repository>,
    libvirt: &Libvirt,
    plan: &Plan,
    o: &LiveOptions<'_>,
    early: Option<Early>,
) -> Result<LiveRestore> {
    let mut undo = Undo::new(libvirt);
    std::fs::create_dir_all(&o.restore.dir)
        .with_context(|| format!("creating {}", o.restore.dir.display()))?;
    let mut early = match early {
        Some(e) => e,
        None => self::early(&plan.snapshot.id.to_hex(), &plan.name, o, None)?,
    };
    let reports = early.reports.take();
    let mut starting = early.starting.take().context("the server was used")?;
    let mut rec = record(plan, o);
    rec.outage_wait_secs = o.outage_wait_secs;
    rec.started_ms = o.began_ms;
    rec.server_pid = Some(starting.pid());
    let served = ServerGuard(&mut rec);
    let pipe = starting.plan_pipe()?;
    let backfill = server::backfill_jobs(served.0);
    let socket = served.0.socket.clone();
    let dom = std::thread::scope(|s| -> Result<_> {
        let planner = s.spawn(|| -> Result<Option<PathBuf>> {
            // A fetch that panicked is made again: it is only a speed-up.
            let reports = reports.and_then(|h| h.join().ok());
            let boot_set = boot_set(repo, &plan.snapshot, reports, o.records.dir(), &plan.name);
            pipe.send(&ServePlan {
                snapshot: plan.snapshot.id.to_hex(),
                backfill,
                boot_set: boot_set.clone(),
            })?;
            Ok(boot_set)
        });
        for (d, target) in &plan.disks {
            undo.file(target.path.clone());
            undo.file(base_path(&target.path));
            overlay(&target.path, d.size, &d.name, &socket)?;
        }
        restore::restore_nvram(repo, plan, 0, &mut undo, &|_| {})?;
        let xml = restore::rewritten(plan, &o.restore)?.xml;
        let xml = rewrite::add_nbd_backing(&xml, &socket, RECONNECT_SECS)?;
        let dom = libvirt
            .define(&xml)
            .with_context(|| format!("defining {}", plan.name))?;
        undo.domain(plan.name.clone());
        tracing::debug!("{}: domain defined", plan.name);
        // Serving: the server has found the snapshot; reads wait until its
        // disks are open.
        starting.ready()?;
        tracing::debug!("{}: server serves", plan.name);
        dom.start()
            .with_context(|| format!("starting {}", plan.name))?;
        tracing::debug!("{}: domain started", plan.name);
        served.0.boot_set_file = planner
            .join()
            .map_err(|_| anyhow::anyhow!("the boot set lookup panicked"))??;
        Ok(dom)
    })?;
    let targets: Vec<String> = served.0.disks.iter().map(|d| d.target.clone()).collect();
    if let Err(e) = reconnect::install(&dom, &socket, &targets, RECONNECT_SECS) {
        tracing::warn!(
            "{}: guest reads will not wait out a restart of the server: {e:#}",
            plan.name
        );
    }
    // No stream yet: the backfill restores each disk at full speed and
    // the supervisor then streams from the local file.
    served.0.streams_started()?;
    o.records.save(served.0)?;
    undo.commit();
    std::mem::forget(served);
    Ok(rec)
}

/// The newest boot set a restore drill recorded of this VM, written for
/// the server as `NAME.bootset` (not `.json`: those are records). Without one the guest's reads and
/// read-ahead are all there is, as before: a missing or unreadable boot
/// set costs speed, never data, so errors here are logged, not raised.
fn boot_set(
    repo: &Repository,
    snap: &Snapshot,
    fetched: Option<OwnReports>,
    dir: &Path,
    name: &str,
) -> Option<PathBuf> {
    let found = match crate::drill::report::boot_set_for(repo, snap, fetched) {
        Ok(Some(b)) => b,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!("{name}: no boot set to fetch first: {e:#}");
            return None;
        }
    };
    let path = dir.join(format!("{name}.bootset"));
    let body = serde_json::to_vec(&found).map_err(std::io::Error::from);
    match body.and_then(|b| std::fs::write(&path, b)) {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::warn!("{name}: writing {}: {e}", path.display());
            None
        }
    }
}

fn record(plan: &Plan, o: &LiveOptions<'_>) -> LiveRestore {
    let disks = plan
        .disks
        .iter()
        .map(|(d, r)| LiveDisk {
            target: d.name.clone(),
            overlay: r.path.clone(),
            size: d.size,
            done: 0,
            local: false,
            pulls: 0,
            base: Some(base_path(&r.path)),
            on_base: false,
        })
        .collect();
    LiveRestore::new(
        plan.name.clone(),
        plan.snapshot.id,
        plan.snapshot.source.clone(),
        o.repo.clone(),
        o.records.socket(&plan.name),
        o.records.server_log(&plan.name),
        disks,
        o.stream_mib_per_sec,
    )
}

/// The backfill's file of the disk whose overlay is `overlay`.
pub fn base_path(overlay: &Path) -> PathBuf {
    overlay.with_extension("base.raw")
}

/// A qcow2 overlay of `size` bytes over the export `export` on `socket`
/// (`-u`: the server need not answer yet; libvirt gets the backing from
/// the domain XML).
pub(crate) fn overlay(path: &Path, size: u64, export: &str, socket: &Path) -> Result<()> {
    let backing = format!("nbd+unix:///{export}?socket={}", socket.display());
    crate::vm::qemu::run(
        Command::new("qemu-img")
            .args([
                "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", &backing,
            ])
            .arg(path)
            .arg(size.to_string()),
    )?;
    Ok(())
}

/// Stops the server if the start fails after it was started.
struct ServerGuard<'a>(&'a mut LiveRestore);

impl Drop for ServerGuard<'_> {
    fn drop(&mut self) {
        server::stop(self.0);
        // What the failed start wrote beside its record; gone or not,
        // nothing depends on it.
        let _ = std::fs::remove_file(&self.0.server_log);
        let _ = std::fs::remove_file(self.0.stats_path());
        if let Some(b) = &self.0.boot_set_file {
            let _ = std::fs::remove_file(b);
        }
    }
}
