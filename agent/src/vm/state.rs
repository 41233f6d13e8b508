//! The agent's own record of checkpoints, one JSON file per domain, so
//! libvirt's can be redefined when libvirt lost them (undefine, migration,
//! restart) and each checkpoint maps to the snapshot whose content it ends.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

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
pub struct DomainLock {
    _file: File,
}

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

    fn path(&self, uuid: &str) -> PathBuf {
        self.domains().join(format!("{uuid}.json"))
    }

    /// Blocks until no other backup of this domain runs.
    pub fn lock(&self, uuid: &str) -> Result<DomainLock> {
        std::fs::create_dir_all(self.domains())
            .with_context(|| format!("creating {}", self.domains().display()))?;
        let p = self.domains().join(format!("{uuid}.lock"));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", p.display()));
        }
        Ok(DomainLock { _file: f })
    }

    pub fn load(&self, uuid: &str) -> Result<DomainState> {
        let p = self.path(uuid);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DomainState {
                uuid: uuid.to_string(),
                ..Default::default()
            }),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Writes atomically (temp file, fsync, rename).
    pub fn save(&self, st: &DomainState) -> Result<()> {
        std::fs::create_dir_all(self.domains())?;
        let p = self.path(&st.uuid);
        let tmp = p.with_extension("json.tmp");
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(st)?)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &p).with_context(|| format!("renaming to {}", p.display()))?;
        Ok(())
    }

    /// Moves an undefined domain's record to `archive/UUID-UNIXTIME.json`:
    /// its checkpoints mean nothing to a domain defined anew, but the
    /// record tells an operator what was there.
    pub fn archive(&self, uuid: &str) -> Result<Option<PathBuf>> {
        let p = self.path(uuid);
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
