//! File backups of hosts: a tree of files through the same pipeline as a
//! disk (chunker, dedup with everything else, compression, encryption,
//! packs), as a snapshot with two streams instead of disks:
//!
//! - `files`: every regular file's bytes one after another ([`data`]),
//!   holes kept as zero extents;
//! - `catalog`: every entry with its metadata and its place in `files`
//!   ([`catalog`]), for listing and search without reading file data.
//!
//! Both are chunk lists like a disk's, so GC marks, sync copies, verify
//! checks and prune removes a file snapshot as any other; the manifest's
//! [`FilesInfo`] says what kind it is. Steps: find the previous snapshot
//! of the source, [`scan`] the tree, read the data (reusing unchanged
//! files), store the catalog, write the manifest.

pub mod catalog;
mod data;
pub mod exclude;
pub mod restore;
mod scan;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use crate::backup::walk::Walk;
use crate::backup::{BackupOptions, BackupSession};
use crate::error::{Error, Result};
use crate::format::chunklist::ChunkList;
use crate::format::extent::Span;
use crate::format::snapshot::{FilesInfo, Snapshot, SnapshotMeta};
use crate::read::reader::chunks_of;
use crate::repo::Repository;
use crate::MemSource;
use catalog::{Catalog, Entry};
pub use exclude::Excludes;
pub use scan::CACHEDIR_TAG;

/// The stream of file bytes.
pub const DATA: &str = "files";
/// The stream of the catalog.
pub const CATALOG: &str = "catalog";
/// Errors kept in a manifest at most (the count is always whole).
const MAX_ERRORS_KEPT: usize = 1000;

#[derive(Clone, Debug, Default)]
pub struct FilesOptions {
    pub source: String,
    pub paths: Vec<PathBuf>,
    pub excludes: Excludes,
    /// Descend into other file systems mounted below a path.
    pub cross_mounts: bool,
    /// Read every file, even those unchanged since the previous snapshot.
    pub reread: bool,
    pub threads: usize,
    pub policy: Option<String>,
    pub time: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a file backup did.
#[derive(Clone, Debug)]
pub struct FilesBackup {
    pub snapshot: Snapshot,
    /// Regular files in the snapshot.
    pub files: u64,
    /// File bytes read.
    pub bytes_read: u64,
    /// File bytes taken from the previous snapshot unread.
    pub bytes_reused: u64,
    pub files_reused: u64,
    pub sockets_skipped: u64,
    /// (path, why): everything missing or possibly inconsistent.
    pub errors: Vec<(String, String)>,
}

/// `/` + a catalog path.
pub fn abs_path(rel: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut b = Vec::with_capacity(rel.len() + 1);
    b.push(b'/');
    b.extend_from_slice(rel);
    PathBuf::from(std::ffi::OsStr::from_bytes(&b))
}

/// Backs up `opts.paths` as a new snapshot of `opts.source`.
pub fn backup(repo: &Repository, opts: &FilesOptions) -> Result<FilesBackup> {
    backup_started(repo, opts, start(opts)?)
}

/// A tree scan under way: started before the repository is open, since a
/// passphrase's key derivation holds a core for a tenth of a second or
/// more and the scan needs nothing of the repository. If the backup never
/// takes it, the scan ends on its own and its result is dropped.
pub struct Started {
    roots: Vec<PathBuf>,
    scan: std::thread::JoinHandle<scan::Scanned>,
    at: std::time::Instant,
}

/// Starts scanning `opts.paths` (extended attributes are added later, from
/// the previous catalog where unchanged).
pub fn start(opts: &FilesOptions) -> Result<Started> {
    let roots = roots(&opts.paths)?;
    let (excludes, cross_mounts, threads) =
        (opts.excludes.clone(), opts.cross_mounts, threads(opts));
    let list = roots.clone();
    let scan = std::thread::Builder::new()
        .name("scan".into())
        .spawn(move || scan::Scan::new(&excludes, cross_mounts, threads).run(&list))
        .map_err(|e| Error::io("starting the tree scan", e))?;
    Ok(Started {
        roots,
        scan,
        at: std::time::Instant::now(),
    })
}

fn threads(opts: &FilesOptions) -> usize {
    match opts.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    }
}

