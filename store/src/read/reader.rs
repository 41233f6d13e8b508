//! Random access to one disk of a snapshot, for the NBD server, FUSE mounts
//! and live restore. Zero extents are answered without fetching anything;
//! data comes in *spans* ([`crate::read::fetch`]: chunks back to back in a pack,
//! fetched with one ranged read) held in an LRU cache of opened chunks.
//!
//! What keeps a cold read fast, especially from S3:
//! - **single flight**: a span being fetched is waited for, never fetched
//!   twice, however many readers want it;
//! - **read-ahead for sequential readers only**: up to [`STREAMS`] readers
//!   are followed; one that keeps reading in order gets the next spans
//!   fetched by background threads, with a window that doubles up to a
//!   bound (a quarter of the cache). A random read fetches one span;
//! - **many reads in flight**: the background threads (as many as the
//!   backend wants ranged reads in flight) coalesce adjacent spans into one
//!   request, and every caller thread fetches and opens its own span, so
//!   chunks are opened on all cores;
//! - **demand first**: a reader never queues behind read-ahead. It fetches
//!   on its own thread, taking over a span that was queued but not started;
//! - **scan resistant**: what a sequential stream has passed is evicted
//!   first, so a pass over more data than the cache keeps what it cached
//!   at its start for the next pass, and random readers' spans survive it.
//!
//! What keeps a long reader (a live restore) going:
//! - **a pack gone** (a GC repacked its live chunks and swept it since the
//!   reader planned its spans): the index is loaded again and the span's
//!   chunks are read from their new copies;
//! - **an outage**: with [`DiskReader::wait_out_outages`], a read whose
//!   backend is unreachable waits (tries again, backing off) up to that
//!   long before it fails; with [`DiskReader::fall_back_to`], it is read
//!   from a replica holding the same snapshot first.
//!
//! Thread-safe and synchronous: callers (the async NBD server) run it on
//! blocking threads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use lru::LruCache;

use crate::backend::BackendError;
use crate::error::{Error, Result};
use crate::format::blob::ChunkBuf;
use crate::format::chunklist::ChunkList;
use crate::format::index::Index;
use crate::read::budget::Budget;
use crate::read::fetch::{self, Reads, Scratch, Span};
use crate::read::seed::Seeds;
use crate::repo::Repository;

/// Largest span: what a random read may fetch at once.
const SPAN_MAX: u64 = 4 << 20;

/// Largest ranged read of coalesced read-ahead spans (nor more than an
/// eighth of the cache).
const COALESCE_MAX: u64 = 16 << 20;
/// Sequential readers followed at once (a backfill beside a guest, ...).
pub const STREAMS: usize = 8;
/// How far behind the end of a stream a read may land and still belong to
/// it (requests in flight are served a little out of order)...
const NEAR_BACK: u32 = 4;
/// ...and how far ahead.
const NEAR_FWD: u32 = 2;
/// Read-ahead window of a stream that just turned out sequential.
const WINDOW_MIN: u64 = 8 << 20;
/// The window never grows past this (nor past a quarter of the cache).
const WINDOW_MAX: u64 = 256 << 20;

pub use crate::format::extent::DataExtent;

/// Counters, for benchmarks and tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReaderStats {
    /// Ranged reads sent to the backend.
    pub fetches: u64,
    pub bytes_fetched: u64,
    /// Of those, by background read-ahead.
    pub readahead_fetches: u64,
    /// Span lookups answered from the cache (or by another's fetch).
    pub cache_hits: u64,
    /// Pack bytes taken from ranges fetched ahead ([`DiskReader::take_from`]).
    pub seeded_bytes: u64,
    /// Bytes handed to readers (data extents only).
    pub bytes_served: u64,
    /// Most memory held at once: cached chunks, fetches in flight and idle
    /// fetch buffers (never above the cache size but for one fetch alone).
    pub peak_bytes: u64,
}

/// What [`DiskReader::read`] returns.
pub enum ReadData {
    /// A part of one cached chunk.
    Shared {
        chunk: Arc<Vec<u8>>,
        start: usize,
        len: usize,
    },
    /// A buffer of its own.
    Owned(Vec<u8>),
}

impl AsRef<[u8]> for ReadData {
    fn as_ref(&self) -> &[u8] {
        match self {
            ReadData::Shared { chunk, start, len } => &chunk[*start..*start + *len],
            ReadData::Owned(v) => v,
        }
    }
}

/// Opened chunks of a span; a damaged chunk fails only the reads that need it.
struct SpanData {
    chunks: Vec<Result<Arc<Vec<u8>>, Arc<Error>>>,
    bytes: usize,
}

/// A fetch in progress that others wait on.
struct Flight {
    done: Mutex<Option<Result<Arc<SpanData>, Failed>>>,
    cv: Condvar,
}

/// A failed fetch, as every reader waiting on it sees it.
#[derive(Clone, Debug)]
struct Failed {
    error: Arc<Error>,
    kind: FailKind,
}

/// What a failed fetch calls for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum FailKind {
    /// The pack is gone: read the chunks' new copies.
    PackGone,
    /// The backend did not answer (the S3 backend has spent its retries):
    /// worth waiting for, up to the outage wait.
    Unreachable,
    /// Anything else fails the read.
    Fatal,
}

