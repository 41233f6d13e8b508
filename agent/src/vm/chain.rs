//! The checkpoint chain of one domain: Bulwark's record of checkpoints (the
//! state file), libvirt's checkpoints and the bitmaps in the images, kept
//! in step by one type that states the rules once:
//!
//! * at most [`KEEP_CHECKPOINTS`] checkpoints, the newest;
//! * a new checkpoint's bitmaps are added *before* its disks are read
//!   (libvirt does it atomically with the backup job; offline it is
//!   `qemu-img bitmap --add`), so no write after the read goes unseen;
//! * old checkpoints are removed only *after* the snapshot is stored, so a
//!   crash between any two steps still has a bitmap covering every change
//!   since the last stored snapshot;
//! * a broken chain (bitmap inconsistent after a crash, missing, disabled,
//!   base snapshot gone, unclean stop) means a full read, and a broken chain
//!   is dropped whole before a new one starts.

use std::path::PathBuf;

use anyhow::{Context, Result};
use bulwark_store::{Repository, Snapshot};

use super::domain::{self, Disk, DomainInfo};
use super::qemu;
use super::state::{Checkpoint, DomainLock, DomainState, StateDir};
use super::CHECKPOINT_PREFIX;
use crate::libvirt::{qmp::Block, Domain};

/// The bitmap `bulwark-hook` (or the agent, from a define event) adds to a
/// protected domain's disks before its first backup.
pub use bulwark_proto::HOOK_BITMAP;

/// Checkpoints kept per disk (the newest two).
pub const KEEP_CHECKPOINTS: usize = 2;

/// A bitmap's state on a disk as QEMU or qemu-img reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapState {
    Good,
    Missing,
    Disabled,
    Broken,
}

/// Where an incremental backup starts: the newest checkpoint and the
/// snapshot it ends, or why there is none.
pub struct Base {
    pub from: Option<(Checkpoint, Snapshot)>,
    pub reason: Option<String>,
}

/// What one disk gets: incremental from the base, or full with a reason.
pub struct DiskPlan<'a> {
    pub disk: &'a Disk,
    pub full_reason: Option<String>,
}

/// A checkpoint being made by this backup.
pub struct NewCheckpoint {
    pub name: String,
    /// Disks that get its bitmap (qcow2 only).
    pub disks: Vec<String>,
}

pub struct Chain<'a> {
    dom: &'a Domain,
    info: &'a DomainInfo,
    states: &'a StateDir,
    state: DomainState,
    _lock: DomainLock,
    /// `query-block` of the running domain; `None` when it is shut off.
    live: Option<Vec<Block>>,
}

impl<'a> Chain<'a> {
    /// Locks and loads the domain's record; with `running`, reads the live
    /// bitmaps once.
    pub fn open(
        dom: &'a Domain,
        info: &'a DomainInfo,
        states: &'a StateDir,
        running: bool,
    ) -> Result<Self> {
        let lock = states.lock(&info.uuid)?;
        let mut state = states.load(&info.uuid)?;
        state.domain = info.name.clone();
        let live = if running {
            Some(dom.query_block()?)
        } else {
            None
        };
        Ok(Chain {
            dom,
            info,
            states,
            state,
            _lock: lock,
            live,
        })
    }

    pub fn running(&self) -> bool {
        self.live.is_some()
    }

