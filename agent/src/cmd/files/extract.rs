//! `files get --to DIR`: entries written under DIR and nowhere else.
//!
//! The tree is the VM owner's, so:
//! - names that are not one path component (`..`, `/`, NUL) are skipped;
//! - nothing existing is overwritten or followed: files are created with
//!   `O_EXCL|O_NOFOLLOW`, directories with `mkdir` (a failure skips the
//!   subtree), and symlinks only at the end, so no later write can pass
//!   through one;
//! - symlinks with an absolute target or one that climbs out of the
//!   extracted tree, device files, FIFOs and sockets are refused;
//! - setuid/setgid bits are dropped; owners are kept only when run as root.
//!
//! Files keep their holes (zero runs are not written), mode and mtime;
//! hard links are linked again.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use fsread::{Kind, Meta};

use super::list::each_below;
use super::Located;

/// Bytes read per piece of a file.
const PIECE: usize = 1 << 20;
/// Zero runs this long (and aligned) are left as holes.
const HOLE: usize = 4096;

pub(super) fn to_dir(sources: &[Located], dir: &Path) -> Result<i32> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut x = Extractor {
        root: dir.to_path_buf(),
        as_root: unsafe { libc::geteuid() } == 0,
        ..Extractor::default()
    };
    let mut errors = 0;
    for s in sources {
        errors += each_below(s, &mut |rel, e| {
            x.entry(rel, e);
            Ok(())
        });
    }
    x.finish();
    let failed = x.failed + errors;
    println!(
        "extracted {} entries to {}{}",
        x.written,
        dir.display(),
        if x.refused + failed > 0 {
            format!(" ({} refused, {} failed: see above)", x.refused, failed)
        } else {
            String::new()
        }
    );
    Ok(i32::from(x.refused + failed > 0))
}

#[derive(Default)]
struct Extractor {
    root: PathBuf,
    as_root: bool,
    /// First path written of each hard-linked file, by (tree, node id).
    links: HashMap<(usize, u64), PathBuf>,
    /// Directories not created: what lies below them is skipped.
    skipped: HashSet<String>,
    /// Symlinks to create at the end: path, target, metadata.
    symlinks: Vec<(PathBuf, Vec<u8>, Meta)>,
    /// Directories whose mode and mtime are set at the end.
    dirs: Vec<(PathBuf, Meta)>,
    written: usize,
    refused: usize,
    failed: usize,
}

impl Extractor {
    fn entry(&mut self, rel: &str, e: &Located) {
        if let Some((parent, _)) = rel.rsplit_once('/') {
            if self.skipped.contains(parent) {
                self.skipped.insert(rel.to_string());
                return;
            }
        }
        let dest = self.root.join(rel);
        let r = match e.node.meta.kind {
            Kind::Dir => self.dir(&dest, e),
            Kind::File => self.file(&dest, e),
            Kind::Symlink => self.symlink(rel, &dest, e),
            other => {
                self.refuse(&e.path, &format!("a {} is not extracted", other.name()));
                return;
            }
        };
        match r {
            Ok(true) => self.written += 1,
            Ok(false) => {}
            Err(err) => {
                eprintln!("error: {}: {err:#}", e.path);
                self.failed += 1;
                if e.node.meta.kind == Kind::Dir {
                    self.skipped.insert(rel.to_string());
                }
            }
        }
    }

    fn refuse(&mut self, path: &str, why: &str) {
        eprintln!("refused: {path}: {why}");
        self.refused += 1;
    }

    fn dir(&mut self, dest: &Path, e: &Located) -> Result<bool> {
        std::fs::create_dir(dest).with_context(|| format!("creating {}", dest.display()))?;
        self.owner(dest, &e.node.meta)?;
        self.dirs.push((dest.to_path_buf(), e.node.meta.clone()));
        Ok(true)
    }

    fn file(&mut self, dest: &Path, e: &Located) -> Result<bool> {
        let m = &e.node.meta;
        let key = (Arc::as_ptr(&e.tree) as *const () as usize, e.node.id);
        if m.nlink > 1 {
            if let Some(first) = self.links.get(&key) {
                std::fs::hard_link(first, dest)
                    .with_context(|| format!("linking {}", dest.display()))?;
                return Ok(true);
            }
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(dest)
            .with_context(|| format!("creating {}", dest.display()))?;
        let copied = copy_sparse(e, &f);
        if let Err(err) = copied {
            drop(f);
            // Best effort: a partial file must not pass for the real one;
            // the error below is reported either way.
            let _ = std::fs::remove_file(dest);
            return Err(err);
        }
        self.owner(dest, m)?;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(m.mode & 0o1777))?;
        set_mtime(dest, m)?;
        if m.nlink > 1 {
            self.links.insert(key, dest.to_path_buf());
        }
        Ok(true)
    }

