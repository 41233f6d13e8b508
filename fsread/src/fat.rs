//! FAT12/16/32 (vfat long names), read-only and written here: the format
//! is small, and the crate that reads it (`fatfs`) wants a writable device
//! and names entries by path only. Cluster chains are bounded by the
//! cluster count, directories by the format's 65536 entries.
//!
//! FAT has no owners, no modes and stores local time without a zone:
//! listings show no owner, `0644`/`0755` (`0444` read-only) and the time as
//! if it were UTC.

use std::sync::{Arc, Mutex};

use crate::error::{corrupt, Error, Result};
use crate::io::{self, Fields, ReadAt};
use crate::tree::{Entry, Kind, Meta, Node, Time, Tree};

const WHAT: &str = "vfat";
const ATTR_READONLY: u8 = 0x01;
const ATTR_VOLUME: u8 = 0x08;
const ATTR_DIR: u8 = 0x10;
const ATTR_LFN: u8 = 0x0F;
/// Entries a directory may hold (the format's limit).
const MAX_DIR_ENTRIES: usize = 65536;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Bits {
    Fat12,
    Fat16,
    Fat32,
}

/// A FAT filesystem.
pub struct Fat {
    dev: Arc<dyn ReadAt>,
    bits: Bits,
    cluster: u64,
    /// Byte offset of the first FAT.
    fat: u64,
    fat_bytes: u64,
    /// FAT12/16: the fixed root directory region.
    root_dir: (u64, u64),
    root_cluster: u32,
    /// Byte offset of cluster 2.
    data: u64,
    clusters: u32,
    label: Option<String>,
    /// The chain of the last file read: reads come in many pieces.
    last_chain: Mutex<Option<(u64, Arc<Vec<u32>>)>>,
}

impl Fat {
    /// Whether `dev` starts with a FAT boot sector.
    pub fn detect(dev: &dyn ReadAt) -> bool {
        let mut b = [0u8; 512];
        dev.read_at(0, &mut b).is_ok()
            && (&b[54..57] == b"FAT" || &b[82..87] == b"FAT32")
            && geometry(&b).is_ok()
    }

    pub fn open(dev: Arc<dyn ReadAt>) -> Result<Self> {
        let b = io::read_vec(dev.as_ref(), 0, 512)?;
        let g = geometry(&b)?;
        let f = Fields::new(&b, WHAT);
        let mut fs = Fat {
            bits: g.bits,
            cluster: g.sector * g.per_cluster,
            fat: g.reserved * g.sector,
            fat_bytes: g.fat_sectors * g.sector,
            root_dir: (g.root_start * g.sector, g.root_sectors * g.sector),
            root_cluster: if g.bits == Bits::Fat32 {
                f.le32(44)?
            } else {
                0
            },
            data: g.data_start * g.sector,
            clusters: g.clusters,
            label: None,
            last_chain: Mutex::new(None),
            dev,
        };
        let boot_label = io::label(f.slice(if g.bits == Bits::Fat32 { 71 } else { 43 }, 11)?)
            .filter(|l| l != "NO NAME");
        fs.label = match fs.root_label() {
            Ok(Some(l)) => Some(l),
            _ => boot_label,
        };
        Ok(fs)
    }

    pub fn label(&self) -> Option<String> {
        self.label.clone()
    }

    /// The volume label entry of the root directory.
    fn root_label(&self) -> Result<Option<String>> {
        let raw = self.dir_bytes(self.root_cluster, true)?;
        Ok(raw
            .chunks_exact(32)
            .take_while(|e| e[0] != 0)
            .find(|e| e[11] & 0x1F == ATTR_VOLUME && e[0] != 0xE5)
            .and_then(|e| io::label(&e[..11])))
    }