/// [`backup`] with its scan already [`start`]ed.
pub fn backup_started(
    repo: &Repository,
    opts: &FilesOptions,
    started: Started,
) -> Result<FilesBackup> {
    let Started { roots, scan, at } = started;
    let step = |what: &str| tracing::debug!("{what} at {:.3} s", at.elapsed().as_secs_f64());
    let threads = threads(opts);
    // The previous catalog and the session (its index) load side by side
    // while the tree is scanned. Unchanged entries take the catalog's
    // xattrs and data unread (`--reread`: none).
    let (found, session) = crate::repo::side_by_side(
        "loading the previous catalog",
        || {
            let previous = previous_snapshot(repo, &opts.source)?;
            step("snapshots listed");
            let prev = previous
                .as_ref()
                .filter(|_| !opts.reread)
                .map(|p| load(repo, p))
                .transpose()?;
            Ok((previous, prev))
        },
        || {
            let session = BackupSession::new(
                repo,
                &BackupOptions {
                    threads: opts.threads,
                    ..Default::default()
                },
            );
            step("index loaded");
            session
        },
    );
    let mut session = session?;
    let (previous, prev) = found?;
    step("previous catalog loaded");
    let scanned = scan
        .join()
        .map_err(|_| Error::Invalid("the tree scan panicked".into()))?;
    let mut entries = scanned.entries;
    let mut errors = scanned.errors;
    // No previous catalog: an empty map, so every entry's xattrs are read.
    let by_path = prev
        .as_ref()
        .map(|p| p.catalog.by_path())
        .unwrap_or_default();
    scan::xattrs_of_changed(&mut entries, &by_path, threads, &mut errors);
    step(&format!("scanned {} entries", entries.len()));
    let reuse = prev.as_ref().map(|p| data::Previous {
        by_path,
        data: &p.data,
    });
    let report = read_data(repo, &mut session, &mut entries, reuse, threads)?;
    let entries = drop_failed(entries, &report, &mut errors);
    step("data read");
    let catalog = Catalog { entries };
    store_catalog(repo, &mut session, &catalog)?;
    step("catalog stored");
    let files = catalog.entries.iter().filter(|e| e.has_data()).count() as u64;
    let info = FilesInfo {
        paths: roots.iter().map(|r| r.display().to_string()).collect(),
        entries: catalog.entries.len() as u64,
        files,
        bytes: catalog
            .entries
            .iter()
            .filter(|e| e.has_data())
            .map(|e| e.size)
            .sum(),
        partial: !errors.is_empty(),
        errors: errors.iter().take(MAX_ERRORS_KEPT).cloned().collect(),
    };
    let snapshot = session.finish(SnapshotMeta {
        source: opts.source.clone(),
        time: opts.time,
        policy: opts.policy.clone(),
        parent: previous.map(|s| s.id),
        domain_xml: None,
        files: Some(info),
    })?;
    Ok(FilesBackup {
        snapshot,
        files,
        bytes_read: report.bytes_read,
        bytes_reused: report.bytes_reused,
        files_reused: report.files_reused,
        sockets_skipped: scanned.sockets,
        errors,
    })
}

