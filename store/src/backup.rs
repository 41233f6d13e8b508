//! The backup pipeline: read -> chunk -> (hash, dedup check) -> compress ->
//! encrypt -> pack -> upload -> index -> chunk lists -> manifest.
//!
//! Threads: the calling thread reads the source and finds cut points;
//! `threads` workers hash each chunk and, only if the repository does not
//! know it yet, compress and seal it; one collector puts results back in disk
//! order, fills packs and builds the chunk list; uploaders store packs. A
//! fixed number of tokens bounds the chunks in flight, so memory stays flat
//! whatever the disk size.
//!
//! Write order makes a crash harmless: packs, then the index objects naming
//! them, then chunk lists, then the manifest. A run killed at any point
//! leaves at most unreferenced packs (and hidden temp files locally); the
//! next run simply stores those chunks again.
//!
//! Against a concurrent GC (`docs/gc.md`): the session marker is stored
//! before the index is loaded and removed only after the manifest, and a
//! chunk is reused only from packs no GC has condemned.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::chunklist::{self, ChunkList, Extent};
use crate::crypto::SessionCipher;
use crate::error::{Error, Result};
use crate::extent::{DataExtent, Span};
use crate::id::{Id, IdSet};
use crate::index::{self, Index};
use crate::layout;
use crate::pack::{PackInfo, PackWriter};
use crate::repo::Repository;
use crate::snapshot::{self, BackupStats, DiskEntry, Snapshot, SnapshotMeta};
use crate::source::BlockSource;
use crate::{blob, object};

/// Pack infos written in one index object at most; a long backup killed
/// midway keeps the chunks of all but its last few GiB.
const INDEX_FLUSH_PACKS: usize = 64;
/// Source read granularity while looking for a cut point: small, so an
/// incremental reads little past the point where it resynchronises.
const READ_STEP: usize = 256 * 1024;

#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    /// Worker threads for hashing/compression/encryption; 0 = one per core.
    pub threads: usize,
    /// Concurrent pack uploads; 0 = the backend's choice
    /// (`Backend::upload_concurrency`).
    pub uploaders: usize,
}

/// What to read of a disk.
pub enum Mode<'a> {
    /// Everything the source says holds data.
    Full,
    /// Only what changed since `parent`: `dirty` lists the ranges that
    /// may differ from the parent's content; everything else
    /// is taken from the parent's chunk list unread.
    Incremental {
        parent: &'a ChunkList,
        dirty: &'a [Span],
    },
}

/// Result of backing up one disk.
#[derive(Clone, Debug)]
pub struct DiskResult {
    pub name: String,
    pub size: u64,
    pub stats: BackupStats,
    /// True if an incremental was asked for but a full read was done.
    pub fell_back_to_full: bool,
}

/// One backup run writing one snapshot (of one or more disks).
pub struct BackupSession<'r> {
    repo: &'r Repository,
    /// Removed when the session ends: after `finish` stored the manifest.
    _marker: crate::session::Session<'r>,
    index: Arc<Index>,
    cipher: Arc<SessionCipher>,
    threads: usize,
    packer: Packer,
    lists: Vec<(DiskEntry, ChunkList)>,
    /// Which of `lists` is the NVRAM (stored beside the disks).
    nvram: Option<usize>,
    stats: BackupStats,
    started: Instant,
}

struct Packer {
    current: Option<PackWriter>,
    pack_size: usize,
    /// Chunks stored by this session (added to a pack).
    pending: Arc<Mutex<IdSet>>,
    uploads: Option<Sender<(PackWriter, Arc<SessionCipher>)>>,
    results: Receiver<Result<PackInfo>>,
    uploaders: Vec<std::thread::JoinHandle<()>>,
    in_flight: usize,
    uploaded: Vec<PackInfo>,
}

