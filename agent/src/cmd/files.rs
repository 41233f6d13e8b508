//! `bulwark files ls|get|find`: single files from a snapshot, as an
//! ordinary user, without mounts or loop devices. The snapshot's disks are
//! read through their [`DiskReader`]s (the NBD export's and the FUSE
//! mount's reader, with its cache), so only the blocks a listing needs are
//! fetched; `fsread` finds partitions, LVM volumes and filesystems on them.
//!
//! The commands below the volume level work on [`fsread::Tree`] alone
//! (an entry with type, size, mode, owner, mtime; a tree to walk), so any
//! other source of files can plug in.

pub(crate) mod archive;
mod catalog_tree;
mod extract;
pub(crate) mod list;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bulwark_store::read::reader::{open_disk, DiskReader};
use clap::Subcommand;
use fsread::{Content, Node, Tree, Volume};

use crate::{secret, Global};

#[derive(Subcommand)]
pub enum FilesCmd {
    /// Without PATH: the disks, partitions, LVM volumes and filesystems.
    /// With PATH (`vda/p1/etc`, `vda/lvm/VG/LV/etc`, `vda/etc`): the
    /// entries of that directory.
    Ls(LsArgs),
    /// Copy files or trees out of a snapshot: into a directory, to stdout
    /// (one file), or into a tar or zip archive.
    Get(GetArgs),
    /// Entries whose name matches a glob (`*.conf`); a pattern with a `/`
    /// matches whole paths (`vda/p1/etc/*.conf`).
    Find(FindArgs),
}

/// What every `files` command takes.
#[derive(clap::Args)]
struct Common {
    /// Snapshot id, unique id prefix, or SOURCE@latest.
    snapshot: String,
    /// Memory for decrypted chunks, in MiB.
    #[arg(long, default_value_t = 256)]
    cache_mib: usize,
}

#[derive(clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    common: Common,
    path: Option<String>,
    /// Type, mode, owner, size and mtime of each entry.
    #[arg(short, long)]
    long: bool,
    /// Every entry below PATH.
    #[arg(short = 'R', long)]
    recursive: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("dest").required(true).args(["to", "stdout", "tar", "zip"])))]
pub struct GetArgs {
    #[command(flatten)]
    common: Common,
    /// Files or directories (`vda/p1/etc/hosts`, `vda/p1/etc`).
    #[arg(required = true)]
    paths: Vec<String>,
    /// Directory to write into (created if missing; nothing in it is
    /// overwritten).
    #[arg(long)]
    to: Option<PathBuf>,
    /// Write the one file named to standard output.
    #[arg(long)]
    stdout: bool,
    /// Write a tar archive (`-`: standard output).
    #[arg(long)]
    tar: Option<PathBuf>,
    /// Write a zip archive.
    #[arg(long)]
    zip: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct FindArgs {
    #[command(flatten)]
    common: Common,
    /// Glob: `*`, `?`, `[...]`.
    pattern: String,
    /// Search only below this path (default: every filesystem).
    #[arg(long = "in")]
    under: Option<String>,
    #[arg(short, long)]
    long: bool,
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Global, c: FilesCmd) -> Result<i32> {
    match c {
        FilesCmd::Ls(a) => {
            let s = Session::open(g, &a.common)?;
            let r = list::ls(&s, &a);
            s.report();
            r
        }
        FilesCmd::Get(a) => {
            let s = Session::open(g, &a.common)?;
            let r = get(&s, &a);
            s.report();
            r
        }
        FilesCmd::Find(a) => {
            let s = Session::open(g, &a.common)?;
            let r = list::find(&s, &a);
            s.report();
            r
        }
    }
}

fn get(s: &Session, a: &GetArgs) -> Result<i32> {
    let mut sources = Vec::new();
    for p in &a.paths {
        match s.resolve(p)? {
            Target::Node(t) => sources.push(t),
            Target::Volumes(_) => bail!("{p} is a disk or volume without a filesystem: name a partition or volume (bulwark files ls)"),
        }
    }
    if let Some(dir) = &a.to {
        return extract::to_dir(&sources, dir);
    }
    if a.stdout {
        let [one] = sources.as_slice() else {
            bail!("--stdout takes exactly one file");
        };
        return archive::to_stdout(one);
    }
    if let Some(f) = &a.tar {
        return archive::tar(&sources, f);
    }
    match &a.zip {
        Some(f) => archive::zip(&sources, f),
        None => bail!("name a destination: --to, --stdout, --tar or --zip"),
    }
}

/// A file snapshot as a tree of files (for `bulwark mount`).
pub fn file_tree(
    repo: Arc<bulwark_store::Repository>,
    snap: &bulwark_store::Snapshot,
    cache_mib: usize,
) -> Result<Arc<dyn Tree>> {
    Ok(catalog_tree::open(repo, snap, cache_mib)?.0)
}

/// An entry of a tree, with the path the user knows it by.
#[derive(Clone)]
pub(crate) struct Located {
    pub tree: Arc<dyn Tree>,
    pub node: Node,
    /// `vda/p1/etc/hosts`.
    pub path: String,
}

/// What a path names.
pub(crate) enum Target<'a> {
    /// Volumes (all of them, or those of one disk).
    Volumes(Vec<&'a Volume>),
    Node(Located),
}

/// An opened snapshot: its disks and what is on them.
pub(crate) struct Session {
    readers: Vec<Arc<DiskReader>>,
    volumes: Vec<Volume>,
    /// A file snapshot's tree (paths are its absolute paths, no volumes).
    files: Option<Arc<dyn Tree>>,
    started: Instant,
}

impl Session {
    fn open(g: &Global, c: &Common) -> Result<Self> {
        Session::open_in(Arc::new(secret::open(g)?), &c.snapshot, c.cache_mib)
    }

