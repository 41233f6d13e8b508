//! In-memory replay of an ext3/4 (JBD2) journal: a filesystem backed up
//! while mounted has committed transactions whose blocks are only in the
//! journal. The replay finds them (scan, revoke, replay: the kernel's three
//! passes) and maps each filesystem block to its newest journal copy;
//! reads then take that copy. Nothing is written.
//!
//! Bounded by the journal's length: the scan stops after `maxlen` blocks,
//! at the first block out of sequence, or at anything it cannot parse.
//! Fast-commit blocks are not replayed.

use std::collections::HashMap;

use super::{Ext4, WHAT};
use crate::error::{corrupt, Error, Result};
use crate::extent::Extent;
use crate::io::Fields;

pub(super) const MAGIC: u32 = 0xC03B_3998;

const DESCRIPTOR: u32 = 1;
const COMMIT: u32 = 2;
const SUPER_V1: u32 = 3;
const SUPER_V2: u32 = 4;
const REVOKE: u32 = 5;

const INCOMPAT_REVOKE: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const INCOMPAT_FAST_COMMIT: u32 = 0x20;

const TAG_ESCAPE: u32 = 0x1;
const TAG_SAME_UUID: u32 = 0x2;
const TAG_LAST: u32 = 0x8;

/// Where the newest committed copy of a filesystem block is.
#[derive(Clone, Copy)]
pub(super) struct Copy {
    /// Byte offset on the device.
    pub offset: u64,
    /// The block began with the journal's magic, which was escaped.
    pub escape: bool,
}

#[derive(Default)]
pub(super) struct Journal {
    blocks: HashMap<u64, Copy>,
}

/// One committed transaction.
struct Txn {
    seq: u32,
    /// (filesystem block, journal block, escaped)
    tags: Vec<(u64, u64, bool)>,
    revoked: Vec<u64>,
}

impl Journal {
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn block(&self, b: u64) -> Option<Copy> {
        self.blocks.get(&b).copied()
    }

    /// Replays the journal whose blocks `map` gives (logical -> physical).
    pub fn load(fs: &Ext4, map: &[Extent]) -> Result<Journal> {
        let log = Log { fs, map };
        let sb = log.block(0)?;
        let f = Fields::new(&sb, "jbd2 superblock");
        let kind = f.be32(4)?;
        if f.be32(0)? != MAGIC || !(kind == SUPER_V1 || kind == SUPER_V2) {
            return Err(corrupt(WHAT, "bad journal superblock"));
        }
        if u64::from(f.be32(12)?) != fs.sb.block_size {
            return Err(Error::Unsupported(
                "journal block size differs from the filesystem's".into(),
            ));
        }
        let maxlen = u64::from(f.be32(16)?);
        let first = u64::from(f.be32(20)?);
        let seq = f.be32(24)?;
        let start = u64::from(f.be32(28)?);
        let incompat = if kind == SUPER_V2 { f.be32(40)? } else { 0 };
        let known = INCOMPAT_REVOKE
            | INCOMPAT_64BIT
            | INCOMPAT_ASYNC_COMMIT
            | INCOMPAT_CSUM_V2
            | INCOMPAT_CSUM_V3
            | INCOMPAT_FAST_COMMIT;
        if incompat & !known != 0 {
            return Err(Error::Unsupported(format!(
                "journal features {:#x} not supported",
                incompat & !known
            )));
        }
        if start == 0 {
            return Ok(Journal::default());
        }
        if first == 0 || first >= maxlen || start < first || start >= maxlen {
            return Err(corrupt(
                WHAT,
                format!("journal bounds first {first} start {start} maxlen {maxlen}"),
            ));
        }
        let layout = Layout {
            maxlen,
            first,
            tag_size: if incompat & INCOMPAT_CSUM_V3 != 0 {
                16
            } else if incompat & INCOMPAT_64BIT != 0 {
                12
            } else {
                8
            },
            tail: if incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0 {
                4
            } else {
                0
            },
            is64: incompat & INCOMPAT_64BIT != 0,
        };
        let txns = log.scan(&layout, start, seq)?;
        Ok(Journal {
            blocks: replay(fs, &log, &txns)?,
        })
    }
}

