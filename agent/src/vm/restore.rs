//! A VM snapshot restored as a new libvirt domain. The flow, top to bottom:
//! [`plan`] (names and paths, refusals before anything is written),
//! [`restore_disks`], [`define`] (the rewritten XML), and start. What a
//! failed or interrupted restore created is removed by [`Undo`]; nothing
//! that existed before is touched.
//!
//! Raw disks are written by the store's restore (sparse); qcow2 disks by
//! the same restore, in place into an image whose metadata `qemu-img`
//! preallocated (holes stay holes), so neither needs a temporary raw copy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bulwark_store::format::chunklist::ChunkList;
use bulwark_store::format::snapshot::DiskEntry;
use bulwark_store::read::reader::chunks_of;
use bulwark_store::read::restore::{restore_to_path, Overwrite, RestoreOptions};
use bulwark_store::{Repository, Snapshot};
use serde::Serialize;

use super::rewrite::{self, ImageFormat, RestoredDisk, Rewrite};
use crate::libvirt::Libvirt;

/// How far a new VM gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Only the disk images (`--disks-only`).
    Disks,
    /// Disks and a defined, stopped domain.
    Defined,
    /// Running.
    Started,
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Where the disk images go.
    pub dir: PathBuf,
    /// A libvirt storage pool to refresh once its directory holds them.
    pub pool: Option<String>,
    pub format: ImageFormat,
    pub keep_macs: bool,
    /// Keep Bulwark's policies in the new domain (it gets backed up).
    pub protect: bool,
    pub stage: Stage,
    /// Fetch/decrypt threads per disk; 0 = the backend's choice.
    pub threads: usize,
}

/// What one VM restore made.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub name: String,
    pub snapshot: bulwark_store::Id,
    pub disks: Vec<(String, PathBuf)>,
    pub nvram: Option<PathBuf>,
    pub defined: bool,
    pub started: bool,
    pub notes: Vec<String>,
    pub seconds: f64,
}

/// The plan of one VM restore: checked before anything is written.
pub struct Plan {
    pub snapshot: Snapshot,
    pub name: String,
    pub disks: Vec<(DiskEntry, RestoredDisk)>,
    /// The UEFI variables and where they go (`NAME_VARS.fd`).
    pub nvram: Option<(DiskEntry, PathBuf)>,
}

impl Plan {
    /// Bytes to restore (the disks' sizes), for progress and ETA.
    pub fn bytes(&self) -> u64 {
        self.disks.iter().map(|(d, _)| d.size).sum::<u64>()
            + self.nvram.as_ref().map_or(0, |(d, _)| d.size)
    }
}

/// Refuses what cannot work: not a VM snapshot, a name in use, an image
/// that exists.
pub fn plan(libvirt: &Libvirt, snapshot: Snapshot, name: &str, opts: &Options) -> Result<Plan> {
    if snapshot.domain_xml.is_none() {
        bail!(
            "snapshot {} of {} is an image backup, not a VM: use `bulwark restore image`",
            snapshot.id.short(),
            snapshot.source
        );
    }
    if name.is_empty() || name.contains('/') {
        bail!("{name:?} is not a usable domain name");
    }
    if opts.stage != Stage::Disks && libvirt.find_domain(name)?.is_some() {
        bail!("a domain named {name} exists already: pick another name with --as");
    }
    let ext = opts.format.as_str();
    let mut disks = Vec::new();
    for d in &snapshot.disks {
        let path = opts.dir.join(format!("{name}-{}.{ext}", d.name));
        if path.exists() {
            bail!("{} exists already: nothing was restored", path.display());
        }
        disks.push((
            d.clone(),
            RestoredDisk {
                target: d.name.clone(),
                path,
                format: opts.format,
            },
        ));
    }
    let nvram = match &snapshot.nvram {
        Some(d) => {
            let path = opts.dir.join(format!("{name}_VARS.fd"));
            if path.exists() {
                bail!("{} exists already: nothing was restored", path.display());
            }
            Some((d.clone(), path))
        }
        None => None,
    };
    Ok(Plan {
        snapshot,
        name: name.to_string(),
        disks,
        nvram,
    })
}

