//! `bulwark files` end to end: disks with MBR and GPT partitions, LVM
//! volumes and ext4, XFS, FAT and NTFS filesystems made by the real tools
//! and filled with known files are backed up; `ls`, `find` and `get` (to a
//! directory, stdout, tar, zip), run as an unprivileged user, must return
//! every file with identical bytes and the stated metadata, and refuse
//! what could escape the target directory. A damaged image ends in a clear
//! error. Snapshots in S3 are read the same way, fetching only what a
//! listing needs.
//!
//! Needs root (to make the images: loop devices, an ntfs-3g mount) and the
//! packages of scripts/setup-test-host.sh.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use testbed::cli::{stderr, Runner};
use testbed::fsimage::{self, Caps};

const PW: &str = "files test passphrase";
/// The unprivileged user the commands run as.
const NOBODY: u32 = 65534;

struct Env {
    dir: tempfile::TempDir,
    bw: Runner,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bw = Runner::new(env!("CARGO_BIN_EXE_bulwark"))
            .env("BULWARK_REPO", dir.path().join("repo"))
            .env("BULWARK_PASSWORD", PW);
        bw.ok(&["repo", "init"]);
        Env { dir, bw }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Backs up `image` as disk `disk` of source `source`; the snapshot id,
    /// then opens the repository to everyone (the commands under test run
    /// as nobody).
    fn backup(&self, image: &Path, source: &str, disk: &str) -> String {
        let v = self.bw.json(&[
            "backup",
            "image",
            image.to_str().unwrap(),
            "--source",
            source,
            "--disk",
            disk,
            "--json",
        ]);
        let status = std::process::Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(self.path("repo"))
            .status()
            .unwrap();
        assert!(status.success());
        v["snapshot"].as_str().unwrap().to_string()
    }

    /// `bulwark ARGS` as nobody.
    fn as_nobody(&self, args: &[&str]) -> Output {
        let home = self.path("home");
        std::fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
        let mut all = vec![
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            env!("CARGO_BIN_EXE_bulwark"),
        ];
        all.extend_from_slice(args);
        Runner::new("setpriv")
            .env("BULWARK_REPO", self.path("repo"))
            .env("BULWARK_PASSWORD", PW)
            .env("HOME", &home)
            .env("BULWARK_CACHE_DIR", home.join("cache"))
            .run(&all)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.as_nobody(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let s = self.ok(args);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"))
    }

    /// A directory nobody may write into.
    fn out_dir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::create_dir(&p).unwrap();
        std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
        p
    }
}

/// A source tree with the known files.
fn known(dir: &Path, caps: Caps) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    fsimage::populate(dir, caps).unwrap();
    dir.to_path_buf()
}

/// `ls --recursive --json` against the source: every path, type, size,
/// and where kept mode, owner and mtime.
fn check_listing(e: &Env, snap: &str, vol: &str, src: &Path, caps: Caps) {
    let v = e.json(&["files", "ls", snap, vol, "--recursive", "--json"]);
    let listed: BTreeMap<String, &Value> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["path"]
                    .as_str()
                    .unwrap()
                    .strip_prefix(&format!("{vol}/"))
                    .unwrap()
                    .to_string(),
                x,
            )
        })
        .filter(|(p, _)| !p.starts_with("lost+found"))
        .collect();
    let want: Vec<String> = fsimage::walk(src)
        .unwrap()
        .iter()
        .map(|p| p.strip_prefix(src).unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listed.keys().cloned().collect::<Vec<_>>(),
        want,
        "{vol}: paths"
    );
    for (rel, x) in &listed {
        let m = std::fs::symlink_metadata(src.join(rel)).unwrap();
        let ty = if m.is_dir() {
            "dir"
        } else if m.file_type().is_symlink() {
            "symlink"
        } else {
            "file"
        };
        assert_eq!(x["type"], ty, "{vol}/{rel}");
        if ty == "file" {
            assert_eq!(x["size"], m.len(), "{vol}/{rel}");
        }
        if ty == "symlink" {
            let t = std::fs::read_link(src.join(rel)).unwrap();
            assert_eq!(x["target"], t.to_str().unwrap(), "{vol}/{rel}");
        }
        if caps.posix && ty != "symlink" {
            assert_eq!(
                x["mode"],
                format!("{:04o}", m.mode() & 0o7777),
                "{vol}/{rel}"
            );
            assert_eq!(
                (&x["uid"], &x["gid"]),
                (&Value::from(m.uid()), &Value::from(m.gid())),
                "{vol}/{rel}"
            );
        }
        if caps.mtime_step > 0 && ty != "symlink" && ty != "dir" {
            let t = chrono::DateTime::parse_from_rfc3339(x["mtime"].as_str().unwrap()).unwrap();
            let got = t.timestamp() as i128 * 1_000_000_000 + t.timestamp_subsec_nanos() as i128;
            let want = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
            let step = caps.mtime_step as i128;
            assert_eq!(got / step, want / step, "{vol}/{rel}: mtime");
        }
    }
}

