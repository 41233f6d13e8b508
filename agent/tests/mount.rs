//! `bulwark mount`: a snapshot's disk as a FUSE file, then the admin's path
//! to one file inside it: losetup (with an offset: partition nodes do not
//! appear on these machines) and a read-only ext4 mount.

use std::path::{Path, PathBuf};
use std::process::Command;

const PW: &str = "mount test";

fn sh(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn bulwark(repo: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(args)
        .env("BULWARK_REPO", repo)
        .env("BULWARK_PASSWORD", PW)
        .output()
        .unwrap()
}

/// Undoes whatever got set up, even when an assertion fails.
#[derive(Default)]
struct Cleanup {
    ext4_mount: Option<PathBuf>,
    loop_dev: Option<String>,
    fuse_mount: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(m) = &self.ext4_mount {
            let _ = Command::new("umount").arg(m).status();
        }
        if let Some(l) = &self.loop_dev {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
        if let Some(f) = &self.fuse_mount {
            let _ = Command::new("fusermount3").arg("-u").arg(f).status();
        }
    }
}

#[test]
fn file_in_ext4_read_through_bulwark_mount() {
    if !Path::new("/dev/fuse").exists() || unsafe { libc::getuid() } != 0 {
        eprintln!("SKIP: needs root and /dev/fuse");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("bw-mount-")
        .tempdir()
        .unwrap();
    let d = |n: &str| dir.path().join(n);
    // An ext4 file system holding a file, in partition 1 of an MBR disk.
    std::fs::create_dir(d("content")).unwrap();
    let secret: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(d("content/report.bin"), &secret).unwrap();
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            d("content").to_str().unwrap(),
            d("fs.img").to_str().unwrap(),
            "16M",
        ],
    );
    let disk = d("disk.raw");
    sh("truncate", &["-s", "20M", disk.to_str().unwrap()]);
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, size=32768, type=83\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    sh(
        "dd",
        &[
            &format!("if={}", d("fs.img").display()),
            &format!("of={}", disk.display()),
            "bs=1M",
            "seek=1",
            "conv=notrunc,sparse",
            "status=none",
        ],
    );

    let repo = d("repo");
    assert!(bulwark(&repo, &["repo", "init"]).status.success());
    let b = bulwark(
        &repo,
        &["backup", "image", disk.to_str().unwrap(), "--source", "fs"],
    );
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    // The source disk is gone: only the repository has the file now.
    std::fs::remove_file(&disk).unwrap();

    let mut cleanup = Cleanup::default();
    let mnt = d("snap");
    std::fs::create_dir(&mnt).unwrap();
    let m = bulwark(&repo, &["mount", "fs@latest", mnt.to_str().unwrap()]);
    assert!(
        m.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&m.stderr)
    );
    cleanup.fuse_mount = Some(mnt.clone());
    let raw = mnt.join("vda.raw");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 20 << 20);
    // Writes are refused.
    assert!(std::fs::OpenOptions::new().write(true).open(&raw).is_err());

    let dev = sh(
        "losetup",
        &[
            "-r",
            "-o",
            "1048576",
            "--sizelimit",
            "16777216",
            "-f",
            "--show",
            raw.to_str().unwrap(),
        ],
    );
    cleanup.loop_dev = Some(dev.clone());
    let fsmnt = d("fs");
    std::fs::create_dir(&fsmnt).unwrap();
    sh("mount", &["-o", "ro", &dev, fsmnt.to_str().unwrap()]);
    cleanup.ext4_mount = Some(fsmnt.clone());
    let got = std::fs::read(fsmnt.join("report.bin")).unwrap();
    assert!(got == secret, "file read through the snapshot differs");

    sh("umount", &[fsmnt.to_str().unwrap()]);
    cleanup.ext4_mount = None;
    sh("losetup", &["-d", &dev]);
    cleanup.loop_dev = None;
    let u = bulwark(&repo, &["umount", mnt.to_str().unwrap()]);
    assert!(
        u.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&u.stderr)
    );
    cleanup.fuse_mount = None;
    assert!(!mnt.join("vda.raw").exists());
}
