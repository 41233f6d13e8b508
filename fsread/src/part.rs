//! Partition tables: GPT (primary header, else the backup; CRCs checked)
//! and MBR (primary entries and the logical partitions of an extended
//! one, the chain bounded). Written here: the format is two small structs,
//! and the crates for it read through `Read + Seek` and follow EBR chains
//! without a bound.

use crate::error::{corrupt, Result};
use crate::io::{self, Fields, ReadAt};

const SECTOR: u64 = 512;
/// Logical partitions followed in an extended partition.
const MAX_LOGICAL: u32 = 128;
/// GPT entries read.
const MAX_GPT_ENTRIES: u64 = 1024;

/// A partition of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// As Linux numbers it: GPT entry index + 1; MBR 1-4, logical from 5.
    pub number: u32,
    /// Byte offset and length on the disk.
    pub start: u64,
    pub len: u64,
    /// A short name of the type (`linux`, `lvm`, `efi`, `0x83`, a GUID...).
    pub type_name: String,
    /// The GPT partition name, if any.
    pub name: Option<String>,
}

/// What a disk's first sectors say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Table {
    Gpt(Vec<Partition>),
    Mbr(Vec<Partition>),
}

impl Table {
    pub fn scheme(&self) -> &'static str {
        match self {
            Table::Gpt(_) => "gpt",
            Table::Mbr(_) => "mbr",
        }
    }

    pub fn partitions(&self) -> &[Partition] {
        match self {
            Table::Gpt(p) | Table::Mbr(p) => p,
        }
    }
}

/// The partition table of `disk`, if it has one. A FAT or NTFS boot
/// sector on the whole disk also ends in `55 AA`: callers probe for a
/// filesystem first.
pub fn read_table(disk: &dyn ReadAt) -> Result<Option<Table>> {
    if disk.size() < 2 * SECTOR {
        return Ok(None);
    }
    let mbr = io::read_vec(disk, 0, SECTOR as usize)?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    let entries = mbr_entries(&mbr)?;
    if entries.iter().flatten().any(|e| e.kind == 0xEE) {
        for sector in [SECTOR, 4096] {
            if let Some(t) = gpt(disk, sector)? {
                return Ok(Some(Table::Gpt(t)));
            }
        }
        return Err(corrupt("gpt", "protective MBR but no valid GPT header"));
    }
    // Boot flags other than 0x00/0x80 mean this is not a partition table.
    if mbr[446..510].chunks(16).any(|e| e[0] & 0x7F != 0) || entries.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mut parts = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let Some(e) = e else { continue };
        if matches!(e.kind, 0x05 | 0x0F | 0x85) {
            logical(disk, e.start, &mut parts)?;
        } else {
            parts.push(e.partition(i as u32 + 1, 0));
        }
    }
    parts.sort_by_key(|p| p.number);
    Ok(Some(Table::Mbr(parts)))
}

/// A used MBR slot: type and sectors.
struct MbrEntry {
    kind: u8,
    start: u64,
    sectors: u64,
}

impl MbrEntry {
    fn partition(&self, number: u32, base: u64) -> Partition {
        Partition {
            number,
            start: (base + self.start) * SECTOR,
            len: self.sectors * SECTOR,
            type_name: mbr_type(self.kind),
            name: None,
        }
    }
}

fn mbr_entries(sector: &[u8]) -> Result<Vec<Option<MbrEntry>>> {
    let f = Fields::new(sector, "mbr");
    let mut out = Vec::new();
    for i in 0..4 {
        let o = 446 + i * 16;
        let kind = f.u8(o + 4)?;
        let start = u64::from(f.le32(o + 8)?);
        let sectors = u64::from(f.le32(o + 12)?);
        out.push((kind != 0 && sectors != 0).then_some(MbrEntry {
            kind,
            start,
            sectors,
        }));
    }
    Ok(out)
}

/// Follows the EBR chain of an extended partition at sector `ext`.
fn logical(disk: &dyn ReadAt, ext: u64, parts: &mut Vec<Partition>) -> Result<()> {
    let mut ebr = ext;
    let mut seen = Vec::new();
    for n in 0..MAX_LOGICAL {
        if seen.contains(&ebr) {
            return Err(corrupt("mbr", "extended partition chain loops"));
        }
        seen.push(ebr);
        let at = io::mul("mbr", ebr, SECTOR)?;
        let sector = io::read_vec(disk, at, SECTOR as usize)?;
        if sector[510..512] != [0x55, 0xAA] {
            return Err(corrupt(
                "mbr",
                format!("no signature in the EBR at sector {ebr}"),
            ));
        }
        let e = mbr_entries(&sector)?;
        if let Some(Some(l)) = e.first() {
            parts.push(l.partition(5 + n, ebr));
        }
        match e.get(1) {
            Some(Some(next)) => ebr = ext + next.start,
            _ => return Ok(()),
        }
    }
    Err(corrupt("mbr", "more than 128 logical partitions"))
}

