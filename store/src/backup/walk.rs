//! The disk walk: a source and its dirty map turned into pieces in disk
//! order: bytes to chunk, zeros, and runs of the parent's extents taken
//! unread. An iterator with no threads, so the incremental rule is tested
//! piece by piece; the pipeline hands its pieces to the workers.
//!
//! The incremental rule: ranges outside `dirty` are the parent's extents.
//! Each dirty range is re-chunked from the parent boundary at or before its
//! start until a new cut point lands on a parent boundary past its end;
//! from there the cut points (which depend only on content) would repeat
//! the parent's, so its extents are taken again. A change inside a parent
//! zero extent starts its region at the change itself (the zeros before it
//! need no reading), so its chunks may be cut unlike a full walk's: the
//! same bytes, other boundaries.

use std::collections::VecDeque;

use crate::backup::source::BlockSource;
use crate::error::{Error, Result};
use crate::format::chunker::Chunker;
use crate::format::chunklist::{ChunkList, Extent};
use crate::format::extent::{DataExtent, Span};

/// Source read granularity while looking for a cut point in an
/// incremental: small, so it reads little past the point where it meets
/// the parent's chunking again.
const READ_STEP: usize = 256 * 1024;
/// Parent extents handed out in one [`Piece::Reuse`] at most.
const REUSE_BATCH: usize = 1024;

/// One step of the walk's output, in disk order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// One chunk's bytes (hashed, and stored if new).
    Data(Vec<u8>),
    /// This many bytes read as zeros: no chunk, and restores stay sparse.
    Zero(u64),
    /// The parent's extents, unchanged since it was taken.
    Reuse(Vec<Extent>),
}

/// The walk over one disk; see the module docs.
pub struct Walk<'a> {
    src: &'a mut dyn BlockSource,
    parent: Option<&'a ChunkList>,
    /// Sorted, merged, clipped to the disk.
    dirty: Vec<Span>,
    chunker: &'a Chunker,
    /// Bytes read per step while looking for a cut point.
    step: usize,
    alloc: AllocMap,
    size: u64,
    /// Everything before this has been handed out.
    pos: u64,
    /// The first dirty range no region has taken in yet.
    di: usize,
    /// The dirty region being re-chunked, if any.
    region: Option<Region>,
    out: VecDeque<Piece>,
    bytes_read: u64,
    done: bool,
}

/// A stretch being re-chunked: it goes on at least to `need` (the end of
/// the dirty ranges it took in), then to the next parent boundary.
struct Region {
    need: u64,
    /// Source bytes `[pos, pos + buf.len())`, read but not handed out.
    buf: Vec<u8>,
}

impl<'a> Walk<'a> {
    /// A walk of everything (`parent` None: `dirty` should cover the disk)
    /// or of the changes since `parent`.
    pub fn new(
        src: &'a mut dyn BlockSource,
        chunker: &'a Chunker,
        parent: Option<&'a ChunkList>,
        dirty: &[Span],
    ) -> Self {
        let size = src.size();
        let params = chunker.params();
        Walk {
            dirty: normalize(dirty, size),
            parent,
            chunker,
            // Each `next_cut` call scans from the chunk start, so small steps
            // cost CDC time; they only pay off in incrementals.
            step: if parent.is_some() {
                READ_STEP
            } else {
                params.max as usize
            },
            alloc: AllocMap {
                extents: Vec::new(),
                // Small holes count as data so they do not shred chunks.
                min_hole: u64::from(params.min),
            },
            size,
            pos: 0,
            di: 0,
            region: None,
            out: VecDeque::new(),
            bytes_read: 0,
            done: false,
            src,
        }
    }

