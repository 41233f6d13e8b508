//! The pipeline for one disk: the walk's pieces are hashed and, only if the
//! repository does not know them yet, compressed and sealed by workers; one
//! collector puts the results back in disk order, feeds the packer and
//! builds the chunk list.
//!
//! Threads: the calling thread walks the source; `threads` workers process
//! pieces; the collector runs on its own thread. A fixed number of tokens
//! bounds the pieces in flight, so memory stays flat whatever the disk size.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crossbeam_channel::bounded;

use super::packer::Packer;
use super::walk::{is_zero, Piece, Walk};
use crate::error::{Error, Result};
use crate::format::blob;
use crate::format::chunklist::{ChunkList, Extent};
use crate::format::crypto::SessionCipher;
use crate::format::id::{Id, IdSet};
use crate::format::index::Index;
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
    pub index: &'a Index,
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

/// Builds a disk's chunk list from results in disk order and feeds packs.
struct Collector<'p> {
    packer: &'p mut Packer,
    list: ChunkList,
    stats: BackupStats,
}

impl<'p> Collector<'p> {
    fn new(packer: &'p mut Packer) -> Self {
        Collector {
            packer,
            list: ChunkList::new(),
            stats: BackupStats::default(),
        }
    }

    fn take(&mut self, done: Done, ctx: &Ctx<'_>) -> Result<()> {
        match done {
            Done::Zero(len) => self.list.push(len, None),
            Done::Reuse(v) => {
                for e in v {
                    if e.chunk.is_some() {
                        self.stats.chunks_reused += 1;
                    }
                    self.list.push(e.len, e.chunk);
                }
            }
            Done::Known { len, id } => {
                self.stats.chunks_reused += 1;
                self.list.push(len, Some(id));
            }
            Done::New { len, id, sealed } => {
                // Two workers may have sealed the same new chunk at once:
                // the first one to arrive here is stored, the other dropped.
                if ctx.pending().insert(id) {
                    self.stats.chunks_new += 1;
                    self.stats.bytes_new += len;
                    self.stats.bytes_stored += sealed.len() as u64;
                    self.packer.add(id, &sealed, ctx.cipher, ctx.repo)?;
                } else {
                    self.stats.chunks_reused += 1;
                }
                self.list.push(len, Some(id));
            }
        }
        Ok(())
    }
}

/// Runs `walk` through the pipeline on this thread alone.
pub(super) fn run_serial(
    ctx: &Ctx<'_>,
    packer: &mut Packer,
    mut walk: Walk<'_>,
) -> Result<(ChunkList, BackupStats)> {
    let mut col = Collector::new(packer);
    for piece in &mut walk {
        col.take(ctx.process(piece?), ctx)?;
    }
    col.stats.bytes_read = walk.bytes_read();
    Ok((col.list, col.stats))
}

/// Runs `walk` through the pipeline: the walk on this thread, `threads`
/// workers and the collector on scoped threads.
pub(super) fn run_parallel(
    ctx: &Ctx<'_>,
    packer: &mut Packer,
    threads: usize,
    mut walk: Walk<'_>,
) -> Result<(ChunkList, BackupStats)> {
    let in_flight = threads * 4 + 4;
    let (tokens_tx, tokens_rx) = bounded::<()>(in_flight);
    for _ in 0..in_flight {
        // Cannot fail: the channel has room for every token and is open.
        let _ = tokens_tx.send(());
    }
    let (work_tx, work_rx) = bounded::<(u64, Piece)>(threads * 2);
    let (done_tx, done_rx) = bounded::<(u64, Done)>(in_flight);
    let stopped = || Error::Invalid("backup pipeline stopped".into());
    let (walked, collected) = std::thread::scope(|s| {
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            s.spawn(move || {
                for (seq, piece) in work_rx {
                    if done_tx.send((seq, ctx.process(piece))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        drop(work_rx);
        // Owns the token sender: when it stops, a walker waiting for a token
        // wakes up to an error instead of waiting forever.
        let collector = s.spawn(move || -> Result<(ChunkList, BackupStats)> {
            let mut col = Collector::new(packer);
            let mut next = 0u64;
            let mut waiting = BTreeMap::new();
            for (seq, done) in done_rx {
                waiting.insert(seq, done);
                while let Some(d) = waiting.remove(&next) {
                    col.take(d, ctx)?;
                    next += 1;
                    // The walker may be gone (it failed): nothing waits.
                    let _ = tokens_tx.send(());
                }
            }
            Ok((col.list, col.stats))
        });
        let walked = (&mut walk).enumerate().try_for_each(|(seq, piece)| {
            let piece = piece?;
            tokens_rx.recv().map_err(|_| stopped())?;
            work_tx.send((seq as u64, piece)).map_err(|_| stopped())
        });
        drop(work_tx);
        let collected = collector
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid("the backup collector panicked".into())));
        (walked, collected)
    });
    // The collector's error is the cause when the walk only saw it stop.
    let (list, mut stats) = collected?;
    walked?;
    stats.bytes_read = walk.bytes_read();
    Ok((list, stats))
}
