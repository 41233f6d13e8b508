//! What a sync will copy, read from both sides without a key: the source's
//! sync records and index frames, the destination's snapshots, packs,
//! index frames and condemned records.

use std::collections::BTreeSet;
use std::sync::Mutex;

use super::{SyncOptions, SyncReport};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::format::id::{Id, IdMap, IdSet};
use crate::format::index::{self, Frame};
use crate::format::layout;
use crate::format::sync_record::SyncRecord;
use crate::repo::{condemned, each_index_object, load_each, lock, sync_records, Repository};

/// One snapshot to copy.
#[derive(Clone, Debug)]
pub struct SnapshotPlan {
    pub record: SyncRecord,
    /// Its packs the destination lacks and no earlier snapshot of this
    /// plan brings (so each is counted once).
    pub copy: Vec<Id>,
    pub bytes: u64,
    /// Why it cannot be copied, when the plan knows already.
    pub blocked: Option<String>,
}

/// A sync run's decisions; [`SyncPlan::execute`] carries them out.
pub struct SyncPlan {
    /// Oldest first.
    pub snapshots: Vec<SnapshotPlan>,
    /// Selected snapshots the destination has already.
    pub skipped: usize,
    /// Source snapshots without a sync record (made before they existed).
    pub unrecorded: usize,
    /// Destination snapshots of the selected sources and policies the
    /// source no longer has (removed only with `--remove-vanished`).
    pub vanished: Vec<SyncRecord>,
    pub(super) selected: usize,
    /// The source's frames of the packs the plan copies or indexes.
    pub(super) frames: IdMap<Frame>,
    /// Packs at the destination, and those its index objects frame.
    pub(super) dst_packs: IdSet,
    pub(super) dst_indexed: IdSet,
    /// Chunk lists and sync records at the destination (left by a run that
    /// was killed before the manifest: not copied again).
    pub(super) dst_meta: BTreeSet<String>,
}

impl SyncPlan {
    pub fn compute(src: &dyn Backend, dst: &dyn Backend, opts: &SyncOptions) -> Result<SyncPlan> {
        opts.filters.check()?;
        let dst_config = same_family(src, dst)?;
        // A locked replica locks what the sync writes, by its own settings.
        crate::maintain::lock::apply(dst, dst_config.object_lock.as_ref())?;
        let records = load_records(src)?;
        let unrecorded = count_unrecorded(src, &records)?;
        let selected = opts.filters.select(&records);
        let at_dst: IdSet = ids_under(dst, layout::SNAPSHOTS)?;
        let (have, todo): (Vec<&SyncRecord>, Vec<&SyncRecord>) =
            selected.iter().partition(|r| at_dst.contains(&r.snapshot));
        let (todo, not_kept) = match &opts.keep {
            Some(keep) => {
                let n = todo.len();
                let worth = super::retain::worth_copying(dst, todo, keep, &chrono::Local)?;
                let dropped = n - worth.len();
                (worth, dropped)
            }
            None => (todo, 0),
        };
        let needed: IdSet = todo.iter().flat_map(|r| r.packs.iter().copied()).collect();
        let frames = source_frames(src, &needed)?;
        let dst_packs: IdSet = dst
            .list(layout::DATA)?
            .iter()
            .filter_map(|o| layout::pack_id(&o.name))
            .collect();
        let dst_indexed = indexed_packs(dst)?;
        let mut dst_meta = BTreeSet::new();
        for prefix in [layout::CHUNK_LISTS, layout::SYNC] {
            dst_meta.extend(dst.list(prefix)?.into_iter().map(|o| o.name));
        }
        let condemned = condemned::packs(dst, None)?;
        let mut planned = IdSet::default();
        let snapshots = todo
            .into_iter()
            .map(|r| plan_one(r, &frames, &dst_packs, &condemned, &mut planned))
            .collect();
        let vanished = if opts.remove_vanished {
            vanished(dst, &records, opts)?
        } else {
            Vec::new()
        };
        Ok(SyncPlan {
            snapshots,
            skipped: have.len() + not_kept,
            unrecorded,
            vanished,
            selected: selected.len(),
            frames,
            dst_packs,
            dst_indexed,
            dst_meta,
        })
    }

    /// Bytes of packs the plan copies.
    pub fn bytes(&self) -> u64 {
        self.snapshots.iter().map(|s| s.bytes).sum()
    }

    /// The report of the plan alone (a dry run).
    pub fn report(&self, dry_run: bool) -> SyncReport {
        SyncReport {
            dry_run,
            snapshots_selected: self.selected,
            snapshots_copied: self.snapshots.len(),
            snapshots_skipped: self.skipped,
            snapshots_unavailable: self.unrecorded,
            snapshots_removed: self.vanished.len(),
            packs_copied: self.snapshots.iter().map(|s| s.copy.len()).sum(),
            chunks_copied: self
                .snapshots
                .iter()
                .flat_map(|s| &s.copy)
                .filter_map(|p| self.frames.get(p))
                .map(|f| u64::from(f.blobs))
                .sum(),
            bytes_copied: self.bytes(),
            ..Default::default()
        }
    }
}

