//! The data stream of a file backup: every regular file's bytes, one file
//! after another, each cut by the chunker on its own (so a file starts at a
//! chunk boundary and its chunks can be taken again alone).
//!
//! Files are read by a pool of reader threads, a job (a run of entries)
//! each, while the backup pipeline hashes and packs: small files cost
//! syscalls more than bytes, so several are read at once. Each job sends
//! its pieces in batches on a channel of its own; [`Stream`] takes the jobs
//! in entry order, so the stream is the same whatever thread read what.
//!
//! Change detection: a file whose (size, mtime, ctime, inode, device) equal
//! those of the same path in the previous snapshot's catalog is not read:
//! its extents of the previous data stream are taken again
//! ([`Piece::Reuse`], merged across files). A file read is checked before
//! and after (size, mtime, ctime, on the open file); one that changed
//! meanwhile is read again, and reported if it never holds still.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::Scope;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, SendTimeoutError, Sender};

use super::catalog::{Entry, Time};
use crate::backup::source::{allocation_map, BlockSource, DataExtent};
use crate::backup::walk::{Piece, Walk};
use crate::backup::Pieces;
use crate::error::{Error, Result};
use crate::format::chunker::Chunker;
use crate::format::chunklist::{ChunkList, Extent};
use crate::format::extent::Span;
use crate::format::index::DedupIndex;

/// Reads of a file that keeps changing before it is reported.
const ATTEMPTS: usize = 3;
/// A job ends after this many files or bytes (of its files' sizes).
const JOB_FILES: usize = 256;
const JOB_BYTES: u64 = 8 << 20;
/// A batch of pieces is sent when it holds this many data bytes or pieces.
const BATCH_BYTES: usize = 4 << 20;
const BATCH_PIECES: usize = 256;
/// Previous extents in one merged [`Piece::Reuse`] at most.
const REUSE_BATCH: usize = 1024;
/// How often a blocked sender looks whether the stream was dropped.
const STOP_POLL: Duration = Duration::from_millis(100);

/// The previous snapshot of the same source: its catalog and data stream.
pub struct Previous<'a> {
    pub by_path: HashMap<&'a [u8], &'a Entry>,
    pub data: &'a ChunkList,
}

/// What reading the data found, beside the pieces.
#[derive(Debug, Default)]
pub struct DataReport {
    pub bytes_read: u64,
    pub bytes_reused: u64,
    pub files_reused: u64,
    /// Entries (by position) that could not be read, and why.
    pub failed: Vec<(usize, String)>,
    /// Entries read while they changed (the last read is kept), and why.
    pub unsettled: Vec<(usize, String)>,
    /// The stream's length.
    pub size: u64,
}

pub struct DataReader<'a> {
    pub chunker: &'a Chunker,
    pub index: &'a DedupIndex,
    /// None: every file is read.
    pub previous: Option<Previous<'a>>,
}

/// The file's state that says whether it changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: Time,
    ctime: Time,
    ino: u64,
    dev: u64,
}

fn stamp(md: &std::fs::Metadata) -> Stamp {
    let [mtime, _, ctime] = Time::of(md);
    Stamp {
        size: md.size(),
        mtime,
        ctime,
        ino: md.ino(),
        dev: md.dev(),
    }
}

/// What became of one data entry; the stream holds `skipped` bytes of
/// abandoned reads of it, then its `len` bytes.
#[derive(Debug)]
struct FileDone {
    index: usize,
    skipped: u64,
    len: u64,
    state: State,
}

#[derive(Debug)]
enum State {
    Reused,
    Read(Stamp),
    /// Read while it changed: the last read is kept.
    Unsettled(Stamp, String),
    /// Left out.
    Failed(String),
}

/// What a job sends, in order: batches of pieces, then its files' fates.
enum Msg {
    Pieces(Vec<Piece>),
    Done(Vec<FileDone>),
}

/// Why a reader stopped early: the stream is gone.
struct Stopped;

/// Sends, looking now and then whether the stream was dropped (then its
/// job channels may never be read again).
fn send<T>(tx: &Sender<T>, mut msg: T, stop: &AtomicBool) -> Result<(), Stopped> {
    loop {
        match tx.send_timeout(msg, STOP_POLL) {
            Ok(()) => return Ok(()),
            Err(SendTimeoutError::Timeout(m)) if !stop.load(Ordering::Relaxed) => msg = m,
            Err(_) => return Err(Stopped),
        }
    }
}

