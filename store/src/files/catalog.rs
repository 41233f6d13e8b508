//! A file snapshot's catalog: one entry per file, directory, link or node,
//! in tree order (a directory before what it holds), with every piece of
//! metadata a restore puts back and the place of each regular file's bytes
//! in the snapshot's data stream (`files`, one chunk list). Stored through
//! the chunk pipeline as the snapshot's `catalog` stream, so it is sealed,
//! deduplicated, kept by GC and copied by sync like any chunk.
//!
//! Paths are relative (the absolute path backed up, without its leading
//! `/`), raw bytes (any name a Linux filesystem allows). A catalog read back
//! is hostile input: its structure is checked on decode, and whoever makes
//! a path of an entry checks it with [`check_path`] first (no `..`, `.`,
//! empty or absolute components, NUL).

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::format::object::Reader;

const MAGIC: &[u8; 4] = b"BWFC";
/// More than any real name: bounds what a damaged catalog can allocate.
const MAX_BLOB: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::File => 0,
            Kind::Dir => 1,
            Kind::Symlink => 2,
            Kind::CharDev => 3,
            Kind::BlockDev => 4,
            Kind::Fifo => 5,
        }
    }

    fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            0 => Kind::File,
            1 => Kind::Dir,
            2 => Kind::Symlink,
            3 => Kind::CharDev,
            4 => Kind::BlockDev,
            5 => Kind::Fifo,
            _ => return None,
        })
    }

    /// The letter `ls -l` shows.
    pub fn letter(self) -> char {
        match self {
            Kind::File => '-',
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::CharDev => 'c',
            Kind::BlockDev => 'b',
            Kind::Fifo => 'p',
        }
    }
}

/// Seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    /// (mtime, atime, ctime) of `md`.
    pub fn of(md: &std::fs::Metadata) -> [Time; 3] {
        use std::os::unix::fs::MetadataExt;
        let t = |sec, nsec: i64| Time {
            sec,
            nsec: nsec as u32,
        };
        [
            t(md.mtime(), md.mtime_nsec()),
            t(md.atime(), md.atime_nsec()),
            t(md.ctime(), md.ctime_nsec()),
        ]
    }
}

/// One catalog entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: Option<Kind>,
    /// Permission bits with setuid/setgid/sticky (no type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub user: Vec<u8>,
    pub group: Vec<u8>,
    pub mtime: Time,
    pub atime: Time,
    /// For change detection only: a restore cannot set it.
    pub ctime: Time,
    pub ino: u64,
    pub dev: u64,
    /// Device number of a device node.
    pub rdev: u64,
    /// File size (the bytes in the data stream, holes included).
    pub size: u64,
    /// Where a regular file's bytes start in the data stream.
    pub offset: u64,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Path of an earlier entry this one is a hard link to (no data of its own).
    pub link: Vec<u8>,
    /// Extended attributes (POSIX ACLs and file capabilities among them).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    pub fn kind(&self) -> Kind {
        self.kind.unwrap_or(Kind::File)
    }

    /// The last path component.
    pub fn name(&self) -> &[u8] {
        self.path
            .rsplit(|&b| b == b'/')
            .next()
            .unwrap_or(&self.path)
    }

    /// The path without its last component (empty at the top).
    pub fn parent(&self) -> &[u8] {
        match self.path.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.path[..i],
            None => &[],
        }
    }

    /// Whether `other` is the same inode in the same state as far as the
    /// kernel says: kind, size, mtime, ctime, inode and device. Any write,
    /// chmod, chown or xattr change moves the ctime, which no user can set.
    pub fn same_inode_state(&self, other: &Entry) -> bool {
        let state = |e: &Entry| (e.kind(), e.size, e.mtime, e.ctime, e.ino, e.dev);
        state(self) == state(other)
    }

    /// A regular file with data of its own (not a hard link to another).
    pub fn has_data(&self) -> bool {
        self.kind() == Kind::File && self.link.is_empty()
    }
}

/// Every entry of a snapshot, in tree order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub entries: Vec<Entry>,
}

impl Catalog {
    /// Entries by path.
    pub fn by_path(&self) -> HashMap<&[u8], &Entry> {
        self.entries
            .iter()
            .map(|e| (e.path.as_slice(), e))
            .collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.entries.len() * 128);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            encode_entry(e, &mut out);
        }
        out
    }

    /// Reads a catalog (its paths unchecked: see [`check_path`]).
    pub fn decode(payload: &[u8], what: &str) -> Result<Catalog> {
        let mut r = Reader::new(payload, what);
        r.expect(MAGIC)?;
        let n = r.u64()?;
        // Each entry takes well over 64 bytes: a count beyond that is damage.
        if n > payload.len() as u64 / 64 {
            return Err(Error::corrupt(what, "entry count past the catalog's size"));
        }
        let mut entries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            entries.push(decode_entry(&mut r, what)?);
        }
        if !r.done() {
            return Err(Error::corrupt(what, "trailing bytes"));
        }
        Ok(Catalog { entries })
    }
}

