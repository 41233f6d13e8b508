//! Locked repositories (S3 Object Lock): how objects are locked, how locks
//! follow what retention keeps, what GC may delete under locks, and how a
//! repository is put back as of a time. The rules are in `docs/gc.md`
//! ("Locked repositories") and `docs/immutability.md`.
//!
//! * Every object is written locked until [`RetentionRule::until`]: at
//!   least the lock period, rounded up to a generation boundary, so what is
//!   written over one generation shares one date.
//! * [`extend`]: one pass locks every object kept snapshots need until the
//!   same date, a generation past the period ([`Pass::target`]), and
//!   records it ([`LEDGER`]); the next pass is due a generation later.
//! * Removing (prune, GC) writes delete markers: the object leaves the
//!   repository's view at once, its version stays. [`reclaim`] deletes a
//!   removed version once its lock has run out by the bucket's own clock,
//!   and never one that was overwritten (only an attack overwrites).
//! * [`recover_plan`] / [`recover`]: the view as of a time, from versions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::backend::{
    Backend, BackendError, LockMode, ObjectLock, ObjectVersion, Retention, RetentionRule,
};
use crate::error::{Error, Result};
use crate::format::id::{Id, IdSet};
use crate::format::layout;
use crate::format::object;
use crate::repo::Repository;

/// Records of finished lock-extension passes.
pub const LEDGER: &str = "locks/extended-";
const LEDGER_KIND: &str = "lock-pass";

/// Clock skew between a writer and the bucket that the lock estimates
/// allow for (as GC's rules do).
const SKEW: Duration = Duration::minutes(10);

/// Requests in flight while extending locks.
const THREADS: usize = 16;

/// A repository's lock settings, in its config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockSettings {
    pub mode: LockMode,
    /// Every object stays locked at least this long after it is written,
    /// and after every extension pass.
    pub period_secs: u64,
    /// Retain-until dates are multiples of this (a quarter of the period).
    pub generation_secs: u64,
}

impl LockSettings {
    /// Locks for `period` (at least 4 s), extended in generations of a
    /// quarter of it.
    pub fn new(mode: LockMode, period: std::time::Duration) -> std::result::Result<Self, String> {
        let period_secs = period.as_secs();
        if period_secs < 4 {
            return Err("a lock period of at least 4 s".into());
        }
        Ok(LockSettings {
            mode,
            period_secs,
            generation_secs: period_secs / 4,
        })
    }

    pub fn rule(&self) -> RetentionRule {
        RetentionRule {
            mode: self.mode,
            period: std::time::Duration::from_secs(self.period_secs),
            generation: std::time::Duration::from_secs(self.generation_secs),
        }
    }

    pub fn period(&self) -> Duration {
        Duration::seconds(self.period_secs as i64)
    }

    pub fn generation(&self) -> Duration {
        Duration::seconds(self.generation_secs as i64)
    }
}

impl std::fmt::Display for LockSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} for {} (extended in generations of {})",
            self.mode,
            human_secs(self.period_secs),
            human_secs(self.generation_secs)
        )
    }
}

