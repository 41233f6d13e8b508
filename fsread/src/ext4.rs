//! ext2, ext3 and ext4, read-only: superblock, group descriptors (also
//! `64bit` and `meta_bg`), inodes, extent trees and ext2/3 block maps,
//! linear and hashed directories (read linearly), inline data, fast and
//! slow symlinks. A journal that needs recovery is replayed in memory
//! ([`journal`]), as the kernel would on mount; nothing is written.
//!
//! Bounds: every block number is checked against the filesystem's size,
//! extent trees against their depth, maps and directories against caps,
//! so a hostile image ends in an error.

mod journal;

use std::sync::Arc;

use crate::error::{corrupt, Error, Result};
use crate::extent::{self, Extent, LastMap, PosixInode};
use crate::io::{self, Fields, ReadAt};
use crate::tree::{Entry, Node, Time, Tree, LINK_MAX};

const WHAT: &str = "ext4";
const MAGIC: u16 = 0xEF53;
const ROOT_INO: u64 = 2;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;

const FLAG_ENCRYPT: u32 = 0x800;
const FLAG_EXTENTS: u32 = 0x80000;
const FLAG_INLINE_DATA: u32 = 0x1000_0000;

/// Extents a file map may hold; more is refused as hostile.
const MAX_EXTENTS: usize = 8 << 20;
/// Directory bytes read for one listing.
const MAX_DIR_BYTES: u64 = 256 << 20;

/// What the superblock says.
struct Super {
    block_size: u64,
    blocks: u64,
    inodes: u64,
    inodes_per_group: u64,
    blocks_per_group: u64,
    first_data_block: u64,
    inode_size: u64,
    desc_size: u64,
    first_meta_bg: u64,
    compat: u32,
    incompat: u32,
    ro_compat: u32,
    journal_ino: u64,
    label: Option<String>,
}

/// Where a file's bytes are.
enum Map {
    Blocks(Vec<Extent>),
    /// Inline data (in the inode and its `system.data` attribute).
    Inline(Vec<u8>),
}

/// An inode as read.
struct Inode {
    posix: PosixInode,
    flags: u32,
    raw: Vec<u8>,
}

impl Inode {
    fn i_block(&self) -> &[u8] {
        &self.raw[40..100]
    }
}

/// An ext2/3/4 filesystem.
pub struct Ext4 {
    dev: Arc<dyn ReadAt>,
    sb: Super,
    journal: journal::Journal,
    last_map: LastMap<Map>,
}

impl Ext4 {
    /// Whether `dev` starts with an ext2/3/4 superblock.
    pub fn detect(dev: &dyn ReadAt) -> bool {
        let mut m = [0u8; 2];
        dev.read_at(1024 + 56, &mut m).is_ok() && u16::from_le_bytes(m) == MAGIC
    }

    pub fn open(dev: Arc<dyn ReadAt>) -> Result<Self> {
        let sb = read_super(dev.as_ref())?;
        let mut fs = Ext4 {
            dev,
            sb,
            journal: journal::Journal::default(),
            last_map: LastMap::default(),
        };
        if fs.sb.incompat & INCOMPAT_RECOVER != 0 && fs.sb.journal_ino != 0 {
            let inode = fs.inode(fs.sb.journal_ino)?;
            let Map::Blocks(map) = fs.map(&inode)? else {
                return Err(corrupt(WHAT, "journal inode holds inline data"));
            };
            fs.journal = journal::Journal::load(&fs, &map)?;
        }
        Ok(fs)
    }

    pub fn label(&self) -> Option<String> {
        self.sb.label.clone()
    }

    /// Blocks replayed from the journal (0 for a clean filesystem).
    pub fn replayed_blocks(&self) -> usize {
        self.journal.len()
    }

