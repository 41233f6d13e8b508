//! `bulwark backup vm`: one backup of one domain, running or stopped.
//!
//! Running: a libvirt pull-mode backup with a new checkpoint created
//! atomically at its start; each disk is read over NBD from libvirt's export
//! (`qemu:dirty-bitmap:backup-<disk>` for incrementals, `base:allocation`
//! always), then the job is ended with `domjobabort`.
//!
//! Stopped: a new persistent bitmap is added to every qcow2 image first
//! (`qemu-img bitmap --add --enable`), then each image is exported read-only
//! by `qemu-nbd -B PREV` and read the same way. Adding the new bitmap before
//! reading (and removing old ones only after the snapshot is stored) means a
//! crash between any two steps loses no change: the old bitmap still covers
//! everything since the previous snapshot.
//!
//! Whenever the base cannot be trusted (no previous checkpoint, its snapshot
//! is gone, a bitmap is missing, disabled or inconsistent after a crash) the
//! disk is read whole and the output says why; broken bitmaps are removed
//! and a fresh checkpoint starts a new chain. Raw disks have no persistent
//! bitmaps and are always read whole.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use store::{BackupOptions, BackupSession, Mode, Repository, Snapshot, SnapshotMeta};

use super::domain::{self, Disk, DomainInfo};
use super::nbdsrc::NbdSource;
use super::qemu::{self, QemuNbd};
use super::state::{Checkpoint, DomainState, StateDir};
use super::virsh::Virsh;
use super::CHECKPOINT_PREFIX;

/// The bitmap `bulwark-hook` adds at first start of a protected domain.
pub const HOOK_BITMAP: &str = "bw-hook";

/// Checkpoints kept per disk (the newest two).
pub const KEEP_CHECKPOINTS: usize = 2;

pub struct Options {
    pub domain: String,
    pub full: bool,
    pub policy: Option<String>,
    pub threads: usize,
    pub state: StateDir,
    pub virsh: Virsh,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    pub name: String,
    pub format: String,
    /// `full` or `incremental`.
    pub mode: &'static str,
    /// Why the disk was read whole (absent for incrementals).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub size: u64,
    /// Bytes the dirty bitmap marked (incrementals).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_extents: Option<usize>,
    pub bytes_read: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub snapshot: String,
    pub domain: String,
    pub running: bool,
    /// `full`, `incremental`, or `mixed` (some disks each way).
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvram: Option<PathBuf>,
}

/// What each disk gets: incremental from the base, or full with a reason.
struct Plan<'a> {
    disk: &'a Disk,
    full_reason: Option<String>,
}

fn is_running(state: &str) -> bool {
    matches!(state, "running" | "paused" | "in shutdown" | "pmsuspended")
}

fn new_checkpoint_name() -> String {
    format!(
        "{CHECKPOINT_PREFIX}{}-{:04x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S"),
        rand_u16()
    )
}

fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    // Only a name's suffix (the time is in it too): zeros are harmless,
    // and libvirt refuses a duplicate checkpoint name.
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u16::from_le_bytes(b)
}

/// A bitmap's state on a disk as QEMU or qemu-img reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BitmapState {
    Good,
    Missing,
    Disabled,
    Broken,
}