fn human_secs(s: u64) -> String {
    match s {
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn object_lock(backend: &dyn Backend) -> Result<&dyn ObjectLock> {
    backend.object_lock().ok_or_else(|| {
        Error::Invalid(format!(
            "{} cannot lock objects: Object Lock needs an S3 bucket (a local directory can \
             promise no immutability, see docs/immutability.md)",
            backend.location()
        ))
    })
}

/// Refuses a store that cannot lock (before `repo init --object-lock`).
pub fn check_store(backend: &dyn Backend) -> Result<()> {
    if !object_lock(backend)?.lock_enabled()? {
        return Err(Error::Invalid(format!(
            "bucket of {} has no Object Lock: create a bucket with Object Lock enabled \
             (it cannot be turned on for a bucket later on every S3 store)",
            backend.location()
        )));
    }
    Ok(())
}

/// Locks what this process writes as the repository's settings say.
pub(crate) fn apply(backend: &dyn Backend, settings: Option<&LockSettings>) -> Result<()> {
    if let Some(s) = settings {
        object_lock(backend)?.lock_new_objects(Some(s.rule()));
    }
    Ok(())
}

/// The repository's lock, or an error saying it has none.
fn settings(repo: &Repository) -> Result<LockSettings> {
    repo.config().object_lock.ok_or_else(|| {
        Error::Invalid(format!(
            "the repository at {} is not locked (repo init --object-lock)",
            repo.backend().location()
        ))
    })
}

/// Versions by name, oldest first; and the newest time the bucket stamped
/// on any of them, with the instant the listing came back: the bucket's
/// clock, read without trusting ours.
struct Versions {
    by_name: BTreeMap<String, Vec<ObjectVersion>>,
    bucket_time: DateTime<Utc>,
    listed: Instant,
}

impl Versions {
    fn list(lock: &dyn ObjectLock) -> Result<Versions> {
        let all = lock.list_versions("")?;
        let listed = Instant::now();
        let bucket_time = all
            .iter()
            .map(|v| v.modified)
            .max()
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut by_name: BTreeMap<String, Vec<ObjectVersion>> = BTreeMap::new();
        for v in all {
            by_name.entry(v.name.clone()).or_default().push(v);
        }
        for vs in by_name.values_mut() {
            // Oldest first; at equal times (whole seconds) the latest last.
            vs.sort_by(|a, b| a.modified.cmp(&b.modified).then(a.latest.cmp(&b.latest)));
        }
        Ok(Versions {
            by_name,
            bucket_time,
            listed,
        })
    }

    /// A lower bound of the bucket's clock now.
    fn bucket_now(&self) -> DateTime<Utc> {
        let since = Duration::from_std(self.listed.elapsed()).unwrap_or(Duration::zero());
        self.bucket_time + since
    }
}

// ---- extension --------------------------------------------------------

/// A finished pass (sealed in [`LEDGER`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pass {
    pub started: DateTime<Utc>,
    /// Every object needed when the pass started is locked until then.
    pub target: DateTime<Utc>,
    pub objects: usize,
}

/// What [`extend`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExtendReport {
    /// Objects kept snapshots need.
    pub needed: usize,
    /// Versions whose lock was set to `target` now.
    pub extended: usize,
    /// Versions written recently enough to be locked past `target` already.
    pub already: usize,
    /// S3 requests: listing pages are counted as one per 1000 versions.
    pub requests: usize,
    pub target: Option<DateTime<Utc>>,
    pub seconds: f64,
}

/// The date a pass at `now` locks everything until: a whole generation past
/// the period, so the next pass is due a generation later.
pub fn target(s: &LockSettings, now: DateTime<Utc>) -> DateTime<Utc> {
    s.rule().until(now + s.generation())
}

