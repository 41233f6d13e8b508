//! Verify: read every chunk that snapshots use, authenticate, decompress and
//! re-hash it against its id, and say which snapshots and disk offsets a
//! damaged chunk would break.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::backend::BackendError;
use crate::error::Error;
use crate::error::Result;
use crate::format::blob::ChunkBuf;
use crate::format::id::{Id, IdMap};
use crate::format::index::Index;
use crate::format::layout;
use crate::format::snapshot::Snapshot;
use crate::repo::Repository;

/// Uses listed per damaged chunk at most (a chunk of zeros-like content may
/// appear at thousands of offsets).
const MAX_USES: usize = 32;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Use {
    pub snapshot: Id,
    pub disk: String,
    pub offset: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Damage {
    /// `chunk <id>` or the name of a damaged metadata object.
    pub object: String,
    pub reason: String,
    pub uses: Vec<Use>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub snapshots: usize,
    pub chunks: u64,
    pub bytes: u64,
    pub damaged: Vec<Damage>,
}

/// Verifies `snapshots` (all of them if the caller passes all): their
/// chunk lists, then every chunk they use, pack by pack on `threads`.
pub fn verify(
    repo: &Repository,
    snapshots: &[Snapshot],
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<VerifyReport> {
    let mut report = VerifyReport {
        snapshots: snapshots.len(),
        ..Default::default()
    };
    let uses = chunk_uses(repo, snapshots, &mut report);
    let index = repo.index_for(uses.keys().copied())?;
    let packs = by_pack(&index, &uses, &mut report);
    let checked = check_packs(repo, &index, &packs, threads, progress)?;
    for (id, reason) in checked.bad {
        report.damaged.push(Damage {
            object: format!("chunk {id}"),
            reason,
            uses: uses[&id].clone(),
        });
    }
    report.chunks = checked.chunks;
    report.bytes = checked.bytes;
    Ok(report)
}

/// Where each chunk of `snapshots` is used (the first [`MAX_USES`]);
/// unreadable or inconsistent chunk lists go into the report as damage.
fn chunk_uses(
    repo: &Repository,
    snapshots: &[Snapshot],
    report: &mut VerifyReport,
) -> IdMap<Vec<Use>> {
    let mut uses: IdMap<Vec<Use>> = IdMap::default();
    for s in snapshots {
        for d in s.chunk_lists() {
            let at = |offset| Use {
                snapshot: s.id,
                disk: d.name.clone(),
                offset,
            };
            let list = match repo.load_chunk_list(&d.chunk_list) {
                Ok(l) => l,
                Err(e) => {
                    report.damaged.push(Damage {
                        object: format!("chunk list of disk {} ({})", d.name, d.chunk_list),
                        reason: e.to_string(),
                        uses: vec![at(0)],
                    });
                    continue;
                }
            };
            if list.size() != d.size {
                report.damaged.push(Damage {
                    object: format!("chunk list {}", d.chunk_list),
                    reason: format!("covers {} bytes, disk is {}", list.size(), d.size),
                    uses: vec![at(0)],
                });
            }
            for e in list.extents() {
                if let Some(id) = e.chunk {
                    let u = uses.entry(id).or_default();
                    if u.len() < MAX_USES {
                        u.push(at(e.offset));
                    }
                }
            }
        }
    }
    uses
}

/// The chunks grouped by pack, so each pack is fetched once; chunks the
/// index does not know go into the report.
fn by_pack(
    index: &Index,
    uses: &IdMap<Vec<Use>>,
    report: &mut VerifyReport,
) -> Vec<(u32, Vec<Id>)> {
    let mut by_pack: BTreeMap<u32, Vec<Id>> = BTreeMap::new();
    for (id, u) in uses {
        match index.get(id) {
            Some(loc) => by_pack.entry(loc.pack).or_default().push(*id),
            None => report.damaged.push(Damage {
                object: format!("chunk {id}"),
                reason: "missing from the index".into(),
                uses: u.clone(),
            }),
        }
    }
    by_pack.into_iter().collect()
}

/// What the pack checks found.
#[derive(Default)]
struct Checked {
    chunks: u64,
    bytes: u64,
    /// Damaged chunks and why.
    bad: Vec<(Id, String)>,
}

/// Fetches each pack whole and checks its chunks, on `threads`. A missing
/// pack damages its chunks; any other backend error stops the run.
fn check_packs(
    repo: &Repository,
    index: &Index,
    packs: &[(u32, Vec<Id>)],
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Checked> {
    let next = AtomicUsize::new(0);
    let all: Mutex<Checked> = Mutex::new(Checked::default());
    let fatal: Mutex<Option<Error>> = Mutex::new(None);
    // Counts and a list stay whole whatever panicked while they were held.
    let lock = || all.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = ChunkBuf::default();
                while let Some((p, ids)) = packs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let name = layout::pack(&index.packs()[*p as usize].id);
                    let mut data = match repo.backend().get(&name) {
                        Ok(d) => d,
                        Err(BackendError::NotFound(_)) => {
                            let why = format!("pack {name} is missing");
                            lock().bad.extend(ids.iter().map(|id| (*id, why.clone())));
                            continue;
                        }
                        Err(e) => {
                            fatal
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e.into());
                            return;
                        }
                    };
                    for id in ids {
                        let loc = index.get(id).expect("grouped from the index");
                        let s = loc.offset as usize;
                        // Short: an empty slice, reported as a truncated pack.
                        let sealed = data.get_mut(s..s + loc.len as usize).unwrap_or(&mut []);
                        match check_chunk(repo, index, id, &loc, sealed, &mut buf) {
                            Ok(n) => {
                                let mut c = lock();
                                c.chunks += 1;
                                c.bytes += n as u64;
                                drop(c);
                                progress(n as u64);
                            }
                            Err(e) => lock().bad.push((*id, format!("{e} (in pack {name})"))),
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = fatal.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(all.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Opens one chunk and checks that its content hashes to its id: its
/// plaintext length, or why it is damaged.
fn check_chunk(
    repo: &Repository,
    index: &Index,
    id: &Id,
    loc: &crate::format::index::Loc,
    sealed: &mut [u8],
    buf: &mut ChunkBuf,
) -> Result<usize> {
    let plain = repo.open_blob(index, id, loc, sealed, buf)?;
    if repo.keys().chunk_id(plain.bytes()) != *id {
        return Err(Error::corrupt(
            format!("chunk {id}"),
            "content does not match its id",
        ));
    }
    Ok(plain.bytes().len())
}
