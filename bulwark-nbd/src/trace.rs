//! What a guest read from an export, in the order it first read it: the
//! *boot set* of a restore drill (the blocks a guest needs until it is up,
//! which a later live restore can fetch first), and the reads that failed,
//! so a failed boot names the damaged range rather than just timing out.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bulwark_store::read::reader::DiskReader;
use serde::{Deserialize, Serialize};

/// Granularity of the boot set: a read touches whole blocks of this size.
/// Coarse enough that the set stays small, fine next to 1 MiB chunks.
pub const BLOCK: u64 = 64 * 1024;
/// At most this many blocks (4 GiB) are recorded: a guest that reads its
/// whole disk in a loop must not grow the set without bound.
const MAX_BLOCKS: usize = 65_536;

/// A boot set's pack ranges are at most this long each (adjacent spans of
/// a pack together): small enough that the first, which the guest reads
/// first, land soon.
pub const PACK_RANGE_MAX: u64 = 1 << 20;

/// A read the export could not answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedRead {
    pub offset: u64,
    pub length: u64,
    pub error: String,
}

/// The blocks of one disk a guest read until it was up, in the order it
/// first read them (`[offset, length]` runs of [`BLOCK`]s): what a restore
/// drill reports, and what `bulwark-nbd serve --boot-set` fetches first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSet {
    pub disk: String,
    pub bytes: u64,
    pub ranges: Vec<[u64; 2]>,
    /// Where their data lay when recorded: pack ranges (pack id, start,
    /// length) in the order first needed, which a live restore's server
    /// fetches while its index loads (pack names need no key). A hint
    /// only: a range whose pack a GC swept since is skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<(String, u64, u64)>,
}

/// A file holding boot sets: a drill's report (or anything with its
/// `boot_set` field).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BootSetFile {
    pub boot_set: Vec<BootSet>,
    /// How long the guest's reads were recorded (a drill: until its checks
    /// passed); none: a whole boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

impl BootSetFile {
    /// Whether a recording of `seconds` saw less of the boot than this set
    /// did, and so should keep what this set holds that it did not read.
    pub fn outlasts(&self, seconds: f64) -> bool {
        self.seconds.is_none_or(|s| s > seconds)
    }
}

/// What a live restore's server records in the repository beside the
/// snapshot (`bulwark-nbd serve --record-boot-set`): the blocks its guest
/// read first, for the next live restore of the same VM to fetch first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BootSetReport {
    /// The VM (the snapshot's source).
    pub source: String,
    pub snapshot: String,
    /// Unix seconds when the recording ended.
    pub at: u64,
    /// How long the guest's reads were recorded.
    pub seconds: f64,
    pub boot_set: Vec<BootSet>,
}

impl BootSetReport {
    pub fn bytes(&self) -> u64 {
        self.boot_set.iter().map(|b| b.bytes).sum()
    }
}

/// One export's record of reads; shared by the export and its owner.
#[derive(Default)]
pub struct ReadTrace {
    stopped: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: HashSet<u64>,
    /// `(offset, length)` runs of newly touched blocks, in first-read order.
    ranges: Vec<(u64, u64)>,
    failed: Vec<FailedRead>,
}

impl Inner {
    /// Records the blocks of `[offset, offset + len)` not seen before;
    /// each extends the last run when it follows it.
    fn touch(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK;
        let last = offset.saturating_add(len - 1) / BLOCK;
        for b in first..=last {
            if self.seen.len() >= MAX_BLOCKS {
                break;
            }
            if !self.seen.insert(b) {
                continue;
            }
            let start = b * BLOCK;
            match self.ranges.last_mut() {
                Some((o, l)) if *o + *l == start => *l += BLOCK,
                _ => self.ranges.push((start, BLOCK)),
            }
        }
    }
}

impl ReadTrace {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A read of `[offset, offset + len)` was asked for. Blocks read before
    /// are not recorded again; new ones extend the last run when they
    /// follow it.
    pub fn read(&self, offset: u64, len: u64) {
        if self.stopped.load(Ordering::Relaxed) {
            return;
        }
        self.lock().touch(offset, len);
    }

    /// Once stopped: appends the blocks of `earlier` (a set recorded over
    /// more of the boot than this trace was) that this guest did not read,
    /// in `earlier`'s order. A live restore whose disks became local within
    /// a second of its start records only that second; without this, its
    /// short set would replace the fuller one for the next restore.
    pub fn carry(&self, earlier: &BootSet) {
        let mut inner = self.lock();
        for &[offset, len] in &earlier.ranges {
            inner.touch(offset, len);
        }
    }

