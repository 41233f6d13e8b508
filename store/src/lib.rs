//! Bulwark's repository: the on-storage format and the operations on it.
//!
//! A repository holds deduplicated, compressed, encrypted chunks of disk
//! images in packs, an append-only index of where each chunk lives, and
//! immutable snapshot manifests with per-disk chunk lists. `docs/format.md`
//! gives the objects and the decisions behind them, `docs/gc.md` the
//! garbage-collection invariant, `docs/architecture.md` the map.
//!
//! The folders are the architecture:
//! - [`format`]: what is stored and how (ids, chunker, crypto, blobs, packs,
//!   index, chunk lists, snapshots, keys, object names);
//! - [`backend`]: where it is stored (local directory, S3, the local cache)
//!   and [`backend::location`], which turns a location into a backend;
//! - [`repo`]: an opened repository, and the records writers and GC share;
//! - [`backup`]: the write path (sources, the disk walk, the pipeline, packs);
//! - [`read`]: the read path (fetch plans, restores, the random-access reader);
//! - [`maintain`]: retention, prune, GC, verify and object locks;
//! - [`sync`]: replication into a replica, without the key.

pub mod alloc;
pub mod backend;
pub mod backup;
pub mod bench;
pub mod error;
pub mod files;
pub mod format;
pub mod maintain;
pub mod read;
pub mod repo;
pub mod sync;
pub mod synth;

pub use backend::location::Location;
pub use backend::{Backend, BackendError, LocalBackend};
pub use backup::source::{BlockSource, ImageFile, MemSource};
pub use backup::{BackupOptions, BackupSession, DiskResult, Mode};
pub use error::{Error, Result};
pub use format::chunker::ChunkerParams;
pub use format::chunklist::ChunkList;
pub use format::extent::{DataExtent, Span};
pub use format::id::Id;
pub use format::keys::{KdfParams, Secret};
pub use format::snapshot::{BackupStats, Snapshot, SnapshotMeta};
pub use repo::{RepoConfig, Repository};

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