    /// The FAT entry of cluster `c`.
    fn next(&self, c: u32) -> Result<u32> {
        let (at, width) = match self.bits {
            Bits::Fat12 => (u64::from(c) * 3 / 2, 2),
            Bits::Fat16 => (u64::from(c) * 2, 2),
            Bits::Fat32 => (u64::from(c) * 4, 4),
        };
        if at + width > self.fat_bytes {
            return Err(corrupt(WHAT, format!("cluster {c} past the FAT")));
        }
        let mut b = [0u8; 4];
        io::read_exact(self.dev.as_ref(), self.fat + at, &mut b[..width as usize])?;
        let v = u32::from_le_bytes(b);
        Ok(match self.bits {
            Bits::Fat12 if c % 2 == 1 => v >> 4,
            Bits::Fat12 => v & 0xFFF,
            Bits::Fat16 => v,
            Bits::Fat32 => v & 0x0FFF_FFFF,
        })
    }

    fn is_end(&self, v: u32) -> bool {
        v >= match self.bits {
            Bits::Fat12 => 0xFF8,
            Bits::Fat16 => 0xFFF8,
            Bits::Fat32 => 0x0FFF_FFF8,
        }
    }

    /// The clusters of a chain from `first`, at most `max` of them.
    fn chain(&self, first: u32, max: u64) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut c = first;
        while c != 0 && !self.is_end(c) && (out.len() as u64) < max {
            if c < 2 || c - 2 >= self.clusters {
                return Err(corrupt(
                    WHAT,
                    format!("cluster {c} in a chain from {first}"),
                ));
            }
            if out.len() as u64 > u64::from(self.clusters) {
                return Err(corrupt(WHAT, format!("cluster chain from {first} loops")));
            }
            out.push(c);
            c = self.next(c)?;
        }
        Ok(out)
    }

    fn file_chain(&self, file: &Node) -> Result<Arc<Vec<u32>>> {
        let mut last = self.last_chain.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = last.as_ref().filter(|(id, _)| *id == file.id) {
            return Ok(c.clone());
        }
        let max = file.meta.size.div_ceil(self.cluster);
        let c = Arc::new(self.chain(file.handle as u32, max)?);
        *last = Some((file.id, c.clone()));
        Ok(c)
    }

    fn cluster_offset(&self, c: u32) -> u64 {
        self.data + u64::from(c - 2) * self.cluster
    }

    /// The raw entries of a directory.
    fn dir_bytes(&self, first: u32, root: bool) -> Result<Vec<u8>> {
        let max = (MAX_DIR_ENTRIES as u64 * 32).div_ceil(self.cluster);
        if root && self.bits != Bits::Fat32 {
            let (at, len) = self.root_dir;
            return io::read_vec(
                self.dev.as_ref(),
                at,
                len.min(MAX_DIR_ENTRIES as u64 * 32) as usize,
            );
        }
        let mut raw = Vec::new();
        for c in self.chain(first, max)? {
            let start = raw.len();
            raw.resize(start + self.cluster as usize, 0);
            io::read_exact(self.dev.as_ref(), self.cluster_offset(c), &mut raw[start..])?;
        }
        Ok(raw)
    }
}

impl Tree for Fat {
    fn kind(&self) -> &'static str {
        "vfat"
    }

    fn root(&self) -> Result<Node> {
        Ok(Node {
            id: 0,
            handle: u64::from(self.root_cluster) | ROOT_FLAG,
            meta: Meta {
                kind: Kind::Dir,
                size: 0,
                mode: 0o755,
                uid: None,
                gid: None,
                mtime: None,
                nlink: 1,
            },
        })
    }

    fn list(&self, dir: &Node) -> Result<Vec<Entry>> {
        let root = dir.handle & ROOT_FLAG != 0;
        let first = (dir.handle & !ROOT_FLAG) as u32;
        let raw = self.dir_bytes(first, root)?;
        let base = if root && self.bits != Bits::Fat32 {
            self.root_dir.0
        } else {
            self.cluster_offset(first.max(2))
        };
        parse_dir(&raw, base)
    }

    fn read(&self, file: &Node, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = file.meta.size;
        let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let clusters = self.file_chain(file)?;
        let mut pos = 0usize;
        while pos < n {
            let at = offset + pos as u64;
            let c = clusters.get((at / self.cluster) as usize).ok_or_else(|| {
                corrupt(
                    WHAT,
                    format!("file of {size} bytes has a short cluster chain"),
                )
            })?;
            let within = at % self.cluster;
            let k = ((self.cluster - within) as usize).min(n - pos);
            io::read_exact(
                self.dev.as_ref(),
                self.cluster_offset(*c) + within,
                &mut buf[pos..pos + k],
            )?;
            pos += k;
        }
        Ok(n)
    }

    fn read_link(&self, _link: &Node) -> Result<Vec<u8>> {
        Err(Error::Unsupported("FAT has no symlinks".into()))
    }
}