    fn bitmap_disks(&self) -> impl Iterator<Item = &'a Disk> {
        self.info.disks.iter().filter(|d| d.has_bitmaps())
    }

    /// The state of bitmap `name` on `disk`.
    pub fn bitmap_state(&self, disk: &Disk, name: &str) -> Result<BitmapState> {
        Ok(match &self.live {
            Some(blocks) => {
                let b = blocks
                    .iter()
                    .find(|b| b.is_image(&disk.path))
                    .and_then(|b| b.bitmap(name));
                match b {
                    None => BitmapState::Missing,
                    Some(b) if b.inconsistent => BitmapState::Broken,
                    Some(b) if !b.recording => BitmapState::Disabled,
                    Some(_) => BitmapState::Good,
                }
            }
            None => match qemu::bitmaps(&disk.path)?.iter().find(|b| b.name == name) {
                None => BitmapState::Missing,
                Some(b) if b.in_use => BitmapState::Broken,
                Some(b) if !b.enabled => BitmapState::Disabled,
                Some(_) => BitmapState::Good,
            },
        })
    }

    /// The base of the next backup. A broken chain is dropped here (its
    /// checkpoints and bitmaps removed) and the reason returned.
    pub fn base(&mut self, repo: &Repository, full: bool) -> Result<Base> {
        let (from, reason) = self.choose_base(repo, full);
        let broken = self.broken(from.is_some())?;
        let Some(why) = broken else {
            return Ok(Base { from, reason });
        };
        tracing::warn!(
            "{}: {why}: removing its checkpoints, reading everything",
            self.info.name
        );
        self.drop_all();
        self.states.save(&self.state)?;
        Ok(Base {
            from: None,
            reason: Some(why),
        })
    }

    fn choose_base(
        &self,
        repo: &Repository,
        full: bool,
    ) -> (Option<(Checkpoint, Snapshot)>, Option<String>) {
        if full {
            return (None, Some("full backup requested".into()));
        }
        let Some(cp) = self.state.checkpoints.last() else {
            return (None, Some("no previous checkpoint (first backup)".into()));
        };
        if cp.repo != repo.config().id.to_string() {
            return (
                None,
                Some(format!(
                    "checkpoint {} belongs to another repository",
                    cp.name
                )),
            );
        }
        match repo.find_snapshot(&cp.snapshot.to_hex()) {
            Ok(s) => (Some((cp.clone(), s)), None),
            Err(e) => (
                None,
                Some(format!(
                    "snapshot {} of checkpoint {} is not usable: {e}",
                    cp.snapshot, cp.name
                )),
            ),
        }
    }

    /// Why the chain cannot be trusted at all, if it cannot.
    fn broken(&self, has_base: bool) -> Result<Option<String>> {
        for cp in &self.state.checkpoints {
            for disk in self.bitmap_disks().filter(|d| cp.disks.contains(&d.target)) {
                if self.bitmap_state(disk, &cp.name)? == BitmapState::Broken {
                    return Ok(Some(format!(
                        "bitmap {} on {} is inconsistent (the VM crashed or was destroyed since)",
                        cp.name, disk.target
                    )));
                }
            }
        }
        if self.state.unclean_stop && has_base {
            return Ok(Some(
                "the VM stopped uncleanly since the last backup".into(),
            ));
        }
        Ok(None)
    }

    /// Each disk's plan: incremental where its bitmap of the base is good.
    pub fn plan(&self, base: &Base) -> Result<Vec<DiskPlan<'a>>> {
        let mut plans = Vec::new();
        for disk in &self.info.disks {
            let full_reason = if !disk.has_bitmaps() {
                Some(format!(
                    "{} disk: no persistent dirty bitmap, full read every time",
                    disk.format
                ))
            } else if let Some((cp, snap)) = &base.from {
                if !cp.disks.contains(&disk.target) {
                    Some(format!("{} is not in checkpoint {}", disk.target, cp.name))
                } else if !snap.disks.iter().any(|d| d.name == disk.target) {
                    Some(format!(
                        "{} is not in snapshot {}",
                        disk.target,
                        snap.id.short()
                    ))
                } else {
                    match self.bitmap_state(disk, &cp.name)? {
                        BitmapState::Good => None,
                        BitmapState::Missing => {
                            Some(format!("bitmap {} missing on {}", cp.name, disk.target))
                        }
                        BitmapState::Disabled => {
                            Some(format!("bitmap {} on {} is disabled", cp.name, disk.target))
                        }
                        BitmapState::Broken => Some(format!(
                            "bitmap {} on {} is inconsistent",
                            cp.name, disk.target
                        )),
                    }
                }
            } else {
                Some(
                    base.reason
                        .clone()
                        .unwrap_or_else(|| "no previous checkpoint".into()),
                )
            };
            plans.push(DiskPlan { disk, full_reason });
        }
        Ok(plans)
    }

    /// libvirt may have lost the base checkpoint (undefine, restart, or it
    /// was made while the VM was stopped): redefine it from our record. If
    /// that fails, the disks that counted on it are read whole.
    pub fn ensure_libvirt_has_base(&self, base: &Base, plans: &mut [DiskPlan<'_>]) -> Result<()> {
        let (Some((cp, _)), true) = (&base.from, self.running()) else {
            return Ok(());
        };
        let inc: Vec<&str> = plans
            .iter()
            .filter(|p| p.full_reason.is_none())
            .map(|p| p.disk.target.as_str())
            .collect();
        if inc.is_empty() || self.dom.checkpoint_names()?.contains(&cp.name) {
            return Ok(());
        }
        tracing::info!(
            "{}: redefining checkpoint {} in libvirt",
            self.info.name,
            cp.name
        );
        if let Err(e) = self.dom.checkpoint_redefine(&self.redefine_xml(cp, &inc)) {
            let why = format!("checkpoint {} could not be redefined: {e:#}", cp.name);
            tracing::warn!("{}: {why}", self.info.name);
            for p in plans.iter_mut().filter(|p| p.full_reason.is_none()) {
                p.full_reason = Some(why.clone());
            }
        }
        Ok(())
    }

    fn redefine_xml(&self, cp: &Checkpoint, disks: &[&str]) -> String {
        let mut xml = format!(
            "<domaincheckpoint><name>{}</name><creationTime>{}</creationTime><disks>",
            domain::xml_escape(&cp.name),
            cp.created
        );
        for d in &self.info.disks {
            if disks.contains(&d.target.as_str()) {
                xml.push_str(&format!(
                    "<disk name='{}' checkpoint='bitmap' bitmap='{}'/>",
                    domain::xml_escape(&d.target),
                    domain::xml_escape(&cp.name)
                ));
            } else {
                xml.push_str(&format!(
                    "<disk name='{}' checkpoint='no'/>",
                    domain::xml_escape(&d.target)
                ));
            }
        }
        xml.push_str("</disks></domaincheckpoint>");
        xml
    }

    /// Names the checkpoint this backup will make.
    pub fn next(&self) -> NewCheckpoint {
        NewCheckpoint {
            name: format!(
                "{CHECKPOINT_PREFIX}{}-{:04x}",
                chrono::Utc::now().format("%Y%m%dT%H%M%S"),
                rand_u16()
            ),
            disks: self.bitmap_disks().map(|d| d.target.clone()).collect(),
        }
    }

    /// The `<domaincheckpoint>` libvirt creates with the backup job.
    pub fn checkpoint_xml(&self, new: &NewCheckpoint) -> String {
        let mut c = format!(
            "<domaincheckpoint><name>{}</name><disks>",
            domain::xml_escape(&new.name)
        );
        for d in &self.info.disks {
            let kind = if new.disks.contains(&d.target) {
                "bitmap"
            } else {
                "no"
            };
            c.push_str(&format!(
                "<disk name='{}' checkpoint='{kind}'/>",
                domain::xml_escape(&d.target)
            ));
        }
        c.push_str("</disks></domaincheckpoint>");
        c
    }

    /// Offline: adds the new checkpoint's bitmap to every qcow2 image
    /// before anything is read (all or none).
    pub fn add_offline(&self, new: &NewCheckpoint) -> Result<()> {
        let mut added: Vec<PathBuf> = Vec::new();
        for d in self.bitmap_disks() {
            if let Err(e) = qemu::bitmap_add(&d.path, &new.name) {
                for p in &added {
                    // Best effort: a leftover bitmap only costs a little
                    // tracking; the record never names it.
                    let _ = qemu::bitmap_remove(p, &new.name);
                }
                return Err(e).context(format!("adding bitmap {} to {}", new.name, d.target));
            }
            added.push(d.path.clone());
        }
        Ok(())
    }

    /// The backup failed: its new checkpoint goes (the old ones stay, so
    /// the next backup is still an incremental from them).
    pub fn abandon(&self, new: &NewCheckpoint, why: &str) {
        if new.disks.is_empty() {
            return;
        }
        tracing::warn!(
            "{}: backup failed ({why}); removing checkpoint {}",
            self.info.name,
            new.name
        );
        if self.running() {
            if let Err(e) = self.dom.checkpoint_delete(&new.name, false) {
                tracing::warn!("{}: {e}", self.info.name);
            }
        } else {
            for d in self.bitmap_disks() {
                if let Err(e) = qemu::bitmap_remove(&d.path, &new.name) {
                    tracing::warn!("{}: {e:#}", self.info.name);
                }
            }
        }
    }

    /// The snapshot is stored: record the new checkpoint, then remove the
    /// ones past the newest [`KEEP_CHECKPOINTS`] and the start-up bitmap.
    pub fn commit(
        mut self,
        new: NewCheckpoint,
        snapshot: &Snapshot,
        repo: &Repository,
    ) -> Result<()> {
        let has_bitmaps = !new.disks.is_empty();
        if has_bitmaps {
            self.state.checkpoints.push(Checkpoint {
                name: new.name,
                snapshot: snapshot.id,
                repo: repo.config().id.to_string(),
                created: chrono::Utc::now().timestamp(),
                disks: new.disks,
            });
        }
        self.state.unclean_stop = false;
        self.states.save(&self.state)?;
        while self.state.checkpoints.len() > KEEP_CHECKPOINTS {
            let old = self.state.checkpoints.remove(0);
            tracing::info!("{}: removing old checkpoint {}", self.info.name, old.name);
            self.remove_checkpoint(&old.name);
        }
        self.states.save(&self.state)?;
        if has_bitmaps {
            // The start-up bitmap is not needed once a chain exists.
            for d in self.bitmap_disks() {
                let has = match &self.live {
                    Some(_) => self.bitmap_state(d, HOOK_BITMAP)? != BitmapState::Missing,
                    None => qemu::bitmaps(&d.path)
                        .is_ok_and(|b| b.iter().any(|b| b.name == HOOK_BITMAP)),
                };
                if has {
                    self.remove_bitmap(d, HOOK_BITMAP);
                }
            }
        }
        Ok(())
    }

    /// Removes every checkpoint, ours and any `bw-` one libvirt knows,
    /// newest first (libvirt merges a deleted checkpoint into its parent).
    fn drop_all(&mut self) {
        let mut names: Vec<String> = self.state.checkpoints.drain(..).map(|c| c.name).collect();
        if let Ok(known) = self.dom.checkpoint_names() {
            for n in known {
                if bulwark_proto::is_ours(&n) && !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        for n in names.iter().rev() {
            self.remove_checkpoint(n);
        }
    }

    /// Removes one checkpoint everywhere: libvirt's record and the bitmaps.
    /// Best effort (logged): a leftover bitmap costs tracking, not data.
    fn remove_checkpoint(&self, name: &str) {
        if self.running() {
            if self.dom.checkpoint_delete(name, false).is_ok() {
                return;
            }
            let _ = self.dom.checkpoint_delete(name, true);
            // Inconsistent bitmaps: libvirt may refuse to merge them; drop
            // them directly in QEMU.
            for d in self.bitmap_disks() {
                self.remove_bitmap(d, name);
            }
        } else {
            for d in self.bitmap_disks() {
                if qemu::bitmaps(&d.path).is_ok_and(|b| b.iter().any(|b| b.name == name)) {
                    self.remove_bitmap(d, name);
                }
            }
            if self
                .dom
                .checkpoint_names()
                .is_ok_and(|n| n.iter().any(|n| n == name))
            {
                let _ = self.dom.checkpoint_delete(name, true);
            }
        }
    }

    /// Removes one bitmap from one disk: through QMP if the domain runs,
    /// with qemu-img if not.
    fn remove_bitmap(&self, d: &Disk, name: &str) {
        let r = match &self.live {
            Some(blocks) => match blocks
                .iter()
                .find(|b| b.is_image(&d.path))
                .and_then(|b| b.node_name())
            {
                Some(node) => self.dom.bitmap_remove(node, name).map_err(Into::into),
                None => Ok(()),
            },
            None => qemu::bitmap_remove(&d.path, name),
        };
        if let Err(e) = r {
            tracing::warn!(
                "{}: removing bitmap {name} from {}: {e:#}",
                self.info.name,
                d.target
            );
        }
    }
}

fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    // Only a name's suffix (the time is in it too): zeros are harmless,
    // and libvirt refuses a duplicate checkpoint name.
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u16::from_le_bytes(b)
}
