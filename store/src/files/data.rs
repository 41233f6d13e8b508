//! The data stream of a file backup: every regular file's bytes, one file
//! after another, each cut by the chunker on its own (so a file starts at a
//! chunk boundary and its chunks can be taken again alone). Runs on a
//! thread of its own and hands pieces to the backup pipeline.
//!
//! Change detection: a file whose (size, mtime, ctime, inode, device) equal
//! those of the same path in the previous snapshot's catalog is not read:
//! its extents of the previous data stream are taken again
//! ([`Piece::Reuse`]). A file read is checked before and after (size,
//! mtime, ctime); one that changed meanwhile is read again, and reported
//! if it never holds still.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::Sender;

use super::catalog::{Entry, Time};
use crate::backup::source::ImageFile;
use crate::backup::walk::{Piece, Walk};
use crate::error::Result;
use crate::format::chunker::Chunker;
use crate::format::chunklist::{ChunkList, Extent};
use crate::format::extent::Span;
use crate::format::index::Index;

/// Reads of a file that keeps changing before it is reported.
const ATTEMPTS: usize = 3;

/// The previous snapshot of the same source: its catalog and data stream.
pub struct Previous<'a> {
    pub by_path: HashMap<&'a [u8], &'a Entry>,
    pub data: &'a ChunkList,
}

/// What reading the data found, beside the pieces.
#[derive(Debug, Default)]
pub struct DataReport {
    pub bytes_read: u64,
    pub bytes_reused: u64,
    pub files_reused: u64,
    /// Entries (by position) that could not be read, and why.
    pub failed: Vec<(usize, String)>,
    /// Entries read while they changed (the last read is kept), and why.
    pub unsettled: Vec<(usize, String)>,
    /// The stream's length.
    pub size: u64,
}

pub struct DataReader<'a> {
    pub chunker: &'a Chunker,
    pub index: &'a Index,
    pub previous: Option<Previous<'a>>,
    /// Read every file, whatever the previous snapshot says.
    pub reread: bool,
}

/// The file's state that says whether it changed.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: Time,
    ctime: Time,
    ino: u64,
    dev: u64,
}

fn stamp(md: &std::fs::Metadata) -> Stamp {
    let [mtime, _, ctime] = Time::of(md);
    Stamp {
        size: md.size(),
        mtime,
        ctime,
        ino: md.ino(),
        dev: md.dev(),
    }
}

fn entry_stamp(e: &Entry) -> Stamp {
    Stamp {
        size: e.size,
        mtime: e.mtime,
        ctime: e.ctime,
        ino: e.ino,
        dev: e.dev,
    }
}

/// Why the stream stopped early: the pipeline is gone.
struct Stopped;

