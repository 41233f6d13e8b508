//! The pipeline for one disk: the walk's pieces are hashed and, only if the
//! repository does not know them yet, compressed and sealed by workers; one
//! collector puts the results back in disk order, feeds the packer and
//! builds the chunk list.
//!
//! Threads: the calling thread walks the source; `threads` workers process
//! pieces; the collector runs on its own thread. A fixed number of tokens
//! bounds the pieces in flight, so memory stays flat whatever the disk size.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use crossbeam_channel::bounded;

use super::packer::Packer;
use super::walk::{is_zero, Piece};
use crate::error::{Error, Result};
use crate::format::blob;
use crate::format::chunklist::{ChunkList, Extent};
use crate::format::crypto::SessionCipher;
use crate::format::id::{Id, IdSet};
use crate::format::index::{DedupIndex, Detail};
use crate::format::snapshot::BackupStats;
use crate::repo::Repository;

/// A piece after a worker saw it.
enum Done {
    Zero(u64),
    Known { len: u64, id: Id },
    New { len: u64, id: Id, sealed: Vec<u8> },
    Reuse(Vec<Extent>),
}

/// What the workers and the collector share.
pub(super) struct Ctx<'a> {
    pub repo: &'a Repository,
    pub index: &'a DedupIndex,
    pub cipher: &'a Arc<SessionCipher>,
    /// Chunks this session stored already (the packer's).
    pub pending: Arc<Mutex<IdSet>>,
}