    /// Reads filesystem bytes as the journal left them.
    fn read_fs(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.journal.is_empty() {
            return io::read_exact(self.dev.as_ref(), offset, buf);
        }
        let bs = self.sb.block_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let block = at / bs;
            let within = at % bs;
            let n = ((bs - within) as usize).min(buf.len() - pos);
            let dst = &mut buf[pos..pos + n];
            match self.journal.block(block) {
                Some(j) => {
                    let mut b = io::read_vec(self.dev.as_ref(), j.offset, bs as usize)?;
                    if j.escape {
                        b[..4].copy_from_slice(&journal::MAGIC.to_be_bytes());
                    }
                    dst.copy_from_slice(&b[within as usize..within as usize + n]);
                }
                None => io::read_exact(self.dev.as_ref(), at, dst)?,
            }
            pos += n;
        }
        Ok(())
    }

    fn block(&self, b: u64) -> Result<Vec<u8>> {
        self.check_block(b, 1)?;
        let mut buf = vec![0u8; self.sb.block_size as usize];
        self.read_fs(b * self.sb.block_size, &mut buf)?;
        Ok(buf)
    }

    fn check_block(&self, b: u64, len: u64) -> Result<()> {
        match b.checked_add(len) {
            Some(end) if end <= self.sb.blocks => Ok(()),
            _ => Err(corrupt(
                WHAT,
                format!("block {b}+{len} past the end ({} blocks)", self.sb.blocks),
            )),
        }
    }

    /// Byte offset of group `g`'s descriptor.
    fn desc_offset(&self, g: u64) -> Result<u64> {
        let sb = &self.sb;
        let per_block = sb.block_size / sb.desc_size;
        let block = if sb.incompat & INCOMPAT_META_BG != 0 && g / per_block >= sb.first_meta_bg {
            let first = g / per_block * per_block;
            sb.first_data_block + first * sb.blocks_per_group + u64::from(self.has_super(first))
        } else {
            sb.first_data_block + 1 + g / per_block
        };
        self.check_block(block, 1)?;
        Ok(block * sb.block_size + g % per_block * sb.desc_size)
    }

    /// Whether group `g` holds a superblock backup.
    fn has_super(&self, g: u64) -> bool {
        if self.sb.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 || g <= 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&p| {
            let mut x = p;
            while x < g {
                x *= p;
            }
            x == g
        })
    }

    fn inode(&self, ino: u64) -> Result<Inode> {
        let sb = &self.sb;
        if ino == 0 || ino > sb.inodes {
            return Err(corrupt(WHAT, format!("inode number {ino} out of range")));
        }
        let g = (ino - 1) / sb.inodes_per_group;
        let index = (ino - 1) % sb.inodes_per_group;
        let mut d = vec![0u8; sb.desc_size as usize];
        self.read_fs(self.desc_offset(g)?, &mut d)?;
        let d = Fields::new(&d, WHAT);
        let mut table = u64::from(d.le32(8)?);
        if sb.desc_size >= 64 {
            table |= u64::from(d.le32(0x28)?) << 32;
        }
        let table_blocks = (sb.inodes_per_group * sb.inode_size).div_ceil(sb.block_size);
        self.check_block(table, table_blocks)?;
        let mut raw = vec![0u8; sb.inode_size as usize];
        self.read_fs(table * sb.block_size + index * sb.inode_size, &mut raw)?;
        parse_inode(ino, raw)
    }

    /// Where inode's bytes are.
    fn map(&self, inode: &Inode) -> Result<Map> {
        if inode.flags & FLAG_INLINE_DATA != 0 {
            return Ok(Map::Inline(self.inline_data(inode)?));
        }
        let nblocks = inode.posix.size.div_ceil(self.sb.block_size);
        let mut out = Vec::new();
        if inode.flags & FLAG_EXTENTS != 0 {
            let mut budget = self.sb.blocks;
            self.walk_extents(inode.i_block(), None, &mut out, &mut budget)?;
            out.sort_by_key(|e: &Extent| e.logical);
        } else {
            self.walk_block_map(inode.i_block(), nblocks, &mut out)?;
        }
        Ok(Map::Blocks(out))
    }

    /// Collects the leaves of an extent tree node.
    fn walk_extents(
        &self,
        node: &[u8],
        depth: Option<u16>,
        out: &mut Vec<Extent>,
        budget: &mut u64,
    ) -> Result<()> {
        let f = Fields::new(node, "ext4 extent tree");
        if f.le16(0)? != 0xF30A {
            return Err(corrupt(WHAT, "bad extent header magic"));
        }
        let entries = usize::from(f.le16(2)?);
        let d = f.le16(6)?;
        if d > 5 || depth.is_some_and(|want| want != d) {
            return Err(corrupt(
                WHAT,
                format!("extent tree depth {d} where {depth:?} expected"),
            ));
        }
        for i in 0..entries {
            let e = 12 + i * 12;
            if d == 0 {
                let len = u64::from(f.le16(e + 4)?);
                let (len, unwritten) = if len > 32768 {
                    (len - 32768, true)
                } else {
                    (len, false)
                };
                let phys = u64::from(f.le16(e + 6)?) << 32 | u64::from(f.le32(e + 8)?);
                if len == 0 {
                    continue;
                }
                self.check_block(phys, len)?;
                if out.len() >= MAX_EXTENTS {
                    return Err(Error::TooLarge("file has too many extents".into()));
                }
                out.push(Extent {
                    logical: u64::from(f.le32(e)?),
                    offset: phys * self.sb.block_size,
                    len,
                    unwritten,
                });
            } else {
                let child = u64::from(f.le32(e + 4)?) | u64::from(f.le16(e + 8)?) << 32;
                *budget = budget
                    .checked_sub(1)
                    .ok_or_else(|| corrupt(WHAT, "extent tree visits more blocks than exist"))?;
                let block = self.block(child)?;
                self.walk_extents(&block, Some(d - 1), out, budget)?;
            }
        }
        Ok(())
    }

    /// ext2/3 block map: 12 direct, then single, double, triple indirect.
    fn walk_block_map(&self, i_block: &[u8], nblocks: u64, out: &mut Vec<Extent>) -> Result<()> {
        let f = Fields::new(i_block, WHAT);
        let per = self.sb.block_size / 4;
        for i in 0..12 {
            self.push_block(out, i as u64, u64::from(f.le32(i * 4)?), nblocks)?;
        }
        let mut budget = self.sb.blocks;
        let mut start = 12u64;
        let mut span = 1u64;
        for level in 1..=3 {
            span *= per;
            let ptr = u64::from(f.le32(44 + level * 4)?);
            self.indirect(ptr, level as u32, start, nblocks, out, &mut budget)?;
            start += span;
        }
        if out.len() > MAX_EXTENTS {
            return Err(Error::TooLarge("file has too many extents".into()));
        }
        Ok(())
    }

    fn indirect(
        &self,
        ptr: u64,
        level: u32,
        start: u64,
        nblocks: u64,
        out: &mut Vec<Extent>,
        budget: &mut u64,
    ) -> Result<()> {
        if ptr == 0 || start >= nblocks {
            return Ok(());
        }
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| corrupt(WHAT, "block map visits more blocks than exist"))?;
        let block = self.block(ptr)?;
        let per = self.sb.block_size / 4;
        let span = per.pow(level - 1);
        for (i, p) in block.chunks_exact(4).enumerate() {
            let logical = start + i as u64 * span;
            if logical >= nblocks {
                break;
            }
            let p = u64::from(u32::from_le_bytes([p[0], p[1], p[2], p[3]]));
            if level == 1 {
                self.push_block(out, logical, p, nblocks)?;
            } else {
                self.indirect(p, level - 1, logical, nblocks, out, budget)?;
            }
        }
        Ok(())
    }

    /// Appends file block `logical` at block `phys` to a map, merging runs.
    fn push_block(
        &self,
        out: &mut Vec<Extent>,
        logical: u64,
        phys: u64,
        nblocks: u64,
    ) -> Result<()> {
        if phys == 0 || logical >= nblocks {
            return Ok(());
        }
        self.check_block(phys, 1)?;
        let bs = self.sb.block_size;
        if let Some(l) = out.last_mut() {
            if l.logical + l.len == logical && l.offset + l.len * bs == phys * bs {
                l.len += 1;
                return Ok(());
            }
        }
        out.push(Extent {
            logical,
            offset: phys * bs,
            len: 1,
            unwritten: false,
        });
        Ok(())
    }

    /// Inline data: the 60 bytes of `i_block`, then the `system.data`
    /// extended attribute in the inode's extra space.
    fn inline_data(&self, inode: &Inode) -> Result<Vec<u8>> {
        let mut data = inode.i_block().to_vec();
        if let Some(more) = inline_xattr(&inode.raw)? {
            data.extend_from_slice(more);
        }
        Ok(data)
    }

    /// Reads `buf.len()` bytes of `map` from byte `offset` (callers clip
    /// to the file's size); holes and unwritten extents read as zeros.
    fn read_mapped(&self, map: &Map, offset: u64, buf: &mut [u8]) -> Result<()> {
        match map {
            Map::Inline(data) => {
                buf.fill(0);
                if let Some(src) = usize::try_from(offset).ok().and_then(|o| data.get(o..)) {
                    let n = src.len().min(buf.len());
                    buf[..n].copy_from_slice(&src[..n]);
                }
                Ok(())
            }
            Map::Blocks(extents) => {
                extent::read(extents, self.sb.block_size, offset, buf, |at, dst| {
                    self.read_fs(at, dst)
                })
            }
        }
    }

    fn dir_entries(&self, dir: &Inode) -> Result<Vec<(Vec<u8>, u64)>> {
        if dir.flags & FLAG_ENCRYPT != 0 {
            return Err(Error::Unsupported(format!(
                "directory inode {} is encrypted",
                dir.posix.ino
            )));
        }
        let map = self.map(dir)?;
        let mut names = Vec::new();
        let name_len16 = self.sb.incompat & INCOMPAT_FILETYPE == 0;
        match &map {
            Map::Inline(data) => {
                // The parent's inode number, then entries.
                parse_dirents(data.get(4..60).unwrap_or(&[]), name_len16, &mut names)?;
                parse_dirents(data.get(60..).unwrap_or(&[]), name_len16, &mut names)?;
            }
            Map::Blocks(extents) => {
                let bs = self.sb.block_size;
                let mut total = 0u64;
                for e in extents.iter().filter(|e| !e.unwritten) {
                    for b in 0..e.len {
                        if (e.logical + b) * bs >= dir.posix.size {
                            break;
                        }
                        total += bs;
                        if total > MAX_DIR_BYTES {
                            return Err(Error::TooLarge(format!(
                                "directory inode {} is too large",
                                dir.posix.ino
                            )));
                        }
                        let mut block = vec![0u8; bs as usize];
                        self.read_fs(e.offset + b * bs, &mut block)?;
                        parse_dirents(&block, name_len16, &mut names)?;
                    }
                }
            }
        }
        Ok(names)
    }
}