impl FailKind {
    fn of(e: &Error) -> Self {
        match e {
            Error::Backend(BackendError::NotFound(_)) => FailKind::PackGone,
            Error::Backend(BackendError::Other(_) | BackendError::Io { .. }) => {
                FailKind::Unreachable
            }
            _ => FailKind::Fatal,
        }
    }
}

impl Failed {
    fn of(e: &Error) -> Self {
        Failed {
            error: Arc::new(clone_error(e)),
            kind: FailKind::of(e),
        }
    }

    fn into_error(self) -> Error {
        clone_error(&self.error)
    }
}

/// How long reads go to the replica first after the repository failed one.
const REPLICA_FIRST: Duration = Duration::from_secs(10);
/// A reloaded index serves every relocation this long before it is
/// reloaded again (a GC may have moved more since).
const INDEX_FRESH: Duration = Duration::from_secs(5);

enum Pending {
    /// Read-ahead scheduled, not started: a reader may take it over.
    Queued,
    Loading(Arc<Flight>),
}

#[derive(Clone, Copy, Default)]
struct Stream {
    /// Last span read.
    last: u32,
    /// Spans up to here are fetched or scheduled.
    ahead: u32,
    /// Read-ahead in bytes; 0 until the stream first moves forward.
    window: u64,
    used: u64,
}

struct State {
    ready: LruCache<u32, Arc<SpanData>>,
    budget: Budget,
    /// Idle fetch buffers: a fetch neither maps fresh memory nor builds a
    /// new zstd context. Counted in the budget.
    spares: Vec<Scratch>,
    pending: HashMap<u32, Pending>,
    streams: [Stream; STREAMS],
    clock: u64,
    stats: ReaderStats,
}

struct Inner {
    repo: Arc<Repository>,
    index: Arc<Index>,
    list: ChunkList,
    spans: Vec<Span>,
    /// Span of each extent (`u32::MAX`: a zero extent).
    span_of: Vec<u32>,
    window_max: u64,
    coalesce_max: u64,
    state: Mutex<State>,
    /// Signalled when a fetch ends: one waiting for room may start.
    room: Condvar,
    /// How long a read waits out an unreachable backend (ms; 0: fails at once).
    outage_wait_ms: AtomicU64,
    /// The index loaded again after a pack was found gone, and when.
    reloaded: Mutex<Option<(Instant, Arc<Index>)>>,
    /// A replica of the repository, read when the repository fails, and
    /// its index narrowed to this disk once loaded.
    replica: std::sync::OnceLock<Arc<Repository>>,
    replica_index: Mutex<Option<Arc<Index>>>,
    /// Whether a read has been served by the replica yet (logged once).
    failed_over: std::sync::atomic::AtomicBool,
    /// After the repository failed, reads go to the replica first until
    /// then (each would otherwise wait out the repository's retries).
    replica_first_until: Mutex<Option<Instant>>,
    /// Pack ranges fetched ahead (a boot set's), taken instead of fetching.
    seeds: std::sync::OnceLock<Arc<Seeds>>,
}

pub struct DiskReader {
    inner: Arc<Inner>,
    jobs: Sender<Vec<u32>>,
}

impl DiskReader {
    /// A reader over `list` (a disk of a snapshot) with a cache of
    /// `cache_bytes` of opened chunks.
    pub fn new(repo: Arc<Repository>, list: ChunkList, cache_bytes: usize) -> Result<Self> {
        let index = repo.index_for(chunks_of(&list))?;
        let spans = fetch::plan(&index, &list, SPAN_MAX)?;
        let mut span_of = vec![u32::MAX; list.extents().len()];
        for (s, span) in spans.iter().enumerate() {
            for (i, _) in &span.items {
                span_of[*i] = s as u32;
            }
        }
        let cache_limit = cache_bytes.max(32 << 20);
        let threads = repo.backend().read_concurrency().max(1);
        let inner = Arc::new(Inner {
            repo,
            index,
            list,
            spans,
            span_of,
            window_max: WINDOW_MAX.min(cache_limit as u64 / 4),
            coalesce_max: COALESCE_MAX.min(cache_limit as u64 / 8),
            state: Mutex::new(State {
                ready: LruCache::unbounded(),
                budget: Budget::new(cache_limit),
                spares: Vec::new(),
                pending: HashMap::new(),
                streams: [Stream::default(); STREAMS],
                clock: 0,
                stats: ReaderStats::default(),
            }),
            outage_wait_ms: AtomicU64::new(0),
            reloaded: Mutex::new(None),
            replica: std::sync::OnceLock::new(),
            replica_index: Mutex::new(None),
            failed_over: std::sync::atomic::AtomicBool::new(false),
            replica_first_until: Mutex::new(None),
            seeds: std::sync::OnceLock::new(),
            room: Condvar::new(),
        });
        let (jobs, rx) = unbounded::<Vec<u32>>();
        for _ in 0..threads {
            let (inner, rx): (Arc<Inner>, Receiver<Vec<u32>>) = (inner.clone(), rx.clone());
            // Detached: they end when the reader (the sender) is dropped.
            std::thread::spawn(move || {
                for job in rx {
                    inner.read_ahead(&job);
                }
            });
        }
        Ok(DiskReader { inner, jobs })
    }