impl Ctx<'_> {
    /// Hash; compress and seal only if the chunk is new.
    fn process(&self, piece: Piece) -> Done {
        let bytes = match piece {
            Piece::Zero(len) => return Done::Zero(len),
            Piece::Reuse(v) => return Done::Reuse(v),
            Piece::Data(bytes) => bytes,
        };
        let len = bytes.len() as u64;
        if is_zero(&bytes) {
            return Done::Zero(len);
        }
        let id = self.repo.keys().chunk_id(&bytes);
        if self.index.reusable(&id) || self.pending().contains(&id) {
            return Done::Known { len, id };
        }
        let level = self.repo.config().compression_level;
        let sealed = blob::seal_chunk(self.cipher, &id, &bytes, level);
        Done::New { len, id, sealed }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, IdSet> {
        // A set of ids stays whole whatever panicked while it was held.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one disk's pipeline made: its chunk list, its counters, and the
/// packs (positions in the session's index) of the chunks it reused.
pub(super) struct Collected {
    pub list: ChunkList,
    pub stats: BackupStats,
    pub reused_packs: BTreeSet<u32>,
}

/// Builds a disk's chunk list from results in disk order and feeds packs.
struct Collector<'p> {
    packer: &'p mut Packer,
    out: Collected,
}

impl<'p> Collector<'p> {
    fn new(packer: &'p mut Packer) -> Self {
        Collector {
            packer,
            out: Collected {
                list: ChunkList::new(),
                stats: BackupStats::default(),
                reused_packs: BTreeSet::new(),
            },
        }
    }

    /// Notes the pack of a chunk reused from the index: the snapshot's sync
    /// record lists it. A reused chunk the index does not know would make a
    /// snapshot that cannot be read: refused.
    fn reused(&mut self, id: &Id, ctx: &Ctx<'_>) -> Result<()> {
        let loc = ctx.index.get(id).ok_or(Error::MissingChunk(*id))?;
        self.out.reused_packs.insert(loc.pack());
        Ok(())
    }

    fn take(&mut self, done: Done, ctx: &Ctx<'_>) -> Result<()> {
        let out = &mut self.out;
        match done {
            Done::Zero(len) => out.list.push(len, None),
            Done::Reuse(v) => {
                for e in v {
                    if let Some(id) = &e.chunk {
                        self.out.stats.chunks_reused += 1;
                        self.reused(id, ctx)?;
                    }
                    self.out.list.push(e.len, e.chunk);
                }
            }
            Done::Known { len, id } => {
                out.stats.chunks_reused += 1;
                out.list.push(len, Some(id));
                // Known from this session's own packs, or from the index.
                if ctx.index.reusable(&id) {
                    self.reused(&id, ctx)?;
                }
            }
            Done::New { len, id, sealed } => {
                // Two workers may have sealed the same new chunk at once:
                // the first one to arrive here is stored, the other dropped.
                if ctx.pending().insert(id) {
                    out.stats.chunks_new += 1;
                    out.stats.bytes_new += len;
                    out.stats.bytes_stored += sealed.len() as u64;
                    self.packer.add(id, &sealed, ctx.cipher, ctx.repo)?;
                } else {
                    out.stats.chunks_reused += 1;
                }
                out.list.push(len, Some(id));
            }
        }
        Ok(())
    }
}

/// What the pipeline runs: pieces in stream order, and the bytes read
/// from the source for them.
pub trait Pieces: Iterator<Item = Result<Piece>> {
    fn bytes_read(&self) -> u64;
}

/// Runs `walk` through the pipeline on this thread alone.
pub(super) fn run_serial(
    ctx: &Ctx<'_>,
    packer: &mut Packer,
    walk: &mut dyn Pieces,
) -> Result<Collected> {
    let mut col = Collector::new(packer);
    for piece in &mut *walk {
        col.take(ctx.process(piece?), ctx)?;
    }
    col.out.stats.bytes_read = walk.bytes_read();
    Ok(col.out)
}

/// Pieces handed to a worker at once: until they hold this many data
/// bytes, or this many pieces. A file backup makes a chunk of each small
/// file, and one hand-off per chunk cost more in waking threads than the
/// chunk's own work (60k context switches for /usr/share); a disk's chunks
/// (1 MiB on average) still go one by one.
const BATCH_BYTES: usize = 1 << 20;
const BATCH_PIECES: usize = 64;

/// Runs `walk` through the pipeline: the walk on this thread, `threads`
/// workers and the collector on scoped threads.
pub(super) fn run_parallel(
    ctx: &Ctx<'_>,
    packer: &mut Packer,
    threads: usize,
    walk: &mut dyn Pieces,
) -> Result<Collected> {
    let in_flight = threads * 4 + 4;
    let (tokens_tx, tokens_rx) = bounded::<()>(in_flight);
    for _ in 0..in_flight {
        // Cannot fail: the channel has room for every token and is open.
        let _ = tokens_tx.send(());
    }
    let (work_tx, work_rx) = bounded::<(u64, Vec<Piece>)>(threads * 2);
    let (done_tx, done_rx) = bounded::<(u64, Vec<Done>)>(in_flight);
    let stopped = || Error::Invalid("backup pipeline stopped".into());
    let (walked, collected) = std::thread::scope(|s| {
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            s.spawn(move || {
                for (seq, pieces) in work_rx {
                    let done = pieces.into_iter().map(|p| ctx.process(p)).collect();
                    if done_tx.send((seq, done)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        drop(work_rx);
        // Owns the token sender: when it stops, a walker waiting for a token
        // wakes up to an error instead of waiting forever.
        let collector = s.spawn(move || -> Result<Collected> {
            let mut col = Collector::new(packer);
            let mut next = 0u64;
            let mut waiting = BTreeMap::new();
            for (seq, done) in done_rx {
                waiting.insert(seq, done);
                while let Some(batch) = waiting.remove(&next) {
                    for d in batch {
                        col.take(d, ctx)?;
                    }
                    next += 1;
                    // The walker may be gone (it failed): nothing waits.
                    let _ = tokens_tx.send(());
                }
            }
            Ok(col.out)
        });
        let mut seq = 0u64;
        let mut hand_out = |batch: Vec<Piece>| -> Result<()> {
            tokens_rx.recv().map_err(|_| stopped())?;
            work_tx.send((seq, batch)).map_err(|_| stopped())?;
            seq += 1;
            Ok(())
        };
        let walked = (|| -> Result<()> {
            let (mut batch, mut bytes) = (Vec::new(), 0);
            for piece in &mut *walk {
                let piece = piece?;
                if let Piece::Data(b) = &piece {
                    bytes += b.len();
                }
                batch.push(piece);
                if bytes >= BATCH_BYTES || batch.len() >= BATCH_PIECES {
                    hand_out(std::mem::take(&mut batch))?;
                    bytes = 0;
                }
            }
            if !batch.is_empty() {
                hand_out(batch)?;
            }
            Ok(())
        })();
        drop(work_tx);
        let collected = collector
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid("the backup collector panicked".into())));
        (walked, collected)
    });
    // The collector's error is the cause when the walk only saw it stop.
    let mut out = collected?;
    walked?;
    out.stats.bytes_read = walk.bytes_read();
    Ok(out)
}