impl Tree for Ext4 {
    fn kind(&self) -> &'static str {
        if self.sb.incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) != 0 {
            "ext4"
        } else if self.sb.compat & COMPAT_HAS_JOURNAL != 0 {
            "ext3"
        } else {
            "ext2"
        }
    }

    fn root(&self) -> Result<Node> {
        self.inode(ROOT_INO)?.posix.node(WHAT)
    }

    fn list(&self, dir: &Node) -> Result<Vec<Entry>> {
        let names = self.dir_entries(&self.inode(dir.handle)?)?;
        extent::entries(names, |ino| self.inode(ino)?.posix.node(WHAT))
    }

    fn read(&self, file: &Node, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inode = self.inode(file.handle)?;
        let n = extent::clip(inode.posix.size, offset, buf.len());
        if n == 0 {
            return Ok(0);
        }
        let map = self.last_map.get(inode.posix.ino, || self.map(&inode))?;
        self.read_mapped(&map, offset, &mut buf[..n])?;
        Ok(n)
    }

    fn read_link(&self, link: &Node) -> Result<Vec<u8>> {
        let inode = self.inode(link.handle)?;
        if inode.posix.size > LINK_MAX {
            return Err(corrupt(
                WHAT,
                format!("symlink of {} bytes", inode.posix.size),
            ));
        }
        let n = inode.posix.size as usize;
        if inode.flags & (FLAG_EXTENTS | FLAG_INLINE_DATA) == 0 && n < 60 {
            // A fast symlink: the target is in i_block.
            return Ok(inode.i_block()[..n].to_vec());
        }
        let mut buf = vec![0u8; n];
        let map = self.map(&inode)?;
        self.read_mapped(&map, 0, &mut buf)?;
        Ok(buf)
    }
}

