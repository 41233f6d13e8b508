//! XFS (v4 and v5), read-only and written here: no maintained Rust reader
//! exists, and what a listing needs is small: the superblock, inodes
//! (located by number, no inode btree walk), data fork extent lists and
//! bmap btrees, shortform/block/leaf/node directories (their data blocks
//! are read linearly; hash indexes are not needed to list), local and
//! remote symlinks.
//!
//! A dirty log is not replayed: the filesystem reads as its metadata
//! stands on disk, which for a crash-consistent snapshot may lack the last
//! seconds of changes.
//!
//! Bounds: block numbers are checked against their allocation group,
//! btrees against their level and a visit budget, directories against a
//! byte cap.

use std::sync::Arc;

use crate::error::{corrupt, Error, Result};
use crate::extent::{self, Extent, LastMap, PosixInode};
use crate::io::{self, Fields, ReadAt};
use crate::tree::{Entry, Node, Time, Tree, LINK_MAX};

const WHAT: &str = "xfs";
const SB_MAGIC: u32 = 0x5846_5342; // XFSB
const INODE_MAGIC: u16 = 0x494e; // IN

const INCOMPAT_FTYPE: u32 = 0x1;
const V4_FEATURES2_FTYPE: u32 = 0x200;
const V4_DIRV2: u16 = 0x2000;

const DIFLAG_REALTIME: u16 = 0x1;
const DIFLAG2_BIGTIME: u64 = 0x8;
const DIFLAG2_NREXT64: u64 = 0x10;

const FMT_LOCAL: u8 = 1;
const FMT_EXTENTS: u8 = 2;
const FMT_BTREE: u8 = 3;

/// Directory data blocks live below this offset; leaf and free-index
/// blocks above it.
const DIR_LEAF_OFFSET: u64 = 32 << 30;
const MAX_DIR_BYTES: u64 = 256 << 20;
const MAX_EXTENTS: usize = 8 << 20;

struct Inode {
    posix: PosixInode,
    format: u8,
    flags: u16,
    nextents: u64,
    /// The data fork, as stored in the inode.
    fork: Vec<u8>,
}

/// An XFS filesystem.
pub struct Xfs {
    dev: Arc<dyn ReadAt>,
    bs: u64,
    agblocks: u64,
    agcount: u64,
    agblklog: u32,
    inopblog: u32,
    inode_size: u64,
    root: u64,
    v5: bool,
    ftype: bool,
    dir_block: u64,
    label: Option<String>,
    last_map: LastMap<Vec<Extent>>,
}

impl Xfs {
    pub fn detect(dev: &dyn ReadAt) -> bool {
        let mut m = [0u8; 4];
        dev.read_at(0, &mut m).is_ok() && u32::from_be_bytes(m) == SB_MAGIC
    }

    pub fn open(dev: Arc<dyn ReadAt>) -> Result<Self> {
        let raw = io::read_vec(dev.as_ref(), 0, 512)?;
        let f = Fields::new(&raw, WHAT);
        if f.be32(0)? != SB_MAGIC {
            return Err(corrupt(WHAT, "no XFS superblock"));
        }
        let bs = u64::from(f.be32(4)?);
        let blocklog = f.u8(120)?;
        let inode_size = u64::from(f.be16(104)?);
        let inopblog = u32::from(f.u8(123)?);
        let agblklog = u32::from(f.u8(124)?);
        let agblocks = u64::from(f.be32(84)?);
        let agcount = u64::from(f.be32(88)?);
        let dirblklog = u32::from(f.u8(192)?);
        let version = f.be16(100)?;
        let v5 = version & 0xF == 5;
        let sane = bs.is_power_of_two()
            && (512..=65536).contains(&bs)
            && u64::from(blocklog) < 64
            && 1u64 << blocklog == bs
            && inode_size.is_power_of_two()
            && (256..=2048).contains(&inode_size)
            && inode_size <= bs
            && 1u64 << inopblog == bs / inode_size
            && agblklog < 32
            && agblocks > 0
            && agblocks <= 1u64 << agblklog
            && agcount > 0
            && (bs << dirblklog.min(16)) <= 65536;
        if !sane {
            return Err(corrupt(WHAT, "superblock geometry is inconsistent"));
        }
        if !v5 && (version & 0xF != 4 || version & V4_DIRV2 == 0) {
            return Err(Error::Unsupported(format!(
                "XFS version {:#x} not supported",
                version
            )));
        }
        let ftype = if v5 {
            f.be32(216)? & INCOMPAT_FTYPE != 0
        } else {
            f.be32(200)? & V4_FEATURES2_FTYPE != 0
        };
        Ok(Xfs {
            bs,
            agblocks,
            agcount,
            agblklog,
            inopblog,
            inode_size,
            root: f.be64(56)?,
            v5,
            ftype,
            dir_block: bs << dirblklog,
            label: io::label(f.slice(108, 12)?),
            last_map: LastMap::default(),
            dev,
        })
    }