pub fn backup(repo: &Repository, opts: &Options) -> Result<Report> {
    let t0 = Instant::now();
    let virsh = &opts.virsh;
    let dom = opts.domain.as_str();
    let running = is_running(&virsh.domstate(dom)?);
    let info = domain::parse(&virsh.dumpxml(dom, false)?)?;
    let inactive_xml = virsh.dumpxml(dom, true)?;
    if !info.unsupported.is_empty() {
        bail!(
            "domain {dom} has disks Bulwark cannot read yet: {} (file and block disks only)",
            info.unsupported.join(", ")
        );
    }
    if info.disks.is_empty() {
        bail!("domain {dom} has no disk Bulwark can back up");
    }
    let _lock = opts.state.lock(&info.uuid)?;
    let mut st = opts.state.load(&info.uuid)?;
    st.domain = info.name.clone();
    let repo_id = repo.config().id.to_string();

    // Which previous checkpoint (and its snapshot) an incremental starts from.
    let (mut base, base_reason): (Option<(Checkpoint, Snapshot)>, Option<String>) =
        choose_base(repo, &st, &repo_id, opts.full);

    // Bitmap health of every qcow2 disk, for every checkpoint we keep.
    let query = if running {
        Some(virsh.qmp(dom, &serde_json::json!({"execute": "query-block"}))?)
    } else {
        None
    };
    let bitmap_state = |disk: &Disk, name: &str| -> Result<BitmapState> {
        match &query {
            Some(q) => Ok(live_bitmap_state(q, disk, name)),
            None => Ok(
                match qemu::bitmaps(&disk.path)?.iter().find(|b| b.name == name) {
                    None => BitmapState::Missing,
                    Some(b) if b.in_use => BitmapState::Broken,
                    Some(b) if !b.enabled => BitmapState::Disabled,
                    Some(_) => BitmapState::Good,
                },
            ),
        }
    };
    let mut broken: Option<String> = None;
    'outer: for cp in &st.checkpoints {
        for disk in info.disks.iter().filter(|d| cp.disks.contains(&d.target)) {
            if !disk.has_bitmaps() {
                continue;
            }
            if bitmap_state(disk, &cp.name)? == BitmapState::Broken {
                broken = Some(format!(
                    "bitmap {} on {} is inconsistent (the VM crashed or was destroyed since)",
                    cp.name, disk.target
                ));
                break 'outer;
            }
        }
    }
    if st.unclean_stop && broken.is_none() && base.is_some() {
        broken = Some("the VM stopped uncleanly since the last backup".into());
    }
    if let Some(why) = &broken {
        tracing::warn!("{dom}: {why}: removing its checkpoints, reading everything");
        drop_all_checkpoints(virsh, dom, &info, &mut st, running, &query);
        opts.state.save(&st)?;
        base = None;
    }
    let base_reason = broken.or(base_reason);

    let mut plans: Vec<Plan<'_>> = Vec::new();
    for disk in &info.disks {
        let full_reason = if !disk.has_bitmaps() {
            Some(format!(
                "{} disk: no persistent dirty bitmap, full read every time",
                disk.format
            ))
        } else if let Some((cp, snap)) = &base {
            if !cp.disks.contains(&disk.target) {
                Some(format!("{} is not in checkpoint {}", disk.target, cp.name))
            } else if !snap.disks.iter().any(|d| d.name == disk.target) {
                Some(format!(
                    "{} is not in snapshot {}",
                    disk.target,
                    snap.id.short()
                ))
            } else {
                match bitmap_state(disk, &cp.name)? {
                    BitmapState::Good => None,
                    BitmapState::Missing => {
                        Some(format!("bitmap {} missing on {}", cp.name, disk.target))
                    }
                    BitmapState::Disabled => {
                        Some(format!("bitmap {} on {} is disabled", cp.name, disk.target))
                    }
                    BitmapState::Broken => Some(format!(
                        "bitmap {} on {} is inconsistent",
                        cp.name, disk.target
                    )),
                }
            }
        } else {
            Some(
                base_reason
                    .clone()
                    .unwrap_or_else(|| "no previous checkpoint".into()),
            )
        };
        plans.push(Plan { disk, full_reason });
    }

    // libvirt may have lost the base checkpoint (undefine, restart, or it was
    // made while the VM was stopped): redefine it from our record.
    if running {
        if let Some((cp, _)) = &base {
            let known = virsh.checkpoint_names(dom)?;
            let inc: Vec<&str> = plans
                .iter()
                .filter(|p| p.full_reason.is_none())
                .map(|p| p.disk.target.as_str())
                .collect();
            if !known.contains(&cp.name) && !inc.is_empty() {
                if let Err(e) = redefine(virsh, opts.state.root(), dom, cp, &info, &inc) {
                    let why = format!("checkpoint {} could not be redefined: {e:#}", cp.name);
                    tracing::warn!("{dom}: {why}");
                    for p in plans.iter_mut().filter(|p| p.full_reason.is_none()) {
                        p.full_reason = Some(why.clone());
                    }
                }
            }
        }
    }

    let new_cp = new_checkpoint_name();
    let bitmap_disks: Vec<String> = info
        .disks
        .iter()
        .filter(|d| d.has_bitmaps())
        .map(|d| d.target.clone())
        .collect();
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
    let mut reports = Vec::new();
    let read = if running {
        read_running(
            repo,
            virsh,
            dom,
            &plans,
            base.as_ref(),
            &new_cp,
            &bitmap_disks,
            job_dir.path(),
            &mut session,
            &mut reports,
        )
    } else {
        read_stopped(
            repo,
            &plans,
            base.as_ref(),
            &new_cp,
            job_dir.path(),
            &mut session,
            &mut reports,
        )
    };
    let undo_checkpoint = |why: &str| {
        tracing::warn!("{dom}: backup failed ({why}); removing checkpoint {new_cp}");
        if running {
            let _ = virsh.checkpoint_delete(dom, &new_cp, false);
        } else {
            for d in info.disks.iter().filter(|d| d.has_bitmaps()) {
                let _ = qemu::bitmap_remove(&d.path, &new_cp);
            }
        }
    };
    if let Err(e) = read {
        if !bitmap_disks.is_empty() {
            undo_checkpoint(&format!("{e:#}"));
        }
        return Err(e);
    }
    // The UEFI variables go with the disks (a VM that never started has
    // none yet: libvirt makes them from the template at first start).
    let nvram = info.nvram.clone().filter(|p| p.exists());
    if let Some(p) = &nvram {
        let r = store::ImageFile::open(p)
            .and_then(|mut src| session.backup_nvram(&mut src))
            .with_context(|| format!("backing up the NVRAM {}", p.display()));
        if let Err(e) = r {
            if !bitmap_disks.is_empty() {
                undo_checkpoint(&format!("{e:#}"));
            }
            return Err(e);
        }
    }
    let parent = base
        .as_ref()
        .filter(|_| plans.iter().any(|p| p.full_reason.is_none()))
        .map(|(_, s)| s.id);
    let snap = match session.finish(SnapshotMeta {
        source: info.name.clone(),
        policy: opts.policy.clone(),
        parent,
        domain_xml: Some(inactive_xml),
        time: None,
    }) {
        Ok(s) => s,
        Err(e) => {
            if !bitmap_disks.is_empty() {
                undo_checkpoint(&format!("{e:#}"));
            }
            return Err(e).context("storing the snapshot");
        }
    };

    // Record the new checkpoint, then drop the ones past the newest two.
    if !bitmap_disks.is_empty() {
        st.checkpoints.push(Checkpoint {
            name: new_cp.clone(),
            snapshot: snap.id.to_string(),
            repo: repo_id,
            created: chrono::Utc::now().timestamp(),
            disks: bitmap_disks.clone(),
        });
    }
    st.unclean_stop = false;
    opts.state.save(&st)?;
    prune_checkpoints(virsh, dom, &info, &mut st, running);
    opts.state.save(&st)?;
    if !bitmap_disks.is_empty() {
        // The hook's start-up bitmap is not needed once a chain exists.
        for d in info.disks.iter().filter(|d| d.has_bitmaps()) {
            let has = match &query {
                Some(q) => live_bitmap_state(q, d, HOOK_BITMAP) != BitmapState::Missing,
                None => {
                    qemu::bitmaps(&d.path).is_ok_and(|b| b.iter().any(|b| b.name == HOOK_BITMAP))
                }
            };
            if has {
                remove_bitmap(virsh, dom, d, HOOK_BITMAP, running, &query);
            }
        }
    }

    let n_inc = reports.iter().filter(|r| r.mode == "incremental").count();
    let mode = match n_inc {
        0 => "full",
        n if n == reports.len() => "incremental",
        _ => "mixed",
    };
    let reason = plans.iter().find_map(|p| p.full_reason.clone());
    let s = &snap.stats;
    Ok(Report {
        snapshot: snap.id.to_string(),
        domain: info.name.clone(),
        running,
        mode,
        reason,
        checkpoint: (!bitmap_disks.is_empty()).then_some(new_cp),
        parent: parent.map(|p| p.to_string()),
        size: snap.size(),
        bytes_read: s.bytes_read,
        bytes_new: s.bytes_new,
        bytes_stored: s.bytes_stored,
        chunks_new: s.chunks_new,
        chunks_reused: s.chunks_reused,
        seconds: t0.elapsed().as_secs_f64(),
        disks: reports,
        nvram,
    })
}