fn read_super(dev: &dyn ReadAt) -> Result<Super> {
    let raw = io::read_vec(dev, 1024, 1024)?;
    let f = Fields::new(&raw, WHAT);
    if f.le16(56)? != MAGIC {
        return Err(corrupt(WHAT, "no ext2/3/4 superblock"));
    }
    let log = f.le32(24)?;
    if log > 6 {
        return Err(corrupt(WHAT, format!("block size 1024 << {log}")));
    }
    let block_size = 1024u64 << log;
    let incompat = f.le32(96)?;
    let rev = f.le32(76)?;
    let inode_size = if rev == 0 {
        128
    } else {
        u64::from(f.le16(88)?)
    };
    if !inode_size.is_power_of_two() || !(128..=block_size).contains(&inode_size) {
        return Err(corrupt(WHAT, format!("inode size {inode_size}")));
    }
    let desc_size = if incompat & INCOMPAT_64BIT != 0 {
        u64::from(f.le16(254)?)
    } else {
        32
    };
    if !desc_size.is_power_of_two() || !(32..=1024).contains(&desc_size) || desc_size > block_size {
        return Err(corrupt(WHAT, format!("group descriptor size {desc_size}")));
    }
    let mut blocks = u64::from(f.le32(4)?);
    if incompat & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(f.le32(0x150)?) << 32;
    }
    let blocks = blocks.min(dev.size() / block_size);
    let inodes_per_group = u64::from(f.le32(40)?);
    let blocks_per_group = u64::from(f.le32(32)?);
    let first_data_block = u64::from(f.le32(20)?);
    if inodes_per_group == 0 || blocks_per_group == 0 || first_data_block >= blocks {
        return Err(corrupt(WHAT, "empty groups or no data blocks"));
    }
    for (bit, what) in [
        (INCOMPAT_COMPRESSION, "compression"),
        (
            INCOMPAT_JOURNAL_DEV,
            "an external journal device, not a filesystem",
        ),
        (INCOMPAT_DIRDATA, "dirdata"),
    ] {
        if incompat & bit != 0 {
            return Err(Error::Unsupported(format!(
                "ext4 feature not supported: {what}"
            )));
        }
    }
    let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
    Ok(Super {
        block_size,
        blocks,
        inodes: u64::from(f.le32(0)?).min(groups.saturating_mul(inodes_per_group)),
        inodes_per_group,
        blocks_per_group,
        first_data_block,
        inode_size,
        desc_size,
        first_meta_bg: u64::from(f.le32(260)?),
        compat: f.le32(92)?,
        incompat,
        ro_compat: f.le32(100)?,
        journal_ino: u64::from(f.le32(224)?),
        label: io::label(f.slice(120, 16)?),
    })
}

