//! Bulwark's repository: the on-storage format and the operations on it.
//!
//! A repository holds deduplicated, compressed, encrypted chunks of disk
//! images in packs, an append-only index of where each chunk lives, and
//! immutable snapshot manifests with per-disk chunk lists. `docs/format.md`
//! gives the objects and the decisions behind them; each module's docs say
//! how it implements them, and `docs/gc.md` states the garbage-collection
//! invariant.

pub mod backend;
pub mod backup;
pub mod bench;
pub mod blob;
pub mod chunker;
pub mod chunklist;
pub mod crypto;
pub mod error;
pub mod extent;
pub mod fetch;
pub mod gc;
pub mod id;
pub mod index;
pub mod keys;
pub mod layout;
pub mod location;
pub mod lock;
mod object;
pub mod pack;
pub mod prune;
pub mod reader;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod session;
pub mod snapshot;
pub mod source;
pub mod verify;

pub use backend::{Backend, BackendError, LocalBackend};
pub use backup::{BackupOptions, BackupSession, DiskResult, Mode};
pub use chunker::ChunkerParams;
pub use chunklist::ChunkList;
pub use error::{Error, Result};
pub use extent::{DataExtent, Span};
pub use id::Id;
pub use keys::{KdfParams, Secret};
pub use location::Location;
pub use repo::{RepoConfig, Repository};
pub use snapshot::{BackupStats, Snapshot, SnapshotMeta};
pub use source::{BlockSource, ImageFile, MemSource};

/// This host's name, recorded in manifests and key slots.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Who ran the backup.
pub fn username() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid{}", unsafe { libc::getuid() }))
}