    pub fn label(&self) -> Option<String> {
        self.label.clone()
    }

    /// Byte offset of `len` blocks at filesystem block `fsb`.
    fn block_offset(&self, fsb: u64, len: u64) -> Result<u64> {
        let agno = fsb >> self.agblklog;
        let agbno = fsb & ((1u64 << self.agblklog) - 1);
        if agno >= self.agcount || agbno.checked_add(len).is_none_or(|e| e > self.agblocks) {
            return Err(corrupt(
                WHAT,
                format!("block {fsb}+{len} outside the filesystem"),
            ));
        }
        Ok((agno * self.agblocks + agbno) * self.bs)
    }

    fn inode(&self, ino: u64) -> Result<Inode> {
        let agino_bits = self.agblklog + self.inopblog;
        let agno = ino >> agino_bits;
        let agino = ino & ((1u64 << agino_bits) - 1);
        let agbno = agino >> self.inopblog;
        let index = agino & ((1u64 << self.inopblog) - 1);
        let at = self.block_offset((agno << self.agblklog) | agbno, 1)? + index * self.inode_size;
        let raw = io::read_vec(self.dev.as_ref(), at, self.inode_size as usize)?;
        self.parse_inode(ino, &raw)
    }

    fn parse_inode(&self, ino: u64, raw: &[u8]) -> Result<Inode> {
        let f = Fields::new(raw, "xfs inode");
        if f.be16(0)? != INODE_MAGIC {
            return Err(corrupt(WHAT, format!("inode {ino}: bad magic")));
        }
        let version = f.u8(4)?;
        if !(1..=3).contains(&version) || (self.v5 && version != 3) {
            return Err(corrupt(WHAT, format!("inode {ino}: version {version}")));
        }
        let flags2 = if version == 3 { f.be64(120)? } else { 0 };
        let mtime = if flags2 & DIFLAG2_BIGTIME != 0 {
            let ns = f.be64(40)?;
            Time {
                secs: (ns / 1_000_000_000) as i64 - (1i64 << 31),
                nsec: (ns % 1_000_000_000) as u32,
            }
        } else {
            Time {
                secs: i64::from(f.be32(40)? as i32),
                nsec: f.be32(44)?.min(999_999_999),
            }
        };
        let size = f.be64(56)?;
        if size > i64::MAX as u64 {
            return Err(corrupt(WHAT, format!("inode {ino}: size {size}")));
        }
        let core = if version == 3 { 176 } else { 100 };
        let forkoff = usize::from(f.u8(82)?) * 8;
        let fork_len = if forkoff != 0 {
            forkoff
        } else {
            raw.len() - core
        };
        Ok(Inode {
            posix: PosixInode {
                ino,
                mode: u32::from(f.be16(2)?),
                uid: f.be32(8)?,
                gid: f.be32(12)?,
                nlink: if version == 1 {
                    u32::from(f.be16(6)?)
                } else {
                    f.be32(16)?
                },
                mtime,
                size,
            },
            format: f.u8(5)?,
            flags: f.be16(90)?,
            nextents: if flags2 & DIFLAG2_NREXT64 != 0 {
                f.be64(24)?
            } else {
                u64::from(f.be32(76)?)
            },
            fork: f.slice(core, fork_len)?.to_vec(),
        })
    }

