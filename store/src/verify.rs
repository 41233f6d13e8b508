//! Verify: read every chunk that snapshots use, authenticate, decompress and
//! re-hash it against its id, and say which snapshots and disk offsets a
//! damaged chunk would break.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::backend::BackendError;
use crate::blob::ChunkBuf;
use crate::error::Error;
use crate::error::Result;
use crate::id::{Id, IdMap};
use crate::layout;
use crate::repo::Repository;
use crate::snapshot::Snapshot;

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

/// Verifies `snapshots` (all of them if the caller passes all).
pub fn verify(
    repo: &Repository,
    snapshots: &[Snapshot],
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<VerifyReport> {
    let index = repo.index()?;
    let mut report = VerifyReport {
        snapshots: snapshots.len(),
        ..Default::default()
    };
    let mut uses: IdMap<Vec<Use>> = IdMap::default();
    for s in snapshots {
        for d in s.chunk_lists() {
            let list = match repo.load_chunk_list(&d.chunk_list) {
                Ok(l) => l,
                Err(e) => {
                    report.damaged.push(Damage {
                        object: format!("chunk list of disk {} ({})", d.name, d.chunk_list),
                        reason: e.to_string(),
                        uses: vec![Use {
                            snapshot: s.id,
                            disk: d.name.clone(),
                            offset: 0,
                        }],
                    });
                    continue;
                }
            };
            if list.size() != d.size {
                report.damaged.push(Damage {
                    object: format!("chunk list {}", d.chunk_list),
                    reason: format!("covers {} bytes, disk is {}", list.size(), d.size),
                    uses: vec![Use {
                        snapshot: s.id,
                        disk: d.name.clone(),
                        offset: 0,
                    }],
                });
            }
            for e in list.extents() {
                if let Some(id) = e.chunk {
                    let u = uses.entry(id).or_default();
                    if u.len() < MAX_USES {
                        u.push(Use {
                            snapshot: s.id,
                            disk: d.name.clone(),
                            offset: e.offset,
                        });
                    }
                }
            }
        }
    }
    // Group chunks by pack so each pack is fetched once.
    let mut by_pack: BTreeMap<u32, Vec<Id>> = BTreeMap::new();
    for id in uses.keys() {
        match index.get(id) {
            Some(loc) => by_pack.entry(loc.pack).or_default().push(*id),
            None => report.damaged.push(Damage {
                object: format!("chunk {id}"),
                reason: "missing from the index".into(),
                uses: uses[id].clone(),
            }),
        }
    }
    let packs: Vec<(u32, Vec<Id>)> = by_pack.into_iter().collect();
    let next = AtomicUsize::new(0);
    let chunks = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let bad: Mutex<Vec<(Id, String)>> = Mutex::new(Vec::new());
    let fatal: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = ChunkBuf::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((p, ids)) = packs.get(i) else { return };
                    let name = layout::pack(&index.packs()[*p as usize].id);
                    let mut data = match repo.backend().get(&name) {
                        Ok(d) => d,
                        Err(BackendError::NotFound(_)) => {
                            let mut b = bad.lock().unwrap_or_else(|e| e.into_inner());
                            b.extend(
                                ids.iter()
                                    .map(|id| (*id, format!("pack {name} is missing"))),
                            );
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
                        match check_chunk(repo, &index, id, &loc, sealed, &mut buf) {
                            Ok(n) => {
                                chunks.fetch_add(1, Ordering::Relaxed);
                                bytes.fetch_add(n as u64, Ordering::Relaxed);
                                progress(n as u64);
                            }
                            Err(e) => bad
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((*id, format!("{e} (in pack {name})"))),
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = fatal.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    for (id, reason) in bad.into_inner().unwrap_or_else(|p| p.into_inner()) {
        report.damaged.push(Damage {
            object: format!("chunk {id}"),
            reason,
            uses: uses[&id].clone(),
        });
    }
    report.chunks = chunks.into_inner();
    report.bytes = bytes.into_inner();
    Ok(report)
}

/// Opens one chunk and checks that its content hashes to its id: its
/// plaintext length, or why it is damaged.
fn check_chunk(
    repo: &Repository,
    index: &crate::index::Index,
    id: &Id,
    loc: &crate::index::Loc,
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
