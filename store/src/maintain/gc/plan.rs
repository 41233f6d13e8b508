//! What a GC run will do, and why, computed from the repository as it is
//! now. Nothing is changed here: a dry run stops at the plan.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::packs::Packs;
use super::table::ChunkTable;
use super::{GcOptions, GcReport};
use crate::backend::BackendError;
use crate::error::{Error, Result};
use crate::format::id::{Id, IdSet};
use crate::format::layout;
use crate::format::snapshot::{DiskEntry, Snapshot};
use crate::repo::condemned::{self, Record, SKEW_MARGIN};
use crate::repo::markers::{self, Marker};
use crate::repo::{for_each_parallel, Repository};

/// Chunk lists read at once by the mark phase (each may hold a few
/// hundred thousand ids of a large disk).
const MARK_THREADS: usize = 4;

/// What happens to one pack, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    /// Condemned earlier, grace over, no backup in flight, unused: deleted.
    Delete,
    /// No live chunk: condemned, deleted by a run after the grace period.
    Condemn,
    /// Mostly garbage: its `live_bytes` are copied to new packs, then it is
    /// condemned.
    Repack { live_bytes: u64 },
    /// Condemned earlier, but a backup reused a chunk of it since: kept.
    Resurrect,
    /// Condemned earlier, not deletable yet.
    Wait { until: DateTime<Utc> },
}

#[derive(Clone, Debug, Serialize)]
pub struct PackAction {
    pub pack: Id,
    /// The pack object's size.
    pub bytes: u64,
    #[serde(flatten)]
    pub action: Action,
}

/// One GC run's decisions; [`GcPlan::execute`] carries them out.
pub struct GcPlan {
    /// Every pack the run touches, in the order of the rules.
    pub actions: Vec<PackAction>,
    report: GcReport,
    /// Records every pack of which is deleted or resurrected by this run.
    pub(super) settled: Vec<String>,
    /// Every copy of every indexed chunk, the live ones marked.
    pub(super) table: ChunkTable,
    pub(super) packs: Packs,
    /// The snapshots listed (their sync records are kept up to date).
    pub(super) snapshots: Vec<Snapshot>,
}