impl<'r> BackupSession<'r> {
    pub fn new(repo: &'r Repository, opts: &BackupOptions) -> Result<Self> {
        let marker = crate::session::Session::begin(repo)?;
        // A fresh index with the condemned records as they are now, read
        // after the marker is visible.
        repo.invalidate_index();
        let index = repo.index()?;
        let cipher = Arc::new(repo.keys().session());
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            opts.threads
        };
        let (utx, urx) = bounded::<(PackWriter, Arc<SessionCipher>)>(1);
        let (rtx, rrx) = bounded(64);
        let uploaders = match opts.uploaders {
            0 => repo.backend().upload_concurrency(),
            n => n,
        };
        let uploaders = (0..uploaders.max(1))
            .map(|_| {
                let urx = urx.clone();
                let rtx = rtx.clone();
                let backend = repo.backend().clone();
                std::thread::spawn(move || {
                    for (w, cipher) in urx {
                        let (bytes, info) = w.finish(&cipher);
                        let r = backend
                            .put(&layout::pack(&info.id), &bytes)
                            .map(|_| info)
                            .map_err(Error::from);
                        if rtx.send(r).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        Ok(BackupSession {
            repo,
            _marker: marker,
            index,
            cipher,
            threads,
            packer: Packer {
                current: None,
                pack_size: repo.config().pack_size as usize,
                pending: Arc::new(Mutex::new(IdSet::default())),
                uploads: Some(utx),
                results: rrx,
                uploaders,
                in_flight: 0,
                uploaded: Vec::new(),
            },
            lists: Vec::new(),
            nvram: None,
            stats: BackupStats::default(),
            started: Instant::now(),
        })
    }

    /// Backs up one disk into this session.
    pub fn backup_disk(
        &mut self,
        name: &str,
        source: &mut dyn BlockSource,
        mode: Mode<'_>,
    ) -> Result<DiskResult> {
        let t0 = Instant::now();
        let size = source.size();
        let mut fell_back = false;
        let (parent, dirty) = match mode {
            Mode::Full => (None, vec![Span::new(0, size)]),
            Mode::Incremental { parent, dirty } if parent.size() == size => {
                (Some(parent), normalize(dirty, size))
            }
            Mode::Incremental { parent, .. } => {
                tracing::warn!(
                    "disk {name}: size changed ({} -> {size}), reading it whole",
                    parent.size()
                );
                fell_back = true;
                (None, vec![Span::new(0, size)])
            }
        };
        let ctx = Ctx {
            repo: self.repo,
            index: &self.index,
            cipher: &self.cipher,
            pending: self.packer.pending.clone(),
        };
        let (list, mut stats) = if self.threads <= 1 {
            let mut col = Collector::new(&mut self.packer);
            let bytes_read = read_disk(self.repo, source, parent, &dirty, &mut |piece| {
                col.take(ctx.process(piece), &ctx)
            })?;
            let (list, mut stats) = col.finish();
            stats.bytes_read = bytes_read;
            (list, stats)
        } else {
            run_parallel(&ctx, &mut self.packer, self.threads, source, parent, &dirty)?
        };
        stats.seconds = t0.elapsed().as_secs_f64();
        add_stats(&mut self.stats, &stats);
        let entry = DiskEntry {
            name: name.to_string(),
            size,
            chunk_list: Id::random(),
            data_bytes: list
                .extents()
                .iter()
                .filter(|e| e.chunk.is_some())
                .map(|e| e.len)
                .sum(),
            chunks: list.extents().iter().filter(|e| e.chunk.is_some()).count() as u64,
            checkpoint: None,
        };
        self.lists.push((entry, list));
        Ok(DiskResult {
            name: name.to_string(),
            size,
            stats,
            fell_back_to_full: fell_back,
        })
    }

    /// Backs up a VM's UEFI variable store (read whole), kept in the
    /// manifest beside the disks rather than as one of them.
    pub fn backup_nvram(&mut self, source: &mut dyn BlockSource) -> Result<()> {
        self.backup_disk("nvram", source, Mode::Full)?;
        self.nvram = Some(self.lists.len() - 1);
        Ok(())
    }

    /// Records the checkpoint the last backed-up disk ends at.
    pub fn set_checkpoint(&mut self, disk: &str, checkpoint: &str) {
        if let Some((e, _)) = self.lists.iter_mut().find(|(e, _)| e.name == disk) {
            e.checkpoint = Some(checkpoint.to_string());
        }
    }

    /// Stores remaining packs, the index, chunk lists and the manifest.
    pub fn finish(mut self, meta: SnapshotMeta) -> Result<Snapshot> {
        self.packer.flush_pack(&self.cipher)?;
        self.packer.close(self.repo, &self.cipher)?;
        let mut disks = Vec::new();
        let mut nvram = None;
        for (i, (entry, list)) in self.lists.iter().enumerate() {
            let sealed = object::seal(&self.cipher, chunklist::KIND, &list.encode());
            self.repo
                .put_sealed(&layout::chunk_list(&entry.chunk_list), &sealed)?;
            if self.nvram == Some(i) {
                nvram = Some(entry.clone());
            } else {
                disks.push(entry.clone());
            }
        }
        self.stats.seconds = self.started.elapsed().as_secs_f64();
        let snap = Snapshot {
            version: 1,
            id: Id::random(),
            source: meta.source,
            host: crate::hostname(),
            owner: crate::username(),
            time: meta.time.unwrap_or_else(chrono::Utc::now),
            policy: meta.policy,
            parent: meta.parent,
            domain_xml: meta.domain_xml,
            key_fingerprint: self.repo.keys().fingerprint().to_string(),
            disks,
            nvram,
            stats: self.stats.clone(),
        };
        let json = serde_json::to_vec(&snap).expect("serialize manifest");
        let sealed = object::seal(&self.cipher, snapshot::KIND, &json);
        self.repo.put_sealed(&layout::snapshot(&snap.id), &sealed)?;
        self.repo.invalidate_index();
        Ok(snap)
    }
}

fn add_stats(total: &mut BackupStats, s: &BackupStats) {
    total.bytes_read += s.bytes_read;
    total.bytes_new += s.bytes_new;
    total.bytes_stored += s.bytes_stored;
    total.chunks_new += s.chunks_new;
    total.chunks_reused += s.chunks_reused;
}

/// Sorted, merged, clipped dirty ranges.
fn normalize(dirty: &[Span], size: u64) -> Vec<Span> {
    let mut v: Vec<(u64, u64)> = dirty
        .iter()
        .filter(|d| d.len > 0 && d.offset < size)
        .map(|d| (d.offset, d.end().min(size)))
        .collect();
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| Span::new(s, e - s)).collect()
}

/// One step of the reader's output, in disk order.
enum Piece {
    Data { bytes: Vec<u8> },
    Zero { len: u64 },
    Reuse(Vec<Extent>),
}

enum Done {
    Zero(u64),
    Known { len: u64, id: Id },
    New { len: u64, id: Id, sealed: Vec<u8> },
    Reuse(Vec<Extent>),
}

struct Ctx<'a> {
    repo: &'a Repository,
    index: &'a Index,
    cipher: &'a Arc<SessionCipher>,
    pending: Arc<Mutex<IdSet>>,
}

impl Ctx<'_> {
    /// Hash; compress and seal only if the chunk is new.
    fn process(&self, piece: Piece) -> Done {
        match piece {
            Piece::Zero { len } => Done::Zero(len),
            Piece::Reuse(v) => Done::Reuse(v),
            Piece::Data { bytes } => {
                let len = bytes.len() as u64;
                if is_zero(&bytes) {
                    return Done::Zero(len);
                }
                let id = self.repo.keys().chunk_id(&bytes);
                let known = self.index.reusable(&id)
                    || self
                        .pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&id);
                if known {
                    Done::Known { len, id }
                } else {
                    let sealed = blob::seal_chunk(
                        self.cipher,
                        &id,
                        &bytes,
                        self.repo.config().compression_level,
                    );
                    Done::New { len, id, sealed }
                }
            }
        }
    }
}