    pub fn size(&self) -> u64 {
        self.inner.list.size()
    }

    pub fn stats(&self) -> ReaderStats {
        let st = self.inner.lock();
        ReaderStats {
            peak_bytes: st.budget.peak() as u64,
            ..st.stats
        }
    }

    /// Chunks the repository cannot give (unreachable, or its pack gone
    /// for good) are read from `replica`, a repository holding the same
    /// snapshot (synced: same chunk ids, its own packs and index). Set once.
    pub fn fall_back_to(&self, replica: Arc<Repository>) {
        let _ = self.inner.replica.set(replica);
    }

    /// Spans are taken from `seeds` (pack ranges fetched ahead) when they
    /// hold them, instead of being fetched. Set once.
    pub fn take_from(&self, seeds: Arc<Seeds>) {
        let _ = self.inner.seeds.set(seeds);
    }

    /// The pack ranges holding the spans of `ranges`, in the order first
    /// needed, chunks back to back in a pack together up to `max` bytes (a
    /// larger chunk alone): what [`Seeds::fetch`] fetches ahead for them,
    /// in pieces small enough that the first land soon.
    pub fn pack_ranges(&self, ranges: &[(u64, u64)], max: u64) -> Vec<(crate::Id, u64, u64)> {
        let inner = &self.inner;
        let mut seen = std::collections::HashSet::new();
        let mut out: Vec<(u32, u64, u64)> = Vec::new();
        for &(offset, len) in ranges {
            for s in self.spans_of(offset, len) {
                if !seen.insert(s) {
                    continue;
                }
                let span = &inner.spans[s as usize];
                for (_, loc) in &span.items {
                    let (from, to) = (
                        u64::from(loc.offset),
                        u64::from(loc.offset) + u64::from(loc.len),
                    );
                    match out.last_mut() {
                        Some((pack, start, end))
                            if *pack == span.pack && *end == from && to - *start <= max =>
                        {
                            *end = to
                        }
                        _ => out.push((span.pack, from, to)),
                    }
                }
            }
        }
        let packs = inner.index.packs();
        out.into_iter()
            .map(|(p, start, end)| (packs[p as usize].id, start, end - start))
            .collect()
    }

    /// Reads wait up to `wait` for an unreachable backend (an S3 outage)
    /// instead of failing once its own retries are spent: a live restore's
    /// guest and stream then pause and go on.
    pub fn wait_out_outages(&self, wait: Duration) {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.inner.outage_wait_ms.store(ms, Ordering::Relaxed);
    }

    /// Data/zero extents covering `[offset, offset + len)` (clipped to the disk).
    pub fn extents(&self, offset: u64, len: u64) -> Vec<DataExtent> {
        let list = &self.inner.list;
        let end = offset.saturating_add(len).min(self.size());
        let mut out: Vec<DataExtent> = Vec::new();
        let Some(mut i) = list.find(offset) else {
            return out;
        };
        while let Some(e) = list.extents().get(i) {
            if e.offset >= end {
                break;
            }
            let s = e.offset.max(offset);
            let t = e.end().min(end);
            let data = e.chunk.is_some();
            match out.last_mut() {
                Some(l) if l.data == data && l.offset + l.len == s => l.len += t - s,
                _ => out.push(DataExtent {
                    offset: s,
                    len: t - s,
                    data,
                }),
            }
            i += 1;
        }
        out
    }

    /// `len` bytes at `offset`, shared with the cache when they lie inside
    /// one chunk (the usual case: guests and `nbdcopy` read blocks smaller
    /// than chunks), so an NBD reply sends them without a copy; else
    /// copied into a buffer of their own by [`DiskReader::read_at`].
    pub fn read(&self, offset: u64, len: usize) -> Result<ReadData> {
        let inner = &self.inner;
        let end = offset.saturating_add(len as u64);
        if let Some(i) = inner.list.find(offset).filter(|_| len > 0) {
            let e = inner.list.extents()[i];
            if e.chunk.is_some() && end <= e.end() {
                let s = inner.span_of[i];
                // Read-ahead starts before this read waits.
                self.follow(s, s);
                let chunk = inner.chunk(s, i)?;
                let start = (offset - e.offset) as usize;
                if chunk.len() < start + len {
                    return Err(Error::Invalid(format!(
                        "chunk at {} is shorter than its extent",
                        e.offset
                    )));
                }
                inner.lock().stats.bytes_served += len as u64;
                return Ok(ReadData::Shared { chunk, start, len });
            }
        }
        let mut buf = vec![0u8; len];
        self.read_at(offset, &mut buf)?;
        Ok(ReadData::Owned(buf))
    }