impl GcPlan {
    /// Reads markers, records, snapshots and the index, in that order
    /// (rule 3: markers before snapshots, so a backup whose marker is gone
    /// has its manifest in the listing), then marks the chunks of the
    /// snapshots listed, one chunk list at a time, and decides.
    pub fn compute(repo: &Repository, opts: &GcOptions, progress: &dyn Fn(&str)) -> Result<GcPlan> {
        let now = Utc::now();
        let markers: Vec<Marker> = markers::list(repo.backend().as_ref(), Some(repo.keys()))?
            .into_iter()
            .filter(|m| m.is_live(now))
            .collect();
        let records = condemned::load(repo.backend().as_ref(), Some(repo.keys()))?;
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..Default::default()
        };
        progress("reading snapshots");
        let snapshots = list_snapshots(repo)?;
        report.snapshots = snapshots.len();
        progress("reading the index");
        let (mut packs, table) = Packs::load(repo)?;
        report.packs = packs.listed().len();
        report.bytes = packs.listed().values().sum();
        progress("marking live chunks");
        mark(repo, &snapshots, &table)?;
        report.live_chunks = table.live_count();
        if table.unindexed() > 0 {
            tracing::warn!(
                "gc: {} chunk references of listed snapshots name no indexed chunk \
                 (damage: `verify` names the snapshots)",
                table.unindexed()
            );
        }
        packs.tally(&table, &condemned_set(&records));
        let mut plan = GcPlan {
            actions: Vec::new(),
            report,
            settled: Vec::new(),
            table,
            packs,
            snapshots,
        };
        plan.sweep_decisions(&records, &markers, opts, now);
        plan.mark_decisions(&records, opts);
        Ok(plan)
    }

    /// The chunks found live, by id: what the mark phase set.
    pub fn live_chunks(&self) -> impl Iterator<Item = Id> + '_ {
        self.table
            .chunks()
            .filter(|(live, _)| *live)
            .map(|(_, copies)| copies[0].id)
    }

    /// The numbers of the plan (of the run, once executed).
    pub fn report(&self) -> &GcReport {
        &self.report
    }

    /// Packs to delete now, among those earlier runs condemned (rule 3).
    fn sweep_decisions(
        &mut self,
        records: &[(String, Record)],
        markers: &[Marker],
        opts: &GcOptions,
        now: DateTime<Utc>,
    ) {
        for (name, r) in records {
            let blockers: Vec<&Marker> = markers
                .iter()
                .filter(|m| m.started <= r.time + SKEW_MARGIN)
                .collect();
            if r.time + opts.grace > now || !blockers.is_empty() {
                self.wait(r, &blockers, opts);
                continue;
            }
            for p in &r.packs {
                if !self.packs.exists(p) {
                    continue; // deleted by an earlier run that did not finish
                }
                let action = if self.packs.needed(p) {
                    self.report.packs_resurrected += 1;
                    Action::Resurrect
                } else {
                    self.report.packs_deleted += 1;
                    self.report.bytes_deleted += self.packs.size_of(p);
                    Action::Delete
                };
                self.push(*p, action);
            }
            self.settled.push(name.clone());
        }
    }

    /// A record that may not be swept yet: its packs wait.
    fn wait(&mut self, r: &Record, blockers: &[&Marker], opts: &GcOptions) {
        self.report.packs_waiting += r.packs.len();
        for m in blockers {
            let s = format!("{} pid {} since {}", m.host, m.pid, m.started.to_rfc3339());
            if !self.report.sessions_in_flight.contains(&s) {
                self.report.sessions_in_flight.push(s);
            }
        }
        let until = r.time + opts.grace;
        for p in &r.packs {
            if self.packs.exists(p) {
                self.push(*p, Action::Wait { until });
            }
        }
    }

    /// Packs to condemn now: what nothing references (rule 1), and what is
    /// mostly garbage (repacked first).
    fn mark_decisions(&mut self, records: &[(String, Record)], opts: &GcOptions) {
        let condemned = condemned_set(records);
        let mut ids: Vec<Id> = self.packs.listed().keys().copied().collect();
        ids.sort();
        for id in ids.into_iter().filter(|id| !condemned.contains(id)) {
            // Of the chunk bytes a pack holds (headers and trailers aside),
            // the share still live.
            let live_bytes = self.packs.live_bytes(&id);
            let action = if live_bytes == 0 {
                Action::Condemn
            } else if (live_bytes as f64) < opts.repack_below * self.packs.blob_bytes(&id) as f64 {
                self.report.packs_repacked += 1;
                self.report.bytes_repacked += live_bytes;
                Action::Repack { live_bytes }
            } else {
                continue;
            };
            self.report.packs_condemned += 1;
            self.report.bytes_condemned += self.packs.size_of(&id);
            self.push(id, action);
        }
    }

    fn push(&mut self, pack: Id, action: Action) {
        let bytes = self.packs.size_of(&pack);
        self.actions.push(PackAction {
            pack,
            bytes,
            action,
        });
    }

    /// The packs whose action matches `f`.
    pub(super) fn packs_where(&self, f: impl Fn(&Action) -> bool) -> Vec<Id> {
        self.actions
            .iter()
            .filter(|a| f(&a.action))
            .map(|a| a.pack)
            .collect()
    }

    pub(super) fn into_report(self) -> GcReport {
        self.report
    }
}

fn condemned_set(records: &[(String, Record)]) -> IdSet {
    records.iter().flat_map(|(_, r)| r.packs.clone()).collect()
}

/// The snapshots listed now. One pruned while we read it is skipped.
fn list_snapshots(repo: &Repository) -> Result<Vec<Snapshot>> {
    let mut snapshots = Vec::new();
    for o in repo.backend().list(layout::SNAPSHOTS)? {
        match repo.load_snapshot_object(&o.name) {
            Ok(s) => snapshots.push(s),
            Err(Error::Backend(BackendError::NotFound(_))) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(snapshots)
}

/// Marks every chunk the listed snapshots reference, reading their chunk
/// lists a few at a time. A chunk list missing under a manifest that still
/// exists is damage, and stops the GC rather than free its chunks; one of
/// a snapshot pruned since the listing is skipped.
fn mark(repo: &Repository, snapshots: &[Snapshot], table: &ChunkTable) -> Result<()> {
    let disks: Vec<(&Snapshot, &DiskEntry)> = snapshots
        .iter()
        .flat_map(|s| s.chunk_lists().map(move |d| (s, d)))
        .collect();
    for_each_parallel(&disks, MARK_THREADS, |(snap, d)| {
        let list = match repo.load_chunk_list(&d.chunk_list) {
            Ok(l) => l,
            Err(Error::Backend(BackendError::NotFound(_)))
                if !repo.backend().exists(&layout::snapshot(&snap.id))? =>
            {
                return Ok(())
            }
            Err(Error::Backend(BackendError::NotFound(_))) => {
                return Err(Error::corrupt(
                    format!("snapshot {}", snap.id),
                    format!(
                        "chunk list {} of disk {} is missing",
                        layout::chunk_list(&d.chunk_list),
                        d.name
                    ),
                ))
            }
            Err(e) => return Err(e),
        };
        list.extents()
            .iter()
            .filter_map(|e| e.chunk.as_ref())
            .for_each(|id| table.mark(id));
        Ok(())
    })
}
