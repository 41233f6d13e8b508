//! How long a guest waits for the repository: each read that was not
//! already in the cache is a *demand miss*, and the time it took is
//! *stall*. Under TCG the guest's CPU hides most waiting in a boot's wall
//! time; these counters show it whatever the CPU (`restore status`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Default)]
pub struct DemandStats {
    misses: AtomicU64,
    stall_micros: AtomicU64,
}

impl DemandStats {
    pub fn miss(&self, waited: Duration) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.stall_micros
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    pub fn stall(&self) -> Duration {
        Duration::from_micros(self.stall_micros.load(Ordering::Relaxed))
    }
}

/// What `bulwark-nbd serve --stats FILE` writes (every second, when a
/// backfill ends, and at exit).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServeStats {
    /// A boot set was given and queued first.
    pub boot_set: bool,
    /// Bytes of it queued (chunks, so a little more than its ranges).
    pub boot_set_bytes: u64,
    /// Bytes of it the readers took from its pack ranges, fetched while
    /// the disks opened (a boot set recorded with where its data lies).
    #[serde(default)]
    pub boot_set_ahead_bytes: u64,
    pub demand_misses: u64,
    pub stall_seconds: f64,
    pub bytes_fetched: u64,
    pub bytes_served: u64,
    /// Read from the files the backfill had written by then (besides
    /// `bytes_served`, which the repository's readers served).
    #[serde(default)]
    pub bytes_from_backfill: u64,
    /// Each disk's backfill (`--backfill`), when there is one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backfill: Vec<crate::backfill::Progress>,
}