/// Refuses a sync between repositories that do not share keys, or of a
/// repository onto itself.
fn same_family(src: &dyn Backend, dst: &dyn Backend) -> Result<crate::repo::RepoConfig> {
    let s = Repository::read_config(src)?;
    let d = match Repository::read_config(dst) {
        Err(Error::NoRepository(at)) => {
            return Err(Error::Invalid(format!(
                "no repository at {at}: make one with `bulwark repo init --replica-of {}`",
                src.location()
            )))
        }
        r => r?,
    };
    if s.id == d.id {
        return Err(Error::Invalid(format!(
            "{} and {} are the same repository",
            src.location(),
            dst.location()
        )));
    }
    if s.family() != d.family() {
        return Err(Error::Invalid(format!(
            "{} is not a replica of {} (nor both of one source): its chunks could not be \
             read with the source's key",
            dst.location(),
            src.location()
        )));
    }
    Ok(d)
}

/// The newest record of every snapshot, loaded in parallel.
pub(super) fn load_records(backend: &dyn Backend) -> Result<Vec<SyncRecord>> {
    let names: Vec<String> = sync_records::newest(backend)?.into_values().collect();
    let loaded = load_each(&names, |n| sync_records::load(backend, n))?;
    Ok(loaded.into_iter().flatten().collect())
}

/// Source snapshots that have no sync record.
fn count_unrecorded(src: &dyn Backend, records: &[SyncRecord]) -> Result<usize> {
    let recorded: IdSet = records.iter().map(|r| r.snapshot).collect();
    Ok(ids_under(src, layout::SNAPSHOTS)?
        .iter()
        .filter(|id| !recorded.contains(id))
        .count())
}

/// The ids of the objects under `prefix` (`snapshots/<id>`).
pub(super) fn ids_under(backend: &dyn Backend, prefix: &str) -> Result<IdSet> {
    Ok(backend
        .list(prefix)?
        .iter()
        .filter_map(|o| o.name[prefix.len()..].parse().ok())
        .collect())
}

/// The source's frames of `needed` packs (the first frame of each).
fn source_frames(src: &dyn Backend, needed: &IdSet) -> Result<IdMap<Frame>> {
    let out = Mutex::new(IdMap::default());
    if !needed.is_empty() {
        each_frame(src, |f| {
            if needed.contains(&f.pack) {
                lock(&out).entry(f.pack).or_insert(f);
            }
        })?;
    }
    Ok(out.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// The packs the destination's index objects frame. An object sealed
/// whole frames nothing we can see: its packs are indexed again (a
/// duplicate entry is harmless).
fn indexed_packs(dst: &dyn Backend) -> Result<IdSet> {
    let packs = Mutex::new(IdSet::default());
    each_frame(dst, |f| {
        lock(&packs).insert(f.pack);
    })?;
    Ok(packs.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// `f` on every frame of every index object (read without the key).
fn each_frame(backend: &dyn Backend, f: impl Fn(Frame) + Sync) -> Result<()> {
    each_index_object(
        backend,
        None,
        |_| {},
        |n, bytes| {
            index::frames(&bytes, n)?
                .unwrap_or_default()
                .into_iter()
                .for_each(&f);
            Ok(())
        },
    )
}

/// One snapshot's plan: the packs it brings, or why it cannot be copied.
fn plan_one(
    r: &SyncRecord,
    frames: &IdMap<Frame>,
    dst_packs: &IdSet,
    condemned: &IdSet,
    planned: &mut IdSet,
) -> SnapshotPlan {
    let mut blocked = None;
    let mut copy = Vec::new();
    let mut bytes = 0;
    for p in &r.packs {
        if condemned.contains(p) {
            blocked = Some(format!(
                "pack {} is condemned at the destination (its GC found no snapshot there \
                 needing it): it can be copied again once that GC has deleted it",
                p.short()
            ));
        } else if !frames.contains_key(p) {
            blocked = Some(format!(
                "pack {} is in no index object the source frames (an index written before \
                 syncs existed, or the pack is gone): run `bulwark gc` on the source",
                p.short()
            ));
        } else if !dst_packs.contains(p) && planned.insert(*p) {
            copy.push(*p);
            bytes += frames[p].size;
        }
    }
    SnapshotPlan {
        record: r.clone(),
        copy,
        bytes,
        blocked,
    }
}

/// Destination snapshots, of sources and policies the filters select,
/// that the source no longer has.
fn vanished(dst: &dyn Backend, src: &[SyncRecord], opts: &SyncOptions) -> Result<Vec<SyncRecord>> {
    let at_src: BTreeSet<Id> = src.iter().map(|r| r.snapshot).collect();
    let groups_only = super::Filters {
        transfer_last: None,
        since: None,
        ..opts.filters.clone()
    };
    let at_dst = load_records(dst)?;
    Ok(groups_only
        .select(&at_dst)
        .into_iter()
        .filter(|r| !at_src.contains(&r.snapshot))
        .cloned()
        .collect())
}
