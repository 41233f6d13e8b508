//! Carrying out a [`SyncPlan`], snapshot by snapshot, each complete or
//! absent: packs (in parallel, each checked on arrival), an index object
//! for the packs the destination has not indexed, chunk lists, the sync
//! record, the manifest last.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::plan::{SnapshotPlan, SyncPlan};
use super::{Failure, SyncOptions, SyncReport};
use crate::backend::{Backend, BackendError};
use crate::error::{Error, Result};
use crate::format::id::{Id, IdSet};
use crate::format::index::{self, Frame};
use crate::format::layout;
use crate::format::pack::PackObject;
use crate::format::sync_record::SyncRecord;
use crate::repo::condemned::delete_if_there;
use crate::repo::sync_records;

/// What a sync tells whoever watches it (a progress bar).
pub trait Progress: Sync {
    /// The plan, before anything is copied.
    fn planned(&self, _plan: &SyncPlan) {}
    /// `bytes` more were written to the destination.
    fn copied(&self, _bytes: u64) {}
    /// A snapshot is done (`Err`: not copied, and why).
    fn snapshot(&self, _record: &SyncRecord, _outcome: &Result<()>) {}
}

/// A sync nobody watches.
impl Progress for () {}

impl SyncPlan {
    /// Copies every planned snapshot (one that fails is reported and the
    /// others go on), then removes the vanished ones if asked.
    pub fn execute(
        self,
        src: &dyn Backend,
        dst: &dyn Backend,
        opts: &SyncOptions,
        progress: &dyn Progress,
    ) -> Result<SyncReport> {
        let mut report = SyncReport {
            snapshots_selected: self.selected,
            snapshots_skipped: self.skipped,
            snapshots_unavailable: self.unrecorded,
            ..Default::default()
        };
        let parallel = match opts.parallel {
            0 => super::default_parallel(src, dst),
            n => n,
        };
        let mut copier = Copier {
            src,
            dst,
            limit: opts.rate_mib_per_sec.map(Limiter::new),
            parallel: parallel.max(1),
            progress,
            dst_packs: Mutex::new(self.dst_packs.clone()),
            dst_indexed: self.dst_indexed.clone(),
            dst_meta: &self.dst_meta,
            report: Mutex::new(Counts::default()),
        };
        for s in &self.snapshots {
            let r = copier.snapshot(s, &self);
            progress.snapshot(&s.record, &r);
            match r {
                Ok(()) => report.snapshots_copied += 1,
                Err(Error::SnapshotNotFound(_)) => report.snapshots_unavailable += 1,
                Err(e) => report.snapshots_failed.push(Failure {
                    snapshot: s.record.snapshot,
                    source: s.record.source.clone(),
                    error: e.to_string(),
                }),
            }
        }
        for v in &self.vanished {
            remove(dst, v)?;
            report.snapshots_removed += 1;
        }
        let c = copier
            .report
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        report.packs_copied = c.packs;
        report.chunks_copied = c.chunks;
        report.bytes_copied = c.bytes;
        Ok(report)
    }
}

#[derive(Default)]
struct Counts {
    packs: usize,
    chunks: u64,
    bytes: u64,
}

struct Copier<'a> {
    src: &'a dyn Backend,
    dst: &'a dyn Backend,
    limit: Option<Limiter>,
    parallel: usize,
    progress: &'a dyn Progress,
    /// Packs at the destination now (grows as packs arrive).
    dst_packs: Mutex<IdSet>,
    /// Packs the destination's index frames now.
    dst_indexed: IdSet,
    /// Chunk lists and sync records the destination had when planned.
    dst_meta: &'a BTreeSet<String>,
    report: Mutex<Counts>,
}

