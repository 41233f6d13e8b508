//! Restores of file snapshots: a tree (or the parts of it named) written
//! below a target directory with all its metadata.
//!
//! Nothing is ever written outside the target, whatever the catalog says:
//! every path is checked on decode (no `..`, `.`, absolute or empty
//! components) and every directory is opened relative to its parent with
//! `O_NOFOLLOW | O_DIRECTORY`, so a symlink the archive planted (or one
//! that was there) is never followed; files are created `O_EXCL |
//! O_NOFOLLOW` (what was in the way is unlinked, not written through).
//!
//! Order: entries in catalog order (data written sparse: holes stay
//! holes), then each one's owner, mode, xattrs (ACLs, capabilities) and
//! times; directories last, deepest first, so writing into them does not
//! move their times.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::catalog::{Entry, Kind, Time};
use super::{load, DATA};
use crate::error::{Error, Result};
use crate::format::snapshot::Snapshot;
use crate::read::reader::{open_disk, DiskReader};
use crate::repo::Repository;

/// Bytes read from the data stream per write.
const WRITE_STEP: usize = 4 << 20;

/// What a restore did.
#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    /// (path, why) of entries not restored (or restored without some metadata).
    pub errors: Vec<(String, String)>,
}

/// Which entries to restore: all, or those at or below the given paths
/// (with the directories above them).
pub fn selected(entries: &[Entry], paths: &[Vec<u8>]) -> Vec<bool> {
    if paths.is_empty() {
        return vec![true; entries.len()];
    }
    let norm: Vec<&[u8]> = paths.iter().map(|p| trim_slashes(p)).collect();
    entries
        .iter()
        .map(|e| {
            norm.iter()
                .any(|p| under(&e.path, p) || (p.len() > e.path.len() && under(p, &e.path)))
        })
        .collect()
}

/// `a` is `b` or below it.
fn under(a: &[u8], b: &[u8]) -> bool {
    b.is_empty() || a == b || (a.starts_with(b) && a.get(b.len()) == Some(&b'/'))
}

fn trim_slashes(p: &[u8]) -> &[u8] {
    let s = p.iter().position(|&b| b != b'/').unwrap_or(p.len());
    let e = p.iter().rposition(|&b| b != b'/').map_or(s, |i| i + 1);
    &p[s..e.max(s)]
}

/// Restores `snap` (the entries at or below `paths`, or all) into `to`.
pub fn restore(
    repo: Arc<Repository>,
    snap: &Snapshot,
    paths: &[Vec<u8>],
    to: &Path,
) -> Result<RestoreReport> {
    let loaded = load(&repo, snap)?;
    // Fetches in flight are what a larger cache buys: a local repository
    // (4 reads at once) restored /usr/share as fast with 64 MiB as with
    // 256, in half the memory; S3 (8 or more at once) keeps 256.
    let cache = match repo.backend().read_concurrency() {
        0..=4 => 64 << 20,
        _ => 256 << 20,
    };
    let reader = open_disk(repo.clone(), snap, DATA, cache)?;
    std::fs::create_dir_all(to).map_err(|e| Error::io(format!("creating {}", to.display()), e))?;
    let root = open_dir_path(to).map_err(|e| Error::io(format!("opening {}", to.display()), e))?;
    let entries = &loaded.catalog.entries;
    let sel = selected(entries, paths);
    let chosen: Vec<&Entry> = entries
        .iter()
        .zip(&sel)
        .filter(|(_, s)| **s)
        .map(|(e, _)| e)
        .collect();
    let new_writer = |report| -> Result<Writer<'_>> {
        Ok(Writer {
            root: dup(&root).map_err(|e| Error::io("dup", e))?,
            stack: Vec::new(),
            reader: &reader,
            buf: Vec::new(),
            report,
        })
    };
    // Directories, links and nodes first; then the files' data, in parallel;
    // then hard links (to files that exist now); then directories' metadata.
    let mut w = new_writer(RestoreReport::default())?;
    let (files, rest): (Vec<&Entry>, Vec<&Entry>) = chosen.iter().partition(|e| e.has_data());
    let (links, rest): (Vec<&Entry>, Vec<&Entry>) = rest.iter().partition(|e| !e.link.is_empty());
    let made = w.create_all(&rest);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8);
    let per = files.len().div_ceil(threads).max(1);
    let reports = std::thread::scope(|s| {
        let workers: Vec<_> = files
            .chunks(per)
            .map(|part| {
                let mut fw = new_writer(RestoreReport::default());
                s.spawn(move || {
                    let fw = fw.as_mut().map_err(|e| Error::Invalid(e.to_string()))?;
                    let _made = fw.create_all(part);
                    Ok(std::mem::take(&mut fw.report))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("a restore thread panicked".into())))
            })
            .collect::<Result<Vec<RestoreReport>>>()
    })?;
    for r in reports {
        w.report.entries += r.entries;
        w.report.files += r.files;
        w.report.bytes += r.bytes;
        w.report.errors.extend(r.errors);
    }
    let _made = w.create_all(&links);
    let mut dirs: Vec<&Entry> = made.into_iter().filter(|e| e.kind() == Kind::Dir).collect();
    // Deepest first: a parent's times are set after its children's.
    dirs.sort_by_key(|e| std::cmp::Reverse(e.path.iter().filter(|&&b| b == b'/').count()));
    for e in dirs {
        if let Err(err) = w.dir_metadata(e) {
            w.fail(e, err);
        }
    }
    Ok(w.report)
}

