//! The write path: read -> chunk -> (hash, dedup check) -> compress ->
//! encrypt -> pack -> upload -> index -> chunk lists -> manifest.
//!
//! A [`BackupSession`] writes one snapshot of one or more disks. Each disk
//! is walked ([`walk`]: what to read, what to take from the parent) and its
//! pieces run through the [`pipeline`] into packs ([`packer`]).
//!
//! Write order makes a crash harmless: packs, then the index objects naming
//! them, then chunk lists, then the sync record, then the manifest. A run killed at any point
//! leaves at most unreferenced packs (and hidden temp files locally); the
//! next run simply stores those chunks again.
//!
//! Against a concurrent GC (`docs/gc.md`): the session marker is stored
//! before the index is loaded and removed only after the manifest, and a
//! chunk is reused only from packs no GC has condemned.

mod packer;
mod pipeline;
pub mod source;
pub mod walk;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use crate::error::Result;
use crate::format::chunklist::{self, ChunkList};
use crate::format::crypto::SessionCipher;
use crate::format::extent::Span;
use crate::format::id::Id;
use crate::format::index::DedupIndex;
use crate::format::snapshot::{self, BackupStats, DiskEntry, Snapshot, SnapshotMeta};
use crate::format::sync_record::SyncRecord;
use crate::format::{layout, object};
use crate::repo::markers::Session;
use crate::repo::Repository;
use packer::Packer;
pub(crate) use pipeline::Pieces;
use pipeline::{Collected, Ctx};
use source::BlockSource;
use walk::Walk;

#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    /// Worker threads for hashing/compression/encryption; 0 = one per core.
    pub threads: usize,
    /// Concurrent pack uploads; 0 = the backend's choice
    /// (`Backend::upload_concurrency`).
    pub uploaders: usize,
}

/// What to read of a disk.
pub enum Mode<'a> {
    /// Everything the source says holds data.
    Full,
    /// Only what changed since `parent`: `dirty` lists the ranges that
    /// may differ from the parent's content; everything else
    /// is taken from the parent's chunk list unread.
    Incremental {
        parent: &'a ChunkList,
        dirty: &'a [Span],
    },
}

/// Result of backing up one disk.
#[derive(Clone, Debug)]
pub struct DiskResult {
    pub name: String,
    pub size: u64,
    pub stats: BackupStats,
    /// True if an incremental was asked for but a full read was done.
    pub fell_back_to_full: bool,
}

/// One backup run writing one snapshot (of one or more disks).
pub struct BackupSession<'r> {
    repo: &'r Repository,
    /// Removed when the session ends: after `finish` stored the manifest.
    _marker: Session<'r>,
    index: Arc<DedupIndex>,
    cipher: Arc<SessionCipher>,
    threads: usize,
    packer: Packer,
    lists: Vec<(DiskEntry, ChunkList)>,
    /// Which of `lists` is the NVRAM (stored beside the disks).
    nvram: Option<usize>,
    stats: BackupStats,
    /// Packs (positions in `index`) of the chunks reused from it.
    reused_packs: BTreeSet<u32>,
    started: Instant,
}