/// Set in a directory handle for the root (whose cluster is 0 on FAT12/16).
const ROOT_FLAG: u64 = 1 << 40;

struct Geometry {
    bits: Bits,
    sector: u64,
    per_cluster: u64,
    reserved: u64,
    fat_sectors: u64,
    root_start: u64,
    root_sectors: u64,
    data_start: u64,
    clusters: u32,
}

/// The layout a boot sector describes, if it is a sane FAT boot sector.
fn geometry(b: &[u8]) -> Result<Geometry> {
    let f = Fields::new(b, WHAT);
    let bad = |d: &str| corrupt(WHAT, format!("boot sector: {d}"));
    if !matches!(f.u8(0)?, 0xEB | 0xE9) {
        return Err(bad("no jump instruction"));
    }
    let sector = u64::from(f.le16(11)?);
    let per_cluster = u64::from(f.u8(13)?);
    let reserved = u64::from(f.le16(14)?);
    let fats = u64::from(f.u8(16)?);
    let root_entries = u64::from(f.le16(17)?);
    let total = match f.le16(19)? {
        0 => u64::from(f.le32(32)?),
        n => u64::from(n),
    };
    let fat_sectors = match f.le16(22)? {
        0 => u64::from(f.le32(36)?),
        n => u64::from(n),
    };
    if !sector.is_power_of_two() || !(512..=4096).contains(&sector) {
        return Err(bad("sector size"));
    }
    if !per_cluster.is_power_of_two()
        || reserved == 0
        || !(1..=2).contains(&fats)
        || fat_sectors == 0
    {
        return Err(bad("geometry"));
    }
    let root_sectors = (root_entries * 32).div_ceil(sector);
    let root_start = reserved + fats * fat_sectors;
    let data_start = root_start + root_sectors;
    if total <= data_start {
        return Err(bad("no data region"));
    }
    let clusters = (total - data_start) / per_cluster;
    let bits = if clusters < 4085 {
        Bits::Fat12
    } else if clusters < 65525 {
        Bits::Fat16
    } else {
        Bits::Fat32
    };
    if (bits == Bits::Fat32) != (root_entries == 0) {
        return Err(bad("root directory does not match the FAT type"));
    }
    Ok(Geometry {
        bits,
        sector,
        per_cluster,
        reserved,
        fat_sectors,
        root_start,
        root_sectors,
        data_start,
        clusters: u32::try_from(clusters).map_err(|_| bad("cluster count"))?,
    })
}