impl DataReader<'_> {
    /// Sends every data entry's pieces to `tx`, setting each entry's
    /// offset (and its size and times as read).
    /// `read` counts the bytes read as they are (the pipeline's count).
    pub fn run(
        &self,
        entries: &mut [Entry],
        tx: &Sender<Result<Piece>>,
        read: &AtomicU64,
    ) -> DataReport {
        let mut rep = DataReport::default();
        for (i, e) in entries.iter_mut().enumerate() {
            if !e.has_data() {
                continue;
            }
            if self.reuse(e, &mut rep, tx).is_err() {
                break;
            }
            if e.offset == u64::MAX {
                match self.read(e, &mut rep, tx) {
                    Ok(Ok(None)) => {}
                    Ok(Ok(Some(why))) => rep.unsettled.push((i, why)),
                    Ok(Err(why)) => rep.failed.push((i, why)),
                    Err(Stopped) => break,
                }
                read.store(rep.bytes_read, Ordering::Relaxed);
            }
        }
        rep
    }

    /// Takes the previous snapshot's extents of an unchanged file; else
    /// leaves `e.offset` at `u64::MAX` (to be read).
    fn reuse(
        &self,
        e: &mut Entry,
        rep: &mut DataReport,
        tx: &Sender<Result<Piece>>,
    ) -> Result<(), Stopped> {
        e.offset = u64::MAX;
        let Some(prev) = self.previous.as_ref().filter(|_| !self.reread) else {
            return Ok(());
        };
        let Some(p) = prev.by_path.get(e.path.as_slice()) else {
            return Ok(());
        };
        if !p.has_data() || entry_stamp(p) != entry_stamp(e) {
            return Ok(());
        }
        let Some(extents) = slice(prev.data, p.offset, p.size, self.index) else {
            return Ok(());
        };
        e.offset = rep.size;
        rep.size += e.size;
        rep.bytes_reused += e.size;
        rep.files_reused += 1;
        if !extents.is_empty() {
            tx.send(Ok(Piece::Reuse(extents))).map_err(|_| Stopped)?;
        }
        Ok(())
    }

    /// Reads a file into the stream. The outer error: the pipeline is
    /// gone. The inner: the file could not be read (it is left out). The
    /// note: it changed while read.
    #[allow(clippy::type_complexity)]
    fn read(
        &self,
        e: &mut Entry,
        rep: &mut DataReport,
        tx: &Sender<Result<Piece>>,
    ) -> Result<Result<Option<String>, String>, Stopped> {
        let abs = super::abs_path(&e.path);
        let path = abs.as_path();
        let mut last = (String::new(), false);
        for _ in 0..ATTEMPTS {
            let file = match open(path) {
                Ok(f) => f,
                Err(err) => return Ok(Err(format!("cannot open: {err}"))),
            };
            let before = match file.metadata() {
                Ok(md) if md.is_file() => md,
                Ok(_) => return Ok(Err("no longer a regular file".into())),
                Err(err) => return Ok(Err(format!("cannot stat: {err}"))),
            };
            let mut src = match ImageFile::from_file(file, path) {
                Ok(s) => s,
                Err(err) => return Ok(Err(err.to_string())),
            };
            let start = rep.size;
            let size = before.size();
            let mut walk = Walk::new(&mut src, self.chunker, None, &[Span::new(0, size)]);
            let mut sent = 0u64;
            let mut failed = None;
            for piece in &mut walk {
                match piece {
                    Ok(p) => {
                        sent += piece_len(&p);
                        tx.send(Ok(p)).map_err(|_| Stopped)?;
                    }
                    Err(err) => {
                        failed = Some(err.to_string());
                        break;
                    }
                }
            }
            rep.bytes_read += walk.bytes_read();
            rep.size += sent;
            let after = std::fs::symlink_metadata(path);
            let settled = failed.is_none()
                && after
                    .as_ref()
                    .is_ok_and(|a| stamp(a) == stamp(&before) && sent == size);
            e.offset = start;
            e.size = sent;
            e.mtime = stamp(&before).mtime;
            e.ctime = stamp(&before).ctime;
            e.ino = before.ino();
            e.dev = before.dev();
            if settled {
                return Ok(Ok(None));
            }
            last = match failed {
                Some(why) => (why, true),
                None => ("changed while being read".into(), false),
            };
        }
        match last {
            // A read that failed midway is no content to restore.
            (why, true) => Ok(Err(why)),
            (why, false) => Ok(Ok(Some(format!(
                "{why} ({ATTEMPTS} reads; the last one is kept)"
            )))),
        }
    }
}

fn piece_len(p: &Piece) -> u64 {
    match p {
        Piece::Data(b) => b.len() as u64,
        Piece::Zero(n) => *n,
        Piece::Reuse(v) => v.iter().map(|e| e.len).sum(),
    }
}

/// Opens without following a link that replaced the file since the scan,
/// and without touching its atime where the kernel lets us.
fn open(path: &Path) -> std::io::Result<File> {
    let o = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | flags)
            .open(path)
    };
    match o(libc::O_NOATIME) {
        // O_NOATIME needs ownership (or CAP_FOWNER).
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => o(0),
        r => r,
    }
}

/// The extents of `[offset, offset + len)` of `list`, cut at the ends (only
/// zero extents may be cut: a data extent across an end means the catalog
/// and list disagree, and the file is read instead). None also if a chunk
/// is not in the index.
fn slice(list: &ChunkList, offset: u64, len: u64, index: &Index) -> Option<Vec<Extent>> {
    let end = offset.checked_add(len)?;
    if end > list.size() {
        return None;
    }
    let mut out = Vec::new();
    if len == 0 {
        return Some(out);
    }
    let mut i = list.find(offset)?;
    while let Some(x) = list.extents().get(i) {
        if x.offset >= end {
            break;
        }
        let (s, t) = (x.offset.max(offset), x.end().min(end));
        match x.chunk {
            Some(id) if (s, t) == (x.offset, x.end()) && index.get(&id).is_some() => {
                out.push(Extent {
                    offset: s,
                    len: t - s,
                    chunk: Some(id),
                })
            }
            Some(_) => return None,
            None => out.push(Extent {
                offset: s,
                len: t - s,
                chunk: None,
            }),
        }
        i += 1;
    }
    Some(out)
}