fn choose_base(
    repo: &Repository,
    st: &DomainState,
    repo_id: &str,
    full: bool,
) -> (Option<(Checkpoint, Snapshot)>, Option<String>) {
    if full {
        return (None, Some("full backup requested".into()));
    }
    let Some(cp) = st.checkpoints.last() else {
        return (None, Some("no previous checkpoint (first backup)".into()));
    };
    if cp.repo != repo_id {
        return (
            None,
            Some(format!(
                "checkpoint {} belongs to another repository",
                cp.name
            )),
        );
    }
    match repo.find_snapshot(&cp.snapshot) {
        Ok(s) => (Some((cp.clone(), s)), None),
        Err(e) => (
            None,
            Some(format!(
                "snapshot {} of checkpoint {} is not usable: {e}",
                cp.snapshot, cp.name
            )),
        ),
    }
}

/// The bitmap named `name` on `disk` in a `query-block` reply.
fn live_bitmap_state(q: &serde_json::Value, disk: &Disk, name: &str) -> BitmapState {
    let Some(node) = live_node(q, disk) else {
        return BitmapState::Missing;
    };
    let lists = [
        node.pointer("/inserted/dirty-bitmaps"),
        node.get("dirty-bitmaps"),
    ];
    let Some(b) = lists
        .iter()
        .flatten()
        .filter_map(|l| l.as_array())
        .flatten()
        .find(|b| b.get("name").and_then(|n| n.as_str()) == Some(name))
    else {
        return BitmapState::Missing;
    };
    // QEMU sends `inconsistent` only when true; `recording` always, so a
    // missing one reads as disabled, which means a full read: safe.
    let flag = |k: &str| b.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    if flag("inconsistent") {
        BitmapState::Broken
    } else if !flag("recording") {
        BitmapState::Disabled
    } else {
        BitmapState::Good
    }
}