fn is_zero(b: &[u8]) -> bool {
    // SAFETY: any bytes are a valid u128; align_to handles the edges.
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// Builds a disk's chunk list from results in disk order and feeds packs.
struct Collector<'p> {
    packer: &'p mut Packer,
    list: ChunkList,
    stats: BackupStats,
}

impl<'p> Collector<'p> {
    fn new(packer: &'p mut Packer) -> Self {
        Collector {
            packer,
            list: ChunkList::new(),
            stats: BackupStats::default(),
        }
    }

    fn take(&mut self, done: Done, ctx: &Ctx<'_>) -> Result<()> {
        match done {
            Done::Zero(len) => self.list.push(len, None),
            Done::Reuse(v) => {
                for e in v {
                    if e.chunk.is_some() {
                        self.stats.chunks_reused += 1;
                    }
                    self.list.push(e.len, e.chunk);
                }
            }
            Done::Known { len, id } => {
                self.stats.chunks_reused += 1;
                self.list.push(len, Some(id));
            }
            Done::New { len, id, sealed } => {
                // Two workers may have sealed the same new chunk at once:
                // the first one to arrive here is stored, the other dropped.
                let fresh = ctx
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id);
                if fresh {
                    self.stats.chunks_new += 1;
                    self.stats.bytes_new += len;
                    self.stats.bytes_stored += sealed.len() as u64;
                    self.packer.add(id, &sealed, ctx.cipher, ctx.repo)?;
                } else {
                    self.stats.chunks_reused += 1;
                }
                self.list.push(len, Some(id));
            }
        }
        Ok(())
    }

    fn finish(self) -> (ChunkList, BackupStats) {
        (self.list, self.stats)
    }
}