impl Copier<'_> {
    /// One snapshot, complete or absent. `SnapshotNotFound`: pruned at the
    /// source meanwhile.
    fn snapshot(&mut self, s: &SnapshotPlan, plan: &SyncPlan) -> Result<()> {
        if let Some(why) = &s.blocked {
            return Err(Error::Invalid(why.clone()));
        }
        let r = &s.record;
        self.packs(&r.packs, plan)?;
        self.index(&r.packs, plan)?;
        let written = self.metadata(r);
        if written.is_err() {
            // Nothing names what was copied without the manifest; the
            // destination's GC takes the packs, these go now.
            for id in &r.chunk_lists {
                delete_if_there(self.dst, &layout::chunk_list(id))?;
            }
            sync_records::delete_all(self.dst, &r.snapshot)?;
        }
        written
    }

    /// Copies the packs of `packs` the destination lacks, `parallel` at
    /// a time; the first failure wins (the others stop after their pack).
    fn packs(&self, packs: &[Id], plan: &SyncPlan) -> Result<()> {
        let todo: Vec<&Frame> = {
            let have = self.dst_packs.lock().unwrap_or_else(|p| p.into_inner());
            packs
                .iter()
                .filter(|p| !have.contains(p))
                .filter_map(|p| plan.frames.get(p))
                .collect()
        };
        crate::repo::for_each_parallel(&todo, self.parallel, |f| self.pack(f))
    }

    /// One pack: read, checked against its frame, written.
    fn pack(&self, f: &Frame) -> Result<()> {
        let name = layout::pack(&f.pack);
        let bytes = self.src.get(&name).map_err(|e| match e {
            BackendError::NotFound(_) => Error::Invalid(format!(
                "pack {} is gone at the source (a GC there removed it since the \
                 snapshot's sync record was read): the next sync reads the new record",
                f.pack.short()
            )),
            e => e.into(),
        })?;
        if let Some(want) = f.object() {
            let got = PackObject::of(&bytes);
            if got != want {
                return Err(Error::corrupt(
                    format!("pack {} at the source", f.pack.short()),
                    format!(
                        "{} bytes with SHA-256 {}, the index says {} bytes with {}: not copied",
                        got.size,
                        hex::encode(got.sha256),
                        want.size,
                        hex::encode(want.sha256)
                    ),
                ));
            }
        }
        self.put(&name, &bytes)?;
        self.dst_packs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(f.pack);
        let mut c = self.report.lock().unwrap_or_else(|p| p.into_inner());
        c.packs += 1;
        c.chunks += u64::from(f.blobs);
        Ok(())
    }

    /// An index object for the packs of `packs` the destination's index
    /// does not frame yet (their records, as the source sealed them).
    fn index(&mut self, packs: &[Id], plan: &SyncPlan) -> Result<()> {
        let frames: Vec<&Frame> = packs
            .iter()
            .filter(|p| !self.dst_indexed.contains(p))
            .filter_map(|p| plan.frames.get(p))
            .collect();
        if frames.is_empty() {
            return Ok(());
        }
        self.put(
            &layout::index(&Id::random()),
            &index::assemble(frames.iter().copied()),
        )?;
        self.dst_indexed.extend(frames.iter().map(|f| f.pack));
        Ok(())
    }

    /// Chunk lists, the sync record, then the manifest.
    fn metadata(&self, r: &SyncRecord) -> Result<()> {
        for id in &r.chunk_lists {
            let name = layout::chunk_list(id);
            if !self.dst_meta.contains(&name) {
                self.copy_object(&name, r)?;
            }
        }
        let name = layout::sync_record(&r.snapshot, r.generation);
        if !self.dst_meta.contains(&name) {
            self.put(&name, &r.encode())?;
        }
        self.copy_object(&layout::snapshot(&r.snapshot), r)
    }

    /// Copies one object of snapshot `r` as it is; `SnapshotNotFound` when
    /// the source no longer has it (pruned meanwhile).
    fn copy_object(&self, name: &str, r: &SyncRecord) -> Result<()> {
        let bytes = match self.src.get(name) {
            Ok(b) => b,
            Err(BackendError::NotFound(_)) => {
                return Err(Error::SnapshotNotFound(r.snapshot.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        self.put(name, &bytes)
    }

    /// Writes an object at the destination, paced by the rate limit. One
    /// there already (an earlier run that was killed) is the same bytes:
    /// names are never reused.
    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        if let Some(l) = &self.limit {
            l.take(bytes.len() as u64);
        }
        match self.dst.put(name, bytes) {
            Ok(()) => {}
            Err(BackendError::AlreadyExists(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        self.report.lock().unwrap_or_else(|p| p.into_inner()).bytes += bytes.len() as u64;
        self.progress.copied(bytes.len() as u64);
        Ok(())
    }
}

/// `--remove-vanished`: a destination snapshot the source no longer has
/// goes as prune removes one (manifest first).
fn remove(dst: &dyn Backend, r: &SyncRecord) -> Result<()> {
    delete_if_there(dst, &layout::snapshot(&r.snapshot))?;
    for id in &r.chunk_lists {
        delete_if_there(dst, &layout::chunk_list(id))?;
    }
    sync_records::delete_all(dst, &r.snapshot)
}

/// Paces writes to `rate` bytes per second on average since the start.
struct Limiter {
    rate: f64,
    start: Instant,
    sent: Mutex<u64>,
}

impl Limiter {
    fn new(mib_per_sec: f64) -> Self {
        Limiter {
            rate: mib_per_sec * (1 << 20) as f64,
            start: Instant::now(),
            sent: Mutex::new(0),
        }
    }

    /// Waits until `n` more bytes fit the rate.
    fn take(&self, n: u64) {
        let due = {
            let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            *sent += n;
            Duration::from_secs_f64(*sent as f64 / self.rate)
        };
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}
