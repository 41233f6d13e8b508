//! Random access to one disk of a snapshot, for the NBD server, FUSE mounts
//! and live restore: reads fetch and decrypt chunks on demand, keep them in
//! an LRU cache, read ahead within a pack, and answer zero extents without
//! fetching anything.
//!
//! Thread-safe and synchronous: callers (the async NBD server) run it on
//! blocking threads, so many reads proceed in parallel.

use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::chunklist::{ChunkList, Extent};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{Index, Loc};
use crate::pack;
use crate::repo::Repository;

/// Bytes fetched with one ranged read when the next chunks of the disk sit
/// right after the wanted one in the same pack (they usually do).
const READ_AHEAD: u64 = 8 << 20;
/// Concurrent fetches of the same chunk wait on one of these locks rather
/// than download it twice.
const FETCH_STRIPES: usize = 64;

/// Whether a range of the disk holds chunk data or reads as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskExtent {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

struct Cache {
    lru: LruCache<Id, Arc<Vec<u8>>>,
    bytes: usize,
    limit: usize,
}

impl Cache {
    fn get(&mut self, id: &Id) -> Option<Arc<Vec<u8>>> {
        self.lru.get(id).cloned()
    }

    fn put(&mut self, id: Id, data: Arc<Vec<u8>>) {
        if self.lru.contains(&id) {
            return;
        }
        self.bytes += data.len();
        self.lru.put(id, data);
        while self.bytes > self.limit {
            match self.lru.pop_lru() {
                Some((_, d)) => self.bytes -= d.len(),
                None => break,
            }
        }
    }
}

/// Counters, for benchmarks and tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReaderStats {
    pub fetches: u64,
    pub bytes_fetched: u64,
    pub cache_hits: u64,
}

pub struct DiskReader {
    repo: Arc<Repository>,
    index: Arc<Index>,
    list: ChunkList,
    cache: Mutex<Cache>,
    stripes: Vec<Mutex<()>>,
    stats: Mutex<ReaderStats>,
}

impl DiskReader {
    /// A reader over `list` (a disk of a snapshot) with a cache of
    /// `cache_bytes` of decrypted chunks.
    pub fn new(repo: Arc<Repository>, list: ChunkList, cache_bytes: usize) -> Result<Self> {
        let index = repo.index()?;
        Ok(DiskReader {
            repo,
            index,
            list,
            cache: Mutex::new(Cache {
                lru: LruCache::unbounded(),
                bytes: 0,
                limit: cache_bytes.max(8 << 20),
            }),
            stripes: (0..FETCH_STRIPES).map(|_| Mutex::new(())).collect(),
            stats: Mutex::new(ReaderStats::default()),
        })
    }

    pub fn size(&self) -> u64 {
        self.list.size()
    }

    pub fn stats(&self) -> ReaderStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Data/zero extents covering `[offset, offset + len)` (clipped to the disk).
    pub fn extents(&self, offset: u64, len: u64) -> Vec<DiskExtent> {
        let end = offset.saturating_add(len).min(self.size());
        let mut out: Vec<DiskExtent> = Vec::new();
        let Some(mut i) = self.list.find(offset) else {
            return out;
        };
        while let Some(e) = self.list.extents().get(i) {
            if e.offset >= end {
                break;
            }
            let s = e.offset.max(offset);
            let t = e.end().min(end);
            let data = e.chunk.is_some();
            match out.last_mut() {
                Some(l) if l.data == data && l.offset + l.len == s => l.len += t - s,
                _ => out.push(DiskExtent {
                    offset: s,
                    len: t - s,
                    data,
                }),
            }
            i += 1;
        }
        out
    }

