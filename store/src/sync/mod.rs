//! Replication: a sync copies snapshots from one repository to another of
//! its family (a replica shares the master key, so chunks keep their ids
//! and their sealed bytes move as they are). It needs read access to the
//! source and write access to the destination and no key at all: what it
//! must know of a snapshot is in its sync record and the index frames
//! (`docs/format.md`, "Replication").
//!
//! A run is a [`SyncPlan`] (which snapshots, which packs are missing at the
//! destination; all a dry run does) carried out snapshot by snapshot, each
//! in the order that makes it complete or absent: packs (each checked
//! against its SHA-256 on arrival), an index object for the packs the
//! destination has not indexed, chunk lists, the sync record, the manifest
//! last. A run killed at any point leaves at most packs and metadata no
//! manifest names; the next run copies only what is missing. Against a GC
//! at the destination the sync writes a session marker before it looks
//! (`docs/gc.md`, rule 3) and never relies on a pack condemned there.

mod copy;
mod plan;
pub mod retain;
mod select;

use serde::Serialize;

pub use copy::Progress;
pub use plan::{SnapshotPlan, SyncPlan};
pub use select::Filters;

use crate::backend::Backend;
use crate::error::Result;
use crate::format::id::Id;

#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    pub filters: Filters,
    /// Also delete destination snapshots (of the selected groups) that the
    /// source no longer has.
    pub remove_vanished: bool,
    /// Copy at most this many MiB per second (packs and metadata).
    pub rate_mib_per_sec: Option<f64>,
    /// Pack copies in flight at once (0: [`default_parallel`]).
    pub parallel: usize,
    pub dry_run: bool,
    /// The destination's retention (local time): copy only the snapshots
    /// it keeps, counted with those the destination has (the rest count as
    /// skipped).
    pub keep: Option<crate::maintain::retention::KeepOptions>,
}

/// What a run did (or, dry, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncReport {
    pub dry_run: bool,
    /// Snapshots the filters select at the source.
    pub snapshots_selected: usize,
    pub snapshots_copied: usize,
    /// Selected, but at the destination already (or, with `keep`, not
    /// kept by the destination's retention).
    pub snapshots_skipped: usize,
    /// Selected, but gone at the source before they were copied (pruned
    /// meanwhile), or made before sync records existed.
    pub snapshots_unavailable: usize,
    pub snapshots_failed: Vec<Failure>,
    /// Deleted at the destination by `--remove-vanished`.
    pub snapshots_removed: usize,
    pub packs_copied: usize,
    pub chunks_copied: u64,
    /// Every byte written to the destination (packs and metadata).
    pub bytes_copied: u64,
    pub seconds: f64,
}

/// A snapshot that could not be copied, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub snapshot: Id,
    pub source: String,
    pub error: String,
}

/// Pack copies in flight by default: each is a whole-object read and a
/// whole-object write, so as many as either side allows.
pub fn default_parallel(src: &dyn Backend, dst: &dyn Backend) -> usize {
    dst.upload_concurrency().max(src.read_concurrency())
}

/// Syncs `src` into `dst` (plans, then unless `dry_run` copies).
pub fn run(
    src: &dyn Backend,
    dst: &dyn Backend,
    opts: &SyncOptions,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    let started = std::time::Instant::now();
    // Before looking at the destination (docs/gc.md, rule 3).
    let _marker = if opts.dry_run {
        None
    } else {
        Some(crate::repo::markers::Session::begin(dst)?)
    };
    let plan = SyncPlan::compute(src, dst, opts)?;
    progress.planned(&plan);
    let mut report = if opts.dry_run {
        plan.report(true)
    } else {
        plan.execute(src, dst, opts, progress)?
    };
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