impl<'r> BackupSession<'r> {
    pub fn new(repo: &'r Repository, opts: &BackupOptions) -> Result<Self> {
        let marker = Session::begin(repo.backend().as_ref())?;
        // A fresh index with the condemned records as they are now, read
        // after the marker is visible.
        let index = Arc::new(repo.dedup_index()?);
        let cipher = Arc::new(repo.keys().session());
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            opts.threads
        };
        Ok(BackupSession {
            repo,
            _marker: marker,
            index,
            cipher,
            threads,
            packer: Packer::new(repo, opts.uploaders),
            lists: Vec::new(),
            nvram: None,
            stats: BackupStats::default(),
            reused_packs: BTreeSet::new(),
            started: Instant::now(),
        })
    }

    /// Backs up one disk into this session.
    pub fn backup_disk(
        &mut self,
        name: &str,
        source: &mut dyn BlockSource,
        mode: Mode<'_>,
    ) -> Result<DiskResult> {
        let t0 = Instant::now();
        let size = source.size();
        let mut fell_back = false;
        let (parent, dirty) = match mode {
            Mode::Full => (None, &[Span::new(0, size)][..]),
            Mode::Incremental { parent, dirty } if parent.size() == size => (Some(parent), dirty),
            Mode::Incremental { parent, .. } => {
                tracing::warn!(
                    "disk {name}: size changed ({} -> {size}), reading it whole",
                    parent.size()
                );
                fell_back = true;
                (None, &[Span::new(0, size)][..])
            }
        };
        let mut walk = Walk::new(source, self.repo.chunker(), parent, dirty);
        let mut stats = self.run(name, Some(size), &mut walk)?;
        stats.seconds = t0.elapsed().as_secs_f64();
        Ok(DiskResult {
            name: name.to_string(),
            size,
            stats,
            fell_back_to_full: fell_back,
        })
    }

    /// Runs `pieces` (a stream of `expected` bytes, if known) through the pipeline and
    /// keeps its chunk list as the snapshot's stream `name`.
    pub(crate) fn run(
        &mut self,
        name: &str,
        expected: Option<u64>,
        pieces: &mut dyn Pieces,
    ) -> Result<BackupStats> {
        let ctx = Ctx {
            repo: self.repo,
            index: &self.index,
            cipher: &self.cipher,
            pending: self.packer.pending.clone(),
        };
        let Collected {
            list,
            stats,
            reused_packs,
        } = if self.threads <= 1 {
            pipeline::run_serial(&ctx, &mut self.packer, pieces)?
        } else {
            pipeline::run_parallel(&ctx, &mut self.packer, self.threads, pieces)?
        };
        let size = list.size();
        if expected.is_some_and(|n| n != size) {
            return Err(crate::error::Error::Invalid(format!(
                "stream {name}: {size} bytes chunked, {expected:?} expected"
            )));
        }
        self.reused_packs.extend(reused_packs);
        add_stats(&mut self.stats, &stats);
        let entry = DiskEntry {
            name: name.to_string(),
            size,
            chunk_list: Id::random(),
            data_bytes: list
                .extents()
                .iter()
                .filter(|e| e.chunk.is_some())
                .map(|e| e.len)
                .sum(),
            chunks: list.extents().iter().filter(|e| e.chunk.is_some()).count() as u64,
            checkpoint: None,
        };
        self.lists.push((entry, list));
        Ok(stats)
    }

    /// The index this session reuses chunks from.
    pub(crate) fn index(&self) -> Arc<DedupIndex> {
        self.index.clone()
    }

    /// The length of the last stream run.
    pub(crate) fn last_stream_size(&self) -> Option<u64> {
        self.lists.last().map(|(e, _)| e.size)
    }

    /// Backs up a VM's UEFI variable store (read whole), kept in the
    /// manifest beside the disks rather than as one of them.
    pub fn backup_nvram(&mut self, source: &mut dyn BlockSource) -> Result<()> {
        self.backup_disk("nvram", source, Mode::Full)?;
        self.nvram = Some(self.lists.len() - 1);
        Ok(())
    }

    /// Records the checkpoint the last backed-up disk ends at.
    pub fn set_checkpoint(&mut self, disk: &str, checkpoint: &str) {
        if let Some((e, _)) = self.lists.iter_mut().find(|(e, _)| e.name == disk) {
            e.checkpoint = Some(checkpoint.to_string());
        }
    }

    /// Stores remaining packs, the index, chunk lists and the manifest.
    pub fn finish(mut self, meta: SnapshotMeta) -> Result<Snapshot> {
        self.packer.close(self.repo, &self.cipher)?;
        let mut disks = Vec::new();
        let mut nvram = None;
        for (i, (entry, list)) in self.lists.iter().enumerate() {
            let sealed = object::seal(&self.cipher, chunklist::KIND, &list.encode());
            self.repo
                .put_sealed(&layout::chunk_list(&entry.chunk_list), &sealed)?;
            if self.nvram == Some(i) {
                nvram = Some(entry.clone());
            } else {
                disks.push(entry.clone());
            }
        }
        self.stats.seconds = self.started.elapsed().as_secs_f64();
        let snap = Snapshot {
            version: 1,
            id: Id::random(),
            source: meta.source,
            host: crate::hostname(),
            owner: crate::username(),
            time: meta.time.unwrap_or_else(chrono::Utc::now),
            policy: meta.policy,
            parent: meta.parent,
            domain_xml: meta.domain_xml,
            key_fingerprint: self.repo.keys().fingerprint().to_string(),
            disks,
            nvram,
            files: meta.files,
            stats: self.stats.clone(),
        };
        // The sync record, then the manifest last.
        let packs = self
            .reused_packs
            .iter()
            .map(|&p| self.index.packs()[p as usize].id);
        let record = SyncRecord::new(
            &snap,
            packs.chain(self.packer.written().iter().copied()).collect(),
        );
        crate::repo::sync_records::put(self.repo.backend().as_ref(), &record)?;
        let json = serde_json::to_vec(&snap).expect("serialize manifest");
        let sealed = object::seal(&self.cipher, snapshot::KIND, &json);
        self.repo.put_sealed(&layout::snapshot(&snap.id), &sealed)?;
        self.repo.invalidate_index();
        Ok(snap)
    }
}

fn add_stats(total: &mut BackupStats, s: &BackupStats) {
    total.bytes_read += s.bytes_read;
    total.bytes_new += s.bytes_new;
    total.bytes_stored += s.bytes_stored;
    total.chunks_new += s.chunks_new;
    total.chunks_reused += s.chunks_reused;
}