/// The entries of a directory's raw bytes (which start at byte `base` of
/// the volume: an entry's position is its identity).
fn parse_dir(raw: &[u8], base: u64) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut long: Vec<u16> = Vec::new();
    let mut long_sum: Option<u8> = None;
    for (i, e) in raw.chunks_exact(32).enumerate() {
        if e[0] == 0 {
            break;
        }
        if e[0] == 0xE5 {
            long.clear();
            continue;
        }
        let attr = e[11];
        if attr & 0x3F == ATTR_LFN {
            if e[0] & 0x40 != 0 {
                long.clear();
            }
            let seq = usize::from(e[0] & 0x1F);
            if seq == 0 || seq > 20 {
                long.clear();
                continue;
            }
            // Pieces come last first: prepend.
            let units: Vec<u16> = [&e[1..11], &e[14..26], &e[28..32]]
                .concat()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            long.splice(0..0, units);
            long_sum = Some(e[13]);
            continue;
        }
        if attr & ATTR_VOLUME != 0 {
            long.clear();
            continue;
        }
        let short = &e[..11];
        let name = if !long.is_empty() && long_sum == Some(checksum(short)) {
            let end = long
                .iter()
                .position(|&u| u == 0 || u == 0xFFFF)
                .unwrap_or(long.len());
            char::decode_utf16(long[..end].iter().copied())
                .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect::<String>()
                .into_bytes()
        } else {
            short_name(short, e[12])
        };
        long.clear();
        if name == b"." || name == b".." {
            continue;
        }
        let f = Fields::new(e, WHAT);
        let first = u32::from(f.le16(20)?) << 16 | u32::from(f.le16(26)?);
        let dir = attr & ATTR_DIR != 0;
        let mode = if dir {
            0o755
        } else if attr & ATTR_READONLY != 0 {
            0o444
        } else {
            0o644
        };
        out.push(Entry {
            name,
            node: Node {
                id: base + i as u64 * 32,
                handle: u64::from(first),
                meta: Meta {
                    kind: if dir { Kind::Dir } else { Kind::File },
                    size: if dir { 0 } else { u64::from(f.le32(28)?) },
                    mode,
                    uid: None,
                    gid: None,
                    mtime: dos_time(f.le16(24)?, f.le16(22)?),
                    nlink: 1,
                },
            },
        });
    }
    Ok(out)
}

/// An 8.3 name, lower-cased where the entry says so (as Linux shows it).
fn short_name(n: &[u8], case: u8) -> Vec<u8> {
    let mut first = n[0];
    if first == 0x05 {
        first = 0xE5;
    }
    let lower = |s: &[u8], yes: bool| -> Vec<u8> {
        s.iter()
            .map(|&c| if yes { c.to_ascii_lowercase() } else { c })
            .collect()
    };
    let mut base = [&[first][..], &n[1..8]].concat();
    while base.last() == Some(&b' ') {
        base.pop();
    }
    let mut ext = n[8..11].to_vec();
    while ext.last() == Some(&b' ') {
        ext.pop();
    }
    let mut name = lower(&base, case & 0x08 != 0);
    if !ext.is_empty() {
        name.push(b'.');
        name.extend(lower(&ext, case & 0x10 != 0));
    }
    name
}

fn checksum(short: &[u8]) -> u8 {
    short
        .iter()
        .fold(0u8, |s, &c| (s >> 1 | (s & 1) << 7).wrapping_add(c))
}

/// A DOS date and time (2-second steps), as UTC.
fn dos_time(date: u16, time: u16) -> Option<Time> {
    let (y, m, d) = (
        1980 + i64::from(date >> 9),
        i64::from(date >> 5 & 0xF),
        i64::from(date & 0x1F),
    );
    let (h, min, s) = (
        i64::from(time >> 11),
        i64::from(time >> 5 & 0x3F),
        i64::from(time & 0x1F) * 2,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || min > 59 || s > 59 {
        return None;
    }
    Some(Time {
        secs: days_from_civil(y, m, d) * 86400 + h * 3600 + min * 60 + s,
        nsec: 0,
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dos_times_are_read_as_utc() {
        // 2024-02-29 13:45:58
        let date = ((2024 - 1980) << 9 | 2 << 5 | 29) as u16;
        let time = (13 << 11 | 45 << 5 | 29) as u16;
        assert_eq!(dos_time(date, time).unwrap().secs, 1709214358);
        assert!(dos_time(0, 0).is_none());
    }

    #[test]
    fn short_names_follow_the_case_flags() {
        assert_eq!(short_name(b"README  TXT", 0x18), b"readme.txt");
        assert_eq!(short_name(b"README  TXT", 0), b"README.TXT");
        assert_eq!(short_name(b"DIR        ", 0), b"DIR");
    }
}
