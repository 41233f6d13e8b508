//! Restore drills: a snapshot booted as a throw-away, isolated domain
//! through the live-restore machinery, and checked. Top to bottom: clean
//! up after crashed drills, make a lab, serve the snapshot (in this
//! process, every read traced), make overlays over it, start a transient
//! domain cut off from the host, run the checks, tear everything down,
//! report. Nothing is streamed to local disks; guest writes land in the
//! overlays in the lab and go with it.

pub mod checks;
mod isolate;
mod lab;
pub mod report;
mod screen;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bulwark_nbd::trace::ReadTrace;
use bulwark_nbd::StoreExport;
use bulwark_store::read::reader::DiskReader;
use bulwark_store::{Repository, Snapshot};

pub use checks::Spec;
pub use lab::clean_stale;
use lab::Lab;
pub use report::Report;

use crate::libvirt::Libvirt;
use crate::vm::restore::{self, Options, Plan, Stage, Undo};
use crate::vm::rewrite::{self, ImageFormat};

/// Memory for decrypted chunks of the drill's server (all disks).
const CACHE_BYTES: usize = 256 << 20;

/// Removes every drill lab whose process is gone, and this process's own
/// (its labs' `Drop` will not run when it exits on a signal): at agent
/// start and on SIGTERM/Ctrl-C. Opens libvirt only when a lab exists;
/// failures are logged (nothing else depends on them).
pub fn clean_up(state_dir: &std::path::Path, uri: &str) {
    let labs = state_dir.join("drills");
    if !std::fs::read_dir(&labs).is_ok_and(|mut d| d.next().is_some()) {
        return;
    }
    let r = Libvirt::open(uri)
        .map_err(anyhow::Error::from)
        .and_then(|lv| clean_stale(state_dir, &lv));
    match r {
        Ok(n) => tracing::info!("removed the leftovers of {n} drills"),
        Err(e) => tracing::warn!("cleaning up after drills: {e:#}"),
    }
}

/// Boots `snap` in a lab under `state_dir` and runs the checks of `spec`.
/// An error means the drill could not run at all (the snapshot is not a
/// VM, libvirt refused the domain, ...); a boot that fails its checks is
/// a report with `passed: false`.
pub fn run(
    repo: &Arc<Repository>,
    libvirt: &Libvirt,
    snap: Snapshot,
    spec: &Spec,
    state_dir: &std::path::Path,
) -> Result<Report> {
    let t0 = Instant::now();
    let started = chrono::Utc::now();
    if spec.is_empty() {
        bail!("a drill needs a check: --console REGEX, --guest-agent or --screenshot");
    }
    if let Err(e) = clean_stale(state_dir, libvirt) {
        tracing::warn!("cleaning up after earlier drills: {e:#}");
    }
    let lab = Lab::create(state_dir, &snap.source, libvirt)?;
    let plan = plan(libvirt, snap, &lab)?;
    let served = Served::start(repo, &plan.snapshot, &lab)?;
    let xml = prepare_disks(repo, libvirt, &plan, &lab)?;
    let (dom, consoles) = start_domain(libvirt, &plan, &lab, spec, &xml)?;
    let outcome = checks::run(libvirt, &dom, spec, &consoles, Instant::now());
    served.freeze_boot_set();
    let png = match &outcome.screenshot {
        Some(p) => Some(p.png()?),
        None => None,
    };
    drop(lab);
    let mut report = Report {
        snapshot: plan.snapshot.id.to_hex(),
        source: plan.snapshot.source.clone(),
        host: crate::daemon::hostname(),
        started: started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        passed: outcome.checks.iter().all(|c| c.passed),
        checks: outcome.checks,
        seconds: t0.elapsed().as_secs_f64(),
        bytes_fetched: served.bytes_fetched(),
        boot_set: served.boot_set(),
        failed_reads: served.failed_reads(),
        screenshot: None,
    };
    drop(served);
    report::save_local(state_dir, &mut report, png.as_deref())?;
    Ok(report)
}

/// The restore's plan of the snapshot as a domain named for the lab, its
/// overlays in the lab.
fn plan(libvirt: &Libvirt, snap: Snapshot, lab: &Lab) -> Result<Plan> {
    restore::plan(libvirt, snap, &lab.name, &options(lab))
}