/// The GPT at LBA 1 (else its backup at the last LBA) for `sector`-byte
/// sectors, if one is there.
fn gpt(disk: &dyn ReadAt, sector: u64) -> Result<Option<Vec<Partition>>> {
    if disk.size() < 3 * sector {
        return Ok(None);
    }
    let last = disk.size() / sector - 1;
    for lba in [1, last] {
        let h = io::read_vec(disk, lba * sector, sector as usize)?;
        let f = Fields::new(&h, "gpt header");
        if f.slice(0, 8)? != b"EFI PART" {
            continue;
        }
        let hsize = f.le32(12)? as usize;
        if !(92..=h.len()).contains(&hsize) {
            continue;
        }
        let mut copy = h[..hsize].to_vec();
        copy[16..20].fill(0);
        if crc32fast::hash(&copy) != f.le32(16)? {
            continue;
        }
        let entries_lba = f.le64(72)?;
        let count = u64::from(f.le32(80)?);
        let esize = u64::from(f.le32(84)?);
        if count > MAX_GPT_ENTRIES || !(128..=1024).contains(&esize) || esize % 8 != 0 {
            return Err(corrupt("gpt", format!("{count} entries of {esize} bytes")));
        }
        let at = io::mul("gpt", entries_lba, sector)?;
        let raw = io::read_vec(disk, at, (count * esize) as usize)?;
        if crc32fast::hash(&raw) != f.le32(88)? {
            continue;
        }
        let mut parts = Vec::new();
        for (i, e) in raw.chunks_exact(esize as usize).enumerate() {
            let ef = Fields::new(e, "gpt entry");
            let ty = ef.slice(0, 16)?;
            if ty.iter().all(|&b| b == 0) {
                continue;
            }
            let first = ef.le64(32)?;
            let end = ef.le64(40)?;
            if end < first {
                return Err(corrupt(
                    "gpt",
                    format!("entry {} ends before it starts", i + 1),
                ));
            }
            parts.push(Partition {
                number: i as u32 + 1,
                start: io::mul("gpt", first, sector)?,
                len: io::mul("gpt", end - first + 1, sector)?,
                type_name: gpt_type(ty),
                name: io::label(io::utf16le(ef.slice(56, 72)?).as_bytes()),
            });
        }
        return Ok(Some(parts));
    }
    Ok(None)
}

fn mbr_type(kind: u8) -> String {
    match kind {
        0x83 => "linux".into(),
        0x8E => "lvm".into(),
        0x82 => "swap".into(),
        0x07 => "ntfs".into(),
        0x0B | 0x0C | 0x0E | 0x06 | 0x04 | 0x01 => "fat".into(),
        0xEF => "efi".into(),
        k => format!("{k:#04x}"),
    }
}

/// A GUID in its usual text form (the first three fields little-endian).
fn guid(b: &[u8]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
        b[3],
        b[2],
        b[1],
        b[0],
        b[5],
        b[4],
        b[7],
        b[6],
        b[8],
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

fn gpt_type(b: &[u8]) -> String {
    let g = guid(b);
    match g.as_str() {
        "0fc63daf-8483-4772-8e79-3d69d8477de4" => "linux".into(),
        "e6d6d379-f507-44c2-a23c-238f2a3df928" => "lvm".into(),
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" => "efi".into(),
        "21686148-6449-6e6f-744e-656564454649" => "bios-boot".into(),
        "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f" => "swap".into(),
        "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7" => "windows-data".into(),
        "4f68bce3-e8cd-4db1-96e7-fbcaf984b709" => "linux-root".into(),
        _ => g,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut d = vec![0u8; 1 << 20];
        for (i, (kind, start, len)) in entries.iter().enumerate() {
            let o = 446 + i * 16;
            d[o + 4] = *kind;
            d[o + 8..o + 12].copy_from_slice(&start.to_le_bytes());
            d[o + 12..o + 16].copy_from_slice(&len.to_le_bytes());
        }
        d[510] = 0x55;
        d[511] = 0xAA;
        d
    }

    #[test]
    fn mbr_primary_partitions() {
        let d = mbr(&[(0x83, 2048, 100), (0x8E, 4096, 50)]);
        let t = read_table(&d).unwrap().unwrap();
        assert_eq!(t.scheme(), "mbr");
        let p = t.partitions();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].number, p[0].start, p[0].len),
            (1, 2048 * 512, 100 * 512)
        );
        assert_eq!(p[1].type_name, "lvm");
    }

    #[test]
    fn looping_extended_chain_is_an_error() {
        let mut d = mbr(&[(0x05, 100, 1000)]);
        // The EBR at sector 100 points to itself as the next one.
        let o = 100 * 512;
        d[o + 446 + 4] = 0x83;
        d[o + 446 + 8..o + 446 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[o + 446 + 12..o + 446 + 16].copy_from_slice(&10u32.to_le_bytes());
        d[o + 462 + 4] = 0x05;
        d[o + 462 + 12..o + 462 + 16].copy_from_slice(&10u32.to_le_bytes());
        d[o + 510] = 0x55;
        d[o + 511] = 0xAA;
        let e = read_table(&d).unwrap_err().to_string();
        assert!(e.contains("loops"), "{e}");
    }

    #[test]
    fn boot_sector_is_not_a_table() {
        let mut d = mbr(&[(0x83, 1, 1)]);
        d[446] = 0x12;
        assert_eq!(read_table(&d).unwrap(), None);
    }
}