/// Pieces of one job, sent a batch at a time; runs of reused extents
/// merge into one piece.
struct Batch<'s> {
    tx: &'s Sender<Msg>,
    stop: &'s AtomicBool,
    pieces: Vec<Piece>,
    bytes: usize,
}

impl Batch<'_> {
    fn push(&mut self, p: Piece) -> Result<(), Stopped> {
        match (p, self.pieces.last_mut()) {
            (Piece::Reuse(new), Some(Piece::Reuse(last))) if last.len() < REUSE_BATCH => {
                last.extend(new)
            }
            (p, _) => {
                if let Piece::Data(b) = &p {
                    self.bytes += b.len();
                }
                self.pieces.push(p);
            }
        }
        if self.bytes >= BATCH_BYTES || self.pieces.len() >= BATCH_PIECES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Stopped> {
        if !self.pieces.is_empty() {
            let pieces = std::mem::take(&mut self.pieces);
            send(self.tx, Msg::Pieces(pieces), self.stop)?;
            self.bytes = 0;
        }
        Ok(())
    }
}

/// The data stream as the pipeline takes it: the jobs' pieces in entry
/// order. Dropping it stops the readers.
pub struct Stream<'a> {
    jobs: Receiver<Receiver<Msg>>,
    job: Option<Receiver<Msg>>,
    batch: std::vec::IntoIter<Piece>,
    done: Vec<FileDone>,
    read: &'a AtomicU64,
    stop: Arc<AtomicBool>,
}

impl Iterator for Stream<'_> {
    type Item = Result<Piece>;

    fn next(&mut self) -> Option<Result<Piece>> {
        loop {
            if let Some(p) = self.batch.next() {
                return Some(Ok(p));
            }
            let job = match &self.job {
                Some(j) => j,
                // Closed: every job was taken (`report` checks that each
                // file was accounted for).
                None => self.job.insert(self.jobs.recv().ok()?),
            };
            match job.recv() {
                Ok(Msg::Pieces(v)) => self.batch = v.into_iter(),
                Ok(Msg::Done(d)) => {
                    self.done.extend(d);
                    self.job = None;
                }
                Err(_) => {
                    return Some(Err(Error::Invalid(
                        "a file reader stopped before the end of its files".into(),
                    )))
                }
            }
        }
    }
}

impl Pieces for Stream<'_> {
    fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What became of every data entry, in stream order.
pub struct Done(Vec<FileDone>);

impl Stream<'_> {
    /// What the readers did (dropping the stream).
    pub fn finish(mut self) -> Done {
        Done(std::mem::take(&mut self.done))
    }
}

/// Sets each data entry's offset (and its size and times as read) from
/// `done` and says what happened; an error if a file was never accounted
/// for. `bytes_read`: the readers' count.
pub fn report(entries: &mut [Entry], done: Done, bytes_read: u64) -> Result<DataReport> {
    let data = entries.iter().filter(|e| e.has_data()).count();
    if done.0.len() != data {
        return Err(Error::Invalid(format!(
            "the file readers accounted for {} of {data} files",
            done.0.len()
        )));
    }
    let mut rep = DataReport {
        bytes_read,
        ..Default::default()
    };
    for d in done.0 {
        let e = &mut entries[d.index];
        rep.size += d.skipped;
        let read = match d.state {
            State::Reused => {
                rep.bytes_reused += d.len;
                rep.files_reused += 1;
                None
            }
            State::Read(st) => Some(st),
            State::Unsettled(st, why) => {
                rep.unsettled.push((d.index, why));
                Some(st)
            }
            State::Failed(why) => {
                rep.failed.push((d.index, why));
                None
            }
        };
        e.offset = rep.size;
        if let Some(st) = read {
            e.size = d.len;
            (e.mtime, e.ctime, e.ino, e.dev) = (st.mtime, st.ctime, st.ino, st.dev);
        }
        rep.size += d.len;
    }
    Ok(rep)
}

