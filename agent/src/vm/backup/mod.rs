//! `bulwark backup vm`: one backup of one domain, running or stopped.
//!
//! The steps, each below in order: read the domain; open its checkpoint
//! chain ([`Chain`]) and choose the base; plan each disk (incremental or
//! full, and why); export and read the disks ([`running`]: a libvirt
//! pull-mode backup with the new checkpoint created atomically at its
//! start; [`stopped`]: the new bitmap added offline first, then `qemu-nbd`);
//! store the NVRAM and the snapshot; commit the checkpoint. The chain's
//! rules (add before read, remove only after the snapshot is stored, a
//! broken chain means a full read) live in [`Chain`], stated once.

mod read;
mod running;
mod stopped;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bulwark_store::{BackupOptions, BackupSession, Repository, Snapshot, SnapshotMeta};
use serde::{Deserialize, Serialize};

use super::chain::{Base, Chain, DiskPlan, NewCheckpoint};
use super::domain::{self, DomainInfo};
use super::state::StateDir;
use crate::libvirt::{Domain, Libvirt, State};

pub struct Options {
    pub domain: String,
    pub full: bool,
    pub policy: Option<String>,
    pub threads: usize,
    pub state: StateDir,
    pub libvirt: Libvirt,
}

/// How a backup read: every allocated block, or only what the dirty
/// bitmap marked; a VM's backup is `Mixed` when its disks differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    Full,
    Incremental,
    Mixed,
}

impl std::fmt::Display for ReadMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadMode::Full => "full",
            ReadMode::Incremental => "incremental",
            ReadMode::Mixed => "mixed",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskReport {
    pub name: String,
    pub format: String,
    /// `Full` or `Incremental`.
    pub mode: ReadMode,
    /// Why the disk was read whole (absent for incrementals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub size: u64,
    /// Bytes the dirty bitmap marked (incrementals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_extents: Option<usize>,
    pub bytes_read: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub snapshot: bulwark_store::Id,
    pub domain: String,
    pub running: bool,
    pub mode: ReadMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub size: u64,
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
    pub seconds: f64,
    pub disks: Vec<DiskReport>,
    /// The UEFI variable store backed up with the disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<PathBuf>,
}

/// What reading the disks needs, whichever way they are exported.
struct Job<'r, 's, 'p> {
    repo: &'r Repository,
    plans: &'p [DiskPlan<'p>],
    base: &'p Base,
    new: &'p NewCheckpoint,
    dir: &'p std::path::Path,
    session: &'s mut BackupSession<'r>,
    reports: Vec<DiskReport>,
}

pub fn backup(repo: &Repository, opts: &Options) -> Result<Report> {
    let t0 = Instant::now();
    let dom = opts.libvirt.domain(&opts.domain)?;
    let (info, inactive_xml, running) = read_domain(&dom)?;

    let mut chain = Chain::open(&dom, &info, &opts.state, running)?;
    let base = chain.base(repo, opts.full)?;
    let mut plans = chain.plan(&base)?;
    chain.ensure_libvirt_has_base(&base, &mut plans)?;
    let new = chain.next();

    let job_dir = tempfile::Builder::new()
        .prefix("job-")
        .tempdir_in(opts.state.run_dir()?)
        .context("creating job directory")?;
    let mut session = BackupSession::new(
        repo,
        &BackupOptions {
            threads: opts.threads,
            ..Default::default()
        },
    )?;
    let mut job = Job {
        repo,
        plans: &plans,
        base: &base,
        new: &new,
        dir: job_dir.path(),
        session: &mut session,
        reports: Vec::new(),
    };
    let read = if running {
        running::read(&dom, &chain, &mut job)
    } else {
        stopped::read(&chain, &mut job)
    };
    let reports = std::mem::take(&mut job.reports);
    let nvram = info.nvram.clone().filter(|p| p.exists());
    let stored = read
        .and_then(|()| store_nvram(&mut session, nvram.as_ref()))
        .and_then(|()| store_snapshot(session, &info, &plans, &base, inactive_xml, opts));
    let snap = match stored {
        Ok(s) => s,
        Err(e) => {
            chain.abandon(&new, &format!("{e:#}"));
            return Err(e);
        }
    };
    let checkpoint = (!new.disks.is_empty()).then(|| new.name.clone());
    chain.commit(new, &snap, repo)?;
    Ok(report(
        &info, running, &plans, &base, snap, checkpoint, reports, nvram, t0,
    ))
}