fn parse_inode(ino: u64, raw: Vec<u8>) -> Result<Inode> {
    let f = Fields::new(&raw, WHAT);
    let mode = u32::from(f.le16(0)?);
    let uid = u32::from(f.le16(2)?) | u32::from(f.le16(120)?) << 16;
    let gid = u32::from(f.le16(24)?) | u32::from(f.le16(122)?) << 16;
    let size = u64::from(f.le32(4)?) | u64::from(f.le32(108)?) << 32;
    let mut secs = i64::from(f.le32(16)? as i32);
    let mut nsec = 0;
    let extra_isize = if raw.len() > 128 {
        usize::from(f.le16(128)?)
    } else {
        0
    };
    if extra_isize >= 12 {
        let extra = f.le32(136)?;
        secs += i64::from(extra & 3) << 32;
        nsec = (extra >> 2).min(999_999_999);
    }
    let nlink = u32::from(f.le16(26)?);
    let flags = f.le32(32)?;
    Ok(Inode {
        posix: PosixInode {
            ino,
            mode,
            uid,
            gid,
            size,
            mtime: Time { secs, nsec },
            nlink,
        },
        flags,
        raw,
    })
}

/// The value of the in-inode extended attribute `system.data`.
fn inline_xattr(raw: &[u8]) -> Result<Option<&[u8]>> {
    if raw.len() <= 128 {
        return Ok(None);
    }
    let f = Fields::new(raw, "ext4 inline data");
    let start = 128 + usize::from(f.le16(128)?);
    if start + 4 > raw.len() || f.le32(start)? != 0xEA02_0000 {
        return Ok(None);
    }
    let base = start + 4;
    let mut e = base;
    while e + 16 <= raw.len() && f.le32(e)? != 0 {
        let name_len = usize::from(f.u8(e)?);
        let index = f.u8(e + 1)?;
        let value_offs = usize::from(f.le16(e + 2)?);
        let value_size = f.le32(e + 8)? as usize;
        if index == 7 && f.slice(e + 16, name_len)? == b"data" {
            return Ok(Some(f.slice(base + value_offs, value_size)?));
        }
        e += (16 + name_len).div_ceil(4) * 4;
    }
    Ok(None)
}

/// Directory entries of one block (or inline area): `(name, inode)`,
/// without `.`, `..` and empty slots.
fn parse_dirents(b: &[u8], name_len16: bool, out: &mut Vec<(Vec<u8>, u64)>) -> Result<()> {
    let f = Fields::new(b, "ext4 directory");
    let mut pos = 0usize;
    while pos + 8 <= b.len() {
        let ino = u64::from(f.le32(pos)?);
        let rec_len = match usize::from(f.le16(pos + 4)?) {
            // 64 KiB blocks store a whole-block entry as 0 or 65535.
            0 | 65535 if b.len() == 65536 => 65536,
            n => n,
        };
        let name_len = if name_len16 {
            usize::from(f.le16(pos + 6)?)
        } else {
            usize::from(f.u8(pos + 6)?)
        };
        if rec_len < 8 || rec_len % 4 != 0 || pos + rec_len > b.len() || 8 + name_len > rec_len {
            return Err(corrupt(
                WHAT,
                format!("directory entry at {pos}: length {rec_len}, name {name_len}"),
            ));
        }
        let name = f.slice(pos + 8, name_len)?;
        if ino != 0 && name != b"." && name != b".." && name_len > 0 {
            if out.len() >= 16 << 20 {
                return Err(Error::TooLarge("directory has too many entries".into()));
            }
            out.push((name.to_vec(), ino));
        }
        pos += rec_len;
    }
    Ok(())
}
