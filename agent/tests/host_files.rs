//! `bulwark backup files` / `restore files` end to end, as root, on a tree
//! with every file type and attribute: hard links across directories, a
//! 10 GiB sparse file with 1 MiB of data, `user.` and `security.` xattrs, a
//! POSIX ACL, a file capability, a fifo, a device node, UTF-8 and invalid
//! UTF-8 names, deep nesting, 100k small files; the restored tree compared
//! entry by entry (lstat, xattrs, content, hard-link groups). Also: change
//! detection reading 0 bytes of unchanged files, an unreadable file (as
//! `nobody`) making a partial snapshot and exit 3, a file changing while
//! it is read.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use testbed::cli::{stderr, Runner};

const PW: &str = "test passphrase";
const SMALL_FILES: usize = 100_000;

fn sh(script: &str) {
    let out = Command::new("sh").arg("-ec").arg(script).output().unwrap();
    assert!(out.status.success(), "{script}: {}", stderr(&out));
}

fn runner(dir: &Path) -> Runner {
    let bw = Runner::new(env!("CARGO_BIN_EXE_bulwark"))
        .env("BULWARK_REPO", dir.join("repo"))
        .env("BULWARK_PASSWORD", PW);
    bw.ok(&["repo", "init"]);
    bw
}

/// The tree of the round-trip test (its root is `root`).
fn craft(root: &Path) {
    let p = |s: &str| root.join(s);
    fs::create_dir_all(p("a/x")).unwrap();
    fs::create_dir_all(p("b/y/z")).unwrap();
    fs::write(p("a/x/linked"), b"one inode, three names").unwrap();
    fs::hard_link(p("a/x/linked"), p("b/y/z/also")).unwrap();
    fs::hard_link(p("a/x/linked"), p("b/third")).unwrap();
    // 10 GiB, 1 MiB of data in the middle.
    let f = fs::File::create(p("sparse")).unwrap();
    f.set_len(10 << 30).unwrap();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    f.write_all_at(&data, 5 << 30).unwrap();
    drop(f);
    fs::write(p("attrs"), b"xattrs").unwrap();
    fs::write(p("acl"), b"acl").unwrap();
    fs::write(p("cap"), b"#!/bin/sh\n").unwrap();
    fs::create_dir(p("acldir")).unwrap();
    let deep = (0..40)
        .map(|i| format!("d{i}"))
        .collect::<Vec<_>>()
        .join("/");
    fs::create_dir_all(p(&deep)).unwrap();
    fs::write(p(&format!("{deep}/leaf")), b"deep").unwrap();
    fs::write(p("naïve-文件.txt"), "ünïcödé".as_bytes()).unwrap();
    fs::write(root.join(OsStr::from_bytes(b"bad-\xff\xfe")), b"latin1").unwrap();
    fs::write(p("setuid"), b"suid").unwrap();
    fs::set_permissions(p("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(p("owned"), b"by 1234").unwrap();
    std::os::unix::fs::lchown(p("owned"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::symlink("a/x/linked", p("rel-link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", p("dangling")).unwrap();
    for d in 0..100 {
        let dir = p(&format!("many/{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..SMALL_FILES / 100 {
            fs::write(dir.join(format!("{i:04}")), format!("small {d} {i}\n")).unwrap();
        }
    }
    let q = |s: &str| p(s).display().to_string();
    sh(&format!(
        "setfattr -n user.color -v blue '{a}'
         setfattr -n security.bulwark -v 0sAAEC '{a}'
         setfattr -n user.dir -v yes '{dir}'
         setfacl -m u:nobody:rw,g:nogroup:r '{acl}'
         setfacl -d -m g:nogroup:rx '{dir}'
         setcap cap_net_raw+ep '{cap}'
         mkfifo '{fifo}'
         mknod '{null}' c 1 3
         touch -h -d '2001-02-03 04:05:06.123456789' '{rel}'
         touch -d '1999-12-31 23:59:59.987654321' '{a}'",
        a = q("attrs"),
        dir = q("acldir"),
        acl = q("acl"),
        cap = q("cap"),
        fifo = q("fifo"),
        null = q("null"),
        rel = q("rel-link"),
    ));
    // Left out: a socket (counted), an excluded name, a cache directory,
    // what an ignore file names.
    std::os::unix::net::UnixListener::bind(p("sock")).unwrap();
    fs::write(p("skip.tmp"), b"excluded").unwrap();
    fs::create_dir(p("cache")).unwrap();
    fs::write(
        p("cache/CACHEDIR.TAG"),
        b"Signature: 8a477f597d28d172789f06886806bc55\n",
    )
    .unwrap();
    fs::write(p("cache/blob"), b"cached").unwrap();
    fs::create_dir(p("ign")).unwrap();
    fs::write(p("ign/.bulwarkignore"), b"secret\n").unwrap();
    fs::write(p("ign/secret"), b"ignored").unwrap();
    fs::write(p("ign/kept"), b"kept").unwrap();
}

/// What is left out of the backup of [`craft`]'s tree.
fn left_out(rel: &Path) -> bool {
    let s = rel.to_string_lossy();
    s == "sock" || s == "skip.tmp" || s == "cache/blob" || s == "ign/secret"
}

/// Every entry below `root` (relative paths), directories first.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    let mut names: Vec<_> = fs::read_dir(root.join(rel))
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .collect();
    names.sort();
    for n in names {
        let r = rel.join(&n);
        let md = fs::symlink_metadata(root.join(&r)).unwrap();
        out.push(r.clone());
        if md.is_dir() {
            walk(root, &r, out);
        }
    }
}

/// Every xattr of `p` (not following a link), sorted.
fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: buffers valid for their lengths, NUL-terminated path.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 64 << 10];
        // SAFETY: as above.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(n >= 0, "lgetxattr {}", p.display());
        v.truncate(n as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

/// Data ranges of a file (SEEK_DATA/SEEK_HOLE), merged.
fn data_ranges(f: &fs::File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let size = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: lseek on an open descriptor.
        let d = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        let h = unsafe { libc::lseek(f.as_raw_fd(), d, libc::SEEK_HOLE) };
        out.push((d as u64, h as u64));
        pos = h;
    }
    out
}

/// Same bytes, reading only the data ranges of either file (holes read as
/// zeros in both).
fn same_content(a: &Path, b: &Path) {
    let (fa, fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    assert_eq!(fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    for (s, e) in data_ranges(&fa).into_iter().chain(data_ranges(&fb)) {
        for at in (s..e).step_by(1 << 20) {
            let n = (1u64 << 20).min(e - at) as usize;
            let (mut x, mut y) = (vec![0u8; n], vec![0u8; n]);
            fa.read_exact_at(&mut x, at).unwrap();
            fb.read_exact_at(&mut y, at).unwrap();
            assert!(x == y, "{} differs at {at}", b.display());
        }
    }
}

/// Compares the trees entry by entry: type, mode, owner, size, mtime (ns),
/// device number, link target, xattrs, content, hard-link groups. Returns
/// the number of entries compared.
fn compare(src: &Path, dst: &Path) -> usize {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    walk(src, Path::new(""), &mut a);
    walk(dst, Path::new(""), &mut b);
    a.retain(|r| !left_out(r));
    assert_eq!(a, b, "the restored tree has other entries");
    let mut groups: HashMap<u64, u64> = HashMap::new();
    for r in &a {
        let (pa, pb) = (src.join(r), dst.join(r));
        let (ma, mb) = (
            fs::symlink_metadata(&pa).unwrap(),
            fs::symlink_metadata(&pb).unwrap(),
        );
        let what = r.display();
        assert_eq!(ma.mode(), mb.mode(), "{what}: mode");
        assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "{what}: owner");
        assert_eq!(ma.rdev(), mb.rdev(), "{what}: rdev");
        if !ma.is_dir() {
            assert_eq!(ma.size(), mb.size(), "{what}: size");
        }
        assert_eq!(
            (ma.mtime(), ma.mtime_nsec()),
            (mb.mtime(), mb.mtime_nsec()),
            "{what}: mtime"
        );
        assert_eq!(xattrs(&pa), xattrs(&pb), "{what}: xattrs");
        if ma.is_symlink() {
            assert_eq!(fs::read_link(&pa).unwrap(), fs::read_link(&pb).unwrap());
        } else if ma.is_file() {
            same_content(&pa, &pb);
            if ma.nlink() > 1 {
                let g = groups.entry(ma.ino()).or_insert(mb.ino());
                assert_eq!(*g, mb.ino(), "{what}: hard link group");
                assert_eq!(ma.nlink(), mb.nlink(), "{what}: links");
            }
        }
    }
    a.len()
}

#[test]
fn a_crafted_tree_round_trips_with_all_metadata_and_unchanged_files_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let bw = runner(dir.path());
    let src = dir.path().join("src");
    craft(&src);
    let s = src.to_str().unwrap();
    let backup = |extra: &[&str]| {
        let mut args = vec![
            "backup",
            "files",
            s,
            "--source",
            "host",
            "--exclude",
            "*.tmp",
            "--json",
        ];
        args.extend_from_slice(extra);
        bw.json(&args)
    };
    let first = backup(&[]);
    let files = SMALL_FILES as u64 + 13;
    assert_eq!(first["files"], files, "{first}");
    assert_eq!(first["sockets_skipped"], 1);
    assert_eq!(first["errors"].as_array().unwrap().len(), 0, "{first}");
    assert_eq!(first["bytes_reused"], 0);
    // Holes are not read: about 1 MiB of the 10 GiB file.
    let read = first["bytes_read"].as_u64().unwrap();
    assert!(read > 1 << 20 && read < 4 << 20, "{first}");

    let out = dir.path().join("out");
    let r = bw.json(&[
        "restore",
        "files",
        "host@latest",
        "--to",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r}");
    let restored = out.join(src.strip_prefix("/").unwrap());
    let n = compare(&src, &restored);
    assert!(n > SMALL_FILES + 100, "{n} entries compared");
    let blocks = fs::metadata(restored.join("sparse")).unwrap().blocks();
    assert!(
        blocks * 512 < 8 << 20,
        "the sparse file restored sparse ({blocks} blocks)"
    );
    assert_eq!(
        fs::read(restored.join("cache/CACHEDIR.TAG")).unwrap().len(),
        44
    );
    let names = |p: &str| -> Vec<Vec<u8>> {
        xattrs(&restored.join(p))
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    };
    assert!(names("cap").contains(&b"security.capability".to_vec()));
    assert!(names("acl").contains(&b"system.posix_acl_access".to_vec()));
    assert!(names("acldir").contains(&b"system.posix_acl_default".to_vec()));
    assert!(names("attrs").contains(&b"security.bulwark".to_vec()));

    // Unchanged: nothing read, everything reused.
    let second = backup(&[]);
    assert_eq!(second["bytes_read"], 0, "{second}");
    assert_eq!(second["files_reused"], files);
    assert_eq!(second["bytes_reused"], first["bytes"]);
    // Attributes changed (the ctime moves, not the mtime): the backup
    // reads those two files again (9 bytes), takes the changed xattrs and
    // ACL, and carries every other entry's over from the catalog; the
    // restore equals the tree.
    let q = |p: &str| src.join(p).display().to_string();
    sh(&format!(
        "setfattr -n user.color -v green '{a}'
         setfattr -x security.bulwark '{a}'
         setfacl -m u:nobody:r '{acl}'",
        a = q("attrs"),
        acl = q("acl"),
    ));
    let attrs = backup(&[]);
    assert_eq!(attrs["bytes_read"], 9, "{attrs}");
    let out2 = dir.path().join("out2");
    bw.ok(&[
        "restore",
        "files",
        "host@latest",
        "--to",
        out2.to_str().unwrap(),
    ]);
    let restored2 = out2.join(src.strip_prefix("/").unwrap());
    assert_eq!(compare(&src, &restored2), n);
    assert_eq!(
        xattrs(&restored2.join("attrs")),
        vec![(b"user.color".to_vec(), b"green".to_vec())]
    );
    // One file changed: only it is read.
    fs::write(src.join("a/x/linked"), b"one inode, three names, longer").unwrap();
    let third = backup(&[]);
    assert_eq!(third["bytes_read"], 30, "{third}");
    assert_eq!(third["files_reused"], files - 1);
    // --reread reads everything again.
    let fourth = backup(&["--reread"]);
    assert_eq!(fourth["bytes_reused"], 0);
    assert_eq!(fourth["bytes_read"].as_u64(), Some(read + 8), "{fourth}");

    // One file out of the latest snapshot, by path.
    let one = dir.path().join("one");
    let want = src.join("a/x/linked");
    bw.ok(&[
        "restore",
        "files",
        "host@latest",
        want.to_str().unwrap(),
        "--to",
        one.to_str().unwrap(),
    ]);
    let got = one.join(want.strip_prefix("/").unwrap());
    assert_eq!(fs::read(got).unwrap(), b"one inode, three names, longer");
    assert!(!one
        .join(src.strip_prefix("/").unwrap())
        .join("sparse")
        .exists());
}

#[test]
fn an_unreadable_file_makes_a_partial_snapshot_and_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let bw = runner(dir.path());
    // The repository is written by `nobody`.
    sh(&format!(
        "chown -R nobody '{}'",
        dir.path().join("repo").display()
    ));
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("closed")).unwrap();
    fs::write(src.join("open"), b"readable").unwrap();
    fs::write(src.join("secret"), b"root only").unwrap();
    fs::write(src.join("closed/inside"), b"root only").unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(src.join("closed"), fs::Permissions::from_mode(0o700)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_bulwark"))
        .args([
            "backup",
            "files",
            src.to_str().unwrap(),
            "--source",
            "p",
            "--json",
        ])
        .env("BULWARK_REPO", dir.path().join("repo"))
        .env("BULWARK_PASSWORD", PW)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["partial"], true);
    assert_eq!(v["files"], 1, "{v}");
    let errs: Vec<String> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect();
    let want = [src.join("closed"), src.join("secret")].map(|p| p.display().to_string());
    assert_eq!(errs.len(), 2, "{errs:?}");
    for w in &want {
        assert!(errs.contains(w), "{w} not listed: {errs:?}");
    }
    // The manifest says so too; the rest restores.
    let snaps = bw.json(&["snapshots", "--json"]);
    assert_eq!(snaps[0]["files"]["partial"], true, "{snaps}");
    let to = dir.path().join("out");
    bw.ok(&[
        "restore",
        "files",
        v["snapshot"].as_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ]);
    let base = to.join(src.strip_prefix("/").unwrap());
    assert_eq!(fs::read(base.join("open")).unwrap(), b"readable");
    assert!(!base.join("secret").exists());
}

#[test]
fn a_file_changing_while_read_is_read_again_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bw = runner(dir.path());
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let busy = src.join("busy");
    fs::write(&busy, vec![7u8; 64 << 20]).unwrap();
    fs::write(src.join("calm"), b"calm").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, busy) = (stop.clone(), busy.clone());
        std::thread::spawn(move || {
            let f = fs::OpenOptions::new().write(true).open(&busy).unwrap();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all_at(&i.to_le_bytes(), (i * 4096) % (64 << 20))
                    .unwrap();
                i += 1;
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    let out = bw.run(&[
        "backup",
        "files",
        src.to_str().unwrap(),
        "--source",
        "c",
        "--json",
    ]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errs = v["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 1, "{v}");
    assert_eq!(errs[0]["path"], busy.display().to_string());
    assert!(errs[0]["error"]
        .as_str()
        .unwrap()
        .contains("changed while being read"));
    // Read three times, kept once.
    assert!(v["bytes_read"].as_u64().unwrap() >= 3 * (64 << 20), "{v}");
    assert_eq!(v["files"], 2);
}

#[test]
fn a_file_snapshot_is_browsed_with_files_and_mount() {
    let dir = tempfile::tempdir().unwrap();
    let bw = runner(dir.path());
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("etc/ssh")).unwrap();
    fs::write(src.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    fs::write(src.join("etc/ssh/sshd_config"), b"Port 22\n").unwrap();
    std::os::unix::fs::symlink("hosts", src.join("etc/hosts.link")).unwrap();
    bw.ok(&["backup", "files", src.to_str().unwrap(), "--source", "b"]);
    let etc = src.join("etc").display().to_string();
    let ls = bw.ok(&["files", "ls", "b@latest", &etc]);
    let names: Vec<&str> = ls.lines().collect();
    let want = ["hosts", "hosts.link", "ssh/"].map(|n| format!("{etc}/{n}"));
    assert_eq!(names, want, "{ls}");
    let found = bw.ok(&["files", "find", "b@latest", "*_config"]);
    assert_eq!(found.trim(), format!("{etc}/ssh/sshd_config"));
    let got = bw
        .cmd(&[
            "files",
            "get",
            "b@latest",
            &format!("{etc}/hosts"),
            "--stdout",
        ])
        .output()
        .unwrap();
    assert_eq!(got.stdout, b"127.0.0.1 localhost\n");
    // The tree as a read-only mount.
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    bw.ok(&["mount", "b@latest", mnt.to_str().unwrap()]);
    let inside = mnt.join(src.strip_prefix("/").unwrap()).join("etc");
    let read = fs::read(inside.join("ssh/sshd_config"));
    let link = fs::read_link(inside.join("hosts.link"));
    let write = fs::write(inside.join("new"), b"x");
    bw.ok(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(read.unwrap(), b"Port 22\n");
    assert_eq!(link.unwrap(), Path::new("hosts"));
    assert!(write.is_err(), "the mount is read-only");
}
