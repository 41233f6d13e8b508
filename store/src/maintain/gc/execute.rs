//! Carrying out a [`GcPlan`], in the order that makes a crash harmless:
//! repack (new packs and their index first), condemn, then sweep (index
//! objects rewritten before packs are deleted, rule 4), then settle the
//! records.

use super::packs::Packs;
use super::plan::{Action, GcPlan};
use super::table::ChunkTable;
use super::GcReport;
use crate::backend::BackendError;
use crate::error::{Error, Result};
use crate::format::crypto::{Opener, SessionCipher};
use crate::format::id::{Id, IdSet};
use crate::format::index::Index;
use crate::format::pack::{PackInfo, PackWriter};
use crate::format::snapshot::Snapshot;
use crate::format::sync_record::SyncRecord;
use crate::format::{blob, index, layout};
use crate::repo::condemned::{self, delete_if_there};
use crate::repo::sync_records;
use crate::repo::Repository;

impl GcPlan {
    /// Does what the plan says; the report of the run.
    pub fn execute(mut self, repo: &Repository, progress: &dyn Fn(&str)) -> Result<GcReport> {
        let backend = repo.backend().as_ref();
        let repack = self.packs_where(|a| matches!(a, Action::Repack { .. }));
        if !repack.is_empty() {
            progress("repacking");
            repack_packs(repo, &self.packs, &repack, &self.table)?;
        }
        // The marks are done with: room for the index the sync records need.
        self.table = ChunkTable::default();
        let condemn = self.packs_where(|a| matches!(a, Action::Condemn | Action::Repack { .. }));
        if !condemn.is_empty() {
            progress("condemning");
            condemned::write(backend, condemn)?;
        }
        progress("sync records");
        let moved: IdSet = repack.iter().copied().collect();
        keep_sync_records(repo, &self.snapshots, &moved)?;
        let doomed: IdSet = self
            .packs_where(|a| *a == Action::Delete)
            .into_iter()
            .collect();
        let mut rewritten = 0;
        if !doomed.is_empty() {
            progress("deleting");
            rewritten = sweep(repo, &self.packs, &doomed)?;
        }
        // Every settled record's packs are gone or resurrected.
        for name in &self.settled {
            delete_if_there(backend, name)?;
        }
        repo.invalidate_index();
        let mut report = self.into_report();
        report.index_objects_rewritten = rewritten;
        Ok(report)
    }
}

/// Writes the sync record of every snapshot whose chunks moved out of a
/// repacked pack (the next generation, listing their new packs), and of
/// every snapshot that has none (made before backups wrote them). Runs
/// after the repacked packs are condemned, so the index prefers the new
/// copies; a sync that read the older generation still finds the old
/// packs until a later sweep.
fn keep_sync_records(repo: &Repository, snapshots: &[Snapshot], moved: &IdSet) -> Result<()> {
    let backend = repo.backend().as_ref();
    let newest = sync_records::newest(backend)?;
    let mut index = None;
    for snap in snapshots {
        let record = match newest.get(&snap.id) {
            Some(name) if !moved.is_empty() => sync_records::load(backend, name)?,
            Some(_) => continue,
            None => None,
        };
        if record
            .as_ref()
            .is_some_and(|r| !r.packs.iter().any(|p| moved.contains(p)))
        {
            continue;
        }
        let index = match &index {
            Some(ix) => ix,
            None => {
                repo.invalidate_index();
                index.insert(repo.index()?)
            }
        };
        let packs = match packs_of(repo, index, snap) {
            // Pruned since the plan listed it: nothing to keep.
            Err(Error::Backend(BackendError::NotFound(_)))
                if !backend.exists(&layout::snapshot(&snap.id))? =>
            {
                continue
            }
            r => r?,
        };
        match record {
            Some(r) => sync_records::replace(backend, &r, packs)?,
            None => sync_records::put(backend, &SyncRecord::new(snap, packs))?,
        }
    }
    Ok(())
}

/// The packs the index reads `snap`'s chunks from.
fn packs_of(repo: &Repository, index: &Index, snap: &Snapshot) -> Result<Vec<Id>> {
    let mut packs = IdSet::default();
    for d in snap.chunk_lists() {
        let list = repo.load_chunk_list(&d.chunk_list)?;
        for id in list.extents().iter().filter_map(|e| e.chunk.as_ref()) {
            let loc = index.get(id).ok_or(Error::MissingChunk(*id))?;
            packs.insert(index.pack(&loc).id);
        }
    }
    Ok(packs.into_iter().collect())
}

/// Copies the live chunks of `victims` into new packs under a fresh session
/// key, and indexes them, before the victims are condemned.
fn repack_packs(repo: &Repository, packs: &Packs, victims: &[Id], live: &ChunkTable) -> Result<()> {
    let cipher = repo.keys().session();
    let pack_size = repo.config().pack_size as usize;
    let mut written: Vec<PackInfo> = Vec::new();
    let mut w = PackWriter::new(&cipher, pack_size);
    let mut seen = IdSet::default();
    let infos = packs.infos(repo, victims)?;
    for p in victims {
        let Some(info) = infos.get(p) else {
            continue;
        };
        let bytes = repo.backend().get(&layout::pack(p))?;
        let opener = Opener::new(repo.keys(), &info.salt);
        for b in &info.blobs {
            if !live.is_live(&b.id) || !seen.insert(b.id) {
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
        put_index(repo, &cipher, &written)?;
    }
    Ok(())
}

fn store_pack(repo: &Repository, w: PackWriter, cipher: &SessionCipher) -> Result<PackInfo> {
    let (bytes, info) = w.finish(cipher);
    repo.backend().put(&layout::pack(&info.id), &bytes)?;
    Ok(info)
}

fn put_index(repo: &Repository, cipher: &SessionCipher, packs: &[PackInfo]) -> Result<()> {
    let sealed = index::seal(cipher, packs);
    repo.backend().put(&layout::index(&Id::random()), &sealed)?;
    Ok(())
}

/// Deletes `doomed` packs: first the index objects that name them are
/// replaced by ones that do not, then the packs go (rule 4). Returns how
/// many index objects were rewritten.
fn sweep(repo: &Repository, packs: &Packs, doomed: &IdSet) -> Result<usize> {
    let backend = repo.backend().as_ref();
    let cipher = repo.keys().session();
    let mut rewritten = 0;
    for name in packs.objects_listing(doomed) {
        let keep: Vec<PackInfo> = repo
            .load_index_object(name)?
            .into_iter()
            .filter(|p| !doomed.contains(&p.id))
            .collect();
        if !keep.is_empty() {
            put_index(repo, &cipher, &keep)?;
        }
        delete_if_there(backend, name)?;
        rewritten += 1;
    }
    for p in doomed {
        delete_if_there(backend, &layout::pack(p))?;
    }
    Ok(rewritten)
}