    /// Fills `buf` from `offset`. A damaged or missing chunk fails the read;
    /// nothing wrong is ever returned.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| {
                Error::Invalid(format!("read {offset}+{} past end of disk", buf.len()))
            })?;
        let mut pos = offset;
        while pos < end {
            let i = self.list.find(pos).expect("pos < size");
            let e = self.list.extents()[i];
            let t = e.end().min(end);
            let dst = &mut buf[(pos - offset) as usize..(t - offset) as usize];
            match e.chunk {
                None => dst.fill(0),
                Some(id) => {
                    let data = self.chunk(i, &id)?;
                    let s = (pos - e.offset) as usize;
                    dst.copy_from_slice(&data[s..s + dst.len()]);
                }
            }
            pos = t;
        }
        Ok(())
    }

    /// Loads the chunks of a range into the cache (NBD_CMD_CACHE, backfill).
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.saturating_add(len).min(self.size());
        let Some(mut i) = self.list.find(offset) else {
            return Ok(());
        };
        while let Some(e) = self.list.extents().get(i).copied() {
            if e.offset >= end {
                break;
            }
            if let Some(id) = e.chunk {
                self.chunk(i, &id)?;
            }
            i += 1;
        }
        Ok(())
    }

    /// Chunk of extent `i`, from the cache or fetched (with read-ahead).
    fn chunk(&self, i: usize, id: &Id) -> Result<Arc<Vec<u8>>> {
        if let Some(d) = self.cache_get(id) {
            return Ok(d);
        }
        let stripe = (id.0[0] as usize) % FETCH_STRIPES;
        let _g = self.stripes[stripe]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(d) = self.cache_get(id) {
            return Ok(d);
        }
        let loc = self.index.get(id).ok_or(Error::MissingChunk(*id))?;
        let group = self.read_ahead_group(i, &loc);
        let start = u64::from(loc.offset);
        let last = group.last().map_or(loc, |(_, l)| *l);
        let end = u64::from(last.offset) + u64::from(last.len);
        let name = pack::object_name(&self.index.pack(&loc).id);
        let bytes = self.repo.backend().get_range(&name, start, end - start)?;
        {
            let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            st.fetches += 1;
            st.bytes_fetched += bytes.len() as u64;
        }
        let mut wanted = None;
        for (e, l) in std::iter::once((self.list.extents()[i], loc)).chain(group) {
            let Some(cid) = e.chunk else { continue };
            let s = (u64::from(l.offset) - start) as usize;
            // Short: an empty slice, which `open_extent` rejects as a
            // truncated pack (EIO), never zeros.
            let sealed = bytes.get(s..s + l.len as usize).unwrap_or(&[]);
            let r = self.repo.open_extent(&self.index, &e, &l, sealed);
            match r {
                Ok(d) => {
                    let d = Arc::new(d);
                    if cid == *id {
                        wanted = Some(d.clone());
                    }
                    self.cache
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .put(cid, d);
                }
                // Read-ahead chunks that fail are simply not cached; the
                // read that wants one reports the damage.
                Err(err) if cid == *id => return Err(err),
                Err(_) => {}
            }
        }
        wanted.ok_or(Error::MissingChunk(*id))
    }

    fn cache_get(&self, id: &Id) -> Option<Arc<Vec<u8>>> {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let r = c.get(id);
        if r.is_some() {
            drop(c);
            self.stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .cache_hits += 1;
        }
        r
    }

    /// The extents after `i` whose chunks follow `loc` directly in its pack.
    fn read_ahead_group(&self, i: usize, loc: &Loc) -> Vec<(Extent, Loc)> {
        let mut out = Vec::new();
        let mut next_off = u64::from(loc.offset) + u64::from(loc.len);
        let start = u64::from(loc.offset);
        for e in self.list.extents().iter().skip(i + 1) {
            let Some(cid) = e.chunk else { continue };
            let Some(l) = self.index.get(&cid) else { break };
            if l.pack != loc.pack || u64::from(l.offset) != next_off {
                break;
            }
            next_off += u64::from(l.len);
            if next_off - start > READ_AHEAD {
                break;
            }
            if self
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lru
                .contains(&cid)
            {
                break;
            }
            out.push((*e, l));
        }
        out
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