/// `get VOL --to DIR`: the tree back, less what must be refused.
fn check_get(e: &Env, snap: &str, vol: &str, src: &Path, caps: Caps, name: &str) {
    let out = e.out_dir(name);
    let r = e.as_nobody(&["files", "get", snap, vol, "--to", out.to_str().unwrap()]);
    let err = stderr(&r);
    assert!(!err.contains("panicked"), "{err}");
    let top = out.join(vol.rsplit('/').next().unwrap());
    let mut skip = vec!["lost+found"];
    if caps.posix {
        assert_eq!(
            r.status.code(),
            Some(1),
            "refusals make the exit code 1: {err}"
        );
        for l in ["link-abs", "link-up"] {
            assert!(err.contains(&format!("refused: {vol}/{l}")), "{err}");
            assert!(!top.join(l).exists());
            skip.push(l);
        }
    } else {
        assert!(r.status.success(), "{err}");
    }
    if top.join("lost+found").exists() {
        std::fs::remove_dir(top.join("lost+found")).unwrap();
    }
    let n = fsimage::compare_trees(src, &top, caps, &skip, false).unwrap();
    assert!(n > 0, "{n} entries compared");
    if caps.hardlinks {
        let (a, b) = (
            top.join("hard1").metadata().unwrap(),
            top.join("hard2").metadata().unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "hard links are linked again");
    }
    if caps.big_sparse {
        let m = top.join("big-sparse.img").metadata().unwrap();
        assert_eq!(m.len(), fsimage::BIG_SPARSE);
        assert!(
            m.blocks() * 512 < 1 << 20,
            "holes stay holes: {} blocks",
            m.blocks()
        );
    }
}

