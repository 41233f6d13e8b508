//! What a GC run will do, and why, computed from the repository as it is
//! now. Nothing is changed here: a dry run stops at the plan.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{GcOptions, GcReport};
use crate::backend::BackendError;
use crate::backup::session::{self, Marker};
use crate::error::{Error, Result};
use crate::format::id::{Id, IdMap, IdSet};
use crate::format::layout;
use crate::format::pack::PackInfo;
use crate::repo::condemned::{self, Record, SKEW_MARGIN};
use crate::repo::{IndexObject, Repository};

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
    pub(super) live: IdSet,
    pub(super) packs: Packs,
    pub(super) objects: Vec<IndexObject>,
}

impl GcPlan {
    /// Reads markers, records, snapshots and the index, in that order
    /// (rule 3: markers before snapshots, so a backup whose marker is gone
    /// has its manifest in the listing), and decides.
    pub fn compute(repo: &Repository, opts: &GcOptions, progress: &dyn Fn(&str)) -> Result<GcPlan> {
        let now = Utc::now();
        let markers: Vec<Marker> = session::list(repo)?
            .into_iter()
            .filter(|m| m.is_live(now))
            .collect();
        let records = condemned::load(repo.backend().as_ref(), repo.keys())?;
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..Default::default()
        };
        progress("reading snapshots");
        let live = live_chunks(repo, &mut report)?;
        progress("reading the index");
        let objects = repo.load_index_objects()?;
        let packs = Packs::new(repo, &objects)?;
        report.packs = packs.size.len();
        report.bytes = packs.size.values().sum();
        let mut plan = GcPlan {
            actions: Vec::new(),
            report,
            settled: Vec::new(),
            live,
            packs,
            objects,
        };
        plan.sweep_decisions(&records, &markers, opts, now);
        plan.mark_decisions(&records, opts);
        Ok(plan)
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
        let condemned = condemned_set(records);
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
                let action = if self.packs.needed(p, &self.live, &condemned) {
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
        let mut ids: Vec<Id> = self.packs.size.keys().copied().collect();
        ids.sort();
        for id in ids.into_iter().filter(|id| !condemned.contains(id)) {
            // Of the chunk bytes a pack holds (headers and trailers aside),
            // the share still live.
            let live_bytes = self.packs.live_bytes(&id, &self.live);
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

/// Every chunk a listed snapshot references. A snapshot pruned while we
/// read it is skipped; a chunk list missing under a manifest that still
/// exists is damage, and stops the GC rather than free its chunks.
fn live_chunks(repo: &Repository, report: &mut GcReport) -> Result<IdSet> {
    let mut live = IdSet::default();
    for o in repo.backend().list(layout::SNAPSHOTS)? {
        let snap = match repo.load_snapshot_object(&o.name) {
            Ok(s) => s,
            Err(Error::Backend(BackendError::NotFound(_))) => continue,
            Err(e) => return Err(e),
        };
        for d in snap.chunk_lists() {
            let list = match repo.load_chunk_list(&d.chunk_list) {
                Ok(l) => l,
                Err(Error::Backend(BackendError::NotFound(_)))
                    if !repo.backend().exists(&layout::snapshot(&snap.id))? =>
                {
                    continue
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
            live.extend(list.extents().iter().filter_map(|e| e.chunk));
        }
        report.snapshots += 1;
    }
    report.live_chunks = live.len();
    Ok(live)
}

/// The packs as the index objects and the bucket listing know them.
pub(super) struct Packs {
    /// Every pack object in the bucket, with its size.
    size: IdMap<u64>,
    /// What the index says each pack holds (absent: not indexed).
    pub(super) info: IdMap<PackInfo>,
    /// Packs holding each chunk (more than one after a repack or a race).
    copies: IdMap<Vec<Id>>,
}

impl Packs {
    fn new(repo: &Repository, objects: &[IndexObject]) -> Result<Self> {
        let mut size = IdMap::default();
        for o in repo.backend().list(layout::DATA)? {
            // Hidden temp files and anything that is not a pack name.
            if let Some(id) = layout::pack_id(&o.name) {
                size.insert(id, o.size);
            }
        }
        let mut info: IdMap<PackInfo> = IdMap::default();
        let mut copies: IdMap<Vec<Id>> = IdMap::default();
        for (_, list) in objects {
            for p in list {
                if info.contains_key(&p.id) {
                    continue;
                }
                for b in &p.blobs {
                    copies.entry(b.id).or_default().push(p.id);
                }
                info.insert(p.id, p.clone());
            }
        }
        Ok(Packs { size, info, copies })
    }

    fn exists(&self, p: &Id) -> bool {
        self.size.contains_key(p)
    }

    fn size_of(&self, p: &Id) -> u64 {
        self.size.get(p).copied().unwrap_or(0)
    }

    fn blob_bytes(&self, p: &Id) -> u64 {
        self.info
            .get(p)
            .map_or(0, |i| i.blobs.iter().map(|b| u64::from(b.len)).sum())
    }

    fn live_bytes(&self, p: &Id, live: &IdSet) -> u64 {
        self.info.get(p).map_or(0, |i| {
            i.blobs
                .iter()
                .filter(|b| live.contains(&b.id))
                .map(|b| u64::from(b.len))
                .sum()
        })
    }

    /// Whether deleting `p` would lose a live chunk: one it holds that has
    /// no copy in an existing pack outside `condemned`.
    fn needed(&self, p: &Id, live: &IdSet, condemned: &IdSet) -> bool {
        let Some(i) = self.info.get(p) else {
            return false; // not indexed: nothing can find its chunks
        };
        i.blobs.iter().any(|b| {
            live.contains(&b.id)
                && !self.copies.get(&b.id).is_some_and(|qs| {
                    qs.iter()
                        .any(|q| q != p && !condemned.contains(q) && self.exists(q))
                })
        })
    }
}