/// (snapshot, new name) pairs from `SNAPSHOT:NAME` specs, or from one
/// SNAPSHOT and `as_name`.
pub fn targets(specs: &[String], as_name: Option<&str>) -> Result<Vec<(String, String)>> {
    if let Some(name) = as_name {
        if specs.len() != 1 || specs[0].contains(':') {
            bail!("--as names one VM: give one SNAPSHOT, or SNAPSHOT:NAME pairs without --as");
        }
        return Ok(vec![(specs[0].clone(), name.to_string())]);
    }
    specs
        .iter()
        .map(|s| match s.rsplit_once(':') {
            Some((snap, name)) if !snap.is_empty() && !name.is_empty() => {
                Ok((snap.to_string(), name.to_string()))
            }
            _ => bail!("{s:?}: name the new VM, as SNAPSHOT:NAME (or --as NAME)"),
        })
        .collect()
}

/// Plans every VM of `targets` before any is made (a name given twice is
/// refused), with `plan` (a full or a live restore's). No index is loaded
/// here: a full restore narrows one to its snapshot's chunks
/// ([`restore_disks`]), and a live restore's server loads its own.
/// The repository is opened here, with the first target's snapshot
/// fetched while the key is unlocked ([`crate::secret::open_at`]).
pub fn plan_all(
    g: &crate::Global,
    targets: &[(String, String)],
    plan: impl Fn(Snapshot, &str) -> Result<Plan>,
) -> Result<(Arc<Repository>, Vec<Plan>)> {
    let first_spec = &targets.first().context("no snapshot to restore")?.0;
    let (repo, first) = crate::secret::open_at(g, first_spec)?;
    let mut first = Some(first);
    let mut plans = Vec::new();
    for (snap, name) in targets {
        if targets.iter().filter(|(_, n)| n == name).count() > 1 {
            bail!("{name} is named twice");
        }
        let found = match first.take() {
            Some(s) => s,
            None => repo.find_snapshot(snap)?,
        };
        plans.push(plan(found, name)?);
    }
    Ok((Arc::new(repo), plans))
}

/// Runs a plan: disks, domain, start. `progress` gets bytes done.
pub fn run(
    repo: &Arc<Repository>,
    libvirt: &Libvirt,
    plan: &Plan,
    opts: &Options,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Outcome> {
    let t = Instant::now();
    let mut undo = Undo::new(libvirt);
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    restore_disks(repo, plan, opts, &mut undo, progress)?;
    let mut notes = Vec::new();
    let defined = opts.stage != Stage::Disks;
    if defined {
        notes = define(libvirt, plan, opts, &mut undo)?;
    }
    if let Some(pool) = &opts.pool {
        // The pool lists the new volumes; a failure here loses nothing.
        if let Err(e) = libvirt.pool_refresh(pool) {
            notes.push(format!("pool {pool} not refreshed: {e:#}"));
        }
    }
    let started = opts.stage == Stage::Started;
    if started {
        libvirt
            .domain(&plan.name)
            .and_then(|d| d.start())
            .with_context(|| format!("starting {}", plan.name))?;
    }
    undo.commit();
    Ok(Outcome {
        name: plan.name.clone(),
        snapshot: plan.snapshot.id,
        disks: plan
            .disks
            .iter()
            .map(|(d, r)| (d.name.clone(), r.path.clone()))
            .collect(),
        nvram: plan.nvram.as_ref().map(|(_, p)| p.clone()),
        defined,
        started,
        notes,
        seconds: t.elapsed().as_secs_f64(),
    })
}

fn restore_disks(
    repo: &Arc<Repository>,
    plan: &Plan,
    opts: &Options,
    undo: &mut Undo<'_>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let threads = opts.threads;
    let lists = narrow_index(repo, plan)?;
    for ((d, target), list) in plan.disks.iter().zip(&lists) {
        undo.file(target.path.clone());
        let r: Result<()> = match target.format {
            ImageFormat::Raw => restore_to_path(
                repo,
                list,
                d.size,
                &target.path,
                Overwrite::Never,
                &RestoreOptions { threads },
                progress,
            )
            .map(|_| ())
            .map_err(Into::into),
            ImageFormat::Qcow2 => restore_qcow2(repo, d, list, &target.path, threads, progress),
        };
        r.with_context(|| {
            format!(
                "restoring {} of snapshot {}",
                d.name,
                plan.snapshot.id.short()
            )
        })?;
    }
    restore_nvram(repo, plan, threads, undo, progress)
}

/// Loads the chunk lists of the plan's disks (in its order) and one index
/// narrowed to their chunks and the NVRAM's: one pass over the index
/// objects for the whole VM, in memory that follows the snapshot, not the
/// repository. The disks' restores find their chunks in it.
fn narrow_index(repo: &Repository, plan: &Plan) -> Result<Vec<ChunkList>> {
    let load = |d: &DiskEntry| {
        repo.load_chunk_list(&d.chunk_list)
            .with_context(|| format!("loading the chunk list of {}", d.name))
    };
    let lists = plan
        .disks
        .iter()
        .map(|(d, _)| load(d))
        .collect::<Result<Vec<_>>>()?;
    let nvram = plan.nvram.as_ref().map(|(d, _)| load(d)).transpose()?;
    repo.index_for(lists.iter().chain(&nvram).flat_map(chunks_of))?;
    Ok(lists)
}

/// The UEFI variables, if the snapshot has them, as `NAME_VARS.fd`.
pub(crate) fn restore_nvram(
    repo: &Arc<Repository>,
    plan: &Plan,
    threads: usize,
    undo: &mut Undo<'_>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let Some((d, path)) = &plan.nvram else {
        return Ok(());
    };
    undo.file(path.clone());
    let list = repo.load_chunk_list(&d.chunk_list)?;
    restore_to_path(
        repo,
        &list,
        d.size,
        path,
        Overwrite::Never,
        &RestoreOptions { threads },
        progress,
    )
    .context("restoring the NVRAM")?;
    Ok(())
}

