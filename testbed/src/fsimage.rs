//! Filesystem images with known files, made by the real tools (`mkfs.ext4
//! -d`, `mkfs.xfs -p`, `mkfs.vfat` + `mcopy`, `mkntfs` + an `ntfs-3g` FUSE
//! mount, `sfdisk`, LVM on a loop device), and a check that a copy of the
//! files matches the source bit for bit and in its metadata.
//!
//! [`populate`] writes the known tree; each builder puts it into an image
//! as far as the filesystem can hold it ([`Caps`] says how far).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{io_err, run};
use crate::{Error, Result};

/// What a filesystem keeps of the known tree.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Symlinks (and POSIX modes, owners).
    pub posix: bool,
    /// Hard links.
    pub hardlinks: bool,
    /// A sparse file larger than 4 GiB.
    pub big_sparse: bool,
    /// mtime granularity in nanoseconds (FAT: 2 s); 0: not kept.
    pub mtime_step: u64,
}

/// ext4 keeps everything; `mkfs.ext4 -d` copies mtimes in whole seconds.
pub const EXT4: Caps = Caps {
    posix: true,
    hardlinks: true,
    big_sparse: true,
    mtime_step: 1_000_000_000,
};
/// `mkfs.xfs -p` makes no hard links and stamps the time of mkfs.
pub const XFS: Caps = Caps {
    posix: true,
    hardlinks: false,
    big_sparse: false,
    mtime_step: 0,
};
/// FAT: names and bytes, times in 2 s steps.
pub const VFAT: Caps = Caps {
    posix: false,
    hardlinks: false,
    big_sparse: false,
    mtime_step: 2_000_000_000,
};
/// NTFS through ntfs-3g: symlinks, hard links, sparse files, 100 ns times;
/// no POSIX modes or owners.
pub const NTFS: Caps = Caps {
    posix: false,
    hardlinks: true,
    big_sparse: true,
    mtime_step: 100,
};

/// The mtime every known file gets (nanoseconds included).
pub const MTIME: (i64, u32) = (1_600_000_000, 123_456_789);
/// Owner of the files that are not root's (where owners are kept).
pub const OWNER: (u32, u32) = (1234, 5678);
/// Size of the big sparse file: past 4 GiB.
pub const BIG_SPARSE: u64 = (5 << 30) + 12345;
/// The name with non-ASCII characters.
pub const UTF8_NAME: &str = "ünïcødé-名前.txt";

/// Writes the known tree into `dir` (which exists and is empty).
pub fn populate(dir: &Path, caps: Caps) -> Result<()> {
    let w = |rel: &str, data: &[u8]| -> Result<()> {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io_err(format!("mkdir {}", parent.display())))?;
        }
        std::fs::write(&p, data).map_err(io_err(format!("writing {}", p.display())))
    };
    w("hello.txt", b"hello world\n")?;
    w("dir/nested/deep/file.bin", &pattern(300 << 10, 7))?;
    w("dir/exec.sh", b"#!/bin/sh\necho hi\n")?;
    w(UTF8_NAME, "grüße\n".as_bytes())?;
    w("empty", b"")?;
    w("hard1", b"one inode, two names\n")?;
    std::fs::create_dir_all(dir.join("emptydir")).map_err(io_err("mkdir emptydir"))?;
    for i in 0..200 {
        w(
            &format!("many/file-{i:03}.txt"),
            format!("file {i}\n").as_bytes(),
        )?;
    }
    sparse(
        &dir.join("sparse.img"),
        4 << 20,
        &[(0, b"head"), (3 << 20, b"middle")],
    )?;
    if caps.big_sparse {
        sparse(
            &dir.join("big-sparse.img"),
            BIG_SPARSE,
            &[(1 << 20, b"one"), (BIG_SPARSE - 4, b"tail")],
        )?;
    }
    if caps.hardlinks {
        std::fs::hard_link(dir.join("hard1"), dir.join("hard2")).map_err(io_err("hard link"))?;
    }
    if caps.posix {
        let sym = |target: &str, name: &str| {
            std::os::unix::fs::symlink(target, dir.join(name))
                .map_err(io_err(format!("symlink {name}")))
        };
        sym("dir/exec.sh", "link-rel")?;
        sym("/etc/passwd", "link-abs")?;
        sym("../../outside", "link-up")?;
        set_mode(&dir.join("dir/exec.sh"), 0o755)?;
        set_mode(&dir.join("dir/nested/deep/file.bin"), 0o600)?;
        std::os::unix::fs::chown(dir.join("dir/nested"), Some(OWNER.0), Some(OWNER.1))
            .map_err(io_err("chown"))?;
        std::os::unix::fs::chown(dir.join("hello.txt"), Some(OWNER.0), Some(OWNER.1))
            .map_err(io_err("chown"))?;
    }
    stamp(dir)
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(io_err("chmod"))
}