/// Stores `catalog` and `data` (the stream its offsets point into) as a
/// file snapshot of `source`, as they are: imports, and tests of what a
/// restore makes of any catalog.
pub fn store_raw(
    repo: &Repository,
    source: &str,
    catalog: &Catalog,
    data: Vec<u8>,
) -> Result<Snapshot> {
    let mut session = BackupSession::new(repo, &BackupOptions::default())?;
    let size = data.len() as u64;
    let mut src = MemSource::new(data);
    let mut walk = Walk::new(&mut src, repo.chunker(), None, &[Span::new(0, size)]);
    session.run(DATA, Some(size), &mut walk)?;
    store_catalog(repo, &mut session, catalog)?;
    session.finish(SnapshotMeta {
        source: source.into(),
        files: Some(FilesInfo {
            entries: catalog.entries.len() as u64,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The paths to back up: absolute, resolved, and none inside another.
fn roots(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if paths.is_empty() {
        return Err(Error::Invalid("no path to back up".into()));
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for p in paths {
        let c = std::fs::canonicalize(p)
            .map_err(|e| Error::io(format!("resolving {}", p.display()), e))?;
        if c == Path::new("/") {
            return Err(Error::Invalid(
                "back up / as its file systems' mount points (e.g. / is `/` with --cross-mounts off: name the directories)".into(),
            ));
        }
        out.push(c);
    }
    out.sort();
    out.dedup();
    let mut kept: Vec<PathBuf> = Vec::new();
    for p in out {
        if !kept.iter().any(|k| p.starts_with(k)) {
            kept.push(p);
        }
    }
    Ok(kept)
}

/// The newest file snapshot of `source`, the parent of the next.
fn previous_snapshot(repo: &Repository, source: &str) -> Result<Option<Snapshot>> {
    Ok(repo
        .snapshots()?
        .into_iter()
        .rfind(|s| s.source == source && s.is_files()))
}

/// A file snapshot's catalog and data stream.
pub struct Loaded {
    pub catalog: Catalog,
    pub data: ChunkList,
}

fn stream<'s>(snap: &'s Snapshot, name: &str) -> Result<&'s crate::format::snapshot::DiskEntry> {
    if !snap.is_files() {
        return Err(Error::Invalid(format!(
            "snapshot {} is not a file snapshot",
            snap.id.short()
        )));
    }
    snap.disks.iter().find(|d| d.name == name).ok_or_else(|| {
        Error::corrupt(
            format!("snapshot {}", snap.id),
            format!("file snapshot without its {name} stream"),
        )
    })
}

/// Reads a file snapshot's catalog (and its data stream's chunk list).
/// The index is narrowed once to both streams' chunks, so a reader of the
/// data opened next finds its chunks in it without another pass.
pub fn load(repo: &Repository, snap: &Snapshot) -> Result<Loaded> {
    let list = repo.load_chunk_list(&stream(snap, CATALOG)?.chunk_list)?;
    let data = repo.load_chunk_list(&stream(snap, DATA)?.chunk_list)?;
    let index = repo.index_for(chunks_of(&list).chain(chunks_of(&data)))?;
    let mut bytes = Vec::with_capacity(list.size().min(1 << 30) as usize);
    for e in list.extents() {
        match e.chunk {
            Some(id) => bytes.extend_from_slice(&repo.read_chunk(&index, &id)?),
            None => bytes.resize(bytes.len() + e.len as usize, 0),
        }
    }
    let catalog = Catalog::decode(&bytes, &format!("catalog of snapshot {}", snap.id))?;
    Ok(Loaded { catalog, data })
}

/// Runs the data stream through the session: the files are read by a
/// pool of readers while the pipeline hashes and packs.
fn read_data(
    repo: &Repository,
    session: &mut BackupSession<'_>,
    entries: &mut [Entry],
    previous: Option<data::Previous<'_>>,
    threads: usize,
) -> Result<data::DataReport> {
    let index = session.index();
    let reader = data::DataReader {
        chunker: repo.chunker(),
        index: &index,
        previous,
    };
    let read = AtomicU64::new(0);
    let shared: &[Entry] = entries;
    let (ran, done) = std::thread::scope(|s| {
        let mut stream = reader.start(s, shared, threads, &read);
        let ran = session.run(DATA, None, &mut stream);
        // Dropping the stream stops the readers, if the pipeline failed.
        (ran, stream.finish())
    });
    ran?;
    let report = data::report(entries, done, read.into_inner())?;
    if stats_size_mismatch(session, report.size) {
        return Err(Error::Invalid(
            "the data stream's length differs from the files read".into(),
        ));
    }
    Ok(report)
}

fn stats_size_mismatch(session: &BackupSession<'_>, size: u64) -> bool {
    session.last_stream_size() != Some(size)
}

/// Leaves out what could not be read (and hard links to it), listing why.
fn drop_failed(
    entries: Vec<Entry>,
    report: &data::DataReport,
    errors: &mut Vec<(String, String)>,
) -> Vec<Entry> {
    let mut gone = vec![false; entries.len()];
    for (i, why) in &report.failed {
        gone[*i] = true;
        errors.push((
            abs_path(&entries[*i].path).display().to_string(),
            why.clone(),
        ));
    }
    for (i, why) in &report.unsettled {
        errors.push((
            abs_path(&entries[*i].path).display().to_string(),
            why.clone(),
        ));
    }
    let gone_paths: std::collections::HashSet<&[u8]> = entries
        .iter()
        .zip(&gone)
        .filter(|(_, g)| **g)
        .map(|(e, _)| e.path.as_slice())
        .collect();
    let mut out_gone = gone.clone();
    for (i, e) in entries.iter().enumerate() {
        if !e.link.is_empty() && gone_paths.contains(e.link.as_slice()) {
            out_gone[i] = true;
            errors.push((
                abs_path(&e.path).display().to_string(),
                "hard link to a file that could not be read".into(),
            ));
        }
    }
    entries
        .into_iter()
        .zip(out_gone)
        .filter(|(_, g)| !g)
        .map(|(e, _)| e)
        .collect()
}

/// Stores the catalog as the snapshot's `catalog` stream.
fn store_catalog(
    repo: &Repository,
    session: &mut BackupSession<'_>,
    catalog: &Catalog,
) -> Result<()> {
    let bytes = catalog.encode();
    let size = bytes.len() as u64;
    let mut src = MemSource::new(bytes);
    let mut walk = Walk::new(&mut src, repo.chunker(), None, &[Span::new(0, size)]);
    // The catalog's bytes are not file data: not counted as read.
    session.run(CATALOG, Some(size), &mut walk).map(|_| ())
}