impl Packer {
    fn add(
        &mut self,
        id: Id,
        sealed: &[u8],
        cipher: &Arc<SessionCipher>,
        repo: &Repository,
    ) -> Result<()> {
        let w = self
            .current
            .get_or_insert_with(|| PackWriter::new(cipher, self.pack_size));
        w.add(id, sealed);
        if w.len() >= self.pack_size {
            self.flush_pack(cipher)?;
        }
        self.poll(repo, cipher, false)
    }

    fn flush_pack(&mut self, cipher: &Arc<SessionCipher>) -> Result<()> {
        if let Some(w) = self.current.take() {
            if w.is_empty() {
                return Ok(());
            }
            // Sealing the trailer and writing happen on an uploader thread.
            let tx = self.uploads.as_ref().expect("packer open");
            self.in_flight += 1;
            if tx.send((w, cipher.clone())).is_err() {
                return Err(self.upload_failure());
            }
        }
        Ok(())
    }

    fn upload_failure(&mut self) -> Error {
        while let Ok(r) = self.results.try_recv() {
            if let Err(e) = r {
                return e;
            }
        }
        Error::Invalid("pack uploader stopped".into())
    }

    /// Collects finished uploads; writes an index object when enough packs
    /// are stored (or all of them, when `all`).
    fn poll(&mut self, repo: &Repository, cipher: &SessionCipher, all: bool) -> Result<()> {
        loop {
            let r = if all && self.in_flight > 0 {
                self.results.recv().map_err(|_| self.upload_failure())?
            } else {
                match self.results.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            };
            self.in_flight -= 1;
            self.uploaded.push(r?);
        }
        if self.uploaded.len() >= INDEX_FLUSH_PACKS || (all && !self.uploaded.is_empty()) {
            let payload = index::encode(&self.uploaded);
            let sealed = object::seal(cipher, index::KIND, &payload);
            repo.put_sealed(&layout::index(&Id::random()), &sealed)?;
            self.uploaded.clear();
        }
        Ok(())
    }

    /// Waits for every upload and indexes them; stops the uploaders.
    fn close(&mut self, repo: &Repository, cipher: &SessionCipher) -> Result<()> {
        let r = self.poll(repo, cipher, true);
        self.uploads = None;
        for h in self.uploaders.drain(..) {
            let _ = h.join();
        }
        r
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        self.uploads = None;
        for h in self.uploaders.drain(..) {
            let _ = h.join();
        }
    }
}