    /// Opens `snapshot` (id, prefix, SOURCE@latest) of an open repository
    /// with `cache_mib` MiB for decrypted chunks (the dashboard's files).
    pub(crate) fn open_in(
        repo: Arc<bulwark_store::Repository>,
        snapshot: &str,
        cache_mib: usize,
    ) -> Result<Self> {
        let started = Instant::now();
        let snap = repo.while_loading_index(|| repo.find_snapshot(snapshot))?;
        if snap.is_files() {
            let (tree, data) = catalog_tree::open(repo.clone(), &snap, cache_mib)?;
            return Ok(Session {
                readers: vec![data],
                volumes: Vec::new(),
                files: Some(tree),
                started,
            });
        }
        let cache = (cache_mib << 20) / snap.disks.len().max(1);
        let mut readers = Vec::new();
        let mut disks: Vec<(String, Arc<dyn fsread::ReadAt>)> = Vec::new();
        for d in &snap.disks {
            let r = Arc::new(
                open_disk(repo.clone(), &snap, &d.name, cache)
                    .with_context(|| format!("opening disk {}", d.name))?,
            );
            readers.push(r.clone());
            disks.push((d.name.clone(), Arc::new(SnapshotDisk(r))));
        }
        let volumes = fsread::discover(&disks);
        Ok(Session {
            readers,
            volumes,
            files: None,
            started,
        })
    }

    /// Time taken and bytes fetched (`-v`; scripts/bench-files.sh reads it).
    fn report(&self) {
        let (mut bytes, mut fetches) = (0, 0);
        for r in &self.readers {
            let st = r.stats();
            bytes += st.bytes_fetched;
            fetches += st.fetches;
        }
        tracing::info!(
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            bytes_fetched = bytes,
            fetches,
            "files: done"
        );
    }

    /// What `path` names: nothing (every volume), a disk holding volumes,
    /// or an entry of a filesystem.
    pub(crate) fn resolve(&self, path: &str) -> Result<Target<'_>> {
        let path = path.trim_matches('/');
        if let Some(tree) = &self.files {
            let node = fsread::lookup(tree.as_ref(), tree.root()?, path)
                .with_context(|| format!("/{path}"))?;
            return Ok(Target::Node(Located {
                tree: tree.clone(),
                node,
                path: if path.is_empty() {
                    String::new()
                } else {
                    format!("/{path}")
                },
            }));
        }
        if path.is_empty() {
            return Ok(Target::Volumes(self.volumes.iter().collect()));
        }
        let (vol, rest) = fsread::resolve(&self.volumes, path).with_context(|| {
            format!("{path}: no such disk or volume (bulwark files ls shows them)")
        })?;
        let container = matches!(vol.content, Content::Table(_) | Content::LvmPv(_));
        if container && rest.is_empty() {
            let under: Vec<&Volume> = self
                .volumes
                .iter()
                .filter(|v| v.path == vol.path || v.path.starts_with(&format!("{}/", vol.path)))
                .collect();
            return Ok(Target::Volumes(under));
        }
        if container {
            bail!("{path}: no such partition or volume (bulwark files ls shows them)");
        }
        let tree = vol
            .tree()
            .with_context(|| format!("{path}: cannot read {}", vol.path))?;
        let root = tree
            .root()
            .with_context(|| format!("reading {}", vol.path))?;
        let node = fsread::lookup(tree.as_ref(), root, &rest)
            .with_context(|| format!("{}: {path}", vol.path))?;
        Ok(Target::Node(Located {
            tree,
            node,
            path: path.to_string(),
        }))
    }

    /// Every filesystem as a located root; a damaged one as its error.
    fn roots(&self) -> Vec<Result<Located>> {
        if let Some(tree) = &self.files {
            return vec![tree.root().map_err(Into::into).map(|node| Located {
                tree: tree.clone(),
                node,
                path: String::new(),
            })];
        }
        self.volumes
            .iter()
            .filter(|v| matches!(v.content, Content::Fs(_) | Content::Damaged(_)))
            .map(|v| {
                let tree = v.tree()?;
                let node = tree.root()?;
                Ok(Located {
                    tree,
                    node,
                    path: v.path.clone(),
                })
            })
            .collect()
    }
}

/// A disk of the snapshot as `fsread` reads it.
struct SnapshotDisk(Arc<DiskReader>);

impl fsread::ReadAt for SnapshotDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf).map_err(std::io::Error::other)
    }

    fn size(&self) -> u64 {
        self.0.size()
    }
}
