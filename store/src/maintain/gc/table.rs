//! The mark phase's memory: every copy of every chunk the index lists, as
//! (chunk, pack, length) in one array sorted by chunk id, and one mark bit
//! per entry. 40 bytes and a bit a copy, where a hash set of live ids,
//! every index object's blob lists and a map of each chunk's copies took
//! about 400 bytes a chunk. Chunk lists are read one at a time and only
//! set bits here, so the live set never exists as a list.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::format::id::Id;

/// One copy of a chunk: in pack `pack` (a position in
/// [`super::packs::Packs`]), `len` bytes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    pub id: Id,
    pub pack: u32,
    pub len: u32,
}

#[derive(Default)]
pub(super) struct ChunkTable {
    /// Sorted by id once [`ChunkTable::seal`]ed; a chunk's copies adjoin.
    entries: Vec<Held>,
    /// Set on the first entry of a live chunk's copies.
    marks: Vec<AtomicU64>,
    /// Where the ids whose first `bits` bits are `p` begin: `dir[p]` (and
    /// end: `dir[p + 1]`). Ids are uniform, so a lookup bisects a few
    /// entries, not the whole table (one cache miss instead of twenty).
    dir: Vec<u32>,
    bits: u32,
    /// Marks asked for chunks the table does not hold.
    unindexed: AtomicUsize,
}

impl ChunkTable {
    /// Room for `n` copies (a hint: if it cannot be had, the table grows).
    pub fn reserve(&mut self, n: usize) {
        if self.entries.try_reserve_exact(n).is_err() {
            tracing::debug!("gc: no room for {n} chunks up front");
        }
    }

    pub fn add(&mut self, held: Held) {
        self.entries.push(held);
    }

    /// Sorts the copies by chunk id; marking may begin.
    pub fn seal(&mut self) {
        self.entries.sort_unstable_by(|a, b| a.id.fast_cmp(&b.id));
        self.entries.shrink_to_fit();
        let n = self.entries.len();
        // About four entries a prefix.
        self.bits = (usize::BITS - (n / 4).leading_zeros()).min(28);
        self.dir = Vec::with_capacity((1 << self.bits) + 1);
        let mut i = 0;
        for p in 0..1usize << self.bits {
            while i < n && self.prefix(&self.entries[i].id) < p {
                i += 1;
            }
            self.dir.push(i as u32);
        }
        self.dir.push(n as u32);
        self.marks = (0..self.entries.len().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
    }

    /// Marks `id` live (from any thread). A chunk the index does not know
    /// is counted: a snapshot that needs one is damaged, and no pack can
    /// be kept for it.
    pub fn mark(&self, id: &Id) {
        match self.first(id) {
            Some(i) => {
                self.marks[i / 64].fetch_or(1 << (i % 64), Ordering::Relaxed);
            }
            None => {
                self.unindexed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn is_live(&self, id: &Id) -> bool {
        self.first(id).is_some_and(|i| self.marked(i))
    }

    /// Distinct live chunks the index holds.
    pub fn live_count(&self) -> usize {
        self.marks
            .iter()
            .map(|m| m.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }

    /// References to chunks no index object lists (see [`Self::mark`]).
    pub fn unindexed(&self) -> usize {
        self.unindexed.load(Ordering::Relaxed)
    }

    /// Each chunk once, with whether it is live and its copies.
    pub fn chunks(&self) -> impl Iterator<Item = (bool, &[Held])> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let first = self.entries.get(at)?;
            let n = self.entries[at..]
                .iter()
                .take_while(|e| e.id == first.id)
                .count();
            let run = (self.marked(at), &self.entries[at..at + n]);
            at += n;
            Some(run)
        })
    }

    /// The position of `id`'s first copy.
    fn first(&self, id: &Id) -> Option<usize> {
        let p = self.prefix(id);
        let (lo, hi) = (*self.dir.get(p)? as usize, *self.dir.get(p + 1)? as usize);
        let i = lo
            + self.entries[lo..hi]
                .partition_point(|e| e.id.fast_cmp(id) == std::cmp::Ordering::Less);
        (self.entries.get(i)?.id == *id).then_some(i)
    }

    fn prefix(&self, id: &Id) -> usize {
        id.head().checked_shr(64 - self.bits).unwrap_or(0) as usize
    }

    fn marked(&self, i: usize) -> bool {
        self.marks[i / 64].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_find_every_copy_once() {
        let (a, b, c) = (Id([1; 32]), Id([2; 32]), Id([3; 32]));
        let mut t = ChunkTable::default();
        for (id, pack) in [(b, 0), (a, 1), (b, 2), (c, 0)] {
            t.add(Held { id, pack, len: 10 });
        }
        t.seal();
        t.mark(&b);
        t.mark(&b);
        t.mark(&Id([9; 32]));
        assert!(t.is_live(&b) && !t.is_live(&a) && !t.is_live(&c));
        assert_eq!((t.live_count(), t.unindexed()), (1, 1));
        let runs: Vec<(bool, Vec<u32>)> = t
            .chunks()
            .map(|(live, h)| (live, h.iter().map(|h| h.pack).collect()))
            .collect();
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0], (false, vec![1]));
        assert!(runs[1].0);
        assert_eq!(
            runs[1]
                .1
                .iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            [0, 2].into()
        );
    }
}
