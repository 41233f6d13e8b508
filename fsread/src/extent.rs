//! What ext4 and XFS share: a file's map as sorted extents and reads
//! through it, the last map kept for the many reads of one file, and the
//! listing entry of a POSIX inode.

use std::sync::{Arc, Mutex};

use crate::error::{corrupt, Result};
use crate::tree::{Entry, Kind, Meta, Node, Time};

/// `len` blocks of a file from file block `logical`, on the device at
/// byte `offset` (`unwritten`: preallocated, reads as zeros).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Extent {
    pub logical: u64,
    pub offset: u64,
    pub len: u64,
    pub unwritten: bool,
}

/// The extent holding file block `lb`, if any (`extents` sorted).
pub(crate) fn find(extents: &[Extent], lb: u64) -> Option<&Extent> {
    let i = extents.partition_point(|e| e.logical.saturating_add(e.len) <= lb);
    extents.get(i).filter(|e| e.logical <= lb)
}

/// Fills `buf` from byte `offset` of a file mapped by `extents` (blocks
/// of `bs` bytes), reading device bytes with `read`; holes and unwritten
/// extents read as zeros. Callers clip `buf` to the file's size.
pub(crate) fn read(
    extents: &[Extent],
    bs: u64,
    offset: u64,
    buf: &mut [u8],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let at = offset + pos as u64;
        let lb = at / bs;
        let (end, src) = match find(extents, lb) {
            Some(e) => {
                let src = (!e.unwritten).then(|| e.offset + (lb - e.logical) * bs + at % bs);
                ((e.logical + e.len).saturating_mul(bs), src)
            }
            None => {
                let i = extents.partition_point(|e| e.logical <= lb);
                let next = extents
                    .get(i)
                    .map_or(u64::MAX, |e| e.logical.saturating_mul(bs));
                (next, None)
            }
        };
        let n = end.saturating_sub(at).min((buf.len() - pos) as u64) as usize;
        if n == 0 {
            return Err(corrupt(
                "extent map",
                format!("extents overlap at block {lb}"),
            ));
        }
        let dst = &mut buf[pos..pos + n];
        match src {
            Some(s) => read(s, dst)?,
            None => dst.fill(0),
        }
        pos += n;
    }
    Ok(())
}

/// The map of the last inode read: reads of one file come in pieces.
pub(crate) struct LastMap<T>(Mutex<Option<(u64, Arc<T>)>>);

impl<T> Default for LastMap<T> {
    fn default() -> Self {
        LastMap(Mutex::new(None))
    }
}

impl<T> LastMap<T> {
    /// The map of inode `ino`, made by `make` unless it is the last one.
    pub fn get(&self, ino: u64, make: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = last.as_ref().filter(|(i, _)| *i == ino) {
            return Ok(m.clone());
        }
        let m = Arc::new(make()?);
        *last = Some((ino, m.clone()));
        Ok(m)
    }
}

/// What a POSIX inode tells a listing.
pub(crate) struct PosixInode {
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Time,
    pub nlink: u32,
}

impl PosixInode {
    pub fn node(&self, what: &'static str) -> Result<Node> {
        let kind = Kind::from_mode(self.mode)
            .ok_or_else(|| corrupt(what, format!("inode {} has mode {:o}", self.ino, self.mode)))?;
        Ok(Node {
            id: self.ino,
            handle: self.ino,
            meta: Meta {
                kind,
                size: self.size,
                mode: self.mode & 0o7777,
                uid: Some(self.uid),
                gid: Some(self.gid),
                mtime: Some(self.mtime),
                nlink: self.nlink,
            },
        })
    }
}

/// A directory's `(name, inode number)` pairs as entries, each inode
/// read by `node`.
pub(crate) fn entries(
    names: Vec<(Vec<u8>, u64)>,
    node: impl Fn(u64) -> Result<Node>,
) -> Result<Vec<Entry>> {
    names
        .into_iter()
        .map(|(name, ino)| {
            Ok(Entry {
                name,
                node: node(ino)?,
            })
        })
        .collect()
}

/// Bytes of a `size`-byte file a read of `len` at `offset` returns.
pub(crate) fn clip(size: u64, offset: u64, len: usize) -> usize {
    size.saturating_sub(offset).min(len as u64) as usize
}