/// A relative path whose every component is a plain name (and the entry's
/// hard-link target, if any, too).
pub fn check_entry(e: &Entry) -> std::result::Result<(), String> {
    check_path(&e.path)?;
    if e.link.is_empty() {
        Ok(())
    } else {
        check_path(&e.link)
    }
}

/// A relative path whose every component is a plain name.
pub fn check_path(path: &[u8]) -> std::result::Result<(), String> {
    let bad = path.is_empty()
        || path.contains(&0)
        || path
            .split(|&b| b == b'/')
            .any(|c| c.is_empty() || c == b"." || c == b"..");
    if bad {
        return Err(format!(
            "unsafe path {:?} in the catalog",
            String::from_utf8_lossy(path)
        ));
    }
    Ok(())
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_time(out: &mut Vec<u8>, t: Time) {
    out.extend_from_slice(&t.sec.to_le_bytes());
    out.extend_from_slice(&t.nsec.to_le_bytes());
}

fn encode_entry(e: &Entry, out: &mut Vec<u8>) {
    put_blob(out, &e.path);
    out.push(e.kind().code());
    for v in [e.mode, e.uid, e.gid] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    put_blob(out, &e.user);
    put_blob(out, &e.group);
    for t in [e.mtime, e.atime, e.ctime] {
        put_time(out, t);
    }
    for v in [e.ino, e.dev, e.rdev, e.size, e.offset] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    put_blob(out, &e.target);
    put_blob(out, &e.link);
    out.extend_from_slice(&(e.xattrs.len() as u32).to_le_bytes());
    for (k, v) in &e.xattrs {
        put_blob(out, k);
        put_blob(out, v);
    }
}

fn blob(r: &mut Reader<'_>, what: &str) -> Result<Vec<u8>> {
    let n = r.u32()? as usize;
    if n > MAX_BLOB {
        return Err(Error::corrupt(what, "name or value too long"));
    }
    Ok(r.bytes(n)?.to_vec())
}

fn time(r: &mut Reader<'_>, what: &str) -> Result<Time> {
    let sec = r.u64()? as i64;
    let nsec = r.u32()?;
    if nsec >= 1_000_000_000 {
        return Err(Error::corrupt(what, "nanoseconds out of range"));
    }
    Ok(Time { sec, nsec })
}

fn decode_entry(r: &mut Reader<'_>, what: &str) -> Result<Entry> {
    let path = blob(r, what)?;
    let kind = Kind::from_code(r.u8()?).ok_or_else(|| Error::corrupt(what, "bad entry kind"))?;
    let (mode, uid, gid) = (r.u32()?, r.u32()?, r.u32()?);
    let (user, group) = (blob(r, what)?, blob(r, what)?);
    let (mtime, atime, ctime) = (time(r, what)?, time(r, what)?, time(r, what)?);
    let (ino, dev, rdev, size, offset) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
    let (target, link) = (blob(r, what)?, blob(r, what)?);
    let n = r.u32()?;
    let mut xattrs = Vec::new();
    for _ in 0..n {
        xattrs.push((blob(r, what)?, blob(r, what)?));
    }
    Ok(Entry {
        path,
        kind: Some(kind),
        mode: mode & 0o7777,
        uid,
        gid,
        user,
        group,
        mtime,
        atime,
        ctime,
        ino,
        dev,
        rdev,
        size,
        offset,
        target,
        link,
        xattrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &[u8]) -> Entry {
        Entry {
            path: path.to_vec(),
            kind: Some(Kind::File),
            mode: 0o644,
            size: 5,
            xattrs: vec![(b"user.a".to_vec(), b"\0\xff".to_vec())],
            ..Default::default()
        }
    }

    #[test]
    fn roundtrip_and_hostile_paths() {
        let c = Catalog {
            entries: vec![entry(b"etc"), entry(b"etc/\xffname")],
        };
        assert_eq!(Catalog::decode(&c.encode(), "t").unwrap(), c);
        assert!(Catalog::decode(&c.encode()[..40], "t").is_err());
        for bad in [
            &b"../x"[..],
            b"/etc",
            b"a/../b",
            b"a//b",
            b".",
            b"a/\0",
            b"",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(c.entries.iter().all(|e| check_entry(e).is_ok()));
        let mut e = entry(b"a");
        e.link = b"../../etc/passwd".to_vec();
        assert!(check_entry(&e).is_err());
    }
}
