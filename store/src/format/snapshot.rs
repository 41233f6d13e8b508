//! Snapshot manifests: immutable, sealed JSON describing one backup run.

use serde::{Deserialize, Serialize};

use crate::format::id::Id;

pub const KIND: &str = "snapshot";

/// What one disk of a snapshot holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskEntry {
    /// `vda`, `vdb`, ... for VMs; `image` for a single image file.
    pub name: String,
    pub size: u64,
    pub chunk_list: Id,
    /// Bytes of the disk covered by chunks (the rest reads as zeros).
    pub data_bytes: u64,
    pub chunks: u64,
    /// Checkpoint (dirty bitmap) this disk's content ends at, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// Counters of one backup run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BackupStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Plaintext bytes of chunks the repository did not have.
    pub bytes_new: u64,
    /// Bytes written to the backend for them (compressed + sealed).
    pub bytes_stored: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub id: Id,
    /// What was backed up: a VM name or an image's source id.
    pub source: String,
    pub host: String,
    pub owner: String,
    pub time: chrono::DateTime<chrono::Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_xml: Option<String>,
    pub key_fingerprint: String,
    pub disks: Vec<DiskEntry>,
    /// The VM's UEFI variable store, if it has one (not a disk: no export).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<DiskEntry>,
    /// Set on a file snapshot (`crate::files`): its streams are `files`
    /// (the data) and `catalog`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesInfo>,
    pub stats: BackupStats,
}

/// What a file snapshot holds beyond a disk snapshot's manifest.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FilesInfo {
    /// The absolute paths backed up.
    pub paths: Vec<String>,
    /// Catalog entries (files, directories, links, nodes).
    pub entries: u64,
    /// Regular files.
    pub files: u64,
    /// Bytes of regular files (holes included).
    pub bytes: u64,
    /// Something could not be read: the snapshot lacks it.
    pub partial: bool,
    /// (path, why) of what is missing or may be inconsistent (the first
    /// thousand).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<(String, String)>,
}

impl Snapshot {
    pub fn size(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }

    /// Everything with a chunk list: the disks and the NVRAM.
    pub fn chunk_lists(&self) -> impl Iterator<Item = &DiskEntry> {
        self.disks.iter().chain(&self.nvram)
    }

    /// Whether this is a file snapshot (of a host's files, not a disk).
    pub fn is_files(&self) -> bool {
        self.files.is_some()
    }

    /// The retention group: (source, policy).
    pub fn group(&self) -> (&str, Option<&str>) {
        (&self.source, self.policy.as_deref())
    }
}

/// Caller-provided description of a snapshot about to be written.
#[derive(Clone, Debug, Default)]
pub struct SnapshotMeta {
    pub source: String,
    /// The snapshot's time, when not now (imports, crafted histories).
    pub time: Option<chrono::DateTime<chrono::Utc>>,
    pub policy: Option<String>,
    pub parent: Option<Id>,
    pub domain_xml: Option<String>,
    /// For a file snapshot.
    pub files: Option<FilesInfo>,
}