    /// Fills `buf` from `offset`. A damaged or missing chunk fails the read;
    /// nothing wrong is ever returned.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inner = &self.inner;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| {
                Error::Invalid(format!("read {offset}+{} past end of disk", buf.len()))
            })?;
        let mut pos = offset;
        let mut touched: Option<(u32, u32)> = None;
        let mut served = 0u64;
        while pos < end {
            let i = inner
                .list
                .find(pos)
                .ok_or_else(|| Error::Invalid(format!("offset {pos} not in the chunk list")))?;
            let e = inner.list.extents()[i];
            let t = e.end().min(end);
            let dst = &mut buf[(pos - offset) as usize..(t - offset) as usize];
            match e.chunk {
                None => dst.fill(0),
                Some(_) => {
                    let s = inner.span_of[i];
                    if touched.is_none() {
                        // Read-ahead starts before this read waits.
                        touched = Some((s, s));
                        self.follow(s, s);
                    }
                    if let Some(t) = touched.as_mut() {
                        t.1 = s;
                    }
                    let data = inner.chunk(s, i)?;
                    let from = (pos - e.offset) as usize;
                    dst.copy_from_slice(&data[from..from + dst.len()]);
                    served += dst.len() as u64;
                }
            }
            pos = t;
        }
        if let Some((a, b)) = touched.filter(|(a, b)| a != b) {
            self.follow(a, b);
        }
        inner.lock().stats.bytes_served += served;
        Ok(())
    }

    /// Loads the chunks of a range in the background (NBD_CMD_CACHE): as
    /// much of it as a quarter of the cache holds.
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        let inner = &self.inner;
        let end = offset.saturating_add(len).min(self.size());
        let Some(first) = inner.list.find(offset) else {
            return Ok(());
        };
        let spans: Vec<u32> = inner.list.extents()[first..]
            .iter()
            .zip(&inner.span_of[first..])
            .take_while(|(e, _)| e.offset < end)
            .filter(|(_, &s)| s != u32::MAX)
            .map(|(_, &s)| s)
            .collect();
        if let (Some(&a), Some(&b)) = (spans.first(), spans.last()) {
            let mut st = inner.lock();
            let limit = inner.window_max;
            self.schedule(&mut st, a, b, limit);
        }
        Ok(())
    }

    /// Whether every chunk of `[offset, offset + len)` is in the cache
    /// now: a read of it would not wait for the repository.
    pub fn is_cached(&self, offset: u64, len: u64) -> bool {
        let st = self.inner.lock();
        self.spans_of(offset, len).all(|s| st.ready.contains(&s))
    }

    /// Queues the chunks of `ranges` for the read-ahead workers in the
    /// order given (a boot set, fetched while the guest starts); the
    /// workers fetch them in parallel, and a guest read of a queued chunk
    /// fetches it at once rather than waiting its turn. The bytes queued.
    pub fn prefetch_in_order(&self, ranges: &[(u64, u64)]) -> u64 {
        let mut order: Vec<u32> = Vec::new();
        for &(offset, len) in ranges {
            for s in self.spans_of(offset, len) {
                if order.last() != Some(&s) {
                    order.push(s);
                }
            }
        }
        let inner = &self.inner;
        let mut st = inner.lock();
        let before: u64 = queued_bytes(&st, &inner.spans);
        // Runs of consecutive spans go together: one ranged read each.
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && order[j + 1] == order[j] + 1 {
                j += 1;
            }
            self.schedule(&mut st, order[i], order[j], u64::MAX);
            i = j + 1;
        }
        queued_bytes(&st, &inner.spans) - before
    }

    /// The spans holding the data of `[offset, offset + len)`, in order
    /// (a span once per extent of it).
    fn spans_of(&self, offset: u64, len: u64) -> impl Iterator<Item = u32> + '_ {
        let inner = &self.inner;
        let end = offset.saturating_add(len).min(self.size());
        inner.list.find(offset).into_iter().flat_map(move |first| {
            inner.list.extents()[first..]
                .iter()
                .zip(&inner.span_of[first..])
                .take_while(move |(e, _)| e.offset < end)
                .map(|(_, &s)| s)
                .filter(|&s| s != u32::MAX)
        })
    }

    /// Sequential detection: a read of spans `a..=b` that continues a
    /// stream forward turns it sequential (or grows its window) and
    /// schedules the spans after `b`. Reads a little behind the end of a
    /// stream (requests in flight arrive out of order) continue it quietly.
    fn follow(&self, a: u32, b: u32) {
        let inner = &self.inner;
        let mut st = inner.lock();
        st.clock += 1;
        let clock = st.clock;
        let found = st.streams.iter().position(|s| {
            s.used > 0 && a + NEAR_BACK >= s.last && a <= s.last.saturating_add(NEAR_FWD)
        });
        let Some(k) = found else {
            // A new stream (random so far): no read-ahead yet.
            let k = (0..STREAMS)
                .min_by_key(|&k| st.streams[k].used)
                .unwrap_or(0);
            st.streams[k] = Stream {
                last: b,
                ahead: b,
                window: 0,
                used: clock,
            };
            return;
        };
        let mut s = st.streams[k];
        s.used = clock;
        if b <= s.last {
            st.streams[k] = s;
            return;
        }
        s.window = if s.window == 0 {
            WINDOW_MIN
        } else {
            (s.window * 2).min(inner.window_max)
        };
        // Spans the stream has left behind for good go to the cold end of
        // the cache: a scan larger than the cache then evicts its own past
        // rather than everything else, and a second pass finds the part
        // kept (plain LRU would keep nothing of it).
        let behind = |x: u32| x.saturating_sub(NEAR_BACK + 1);
        if b - s.last <= 1024 {
            for p in behind(s.last)..behind(b) {
                st.ready.demote(&p);
            }
        }
        s.last = b;
        // Spans after `b` within the window, from where scheduling stopped.
        let n = inner.spans.len() as u32;
        let from = (s.ahead.max(b) + 1).min(n);
        let mut bytes = inner.spans[(b + 1).min(from) as usize..from as usize]
            .iter()
            .map(Span::len)
            .sum::<u64>();
        let mut to = from;
        while to < n && bytes < s.window {
            bytes += inner.spans[to as usize].len();
            to += 1;
        }
        if to > from {
            s.ahead = to - 1;
            self.schedule(&mut st, from, to - 1, u64::MAX);
        }
        st.streams[k] = s;
    }

    /// Queues spans `a..=b` that are neither cached nor on their way, in
    /// jobs of adjacent spans of one pack (one ranged read each).
    fn schedule(&self, st: &mut State, a: u32, b: u32, limit: u64) {
        let inner = &self.inner;
        let mut job: Vec<u32> = Vec::new();
        let mut job_bytes = 0u64;
        let mut total = 0u64;
        let Some(last) = (inner.spans.len() as u32).checked_sub(1) else {
            return;
        };
        for s in a..=b.min(last) {
            if st.ready.contains(&s) || st.pending.contains_key(&s) {
                continue;
            }
            let span = &inner.spans[s as usize];
            total += span.len();
            if total > limit {
                break;
            }
            let joins = job.last().is_some_and(|&p| {
                let prev = &inner.spans[p as usize];
                p + 1 == s && prev.pack == span.pack && prev.end == span.start
            });
            if !job.is_empty() && (!joins || job_bytes + span.len() > inner.coalesce_max) {
                // A closed channel means the reader is going away.
                let _ = self.jobs.send(std::mem::take(&mut job));
                job_bytes = 0;
            }
            st.pending.insert(s, Pending::Queued);
            job.push(s);
            job_bytes += span.len();
        }
        if !job.is_empty() {
            let _ = self.jobs.send(job);
        }
    }
}

