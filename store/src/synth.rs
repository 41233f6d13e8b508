//! A synthetic repository for the scale benchmark (`scripts/bench-scale.sh`):
//! index objects, chunk lists and manifests for `chunks` chunks, written
//! through the store's own formats, without the chunk data. The packs the
//! index names are never written: commands that read the index, chunk lists
//! and manifests pay their full cost; nothing reads a synthetic chunk.
//!
//! Shape: `sources` disks, each backed up `per_source` times a day apart;
//! the first snapshot of a disk holds half its chunks, each later one
//! replaces the next slice with new chunks, so the snapshots together use
//! every chunk once and a prune leaves garbage behind, as real history does.

use crate::error::Result;
use crate::format::chunklist::{self, ChunkList};
use crate::format::id::Id;
use crate::format::pack::{BlobEntry, PackInfo};
use crate::format::{index, layout, object, snapshot};
use crate::repo::Repository;
use crate::{BackupStats, Snapshot};

/// The synthetic chunk size (its length in chunk lists and the index).
pub const CHUNK: u32 = 1 << 20;
/// Chunks per synthetic pack (about 16 MiB, as real packs).
const PER_PACK: u64 = 16;
/// Packs per index object.
const PER_INDEX: u64 = 1000;

#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub chunks: u64,
    pub sources: u64,
    pub per_source: u64,
}

/// Chunk `i`'s id: stable, so chunk lists name chunks without a table.
fn chunk_id(i: u64) -> Id {
    let mut input = *b"bulwark synthetic chunk ........";
    input[24..].copy_from_slice(&i.to_le_bytes());
    let d = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut id = [0u8; 32];
    id.copy_from_slice(d.as_ref());
    Id(id)
}

/// Writes the index and the snapshots of `shape` into `repo`; `progress`
/// gets a line per step.
pub fn fill(repo: &Repository, shape: Shape, progress: &dyn Fn(&str)) -> Result<()> {
    write_index(repo, shape.chunks, progress)?;
    write_snapshots(repo, shape, progress)
}

fn write_index(repo: &Repository, chunks: u64, progress: &dyn Fn(&str)) -> Result<()> {
    let cipher = repo.keys().session();
    let packs = chunks.div_ceil(PER_PACK);
    let mut first = 0;
    while first < packs {
        let last = (first + PER_INDEX).min(packs);
        let infos: Vec<PackInfo> = (first..last).map(|p| pack_info(p, chunks)).collect();
        repo.put_sealed(&layout::index(&Id::random()), &index::seal(&cipher, &infos))?;
        first = last;
        progress(&format!("index: {} of {packs} packs", last));
    }
    Ok(())
}

fn pack_info(p: u64, chunks: u64) -> PackInfo {
    let blobs = (p * PER_PACK..((p + 1) * PER_PACK).min(chunks))
        .enumerate()
        .map(|(k, i)| BlobEntry {
            id: chunk_id(i),
            offset: k as u32 * CHUNK,
            len: CHUNK,
        })
        .collect();
    PackInfo {
        id: Id::random(),
        salt: [0; 32],
        blobs,
        object: None,
    }
}

fn write_snapshots(repo: &Repository, shape: Shape, progress: &dyn Fn(&str)) -> Result<()> {
    let cipher = repo.keys().session();
    let per_disk = shape.chunks / shape.sources;
    let base = per_disk / 2;
    let slice = (per_disk - base) / shape.per_source.saturating_sub(1).max(1);
    let start = chrono::Utc::now() - chrono::Duration::days(shape.per_source as i64);
    for s in 0..shape.sources {
        let first = s * per_disk;
        for k in 0..shape.per_source {
            // Snapshot k has replaced the first k slices: position j then
            // holds new chunk `base + j` of its disk.
            let mut list = ChunkList::new();
            for j in 0..base {
                let replaced = slice > 0 && j / slice < k;
                let i = if replaced {
                    first + base + j
                } else {
                    first + j
                };
                list.push(u64::from(CHUNK), Some(chunk_id(i)));
            }
            let list_id = Id::random();
            let sealed = object::seal(&cipher, chunklist::KIND, &list.encode());
            repo.put_sealed(&layout::chunk_list(&list_id), &sealed)?;
            let snap = Snapshot {
                version: 1,
                id: Id::random(),
                source: format!("synthetic-{s}"),
                host: crate::hostname(),
                owner: crate::username(),
                time: start + chrono::Duration::days(k as i64),
                policy: None,
                parent: None,
                domain_xml: None,
                key_fingerprint: repo.keys().fingerprint().to_string(),
                disks: vec![snapshot::DiskEntry {
                    name: "vda".into(),
                    size: list.size(),
                    chunk_list: list_id,
                    data_bytes: list.size(),
                    chunks: base,
                    checkpoint: None,
                }],
                nvram: None,
                files: None,
                stats: BackupStats::default(),
            };
            let json =
                serde_json::to_vec(&snap).map_err(|e| crate::Error::Invalid(e.to_string()))?;
            let sealed = object::seal(&cipher, snapshot::KIND, &json);
            repo.put_sealed(&layout::snapshot(&snap.id), &sealed)?;
        }
        progress(&format!("snapshots: source {} of {}", s + 1, shape.sources));
    }
    Ok(())
}