/// A qcow2 image written in place: `qemu-img create` preallocates its
/// metadata (every cluster mapped, the file still sparse), `qemu-img map`
/// says where each cluster's data lives in the file, and the store's
/// restore writes the chunks there directly, in parallel, with zero extents
/// left as holes. No copy through NBD and no second pass; the image
/// appears under its name only once complete and synced.
fn restore_qcow2(
    repo: &Arc<Repository>,
    d: &DiskEntry,
    list: &ChunkList,
    to: &Path,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let partial = partial_of(to);
    let r = (|| {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            &partial.to_string_lossy(),
            &d.size.to_string(),
        ])?;
        let layout = qcow2_layout(&partial, d.size)?;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .open(&partial)
            .with_context(|| format!("opening {}", partial.display()))?;
        bulwark_store::read::restore::restore_into(
            repo,
            list,
            &out,
            &layout,
            &RestoreOptions { threads },
            progress,
        )?;
        out.sync_all()
            .with_context(|| format!("fsync {}", partial.display()))?;
        std::fs::rename(&partial, to).with_context(|| format!("renaming to {}", to.display()))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    r
}

fn qemu_img(args: &[&str]) -> Result<String> {
    super::qemu::run(Command::new("qemu-img").args(args))
}

/// Where a metadata-preallocated qcow2 keeps each guest byte in its file.
/// Every range must be mapped: anything else is refused, never guessed.
fn qcow2_layout(image: &Path, size: u64) -> Result<bulwark_store::read::restore::Layout> {
    #[derive(serde::Deserialize)]
    struct Entry {
        start: u64,
        length: u64,
        data: bool,
        offset: Option<u64>,
    }
    let json = qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "qcow2",
        &image.to_string_lossy(),
    ])?;
    let entries: Vec<Entry> = serde_json::from_str(&json).context("parsing qemu-img map")?;
    let mut runs = Vec::with_capacity(entries.len());
    for e in entries {
        match (e.data, e.offset) {
            (true, Some(off)) => runs.push((e.start, e.length, off)),
            _ => bail!(
                "qemu-img left guest range {}+{} of {} unmapped: cannot write it in place",
                e.start,
                e.length,
                image.display()
            ),
        }
    }
    Ok(bulwark_store::read::restore::Layout::new(runs, size)?)
}