/// Deterministic bytes.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A sparse file of `len` bytes with `data` written at offsets.
fn sparse(p: &Path, len: u64, data: &[(u64, &[u8])]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p).map_err(io_err(format!("creating {}", p.display())))?;
    f.set_len(len).map_err(io_err("set_len"))?;
    for (off, d) in data {
        f.write_all_at(d, *off).map_err(io_err("write"))?;
    }
    Ok(())
}

/// Sets every entry's mtime to [`MTIME`] (symlinks themselves included).
fn stamp(dir: &Path) -> Result<()> {
    let stamp = format!("@{}.{:09}", MTIME.0, MTIME.1);
    let mut all = walk(dir)?;
    all.push(dir.to_path_buf());
    // Deepest first, so a directory's time is set after its entries.
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for chunk in all.chunks(200) {
        run(Command::new("touch").args(["-h", "-d", &stamp]).args(chunk))?;
    }
    Ok(())
}

/// Every path under `dir`, not following symlinks.
pub fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).map_err(io_err(format!("listing {}", d.display())))? {
            let p = e.map_err(io_err("listing"))?.path();
            let m = std::fs::symlink_metadata(&p).map_err(io_err("lstat"))?;
            if m.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// An ext4 image of `size` bytes holding `dir` (`mkfs.ext4 -d`); `args`
/// go to mkfs (`-O ^has_journal`, `-t ext2`, ...).
pub fn ext4(dir: &Path, image: &Path, size: u64, label: &str, args: &[&str]) -> Result<()> {
    make_file(image, size)?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d"])
        .arg(dir)
        .args(args)
        .arg(image))?;
    Ok(())
}

/// An XFS image holding `dir` through a protofile (`mkfs.xfs -p`).
pub fn xfs(dir: &Path, image: &Path, size: u64, label: &str) -> Result<()> {
    make_file(image, size)?;
    let proto = image.with_extension("proto");
    let mut text = String::from("/dev/null\n0 0\nd--755 0 0\n");
    proto_dir(dir, &mut text, 1)?;
    text.push_str("$\n");
    std::fs::write(&proto, text).map_err(io_err("writing the protofile"))?;
    run(Command::new("mkfs.xfs")
        .args(["-q", "-f", "-L", label, "-p"])
        .arg(&proto)
        .arg(image))?;
    Ok(())
}

fn proto_dir(dir: &Path, text: &mut String, depth: usize) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io_err("listing"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(io_err("listing"))?;
    entries.sort();
    for p in entries {
        let m = std::fs::symlink_metadata(&p).map_err(io_err("lstat"))?;
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Unexpected("name".into()))?;
        let pad = " ".repeat(depth);
        let perm = m.mode() & 0o777;
        let (uid, gid) = (m.uid(), m.gid());
        if m.file_type().is_symlink() {
            let t = std::fs::read_link(&p).map_err(io_err("readlink"))?;
            text.push_str(&format!(
                "{pad}{name} l--{perm:o} {uid} {gid} {}\n",
                t.display()
            ));
        } else if m.is_dir() {
            text.push_str(&format!("{pad}{name} d--{perm:o} {uid} {gid}\n"));
            proto_dir(&p, text, depth + 1)?;
            text.push_str(&format!("{pad}$\n"));
        } else {
            text.push_str(&format!(
                "{pad}{name} ---{perm:o} {uid} {gid} {}\n",
                p.display()
            ));
        }
    }
    Ok(())
}

/// A FAT32 image holding `dir` (`mkfs.vfat`, `mcopy -s -m`, as UTC).
pub fn vfat(dir: &Path, image: &Path, size: u64, label: &str) -> Result<()> {
    make_file(image, size)?;
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", label])
        .arg(image))?;
    for p in std::fs::read_dir(dir).map_err(io_err("listing"))? {
        let p = p.map_err(io_err("listing"))?.path();
        run(Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .env("TZ", "UTC")
            .env("LC_ALL", "C.UTF-8")
            .args(["-s", "-m", "-i"])
            .arg(image)
            .arg(&p)
            .arg("::/"))?;
    }
    Ok(())
}