    /// Source bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// One step: a batch of parent extents, the start of a region, or one
    /// chunk (or zero run) of the region being re-chunked.
    fn advance(&mut self) -> Result<()> {
        if let Some(mut r) = self.region.take() {
            if self.chunk_step(&mut r)? {
                self.region = Some(r);
            }
            return Ok(());
        }
        if self.pos >= self.size {
            self.done = true;
            return Ok(());
        }
        let Some(d) = self.dirty.get(self.di).copied() else {
            // No change left: the rest is the parent's.
            if !self.reuse_until(self.size) {
                self.done = true;
            }
            return Ok(());
        };
        // The region starts at the parent boundary at or before the change.
        let at = self
            .parent
            .and_then(|p| p.find(d.offset).map(|i| p.extents()[i]));
        if let Some(e) = at {
            if self.reuse_until(e.offset.max(self.pos)) {
                return Ok(());
            }
        }
        self.di += 1;
        if let Some(e) = at.filter(|e| e.chunk.is_none() && d.offset > self.pos) {
            // Unchanged zeros before the change need no reading.
            debug_assert!(e.offset <= self.pos);
            self.emit_zero(d.offset - self.pos);
        }
        self.region = Some(Region {
            need: d.end(),
            buf: self.chunk_buffer(),
        });
        Ok(())
    }

    /// Hands out up to [`REUSE_BATCH`] parent extents that start before
    /// `to`; false when there were none.
    fn reuse_until(&mut self, to: u64) -> bool {
        let Some(p) = self.parent.filter(|_| self.pos < to) else {
            return false;
        };
        let Some(i) = p.find(self.pos) else {
            return false;
        };
        let batch: Vec<Extent> = p.extents()[i..]
            .iter()
            .take_while(|e| e.offset < to)
            .take(REUSE_BATCH)
            .copied()
            .collect();
        let Some(last) = batch.last() else {
            return false;
        };
        self.pos = last.end();
        self.out.push_back(Piece::Reuse(batch));
        true
    }

    fn emit_zero(&mut self, len: u64) {
        self.pos += len;
        self.out.push_back(Piece::Zero(len));
    }

    /// Hands out the next chunk or zero run of region `r`; false when the
    /// region ends.
    fn chunk_step(&mut self, r: &mut Region) -> Result<bool> {
        let ext = self.alloc.at(self.src, self.pos)?;
        let ext_end = (ext.offset + ext.len).min(self.size);
        if ext.data {
            self.next_piece(&mut r.buf, ext_end)?;
        } else {
            r.buf.clear();
            self.emit_zero(ext_end - self.pos);
        }
        // Changes that start inside what was just handed out join the region.
        while let Some(d) = self.dirty.get(self.di).filter(|d| d.offset < self.pos) {
            r.need = r.need.max(d.end());
            self.di += 1;
        }
        Ok(!self.region_ends(r.need))
    }

    /// Whether the region ends at `pos`: the disk's end, or past `need` on
    /// a parent boundary (or inside a parent zero extent, handed out here).
    fn region_ends(&mut self, need: u64) -> bool {
        if self.pos >= self.size {
            return true;
        }
        let Some(p) = self.parent.filter(|_| self.pos >= need) else {
            return false;
        };
        if p.is_boundary(self.pos) {
            return true;
        }
        match p.find(self.pos).map(|i| p.extents()[i]) {
            // Merged runs of zeros keep no inner boundaries: the rest of it up
            // to the next change is still zeros, so stop reading here.
            Some(e) if e.chunk.is_none() => {
                let next = self.dirty.get(self.di).map_or(u64::MAX, |d| d.offset);
                self.emit_zero(e.end().min(next) - self.pos);
                true
            }
            _ => false,
        }
    }