/// Reader + workers + collector on scoped threads.
fn run_parallel(
    ctx: &Ctx<'_>,
    packer: &mut Packer,
    threads: usize,
    source: &mut dyn BlockSource,
    parent: Option<&ChunkList>,
    dirty: &[Span],
) -> Result<(ChunkList, BackupStats)> {
    let in_flight = threads * 4 + 4;
    let (tokens_tx, tokens_rx) = bounded::<()>(in_flight);
    for _ in 0..in_flight {
        let _ = tokens_tx.send(());
    }
    let (work_tx, work_rx) = bounded::<(u64, Piece)>(threads * 2);
    let (done_tx, done_rx) = bounded::<(u64, Done)>(in_flight);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
    };
    let result = std::thread::scope(|s| {
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            s.spawn(move || {
                for (seq, piece) in work_rx {
                    if done_tx.send((seq, ctx.process(piece))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        drop(work_rx);
        let collector = s.spawn(|| {
            let mut col = Collector::new(packer);
            let mut next = 0u64;
            let mut waiting = BTreeMap::new();
            for (seq, done) in done_rx {
                waiting.insert(seq, done);
                while let Some(d) = waiting.remove(&next) {
                    if let Err(e) = col.take(d, ctx) {
                        fail(e);
                        return None;
                    }
                    next += 1;
                    let _ = tokens_tx.send(());
                }
            }
            Some(col.finish())
        });
        let mut seq = 0u64;
        let read = read_disk(ctx.repo, source, parent, dirty, &mut |piece| {
            tokens_rx
                .recv()
                .map_err(|_| Error::Invalid("backup pipeline stopped".into()))?;
            work_tx
                .send((seq, piece))
                .map_err(|_| Error::Invalid("backup pipeline stopped".into()))?;
            seq += 1;
            Ok(())
        });
        drop(work_tx);
        // A panicked collector gives `None`: the backup fails below.
        let col = collector.join().ok().flatten();
        (read, col)
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let (read, col) = result;
    let bytes_read = read?;
    let (list, mut stats) = col.ok_or_else(|| Error::Invalid("collector failed".into()))?;
    stats.bytes_read = bytes_read;
    Ok((list, stats))
}

/// Source allocation, queried in windows and cached; small holes count as
/// data so they do not shred chunks into tiny pieces.
struct AllocMap {
    extents: Vec<DataExtent>,
    min_hole: u64,
}

impl AllocMap {
    const WINDOW: u64 = 1 << 30;
    const MAX_CACHED: usize = 1 << 16;

    /// The extent containing `pos`, merged with neighbours of the same kind.
    fn at(&mut self, src: &mut dyn BlockSource, pos: u64) -> Result<DataExtent> {
        let size = src.size();
        let covered = self.extents.first().is_some_and(|f| f.offset <= pos)
            && self.extents.last().is_some_and(|l| l.offset + l.len > pos);
        if !covered {
            self.extents.clear();
            let mut q = pos;
            // Keep querying while the last extent runs into the window edge,
            // so an extent's end is real and cut points do not depend on
            // where a window happened to start.
            while q < size {
                let len = Self::WINDOW.min(size - q);
                let raw = src.extents(q, len)?;
                let mut next = q;
                for mut e in raw {
                    if e.offset != next || e.len == 0 {
                        return Err(Error::Invalid(format!(
                            "source extents not contiguous at offset {next}"
                        )));
                    }
                    next = e.offset + e.len;
                    if !e.data && e.len < self.min_hole {
                        e.data = true;
                    }
                    match self.extents.last_mut() {
                        Some(l) if l.data == e.data => l.len += e.len,
                        _ => self.extents.push(e),
                    }
                }
                if next <= q {
                    return Err(Error::Invalid(format!(
                        "source reported no extent at offset {q}"
                    )));
                }
                q = next;
                if q < size
                    && self.extents.len() >= 2
                    && (q - pos >= Self::WINDOW || self.extents.len() >= Self::MAX_CACHED)
                {
                    // The last extent may continue past `q`: drop it and
                    // query again when the walk gets there.
                    self.extents.pop();
                    break;
                }
            }
        }
        let i = self.extents.partition_point(|e| e.offset + e.len <= pos);
        self.extents
            .get(i)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("source reported no extent at offset {pos}")))
    }
}

/// Walks the disk in order and emits pieces. Returns the bytes read.
///
/// Incremental: ranges outside `dirty` are copied from the parent's chunk
/// list. Each dirty range is re-chunked from the parent boundary at or
/// before its start until a new cut point lands on a parent boundary past
/// its end; from there the cut points (which depend only on content) would
/// repeat the parent's, so its extents are reused again.
fn read_disk(
    repo: &Repository,
    src: &mut dyn BlockSource,
    parent: Option<&ChunkList>,
    dirty: &[Span],
    emit: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<u64> {
    let size = src.size();
    let chunker = repo.chunker();
    let max = chunker.params().max as usize;
    let min = chunker.params().min as usize;
    // Each `next_cut` call scans from the chunk start, so small steps cost
    // CDC time; they only pay off in incrementals (fewer bytes read past
    // the point where the chunking meets the parent's again).
    let step = if parent.is_some() { READ_STEP } else { max };
    let mut alloc = AllocMap {
        extents: Vec::new(),
        min_hole: u64::from(chunker.params().min),
    };
    let mut bytes_read = 0u64;
    let mut pos = 0u64;
    let mut di = 0usize;

    let copy_parent =
        |from: u64, to: u64, emit: &mut dyn FnMut(Piece) -> Result<()>| -> Result<()> {
            let Some(p) = parent else { return Ok(()) };
            let Some(mut i) = p.find(from).filter(|_| from < to) else {
                return Ok(());
            };
            let mut batch = Vec::new();
            while i < p.extents().len() && p.extents()[i].offset < to {
                batch.push(p.extents()[i]);
                if batch.len() == 1024 {
                    emit(Piece::Reuse(std::mem::take(&mut batch)))?;
                }
                i += 1;
            }
            if !batch.is_empty() {
                emit(Piece::Reuse(batch))?;
            }
            Ok(())
        };

    while pos < size {
        let Some(&Span {
            offset: ds,
            len: dl,
        }) = dirty.get(di)
        else {
            copy_parent(pos, size, emit)?;
            break;
        };
        di += 1;
        let mut need = ds + dl;
        // The re-chunked region starts at the parent boundary before `ds`.
        if let Some(e) = parent.and_then(|p| p.find(ds).map(|i| p.extents()[i])) {
            let start = e.offset.max(pos);
            copy_parent(pos, start, emit)?;
            pos = start;
            if e.chunk.is_none() && ds > pos {
                // Unchanged zeros before the change need no reading.
                emit(Piece::Zero { len: ds - pos })?;
                pos = ds;
            }
        }
        // `buf` holds source bytes [pos, pos + buf.len()) already read.
        let mut buf: Vec<u8> = Vec::with_capacity(max);
        loop {
            let ext = alloc.at(src, pos)?;
            let ext_end = (ext.offset + ext.len).min(size);
            if !ext.data {
                buf.clear();
                emit(Piece::Zero { len: ext_end - pos })?;
                pos = ext_end;
            } else {
                // A run of at least `min` zeros where a piece starts is a
                // zero extent: no chunk, and the restore stays sparse.
                let mut run = 0usize;
                loop {
                    let z = leading_zeros(&buf);
                    if z < buf.len() || pos + buf.len() as u64 == ext_end {
                        break;
                    }
                    if buf.len() >= max {
                        run += buf.len();
                        emit(Piece::Zero {
                            len: buf.len() as u64,
                        })?;
                        pos += buf.len() as u64;
                        buf.clear();
                        continue;
                    }
                    let want = (buf.len() + step).min(max).min((ext_end - pos) as usize);
                    let old = buf.len();
                    buf.resize(want, 0);
                    src.read_at(pos + old as u64, &mut buf[old..])?;
                    bytes_read += (want - old) as u64;
                }
                let z = leading_zeros(&buf);
                if z > 0 && (run + z >= min || (z == buf.len() && pos + z as u64 == ext_end)) {
                    emit(Piece::Zero { len: z as u64 })?;
                    pos += z as u64;
                    buf.drain(..z);
                } else if !buf.is_empty() || pos < ext_end {
                    let cut = loop {
                        let at_end = pos + buf.len() as u64 == ext_end;
                        if let Some(n) = chunker.next_cut(&buf, at_end) {
                            break n;
                        }
                        let want = (buf.len() + step).min(max).min((ext_end - pos) as usize);
                        let old = buf.len();
                        if want <= old {
                            break old; // cannot happen: next_cut answers at max or at the end
                        }
                        buf.resize(want, 0);
                        src.read_at(pos + old as u64, &mut buf[old..])?;
                        bytes_read += (want - old) as u64;
                    };
                    // Never swallow a long zero run: end the chunk where it starts.
                    let cut = zero_run_cut(&buf, cut, pos, min);
                    // Bytes read past the cut begin the next chunk.
                    let mut rest = Vec::with_capacity(max);
                    rest.extend_from_slice(&buf[cut..]);
                    buf.truncate(cut);
                    emit(Piece::Data {
                        bytes: std::mem::replace(&mut buf, rest),
                    })?;
                    pos += cut as u64;
                }
            }
            while let Some(&Span { offset: s, len: l }) = dirty.get(di) {
                if s >= pos {
                    break;
                }
                need = need.max(s + l);
                di += 1;
            }
            if pos >= size {
                break;
            }
            if pos >= need {
                if let Some(p) = parent {
                    if p.is_boundary(pos) {
                        break;
                    }
                    // Inside a parent zero extent (merged runs of zeros keep
                    // no inner boundaries): the rest of it up to the next
                    // change is still zeros, so stop reading here.
                    if let Some(e) = p.find(pos).map(|i| p.extents()[i]) {
                        if e.chunk.is_none() {
                            let stop = e.end().min(dirty.get(di).map_or(u64::MAX, |d| d.offset));
                            emit(Piece::Zero { len: stop - pos })?;
                            pos = stop;
                            break;
                        }
                    }
                }
            }
        }
    }
    Ok(bytes_read)
}

/// Length of the run of zero bytes at the start of `b`.
fn leading_zeros(b: &[u8]) -> usize {
    let mut n = 0;
    for c in b.chunks(4096) {
        if is_zero(c) {
            n += c.len();
        } else {
            // `c` is not all zeros, so a position exists; 0 would only
            // shorten the zero run (more data stored, never less).
            return n + c.iter().position(|&x| x != 0).unwrap_or(0);
        }
    }
    n
}

/// Where a chunk of `buf[..cut]` (at disk offset `pos`) should end so that
/// it does not swallow a run of at least `min` zeros starting on a 4 KiB
/// boundary: the run's start, or `cut` when there is none. Depends only on
/// content since the chunk's start, like the CDC cut itself.
fn zero_run_cut(buf: &[u8], cut: usize, pos: u64, min: usize) -> usize {
    const B: usize = 4096;
    let mut z = (B - (pos % B as u64) as usize) % B;
    if z == 0 {
        z = B;
    }
    let mut run_start: Option<usize> = None;
    while z < buf.len() && (z < cut || run_start.is_some()) {
        let end = (z + B).min(buf.len());
        if is_zero(&buf[z..end]) {
            let s = *run_start.get_or_insert(z);
            if end - s >= min {
                return s.min(cut);
            }
        } else {
            run_start = None;
        }
        z += B;
    }
    cut
}