/// The snapshot's domain XML, rewritten for the new VM.
pub(crate) fn rewritten(plan: &Plan, opts: &Options) -> Result<rewrite::Rewritten> {
    let xml = plan.snapshot.domain_xml.as_deref().unwrap_or_default();
    let restored: Vec<RestoredDisk> = plan.disks.iter().map(|(_, r)| r.clone()).collect();
    rewrite::rewrite(
        xml,
        &Rewrite {
            name: &plan.name,
            disks: &restored,
            keep_macs: opts.keep_macs,
            keep_policies: opts.protect,
            dir: &opts.dir,
            nvram: plan.nvram.as_ref().map(|(_, p)| p.as_path()),
        },
    )
}

/// The snapshot's domain XML, rewritten, defined under the new name.
fn define(
    libvirt: &Libvirt,
    plan: &Plan,
    opts: &Options,
    undo: &mut Undo<'_>,
) -> Result<Vec<String>> {
    let out = rewritten(plan, opts)?;
    libvirt
        .define(&out.xml)
        .with_context(|| format!("defining {}", plan.name))?;
    undo.domain(plan.name.clone());
    Ok(out.notes)
}

/// Everything restores in this process have created and not committed,
/// so an interrupt ([`undo_on_interrupt`]) can remove it too.
static CREATED: std::sync::Mutex<Vec<Created>> = std::sync::Mutex::new(Vec::new());

#[derive(Clone, PartialEq)]
enum Created {
    File(PathBuf),
    Domain(String),
}

fn created() -> std::sync::MutexGuard<'static, Vec<Created>> {
    CREATED.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT or SIGTERM: remove what unfinished restores created (partial
/// images included), then exit 130.
pub fn undo_on_interrupt(libvirt: Libvirt) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing the interrupt handler")?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("interrupted: removing what this restore created");
            for c in created().drain(..).rev() {
                match c {
                    Created::Domain(name) => remove_domain(&libvirt, &name),
                    Created::File(f) => {
                        let _ = std::fs::remove_file(&f);
                        let _ = std::fs::remove_file(partial_of(&f));
                        let _ = std::fs::remove_file(hidden_partial_of(&f));
                    }
                }
            }
            std::process::exit(130);
        }
    });
    Ok(())
}

/// Destroys (if running) and undefines a domain this restore defined.
fn remove_domain(libvirt: &Libvirt, name: &str) {
    let r = libvirt.find_domain(name).and_then(|d| {
        let Some(d) = d else { return Ok(()) };
        if d.state()? == crate::libvirt::State::Active {
            d.destroy()?;
        }
        d.undefine()
    });
    if let Err(e) = r {
        tracing::warn!("could not remove domain {name}: {e}");
    }
}

/// `PATH.bulwark-partial`: where qemu-img writes a qcow2 image.
fn partial_of(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".bulwark-partial");
    PathBuf::from(s)
}

/// `DIR/.NAME.bulwark-partial`: where the store writes a raw image.
fn hidden_partial_of(p: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(p.file_name().unwrap_or_default());
    name.push(".bulwark-partial");
    p.with_file_name(name)
}

/// What a restore has created so far, removed unless committed.
pub(crate) struct Undo<'v> {
    libvirt: &'v Libvirt,
    files: Vec<PathBuf>,
    domain: Option<String>,
    done: bool,
}

impl<'v> Undo<'v> {
    pub(crate) fn new(libvirt: &'v Libvirt) -> Self {
        Undo {
            libvirt,
            files: Vec::new(),
            domain: None,
            done: false,
        }
    }

    pub(crate) fn file(&mut self, f: PathBuf) {
        created().push(Created::File(f.clone()));
        self.files.push(f);
    }

    pub(crate) fn domain(&mut self, name: String) {
        created().push(Created::Domain(name.clone()));
        self.domain = Some(name);
    }

    pub(crate) fn commit(&mut self) {
        self.done = true;
        self.forget();
    }

    /// Takes this restore's entries off the process-wide list.
    fn forget(&self) {
        let mine: Vec<Created> = self
            .files
            .iter()
            .cloned()
            .map(Created::File)
            .chain(self.domain.clone().map(Created::Domain))
            .collect();
        created().retain(|c| !mine.contains(c));
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.forget();
        if let Some(name) = &self.domain {
            // Ours: defined by this restore, maybe started.
            remove_domain(self.libvirt, name);
        }
        for f in &self.files {
            // Only files this restore created (plan refused existing ones).
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("could not remove {}: {e}", f.display()),
            }
        }
    }
}