/// GPT disk: vfat and ext4 partitions. MBR disk: NTFS and an LVM PV with
/// ext4 and XFS volumes. Everything listed, found and copied back.
#[test]
fn ls_find_get_every_filesystem_as_nobody() {
    let e = Env::new();
    let t = e.path("work");
    let fat_src = t.join("fat");
    std::fs::create_dir_all(&fat_src).unwrap();
    std::fs::write(fat_src.join("boot.cfg"), b"timeout=1\n").unwrap();
    let ext4_src = known(&t.join("ext4"), fsimage::EXT4);
    let xfs_src = known(&t.join("xfs"), fsimage::XFS);
    let ntfs_src = known(&t.join("ntfs"), fsimage::NTFS);

    let img = |n: &str| t.join(n);
    fsimage::vfat(&fat_src, &img("fat.img"), 40 << 20, "EFI").unwrap();
    fsimage::ext4(&ext4_src, &img("ext4.img"), 64 << 20, "root", &[]).unwrap();
    fsimage::xfs(&xfs_src, &img("xfs.img"), 320 << 20, "data").unwrap();
    fsimage::ext4(&xfs_src, &img("lvroot.img"), 64 << 20, "lvroot", &[]).unwrap();
    fsimage::ntfs(&ntfs_src, &img("ntfs.img"), 64 << 20, "win").unwrap();

    let vda = img("vda.img");
    fsimage::make_file(&vda, 120 << 20).unwrap();
    let off = fsimage::partition(&vda, "gpt", &[(40, "U"), (64, "L")]).unwrap();
    fsimage::place(&img("fat.img"), &vda, off[0]).unwrap();
    fsimage::place(&img("ext4.img"), &vda, off[1]).unwrap();

    let vdb = img("vdb.img");
    fsimage::make_file(&vdb, 520 << 20).unwrap();
    let off = fsimage::partition(&vdb, "dos", &[(64, "7"), (440, "8e")]).unwrap();
    fsimage::place(&img("ntfs.img"), &vdb, off[0]).unwrap();
    let vg = format!("bwf{}", std::process::id());
    let lvs = fsimage::lvm(&vdb, off[1], 440 << 20, &vg, &[("root", 64), ("data", 320)]).unwrap();
    let at: HashMap<String, u64> = lvs.into_iter().map(|l| (l.name, l.offset)).collect();
    fsimage::place(&img("lvroot.img"), &vdb, at[&format!("{vg}/root")]).unwrap();
    fsimage::place(&img("xfs.img"), &vdb, at[&format!("{vg}/data")]).unwrap();

    let a = e.backup(&vda, "vm-a", "vda");
    let b = e.backup(&vdb, "vm-b", "vdb");

    // Volumes.
    let vols = |snap: &str| -> Vec<(String, String, String)> {
        e.json(&["files", "ls", snap, "--json"])["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
                (s("path"), s("content"), s("label"))
            })
            .collect()
    };
    let s = |p: &str, c: &str, l: &str| (p.to_string(), c.to_string(), l.to_string());
    assert_eq!(
        vols(&a),
        vec![
            s("vda", "gpt", ""),
            s("vda/p1", "vfat", "EFI"),
            s("vda/p2", "ext4", "root")
        ]
    );
    assert_eq!(
        vols(&b),
        vec![
            s("vdb", "mbr", ""),
            s("vdb/p1", "ntfs", "win"),
            s("vdb/p2", "lvm2-pv", ""),
            s(&format!("vdb/lvm/{vg}/root"), "ext4", "lvroot"),
            s(&format!("vdb/lvm/{vg}/data"), "xfs", "data"),
        ]
    );
    let table = e.ok(&["files", "ls", &a]);
    assert!(
        table.contains("vda/p2") && table.contains("ext4") && table.contains("root"),
        "{table}"
    );

    // One directory, plain and long.
    let plain = e.ok(&["files", "ls", &a, "vda/p2/dir"]);
    assert_eq!(plain, "vda/p2/dir/exec.sh\nvda/p2/dir/nested/\n");
    let long = e.ok(&["files", "ls", &a, "vda/p2/dir", "--long"]);
    assert!(
        long.contains("-rwxr-xr-x")
            && long.contains("2020-09-13 12:26:40")
            && long.contains("vda/p2/dir/exec.sh"),
        "{long}"
    );
    let link = e.ok(&["files", "ls", &a, "vda/p2/link-rel", "-l"]);
    assert!(
        link.trim_end().ends_with("vda/p2/link-rel -> dir/exec.sh"),
        "{link}"
    );

    // Every entry with its metadata.
    let lv = |n: &str| format!("vdb/lvm/{vg}/{n}");
    check_listing(&e, &a, "vda/p2", &ext4_src, fsimage::EXT4);
    check_listing(&e, &a, "vda/p1", &fat_src, fsimage::VFAT);
    check_listing(&e, &b, "vdb/p1", &ntfs_src, fsimage::NTFS);
    check_listing(&e, &b, &lv("data"), &xfs_src, fsimage::XFS);
    // ext4 filled from the tree made for XFS (no hard links, no big file).
    let lvroot = Caps {
        hardlinks: false,
        big_sparse: false,
        ..fsimage::EXT4
    };
    check_listing(&e, &b, &lv("root"), &xfs_src, lvroot);

    // find: names, whole paths, one subtree.
    let found = e.ok(&["files", "find", &b, "file-00?.txt"]);
    let lines: Vec<&str> = found.lines().collect();
    assert_eq!(
        lines.len(),
        30,
        "10 names on each of three filesystems: {found}"
    );
    assert!(lines.contains(&format!("{}/many/file-007.txt", lv("data")).as_str()));
    let found = e.ok(&["files", "find", &a, "vda/p2/dir/*/deep"]);
    assert_eq!(found, "vda/p2/dir/nested/deep/\n");
    let found = e.json(&["files", "find", &b, "*.txt", "--in", "vdb/p1", "--json"]);
    assert_eq!(
        found["entries"].as_array().unwrap().len(),
        202,
        "hello.txt, the UTF-8 name, 200 in many/"
    );

    // get: whole volumes back, bit for bit.
    check_get(&e, &a, "vda/p2", &ext4_src, fsimage::EXT4, "out-ext4");
    check_get(&e, &a, "vda/p1", &fat_src, fsimage::VFAT, "out-fat");
    check_get(&e, &b, "vdb/p1", &ntfs_src, fsimage::NTFS, "out-ntfs");
    check_get(&e, &b, &lv("data"), &xfs_src, fsimage::XFS, "out-xfs");
    check_get(&e, &b, &lv("root"), &xfs_src, lvroot, "out-lvroot");

    // Nothing is overwritten.
    let again = e.as_nobody(&[
        "files",
        "get",
        &a,
        "vda/p2/hello.txt",
        "--to",
        e.path("out-ext4/p2").to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(
        std::fs::read(e.path("out-ext4/p2/hello.txt")).unwrap(),
        b"hello world\n"
    );

    // --stdout: one file's bytes.
    let out = e.as_nobody(&[
        "files",
        "get",
        &a,
        &format!("vda/p2/{}", fsimage::UTF8_NAME),
        "--stdout",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, "grüße\n".as_bytes());
    let out = e.as_nobody(&["files", "get", &a, "vda/p2/dir", "--stdout"]);
    assert!(
        !out.status.success() && stderr(&out).contains("not a file"),
        "{}",
        stderr(&out)
    );

    // --tar and --zip: unpacked by tar and Python, the same tree.
    let tar = e.path("out.tar");
    let zip = e.path("out.zip");
    let out_dir = e.out_dir("archives");
    e.ok(&[
        "files",
        "get",
        &a,
        "vda/p2/dir",
        "--tar",
        out_dir.join("dir.tar").to_str().unwrap(),
    ]);
    e.ok(&[
        "files",
        "get",
        &a,
        "vda/p2/dir",
        "--zip",
        out_dir.join("dir.zip").to_str().unwrap(),
    ]);
    std::fs::rename(out_dir.join("dir.tar"), &tar).unwrap();
    std::fs::rename(out_dir.join("dir.zip"), &zip).unwrap();
    let untar = e.path("untar");
    std::fs::create_dir(&untar).unwrap();
    let st = std::process::Command::new("tar")
        .args(["-xpf"])
        .arg(&tar)
        .arg("-C")
        .arg(&untar)
        .status()
        .unwrap();
    assert!(st.success());
    fsimage::compare_trees(
        &ext4_src.join("dir"),
        &untar.join("dir"),
        Caps {
            mtime_step: 1_000_000_000,
            ..fsimage::EXT4
        },
        &[],
        true,
    )
    .unwrap();
    let unzip = e.path("unzip");
    let st = std::process::Command::new("/usr/bin/python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&zip)
        .arg(&unzip)
        .status()
        .unwrap();
    assert!(st.success());
    let bytes_only = Caps {
        posix: false,
        hardlinks: false,
        big_sparse: false,
        mtime_step: 0,
    };
    fsimage::compare_trees(
        &ext4_src.join("dir"),
        &unzip.join("dir"),
        bytes_only,
        &[],
        false,
    )
    .unwrap();

    // Paths that name nothing.
    for (path, says) in [
        ("vdc/p1", "no such disk"),
        ("vda/p2/nope", "no such file"),
        ("vda/p9", "no such"),
    ] {
        let out = e.as_nobody(&["files", "ls", &a, path]);
        assert!(
            !out.status.success() && stderr(&out).contains(says),
            "{path}: {}",
            stderr(&out)
        );
    }
}

/// A damaged filesystem in a snapshot: listings end in an error naming
/// the damage, in bounded time, and other volumes still list.
#[test]
fn damaged_image_ends_in_a_clear_error() {
    let e = Env::new();
    let t = e.path("work");
    let src = known(
        &t.join("src"),
        Caps {
            big_sparse: false,
            ..fsimage::EXT4
        },
    );
    let fs = t.join("fs.img");
    fsimage::ext4(&src, &fs, 64 << 20, "root", &["-b", "4096"]).unwrap();
    let disk = t.join("disk.img");
    fsimage::make_file(&disk, 140 << 20).unwrap();
    let off = fsimage::partition(&disk, "gpt", &[(64, "L"), (64, "L")]).unwrap();
    fsimage::place(&fs, &disk, off[0]).unwrap();
    fsimage::place(&fs, &disk, off[1]).unwrap();
    // Partition 2: the inode table and the root directory's block become
    // noise (offsets from dumpe2fs of the same image).
    let dump = std::process::Command::new("dumpe2fs")
        .arg(&fs)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    let table: u64 = dump
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Inode table at ")?
                .split('-')
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    let noise = testbed::fsimage::pattern(64 << 10, 99);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&noise, off[1] + table * 4096).unwrap();
    drop(f);
    let snap = e.backup(&disk, "broken", "vda");

    let vols = e.json(&["files", "ls", &snap, "--json"]);
    assert_eq!(vols["volumes"][1]["content"], "ext4");
    let good = e.ok(&["files", "ls", &snap, "vda/p1"]);
    assert!(good.contains("vda/p1/hello.txt"));
    let started = std::time::Instant::now();
    let out = e.as_nobody(&["files", "ls", &snap, "vda/p2", "-R"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("corrupt") && !err.contains("panicked"),
        "{err}"
    );
    let out = e.as_nobody(&["files", "find", &snap, "*.txt"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let found = String::from_utf8_lossy(&out.stdout);
    assert!(
        found.contains("vda/p1/hello.txt"),
        "the sound volume is still searched: {found}"
    );
    assert!(started.elapsed().as_secs() < 60);
}

/// A snapshot in S3 lists and copies as one in a local directory, and a
/// listing fetches a few spans, not the disk.
#[test]
fn files_from_s3_fetch_only_what_they_need() {
    let server = testbed::s3::S3Server::start().unwrap();
    let bucket = server.create_bucket().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bw = Runner::new(env!("CARGO_BIN_EXE_bulwark"))
        .envs(server.env())
        .env("BULWARK_REPO", format!("s3://{bucket}/files"))
        .env("BULWARK_PASSWORD", PW)
        .env("BULWARK_CACHE_DIR", dir.path().join("cache"))
        .env_remove("BULWARK_S3_ENDPOINT");
    bw.ok(&["repo", "init"]);
    let src = known(
        &dir.path().join("src"),
        Caps {
            big_sparse: false,
            ..fsimage::EXT4
        },
    );
    // 192 MiB of incompressible data beside the known files.
    for i in 0..6 {
        std::fs::write(src.join(format!("blob{i}")), fsimage::pattern(32 << 20, i)).unwrap();
    }
    let img = dir.path().join("disk.img");
    fsimage::ext4(&src, &img, 256 << 20, "root", &[]).unwrap();
    let snap = bw.backup_image(img.to_str().unwrap(), "s3vm")["snapshot"]
        .as_str()
        .unwrap()
        .to_string();

    let out = bw.run(&["files", "ls", &snap, "vda/dir/nested", "-v"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "vda/dir/nested/deep/\n"
    );
    let log = strip_ansi(&stderr(&out));
    let fetched: u64 = log
        .split("bytes_fetched=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        fetched < 48 << 20,
        "a listing fetched {fetched} bytes of a 256 MiB disk"
    );

    let out = bw.run(&[
        "files",
        "get",
        &snap,
        "vda/dir/nested/deep/file.bin",
        "--stdout",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        out.stdout,
        std::fs::read(src.join("dir/nested/deep/file.bin")).unwrap()
    );
}

/// Text without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}
