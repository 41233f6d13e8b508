//! The agent's own record of checkpoints, one JSON file per domain, so
//! libvirt's can be redefined when libvirt lost them (undefine, migration,
//! restart) and each checkpoint maps to the snapshot whose content it ends.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::statefile::StateFile;

/// A checkpoint: bitmaps named `name` on every disk in `disks`, created at
/// the moment snapshot `snapshot` (in repository `repo`) was read.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    pub name: String,
    pub snapshot: bulwark_store::Id,
    pub repo: String,
    /// Unix seconds.
    pub created: i64,
    pub disks: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DomainState {
    pub domain: String,
    pub uuid: String,
    /// Oldest first; at most two kept.
    pub checkpoints: Vec<Checkpoint>,
    /// Last lifecycle event the hook reported (`started`, `stopped`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<String>,
    /// Set when the hook saw in-use bitmaps at start: the VM crashed or was
    /// destroyed, the next backup must read everything.
    #[serde(default)]
    pub unclean_stop: bool,
}

/// Where per-domain state lives.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

/// An exclusive lock on one domain's state (held for a whole backup).
pub type DomainLock = crate::statefile::Lock;

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn domains(&self) -> PathBuf {
        self.root.join("domains")
    }

    fn file(&self, uuid: &str) -> StateFile<DomainState> {
        StateFile::new(self.domains().join(format!("{uuid}.json")))
    }

    /// Blocks until no other backup of this domain runs.
    pub fn lock(&self, uuid: &str) -> Result<DomainLock> {
        Ok(self.file(uuid).lock()?)
    }

    /// The domain's record; a fresh one if it has none yet.
    pub fn load(&self, uuid: &str) -> Result<DomainState> {
        Ok(self.file(uuid).load()?.unwrap_or_else(|| DomainState {
            uuid: uuid.to_string(),
            ..Default::default()
        }))
    }

    pub fn save(&self, st: &DomainState) -> Result<()> {
        Ok(self.file(&st.uuid).save(st)?)
    }

    /// Moves an undefined domain's record to `archive/UUID-UNIXTIME.json`:
    /// its checkpoints mean nothing to a domain defined anew, but the
    /// record tells an operator what was there.
    pub fn archive(&self, uuid: &str) -> Result<Option<PathBuf>> {
        let p = self.file(uuid).path().to_path_buf();
        if !p.exists() {
            return Ok(None);
        }
        let dir = self.root.join("archive");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let to = dir.join(format!("{uuid}-{}.json", chrono::Utc::now().timestamp()));
        std::fs::rename(&p, &to).with_context(|| format!("archiving {}", p.display()))?;
        Ok(Some(to))
    }

    /// Directory for sockets and scratch files of running jobs.
    pub fn run_dir(&self) -> Result<PathBuf> {
        let d = self.root.join("run");
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(d)
    }
}