    /// In a data extent ending at `ext_end`: hands out a run of zeros, or
    /// one chunk cut by the chunker.
    fn next_piece(&mut self, buf: &mut Vec<u8>, ext_end: u64) -> Result<()> {
        let params = self.chunker.params();
        let (min, max) = (params.min as usize, params.max as usize);
        // A run of at least `min` zeros where a piece starts is a zero
        // extent: no chunk, and the restore stays sparse.
        let mut run = 0usize;
        while leading_zeros(buf) == buf.len() && self.pos + (buf.len() as u64) < ext_end {
            if buf.len() >= max {
                run += buf.len();
                self.emit_zero(buf.len() as u64);
                buf.clear();
            } else if !self.fill(buf, ext_end)? {
                break;
            }
        }
        let z = leading_zeros(buf);
        let at_end = self.pos + z as u64 == ext_end;
        if z > 0 && (run + z >= min || (z == buf.len() && at_end)) {
            self.emit_zero(z as u64);
            buf.drain(..z);
            return Ok(());
        }
        if buf.is_empty() && self.pos >= ext_end {
            return Ok(());
        }
        let cut = loop {
            let at_end = self.pos + buf.len() as u64 == ext_end;
            if let Some(n) = self.chunker.next_cut(buf, at_end) {
                break n;
            }
            if !self.fill(buf, ext_end)? {
                break buf.len(); // cannot happen: next_cut answers at max or at the end
            }
        };
        // Never swallow a long zero run: end the chunk where it starts.
        let cut = zero_run_cut(buf, cut, self.pos, min);
        // Bytes read past the cut begin the next chunk.
        self.pos += cut as u64;
        let mut rest = self.chunk_buffer();
        rest.extend_from_slice(&buf[cut..]);
        let mut chunk = std::mem::replace(buf, rest);
        chunk.truncate(cut);
        // A chunk in flight holds only its bytes (shrinking is in place).
        chunk.shrink_to_fit();
        self.out.push_back(Piece::Data(chunk));
        Ok(())
    }

    /// An empty buffer for the chunk starting at `pos`: room for a maximal
    /// chunk, or for what is left of the source when that is less. A file
    /// backup walks one small file after another, and a buffer of the
    /// maximum for each (4 MiB) made its memory follow the files' count.
    fn chunk_buffer(&self) -> Vec<u8> {
        let max = self.chunker.params().max as u64;
        Vec::with_capacity(max.min(self.size.saturating_sub(self.pos)) as usize)
    }

    /// Reads up to one step more into `buf` (at most a maximal chunk in
    /// all, never past `ext_end`); false when there is nothing to read.
    fn fill(&mut self, buf: &mut Vec<u8>, ext_end: u64) -> Result<bool> {
        let max = self.chunker.params().max as usize;
        let left = (ext_end - self.pos) as usize;
        let want = (buf.len() + self.step).min(max).min(left);
        let old = buf.len();
        if want <= old {
            return Ok(false);
        }
        buf.resize(want, 0);
        self.src.read_at(self.pos + old as u64, &mut buf[old..])?;
        self.bytes_read += (want - old) as u64;
        Ok(true)
    }
}

impl super::pipeline::Pieces for Walk<'_> {
    fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}