impl<'a> DataReader<'a> {
    /// Starts `threads` readers (and a thread handing out jobs) over
    /// `entries` in scope `s`; `read` counts the bytes read.
    pub fn start<'scope>(
        &'scope self,
        s: &'scope Scope<'scope, '_>,
        entries: &'scope [Entry],
        threads: usize,
        read: &'scope AtomicU64,
    ) -> Stream<'scope> {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = threads.max(1);
        let (order_tx, order_rx) = bounded::<Receiver<Msg>>(threads * 2);
        let (job_tx, job_rx) = bounded::<(Range<usize>, Sender<Msg>)>(threads);
        for _ in 0..threads {
            let (job_rx, stop) = (job_rx.clone(), stop.clone());
            s.spawn(move || {
                for (range, tx) in job_rx {
                    let first = range.start;
                    if self.job(&entries[range], first, &tx, &stop, read).is_err() {
                        break;
                    }
                }
            });
        }
        let stop2 = stop.clone();
        s.spawn(move || {
            for range in jobs(entries) {
                let (tx, rx) = bounded(2);
                if send(&order_tx, rx, &stop2).is_err()
                    || send(&job_tx, (range, tx), &stop2).is_err()
                {
                    break;
                }
            }
        });
        Stream {
            jobs: order_rx,
            job: None,
            batch: Vec::new().into_iter(),
            done: Vec::new(),
            read,
            stop,
        }
    }

    /// Reads (or reuses) the data entries of one job, `first` being the
    /// position of `entries[0]`.
    fn job(
        &self,
        entries: &[Entry],
        first: usize,
        tx: &Sender<Msg>,
        stop: &AtomicBool,
        read: &AtomicU64,
    ) -> Result<(), Stopped> {
        let mut batch = Batch {
            tx,
            stop,
            pieces: Vec::new(),
            bytes: 0,
        };
        let mut done = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if !e.has_data() {
                continue;
            }
            let d = match self.reusable(e) {
                Some(extents) => {
                    if !extents.is_empty() {
                        batch.push(Piece::Reuse(extents))?;
                    }
                    FileDone {
                        index: first + i,
                        skipped: 0,
                        len: e.size,
                        state: State::Reused,
                    }
                }
                None => self.read(first + i, e, &mut batch, read)?,
            };
            done.push(d);
        }
        batch.flush()?;
        send(tx, Msg::Done(done), stop)
    }

    /// The previous snapshot's extents of `e`, if it is unchanged.
    fn reusable(&self, e: &Entry) -> Option<Vec<Extent>> {
        let prev = self.previous.as_ref()?;
        let p = prev.by_path.get(e.path.as_slice())?;
        if !p.has_data() || !p.same_inode_state(e) {
            return None;
        }
        slice(prev.data, p.offset, p.size, self.index)
    }

    /// Reads a file into the stream (up to [`ATTEMPTS`] times while it
    /// changes). The error: the stream is gone.
    fn read(
        &self,
        index: usize,
        e: &Entry,
        batch: &mut Batch<'_>,
        read: &AtomicU64,
    ) -> Result<FileDone, Stopped> {
        let path = super::abs_path(&e.path);
        let mut done = FileDone {
            index,
            skipped: 0,
            len: 0,
            state: State::Failed(String::new()),
        };
        for attempt in 1..=ATTEMPTS {
            done.skipped += done.len;
            done.len = 0;
            let mut src = match FileSource::open(&path, self.chunker) {
                Ok(s) => s,
                Err(why) => {
                    done.state = State::Failed(why);
                    return Ok(done);
                }
            };
            let size = src.before.size;
            let mut walk = Walk::new(&mut src, self.chunker, None, &[Span::new(0, size)]);
            let mut failed = None;
            for piece in &mut walk {
                match piece {
                    Ok(p) => {
                        done.len += piece_len(&p);
                        batch.push(p)?;
                    }
                    Err(err) => {
                        failed = Some(err.to_string());
                        break;
                    }
                }
            }
            read.fetch_add(walk.bytes_read(), Ordering::Relaxed);
            let before = src.before;
            if let Some(why) = failed {
                // A read that failed midway is no content to restore.
                done.state = State::Failed(why);
                if attempt == ATTEMPTS {
                    return Ok(done);
                }
                continue;
            }
            let settled = src
                .file
                .metadata()
                .is_ok_and(|a| stamp(&a) == before && done.len == size);
            if settled {
                done.state = State::Read(before);
                return Ok(done);
            }
            done.state = State::Unsettled(
                before,
                format!("changed while being read ({ATTEMPTS} reads; the last one is kept)"),
            );
        }
        Ok(done)
    }
}

