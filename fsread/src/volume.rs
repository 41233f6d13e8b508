//! What a set of disks holds: partitions, LVM logical volumes and the
//! filesystem (or other content) on each, named by path (`vda`, `vda/p1`,
//! `vda/lvm/VG/LV`), and the [`Tree`] of a volume's filesystem.
//!
//! A disk that cannot be read, a damaged table or LVM metadata ends up as
//! a volume whose content is [`Content::Damaged`] with the error: the rest
//! of the snapshot stays reachable.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ext4::Ext4;
use crate::fat::Fat;
use crate::io::{ReadAt, Window};
use crate::lvm::{self, LvReader, Vg};
use crate::ntfs::NtfsFs;
use crate::part::{self, Table};
use crate::tree::Tree;
use crate::xfs::Xfs;

/// What a volume holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// A filesystem this crate reads (`ext4`, `xfs`, `vfat`, `ntfs`; ext2/3
    /// are named once opened).
    Fs(&'static str),
    /// A partition table (`gpt`, `mbr`).
    Table(&'static str),
    /// An LVM physical volume (of the named volume group).
    LvmPv(Option<String>),
    /// Recognised, not read (`btrfs`, `swap`, `luks`, an LVM thin volume).
    Other(String),
    /// Nothing recognised (empty, or encrypted by the guest).
    Unknown,
    /// Reading its structure failed.
    Damaged(String),
}

impl Content {
    pub fn name(&self) -> String {
        match self {
            Content::Fs(n) | Content::Table(n) => n.to_string(),
            Content::LvmPv(_) => "lvm2-pv".into(),
            Content::Other(n) => n.clone(),
            Content::Unknown => "-".into(),
            Content::Damaged(_) => "damaged".into(),
        }
    }
}

/// Where a volume sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    Disk,
    Partition {
        number: u32,
        start: u64,
        type_name: String,
        name: Option<String>,
    },
    LogicalVolume {
        vg: String,
        lv: String,
    },
}

/// A disk, partition or logical volume of a snapshot.
#[derive(Clone)]
pub struct Volume {
    /// `vda`, `vda/p1`, `vda/lvm/VG/LV`.
    pub path: String,
    pub place: Place,
    pub size: u64,
    pub content: Content,
    pub label: Option<String>,
    pub dev: Arc<dyn ReadAt>,
    /// The filesystem, opened once by [`discover`].
    tree: Option<Arc<dyn Tree>>,
}

impl Volume {
    /// The volume's filesystem, or why there is none to read.
    pub fn tree(&self) -> Result<Arc<dyn Tree>> {
        if let Some(t) = &self.tree {
            return Ok(t.clone());
        }
        Err(Error::Unsupported(match &self.content {
            Content::Other(what) if what == "btrfs" => {
                format!("{}: btrfs is not read (no maintained reader)", self.path)
            }
            Content::Damaged(e) => format!("{}: {e}", self.path),
            c => format!("{}: no filesystem to read ({})", self.path, c.name()),
        }))
    }
}

/// Everything on `disks` (name, bytes), disk by disk; logical volumes
/// under the disk that holds their first extent.
pub fn discover(disks: &[(String, Arc<dyn ReadAt>)]) -> Vec<Volume> {
    let mut out = Vec::new();
    for (name, dev) in disks {
        disk_volumes(name, dev.clone(), &mut out);
    }
    assemble_lvm(&mut out);
    for v in &mut out {
        if let Content::Fs(kind) = v.content {
            match open_fs(kind, v.dev.clone()) {
                Ok((tree, label)) => {
                    v.content = Content::Fs(tree.kind());
                    v.label = label;
                    v.tree = Some(tree);
                }
                Err(e) => v.content = Content::Damaged(e.to_string()),
            }
        }
    }
    out
}

fn disk_volumes(name: &str, dev: Arc<dyn ReadAt>, out: &mut Vec<Volume>) {
    let mut disk = Volume {
        path: name.to_string(),
        place: Place::Disk,
        size: dev.size(),
        content: Content::Unknown,
        label: None,
        dev: dev.clone(),
        tree: None,
    };
    disk.content = match probe_strong(dev.as_ref()) {
        Some(c) => c,
        None => match part::read_table(dev.as_ref()) {
            Ok(Some(t)) => {
                let scheme = t.scheme();
                out.push(Volume {
                    content: Content::Table(scheme),
                    ..disk
                });
                partitions(name, &dev, &t, out);
                return;
            }
            Ok(None) if Fat::detect(dev.as_ref()) => Content::Fs("vfat"),
            Ok(None) => Content::Unknown,
            Err(e) => Content::Damaged(e.to_string()),
        },
    };
    out.push(disk);
}

fn partitions(disk: &str, dev: &Arc<dyn ReadAt>, t: &Table, out: &mut Vec<Volume>) {
    for p in t.partitions() {
        let w: Arc<dyn ReadAt> = Arc::new(Window::new(dev.clone(), p.start, p.len));
        out.push(Volume {
            path: format!("{disk}/p{}", p.number),
            place: Place::Partition {
                number: p.number,
                start: p.start,
                type_name: p.type_name.clone(),
                name: p.name.clone(),
            },
            size: w.size(),
            content: probe(w.as_ref()),
            label: None,
            dev: w,
            tree: None,
        });
    }
}