impl Iterator for Walk<'_> {
    type Item = Result<Piece>;

    fn next(&mut self) -> Option<Result<Piece>> {
        loop {
            if let Some(p) = self.out.pop_front() {
                return Some(Ok(p));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.advance() {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
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

/// Source allocation, queried in windows and cached; holes shorter than
/// `min_hole` count as data.
struct AllocMap {
    extents: Vec<DataExtent>,
    min_hole: u64,
}

impl AllocMap {
    const WINDOW: u64 = 1 << 30;
    const MAX_CACHED: usize = 1 << 16;

    /// The extent containing `pos`, merged with neighbours of the same kind.
    fn at(&mut self, src: &mut dyn BlockSource, pos: u64) -> Result<DataExtent> {
        let covered = self.extents.first().is_some_and(|f| f.offset <= pos)
            && self.extents.last().is_some_and(|l| l.offset + l.len > pos);
        if !covered {
            self.query(src, pos)?;
        }
        let i = self.extents.partition_point(|e| e.offset + e.len <= pos);
        self.extents
            .get(i)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("source reported no extent at offset {pos}")))
    }

    /// Refills the cache from `pos`. Keeps querying while the last extent
    /// runs into the window edge, so an extent's end is real and cut points
    /// do not depend on where a window happened to start.
    fn query(&mut self, src: &mut dyn BlockSource, pos: u64) -> Result<()> {
        let size = src.size();
        self.extents.clear();
        let mut q = pos;
        while q < size {
            let len = Self::WINDOW.min(size - q);
            let mut next = q;
            for mut e in src.extents(q, len)? {
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
                // The last extent may continue past `q`: drop it and query
                // again when the walk gets there.
                self.extents.pop();
                break;
            }
        }
        Ok(())
    }
}

pub(super) fn is_zero(b: &[u8]) -> bool {
    // SAFETY: any bytes are a valid u128; align_to handles the edges.
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::source::MemSource;
    use crate::format::chunker::ChunkerParams;
    use crate::format::crypto::{Keys, MasterKey};
    use rand::{RngCore, SeedableRng};

    const MIB: usize = 1 << 20;

    struct Fixture {
        keys: Keys,
        chunker: Chunker,
    }

    impl Fixture {
        fn new() -> Self {
            let keys = Keys::derive(&MasterKey::generate());
            let chunker = Chunker::new(ChunkerParams::default(), keys.cdc_seed());
            Fixture { keys, chunker }
        }

        /// The chunk list a walk makes (what the pipeline would make of it,
        /// ids by the repository's HMAC) and the bytes it read.
        fn walk(
            &self,
            src: &mut MemSource,
            parent: Option<&ChunkList>,
            dirty: &[Span],
        ) -> (ChunkList, u64) {
            let mut list = ChunkList::new();
            let mut walk = Walk::new(src, &self.chunker, parent, dirty);
            for piece in &mut walk {
                match piece.unwrap() {
                    Piece::Data(b) => list.push(b.len() as u64, Some(self.keys.chunk_id(&b))),
                    Piece::Zero(n) => list.push(n, None),
                    Piece::Reuse(v) => v.iter().for_each(|e| list.push(e.len, e.chunk)),
                }
            }
            let read = walk.bytes_read();
            (list, read)
        }

        fn full(&self, data: &[u8]) -> ChunkList {
            let mut src = MemSource::new(data.to_vec());
            let size = data.len() as u64;
            self.walk(&mut src, None, &[Span::new(0, size)]).0
        }
    }

    /// Random data with a few long zero runs.
    fn disk(len: usize, seed: u64) -> Vec<u8> {
        let mut d = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut d);
        for z in [3 * MIB..5 * MIB, 20 * MIB..20 * MIB + 700 * 1024] {
            if z.end <= len {
                d[z].fill(0);
            }
        }
        d
    }

    fn ids(l: &ChunkList) -> Vec<(u64, u64, Option<crate::format::id::Id>)> {
        l.extents()
            .iter()
            .map(|e| (e.offset, e.len, e.chunk))
            .collect()
    }

    #[test]
    fn a_full_walk_covers_the_disk_and_keeps_zero_runs_out_of_chunks() {
        let f = Fixture::new();
        let data = disk(32 * MIB, 1);
        let list = f.full(&data);
        assert_eq!(list.size(), data.len() as u64);
        // The 2 MiB zero run is a zero extent (at least `min` long).
        assert!(
            list.extents().iter().any(|e| e.chunk.is_none()
                && e.offset <= 3 * MIB as u64 + 4096
                && e.end() >= 5 * MIB as u64),
            "{:?}",
            ids(&list)
        );
        for e in list.extents() {
            let bytes = &data[e.offset as usize..e.end() as usize];
            match e.chunk {
                Some(id) => assert_eq!(id, f.keys.chunk_id(bytes)),
                None => assert!(is_zero(bytes)),
            }
        }
    }

    /// Every extent holds what `data` holds there.
    fn check_content(f: &Fixture, list: &ChunkList, data: &[u8]) {
        assert_eq!(list.size(), data.len() as u64);
        for e in list.extents() {
            let bytes = &data[e.offset as usize..e.end() as usize];
            match e.chunk {
                Some(id) => assert_eq!(id, f.keys.chunk_id(bytes), "at {}", e.offset),
                None => assert!(is_zero(bytes), "zero extent at {} is not", e.offset),
            }
        }
    }

    /// Applies `changes` (random bytes) to a copy of `old`; the incremental
    /// walk's list, the new data and the bytes it read.
    fn change(
        f: &Fixture,
        old: &[u8],
        parent: &ChunkList,
        changes: &[Span],
    ) -> (ChunkList, Vec<u8>, u64) {
        let mut new = old.to_vec();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for c in changes {
            rng.fill_bytes(&mut new[c.offset as usize..c.end() as usize]);
        }
        let mut src = MemSource::new(new.clone());
        let (inc, read) = f.walk(&mut src, Some(parent), changes);
        assert_eq!(read, src.bytes_read);
        let dirty: u64 = changes.iter().map(|c| c.len).sum();
        let bound = dirty + 2 * u64::from(f.chunker.params().max) * changes.len() as u64;
        assert!(
            read <= bound,
            "read {read} bytes for {dirty} dirty (bound {bound})"
        );
        check_content(f, &inc, &new);
        (inc, new, read)
    }

    #[test]
    fn an_incremental_cuts_where_a_full_walk_does_and_reads_little() {
        let f = Fixture::new();
        let old = disk(64 * MIB, 2);
        let parent = f.full(&old);
        // Small and large changes, adjacent ones, one at the very end.
        let changes = [
            Span::new(7 * MIB as u64 + 123, 4096),
            Span::new(7 * MIB as u64 + 8192, 4096),
            Span::new(30 * MIB as u64, 3 * MIB as u64),
            Span::new(64 * MIB as u64 - 10, 10),
        ];
        let (inc, new, _) = change(&f, &old, &parent, &changes);
        assert_eq!(
            ids(&inc),
            ids(&f.full(&new)),
            "the incremental differs from a full backup"
        );
    }

    #[test]
    fn a_change_inside_parent_zeros_reads_only_from_the_change() {
        let f = Fixture::new();
        let old = disk(16 * MIB, 5);
        let parent = f.full(&old);
        // Inside the 3-5 MiB zero run: the zeros before the change are not
        // read again (so its chunks may be cut unlike a full walk's: the same
        // bytes, other boundaries).
        let c = Span::new(4 * MIB as u64, 100);
        let (inc, _, read) = change(&f, &old, &parent, &[c]);
        assert!(read <= c.len + u64::from(f.chunker.params().max), "{read}");
        let zeros_before = inc
            .extents()
            .iter()
            .any(|e| e.chunk.is_none() && e.end() == c.offset);
        assert!(zeros_before, "{:?}", ids(&inc));
    }

    #[test]
    fn an_unchanged_disk_is_the_parent_unread() {
        let f = Fixture::new();
        let data = disk(16 * MIB, 3);
        let parent = f.full(&data);
        let mut src = MemSource::new(data);
        let (inc, read) = f.walk(&mut src, Some(&parent), &[]);
        assert_eq!(read, 0);
        assert_eq!(ids(&inc), ids(&parent));
    }

    #[test]
    fn holes_are_never_read() {
        let f = Fixture::new();
        let mut data = disk(16 * MIB, 4);
        data[8 * MIB..12 * MIB].fill(0);
        let mut src = MemSource::new(data.clone());
        src.holes = vec![Span::new(8 * MIB as u64, 4 * MIB as u64)];
        let (list, read) = f.walk(&mut src, None, &[Span::new(0, 16 * MIB as u64)]);
        assert_eq!(read, 12 * MIB as u64);
        assert_eq!(list.size(), 16 * MIB as u64);
    }

    #[test]
    fn dirty_ranges_are_merged_and_clipped() {
        let d = normalize(
            &[
                Span::new(10, 5),
                Span::new(0, 3),
                Span::new(12, 10),
                Span::new(90, 50),
                Span::new(200, 1),
                Span::new(5, 0),
            ],
            100,
        );
        assert_eq!(
            d,
            vec![Span::new(0, 3), Span::new(10, 12), Span::new(90, 10)]
        );
    }
}
