//! The readers against images made by the real tools: every known file
//! comes back with its bytes, type, symlink target, mode, owner and mtime
//! (as far as the filesystem keeps them), in whole-disk filesystems, MBR
//! and GPT partitions and LVM logical volumes.
//!
//! Needs root (ntfs-3g FUSE mount, loop devices for LVM) and the packages
//! of scripts/setup-test-host.sh.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use fsread::{Content, Kind, Node, ReadAt, Tree};
use testbed::fsimage::{self, Caps};

fn open(path: &Path) -> Arc<dyn ReadAt> {
    Arc::new(std::fs::File::open(path).unwrap())
}

/// Walks `tree` from `dir` next to `src` and checks every entry; the
/// number of entries checked.
fn check(tree: &dyn Tree, dir: &Node, src: &Path, caps: Caps) -> usize {
    let entries = tree.list(dir).unwrap();
    let mut names: Vec<String> = entries
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .filter(|n| n != "lost+found")
        .collect();
    names.sort();
    let mut want: Vec<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    want.sort();
    assert_eq!(names, want, "entries of {}", src.display());
    let mut n = 0;
    for e in entries.iter().filter(|e| e.name != b"lost+found") {
        let p = src.join(String::from_utf8(e.name.clone()).unwrap());
        let m = std::fs::symlink_metadata(&p).unwrap();
        let meta = &e.node.meta;
        let what = p.display();
        n += 1;
        if m.file_type().is_symlink() {
            assert_eq!(meta.kind, Kind::Symlink, "{what}");
            let t = tree.read_link(&e.node).unwrap();
            assert_eq!(
                Path::new(std::str::from_utf8(&t).unwrap()),
                std::fs::read_link(&p).unwrap(),
                "{what}"
            );
            continue;
        }
        if m.is_dir() {
            assert_eq!(meta.kind, Kind::Dir, "{what}");
            n += check(tree, &e.node, &p, caps);
        } else {
            assert_eq!(meta.kind, Kind::File, "{what}");
            assert_eq!(meta.size, m.len(), "{what}");
            assert!(same_bytes(tree, &e.node, &p), "{what}: content");
        }
        if caps.posix {
            assert_eq!(meta.mode, m.mode() & 0o7777, "{what}: mode");
            assert_eq!(
                (meta.uid, meta.gid),
                (Some(m.uid()), Some(m.gid())),
                "{what}: owner"
            );
        }
        if caps.mtime_step > 0 {
            let t = meta.mtime.unwrap();
            let got = t.secs as i128 * 1_000_000_000 + t.nsec as i128;
            let want = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
            let step = caps.mtime_step as i128;
            assert_eq!(got / step, want / step, "{what}: mtime");
        }
    }
    n
}

fn same_bytes(tree: &dyn Tree, node: &Node, p: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).unwrap();
    let (mut a, mut b) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut off = 0u64;
    loop {
        let n = tree.read(node, off, &mut a).unwrap();
        let mut m = 0;
        while m < n {
            match FileExt::read_at(&f, &mut b[m..n], off + m as u64).unwrap() {
                0 => break,
                k => m += k,
            }
        }
        if n != m || a[..n] != b[..n] {
            return false;
        }
        if n == 0 {
            return off == node.meta.size;
        }
        off += n as u64;
    }
}

fn tree_of(vols: &[fsread::Volume], path: &str) -> (Arc<dyn Tree>, Option<String>) {
    let v = vols
        .iter()
        .find(|v| v.path == path)
        .unwrap_or_else(|| panic!("no volume {path}"));
    (v.tree().unwrap(), v.label.clone())
}

/// One filesystem on a whole disk: found, labelled, and every file as made.
fn whole_disk(kind: &'static str, caps: Caps, make: impl Fn(&Path, &Path)) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    fsimage::populate(&src, caps).unwrap();
    let img = t.path().join("disk.img");
    make(&src, &img);
    let vols = fsread::discover(&[("vda".into(), open(&img))]);
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].content, Content::Fs(kind));
    let (tree, label) = tree_of(&vols, "vda");
    assert_eq!(label.as_deref(), Some("KNOWN"));
    let root = tree.root().unwrap();
    let n = check(tree.as_ref(), &root, &src, caps);
    assert!(n > 200, "{n} entries checked");
    if caps.hardlinks {
        let e = tree.list(&root).unwrap();
        let id = |name: &[u8]| e.iter().find(|e| e.name == name).unwrap().node.clone();
        let (a, b) = (id(b"hard1"), id(b"hard2"));
        assert_eq!((a.id, a.meta.nlink), (b.id, 2), "hard links share a node");
    }
}

#[test]
fn ext4_whole_disk() {
    whole_disk("ext4", fsimage::EXT4, |src, img| {
        fsimage::ext4(src, img, 64 << 20, "KNOWN", &[]).unwrap()
    });
}

#[test]
fn ext3_block_maps_and_ext2() {
    whole_disk("ext3", fsimage::EXT4, |src, img| {
        fsimage::ext4(src, img, 64 << 20, "KNOWN", &["-t", "ext3"]).unwrap()
    });
    whole_disk("ext2", fsimage::EXT4, |src, img| {
        fsimage::ext4(src, img, 64 << 20, "KNOWN", &["-t", "ext2"]).unwrap()
    });
}

#[test]
fn xfs_whole_disk() {
    whole_disk("xfs", fsimage::XFS, |src, img| {
        fsimage::xfs(src, img, 320 << 20, "KNOWN").unwrap()
    });
}

#[test]
fn vfat_whole_disk() {
    whole_disk("vfat", fsimage::VFAT, |src, img| {
        fsimage::vfat(src, img, 64 << 20, "KNOWN").unwrap()
    });
}

