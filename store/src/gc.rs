//! Garbage collection: condemn unreferenced packs now, delete them in a
//! later run once no backup can have reused them. The invariant and why it
//! holds are in `docs/gc.md`; the rule numbers below refer to it.

use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::backend::BackendError;
use crate::blob;
use crate::error::{Error, Result};
use crate::id::{Id, IdMap, IdSet};
use crate::object;
use crate::pack::{PackInfo, PackWriter};
use crate::repo::Repository;
use crate::session::{self, Marker};

use crate::layout::{self, GC_CONDEMNED as CONDEMNED, GC_LOCK as LOCK};
const RECORD_KIND: &str = "gc-record";
const LOCK_KIND: &str = "gc-lock";

/// Clock skew between hosts (and time to store a record) that the rules
/// tolerate (rule 3). A record that took longer than half of it to store
/// is withdrawn.
pub const SKEW_MARGIN: Duration = Duration::minutes(10);

/// What one GC run condemned, and when (rule 1).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    time: DateTime<Utc>,
    host: String,
    packs: Vec<Id>,
}

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
    /// Locked repositories: removed versions deleted and held (`crate::lock`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock: Option<crate::lock::Reclaim>,
    pub seconds: f64,
}

/// Packs condemned by any record: writers must not reuse their chunks.
pub(crate) fn condemned_packs(repo: &Repository) -> Result<IdSet> {
    let mut out = IdSet::default();
    for (_, r) in load_records(repo)? {
        out.extend(r.packs);
    }
    Ok(out)
}