/// An NTFS image holding `dir` (`mkntfs`, then `cp -a` into an ntfs-3g
/// FUSE mount of it).
pub fn ntfs(dir: &Path, image: &Path, size: u64, label: &str) -> Result<()> {
    make_file(image, size)?;
    run(Command::new("mkntfs")
        .args(["-q", "-F", "-Q", "-L", label])
        .arg(image))?;
    let mnt = image.with_extension("mnt");
    std::fs::create_dir_all(&mnt).map_err(io_err("mkdir"))?;
    run(Command::new("ntfs-3g").arg(image).arg(&mnt))?;
    let copied = run(Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(format!("{}/.", dir.display()))
        .arg(&mnt));
    let unmounted = run(Command::new("fusermount3").arg("-u").arg(&mnt));
    copied?;
    unmounted?;
    std::fs::remove_dir(&mnt).map_err(io_err("rmdir"))
}

/// A sparse file of `size` bytes.
pub fn make_file(p: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(p).map_err(io_err(format!("creating {}", p.display())))?;
    f.set_len(size).map_err(io_err("set_len"))
}

/// Writes a partition table (`sfdisk`, `label` `gpt` or `dos`) with
/// partitions of the given MiB sizes and types (sfdisk shorthands: `L`
/// linux, `V` LVM, `U` EFI); their byte offsets.
pub fn partition(disk: &Path, label: &str, parts: &[(u64, &str)]) -> Result<Vec<u64>> {
    let mut script = format!("label: {label}\n");
    for (mib, ty) in parts {
        script.push_str(&format!("size={}MiB, type={ty}\n", mib));
    }
    let mut child = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(io_err("sfdisk"))?;
    use std::io::Write;
    child
        .stdin
        .take()
        .ok_or_else(|| Error::Unexpected("sfdisk stdin".into()))?
        .write_all(script.as_bytes())
        .map_err(io_err("sfdisk stdin"))?;
    let st = child.wait().map_err(io_err("sfdisk"))?;
    if !st.success() {
        return Err(Error::Unexpected(format!("sfdisk failed: {st}")));
    }
    let dump = run(Command::new("sfdisk").args(["-J"]).arg(disk))?;
    let v: serde_json::Value =
        serde_json::from_str(&dump).map_err(|e| Error::Unexpected(e.to_string()))?;
    let sector = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    Ok(v["partitiontable"]["partitions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["start"].as_u64())
                .map(|s| s * sector)
                .collect()
        })
        .unwrap_or_default())
}

/// Copies an image file into `disk` at byte `offset`.
pub fn place(image: &Path, disk: &Path, offset: u64) -> Result<()> {
    run(Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", disk.display()))
        .args([
            "bs=1M",
            "conv=notrunc,sparse",
            "oflag=seek_bytes",
            "status=none",
        ])
        .arg(format!("seek={offset}")))?;
    Ok(())
}

/// A logical volume made on the region `[offset, offset + len)` of
/// `disk`: the volume's name and its byte offset within `disk`.
pub struct LvPlace {
    /// `VG/LV`.
    pub name: String,
    /// Where its first (only) extent run starts on the disk.
    pub offset: u64,
}

