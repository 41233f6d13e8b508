//! The drill's lab: a directory under the state dir with the overlays,
//! console logs and NBD socket of one drill, and a record naming its
//! domain and the process running it. Dropping the lab destroys the
//! domain (transient: nothing of it is left) and removes the directory;
//! after a crash, [`clean_stale`] (at the next drill or agent start) does
//! the same for every lab whose process is gone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::libvirt::Libvirt;

/// Every drill domain's name starts so (`bulwark-drill-SOURCE-XXXXXXXX`).
pub const PREFIX: &str = "bulwark-drill-";
const RECORD: &str = "lab.json";

#[derive(Serialize, Deserialize)]
struct LabRecord {
    domain: String,
    pid: u32,
    /// The process's start time (clock ticks since boot): with the pid it
    /// names the process, not whichever reuses its pid later.
    pid_start: u64,
}

pub struct Lab {
    pub dir: PathBuf,
    pub name: String,
    libvirt: Libvirt,
}

impl Lab {
    /// A new lab for a drill of `source`'s snapshot, recorded before
    /// anything is made in it.
    pub fn create(state_dir: &Path, source: &str, libvirt: &Libvirt) -> Result<Lab> {
        let short: String = source
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let name = format!("{PREFIX}{short}-{:08x}", rand::random::<u32>());
        let dir = labs(state_dir).join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let rec = LabRecord {
            domain: name.clone(),
            pid: std::process::id(),
            pid_start: start_time(std::process::id()).unwrap_or(0),
        };
        let lab = Lab {
            dir,
            name,
            libvirt: libvirt.clone(),
        };
        std::fs::write(lab.dir.join(RECORD), serde_json::to_vec(&rec)?)
            .with_context(|| format!("writing {}", lab.dir.join(RECORD).display()))?;
        Ok(lab)
    }

    /// The Unix socket the drill's NBD server listens on.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.libvirt, &self.name, &self.dir) {
            tracing::warn!("drill {}: {e:#}", self.name);
        }
    }
}

fn labs(state_dir: &Path) -> PathBuf {
    state_dir.join("drills")
}

/// Destroys the lab's domain, if it runs, and removes its directory.
fn remove(libvirt: &Libvirt, domain: &str, dir: &Path) -> Result<()> {
    if let Some(dom) = libvirt.find_domain(domain)? {
        // Transient: destroying it removes it. It may end on its own
        // meanwhile (a guest that crashed once its server was gone).
        match dom.destroy() {
            Ok(()) | Err(crate::libvirt::Error::NoDomain(_)) => {}
            Err(e)
                if dom
                    .state()
                    .is_ok_and(|s| s == crate::libvirt::State::ShutOff) =>
            {
                // Someone defined a persistent domain under our name: not
                // ours to remove.
                tracing::debug!("{domain}: {e}");
            }
            Err(e) => return Err(e.into()),
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Removes every lab whose drill is no longer running (its process died
/// or was killed); the number removed.
pub fn clean_stale(state_dir: &Path, libvirt: &Libvirt) -> Result<usize> {
    let root = labs(state_dir);
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("listing {}", root.display())),
    };
    let mut removed = 0;
    for entry in entries {
        let dir = entry?.path();
        let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with(PREFIX) {
            continue; // not a lab of ours
        }
        let rec: Option<LabRecord> = std::fs::read(dir.join(RECORD))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        // A lab without a readable record was never started (the record
        // is written first) or is damaged: its name is the domain's.
        if let Some(r) = &rec {
            if r.pid != std::process::id() && start_time(r.pid) == Some(r.pid_start) {
                continue; // that drill still runs
            }
        }
        let domain = rec.map_or_else(|| name.to_string(), |r| r.domain);
        tracing::info!("removing the leftovers of drill {domain}");
        remove(libvirt, &domain, &dir)?;
        removed += 1;
    }
    Ok(removed)
}

/// When process `pid` started (field 22 of `/proc/PID/stat`), if it runs.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_names_a_running_process() {
        let me = start_time(std::process::id()).unwrap();
        assert!(me > 0);
        assert_eq!(start_time(std::process::id()), Some(me));
        assert_eq!(start_time(u32::MAX), None);
    }
}