/// Content found by a signature that no partition table can carry.
fn probe_strong(dev: &dyn ReadAt) -> Option<Content> {
    let at = |o: u64, sig: &[u8]| {
        let mut b = vec![0u8; sig.len()];
        dev.read_at(o, &mut b).is_ok() && b == sig
    };
    Some(if Xfs::detect(dev) {
        Content::Fs("xfs")
    } else if NtfsFs::detect(dev) {
        Content::Fs("ntfs")
    } else if Ext4::detect(dev) {
        Content::Fs("ext4")
    } else if lvm::detect(dev) {
        Content::LvmPv(None)
    } else if at(65536 + 64, b"_BHRfS_M") {
        Content::Other("btrfs".into())
    } else if at(0, b"LUKS\xba\xbe") {
        Content::Other("luks".into())
    } else if at(4086, b"SWAPSPACE2") {
        Content::Other("swap".into())
    } else {
        return None;
    })
}

/// What a partition or logical volume holds.
fn probe(dev: &dyn ReadAt) -> Content {
    match probe_strong(dev) {
        Some(c) => c,
        None if Fat::detect(dev) => Content::Fs("vfat"),
        None => Content::Unknown,
    }
}

/// Reads every PV's metadata, keeps each VG's newest copy, and adds its
/// logical volumes.
fn assemble_lvm(out: &mut Vec<Volume>) {
    let mut devs: HashMap<String, Arc<dyn ReadAt>> = HashMap::new();
    let mut vgs: Vec<(Vg, String)> = Vec::new();
    for v in out.iter_mut() {
        if v.content != Content::LvmPv(None) {
            continue;
        }
        let disk = v.path.split('/').next().unwrap_or_default().to_string();
        let found = lvm::read_label(v.dev.as_ref()).and_then(|l| {
            let vg = match &l.metadata {
                Some(text) => Some(lvm::volume_group(&lvm::parse(text)?)?),
                None => None,
            };
            Ok((l.uuid, vg))
        });
        match found {
            Ok((uuid, vg)) => {
                devs.insert(uuid, v.dev.clone());
                if let Some(vg) = vg {
                    v.content = Content::LvmPv(Some(vg.name.clone()));
                    match vgs.iter_mut().find(|(g, _)| g.id == vg.id) {
                        Some((g, _)) if g.seqno >= vg.seqno => {}
                        Some(slot) => *slot = (vg, disk),
                        None => vgs.push((vg, disk)),
                    }
                }
            }
            Err(e) => v.content = Content::Damaged(e.to_string()),
        }
    }
    for (vg, disk) in vgs {
        for lv in &vg.lvs {
            let disk = first_disk(&vg, lv, out).unwrap_or_else(|| disk.clone());
            let path = format!("{disk}/lvm/{}/{}", vg.name, lv.name);
            let place = Place::LogicalVolume {
                vg: vg.name.clone(),
                lv: lv.name.clone(),
            };
            let reader = match &lv.unsupported {
                Some(why) => Err(Error::Unsupported(why.clone())),
                None => LvReader::new(&vg, lv, |u| devs.get(u).cloned()),
            };
            let (dev, content): (Arc<dyn ReadAt>, Content) = match reader {
                Ok(r) => {
                    let r: Arc<dyn ReadAt> = Arc::new(r);
                    let c = probe(r.as_ref());
                    (r, c)
                }
                Err(e) => (Arc::new(Vec::new()), Content::Other(e.to_string())),
            };
            out.push(Volume {
                path,
                place,
                size: lv.size(&vg),
                content,
                label: None,
                dev,
                tree: None,
            });
        }
    }
}

/// The disk of the PV holding a volume's first extent.
fn first_disk(vg: &Vg, lv: &lvm::Lv, vols: &[Volume]) -> Option<String> {
    let (pv_name, _) = lv.segments.first()?.stripes.first()?;
    let uuid = &vg.pvs.iter().find(|p| &p.name == pv_name)?.uuid;
    vols.iter()
        .filter(|v| matches!(v.content, Content::LvmPv(_)))
        .find(|v| lvm::read_label(v.dev.as_ref()).is_ok_and(|l| &l.uuid == uuid))
        .map(|v| v.path.split('/').next().unwrap_or_default().to_string())
}

/// Opens a filesystem of type `kind` (as probed); its tree and label.
fn open_fs(kind: &str, dev: Arc<dyn ReadAt>) -> Result<(Arc<dyn Tree>, Option<String>)> {
    Ok(match kind {
        "xfs" => {
            let fs = Xfs::open(dev)?;
            let l = fs.label();
            (Arc::new(fs), l)
        }
        "ntfs" => {
            let fs = NtfsFs::open(dev)?;
            let l = fs.label();
            (Arc::new(fs), l)
        }
        "vfat" => {
            let fs = Fat::open(dev)?;
            let l = fs.label();
            (Arc::new(fs), l)
        }
        _ => {
            let fs = Ext4::open(dev)?;
            let l = fs.label();
            (Arc::new(fs), l)
        }
    })
}

/// The volume a path starts with (the longest volume path that is a
/// prefix at a `/`) and the rest of the path.
pub fn resolve<'a>(volumes: &'a [Volume], path: &str) -> Result<(&'a Volume, String)> {
    let path = path.trim_matches('/');
    volumes
        .iter()
        .filter(|v| {
            path == v.path
                || path
                    .strip_prefix(v.path.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|v| v.path.len())
        .map(|v| (v, path[v.path.len()..].trim_start_matches('/').to_string()))
        .ok_or_else(|| Error::NotFound(path.to_string()))
}
