//! NTFS through the `ntfs` crate (Colin Finck's: MFT, attribute lists,
//! runlists, index B-trees). This module adapts it to [`Tree`]: metafiles
//! are hidden, DOS 8.3 aliases dropped, reparse-point and Interix symlinks
//! read as symlinks.
//!
//! NTFS has no POSIX owner or mode: listings show no owner, `0755` for
//! directories, `0644` for files (`0444` read-only).

use std::io::{Read, Seek, SeekFrom};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use ntfs::structured_values::NtfsFileNamespace;
use ntfs::{Ntfs, NtfsAttributeType, NtfsFile, NtfsReadSeek};

use crate::error::{corrupt, Error, Result};
use crate::io::{utf16le, ReadAt};
use crate::tree::{Entry, Kind, Meta, Node, Time, Tree, LINK_MAX};

const WHAT: &str = "ntfs";
/// Record numbers below this are the filesystem's own files.
const FIRST_USER_RECORD: u64 = 24;
/// Entries one directory may list; a looping index ends here.
const MAX_DIR_ENTRIES: usize = 4 << 20;

const ATTR_READONLY: u32 = 0x1;
const ATTR_SYSTEM: u32 = 0x4;
const ATTR_REPARSE: u32 = 0x400;
const REPARSE_SYMLINK: u32 = 0xA000_000C;
const REPARSE_MOUNT_POINT: u32 = 0xA000_0003;
const INTERIX_LINK: &[u8] = b"IntxLNK\x01";

/// An NTFS filesystem.
pub struct NtfsFs {
    dev: Arc<dyn ReadAt>,
    ntfs: Ntfs,
    label: Option<String>,
}

impl NtfsFs {
    pub fn detect(dev: &dyn ReadAt) -> bool {
        let mut b = [0u8; 8];
        dev.read_at(3, &mut b).is_ok() && &b == b"NTFS    "
    }

    pub fn open(dev: Arc<dyn ReadAt>) -> Result<Self> {
        guarded(|| {
            let mut c = Cursor::new(dev.as_ref());
            let ntfs = Ntfs::new(&mut c).map_err(err)?;
            let label = match ntfs.volume_name(&mut c) {
                Some(n) => Some(n.map_err(err)?.name().to_string_lossy()),
                None => None,
            };
            Ok(NtfsFs {
                dev: dev.clone(),
                ntfs,
                label: label.filter(|l| !l.is_empty()),
            })
        })
    }

    pub fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn cursor(&self) -> Cursor<'_> {
        Cursor::new(self.dev.as_ref())
    }

    fn node(&self, c: &mut Cursor, file: &NtfsFile) -> Result<Node> {
        let info = file.info().map_err(err)?;
        let attrs = info.file_attributes().bits();
        let dir = file.is_directory();
        let target = if dir {
            None
        } else {
            self.link_target(c, file)?
        };
        let link = target.is_some();
        let size = if let Some(t) = &target {
            t.len() as u64
        } else if dir {
            0
        } else {
            match file.data(c, "") {
                Some(item) => item
                    .map_err(err)?
                    .to_attribute()
                    .map_err(err)?
                    .value_length(),
                None => 0,
            }
        };
        let (kind, mode) = if dir {
            (Kind::Dir, 0o755)
        } else if link {
            (Kind::Symlink, 0o777)
        } else if attrs & ATTR_READONLY != 0 {
            (Kind::File, 0o444)
        } else {
            (Kind::File, 0o644)
        };
        Ok(Node {
            id: file.file_record_number(),
            handle: file.file_record_number(),
            meta: Meta {
                kind,
                size,
                mode,
                uid: None,
                gid: None,
                mtime: Some(nt_time(info.modification_time().nt_timestamp())),
                nlink: u32::from(file.hard_link_count()).max(1),
            },
        })
    }

    /// A reparse-point symlink's or junction's target, or an Interix
    /// symlink's; `None` for anything else.
    fn link_target(&self, c: &mut Cursor, file: &NtfsFile) -> Result<Option<Vec<u8>>> {
        let attrs = file.info().map_err(err)?.file_attributes().bits();
        if attrs & ATTR_REPARSE != 0 {
            let mut it = file.attributes();
            while let Some(item) = it.next(c) {
                let item = item.map_err(err)?;
                let a = item.to_attribute().map_err(err)?;
                if a.ty().map_err(err)? != NtfsAttributeType::ReparsePoint {
                    continue;
                }
                let mut v = a.value(c).map_err(err)?;
                let raw = read_value(c, &mut v, 16 << 10)?;
                return reparse_target(&raw);
            }
        }
        if attrs & ATTR_SYSTEM != 0 {
            if let Some(item) = file.data(c, "") {
                let a = item.map_err(err)?;
                let a = a.to_attribute().map_err(err)?;
                if a.value_length() > INTERIX_LINK.len() as u64 && a.value_length() <= LINK_MAX {
                    let mut v = a.value(c).map_err(err)?;
                    let raw = read_value(c, &mut v, LINK_MAX as usize)?;
                    if let Some(t) = raw.strip_prefix(INTERIX_LINK) {
                        return Ok(Some(utf16le(t).into_bytes()));
                    }
                }
            }
        }
        Ok(None)
    }
}

