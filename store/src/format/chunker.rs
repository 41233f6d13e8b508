//! Content-defined chunking: FastCDC 2020 with a gear table keyed by the
//! repository secret.
//!
//! Cut points depend only on the bytes since the previous cut, so a change
//! in one place moves at most the chunks around it: the property the
//! incremental backup relies on to resynchronise with the parent snapshot.

use fastcdc::v2020::{cut_gear, get_gear_with_seed, select_masks, Normalization};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Chunk size bounds, fixed when the repository is created (they decide
/// where cut points fall, so every writer must agree on them).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkerParams {
    /// 256 KiB / 1 MiB / 4 MiB: large enough that per-chunk costs (index
    /// entries, S3 range reads) stay small, small enough for good dedup of
    /// block-level changes.
    fn default() -> Self {
        ChunkerParams {
            min: 256 * 1024,
            avg: 1024 * 1024,
            max: 4 * 1024 * 1024,
        }
    }
}

impl ChunkerParams {
    pub fn validate(&self) -> Result<(), String> {
        let ok = self.min >= 64
            && self.min < self.avg
            && self.avg < self.max
            && self.max <= 16 * 1024 * 1024
            && self.min.is_multiple_of(2)
            && self.avg.is_multiple_of(2)
            && self.max.is_multiple_of(2);
        if ok {
            Ok(())
        } else {
            Err(format!("bad chunker parameters {self:?}"))
        }
    }
}

#[derive(Clone)]
pub struct Chunker {
    p: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    gear: Cow<'static, [u64]>,
    gear_ls: Cow<'static, [u64]>,
}

impl Chunker {
    pub fn new(p: ChunkerParams, seed: u64) -> Self {
        let (mask_s, mask_l) = select_masks(p.avg as usize, Normalization::Level1);
        let (gear, gear_ls) = get_gear_with_seed(seed);
        Chunker {
            p,
            mask_s,
            mask_l,
            gear,
            gear_ls,
        }
    }

    pub fn params(&self) -> ChunkerParams {
        self.p
    }

    /// Length of the chunk that starts at `data[0]`, or `None` if that
    /// cannot be known without more data. `at_end` says `data` runs to the
    /// end of the segment. A cut found inside `data` never moves when more
    /// data follows (it depends only on bytes before it), so callers can
    /// read in small steps and stop right after the cut.
    pub fn next_cut(&self, data: &[u8], at_end: bool) -> Option<usize> {
        if data.is_empty() {
            return None;
        }
        let (_, n) = cut_gear(
            data,
            self.p.min as usize,
            self.p.avg as usize,
            self.p.max as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        let n = n.max(1);
        if n == data.len() && !at_end && data.len() < self.p.max as usize {
            return None;
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn cuts(c: &Chunker, data: &[u8]) -> Vec<usize> {
        let mut out = vec![];
        let mut pos = 0;
        while pos < data.len() {
            let n = c.next_cut(&data[pos..], true).unwrap();
            pos += n;
            out.push(pos);
        }
        out
    }

    #[test]
    fn small_steps_find_the_same_cuts() {
        let p = ChunkerParams {
            min: 1024,
            avg: 4096,
            max: 16384,
        };
        let c = Chunker::new(p, 9);
        let mut data = vec![0u8; 1 << 20];
        rand::rngs::StdRng::seed_from_u64(2).fill_bytes(&mut data);
        let whole = cuts(&c, &data);
        let mut stepped = vec![];
        let mut pos = 0;
        while pos < data.len() {
            let mut avail = 100;
            let n = loop {
                let end = (pos + avail).min(data.len());
                if let Some(n) = c.next_cut(&data[pos..end], end == data.len()) {
                    break n;
                }
                avail += 100;
            };
            pos += n;
            stepped.push(pos);
        }
        assert_eq!(whole, stepped);
    }

    #[test]
    fn sizes_within_bounds_and_resync() {
        let p = ChunkerParams {
            min: 16 * 1024,
            avg: 64 * 1024,
            max: 256 * 1024,
        };
        let c = Chunker::new(p, 42);
        let mut data = vec![0u8; 8 << 20];
        rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut data);
        let a = cuts(&c, &data);
        let mut prev = 0;
        for &x in &a[..a.len() - 1] {
            assert!(x - prev >= p.min as usize && x - prev <= p.max as usize);
            prev = x;
        }
        // Change 100 bytes in the middle: cut points far after it are unchanged.
        data[4 << 20..(4 << 20) + 100].fill(7);
        let b = cuts(&c, &data);
        let tail_a: Vec<_> = a.iter().filter(|&&x| x > (5 << 20)).collect();
        let tail_b: Vec<_> = b.iter().filter(|&&x| x > (5 << 20)).collect();
        assert_eq!(tail_a, tail_b);
        // Another seed gives other cut points.
        let other = cuts(&Chunker::new(p, 43), &data);
        assert_ne!(other, b);
    }
}
