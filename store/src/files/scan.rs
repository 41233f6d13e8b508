//! The tree scan of a file backup: every path below the roots, in tree
//! order, with its metadata, minus what the excludes, `.bulwarkignore`
//! files, `CACHEDIR.TAG` and the file-system boundary leave out. Sockets
//! are counted and skipped; what cannot be listed is reported, not fatal.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::catalog::{Entry, Kind, Time};
use super::exclude::Excludes;

/// A directory holding this file (starting with the signature) is a cache:
/// the tag is kept, the rest left out (<https://bford.info/cachedir/>).
pub const CACHEDIR_TAG: &str = "CACHEDIR.TAG";
const CACHEDIR_SIGNATURE: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55";

/// What the scan found.
#[derive(Debug, Default)]
pub struct Scanned {
    pub entries: Vec<Entry>,
    /// (path, why) of what could not be read.
    pub errors: Vec<(String, String)>,
    pub sockets: u64,
}

pub struct Scan<'a> {
    excludes: &'a Excludes,
    cross_mounts: bool,
    out: Scanned,
    /// (dev, ino) of multiply-linked files seen, and their path.
    links: HashMap<(u64, u64), Vec<u8>>,
    seen: HashSet<Vec<u8>>,
    names: Names,
}

impl<'a> Scan<'a> {
    pub fn new(excludes: &'a Excludes, cross_mounts: bool) -> Self {
        Scan {
            excludes,
            cross_mounts,
            out: Scanned::default(),
            links: HashMap::new(),
            seen: HashSet::new(),
            names: Names::default(),
        }
    }

    /// Scans each root (an absolute path) and the directories above it.
    pub fn run(mut self, roots: &[PathBuf]) -> Scanned {
        for root in roots {
            for anc in root.ancestors().collect::<Vec<_>>().into_iter().rev() {
                if anc == Path::new("/") || anc == root.as_path() {
                    continue;
                }
                if let Ok(md) = std::fs::symlink_metadata(anc) {
                    self.add(anc, &md);
                }
            }
            match std::fs::symlink_metadata(root) {
                Ok(md) => self.visit(root, &md, md.dev(), &self.excludes.clone_rules()),
                Err(e) => self.error(root, e.to_string()),
            }
        }
        self.out
    }

    fn error(&mut self, path: &Path, why: String) {
        tracing::warn!("{}: {why}", path.display());
        self.out.errors.push((path.display().to_string(), why));
    }

    /// Adds `path` and, for a directory, what it holds.
    fn visit(&mut self, path: &Path, md: &std::fs::Metadata, root_dev: u64, rules: &Excludes) {
        if md.file_type().is_socket() {
            self.out.sockets += 1;
            return;
        }
        if !self.add(path, md) || !md.is_dir() {
            return;
        }
        if md.dev() != root_dev && !self.cross_mounts {
            return;
        }
        let mut names = match read_names(path) {
            Ok(n) => n,
            Err(e) => return self.error(path, format!("cannot list: {e}")),
        };
        let rules = match rules.with_ignore_file(path) {
            Ok(r) => r,
            Err(e) => {
                self.error(path, e);
                rules.clone_rules()
            }
        };
        if names.iter().any(|n| n == OsStr::new(CACHEDIR_TAG)) && is_cache_tag(path) {
            names.retain(|n| n == OsStr::new(CACHEDIR_TAG));
        }
        for name in names {
            let child = path.join(&name);
            if rules.excluded(&child) {
                continue;
            }
            match std::fs::symlink_metadata(&child) {
                Ok(cmd) => self.visit(&child, &cmd, root_dev, &rules),
                Err(e) => self.error(&child, e.to_string()),
            }
        }
    }

