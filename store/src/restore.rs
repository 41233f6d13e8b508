//! Restores: a snapshot's disk written back to a file or device, sparse.
//!
//! Chunks that sit next to each other in one pack (the usual case: a disk's
//! chunks are packed in disk order) are fetched with one ranged read, and
//! several such reads run in parallel. Every chunk is authenticated before a
//! byte of it is written; a damaged one stops the restore with an error.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::chunklist::{ChunkList, Extent};
use crate::error::{Error, Result};
use crate::index::{Index, Loc};
use crate::pack;
use crate::repo::Repository;

/// Largest single ranged read.
const MAX_BATCH: u64 = 32 << 20;

#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Parallel fetch/decrypt/write threads; 0 = a default.
    pub threads: usize,
}

/// Extents (with their locations) fetched together.
struct Batch {
    pack: u32,
    start: u64,
    end: u64,
    items: Vec<(Extent, Loc)>,
}

fn plan(index: &Index, list: &ChunkList) -> Result<Vec<Batch>> {
    let mut out: Vec<Batch> = Vec::new();
    for e in list.extents() {
        let Some(id) = e.chunk else { continue };
        let loc = index.get(&id).ok_or(Error::MissingChunk(id))?;
        let (s, end) = (
            u64::from(loc.offset),
            u64::from(loc.offset) + u64::from(loc.len),
        );
        match out.last_mut() {
            Some(b) if b.pack == loc.pack && b.end == s && end - b.start <= MAX_BATCH => {
                b.end = end;
                b.items.push((*e, loc));
            }
            _ => out.push(Batch {
                pack: loc.pack,
                start: s,
                end,
                items: vec![(*e, loc)],
            }),
        }
    }
    Ok(out)
}

/// Writes the disk described by `list` into `out` (already sized; zero
/// extents are left as holes). `progress` is called with bytes done.
pub fn restore_to_file(
    repo: &Repository,
    list: &ChunkList,
    out: &File,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let index = repo.index()?;
    let batches = plan(&index, list)?;
    let zero_bytes: u64 = list
        .extents()
        .iter()
        .filter(|e| e.chunk.is_none())
        .map(|e| e.len)
        .sum();
    progress(zero_bytes);
    let threads = if opts.threads == 0 { 4 } else { opts.threads };
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.min(batches.len().max(1)) {
            s.spawn(|| loop {
                if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(b) = batches.get(i) else { return };
                if let Err(e) = restore_batch(repo, &index, b, out, progress) {
                    let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                    f.get_or_insert(e);
                    return;
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(())
}

fn restore_batch(
    repo: &Repository,
    index: &Index,
    b: &Batch,
    out: &File,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let name = pack::object_name(&index.packs()[b.pack as usize].id);
    let bytes = repo.backend().get_range(&name, b.start, b.end - b.start)?;
    for (e, loc) in &b.items {
        let s = (u64::from(loc.offset) - b.start) as usize;
        let sealed = bytes.get(s..s + loc.len as usize).unwrap_or(&[]);
        let data = repo.open_extent(index, e, loc, sealed)?;
        out.write_all_at(&data, e.offset)
            .map_err(|err| Error::io(format!("write at offset {}", e.offset), err))?;
        progress(e.len);
    }
    Ok(())
}