/// Makes a PV on `disk` at `offset` (a partition) through a loop device,
/// a VG `vg` and linear LVs of the given MiB sizes, without device-mapper
/// (`lvcreate --driverloaded n -an -Zn`).
pub fn lvm(
    disk: &Path,
    offset: u64,
    len: u64,
    vg: &str,
    lvs: &[(&str, u64)],
) -> Result<Vec<LvPlace>> {
    let out = run(Command::new("losetup")
        .args([
            "-f",
            "--show",
            "-o",
            &offset.to_string(),
            "--sizelimit",
            &len.to_string(),
        ])
        .arg(disk))?;
    let dev = out.trim().to_string();
    // Only this device; no metadata backups left in /etc/lvm.
    let filter = format!(
        "devices {{ filter=[\"a|^{dev}$|\",\"r|.*|\"] use_devicesfile=0 }} backup {{ backup=0 archive=0 }}"
    );
    let lvm = |args: &[&str]| -> Result<String> {
        run(Command::new(args[0])
            .args(&args[1..])
            .args(["--config", &filter]))
    };
    let result = (|| {
        lvm(&["pvcreate", "-q", "-y", &dev])?;
        lvm(&["vgcreate", "-q", vg, &dev])?;
        for (name, mib) in lvs {
            lvm(&[
                "lvcreate",
                "-q",
                "--driverloaded",
                "n",
                "-an",
                "-Zn",
                "-y",
                "-n",
                name,
                "-L",
                &format!("{mib}m"),
                vg,
            ])?;
        }
        let pe_start: u64 = lvm(&[
            "pvs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "pe_start",
            &dev,
        ])?
        .trim()
        .parse()
        .map_err(|e| Error::Unexpected(format!("pe_start: {e}")))?;
        let extent: u64 = lvm(&[
            "vgs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_extent_size",
            vg,
        ])?
        .trim()
        .parse()
        .map_err(|e| Error::Unexpected(format!("extent size: {e}")))?;
        let segs = lvm(&[
            "lvs",
            "--noheadings",
            "--segments",
            "-o",
            "lv_name,seg_pe_ranges",
            vg,
        ])?;
        let mut places = Vec::new();
        for line in segs.lines() {
            let mut it = line.split_whitespace();
            let (Some(name), Some(range)) = (it.next(), it.next()) else {
                continue;
            };
            let first: u64 = range
                .rsplit(':')
                .next()
                .and_then(|r| r.split('-').next())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Error::Unexpected(format!("segment range {range}")))?;
            places.push(LvPlace {
                name: format!("{vg}/{name}"),
                offset: offset + pe_start + first * extent,
            });
        }
        Ok(places)
    })();
    // The VG stays on the disk image; LVM forgets the device with it.
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    result
}

/// Checks that `copy` holds what `source` holds as far as `caps` go:
/// every entry, its kind, bytes, symlink target, mode, owner, mtime;
/// `skip` names entries (relative paths) the copy must not have.
pub fn compare_trees(
    source: &Path,
    copy: &Path,
    caps: Caps,
    skip: &[&str],
    owners: bool,
) -> Result<usize> {
    let rel = |root: &Path, p: &Path| {
        p.strip_prefix(root)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    let want: Vec<PathBuf> = walk(source)?
        .iter()
        .map(|p| rel(source, p))
        .filter(|r| !skip.iter().any(|s| Path::new(s) == r))
        .collect();
    let have: Vec<PathBuf> = walk(copy)?.iter().map(|p| rel(copy, p)).collect();
    if want != have {
        return Err(Error::Unexpected(format!(
            "entries differ:\n want {want:?}\n have {have:?}"
        )));
    }
    for r in &want {
        let (a, b) = (source.join(r), copy.join(r));
        let (ma, mb) = (
            std::fs::symlink_metadata(&a).map_err(io_err("lstat"))?,
            std::fs::symlink_metadata(&b).map_err(io_err("lstat"))?,
        );
        let bad = |what: &str| Error::Unexpected(format!("{}: {what} differs", r.display()));
        if ma.file_type() != mb.file_type() {
            return Err(bad("type"));
        }
        if ma.file_type().is_symlink() {
            if std::fs::read_link(&a).ok() != std::fs::read_link(&b).ok() {
                return Err(bad("symlink target"));
            }
        } else if ma.is_file() && !same_content(&a, &b)? {
            return Err(bad("content"));
        }
        if caps.posix && !ma.file_type().is_symlink() && ma.mode() & 0o7777 != mb.mode() & 0o7777 {
            return Err(bad(&format!("mode {:o} vs {:o}", ma.mode(), mb.mode())));
        }
        if caps.posix && owners && (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
            return Err(bad("owner"));
        }
        if caps.mtime_step > 0 && !ma.file_type().is_symlink() {
            let t =
                |m: &std::fs::Metadata| m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
            let step = caps.mtime_step as i128;
            if t(&ma) / step != t(&mb) / step {
                return Err(bad(&format!("mtime {} vs {}", t(&ma), t(&mb))));
            }
        }
    }
    Ok(want.len())
}

/// Whether two files hold the same bytes (read in pieces: sparse files
/// may be large).
pub fn same_content(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let open =
        |p: &Path| std::fs::File::open(p).map_err(io_err(format!("opening {}", p.display())));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    if fa.metadata().map_err(io_err("stat"))?.len() != fb.metadata().map_err(io_err("stat"))?.len()
    {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).map_err(io_err("read"))? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }
}
