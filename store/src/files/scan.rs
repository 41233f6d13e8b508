//! The tree scan of a file backup: every path below the roots, in tree
//! order, with its metadata, minus what the excludes, `.bulwarkignore`
//! files, `CACHEDIR.TAG` and the file-system boundary leave out. Sockets
//! are counted and skipped; what cannot be listed is reported, not fatal.
//!
//! Directories are listed (and their entries stat'ed) by a pool of
//! threads, each listing queueing the directories it finds; the calling
//! thread puts the listings together in tree order, and hard links are
//! found in that order afterwards (the first path seen holds the data).
//! Extended attributes come after the scan ([`xattrs_of_changed`]), taken
//! from the previous snapshot for entries that did not change.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use super::catalog::{Entry, Kind, Time};
use super::exclude::{Excludes, IGNORE_FILE};

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
    threads: usize,
}

/// A directory to list, with the rules that hold in it.
struct Task {
    dir: PathBuf,
    root_dev: u64,
    rules: Excludes,
    reply: Sender<Listing>,
}

/// One directory's entries, in name order.
#[derive(Default)]
struct Listing {
    children: Vec<Child>,
    errors: Vec<(String, String)>,
    sockets: u64,
}

struct Child {
    entry: Entry,
    nlink: u64,
    /// The listing of a directory to descend into.
    below: Option<Receiver<Listing>>,
}

/// What the listing threads share.
struct Lister<'a> {
    queue: Sender<Option<Task>>,
    names: &'a Mutex<Names>,
    cross_mounts: bool,
}

impl<'a> Scan<'a> {
    pub fn new(excludes: &'a Excludes, cross_mounts: bool, threads: usize) -> Self {
        Scan {
            excludes,
            cross_mounts,
            threads: threads.max(1),
        }
    }

    /// Scans each root (an absolute path) and the directories above it.
    pub fn run(self, roots: &[PathBuf]) -> Scanned {
        let names = Mutex::new(Names::default());
        let (queue, tasks) = unbounded::<Option<Task>>();
        let mut out = Assembly::default();
        std::thread::scope(|s| {
            for _ in 0..self.threads {
                let lister = Lister {
                    queue: queue.clone(),
                    names: &names,
                    cross_mounts: self.cross_mounts,
                };
                let tasks = tasks.clone();
                s.spawn(move || {
                    while let Ok(Some(task)) = tasks.recv() {
                        let listing = lister.list(&task);
                        // The assembly waits for every listing it queued:
                        // it is there to receive.
                        if task.reply.send(listing).is_err() {
                            break;
                        }
                    }
                });
            }
            // Only the listers hold it: if they all stopped, queued tasks
            // are dropped and the assembly hears of it.
            drop(tasks);
            let lister = Lister {
                queue: queue.clone(),
                names: &names,
                cross_mounts: self.cross_mounts,
            };
            let mut seen = HashSet::new();
            for root in roots {
                for anc in root.ancestors().collect::<Vec<_>>().into_iter().rev() {
                    if anc == Path::new("/") || anc == root.as_path() {
                        continue;
                    }
                    if let Ok(md) = std::fs::symlink_metadata(anc) {
                        if seen.insert(anc.to_path_buf()) {
                            if let Some(e) = lister.entry(anc, &md, &mut out.errors) {
                                out.push(e, md.nlink());
                            }
                        }
                    }
                }
                if !seen.insert(root.clone()) {
                    continue;
                }
                let md = match std::fs::symlink_metadata(root) {
                    Ok(md) => md,
                    Err(e) => {
                        out.error(root, e.to_string());
                        continue;
                    }
                };
                if md.file_type().is_socket() {
                    out.sockets += 1;
                    continue;
                }
                let Some(e) = lister.entry(root, &md, &mut out.errors) else {
                    continue;
                };
                out.push(e, md.nlink());
                if md.is_dir() {
                    let rules = self.excludes.clone_rules();
                    if let Some(rx) = lister.queue(root, md.dev(), &rules, &mut out.errors) {
                        out.take(&rx, root);
                    }
                }
            }
            for _ in 0..self.threads {
                // The listers hold the receiver until they stop.
                if queue.send(None).is_err() {
                    break;
                }
            }
        });
        out.finish()
    }
}

/// The scan's output put together in tree order.
#[derive(Default)]
struct Assembly {
    entries: Vec<Entry>,
    nlinks: Vec<u64>,
    errors: Vec<(String, String)>,
    sockets: u64,
}

impl Assembly {
    fn error(&mut self, path: &Path, why: String) {
        tracing::warn!("{}: {why}", path.display());
        self.errors.push((path.display().to_string(), why));
    }

    fn push(&mut self, e: Entry, nlink: u64) {
        self.entries.push(e);
        self.nlinks.push(nlink);
    }

    /// Adds the listing of `dir` and, depth first, those below it.
    fn take(&mut self, rx: &Receiver<Listing>, dir: &Path) {
        let Ok(l) = rx.recv() else {
            return self.error(dir, "the scan of this directory stopped".into());
        };
        self.errors.extend(l.errors);
        self.sockets += l.sockets;
        for c in l.children {
            let below = c.below.map(|rx| (rx, super::abs_path(&c.entry.path)));
            self.push(c.entry, c.nlink);
            if let Some((rx, path)) = below {
                self.take(&rx, &path);
            }
        }
    }

    /// Marks hard links: every later path of a multiply-linked file names
    /// the first.
    fn finish(mut self) -> Scanned {
        let mut first: HashMap<(u64, u64), usize> = HashMap::new();
        for i in 0..self.entries.len() {
            let e = &self.entries[i];
            if e.kind() == Kind::Dir || self.nlinks[i] <= 1 {
                continue;
            }
            match first.get(&(e.dev, e.ino)) {
                Some(&j) => self.entries[i].link = self.entries[j].path.clone(),
                None => {
                    first.insert((e.dev, e.ino), i);
                }
            }
        }
        Scanned {
            entries: self.entries,
            errors: self.errors,
            sockets: self.sockets,
        }
    }
}