    /// A read failed; kept whether or not recording has stopped (the
    /// first few only: one damaged chunk fails many reads).
    pub fn failed(&self, offset: u64, length: u64, error: String) {
        let mut inner = self.lock();
        if inner.failed.len() < 16 {
            inner.failed.push(FailedRead {
                offset,
                length,
                error,
            });
        }
    }

    /// Freezes the boot set: reads from now on are not part of it.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// The boot set of `disk` so far: block-aligned runs in first-read
    /// order.
    pub fn boot_set(&self, disk: &str) -> BootSet {
        let ranges: Vec<[u64; 2]> = self.lock().ranges.iter().map(|&(o, l)| [o, l]).collect();
        BootSet {
            disk: disk.to_string(),
            bytes: ranges.iter().map(|r| r[1]).sum(),
            ranges,
            packs: Vec::new(),
        }
    }

    /// [`Self::boot_set`] with where its data lies in `reader`'s snapshot
    /// (`packs`), for a later live restore to fetch before its index loads.
    pub fn boot_set_in(&self, disk: &str, reader: &DiskReader) -> BootSet {
        let mut b = self.boot_set(disk);
        let ranges: Vec<(u64, u64)> = b.ranges.iter().map(|r| (r[0], r[1])).collect();
        b.packs = reader
            .pack_ranges(&ranges, PACK_RANGE_MAX)
            .into_iter()
            .map(|(p, start, len)| (p.to_hex(), start, len))
            .collect();
        b
    }

    pub fn failed_reads(&self) -> Vec<FailedRead> {
        self.lock().failed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_new_blocks_in_first_read_order_and_merges_runs() {
        let t = ReadTrace::new();
        t.read(0, 512); // block 0
        t.read(BLOCK * 5 + 10, BLOCK); // blocks 5, 6
        t.read(100, 10); // block 0 again: nothing
        t.read(BLOCK * 7, 1); // block 7 follows the last run
        t.read(BLOCK, 1); // block 1: a new run after it
        let b = t.boot_set("vda");
        assert_eq!(
            b.ranges,
            vec![[0, BLOCK], [5 * BLOCK, 3 * BLOCK], [BLOCK, BLOCK]]
        );
        assert_eq!(b.bytes, 5 * BLOCK);
        t.stop();
        t.read(BLOCK * 20, 1);
        assert_eq!(t.boot_set("vda").ranges.len(), 3);
        t.failed(7, 8, "bad".into());
        assert_eq!(t.failed_reads()[0].offset, 7);
    }

    #[test]
    fn a_short_recording_keeps_what_a_longer_one_read_after_its_own() {
        let t = ReadTrace::new();
        t.read(BLOCK * 3, 1);
        t.read(0, 1);
        t.stop();
        let earlier = BootSet {
            disk: "vda".into(),
            bytes: 4 * BLOCK,
            ranges: vec![
                [0, BLOCK],
                [BLOCK * 8, 2 * BLOCK],
                [BLOCK * 3, BLOCK],
                [BLOCK, 1],
            ],
            packs: Vec::new(),
        };
        t.carry(&earlier);
        // Its own reads first; then the earlier set's blocks it lacked, in
        // their order.
        assert_eq!(
            t.boot_set("vda").ranges,
            vec![
                [3 * BLOCK, BLOCK],
                [0, BLOCK],
                [8 * BLOCK, 2 * BLOCK],
                [BLOCK, BLOCK]
            ]
        );
        // A recording over the window or longer replaces the set it had.
        let f = |seconds| BootSetFile {
            boot_set: vec![earlier.clone()],
            seconds,
        };
        assert!(f(Some(20.0)).outlasts(1.0));
        assert!(!f(Some(20.0)).outlasts(20.0));
        assert!(f(None).outlasts(120.0));
        let parsed: BootSetFile = serde_json::from_str(r#"{"boot_set": []}"#).unwrap();
        assert_eq!(parsed.seconds, None);
    }

    #[test]
    fn the_set_is_bounded() {
        let t = ReadTrace::new();
        t.read(0, BLOCK * (MAX_BLOCKS as u64 + 10));
        assert_eq!(t.boot_set("vda").bytes, BLOCK * MAX_BLOCKS as u64);
    }
}
