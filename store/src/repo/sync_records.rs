//! Snapshots' sync records on a backend (`sync/<snapshot id>.<generation>`,
//! [`SyncRecord`]): plain objects that need no key, so the sync reads them
//! and GC and prune keep them, below [`crate::repo::Repository`].

use std::collections::BTreeMap;

use crate::backend::{Backend, BackendError};
use crate::error::Result;
use crate::format::id::Id;
use crate::format::layout::{self, SYNC};
use crate::format::sync_record::SyncRecord;
use crate::repo::condemned::delete_if_there;

/// The object name of the newest generation of each snapshot's record.
pub fn newest(backend: &dyn Backend) -> Result<BTreeMap<Id, String>> {
    let mut out: BTreeMap<Id, (u32, String)> = BTreeMap::new();
    for o in backend.list(SYNC)? {
        let Some((id, g)) = layout::sync_record_of(&o.name) else {
            continue; // not a record of ours
        };
        match out.get(&id) {
            Some((have, _)) if *have >= g => {}
            _ => {
                out.insert(id, (g, o.name));
            }
        }
    }
    Ok(out.into_iter().map(|(id, (_, n))| (id, n)).collect())
}

/// The record stored as `name`; `None` when it is gone (pruned, or
/// replaced by a newer generation meanwhile).
pub fn load(backend: &dyn Backend, name: &str) -> Result<Option<SyncRecord>> {
    match backend.get(name) {
        Ok(b) => Ok(Some(SyncRecord::decode(&b, name)?)),
        Err(BackendError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn put(backend: &dyn Backend, r: &SyncRecord) -> Result<()> {
    backend.put(&layout::sync_record(&r.snapshot, r.generation), &r.encode())?;
    Ok(())
}

/// Writes `r` with its packs replaced by `packs` as the next generation,
/// then deletes the older ones (a reader between the two finds either).
pub fn replace(backend: &dyn Backend, r: &SyncRecord, mut packs: Vec<Id>) -> Result<()> {
    packs.sort();
    packs.dedup();
    let next = SyncRecord {
        generation: r.generation + 1,
        packs,
        ..r.clone()
    };
    put(backend, &next)?;
    for g in 0..next.generation {
        delete_if_there(backend, &layout::sync_record(&r.snapshot, g))?;
    }
    Ok(())
}

/// Deletes every generation of a snapshot's record.
pub fn delete_all(backend: &dyn Backend, snapshot: &Id) -> Result<()> {
    for o in backend.list(&format!("{SYNC}{snapshot}."))? {
        delete_if_there(backend, &o.name)?;
    }
    Ok(())
}
