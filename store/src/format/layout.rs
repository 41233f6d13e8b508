//! Where each kind of object lives in a repository: the one place that
//! names them. Every name is fixed at write time and never reused, so
//! backends and caches may rely on an object never changing.

use crate::format::id::Id;

/// Public settings (unencrypted): chunker sizes, repository id.
pub const CONFIG: &str = "config";
/// Key slots: the master key wrapped by a passphrase or key file.
pub const KEYS: &str = "keys/";
/// Index objects: which pack holds each chunk.
pub const INDEX: &str = "index/";
/// Snapshot manifests.
pub const SNAPSHOTS: &str = "snapshots/";
/// Per-disk chunk lists of snapshots.
pub const CHUNK_LISTS: &str = "chunklists/";
/// Packs of sealed chunks, fanned out by the first byte of their id.
pub const DATA: &str = "data/";
/// Markers of backups in flight (`docs/gc.md`).
pub const SESSIONS: &str = "sessions/";
/// Records of packs a GC condemned.
pub const GC_CONDEMNED: &str = "gc/condemned-";
/// The lock of the GC running now.
pub const GC_LOCK: &str = "gc/lock-";

/// Sync records: what a sync needs of each snapshot, in the clear.
pub const SYNC: &str = "sync/";

/// Reports of restore drills, sealed, beside the snapshot each proved.
pub const DRILLS: &str = "drills/";

/// Boot sets recorded by live restores, sealed, beside their snapshot.
pub const BOOT_SETS: &str = "bootsets/";

/// Metadata a local cache may keep whole (small, read often).
pub const METADATA: [&str; 4] = [INDEX, SNAPSHOTS, CHUNK_LISTS, KEYS];

pub fn key(id: &Id) -> String {
    format!("{KEYS}{id}")
}

pub fn index(id: &Id) -> String {
    format!("{INDEX}{id}")
}

pub fn snapshot(id: &Id) -> String {
    format!("{SNAPSHOTS}{id}")
}

pub fn chunk_list(id: &Id) -> String {
    format!("{CHUNK_LISTS}{id}")
}

pub fn pack(id: &Id) -> String {
    let h = id.to_hex();
    format!("{DATA}{}/{}", &h[..2], h)
}

pub fn session(id: &Id) -> String {
    format!("{SESSIONS}{id}")
}

/// A snapshot's sync record of one generation.
pub fn sync_record(snapshot: &Id, generation: u32) -> String {
    format!("{SYNC}{snapshot}.{generation:08x}")
}

/// The snapshot and generation of a sync record's name, if it is one.
pub fn sync_record_of(name: &str) -> Option<(Id, u32)> {
    let (id, g) = name.strip_prefix(SYNC)?.split_once('.')?;
    Some((id.parse().ok()?, u32::from_str_radix(g, 16).ok()?))
}

/// The id of a pack object's name (`data/ab/ab...`), if it is one.
pub fn pack_id(name: &str) -> Option<Id> {
    name.strip_prefix(DATA)?.rsplit('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_names_round_trip() {
        let id = Id::random();
        assert_eq!(pack_id(&pack(&id)), Some(id));
        assert_eq!(pack_id("data/ab/.tmp-1"), None);
        assert_eq!(pack_id(&index(&id)), None);
        assert_eq!(sync_record_of(&sync_record(&id, 300)), Some((id, 300)));
        assert_eq!(sync_record_of("sync/x.1"), None);
        assert_eq!(sync_record_of(&snapshot(&id)), None);
    }
}