#[test]
fn ntfs_whole_disk() {
    whole_disk("ntfs", fsimage::NTFS, |src, img| {
        fsimage::ntfs(src, img, 64 << 20, "KNOWN").unwrap()
    });
}

/// GPT with ext4 and XFS; MBR with FAT and an LVM PV holding ext4 and XFS
/// volumes.
#[test]
fn partitions_and_logical_volumes() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    fsimage::populate(&src, fsimage::XFS).unwrap();
    let fs = |name: &str, f: &dyn Fn(&Path)| {
        let p = t.path().join(name);
        f(&p);
        p
    };
    let ext4 = fs("ext4.img", &|p| {
        fsimage::ext4(&src, p, 64 << 20, "ROOT", &[]).unwrap()
    });
    let xfs = fs("xfs.img", &|p| {
        fsimage::xfs(&src, p, 320 << 20, "DATA").unwrap()
    });
    let fat = fs("fat.img", &|p| {
        let plain = t.path().join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::write(plain.join("boot.cfg"), b"timeout=1\n").unwrap();
        fsimage::vfat(&plain, p, 40 << 20, "EFI").unwrap()
    });

    let gpt = t.path().join("gpt.img");
    fsimage::make_file(&gpt, 400 << 20).unwrap();
    let off = fsimage::partition(&gpt, "gpt", &[(64, "L"), (320, "L")]).unwrap();
    fsimage::place(&ext4, &gpt, off[0]).unwrap();
    fsimage::place(&xfs, &gpt, off[1]).unwrap();

    let mbr = t.path().join("mbr.img");
    fsimage::make_file(&mbr, 500 << 20).unwrap();
    let off = fsimage::partition(&mbr, "dos", &[(40, "c"), (440, "8e")]).unwrap();
    fsimage::place(&fat, &mbr, off[0]).unwrap();
    let vg = format!("fsr{}", std::process::id());
    let lvs = fsimage::lvm(&mbr, off[1], 440 << 20, &vg, &[("root", 64), ("data", 320)]).unwrap();
    let at: HashMap<String, u64> = lvs.into_iter().map(|l| (l.name, l.offset)).collect();
    fsimage::place(&ext4, &mbr, at[&format!("{vg}/root")]).unwrap();
    fsimage::place(&xfs, &mbr, at[&format!("{vg}/data")]).unwrap();

    let vols = fsread::discover(&[("vda".into(), open(&gpt)), ("vdb".into(), open(&mbr))]);
    let summary: Vec<(String, String, Option<String>)> = vols
        .iter()
        .map(|v| (v.path.clone(), v.content.name(), v.label.clone()))
        .collect();
    let s = |p: &str, c: &str, l: Option<&str>| (p.to_string(), c.to_string(), l.map(String::from));
    assert_eq!(
        summary,
        vec![
            s("vda", "gpt", None),
            s("vda/p1", "ext4", Some("ROOT")),
            s("vda/p2", "xfs", Some("DATA")),
            s("vdb", "mbr", None),
            s("vdb/p1", "vfat", Some("EFI")),
            s("vdb/p2", "lvm2-pv", None),
            s(&format!("vdb/lvm/{vg}/root"), "ext4", Some("ROOT")),
            s(&format!("vdb/lvm/{vg}/data"), "xfs", Some("DATA")),
        ]
    );
    for path in [
        "vda/p1",
        "vda/p2",
        &format!("vdb/lvm/{vg}/root"),
        &format!("vdb/lvm/{vg}/data"),
    ] {
        let (tree, _) = tree_of(&vols, path);
        // Both were filled from one tree made for XFS's protofile.
        let caps = fsimage::XFS;
        let root = tree.root().unwrap();
        assert!(check(tree.as_ref(), &root, &src, caps) > 200, "{path}");
    }
    let (v, rest) = fsread::resolve(&vols, &format!("vdb/lvm/{vg}/root/dir/exec.sh")).unwrap();
    assert_eq!(
        (v.path.as_str(), rest.as_str()),
        (format!("vdb/lvm/{vg}/root").as_str(), "dir/exec.sh")
    );
}

/// A block that exists only in the journal (a committed, unreplayed
/// transaction) is what the reader sees.
#[test]
fn ext4_journal_is_replayed_in_memory() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("note.txt"), vec![b'a'; 4096]).unwrap();
    let img = t.path().join("j.img");
    fsimage::ext4(&src, &img, 32 << 20, "KNOWN", &["-b", "4096"]).unwrap();
    let out = std::process::Command::new("debugfs")
        .args(["-R", "bmap /note.txt 0"])
        .arg(&img)
        .output()
        .unwrap();
    let block: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let newer = t.path().join("newer");
    std::fs::write(&newer, vec![b'b'; 4096]).unwrap();
    let script = format!("jo\njw -b {block} {}\njc\n", newer.display());
    let st = std::process::Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(st.success());
    // On disk the block still holds the old bytes...
    let on_disk = fsread::io::read_vec(open(&img).as_ref(), block * 4096, 4096).unwrap();
    assert_eq!(on_disk, vec![b'a'; 4096]);
    // ...the reader sees the journal's.
    let vols = fsread::discover(&[("vda".into(), open(&img))]);
    let (tree, _) = tree_of(&vols, "vda");
    let root = tree.root().unwrap();
    let note = fsread::lookup(tree.as_ref(), root, "note.txt").unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(tree.read(&note, 0, &mut buf).unwrap(), 4096);
    assert_eq!(buf, vec![b'b'; 4096]);
}