/// A fetch in flight: its buffer and the pack bytes reserved for it.
struct Lease {
    scratch: Scratch,
    sealed: usize,
}

/// Evicts from the cold end of the cache until what the reader holds fits
/// its budget.
fn make_room(st: &mut State) {
    while st.budget.over() > 0 {
        match st.ready.pop_lru() {
            Some((_, old)) => st.budget.uncache(old.bytes),
            None => break,
        }
    }
    st.budget.settle();
}

/// Bytes of the spans queued for the workers.
fn queued_bytes(st: &State, spans: &[Span]) -> u64 {
    st.pending
        .iter()
        .filter(|(_, p)| matches!(p, Pending::Queued))
        .map(|(&s, _)| spans[s as usize].len())
        .sum()
}

impl Drop for DiskReader {
    fn drop(&mut self) {
        // Queued spans stay queued: nobody will want them. The workers see
        // the channel close and stop.
        self.inner.lock().pending.clear();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The opened chunk of extent `i` (in span `s`), from the cache, from
    /// another reader's fetch, or fetched here.
    fn chunk(&self, s: u32, i: usize) -> Result<Arc<Vec<u8>>> {
        let data = self.span(s)?;
        let k = self.spans[s as usize]
            .items
            .iter()
            .position(|(j, _)| *j == i)
            .ok_or_else(|| Error::Invalid(format!("extent {i} is not in span {s}")))?;
        match &data.chunks[k] {
            Ok(d) => Ok(d.clone()),
            Err(e) => Err(clone_error(e)),
        }
    }

    /// Span `s`, waiting out an unreachable backend up to the outage wait.
    fn span(&self, s: u32) -> Result<Arc<SpanData>> {
        let wait = Duration::from_millis(self.outage_wait_ms.load(Ordering::Relaxed));
        let mut outage = super::outage::OutageWait::from_now(wait);
        // A read-ahead that found the pack gone leaves the relocation to
        // whoever reads the span next: at most a few rounds of that.
        let mut gone = 0;
        loop {
            let failed = match self.span_once(s) {
                Ok(d) => return Ok(d),
                Err(f) => f,
            };
            match failed.kind {
                FailKind::PackGone if gone < 3 => gone += 1,
                FailKind::Unreachable if outage.failed() => {
                    tracing::warn!(
                        "waiting for the repository ({:.0}s so far): {}",
                        outage.so_far().as_secs_f64(),
                        failed.error
                    );
                    outage.pause();
                }
                _ => return Err(failed.into_error()),
            }
        }
    }

    fn span_once(&self, s: u32) -> Result<Arc<SpanData>, Failed> {
        let flight = {
            let mut st = self.lock();
            if let Some(d) = st.ready.get(&s).cloned() {
                st.stats.cache_hits += 1;
                return Ok(d);
            }
            let waiting = match st.pending.get(&s) {
                Some(Pending::Loading(f)) => Some(f.clone()),
                _ => None,
            };
            match waiting {
                Some(f) => {
                    st.stats.cache_hits += 1;
                    Some(f)
                }
                // Queued or absent: this reader fetches it now.
                _ => {
                    st.pending
                        .insert(s, Pending::Loading(Arc::new(Flight::new())));
                    None
                }
            }
        };
        if let Some(f) = flight {
            return f.wait();
        }
        // Fetches in flight (demand and read-ahead alike) may take half the
        // budget, the cache giving way: a client with many requests in
        // flight (nbdcopy has 64) taking all of it evicted the spans read
        // ahead for it before it read them, and fetched them again.
        let mut lease = {
            let st = self.lock();
            let limit = st.budget.limit() / 2;
            let mut st = self.wait_for_room(st, &[s], limit);
            self.lease(&mut st, &[s])
        };
        let r = self.load(s, &mut lease.scratch);
        self.publish(s, r.clone());
        self.give_back(lease);
        r
    }

    /// Span `s` fetched with `sc` (or read from the replica or the chunks'
    /// new copies).
    fn load(&self, s: u32, sc: &mut Scratch) -> Result<Arc<SpanData>, Failed> {
        if let Some(replica) = self.replica.get().filter(|_| self.replica_first()) {
            if let Ok(d) = self.read_from_replica(replica, s) {
                return Ok(d);
            }
        }
        let span = &self.spans[s as usize];
        let r = match self.seeded(span, &mut sc.fetched) {
            true => Ok(()),
            false => self.fetch(&[span], Reads::Again, &mut sc.fetched, false),
        };
        let r = r.map(|()| self.open(s, &mut sc.fetched, span.start, &mut sc.chunk));
        let r = match r {
            Err(e) if FailKind::of(&e) == FailKind::PackGone => self.relocated(s),
            r => r,
        };
        let r = match (r, self.replica.get()) {
            (Err(e), Some(replica)) if FailKind::of(&e) != FailKind::Fatal => {
                *self
                    .replica_first_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + REPLICA_FIRST);
                self.read_from_replica(replica, s).map_err(|r_err| {
                    tracing::warn!("the replica failed too: {r_err}");
                    e
                })
            }
            (r, _) => r,
        };
        r.map_err(|e| Failed::of(&e))
    }