impl Tree for NtfsFs {
    fn kind(&self) -> &'static str {
        "ntfs"
    }

    fn root(&self) -> Result<Node> {
        guarded(|| {
            let mut c = self.cursor();
            let root = self.ntfs.root_directory(&mut c).map_err(err)?;
            self.node(&mut c, &root)
        })
    }

    fn list(&self, dir: &Node) -> Result<Vec<Entry>> {
        guarded(|| {
            let mut c = self.cursor();
            let file = self.ntfs.file(&mut c, dir.handle).map_err(err)?;
            let index = file.directory_index(&mut c).map_err(err)?;
            let mut names: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut it = index.entries();
            while let Some(e) = it.next(&mut c) {
                let e = e.map_err(err)?;
                let record = e.file_reference().file_record_number();
                let Some(key) = e.key() else { continue };
                let key = key.map_err(err)?;
                if key.namespace() == NtfsFileNamespace::Dos || record < FIRST_USER_RECORD {
                    continue;
                }
                if names.len() >= MAX_DIR_ENTRIES {
                    return Err(Error::TooLarge("directory has too many entries".into()));
                }
                names.push((key.name().to_string_lossy().into_bytes(), record));
            }
            let mut out = Vec::with_capacity(names.len());
            for (name, record) in names {
                let f = self.ntfs.file(&mut c, record).map_err(err)?;
                out.push(Entry {
                    name,
                    node: self.node(&mut c, &f)?,
                });
            }
            Ok(out)
        })
    }

    fn read(&self, file: &Node, offset: u64, buf: &mut [u8]) -> Result<usize> {
        guarded(|| {
            let mut c = self.cursor();
            let f = self.ntfs.file(&mut c, file.handle).map_err(err)?;
            let Some(item) = f.data(&mut c, "") else {
                return Ok(0);
            };
            let item = item.map_err(err)?;
            let a = item.to_attribute().map_err(err)?;
            let mut v = a.value(&mut c).map_err(err)?;
            let n = v.len().saturating_sub(offset).min(buf.len() as u64) as usize;
            if n == 0 {
                return Ok(0);
            }
            v.seek(&mut c, SeekFrom::Start(offset)).map_err(err)?;
            v.read_exact(&mut c, &mut buf[..n]).map_err(err)?;
            Ok(n)
        })
    }

    fn read_link(&self, link: &Node) -> Result<Vec<u8>> {
        guarded(|| {
            let mut c = self.cursor();
            let f = self.ntfs.file(&mut c, link.handle).map_err(err)?;
            self.link_target(&mut c, &f)?
                .ok_or_else(|| Error::Unsupported(format!("record {} is no symlink", link.handle)))
        })
    }
}

/// Runs a call into the `ntfs` crate so that a panic on a hostile image
/// (which the crate should not have, but it parses untrusted bytes) becomes
/// an error for this filesystem instead of ending the process.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(corrupt(WHAT, "the NTFS reader gave up on this image")))
}

fn err(e: ntfs::NtfsError) -> Error {
    corrupt(WHAT, e.to_string())
}

fn read_value<V: NtfsReadSeek>(c: &mut Cursor, v: &mut V, max: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = v.read(c, &mut buf).map_err(err)?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() + n > max {
            return Err(corrupt(WHAT, "attribute value too large"));
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// The target of a symlink or junction reparse point (its print name,
/// else its substitute name), with `/` for `\`.
fn reparse_target(raw: &[u8]) -> Result<Option<Vec<u8>>> {
    let f = crate::io::Fields::new(raw, "ntfs reparse point");
    let tag = f.le32(0)?;
    let body = match tag {
        REPARSE_SYMLINK => 8 + 12,
        REPARSE_MOUNT_POINT => 8 + 8,
        _ => return Ok(None),
    };
    let sub = (usize::from(f.le16(8)?), usize::from(f.le16(10)?));
    let print = (usize::from(f.le16(12)?), usize::from(f.le16(14)?));
    let (off, len) = if print.1 > 0 { print } else { sub };
    let name = utf16le(f.slice(body + off, len)?);
    let name = name
        .strip_prefix("\\??\\")
        .unwrap_or(&name)
        .replace('\\', "/");
    Ok(Some(name.into_bytes()))
}

/// NT time (100 ns since 1601) as Unix time.
fn nt_time(t: u64) -> Time {
    const EPOCH_DIFF: i64 = 11_644_473_600;
    Time {
        secs: (t / 10_000_000) as i64 - EPOCH_DIFF,
        nsec: (t % 10_000_000) as u32 * 100,
    }
}

/// `Read + Seek` over a [`ReadAt`], for the `ntfs` crate.
struct Cursor<'a> {
    dev: &'a dyn ReadAt,
    pos: u64,
}

impl<'a> Cursor<'a> {
    fn new(dev: &'a dyn ReadAt) -> Self {
        Cursor { dev, pos: 0 }
    }
}

impl Read for Cursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self
            .dev
            .size()
            .saturating_sub(self.pos)
            .min(buf.len() as u64) as usize;
        self.dev.read_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Cursor<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.dev.size().checked_add_signed(d),
        };
        self.pos = base.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek out of range")
        })?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nt_epoch_is_1601() {
        assert_eq!(nt_time(116_444_736_000_000_000).secs, 0);
        assert_eq!(nt_time(116_444_736_000_000_001).nsec, 100);
    }
}
