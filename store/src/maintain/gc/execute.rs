//! Carrying out a [`GcPlan`], in the order that makes a crash harmless:
//! repack (new packs and their index first), condemn, then sweep (index
//! objects rewritten before packs are deleted, rule 4), then settle the
//! records.

use super::plan::{Action, GcPlan, Packs};
use super::GcReport;
use crate::error::{Error, Result};
use crate::format::crypto::{Opener, SessionCipher};
use crate::format::id::{Id, IdSet};
use crate::format::pack::{PackInfo, PackWriter};
use crate::format::{blob, index, layout, object};
use crate::repo::condemned::{self, delete_if_there};
use crate::repo::{IndexObject, Repository};

impl GcPlan {
    /// Does what the plan says; the report of the run.
    pub fn execute(self, repo: &Repository, progress: &dyn Fn(&str)) -> Result<GcReport> {
        let backend = repo.backend().as_ref();
        let repack = self.packs_where(|a| matches!(a, Action::Repack { .. }));
        if !repack.is_empty() {
            progress("repacking");
            repack_packs(repo, &self.packs, &repack, &self.live)?;
        }
        let condemn = self.packs_where(|a| matches!(a, Action::Condemn | Action::Repack { .. }));
        if !condemn.is_empty() {
            progress("condemning");
            condemned::write(backend, repo.keys(), condemn)?;
        }
        let doomed: IdSet = self
            .packs_where(|a| *a == Action::Delete)
            .into_iter()
            .collect();
        let mut rewritten = 0;
        if !doomed.is_empty() {
            progress("deleting");
            rewritten = sweep(repo, &self.objects, &doomed)?;
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

/// Copies the live chunks of `victims` into new packs under a fresh session
/// key, and indexes them, before the victims are condemned.
fn repack_packs(repo: &Repository, packs: &Packs, victims: &[Id], live: &IdSet) -> Result<()> {
    let cipher = repo.keys().session();
    let pack_size = repo.config().pack_size as usize;
    let mut written: Vec<PackInfo> = Vec::new();
    let mut w = PackWriter::new(&cipher, pack_size);
    let mut seen = IdSet::default();
    for p in victims {
        let Some(info) = packs.info.get(p) else {
            continue;
        };
        let bytes = repo.backend().get(&layout::pack(p))?;
        let opener = Opener::new(repo.keys(), &info.salt);
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
    let sealed = object::seal(cipher, index::KIND, &index::encode(packs));
    repo.backend().put(&layout::index(&Id::random()), &sealed)?;
    Ok(())
}

/// Deletes `doomed` packs: first the index objects that name them are
/// replaced by ones that do not, then the packs go (rule 4). Returns how
/// many index objects were rewritten.
fn sweep(repo: &Repository, objects: &[IndexObject], doomed: &IdSet) -> Result<usize> {
    let backend = repo.backend().as_ref();
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