    /// The data fork's extents, sorted by file block.
    fn extents(&self, inode: &Inode) -> Result<Vec<Extent>> {
        if inode.flags & DIFLAG_REALTIME != 0 {
            return Err(Error::Unsupported(format!(
                "inode {}: data on a realtime device",
                inode.posix.ino
            )));
        }
        let mut out = Vec::new();
        match inode.format {
            FMT_EXTENTS => {
                let n = usize::try_from(inode.nextents).unwrap_or(usize::MAX);
                if n.checked_mul(16).is_none_or(|b| b > inode.fork.len()) {
                    return Err(corrupt(
                        WHAT,
                        format!("inode {}: {n} extents do not fit", inode.posix.ino),
                    ));
                }
                self.records(&inode.fork[..n * 16], &mut out)?;
            }
            FMT_BTREE => {
                let f = Fields::new(&inode.fork, "xfs bmap root");
                let level = f.be16(0)?;
                let numrecs = usize::from(f.be16(2)?);
                let maxrecs = (inode.fork.len() - 4) / 16;
                if level == 0 || numrecs > maxrecs {
                    return Err(corrupt(
                        WHAT,
                        format!(
                            "inode {}: bmap root level {level}, {numrecs} records",
                            inode.posix.ino
                        ),
                    ));
                }
                let mut budget = self.agcount * self.agblocks;
                for i in 0..numrecs {
                    let ptr = f.be64(4 + maxrecs * 8 + i * 8)?;
                    self.bmap_block(ptr, level - 1, &mut out, &mut budget)?;
                }
            }
            FMT_LOCAL => {}
            other => {
                return Err(corrupt(
                    WHAT,
                    format!("inode {}: data fork format {other}", inode.posix.ino),
                ))
            }
        }
        out.sort_by_key(|e| e.logical);
        Ok(out)
    }