fn live_node<'q>(q: &'q serde_json::Value, disk: &Disk) -> Option<&'q serde_json::Value> {
    let path = disk.path.to_string_lossy();
    q.as_array()?.iter().find(|b| {
        b.pointer("/inserted/file").and_then(|f| f.as_str()) == Some(path.as_ref())
            || b.pointer("/inserted/image/filename")
                .and_then(|f| f.as_str())
                == Some(path.as_ref())
    })
}

fn redefine(
    virsh: &Virsh,
    state_root: &Path,
    dom: &str,
    cp: &Checkpoint,
    info: &DomainInfo,
    disks: &[&str],
) -> Result<()> {
    let mut xml = format!(
        "<domaincheckpoint><name>{}</name><creationTime>{}</creationTime><disks>",
        domain::xml_escape(&cp.name),
        cp.created
    );
    for d in &info.disks {
        if disks.contains(&d.target.as_str()) {
            xml.push_str(&format!(
                "<disk name='{}' checkpoint='bitmap' bitmap='{}'/>",
                domain::xml_escape(&d.target),
                domain::xml_escape(&cp.name)
            ));
        } else {
            xml.push_str(&format!(
                "<disk name='{}' checkpoint='no'/>",
                domain::xml_escape(&d.target)
            ));
        }
    }
    xml.push_str("</disks></domaincheckpoint>");
    let f = tempfile::Builder::new()
        .prefix("redefine-")
        .suffix(".xml")
        .tempfile_in(state_root)?;
    std::fs::write(f.path(), xml)?;
    tracing::info!("{dom}: redefining checkpoint {} in libvirt", cp.name);
    virsh.checkpoint_redefine(dom, f.path())
}

/// Ends the pull-mode job when dropped (also on errors and panics).
struct JobGuard<'a> {
    virsh: &'a Virsh,
    dom: &'a str,
    active: bool,
}

impl JobGuard<'_> {
    fn end(&mut self) -> Result<()> {
        if std::mem::take(&mut self.active) {
            self.virsh
                .domjobabort(self.dom)
                .context("ending the backup job")?;
        }
        Ok(())
    }
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

