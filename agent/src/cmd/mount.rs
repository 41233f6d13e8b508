//! `bulwark mount SNAPSHOT DIR` / `bulwark umount DIR`: a snapshot as a
//! read-only FUSE directory with one raw image per disk (`vda.raw`, ...),
//! read lazily from the repository. From there an admin uses `losetup` and
//! `mount` to reach single files without restoring the VM. A file
//! snapshot shows its tree of files instead ([`super::mount_tree`]).

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use bulwark_store::read::reader::{open_disks, DiskReader};
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, Request,
};

use crate::{secret, Global};

#[derive(clap::Args)]
pub struct Args {
    /// Snapshot id, unique id prefix, or SOURCE@latest.
    snapshot: String,
    /// Empty directory to mount on.
    dir: PathBuf,
    /// Stay in the foreground until unmounted (default: detach once mounted).
    #[arg(long)]
    foreground: bool,
    /// Memory for decrypted chunks, in MiB.
    #[arg(long, default_value_t = 256)]
    cache_mib: usize,
}

#[derive(clap::Args)]
pub struct UmountArgs {
    dir: PathBuf,
}

const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;

struct SnapshotFs {
    disks: Vec<(String, Arc<DiskReader>)>,
    time: SystemTime,
}

impl SnapshotFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino == ROOT {
            (FileType::Directory, 0, 0o555, 2)
        } else {
            let (_, d) = self.disks.get((ino - 2) as usize)?;
            (FileType::RegularFile, d.size(), 0o444, 1)
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for SnapshotFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let found = (parent == ROOT)
            .then(|| self.disks.iter().position(|(n, _)| OsStr::new(n) == name))
            .flatten();
        match found.and_then(|i| self.attr(i as u64 + 2)) {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(libc::EROFS);
        } else if self.attr(ino).is_some() {
            reply.opened(0, 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some((name, disk)) = ino.checked_sub(2).and_then(|i| self.disks.get(i as usize)) else {
            return reply.error(libc::ENOENT);
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        let len = u64::from(size).min(disk.size().saturating_sub(offset));
        let mut buf = vec![0u8; len as usize];
        match disk.read_at(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                tracing::error!("read {name} at {offset}: {e}");
                reply.error(libc::EIO)
            }
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries = vec![(ROOT, FileType::Directory, ".".to_string())];
        entries.push((ROOT, FileType::Directory, "..".to_string()));
        for (i, (n, _)) in self.disks.iter().enumerate() {
            entries.push((i as u64 + 2, FileType::RegularFile, n.clone()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

pub fn mount(g: &Global, a: Args) -> Result<i32> {
    if !a.dir.is_dir() {
        bail!("{} is not a directory", a.dir.display());
    }
    if is_mounted(&a.dir)? {
        bail!("{} is already a mount point", a.dir.display());
    }
    if !a.foreground {
        return detach(&a);
    }
    let repo = Arc::new(secret::open(g)?);
    // A disk snapshot's readers load only its part of the index.
    let snap = repo.find_snapshot(&a.snapshot)?;
    if snap.is_files() {
        let tree = super::files::file_tree(repo, &snap, a.cache_mib)?;
        let fs = super::mount_tree::TreeFs::new(tree).context("reading the catalog")?;
        super::mount_tree::serve(fs, &a.dir, format!("bulwark:{}", snap.id.short()))
            .with_context(|| format!("mounting on {}", a.dir.display()))?;
        return Ok(0);
    }
    let cache = (a.cache_mib << 20) / snap.disks.len().max(1);
    let disks = open_disks(repo.clone(), &snap, cache)?
        .into_iter()
        .map(|(name, reader)| (format!("{name}.raw"), Arc::new(reader)))
        .collect();
    let fs = SnapshotFs {
        disks,
        time: SystemTime::from(snap.time),
    };
    let opts = [
        MountOption::RO,
        MountOption::FSName(format!("bulwark:{}", snap.id.short())),
        MountOption::Subtype("bulwark".into()),
    ];
    fuser::mount2(fs, &a.dir, &opts).with_context(|| format!("mounting on {}", a.dir.display()))?;
    Ok(0)
}

/// Runs `bulwark mount --foreground` in a new session and returns once the
/// mount is there (or the child has failed, with its error).
fn detach(a: &Args) -> Result<i32> {
    let exe = std::env::current_exe()?;
    let log = std::env::temp_dir().join(format!("bulwark-mount-{}.log", std::process::id()));
    let logf = std::fs::File::create(&log)?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our
    // terminal so it outlives this command.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount process")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if is_mounted(&a.dir)? {
            let _ = std::fs::remove_file(&log);
            println!(
                "mounted snapshot {} on {} (bulwark umount {} to undo)",
                a.snapshot,
                a.dir.display(),
                a.dir.display()
            );
            return Ok(0);
        }
        if let Some(status) = child.try_wait()? {
            let msg = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            bail!("mount failed ({status}): {}", msg.trim());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("timed out waiting for the mount on {}", a.dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `dir` is a mount point (per /proc/self/mountinfo).
fn is_mounted(dir: &Path) -> Result<bool> {
    let canon = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| unescape(m) == canon.to_string_lossy())
    }))
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

pub fn umount(a: UmountArgs) -> Result<i32> {
    if !is_mounted(&a.dir)? {
        bail!("{} is not mounted", a.dir.display());
    }
    for tool in ["fusermount3", "fusermount", "umount"] {
        let arg: &[&str] = if tool == "umount" { &[] } else { &["-u"] };
        match std::process::Command::new(tool).args(arg).arg(&a.dir).status() {
            Ok(s) if s.success() => return Ok(0),
            Ok(s) => bail!("{tool} -u {} failed ({s}): is a file under it still open or a loop device attached?", a.dir.display()),
            Err(_) => continue,
        }
    }
    bail!("no fusermount3, fusermount or umount found")
}