    /// The entry of `path`; false if it was there already (overlapping roots).
    fn add(&mut self, path: &Path, md: &std::fs::Metadata) -> bool {
        let rel = path.as_os_str().as_bytes()[1..].to_vec();
        if !self.seen.insert(rel.clone()) {
            return false;
        }
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_char_device() {
            Kind::CharDev
        } else if ft.is_block_device() {
            Kind::BlockDev
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            Kind::File
        };
        let [mtime, atime, ctime] = Time::of(md);
        let mut e = Entry {
            kind: Some(kind),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            user: self.names.user(md.uid()),
            group: self.names.group(md.gid()),
            mtime,
            atime,
            ctime,
            ino: md.ino(),
            dev: md.dev(),
            rdev: md.rdev(),
            size: if kind == Kind::File { md.size() } else { 0 },
            ..Default::default()
        };
        if kind == Kind::Symlink {
            match std::fs::read_link(path) {
                Ok(t) => e.target = t.into_os_string().into_vec(),
                Err(err) => {
                    self.error(path, format!("cannot read link: {err}"));
                    return false;
                }
            }
        }
        if kind != Kind::Dir && md.nlink() > 1 {
            match self.links.get(&(md.dev(), md.ino())) {
                Some(first) => e.link = first.clone(),
                None => {
                    self.links.insert((md.dev(), md.ino()), rel.clone());
                }
            }
        }
        match xattrs(path) {
            Ok(x) => e.xattrs = x,
            Err(err) => self.error(path, format!("cannot read xattrs: {err}")),
        }
        e.path = rel;
        self.out.entries.push(e);
        true
    }
}

use std::os::unix::ffi::OsStringExt;

/// A directory's entry names, sorted by their bytes.
fn read_names(dir: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    let mut names = Vec::new();
    for d in std::fs::read_dir(dir)? {
        names.push(d?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

fn is_cache_tag(dir: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; CACHEDIR_SIGNATURE.len()];
    std::fs::File::open(dir.join(CACHEDIR_TAG))
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head == CACHEDIR_SIGNATURE)
}

fn cpath(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// Every extended attribute of `path` (not following a symlink), by name.
pub fn xattrs(path: &Path) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = cpath(path)?;
    let list = grow(|buf| {
        // SAFETY: `buf` is valid for `len` bytes; `c` is NUL-terminated.
        unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })?;
    let mut out = Vec::new();
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname =
            CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let value = grow(|buf| {
            // SAFETY: as above.
            unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cname.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            }
        });
        match value {
            Ok(v) => out.push((name.to_vec(), v)),
            // Removed between the listing and the read.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

/// Calls `f` with a buffer until it fits (`ERANGE` means: larger).
fn grow(f: impl Fn(&mut [u8]) -> isize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        let n = f(&mut buf);
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < 1 << 24 => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
}

/// User and group names by id, looked up once each.
#[derive(Default)]
struct Names {
    users: HashMap<u32, Vec<u8>>,
    groups: HashMap<u32, Vec<u8>>,
}

impl Names {
    fn user(&mut self, uid: u32) -> Vec<u8> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                lookup(|buf, out| {
                    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
                    let mut res = std::ptr::null_mut();
                    // SAFETY: every pointer is to a live local of the right type.
                    let r = unsafe {
                        libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut res)
                    };
                    if r == 0 && !res.is_null() {
                        // SAFETY: pw_name points into `buf`, NUL-terminated.
                        *out = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }
                            .to_bytes()
                            .to_vec();
                    }
                    r
                })
            })
            .clone()
    }

    fn group(&mut self, gid: u32) -> Vec<u8> {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                lookup(|buf, out| {
                    let mut gr: libc::group = unsafe { std::mem::zeroed() };
                    let mut res = std::ptr::null_mut();
                    // SAFETY: as in `user`.
                    let r = unsafe {
                        libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr().cast(), buf.len(), &mut res)
                    };
                    if r == 0 && !res.is_null() {
                        // SAFETY: gr_name points into `buf`, NUL-terminated.
                        *out = unsafe { std::ffi::CStr::from_ptr(gr.gr_name) }
                            .to_bytes()
                            .to_vec();
                    }
                    r
                })
            })
            .clone()
    }
}

/// A name lookup with a buffer that grows on `ERANGE`; empty if unknown
/// (the numeric id is kept either way, so nothing is lost).
fn lookup(f: impl Fn(&mut [u8], &mut Vec<u8>) -> libc::c_int) -> Vec<u8> {
    let mut buf = vec![0u8; 1024];
    let mut out = Vec::new();
    while f(&mut buf, &mut out) == libc::ERANGE && buf.len() < 1 << 20 {
        buf.resize(buf.len() * 4, 0);
    }
    out
}