fn dup(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    fd.try_clone()
}

struct Writer<'a> {
    root: OwnedFd,
    /// Open directories along the last path: (path, fd).
    stack: Vec<(Vec<u8>, OwnedFd)>,
    reader: &'a DiskReader,
    buf: Vec<u8>,
    report: RestoreReport,
}

type Step<T = ()> = std::result::Result<T, String>;

fn os(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn cstr(b: &[u8]) -> Step<CString> {
    CString::new(b).map_err(|_| "name with a NUL byte".to_string())
}

/// -1 → the OS error.
fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_dir_path(p: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is NUL-terminated; the fd returned is ours.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens directory `name` in `dir`, never through a symlink.
fn open_dir_at(dir: libc::c_int, name: &[u8]) -> Step<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: `c` is NUL-terminated; the fd returned is ours.
    let fd = unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    check(fd).map_err(os("opening its directory"))?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ts(t: Time) -> libc::timespec {
    libc::timespec {
        tv_sec: t.sec as libc::time_t,
        tv_nsec: t.nsec as libc::c_long,
    }
}

impl Writer<'_> {
    /// Creates `entries` in their order, listing what fails; those made.
    fn create_all<'e>(&mut self, entries: &[&'e Entry]) -> Vec<&'e Entry> {
        let mut made = Vec::new();
        for e in entries {
            match self.create(e) {
                Ok(()) => {
                    self.report.entries += 1;
                    made.push(*e);
                }
                Err(err) => self.fail(e, err),
            }
        }
        made
    }

    fn fail(&mut self, e: &Entry, why: String) {
        let p = super::abs_path(&e.path).display().to_string();
        tracing::warn!("{p}: {why}");
        self.report.errors.push((p, why));
    }

    /// The fd of directory `path` (relative to the root), opened along the
    /// way without following links; the stack keeps the last path's.
    fn dir(&mut self, path: &[u8]) -> Step<libc::c_int> {
        if path.is_empty() {
            return Ok(self.root.as_raw_fd());
        }
        while let Some((p, _)) = self.stack.last() {
            if under(path, p) {
                break;
            }
            self.stack.pop();
        }
        let done = self.stack.last().map_or(0, |(p, _)| p.len() + 1);
        if done > path.len() {
            return Ok(self
                .stack
                .last()
                .map_or(self.root.as_raw_fd(), |(_, f)| f.as_raw_fd()));
        }
        for comp in path[done..].split(|&b| b == b'/') {
            let parent = self
                .stack
                .last()
                .map_or(self.root.as_raw_fd(), |(_, f)| f.as_raw_fd());
            let fd = open_dir_at(parent, comp)?;
            let mut p = self
                .stack
                .last()
                .map(|(p, _)| p.clone())
                .unwrap_or_default();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(comp);
            self.stack.push((p, fd));
        }
        Ok(self
            .stack
            .last()
            .map_or(self.root.as_raw_fd(), |(_, f)| f.as_raw_fd()))
    }

    fn create(&mut self, e: &Entry) -> Step {
        super::catalog::check_entry(e)?;
        let parent = self.dir(e.parent())?;
        let name = cstr(e.name())?;
        if !e.link.is_empty() {
            return self.hard_link(e, parent, &name);
        }
        match e.kind() {
            Kind::Dir => {
                // SAFETY: `name` is NUL-terminated; `parent` is open.
                match check(unsafe { libc::mkdirat(parent, name.as_ptr(), 0o700) }) {
                    Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
                        // Must be a directory (not a link to one): checked by opening it.
                        open_dir_at(parent, e.name()).map(drop)
                    }
                    r => r.map_err(os("mkdir")),
                }
            }
            Kind::File => self.file(e, parent, &name),
            Kind::Symlink => {
                let target = cstr(&e.target)?;
                self.make(parent, &name, |p, n| {
                    // SAFETY: NUL-terminated strings, an open directory.
                    check(unsafe { libc::symlinkat(target.as_ptr(), p, n.as_ptr()) })
                })?;
                self.node_metadata(e, parent, &name)
            }
            Kind::CharDev | Kind::BlockDev | Kind::Fifo => {
                let t = match e.kind() {
                    Kind::CharDev => libc::S_IFCHR,
                    Kind::BlockDev => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                self.make(parent, &name, |p, n| {
                    // SAFETY: as above.
                    check(unsafe { libc::mknodat(p, n.as_ptr(), t | 0o600, e.rdev as libc::dev_t) })
                })?;
                self.node_metadata(e, parent, &name)
            }
        }
    }

    /// Makes a node with `f`; whatever non-directory was in the way is
    /// unlinked first (never written through).
    fn make(
        &self,
        parent: libc::c_int,
        name: &CString,
        mut f: impl FnMut(libc::c_int, &CString) -> std::io::Result<()>,
    ) -> Step {
        match f(parent, name) {
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
                // SAFETY: NUL-terminated name, open directory.
                check(unsafe { libc::unlinkat(parent, name.as_ptr(), 0) })
                    .map_err(os("removing what was in the way"))?;
                f(parent, name).map_err(os("create"))
            }
            r => r.map_err(os("create")),
        }
    }

    fn hard_link(&mut self, e: &Entry, parent: libc::c_int, name: &CString) -> Step {
        let link = Entry {
            path: e.link.clone(),
            ..Default::default()
        };
        // The target's directory is opened like any (no links followed);
        // `parent` stays valid: the stack keeps it or it is the root.
        let parent = open_dir_again(parent)?;
        let tdir = self.dir(link.parent())?;
        let tname = cstr(link.name())?;
        self.make(parent.as_raw_fd(), name, |p, n| {
            // SAFETY: NUL-terminated names, open directories; flags 0: a
            // symlink target is linked itself, not followed.
            check(unsafe { libc::linkat(tdir, tname.as_ptr(), p, n.as_ptr(), 0) })
        })
    }

    fn file(&mut self, e: &Entry, parent: libc::c_int, name: &CString) -> Step {
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let mut fd = -1;
        self.make(parent, name, |p, n| {
            // SAFETY: NUL-terminated name, open directory.
            fd = unsafe { libc::openat(p, n.as_ptr(), flags, 0o600) };
            check(fd)
        })?;
        // SAFETY: a fresh descriptor nobody else owns.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // Writes make the file as long as its last data; a trailing hole
        // (or an empty file's nothing) needs the length set.
        if self.write_data(e, &file)? < e.size {
            file.set_len(e.size).map_err(os("size"))?;
        }
        self.report.files += 1;
        self.report.bytes += e.size;
        fd_metadata(e, file.as_raw_fd())
    }

    /// Writes the file's data extents; holes are left unwritten. Returns
    /// the end of the last data written.
    fn write_data(&mut self, e: &Entry, file: &std::fs::File) -> Step<u64> {
        let end = e.offset.checked_add(e.size).ok_or("offset past 2^64")?;
        if end > self.reader.size() {
            return Err("its data lies past the data stream".into());
        }
        let mut written = 0;
        for x in self.reader.extents(e.offset, e.size) {
            if !x.data {
                continue;
            }
            let mut pos = x.offset;
            while pos < x.offset + x.len {
                let n = (x.offset + x.len - pos).min(WRITE_STEP as u64) as usize;
                self.buf.resize(n, 0);
                self.reader
                    .read_at(pos, &mut self.buf)
                    .map_err(|err| format!("reading its data: {err}"))?;
                file.write_all_at(&self.buf, pos - e.offset)
                    .map_err(os("write"))?;
                pos += n as u64;
            }
            written = pos - e.offset;
        }
        Ok(written)
    }

    /// Owner, mode (not of a symlink), xattrs and times of a node made in
    /// `parent`, by name, never following it.
    fn node_metadata(&self, e: &Entry, parent: libc::c_int, name: &CString) -> Step {
        // SAFETY: NUL-terminated name, open directory.
        check(unsafe {
            libc::fchownat(
                parent,
                name.as_ptr(),
                e.uid,
                e.gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map_err(os("chown"))?;
        if e.kind() != Kind::Symlink {
            // The node is ours, made just now: the name cannot be a link.
            check(unsafe { libc::fchmodat(parent, name.as_ptr(), e.mode as libc::mode_t, 0) })
                .map_err(os("chmod"))?;
        }
        if !e.xattrs.is_empty() {
            // Through the directory's fd: no path outside is ever resolved.
            let p = format!("/proc/self/fd/{parent}/");
            let mut full = p.into_bytes();
            full.extend_from_slice(name.as_bytes());
            let full = cstr(&full)?;
            for (k, v) in &e.xattrs {
                let k = cstr(k)?;
                // SAFETY: NUL-terminated strings; lsetxattr does not follow the last link.
                check(unsafe {
                    libc::lsetxattr(full.as_ptr(), k.as_ptr(), v.as_ptr().cast(), v.len(), 0)
                })
                .map_err(os("setting an xattr"))?;
            }
        }
        let times = [ts(e.atime), ts(e.mtime)];
        // SAFETY: as above.
        check(unsafe {
            libc::utimensat(
                parent,
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map_err(os("setting times"))
    }

    fn dir_metadata(&mut self, e: &Entry) -> Step {
        super::catalog::check_entry(e)?;
        let parent = self.dir(e.parent())?;
        let d = open_dir_at(parent, e.name())?;
        fd_metadata(e, d.as_raw_fd())
    }
}

/// Owner, then mode (chown clears setuid bits), then xattrs (a capability
/// is cleared by chown; an ACL sets the group bits as the mode had them),
/// then times, on an open file or directory.
fn fd_metadata(e: &Entry, fd: libc::c_int) -> Step {
    // SAFETY: calls on a descriptor the caller holds open.
    check(unsafe { libc::fchown(fd, e.uid, e.gid) }).map_err(os("chown"))?;
    check(unsafe { libc::fchmod(fd, e.mode as libc::mode_t) }).map_err(os("chmod"))?;
    for (k, v) in &e.xattrs {
        let k = cstr(k)?;
        // SAFETY: NUL-terminated name, `v` valid for its length.
        check(unsafe { libc::fsetxattr(fd, k.as_ptr(), v.as_ptr().cast(), v.len(), 0) })
            .map_err(os("setting an xattr"))?;
    }
    let times = [ts(e.atime), ts(e.mtime)];
    // SAFETY: two timespecs, as futimens wants.
    check(unsafe { libc::futimens(fd, times.as_ptr()) }).map_err(os("setting times"))
}

/// A second descriptor of an open directory (so the stack may change).
fn open_dir_again(fd: libc::c_int) -> Step<OwnedFd> {
    // SAFETY: dup of a descriptor we hold; the copy is ours.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    check(d).map_err(os("dup"))?;
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(d) })
}
