//! A snapshot's sync record (`sync/<snapshot id>.<generation>`): what a
//! sync needs to copy the snapshot without the key, in the clear: the
//! snapshot's group and time (for `--source`, `--policy`, `--since`,
//! `--transfer-last`), the names of its chunk lists and every pack holding
//! one of its chunks. Written by the backup before the manifest; written
//! again (the next generation, then the older one deleted) by a GC that
//! moved the snapshot's chunks into other packs; deleted by prune after
//! the manifest. `docs/format.md` says what this reveals.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::id::Id;
use crate::format::snapshot::Snapshot;

pub const VERSION: u32 = 1;
/// A record this large is not one we wrote (a 1 TiB disk of 16 MiB packs
/// lists 65k packs: a few MiB).
pub const MAX_LEN: usize = 256 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    pub version: u32,
    pub snapshot: Id,
    pub generation: u32,
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub host: String,
    pub time: DateTime<Utc>,
    /// The snapshot's chunk lists (disks and NVRAM).
    pub chunk_lists: Vec<Id>,
    /// Every pack holding one of its chunks.
    pub packs: Vec<Id>,
}

impl SyncRecord {
    /// The first generation of `snap`'s record, its chunks in `packs`.
    pub fn new(snap: &Snapshot, mut packs: Vec<Id>) -> Self {
        packs.sort();
        packs.dedup();
        SyncRecord {
            version: VERSION,
            snapshot: snap.id,
            generation: 0,
            source: snap.source.clone(),
            policy: snap.policy.clone(),
            host: snap.host.clone(),
            time: snap.time,
            chunk_lists: snap.chunk_lists().map(|d| d.chunk_list).collect(),
            packs,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serialize sync record")
    }

    /// Reads a record stored as `name`, which must be its own.
    pub fn decode(bytes: &[u8], name: &str) -> Result<Self> {
        if bytes.len() > MAX_LEN {
            return Err(Error::corrupt(name, "too large for a sync record"));
        }
        let r: SyncRecord =
            serde_json::from_slice(bytes).map_err(|e| Error::corrupt(name, e.to_string()))?;
        if r.version != VERSION {
            return Err(Error::corrupt(
                name,
                format!("sync record version {}", r.version),
            ));
        }
        if crate::format::layout::sync_record_of(name) != Some((r.snapshot, r.generation)) {
            return Err(Error::corrupt(name, "the record is not this object's"));
        }
        Ok(r)
    }

    /// The retention group, as [`Snapshot::group`].
    pub fn group(&self) -> (&str, Option<&str>) {
        (&self.source, self.policy.as_deref())
    }
}
