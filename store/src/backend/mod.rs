//! Where repository objects live. The trait is shaped for object stores:
//! whole-object writes that never overwrite (no rename, no append), ranged
//! reads, listing by prefix, and every method callable from many threads at
//! once (parallel uploads and fetches).

pub mod cache;
mod local;
pub mod location;
pub mod object_lock;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "s3")]
mod s3_lock;

pub use cache::{CacheOptions, CachedBackend};
pub use local::LocalBackend;
pub use object_lock::{
    bucket_policy, LockMode, ObjectLock, ObjectVersion, PolicyUsers, Retention, RetentionRule,
    VersionHead,
};
#[cfg(feature = "s3")]
pub use s3::{S3Backend, S3Config};

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("object {0} already exists")]
    AlreadyExists(String),
    #[error("{op} {name} in {location}: {source}")]
    Io {
        op: &'static str,
        name: String,
        location: String,
        #[source]
        source: std::io::Error,
    },
    /// No usable credentials for a remote backend: what to set.
    #[error("{0}")]
    Credentials(String),
    #[error("{0}")]
    Other(String),
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Full name, e.g. `snapshots/<hex>`.
    pub name: String,
    pub size: u64,
}

pub trait Backend: Send + Sync + fmt::Debug {
    /// Human-readable location for messages (a path or `s3://bucket/prefix`).
    fn location(&self) -> String;

    /// Stores a new object atomically: readers see all of it or nothing.
    /// Fails with `AlreadyExists` rather than overwrite.
    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError>;

    /// [`Backend::put`] of bytes the caller gives away: a backend that
    /// sends them on keeps them without a copy (a pack upload in flight
    /// holds its 16 MiB once, not twice).
    fn put_owned(&self, name: &str, data: Vec<u8>) -> Result<(), BackendError> {
        self.put(name, &data)
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError>;

    /// `len` bytes from `offset`; short only at the end of the object.
    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        let mut buf = Vec::new();
        self.get_range_into(name, offset, len, &mut buf)?;
        Ok(buf)
    }

    /// [`Backend::get_range`] into `buf` (cleared first): a reader that
    /// fetches one range after another keeps one buffer, instead of
    /// allocating (and page-faulting in) tens of MiB per fetch.
    fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError>;

    /// [`Backend::get_range_into`] for a range its reader reads once (a
    /// restore): a cache may answer it but does not keep it, so a restore
    /// neither writes its whole disk a second time (into the cache) nor
    /// evicts what exports and mounts keep there.
    fn get_range_once(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        self.get_range_into(name, offset, len, buf)
    }

    /// Objects whose names start with `prefix` (e.g. `"index/"`), any order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError>;

    fn delete(&self, name: &str) -> Result<(), BackendError>;

    fn exists(&self, name: &str) -> Result<bool, BackendError> {
        match self.get_range(name, 0, 1) {
            Ok(_) => Ok(true),
            Err(BackendError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Pack uploads worth running at once (`BackupOptions::uploaders`).
    fn upload_concurrency(&self) -> usize {
        2
    }

    /// Ranged reads worth running at once (`RestoreOptions::threads`).
    fn read_concurrency(&self) -> usize {
        4
    }

    /// Versions and locks, where the store has them (S3 Object Lock).
    fn object_lock(&self) -> Option<&dyn ObjectLock> {
        None
    }
}