    fn bmap_block(
        &self,
        fsb: u64,
        level: u16,
        out: &mut Vec<Extent>,
        budget: &mut u64,
    ) -> Result<()> {
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| corrupt(WHAT, "bmap btree visits more blocks than exist"))?;
        let b = io::read_vec(
            self.dev.as_ref(),
            self.block_offset(fsb, 1)?,
            self.bs as usize,
        )?;
        let f = Fields::new(&b, "xfs bmap block");
        let (magic, hdr) = if self.v5 {
            (0x424d_4133, 72)
        } else {
            (0x424d_4150, 24)
        };
        if f.be32(0)? != magic || f.be16(4)? != level {
            return Err(corrupt(
                WHAT,
                format!("bmap block {fsb}: bad magic or level"),
            ));
        }
        let numrecs = usize::from(f.be16(6)?);
        let maxrecs = (b.len() - hdr) / 16;
        if numrecs > maxrecs {
            return Err(corrupt(
                WHAT,
                format!("bmap block {fsb}: {numrecs} records"),
            ));
        }
        if level == 0 {
            return self.records(f.slice(hdr, numrecs * 16)?, out);
        }
        for i in 0..numrecs {
            let ptr = f.be64(hdr + maxrecs * 8 + i * 8)?;
            self.bmap_block(ptr, level - 1, out, budget)?;
        }
        Ok(())
    }

    /// Decodes packed 128-bit extent records.
    fn records(&self, raw: &[u8], out: &mut Vec<Extent>) -> Result<()> {
        for r in raw.chunks_exact(16) {
            let l0 = u64::from_be_bytes(r[..8].try_into().expect("8 bytes"));
            let l1 = u64::from_be_bytes(r[8..].try_into().expect("8 bytes"));
            let len = l1 & ((1 << 21) - 1);
            if len == 0 {
                continue;
            }
            let start = ((l0 & 0x1FF) << 43) | (l1 >> 21);
            if out.len() >= MAX_EXTENTS {
                return Err(Error::TooLarge("file has too many extents".into()));
            }
            out.push(Extent {
                logical: (l0 & ((1 << 63) - 1)) >> 9,
                offset: self.block_offset(start, len)?,
                len,
                unwritten: l0 >> 63 != 0,
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes from byte `offset` of a file mapped by
    /// `extents`.
    fn read_mapped(&self, extents: &[Extent], offset: u64, buf: &mut [u8]) -> Result<()> {
        extent::read(extents, self.bs, offset, buf, |at, dst| {
            io::read_exact(self.dev.as_ref(), at, dst)
        })
    }

    /// `(name, inode)` of a directory, without `.` and `..`.
    fn dir_entries(&self, dir: &Inode) -> Result<Vec<(Vec<u8>, u64)>> {
        let mut out = Vec::new();
        if dir.format == FMT_LOCAL {
            self.shortform(dir, &mut out)?;
            return Ok(out);
        }
        let extents = self.extents(dir)?;
        let db = self.dir_block;
        let mut blocks: Vec<u64> = Vec::new();
        for e in extents.iter().filter(|e| !e.unwritten) {
            let from = e.logical.saturating_mul(self.bs);
            let to = (e.logical + e.len)
                .saturating_mul(self.bs)
                .min(DIR_LEAF_OFFSET);
            let mut b = from / db;
            while b * db < to {
                if blocks.last() != Some(&b) {
                    blocks.push(b);
                }
                if blocks.len() as u64 * db > MAX_DIR_BYTES {
                    return Err(Error::TooLarge(format!(
                        "directory inode {} is too large",
                        dir.posix.ino
                    )));
                }
                b += 1;
            }
        }
        let mut buf = vec![0u8; db as usize];
        for b in blocks {
            self.read_mapped(&extents, b * db, &mut buf)?;
            self.data_block(&buf, &mut out)?;
        }
        Ok(out)
    }

    fn shortform(&self, dir: &Inode, out: &mut Vec<(Vec<u8>, u64)>) -> Result<()> {
        let f = Fields::new(&dir.fork, "xfs shortform directory");
        let count = usize::from(f.u8(0)?);
        let i8count = usize::from(f.u8(1)?);
        let width = if i8count > 0 { 8 } else { 4 };
        let n = if i8count > 0 { i8count } else { count };
        let mut pos = 2 + width;
        for _ in 0..n {
            let len = usize::from(f.u8(pos)?);
            let name = f.slice(pos + 3, len)?;
            pos += 3 + len + usize::from(self.ftype);
            let ino = if width == 8 {
                f.be64(pos)?
            } else {
                u64::from(f.be32(pos)?)
            };
            pos += width;
            out.push((name.to_vec(), ino));
        }
        Ok(())
    }

    /// Entries of one directory data block (block form or data form).
    fn data_block(&self, b: &[u8], out: &mut Vec<(Vec<u8>, u64)>) -> Result<()> {
        let f = Fields::new(b, "xfs directory block");
        let (hdr, block_form) = match f.be32(0)? {
            0x5844_3242 => (16, true),  // XD2B
            0x5844_3244 => (16, false), // XD2D
            0x5844_4233 => (64, true),  // XDB3
            0x5844_4433 => (64, false), // XDD3
            m => return Err(corrupt(WHAT, format!("directory block magic {m:#x}"))),
        };
        let end = if block_form {
            let count = f.be32(b.len() - 8)? as usize;
            count
                .checked_mul(8)
                .and_then(|l| b.len().checked_sub(8 + l))
                .ok_or_else(|| {
                    corrupt(WHAT, format!("directory block with {count} leaf entries"))
                })?
        } else {
            b.len()
        };
        let mut pos = hdr;
        while pos + 8 <= end {
            if f.be16(pos)? == 0xFFFF {
                let len = usize::from(f.be16(pos + 2)?);
                if len < 8 || len % 8 != 0 {
                    return Err(corrupt(
                        WHAT,
                        format!("free directory space of {len} bytes"),
                    ));
                }
                pos += len;
                continue;
            }
            let ino = f.be64(pos)?;
            let len = usize::from(f.u8(pos + 8)?);
            if len == 0 {
                return Err(corrupt(WHAT, "empty name in a directory"));
            }
            let name = f.slice(pos + 9, len)?;
            if name != b"." && name != b".." {
                out.push((name.to_vec(), ino));
            }
            pos += (9 + len + usize::from(self.ftype) + 2).div_ceil(8) * 8;
        }
        Ok(())
    }
}

impl Tree for Xfs {
    fn kind(&self) -> &'static str {
        "xfs"
    }

    fn root(&self) -> Result<Node> {
        self.inode(self.root)?.posix.node(WHAT)
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
        if inode.format == FMT_LOCAL {
            buf[..n].fill(0);
            let src = inode.fork.get(offset as usize..).unwrap_or(&[]);
            let k = src.len().min(n);
            buf[..k].copy_from_slice(&src[..k]);
            return Ok(n);
        }
        let extents = self
            .last_map
            .get(inode.posix.ino, || self.extents(&inode))?;
        self.read_mapped(&extents, offset, &mut buf[..n])?;
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
        if inode.format == FMT_LOCAL {
            return Ok(Fields::new(&inode.fork, "xfs symlink")
                .slice(0, n)?
                .to_vec());
        }
        // Remote: v5 blocks each start with a 56-byte header.
        let hdr = if self.v5 { 56 } else { 0 };
        let mut target = Vec::with_capacity(n);
        for e in self.extents(&inode)? {
            for k in 0..e.len {
                if target.len() >= n {
                    break;
                }
                let b = io::read_vec(self.dev.as_ref(), e.offset + k * self.bs, self.bs as usize)?;
                let take = (n - target.len()).min(b.len() - hdr);
                target.extend_from_slice(&b[hdr..hdr + take]);
            }
        }
        if target.len() != n {
            return Err(corrupt(
                WHAT,
                format!("symlink inode {} is short", inode.posix.ino),
            ));
        }
        Ok(target)
    }
}