/// The newest finished pass, if any.
pub fn last_pass(repo: &Repository) -> Result<Option<Pass>> {
    let mut best: Option<Pass> = None;
    for o in repo.backend().list(LEDGER)? {
        let bytes = match repo.backend().get(&o.name) {
            Ok(b) => b,
            Err(BackendError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let payload = object::open(repo.keys(), LEDGER_KIND, &o.name, &bytes)?;
        let p: Pass =
            serde_json::from_slice(&payload).map_err(|e| Error::corrupt(&o.name, e.to_string()))?;
        if best.as_ref().is_none_or(|b| p.target > b.target) {
            best = Some(p);
        }
    }
    Ok(best)
}

/// Every object the repository's snapshots need, by name: config, key
/// slots, index objects, manifests, their chunk lists and sync records,
/// and the packs the index reads their chunks from.
pub fn needed_objects(repo: &Repository) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    names.insert(layout::CONFIG.to_string());
    for prefix in [layout::KEYS, layout::INDEX] {
        names.extend(repo.backend().list(prefix)?.into_iter().map(|o| o.name));
    }
    let index = repo.index()?;
    let mut packs = IdSet::default();
    // A kept snapshot's sync record too: a replica is made from it.
    let records = crate::repo::sync_records::newest(repo.backend().as_ref())?;
    for snap in repo.snapshots()? {
        names.insert(layout::snapshot(&snap.id));
        if let Some(r) = records.get(&snap.id) {
            names.insert(r.clone());
        }
        for d in snap.chunk_lists() {
            names.insert(layout::chunk_list(&d.chunk_list));
            for c in repo
                .load_chunk_list(&d.chunk_list)?
                .extents()
                .iter()
                .filter_map(|e| e.chunk)
            {
                let loc = index.get(&c).ok_or(Error::MissingChunk(c))?;
                packs.insert(index.pack(&loc).id);
            }
        }
    }
    names.extend(packs.iter().map(layout::pack));
    Ok(names)
}

/// Locks every version of every needed object until [`target`] of now
/// (those written recently enough are locked past it already), then
/// records the pass. Pruned snapshots' objects are not needed and so not
/// extended.
pub fn extend(repo: &Repository, progress: &dyn Fn(&str)) -> Result<ExtendReport> {
    let started = Instant::now();
    let s = settings(repo)?;
    let lock = object_lock(repo.backend().as_ref())?;
    let now = Utc::now();
    progress("finding what kept snapshots need");
    let needed = needed_objects(repo)?;
    progress(&format!("extending the locks of {} objects", needed.len()));
    let mut report = extend_versions(lock, &s, &needed, now)?;
    record_pass(
        repo,
        &Pass {
            started: now,
            target: target(&s, now),
            objects: needed.len(),
        },
    )?;
    report.requests += 1;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The S3 side of a pass: one listing of every version, then one
/// `PutObjectRetention` per version of a needed name not locked past the
/// pass's date yet, [`THREADS`] at a time.
pub fn extend_versions(
    lock: &dyn ObjectLock,
    s: &LockSettings,
    needed: &BTreeSet<String>,
    now: DateTime<Utc>,
) -> Result<ExtendReport> {
    let started = Instant::now();
    let target = target(s, now);
    let versions = Versions::list(lock)?;
    let listed: usize = versions.by_name.values().map(Vec::len).sum();
    let mut report = ExtendReport {
        needed: needed.len(),
        target: Some(target),
        requests: listed.div_ceil(1000).max(1),
        ..Default::default()
    };
    let mut todo = Vec::new();
    for name in needed {
        // Every version: normally one; more only after an overwrite, and
        // then the original is what a recovery needs.
        let vs = versions.by_name.get(name).map(Vec::as_slice).unwrap_or(&[]);
        for v in vs.iter().filter(|v| !v.delete_marker) {
            if s.rule().until(v.modified - SKEW) >= target {
                report.already += 1;
            } else {
                todo.push((name.as_str(), v.version.as_str()));
            }
        }
    }
    let retention = Retention {
        mode: s.mode,
        until: target,
    };
    run_parallel(&todo, |(name, version)| {
        lock.set_retention(name, version, retention)
    })?;
    report.extended = todo.len();
    report.requests += todo.len();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn record_pass(repo: &Repository, p: &Pass) -> Result<()> {
    let json = serde_json::to_vec(p).expect("a pass serializes");
    let name = format!("{LEDGER}{}", Id::random());
    repo.backend().put(
        &name,
        &object::seal(&repo.keys().session(), LEDGER_KIND, &json),
    )?;
    Ok(())
}

/// `f` on every item from [`THREADS`] threads; the first error wins.
fn run_parallel<T: Sync>(
    items: &[T],
    f: impl Fn(&T) -> std::result::Result<(), BackendError> + Sync,
) -> Result<()> {
    crate::repo::for_each_parallel(items, THREADS, |it| Ok(f(it)?))
}

// ---- reclaim (GC) -----------------------------------------------------

/// What [`reclaim`] found and did: part of `gc --json` (`lock`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Reclaim {
    /// Removed versions deleted now (locks run out).
    pub versions_deleted: usize,
    pub bytes_deleted: u64,
    /// Delete markers removed with the last version under them.
    pub markers_removed: usize,
    /// Removed from the repository's view, still locked: held only by
    /// their locks.
    pub versions_held: usize,
    pub bytes_held_by_locks: u64,
    /// When the first of those locks runs out.
    pub next_expiry: Option<DateTime<Utc>>,
    /// Versions under a newer version of their name: only an attack (or a
    /// recovery) overwrites, so GC keeps them for the operator.
    pub versions_overwritten: usize,
}

/// Deletes the versions of removed objects whose locks have run out, by
/// the bucket's clock (so no delete it issues can be refused for a lock),
/// then the delete markers left with nothing under them. Current objects
/// and overwritten versions are never touched.
pub fn reclaim(repo: &Repository, dry_run: bool) -> Result<Reclaim> {
    let lock = object_lock(repo.backend().as_ref())?;
    let versions = Versions::list(lock)?;
    let mut r = Reclaim::default();
    let mut deletable = Vec::new();
    let mut markers = Vec::new();
    for (name, vs) in &versions.by_name {
        let removed = vs.last().is_some_and(|v| v.delete_marker);
        let objects: Vec<&ObjectVersion> = vs.iter().filter(|v| !v.delete_marker).collect();
        if !removed {
            r.versions_overwritten += objects.len().saturating_sub(1);
            continue;
        }
        let mut left = objects.len();
        for v in objects {
            let head = lock.head_version(name, Some(&v.version))?;
            match head.retention {
                Some(ret) if ret.until >= versions.bucket_now() => {
                    r.versions_held += 1;
                    r.bytes_held_by_locks += v.size;
                    r.next_expiry = Some(r.next_expiry.map_or(ret.until, |t| t.min(ret.until)));
                }
                _ => {
                    deletable.push((name.as_str(), v.version.as_str()));
                    r.versions_deleted += 1;
                    r.bytes_deleted += v.size;
                    left -= 1;
                }
            }
        }
        if left == 0 {
            markers.extend(
                vs.iter()
                    .filter(|v| v.delete_marker)
                    .map(|v| (name.as_str(), v.version.as_str())),
            );
        }
    }
    r.markers_removed = markers.len();
    if !dry_run {
        // Versions before their markers: a crash in between leaves
        // markers over nothing, which the next run removes.
        run_parallel(&deletable, |(n, v)| lock.delete_version(n, v))?;
        run_parallel(&markers, |(n, v)| lock.delete_version(n, v))?;
    }
    Ok(r)
}

// ---- recovery ---------------------------------------------------------

/// One step that puts a name back as it was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Step {
    /// Remove delete markers written after the time: `version` is current
    /// again.
    Unhide {
        name: String,
        version: String,
        markers: Vec<String>,
    },
    /// Overwritten since: a copy of `version` becomes current.
    Restore { name: String, version: String },
    /// Written (or brought back) since: hidden under a delete marker.
    Hide { name: String },
}

impl Step {
    pub fn name(&self) -> &str {
        match self {
            Step::Unhide { name, .. } | Step::Restore { name, .. } | Step::Hide { name } => name,
        }
    }
}

/// What it takes to make every name of the repository as it was at
/// `as_of`: delete markers written since removed, overwrites undone by
/// copies, objects written since hidden. Nothing is deleted but delete
/// markers, so nothing locked is touched.
pub fn recover_plan(backend: &dyn Backend, as_of: DateTime<Utc>) -> Result<Vec<Step>> {
    let versions = Versions::list(object_lock(backend)?)?;
    let mut steps = Vec::new();
    for (name, vs) in versions.by_name {
        let Some(current) = vs.last() else { continue };
        let then = vs.iter().rev().find(|v| v.modified <= as_of);
        match then {
            Some(t) if t.version == current.version => {}
            None
            | Some(ObjectVersion {
                delete_marker: true,
                ..
            }) => {
                if !current.delete_marker {
                    steps.push(Step::Hide { name });
                }
            }
            Some(t) => {
                let since: Vec<&ObjectVersion> = vs
                    .iter()
                    .filter(|v| v.modified > as_of || v.latest)
                    .collect();
                let since: Vec<&ObjectVersion> = since
                    .into_iter()
                    .filter(|v| v.version != t.version)
                    .collect();
                if since.iter().all(|v| v.delete_marker) {
                    steps.push(Step::Unhide {
                        markers: since.iter().map(|v| v.version.clone()).collect(),
                        version: t.version.clone(),
                        name,
                    });
                } else {
                    steps.push(Step::Restore {
                        version: t.version.clone(),
                        name,
                    });
                }
            }
        }
    }
    Ok(steps)
}

/// Carries out [`recover_plan`]'s steps.
pub fn recover(backend: &dyn Backend, steps: &[Step]) -> Result<()> {
    let lock = object_lock(backend)?;
    run_parallel(steps, |s| match s {
        Step::Unhide { name, markers, .. } => {
            for m in markers {
                lock.delete_version(name, m)?;
            }
            Ok(())
        }
        Step::Restore { name, version } => lock.restore_version(name, version),
        Step::Hide { name } => backend.delete(name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_say_what_they_lock() {
        let day = std::time::Duration::from_secs(86400);
        let s = LockSettings::new(LockMode::Compliance, 30 * day).unwrap();
        assert_eq!(s.generation_secs, 30 * 86400 / 4);
        assert_eq!(
            s.to_string(),
            "compliance for 30d (extended in generations of 180h)"
        );
        assert!(
            LockSettings::new(LockMode::Governance, std::time::Duration::from_secs(3)).is_err()
        );
    }

    #[test]
    fn a_pass_locks_past_what_it_writes_now() {
        let s =
            LockSettings::new(LockMode::Governance, std::time::Duration::from_secs(400)).unwrap();
        let now = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let t = target(&s, now);
        assert!(t >= now + Duration::seconds(500));
        assert!(t > s.rule().until(now));
        assert_eq!(t.timestamp() % 100, 0);
    }
}