/// The live XML (its disks are what QEMU has open), the persistent XML
/// (what a restore defines), and whether QEMU runs.
fn read_domain(dom: &Domain) -> Result<(DomainInfo, String, bool)> {
    let running = dom.state()? == State::Active;
    let info = domain::parse(&dom.xml(false)?)?;
    let inactive_xml = dom.xml(true)?;
    if !info.unsupported.is_empty() {
        bail!(
            "domain {} has disks Bulwark cannot read yet: {} (file and block disks only)",
            dom.name(),
            info.unsupported.join(", ")
        );
    }
    if info.disks.is_empty() {
        bail!("domain {} has no disk Bulwark can back up", dom.name());
    }
    Ok((info, inactive_xml, running))
}

/// The UEFI variables go with the disks (a VM that never started has none
/// yet: libvirt makes them from the template at first start).
fn store_nvram(session: &mut BackupSession<'_>, nvram: Option<&PathBuf>) -> Result<()> {
    let Some(p) = nvram else { return Ok(()) };
    bulwark_store::ImageFile::open(p)
        .and_then(|mut src| session.backup_nvram(&mut src))
        .with_context(|| format!("backing up the NVRAM {}", p.display()))
}

fn store_snapshot(
    session: BackupSession<'_>,
    info: &DomainInfo,
    plans: &[DiskPlan<'_>],
    base: &Base,
    domain_xml: String,
    opts: &Options,
) -> Result<Snapshot> {
    session
        .finish(SnapshotMeta {
            source: info.name.clone(),
            policy: opts.policy.clone(),
            parent: parent(plans, base),
            domain_xml: Some(domain_xml),
            time: None,
            files: None,
        })
        .context("storing the snapshot")
}

/// The base snapshot, if any disk was read incrementally from it.
fn parent(plans: &[DiskPlan<'_>], base: &Base) -> Option<bulwark_store::Id> {
    base.from
        .as_ref()
        .filter(|_| plans.iter().any(|p| p.full_reason.is_none()))
        .map(|(_, s)| s.id)
}

#[allow(clippy::too_many_arguments)]
fn report(
    info: &DomainInfo,
    running: bool,
    plans: &[DiskPlan<'_>],
    base: &Base,
    snap: Snapshot,
    checkpoint: Option<String>,
    disks: Vec<DiskReport>,
    nvram: Option<PathBuf>,
    t0: Instant,
) -> Report {
    let n_inc = disks
        .iter()
        .filter(|r| r.mode == ReadMode::Incremental)
        .count();
    let mode = match n_inc {
        0 => ReadMode::Full,
        n if n == disks.len() => ReadMode::Incremental,
        _ => ReadMode::Mixed,
    };
    let s = &snap.stats;
    Report {
        snapshot: snap.id,
        domain: info.name.clone(),
        running,
        mode,
        reason: plans.iter().find_map(|p| p.full_reason.clone()),
        checkpoint,
        parent: parent(plans, base).map(|p| p.to_string()),
        size: snap.size(),
        bytes_read: s.bytes_read,
        bytes_new: s.bytes_new,
        bytes_stored: s.bytes_stored,
        chunks_new: s.chunks_new,
        chunks_reused: s.chunks_reused,
        seconds: t0.elapsed().as_secs_f64(),
        disks,
        nvram,
    }
}