/// The entries cut into jobs: runs of at most [`JOB_FILES`] data entries
/// or [`JOB_BYTES`].
fn jobs(entries: &[Entry]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= entries.len() {
            return None;
        }
        let (mut files, mut bytes, mut end) = (0, 0u64, start);
        while end < entries.len() && files < JOB_FILES && bytes < JOB_BYTES {
            let e = &entries[end];
            if e.has_data() {
                files += 1;
                bytes += e.size;
            }
            end += 1;
        }
        let r = start..end;
        start = end;
        Some(r)
    })
}

/// A regular file as the walk reads it, with its state when opened. Asks
/// the kernel for holes only where there can be any that matter: a file
/// shorter than a minimal chunk, or with blocks for every byte, is data
/// (a hole missed only makes a restore less sparse, never different).
struct FileSource {
    file: File,
    before: Stamp,
    blocks: u64,
    min_hole: u64,
}

impl FileSource {
    fn open(path: &Path, chunker: &Chunker) -> std::result::Result<Self, String> {
        let file = open(path).map_err(|err| format!("cannot open: {err}"))?;
        let md = match file.metadata() {
            Ok(md) if md.is_file() => md,
            Ok(_) => return Err("no longer a regular file".into()),
            Err(err) => return Err(format!("cannot stat: {err}")),
        };
        Ok(FileSource {
            before: stamp(&md),
            blocks: md.blocks(),
            min_hole: u64::from(chunker.params().min),
            file,
        })
    }
}

impl BlockSource for FileSource {
    fn size(&self) -> u64 {
        self.before.size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<DataExtent>> {
        let end = offset.saturating_add(len).min(self.before.size);
        let size = self.before.size;
        if size < self.min_hole || self.blocks.saturating_mul(512) >= size {
            return Ok(vec![DataExtent {
                offset,
                len: end.saturating_sub(offset),
                data: true,
            }]);
        }
        allocation_map(&self.file, offset, end)
            .map_err(|e| Error::io("finding the data extents of a file", e))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| Error::SourceRead { offset, source })
    }
}

fn piece_len(p: &Piece) -> u64 {
    match p {
        Piece::Data(b) => b.len() as u64,
        Piece::Zero(n) => *n,
        Piece::Reuse(v) => v.iter().map(|e| e.len).sum(),
    }
}

/// Opens without following a link that replaced the file since the scan,
/// and without touching its atime where the kernel lets us.
fn open(path: &Path) -> std::io::Result<File> {
    let o = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | flags)
            .open(path)
    };
    match o(libc::O_NOATIME) {
        // O_NOATIME needs ownership (or CAP_FOWNER).
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => o(0),
        r => r,
    }
}

/// The extents of `[offset, offset + len)` of `list`, cut at the ends (only
/// zero extents may be cut: a data extent across an end means the catalog
/// and list disagree, and the file is read instead). None also if a chunk
/// is not in the index.
fn slice(list: &ChunkList, offset: u64, len: u64, index: &DedupIndex) -> Option<Vec<Extent>> {
    let end = offset.checked_add(len)?;
    if end > list.size() {
        return None;
    }
    let mut out = Vec::new();
    if len == 0 {
        return Some(out);
    }
    let mut i = list.find(offset)?;
    while let Some(x) = list.extents().get(i) {
        if x.offset >= end {
            break;
        }
        let (s, t) = (x.offset.max(offset), x.end().min(end));
        match x.chunk {
            Some(id) if (s, t) == (x.offset, x.end()) && index.reusable(&id) => out.push(Extent {
                offset: s,
                len: t - s,
                chunk: Some(id),
            }),
            Some(_) => return None,
            None => out.push(Extent {
                offset: s,
                len: t - s,
                chunk: None,
            }),
        }
        i += 1;
    }
    Some(out)
}