    /// Waits until a fetch of spans `run` fits in `share` of the budget.
    fn wait_for_room<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        run: &[u32],
        share: usize,
    ) -> MutexGuard<'a, State> {
        let cost = (self.sealed(run) + self.plain(run)) as usize;
        while !st.budget.fits(cost, share) {
            st = self.room.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st
    }

    /// Starts a fetch of spans `run`: reserves its pack bytes (in a spare
    /// fetch buffer if one is idle) and its opened chunks, which
    /// [`Inner::publish`] hands over to the cache span by span.
    fn lease(&self, st: &mut State, run: &[u32]) -> Lease {
        let scratch = st.spares.pop().unwrap_or_default();
        let kept = scratch.fetched.capacity();
        st.budget.take_spare(kept);
        let sealed = kept.max(self.sealed(run) as usize);
        st.budget.start(sealed + self.plain(run) as usize);
        make_room(st);
        Lease { scratch, sealed }
    }

    /// Ends a fetch: its buffer is kept for the next one while idle
    /// buffers fit in their share of the budget, else freed.
    fn give_back(&self, lease: Lease) {
        let freed = {
            let mut st = self.lock();
            st.budget.end(lease.sealed);
            let kept = lease.scratch.fetched.capacity();
            let freed = if st.budget.keeps_spare(kept) {
                st.budget.add_spare(kept);
                st.spares.push(lease.scratch);
                None
            } else {
                Some(lease.scratch)
            };
            st.budget.settle();
            freed
        };
        drop(freed);
        self.room.notify_all();
    }

    /// Pack bytes of spans `run`.
    fn sealed(&self, run: &[u32]) -> u64 {
        run.iter().map(|&s| self.spans[s as usize].len()).sum()
    }

    /// Bytes of the opened chunks of spans `run`.
    fn plain(&self, run: &[u32]) -> u64 {
        let extents = self.list.extents();
        run.iter()
            .flat_map(|&s| &self.spans[s as usize].items)
            .map(|(i, _)| extents[*i].len)
            .sum()
    }

    /// Span `s` read chunk by chunk through the index loaded again: its
    /// pack is gone, so a GC has repacked the chunks into new packs (or the
    /// snapshot is gone too, and the read fails).
    fn relocated(&self, s: u32) -> Result<Arc<SpanData>> {
        let index = self.reloaded_index()?;
        self.read_chunks(&self.repo, &index, s)
    }

    /// Whether the repository failed a moment ago.
    fn replica_first(&self) -> bool {
        self.replica_first_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    /// Span `s` read chunk by chunk from the replica.
    fn read_from_replica(&self, replica: &Repository, s: u32) -> Result<Arc<SpanData>> {
        let index = {
            let mut g = self.replica_index.lock().unwrap_or_else(|e| e.into_inner());
            match g.as_ref() {
                Some(ix) => ix.clone(),
                None => {
                    let ix = replica.index_for(chunks_of(&self.list))?;
                    *g = Some(ix.clone());
                    ix
                }
            }
        };
        let d = self.read_chunks(replica, &index, s)?;
        if !self.failed_over.swap(true, Ordering::Relaxed) {
            tracing::warn!("the repository failed: reading from the replica");
        }
        Ok(d)
    }

    /// Span `s` read chunk by chunk from `repo` through `index`.
    fn read_chunks(&self, repo: &Repository, index: &Index, s: u32) -> Result<Arc<SpanData>> {
        let span = &self.spans[s as usize];
        let mut chunks = Vec::with_capacity(span.items.len());
        for (i, _) in &span.items {
            let e = self.list.extents()[*i];
            let id = e
                .chunk
                .ok_or_else(|| Error::Invalid(format!("extent {i} has no chunk")))?;
            match repo.read_chunk(index, &id) {
                Ok(d) if d.len() as u64 == e.len => chunks.push(Ok(Arc::new(d))),
                Ok(d) => chunks.push(Err(Arc::new(Error::Corrupt {
                    what: format!("chunk {id}"),
                    detail: format!(
                        "{} bytes where the extent at {} has {}",
                        d.len(),
                        e.offset,
                        e.len
                    ),
                }))),
                // The backend failed: the whole span fails (and is tried
                // again), as a fetch does.
                Err(e @ Error::Backend(_)) => return Err(e),
                Err(e) => chunks.push(Err(Arc::new(e))),
            }
        }
        let bytes = chunks
            .iter()
            .map(|c| c.as_ref().map_or(0, |d| d.len()))
            .sum();
        Ok(Arc::new(SpanData { chunks, bytes }))
    }

    /// The index as it is now, loaded again at most every [`INDEX_FRESH`].
    fn reloaded_index(&self) -> Result<Arc<Index>> {
        let mut g = self.reloaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, ix)) = g.as_ref().filter(|(at, _)| at.elapsed() < INDEX_FRESH) {
            return Ok(ix.clone());
        }
        tracing::info!("a pack of the snapshot is gone (repacked by a GC?): reloading the index");
        self.repo.invalidate_index();
        let ix = self.repo.index_for(chunks_of(&self.list))?;
        *g = Some((Instant::now(), ix.clone()));
        Ok(ix)
    }

    /// A background job: fetch the spans still queued, adjacent ones with
    /// one ranged read, once what is in flight leaves room for it within
    /// half the budget (the other half is the cache's).
    fn read_ahead(&self, job: &[u32]) {
        let mut run: Vec<u32> = Vec::new();
        let mut lease = {
            let st = self.lock();
            let share = st.budget.limit() / 2;
            let mut st = self.wait_for_room(st, job, share);
            for &s in job {
                if matches!(st.pending.get(&s), Some(Pending::Queued)) {
                    st.pending
                        .insert(s, Pending::Loading(Arc::new(Flight::new())));
                    run.push(s);
                }
            }
            if run.is_empty() {
                return;
            }
            self.lease(&mut st, &run)
        };
        // Spans a reader took over leave gaps: fetch each contiguous run.
        let mut start = 0;
        for k in 1..=run.len() {
            if k == run.len() || run[k] != run[k - 1] + 1 {
                self.fetch_run(&run[start..k], &mut lease.scratch);
                start = k;
            }
        }
        self.give_back(lease);
    }

    /// Fetched for a stream, which reads each span once: kept in memory,
    /// not added to the disk cache (scan resistance, as in memory).
    fn fetch_run(&self, run: &[u32], sc: &mut Scratch) {
        // Spans fetched ahead are taken one by one, each published as it
        // lands (the guest's first read may be waiting on the first); the
        // rest are fetched, each run of them with one ranged read.
        let mut rest: Vec<u32> = Vec::new();
        for &s in run {
            let span = &self.spans[s as usize];
            if self.seeded(span, &mut sc.fetched) {
                let data = self.open(s, &mut sc.fetched, span.start, &mut sc.chunk);
                self.publish(s, Ok(data));
                continue;
            }
            if rest.last().is_some_and(|&l| l + 1 != s) {
                self.fetch_spans(&std::mem::take(&mut rest), sc);
            }
            rest.push(s);
        }
        if !rest.is_empty() {
            self.fetch_spans(&rest, sc);
        }
    }

    /// Fetches consecutive spans `run` with one ranged read.
    fn fetch_spans(&self, run: &[u32], sc: &mut Scratch) {
        let spans: Vec<&Span> = run.iter().map(|&s| &self.spans[s as usize]).collect();
        match self.fetch(&spans, Reads::Once, &mut sc.fetched, true) {
            Ok(()) => {
                let base = spans[0].start;
                for &s in run {
                    let data = self.open(s, &mut sc.fetched, base, &mut sc.chunk);
                    self.publish(s, Ok(data));
                }
            }
            Err(e) => {
                let failed = Failed::of(&e);
                for &s in run {
                    self.publish(s, Err(failed.clone()));
                }
            }
        }
    }

    /// Whether the seeds held `span`'s pack bytes (now in `buf`), waiting
    /// for them while they are fetched.
    fn seeded(&self, span: &Span, buf: &mut Vec<u8>) -> bool {
        let Some(seeds) = self.seeds.get() else {
            return false;
        };
        let object = crate::format::layout::pack(&self.index.packs()[span.pack as usize].id);
        if !seeds.take(&object, span.start, span.len(), buf) {
            return false;
        }
        self.lock().stats.seeded_bytes += span.len();
        true
    }

    /// Fetches the pack bytes of consecutive `spans` into `buf` (counted
    /// as read `ahead` or not).
    fn fetch(&self, spans: &[&Span], reads: Reads, buf: &mut Vec<u8>, ahead: bool) -> Result<()> {
        let r = fetch::fetch(&self.repo, &self.index, spans, reads, buf);
        if r.is_ok() {
            let mut st = self.lock();
            st.stats.fetches += 1;
            st.stats.bytes_fetched += buf.len() as u64;
            st.stats.readahead_fetches += u64::from(ahead);
        }
        r
    }

    fn open(&self, s: u32, bytes: &mut [u8], base: u64, buf: &mut ChunkBuf) -> Arc<SpanData> {
        let span = &self.spans[s as usize];
        let mut chunks = Vec::with_capacity(span.items.len());
        let walked = fetch::open_each(
            &self.repo,
            &self.index,
            &self.list,
            span,
            bytes,
            base,
            buf,
            |_, r| {
                chunks.push(r.map(|d| Arc::new(d.into_vec())).map_err(Arc::new));
                Ok(())
            },
        );
        debug_assert!(walked.is_ok(), "the callback never fails");
        let bytes = chunks
            .iter()
            .map(|c| c.as_ref().map_or(0, |d| d.len()))
            .sum();
        Arc::new(SpanData { chunks, bytes })
    }

    /// Ends the fetch of span `s` (its lease's opened chunks become the
    /// cache's): caches the result (a failed fetch is not cached, so the
    /// next read tries again) and wakes whoever waits for it.
    fn publish(&self, s: u32, r: Result<Arc<SpanData>, Failed>) {
        let flight = {
            let mut st = self.lock();
            st.budget.end(self.plain(&[s]) as usize);
            let flight = match st.pending.remove(&s) {
                Some(Pending::Loading(f)) => Some(f),
                _ => None,
            };
            if let Ok(d) = &r {
                st.budget.cache(d.bytes);
                if let Some((_, old)) = st.ready.push(s, d.clone()) {
                    st.budget.uncache(old.bytes);
                }
            }
            make_room(&mut st);
            flight
        };
        self.room.notify_all();
        if let Some(f) = flight {
            *f.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            f.cv.notify_all();
        }
    }
}