fn load_records(repo: &Repository) -> Result<Vec<(String, Record)>> {
    let mut out = Vec::new();
    for o in repo.backend().list(CONDEMNED)? {
        let bytes = match repo.backend().get(&o.name) {
            Ok(b) => b,
            // Swept by a GC that just finished: its packs are gone too.
            Err(BackendError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let payload = object::open(repo.keys(), RECORD_KIND, &o.name, &bytes)?;
        let r: Record =
            serde_json::from_slice(&payload).map_err(|e| Error::corrupt(&o.name, e.to_string()))?;
        out.push((o.name, r));
    }
    Ok(out)
}

/// Runs one GC: sweep what earlier runs condemned and may go now, then
/// condemn (and repack) what is unreferenced now. `progress` gets a line per
/// step.
pub fn run(repo: &Repository, opts: &GcOptions, progress: &dyn Fn(&str)) -> Result<GcReport> {
    let started = Instant::now();
    let _lock = if opts.dry_run {
        None
    } else {
        Some(GcLock::acquire(repo)?)
    };
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let now = Utc::now();

    // Markers before snapshots (rule 3): a backup whose marker is gone has
    // its manifest in the listing below.
    let markers: Vec<Marker> = session::list(repo)?
        .into_iter()
        .filter(|m| m.is_live(now))
        .collect();
    let records = load_records(repo)?;
    progress("reading snapshots");
    let live = live_chunks(repo, &mut report)?;
    progress("reading the index");
    let objects = repo.load_index_objects()?;
    let packs = Packs::new(repo, &objects)?;
    report.packs = packs.size.len();
    report.bytes = packs.size.values().sum();

    // Sweep: records old enough, with no backup in flight that predates them.
    let condemned_all: IdSet = records.iter().flat_map(|(_, r)| r.packs.clone()).collect();
    let mut eligible = Vec::new();
    for (name, r) in &records {
        let blockers: Vec<&Marker> = markers
            .iter()
            .filter(|m| m.started <= r.time + SKEW_MARGIN)
            .collect();
        if r.time + opts.grace <= now && blockers.is_empty() {
            eligible.push((name.clone(), r));
        } else {
            report.packs_waiting += r.packs.len();
            for m in blockers {
                let s = format!("{} pid {} since {}", m.host, m.pid, m.started.to_rfc3339());
                if !report.sessions_in_flight.contains(&s) {
                    report.sessions_in_flight.push(s);
                }
            }
        }
    }
    let mut doomed = IdSet::default();
    for (_, r) in &eligible {
        for p in &r.packs {
            if !packs.exists(p) {
                continue; // deleted by an earlier run that did not finish
            }
            if packs.needed(p, &live, &condemned_all) {
                report.packs_resurrected += 1;
            } else {
                doomed.insert(*p);
            }
        }
    }
    report.packs_deleted = doomed.len();
    report.bytes_deleted = doomed.iter().map(|p| packs.size_of(p)).sum();

    // Mark: what nothing references now (rule 1).
    let mut condemn = Vec::new();
    let mut repack = Vec::new();
    for id in packs.size.keys() {
        if condemned_all.contains(id) {
            continue;
        }
        // Of the chunk bytes a pack holds (headers and trailers aside), the
        // share still live.
        let live_bytes = packs.live_bytes(id, &live);
        if live_bytes == 0 {
            condemn.push(*id);
        } else if (live_bytes as f64) < opts.repack_below * packs.blob_bytes(id) as f64 {
            repack.push(*id);
        }
    }
    report.packs_repacked = repack.len();
    report.bytes_repacked = repack.iter().map(|p| packs.live_bytes(p, &live)).sum();
    report.packs_condemned = condemn.len() + repack.len();
    report.bytes_condemned = condemn
        .iter()
        .chain(&repack)
        .map(|p| packs.size_of(p))
        .sum();

    if opts.dry_run {
        report.lock = reclaim_locked(repo, true)?;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    if !repack.is_empty() {
        progress("repacking");
        repack_packs(repo, &packs, &repack, &live)?;
    }
    condemn.extend(repack);
    if !condemn.is_empty() {
        progress("condemning");
        write_record(repo, condemn)?;
    }
    if !doomed.is_empty() {
        progress("deleting");
        report.index_objects_rewritten = sweep(repo, &objects, &doomed)?;
    }
    // Every eligible record is settled: its packs are gone or resurrected.
    for (name, _) in &eligible {
        delete_if_there(repo, name)?;
    }
    repo.invalidate_index();
    report.lock = reclaim_locked(repo, false)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// In a locked repository, what was removed leaves only once its lock
/// runs out.
fn reclaim_locked(repo: &Repository, dry_run: bool) -> Result<Option<crate::lock::Reclaim>> {
    match repo.config().object_lock {
        Some(_) => Ok(Some(crate::lock::reclaim(repo, dry_run)?)),
        None => Ok(None),
    }
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
struct Packs {
    /// Every pack object in the bucket, with its size.
    size: IdMap<u64>,
    /// What the index says each pack holds (absent: not indexed).
    info: IdMap<PackInfo>,
    /// Packs holding each chunk (more than one after a repack or a race).
    copies: IdMap<Vec<Id>>,
}

impl Packs {
    fn new(repo: &Repository, objects: &[(String, Vec<PackInfo>)]) -> Result<Self> {
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

/// Copies the live chunks of `victims` into new packs under a fresh session
/// key, and indexes them, before the victims are condemned.
fn repack_packs(repo: &Repository, packs: &Packs, victims: &[Id], live: &IdSet) -> Result<()> {
    let cipher = repo.keys().session();
    let keys = repo.keys();
    let pack_size = repo.config().pack_size as usize;
    let mut written: Vec<PackInfo> = Vec::new();
    let mut w = PackWriter::new(&cipher, pack_size);
    let mut seen = IdSet::default();
    for p in victims {
        let Some(info) = packs.info.get(p) else {
            continue;
        };
        let bytes = repo.backend().get(&layout::pack(p))?;
        let opener = crate::crypto::Opener::new(keys, &info.salt);
        for b in &info.blobs {
            if !live.contains(&b.id) || !seen.insert(b.id) {
                continue;
            }
            let (s, e) = (b.offset as usize, b.offset as usize + b.len as usize);
            let sealed = bytes
                .get(s..e)
                .ok_or_else(|| Error::corrupt(layout::pack(p), "blob outside the pack"))?;
            w.add(b.id, &blob::reseal(&opener, &cipher, &b.id, sealed)?);
            if w.len() >= pack_size {
                let full = std::mem::replace(&mut w, PackWriter::new(&cipher, pack_size));
                written.push(store_pack(repo, full, &cipher)?);
            }
        }
    }
    if !w.is_empty() {
        written.push(store_pack(repo, w, &cipher)?);
    }
    if !written.is_empty() {
        let sealed = object::seal(&cipher, crate::index::KIND, &crate::index::encode(&written));
        repo.backend().put(&layout::index(&Id::random()), &sealed)?;
    }
    Ok(())
}

fn store_pack(
    repo: &Repository,
    w: PackWriter,
    cipher: &crate::crypto::SessionCipher,
) -> Result<PackInfo> {
    let (bytes, info) = w.finish(cipher);
    repo.backend().put(&layout::pack(&info.id), &bytes)?;
    Ok(info)
}

/// Stores a record of `packs`, withdrawn if storing it took so long that a
/// backup could have started without seeing it (rule 1).
fn write_record(repo: &Repository, packs: Vec<Id>) -> Result<()> {
    let time = Utc::now();
    let rec = Record {
        time,
        host: crate::hostname(),
        packs,
    };
    let name = format!(
        "{CONDEMNED}{}-{}",
        time.format("%Y%m%dT%H%M%S%.3fZ"),
        Id::random().short()
    );
    let json = serde_json::to_vec(&rec).expect("serialize record");
    repo.backend().put(
        &name,
        &object::seal(&repo.keys().session(), RECORD_KIND, &json),
    )?;
    if Utc::now() - time > SKEW_MARGIN / 2 {
        delete_if_there(repo, &name)?;
        return Err(Error::Invalid(
            "storing the GC record took too long; nothing was condemned (run gc again)".into(),
        ));
    }
    Ok(())
}

/// Deletes `doomed` packs: first the index objects that name them are
/// replaced by ones that do not, then the packs go (rule 4). Returns how
/// many index objects were rewritten.
fn sweep(repo: &Repository, objects: &[(String, Vec<PackInfo>)], doomed: &IdSet) -> Result<usize> {
    let cipher = repo.keys().session();
    let mut rewritten = 0;
    for (name, list) in objects {
        if !list.iter().any(|p| doomed.contains(&p.id)) {
            continue;
        }
        let keep: Vec<PackInfo> = list
            .iter()
            .filter(|p| !doomed.contains(&p.id))
            .cloned()
            .collect();
        if !keep.is_empty() {
            let sealed = object::seal(&cipher, crate::index::KIND, &crate::index::encode(&keep));
            repo.backend().put(&layout::index(&Id::random()), &sealed)?;
        }
        delete_if_there(repo, name)?;
        rewritten += 1;
    }
    for p in doomed {
        delete_if_there(repo, &layout::pack(p))?;
    }
    Ok(rewritten)
}

fn delete_if_there(repo: &Repository, name: &str) -> Result<()> {
    match repo.backend().delete(name) {
        Ok(()) | Err(BackendError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// One GC at a time per repository (rule 5), removed when dropped.
struct GcLock<'r> {
    repo: &'r Repository,
    name: String,
}

impl<'r> GcLock<'r> {
    fn acquire(repo: &'r Repository) -> Result<Self> {
        let me = Marker {
            id: Id::random(),
            host: crate::hostname(),
            pid: std::process::id(),
            started: Utc::now(),
        };
        let name = format!("{LOCK}{}", me.id);
        let json = serde_json::to_vec(&me).expect("serialize lock");
        repo.backend().put(
            &name,
            &object::seal(&repo.keys().session(), LOCK_KIND, &json),
        )?;
        let lock = GcLock { repo, name };
        let now = Utc::now();
        for o in repo.backend().list(LOCK)? {
            if o.name == lock.name {
                continue;
            }
            let bytes = match repo.backend().get(&o.name) {
                Ok(b) => b,
                Err(BackendError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let payload = object::open(repo.keys(), LOCK_KIND, &o.name, &bytes)?;
            let other: Marker = serde_json::from_slice(&payload)
                .map_err(|e| Error::corrupt(&o.name, e.to_string()))?;
            // The older run goes on; ties are broken by id. Both see both.
            if other.is_live(now) && (other.started, other.id) < (me.started, me.id) {
                return Err(Error::GcRunning(format!(
                    "{} pid {} since {}",
                    other.host,
                    other.pid,
                    other.started.to_rfc3339()
                )));
            }
        }
        Ok(lock)
    }
}

impl Drop for GcLock<'_> {
    fn drop(&mut self) {
        // A lock left behind goes stale with its process (or in 48 h).
        if let Err(e) = self.repo.backend().delete(&self.name) {
            tracing::warn!("could not remove GC lock {}: {e}", self.name);
        }
    }
}
