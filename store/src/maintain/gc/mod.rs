//! Garbage collection: condemn unreferenced packs now, delete them in a
//! later run once no backup can have reused them. The invariant and why it
//! holds are in `docs/gc.md`; the rule numbers below refer to it.
//!
//! A run is a [`GcPlan`] computed from the repository ([`plan`]: changes
//! nothing, and is all a dry run does) and then carried out ([`execute`]),
//! under the lock that keeps GCs one at a time ([`lock`]).

mod compact;
mod execute;
mod lock;
mod packs;
mod plan;
mod table;

use chrono::Duration;
use serde::Serialize;

use crate::error::Result;
pub use crate::repo::condemned::SKEW_MARGIN;
use crate::repo::Repository;
pub use compact::Compaction;
pub use plan::{Action, GcPlan, PackAction};

#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Time between condemning a pack and deleting it.
    pub grace: Duration,
    /// Packs whose live chunks are less than this fraction of their chunk
    /// bytes are repacked (1.0: any pack holding garbage; 0.0: never).
    pub repack_below: f64,
    /// Compute and report only; change nothing.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::hours(24),
            repack_below: 0.5,
            dry_run: false,
        }
    }
}

/// What a run found and did (or would do, in a dry run).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub snapshots: usize,
    pub live_chunks: usize,
    /// Packs in the repository when the run started.
    pub packs: usize,
    pub bytes: u64,
    /// Deleted now (condemned by an earlier run, grace passed, unused).
    pub packs_deleted: usize,
    pub bytes_deleted: u64,
    /// Condemned now, to be deleted by a run after the grace period.
    pub packs_condemned: usize,
    pub bytes_condemned: u64,
    /// Of those, packs whose live chunks were first copied to new packs.
    pub packs_repacked: usize,
    pub bytes_repacked: u64,
    /// Condemned earlier but used by a backup since: kept.
    pub packs_resurrected: usize,
    /// Condemned earlier, not deletable yet (grace or backups in flight).
    pub packs_waiting: usize,
    /// Backups in flight that hold deletions back.
    pub sessions_in_flight: Vec<String>,
    pub index_objects_rewritten: usize,
    /// Small index objects merged into fewer large ones.
    pub compaction: Compaction,
    /// Locked repositories: removed versions deleted and held
    /// ([`crate::maintain::lock`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock: Option<crate::maintain::lock::Reclaim>,
    pub seconds: f64,
}

/// Runs one GC: plans it, and unless `opts.dry_run` carries it out.
/// `progress` gets a line per step.
pub fn run(repo: &Repository, opts: &GcOptions, progress: &dyn Fn(&str)) -> Result<GcReport> {
    let started = std::time::Instant::now();
    // Before planning: a plan made beside another GC's run is stale.
    let _lock = if opts.dry_run {
        None
    } else {
        Some(lock::GcLock::acquire(repo)?)
    };
    let plan = GcPlan::compute(repo, opts, progress)?;
    let mut report = if opts.dry_run {
        plan.report().clone()
    } else {
        let mut report = plan.execute(repo, progress)?;
        progress("compacting the index");
        report.compaction = compact::run(repo)?;
        report
    };
    report.lock = reclaim_locked(repo, opts.dry_run)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Merges the small index objects into fewer large ones (what every `gc`
/// does after its sweep), under the GC lock.
pub fn compact_index(repo: &Repository) -> Result<Compaction> {
    let _lock = lock::GcLock::acquire(repo)?;
    let done = compact::run(repo)?;
    repo.invalidate_index();
    Ok(done)
}

/// In a locked repository, what was removed leaves only once its lock
/// runs out.
fn reclaim_locked(
    repo: &Repository,
    dry_run: bool,
) -> Result<Option<crate::maintain::lock::Reclaim>> {
    match repo.config().object_lock {
        Some(_) => Ok(Some(crate::maintain::lock::reclaim(repo, dry_run)?)),
        None => Ok(None),
    }
}