    fn symlink(&mut self, rel: &str, dest: &Path, e: &Located) -> Result<bool> {
        let target = e.tree.read_link(&e.node)?;
        if let Err(why) = safe_link(rel, &target) {
            self.refuse(&e.path, why);
            return Ok(false);
        }
        self.symlinks
            .push((dest.to_path_buf(), target, e.node.meta.clone()));
        Ok(true)
    }

    fn owner(&self, dest: &Path, m: &Meta) -> Result<()> {
        if self.as_root {
            std::os::unix::fs::lchown(dest, m.uid, m.gid)
                .with_context(|| format!("chown {}", dest.display()))?;
        }
        Ok(())
    }

    /// Symlinks last (nothing is written through them), then directory
    /// modes and times, deepest first (a read-only directory is filled
    /// before it becomes read-only; its time after its entries).
    fn finish(&mut self) {
        for (dest, target, m) in std::mem::take(&mut self.symlinks) {
            let r = std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &dest)
                .with_context(|| format!("creating {}", dest.display()))
                .and_then(|_| self.owner(&dest, &m))
                .and_then(|_| set_mtime(&dest, &m));
            if let Err(err) = r {
                eprintln!("error: {err:#}");
                self.failed += 1;
            }
        }
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (dest, m) in dirs {
            let r =
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(m.mode & 0o1777))
                    .map_err(anyhow::Error::from)
                    .and_then(|_| set_mtime(&dest, &m));
            if let Err(err) = r {
                eprintln!("error: {}: {err:#}", dest.display());
                self.failed += 1;
            }
        }
    }
}

/// Whether a symlink at `rel` (relative to the extraction root) pointing
/// at `target` stays inside the extracted tree.
pub(super) fn safe_link(rel: &str, target: &[u8]) -> Result<(), &'static str> {
    if target.first() == Some(&b'/') {
        return Err("absolute symlink target");
    }
    if target.is_empty() || target.contains(&0) {
        return Err("empty or NUL in symlink target");
    }
    // Depth of the link's directory below the root.
    let mut depth = rel.matches('/').count() as i64;
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => depth -= 1,
            _ => depth += 1,
        }
        if depth < 0 {
            return Err("symlink target leaves the extracted tree");
        }
    }
    Ok(())
}

/// Copies a file's bytes, leaving zero runs as holes.
fn copy_sparse(e: &Located, f: &std::fs::File) -> Result<()> {
    let size = e.node.meta.size;
    let mut buf = vec![0u8; PIECE];
    let zeros = vec![0u8; PIECE];
    let mut pos = 0u64;
    while pos < size {
        let n = e.tree.read(&e.node, pos, &mut buf)?;
        if n == 0 {
            anyhow::bail!("file ends at {pos} of {size} bytes");
        }
        write_data(f, &buf[..n], &zeros, pos)?;
        pos += n as u64;
    }
    f.set_len(size)?;
    Ok(())
}

/// Writes the blocks of `data` (at file offset `at`) that are not all
/// zeros, runs of them at once; zero blocks stay holes.
fn write_data(f: &std::fs::File, data: &[u8], zeros: &[u8], at: u64) -> Result<()> {
    let mut run: Option<usize> = None;
    for (i, block) in data.chunks(HOLE).enumerate() {
        let start = i * HOLE;
        match (block == &zeros[..block.len()], run) {
            (false, None) => run = Some(start),
            (true, Some(r)) => {
                f.write_all_at(&data[r..start], at + r as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(r) = run {
        f.write_all_at(&data[r..], at + r as u64)?;
    }
    Ok(())
}

/// Sets mtime (and atime to it) without following a symlink.
fn set_mtime(p: &Path, m: &Meta) -> Result<()> {
    let Some(t) = m.mtime else { return Ok(()) };
    let ts = libc::timespec {
        tv_sec: t.secs as libc::time_t,
        tv_nsec: t.nsec as libc::c_long,
    };
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [ts, ts].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setting the time of {}", p.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::safe_link;

    #[test]
    fn symlinks_must_stay_inside() {
        assert!(safe_link("a", b"b/c").is_ok());
        assert!(safe_link("x/y/link", b"../z").is_ok());
        assert!(safe_link("x/link", b"../../z").is_err());
        assert!(safe_link("link", b"/etc/passwd").is_err());
        assert!(safe_link("x/link", b"a/../../..").is_err());
        assert!(safe_link("x/link", b"").is_err());
    }
}