impl Flight {
    fn new() -> Self {
        Flight {
            done: Mutex::new(None),
            cv: Condvar::new(),
        }
    }

    fn wait(&self) -> Result<Arc<SpanData>, Failed> {
        let mut g = self.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*g {
                Some(Ok(d)) => return Ok(d.clone()),
                Some(Err(e)) => return Err(e.clone()),
                None => g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

/// The same error again for another reader of a damaged chunk.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Corrupt { what, detail } => Error::Corrupt {
            what: what.clone(),
            detail: detail.clone(),
        },
        Error::MissingChunk(id) => Error::MissingChunk(*id),
        Error::Backend(BackendError::NotFound(name)) => {
            Error::Backend(BackendError::NotFound(name.clone()))
        }
        Error::Backend(b) => Error::Backend(BackendError::Other(b.to_string())),
        other => Error::Invalid(other.to_string()),
    }
}

/// Disk `name` of a snapshot, ready for random reads.
pub fn open_disk(
    repo: Arc<Repository>,
    snapshot: &crate::Snapshot,
    name: &str,
    cache_bytes: usize,
) -> Result<DiskReader> {
    let d = snapshot
        .disks
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "snapshot {} has no disk {name}",
                snapshot.id.short()
            ))
        })?;
    let list = repo.load_chunk_list(&d.chunk_list)?;
    DiskReader::new(repo, list, cache_bytes)
}

/// Every disk of a snapshot, by name, ready for random reads, over one
/// index narrowed to their chunks ([`Repository::index_for`]).
pub fn open_disks(
    repo: Arc<Repository>,
    snapshot: &crate::Snapshot,
    cache_bytes: usize,
) -> Result<Vec<(String, DiskReader)>> {
    let (lists, _) = repo.index_for_found(|| {
        let lists = snapshot
            .disks
            .iter()
            .map(|d| Ok((d.name.clone(), repo.load_chunk_list(&d.chunk_list)?)))
            .collect::<Result<Vec<_>>>()?;
        let chunks = lists.iter().flat_map(|(_, l)| chunks_of(l)).collect();
        Ok((lists, chunks))
    })?;
    lists
        .into_iter()
        .map(|(name, list)| Ok((name, DiskReader::new(repo.clone(), list, cache_bytes)?)))
        .collect()
}

/// The chunks a disk's list references.
pub fn chunks_of(list: &ChunkList) -> impl Iterator<Item = crate::Id> + '_ {
    list.extents().iter().filter_map(|e| e.chunk)
}