struct Layout {
    maxlen: u64,
    first: u64,
    tag_size: usize,
    /// Checksum tail of descriptor blocks.
    tail: usize,
    /// Block numbers have 64 bits (tags and revoke records).
    is64: bool,
}

impl Layout {
    fn next(&self, j: u64) -> u64 {
        if j + 1 >= self.maxlen {
            self.first
        } else {
            j + 1
        }
    }
}

/// The journal's blocks.
struct Log<'a> {
    fs: &'a Ext4,
    map: &'a [Extent],
}

impl Log<'_> {
    /// Device byte offset of journal block `j`.
    fn offset(&self, j: u64) -> Result<u64> {
        match crate::extent::find(self.map, j) {
            Some(e) => Ok(e.offset + (j - e.logical) * self.fs.sb.block_size),
            None => Err(corrupt(WHAT, format!("journal block {j} is not mapped"))),
        }
    }

    fn block(&self, j: u64) -> Result<Vec<u8>> {
        crate::io::read_vec(
            self.fs.dev.as_ref(),
            self.offset(j)?,
            self.fs.sb.block_size as usize,
        )
    }

    /// Pass one: the committed transactions from `start`, in order.
    fn scan(&self, l: &Layout, start: u64, mut seq: u32) -> Result<Vec<Txn>> {
        let mut done = Vec::new();
        let mut cur = Txn::new(seq);
        let mut j = start;
        let mut steps = 0u64;
        while steps < l.maxlen {
            steps += 1;
            let b = self.block(j)?;
            let f = Fields::new(&b, "jbd2 block");
            if f.be32(0)? != MAGIC || f.be32(8)? != seq {
                break;
            }
            match f.be32(4)? {
                DESCRIPTOR => {
                    let mut pos = 12;
                    loop {
                        if pos + l.tag_size > b.len() - l.tail {
                            break;
                        }
                        let mut block = u64::from(f.be32(pos)?);
                        let flags = if l.tag_size == 16 {
                            f.be32(pos + 4)?
                        } else {
                            u32::from(f.be16(pos + 6)?)
                        };
                        if l.is64 {
                            block |= u64::from(f.be32(pos + 8)?) << 32;
                        }
                        j = l.next(j);
                        steps += 1;
                        cur.tags.push((block, j, flags & TAG_ESCAPE != 0));
                        pos += l.tag_size;
                        if flags & TAG_SAME_UUID == 0 {
                            pos += 16;
                        }
                        if flags & TAG_LAST != 0 {
                            break;
                        }
                    }
                }
                COMMIT => {
                    done.push(std::mem::replace(&mut cur, Txn::new(seq.wrapping_add(1))));
                    seq = seq.wrapping_add(1);
                }
                REVOKE => {
                    let count = (f.be32(12)? as usize).min(b.len());
                    let width = if l.is64 { 8 } else { 4 };
                    let mut pos = 16;
                    while pos + width <= count {
                        cur.revoked.push(if width == 8 {
                            f.be64(pos)?
                        } else {
                            u64::from(f.be32(pos)?)
                        });
                        pos += width;
                    }
                }
                _ => break,
            }
            j = l.next(j);
        }
        Ok(done)
    }
}

impl Txn {
    fn new(seq: u32) -> Self {
        Txn {
            seq,
            tags: Vec::new(),
            revoked: Vec::new(),
        }
    }
}

/// Passes two and three: a block revoked in transaction `r` is not
/// replayed from any transaction up to `r`; later copies win.
fn replay(fs: &Ext4, log: &Log, txns: &[Txn]) -> Result<HashMap<u64, Copy>> {
    let mut revoked: HashMap<u64, u32> = HashMap::new();
    for t in txns {
        for &b in &t.revoked {
            let r = revoked.entry(b).or_insert(t.seq);
            if seq_after(t.seq, *r) {
                *r = t.seq;
            }
        }
    }
    let mut blocks = HashMap::new();
    for t in txns {
        for &(b, j, escape) in &t.tags {
            if revoked.get(&b).is_some_and(|&r| !seq_after(t.seq, r)) {
                continue;
            }
            fs.check_block(b, 1)?;
            blocks.insert(
                b,
                Copy {
                    offset: log.offset(j)?,
                    escape,
                },
            );
        }
    }
    Ok(blocks)
}

/// Whether sequence `a` comes after `b` (they wrap).
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}