#[allow(clippy::too_many_arguments)]
fn read_running(
    repo: &Repository,
    virsh: &Virsh,
    dom: &str,
    plans: &[Plan<'_>],
    base: Option<&(Checkpoint, Snapshot)>,
    new_cp: &str,
    bitmap_disks: &[String],
    job_dir: &Path,
    session: &mut BackupSession<'_>,
    reports: &mut Vec<DiskReport>,
) -> Result<()> {
    let socket = job_dir.join("nbd.sock");
    let mut xml = format!(
        "<domainbackup mode='pull'><server transport='unix' socket='{}'/><disks>",
        domain::xml_escape(&socket.to_string_lossy())
    );
    for p in plans {
        let t = domain::xml_escape(&p.disk.target);
        let mode = match (&p.full_reason, base) {
            (None, Some((cp, _))) => format!(
                "backupmode='incremental' incremental='{}'",
                domain::xml_escape(&cp.name)
            ),
            _ => "backupmode='full'".into(),
        };
        xml.push_str(&format!(
            "<disk name='{t}' backup='yes' type='file' {mode}><scratch file='{}'/></disk>",
            domain::xml_escape(
                &job_dir
                    .join(format!("{}.scratch", p.disk.target))
                    .to_string_lossy()
            )
        ));
    }
    xml.push_str("</disks></domainbackup>");
    let bxml = job_dir.join("backup.xml");
    std::fs::write(&bxml, &xml)?;
    let cxml = if bitmap_disks.is_empty() {
        None
    } else {
        let mut c = format!(
            "<domaincheckpoint><name>{}</name><disks>",
            domain::xml_escape(new_cp)
        );
        for p in plans {
            let kind = if bitmap_disks.contains(&p.disk.target) {
                "bitmap"
            } else {
                "no"
            };
            c.push_str(&format!(
                "<disk name='{}' checkpoint='{kind}'/>",
                domain::xml_escape(&p.disk.target)
            ));
        }
        c.push_str("</disks></domaincheckpoint>");
        let p = job_dir.join("checkpoint.xml");
        std::fs::write(&p, c)?;
        Some(p)
    };
    virsh
        .backup_begin(dom, &bxml, cxml.as_deref())
        .context("starting the pull-mode backup")?;
    let mut job = JobGuard {
        virsh,
        dom,
        active: true,
    };
    for p in plans {
        let target = &p.disk.target;
        let ctx = format!("qemu:dirty-bitmap:backup-{target}");
        let inc = p.full_reason.is_none() && base.is_some();
        let src = NbdSource::connect(&socket, target, inc.then_some(ctx.as_str()))?;
        let r = read_disk(repo, src, p, base, inc.then_some(ctx.as_str()), session)?;
        if bitmap_disks.contains(target) {
            session.set_checkpoint(target, new_cp);
        }
        reports.push(r);
    }
    job.end()
}

fn read_stopped(
    repo: &Repository,
    plans: &[Plan<'_>],
    base: Option<&(Checkpoint, Snapshot)>,
    new_cp: &str,
    job_dir: &Path,
    session: &mut BackupSession<'_>,
    reports: &mut Vec<DiskReport>,
) -> Result<()> {
    // The new bitmap first: from here on it records every write, so whatever
    // happens next, nothing written after this backup's read goes unseen.
    let mut added: Vec<std::path::PathBuf> = Vec::new();
    for p in plans.iter().filter(|p| p.disk.has_bitmaps()) {
        if let Err(e) = qemu::bitmap_add(&p.disk.path, new_cp) {
            for d in &added {
                let _ = qemu::bitmap_remove(d, new_cp);
            }
            return Err(e).context(format!("adding bitmap {new_cp} to {}", p.disk.target));
        }
        added.push(p.disk.path.clone());
    }
    for p in plans {
        let target = &p.disk.target;
        let inc = p.full_reason.is_none() && base.is_some();
        let bitmap = base.filter(|_| inc).map(|(cp, _)| cp.name.as_str());
        let sock = job_dir.join(format!("{target}.sock"));
        let nbd = QemuNbd::start(&p.disk.path, &p.disk.format, bitmap, &sock, target)?;
        let ctx = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
        let src = NbdSource::connect(&nbd.socket, &nbd.export, ctx.as_deref())?;
        let r = read_disk(repo, src, p, base, ctx.as_deref(), session)?;
        drop(nbd);
        if p.disk.has_bitmaps() {
            session.set_checkpoint(target, new_cp);
        }
        reports.push(r);
    }
    Ok(())
}

fn read_disk(
    repo: &Repository,
    mut src: NbdSource,
    p: &Plan<'_>,
    base: Option<&(Checkpoint, Snapshot)>,
    dirty_ctx: Option<&str>,
    session: &mut BackupSession<'_>,
) -> Result<DiskReport> {
    let target = &p.disk.target;
    let (result, dirty_info) = match (dirty_ctx, base) {
        (Some(ctx), Some((_, snap))) => {
            let entry = snap
                .disks
                .iter()
                .find(|d| &d.name == target)
                .context("disk missing from the base snapshot")?;
            let parent = repo.load_chunk_list(&entry.chunk_list)?;
            let dirty = src.dirty(ctx)?;
            let bytes: u64 = dirty.iter().map(|d| d.1).sum();
            tracing::info!("{target}: {} dirty extents, {bytes} bytes", dirty.len());
            let r = session
                .backup_disk(
                    target,
                    &mut src,
                    Mode::Incremental {
                        parent: &parent,
                        dirty: &dirty,
                    },
                )
                .with_context(|| format!("backing up {target}"))?;
            (r, Some((bytes, dirty.len())))
        }
        _ => (
            session
                .backup_disk(target, &mut src, Mode::Full)
                .with_context(|| format!("backing up {target}"))?,
            None,
        ),
    };
    src.close();
    let inc = dirty_info.is_some() && !result.fell_back_to_full;
    Ok(DiskReport {
        name: target.clone(),
        format: p.disk.format.clone(),
        mode: if inc { "incremental" } else { "full" },
        reason: if inc {
            None
        } else if result.fell_back_to_full {
            Some("disk size changed".into())
        } else {
            p.full_reason.clone()
        },
        size: result.size,
        dirty_bytes: dirty_info.map(|d| d.0),
        dirty_extents: dirty_info.map(|d| d.1),
        bytes_read: result.stats.bytes_read,
        chunks_new: result.stats.chunks_new,
        chunks_reused: result.stats.chunks_reused,
    })
}

/// Removes one checkpoint everywhere: libvirt's record and the bitmaps.
fn remove_checkpoint(
    virsh: &Virsh,
    dom: &str,
    info: &DomainInfo,
    name: &str,
    running: bool,
    query: &Option<serde_json::Value>,
) {
    if running {
        if virsh.checkpoint_delete(dom, name, false).is_ok() {
            return;
        }
        let _ = virsh.checkpoint_delete(dom, name, true);
        // Inconsistent bitmaps: libvirt may refuse to merge them; drop them
        // directly in QEMU.
        for d in info.disks.iter().filter(|d| d.has_bitmaps()) {
            remove_bitmap(virsh, dom, d, name, running, query);
        }
    } else {
        for d in info.disks.iter().filter(|d| d.has_bitmaps()) {
            if let Ok(bms) = qemu::bitmaps(&d.path) {
                if bms.iter().any(|b| b.name == name) {
                    remove_bitmap(virsh, dom, d, name, running, query);
                }
            }
        }
        if virsh
            .checkpoint_names(dom)
            .is_ok_and(|n| n.iter().any(|n| n == name))
        {
            let _ = virsh.checkpoint_delete(dom, name, true);
        }
    }
}

/// Removes one bitmap from one disk: through QMP if the domain runs, with
/// qemu-img if not. Best effort (logged).
fn remove_bitmap(
    virsh: &Virsh,
    dom: &str,
    d: &Disk,
    name: &str,
    running: bool,
    query: &Option<serde_json::Value>,
) {
    let r = if running {
        let fresh;
        let q = match query {
            Some(q) => q,
            None => match virsh.qmp(dom, &serde_json::json!({"execute": "query-block"})) {
                Ok(q) => {
                    fresh = q;
                    &fresh
                }
                Err(e) => {
                    tracing::warn!("{dom}: query-block: {e:#}");
                    return;
                }
            },
        };
        match live_node(q, d)
            .and_then(|n| n.pointer("/inserted/node-name"))
            .and_then(|n| n.as_str())
        {
            Some(node) => virsh
                .qmp(
                    dom,
                    &serde_json::json!({"execute": "block-dirty-bitmap-remove",
                        "arguments": {"node": node, "name": name}}),
                )
                .map(|_| ()),
            None => Ok(()),
        }
    } else {
        qemu::bitmap_remove(&d.path, name)
    };
    if let Err(e) = r {
        tracing::warn!("{dom}: removing bitmap {name} from {}: {e:#}", d.target);
    }
}

fn drop_all_checkpoints(
    virsh: &Virsh,
    dom: &str,
    info: &DomainInfo,
    st: &mut DomainState,
    running: bool,
    query: &Option<serde_json::Value>,
) {
    let mut names: Vec<String> = st.checkpoints.drain(..).map(|c| c.name).collect();
    if let Ok(known) = virsh.checkpoint_names(dom) {
        for n in known {
            if n.starts_with(CHECKPOINT_PREFIX) && !names.contains(&n) {
                names.push(n);
            }
        }
    }
    // Newest first: libvirt merges a deleted checkpoint into its parent.
    for n in names.iter().rev() {
        remove_checkpoint(virsh, dom, info, n, running, query);
    }
}

fn prune_checkpoints(
    virsh: &Virsh,
    dom: &str,
    info: &DomainInfo,
    st: &mut DomainState,
    running: bool,
) {
    while st.checkpoints.len() > KEEP_CHECKPOINTS {
        let old = st.checkpoints.remove(0);
        tracing::info!("{dom}: removing old checkpoint {}", old.name);
        remove_checkpoint(virsh, dom, info, &old.name, running, &None);
    }
}