impl Lister<'_> {
    /// Queues the listing of `dir`; None (and an error) if it cannot be.
    fn queue(
        &self,
        dir: &Path,
        root_dev: u64,
        rules: &Excludes,
        errors: &mut Vec<(String, String)>,
    ) -> Option<Receiver<Listing>> {
        let (reply, rx) = bounded(1);
        let task = Task {
            dir: dir.to_path_buf(),
            root_dev,
            rules: rules.clone_rules(),
            reply,
        };
        match self.queue.send(Some(task)) {
            Ok(()) => Some(rx),
            Err(_) => {
                errors.push((dir.display().to_string(), "the scan stopped".into()));
                None
            }
        }
    }

    /// The entries of one directory.
    fn list(&self, task: &Task) -> Listing {
        let mut l = Listing::default();
        let dir = task.dir.as_path();
        let mut children = match read_sorted(dir) {
            Ok(n) => n,
            Err(e) => {
                error(&mut l.errors, dir, format!("cannot list: {e}"));
                return l;
            }
        };
        let has = |name: &str| children.iter().any(|(n, _)| n == OsStr::new(name));
        // Only a directory that lists an ignore file is asked for it.
        let rules = if has(IGNORE_FILE) {
            task.rules.with_ignore_file(dir).unwrap_or_else(|e| {
                error(&mut l.errors, dir, e);
                task.rules.clone_rules()
            })
        } else {
            task.rules.clone_rules()
        };
        if has(CACHEDIR_TAG) && is_cache_tag(dir) {
            children.retain(|(n, _)| n == OsStr::new(CACHEDIR_TAG));
        }
        l.children.reserve_exact(children.len());
        for (name, d) in children {
            let child = dir.join(name);
            if rules.excluded(&child) {
                continue;
            }
            // Relative to the open directory: no walk of the whole path.
            let md = match d.metadata() {
                Ok(md) => md,
                Err(e) => {
                    error(&mut l.errors, &child, e.to_string());
                    continue;
                }
            };
            if md.file_type().is_socket() {
                l.sockets += 1;
                continue;
            }
            let Some(entry) = self.entry(&child, &md, &mut l.errors) else {
                continue;
            };
            let descend = md.is_dir() && (md.dev() == task.root_dev || self.cross_mounts);
            let below = if descend {
                self.queue(&child, task.root_dev, &rules, &mut l.errors)
            } else {
                None
            };
            l.children.push(Child {
                entry,
                nlink: md.nlink(),
                below,
            });
        }
        l
    }

    /// The entry of `path` (hard links not marked yet); None if it cannot
    /// be made (a link that cannot be read).
    fn entry(
        &self,
        path: &Path,
        md: &std::fs::Metadata,
        errors: &mut Vec<(String, String)>,
    ) -> Option<Entry> {
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
        let (user, group) = {
            // A cache stays whole whatever panicked while it was held.
            let mut n = self.names.lock().unwrap_or_else(|e| e.into_inner());
            (n.user(md.uid()), n.group(md.gid()))
        };
        let mut e = Entry {
            path: path.as_os_str().as_bytes()[1..].to_vec(),
            kind: Some(kind),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            user,
            group,
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
                    error(errors, path, format!("cannot read link: {err}"));
                    return None;
                }
            }
        }
        Some(e)
    }
}

fn read_xattrs(e: &mut Entry, errors: &mut Vec<(String, String)>) {
    let path = super::abs_path(&e.path);
    match xattrs(&path) {
        Ok(x) => e.xattrs = x,
        Err(err) => error(errors, &path, format!("cannot read xattrs: {err}")),
    }
}

/// Adds the extended attributes the scan leaves out: an entry whose inode
/// is unchanged since `previous` (same kind, size, times, inode and
/// device) takes the previous snapshot's, since setting or removing an
/// attribute changes the ctime; the others are read, by `threads`
/// threads. Half an unchanged scan's system calls were these.
pub fn xattrs_of_changed(
    entries: &mut [Entry],
    previous: &HashMap<&[u8], &Entry>,
    threads: usize,
    errors: &mut Vec<(String, String)>,
) {
    let per = entries.len().div_ceil(threads.max(1)).max(1);
    let found: Vec<Vec<(String, String)>> = std::thread::scope(|s| {
        let parts: Vec<_> = entries
            .chunks_mut(per)
            .map(|part| {
                s.spawn(move || {
                    let mut errors = Vec::new();
                    for e in part {
                        match previous.get(e.path.as_slice()) {
                            Some(p) if p.same_inode_state(e) => e.xattrs = p.xattrs.clone(),
                            _ => read_xattrs(e, &mut errors),
                        }
                    }
                    errors
                })
            })
            .collect();
        parts
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![("(scan)".into(), "reading xattrs panicked".into())])
            })
            .collect()
    });
    errors.extend(found.into_iter().flatten());
}

fn error(errors: &mut Vec<(String, String)>, path: &Path, why: String) {
    tracing::warn!("{}: {why}", path.display());
    errors.push((path.display().to_string(), why));
}

use std::os::unix::ffi::OsStringExt;

/// A directory's entries, sorted by their names' bytes.
fn read_sorted(dir: &Path) -> std::io::Result<Vec<(std::ffi::OsString, std::fs::DirEntry)>> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(dir)? {
        let d = d?;
        out.push((d.file_name(), d));
    }
    out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(out)
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