fn options(lab: &Lab) -> Options {
    Options {
        dir: lab.dir.clone(),
        pool: None,
        format: ImageFormat::Qcow2,
        keep_macs: false,
        protect: false,
        stage: Stage::Started,
        threads: 0,
    }
}

/// Overlays over the served disks and the UEFI variables, all in the lab;
/// the restored domain's XML.
fn prepare_disks(
    repo: &Arc<Repository>,
    libvirt: &Libvirt,
    plan: &Plan,
    lab: &Lab,
) -> Result<String> {
    for (d, target) in &plan.disks {
        crate::live::start::overlay(&target.path, d.size, &d.name, &lab.socket())?;
    }
    // The lab goes as a whole: nothing to undo file by file.
    let mut undo = Undo::new(libvirt);
    restore::restore_nvram(repo, plan, 0, &mut undo, &|_| {})?;
    undo.commit();
    Ok(restore::rewritten(plan, &options(lab))?.xml)
}

/// Cuts the domain off from the host, backs its overlays with the served
/// snapshot, and starts it as a transient domain; it and the console
/// files its serial ports write.
fn start_domain(
    libvirt: &Libvirt,
    plan: &Plan,
    lab: &Lab,
    spec: &Spec,
    xml: &str,
) -> Result<(crate::libvirt::Domain, Vec<PathBuf>)> {
    let disks: Vec<String> = plan.disks.iter().map(|(d, _)| d.name.clone()).collect();
    let isolated = isolate::isolate(
        xml,
        &isolate::Isolation {
            dir: &lab.dir,
            disks: &disks,
            console: spec.console.is_some(),
            guest_agent: spec.guest_agent,
            screenshot: spec.screenshot,
        },
    )?;
    let xml = rewrite::add_nbd_backing(
        &isolated.xml,
        &lab.socket(),
        crate::live::start::RECONNECT_SECS,
    )?;
    let dom = libvirt
        .create_transient(&xml)
        .with_context(|| format!("starting the drill's domain {}", lab.name))?;
    Ok((dom, isolated.consoles))
}

/// The snapshot's disks served on the lab's socket by a server in this
/// process, each read traced (the boot set, and reads that failed).
struct Served {
    rt: tokio::runtime::Runtime,
    handle: Option<nbd_server::ServerHandle>,
    disks: Vec<(String, Arc<DiskReader>, Arc<ReadTrace>)>,
}

impl Served {
    fn start(repo: &Arc<Repository>, snap: &Snapshot, lab: &Lab) -> Result<Served> {
        let cache = CACHE_BYTES / snap.disks.len().max(1);
        let mut server = nbd_server::Server::new(nbd_server::ServerConfig::default());
        let mut disks = Vec::new();
        for d in &snap.disks {
            let reader = Arc::new(bulwark_store::read::reader::open_disk(
                repo.clone(),
                snap,
                &d.name,
                cache,
            )?);
            let trace = Arc::new(ReadTrace::new());
            server = server.add_export(
                &d.name,
                Arc::new(StoreExport::new(reader.clone()).traced(trace.clone())),
                Some(format!("drill of {} {}", snap.source, d.name)),
            );
            disks.push((d.name.clone(), reader, trace));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the drill's NBD server")?;
        let handle = {
            let _in_rt = rt.enter();
            server
                .bind_unix(lab.socket())
                .with_context(|| format!("listening on {}", lab.socket().display()))?
        };
        Ok(Served {
            rt,
            handle: Some(handle),
            disks,
        })
    }

    /// The checks are done: later reads are not part of the boot set.
    fn freeze_boot_set(&self) {
        for (_, _, t) in &self.disks {
            t.stop();
        }
    }

    fn bytes_fetched(&self) -> u64 {
        self.disks
            .iter()
            .map(|(_, r, _)| r.stats().bytes_fetched)
            .sum()
    }

    fn boot_set(&self) -> Vec<report::BootSet> {
        self.disks
            .iter()
            .map(|(name, r, t)| t.boot_set_in(name, r))
            .collect()
    }

    fn failed_reads(&self) -> Vec<report::FailedRead> {
        self.disks
            .iter()
            .flat_map(|(name, _, t)| {
                t.failed_reads().into_iter().map(|f| report::FailedRead {
                    disk: name.clone(),
                    offset: f.offset,
                    length: f.length,
                    error: f.error,
                })
            })
            .collect()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.shutdown());
        }
    }
}
