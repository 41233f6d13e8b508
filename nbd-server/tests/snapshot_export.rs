//! `bulwark-nbd serve` on a real repository, read by real NBD peers.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::{expected_map, test_image, write_sparse};
use store::{
    BackupOptions, BackupSession, ChunkerParams, ImageFile, KdfParams, LocalBackend, Mode,
    RepoConfig, Repository, Secret, SnapshotMeta,
};

const PW: &str = "nbd test";

/// Backs up `image` into a new repository under `dir`; returns the snapshot id.
fn make_repo(dir: &Path, image: &Path) -> String {
    let cfg = RepoConfig {
        chunker: ChunkerParams {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        },
        pack_size: 2 << 20,
        ..RepoConfig::default()
    };
    let kdf = KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    };
    let backend = Arc::new(LocalBackend::new(dir.join("repo")));
    let repo = Repository::init(backend, &Secret::Passphrase(PW.into()), &kdf, cfg).unwrap();
    let mut s = BackupSession::new(&repo, &BackupOptions::default()).unwrap();
    s.backup_disk("vda", &mut ImageFile::open(image).unwrap(), Mode::Full)
        .unwrap();
    let snap = s
        .finish(SnapshotMeta {
            source: "t".into(),
            ..Default::default()
        })
        .unwrap();
    snap.id.to_hex()
}

struct Served {
    child: Child,
    uri: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, snapshot: &str) -> Served {
    let socket = dir.join("nbd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulwark-nbd"))
        .args(["serve", "--snapshot", snapshot, "--socket"])
        .arg(&socket)
        .arg("--repo")
        .arg(dir.join("repo"))
        .env("BULWARK_PASSWORD", PW)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "bulwark-nbd did not start");
    Served {
        child,
        uri: format!("nbd+unix:///vda?socket={}", socket.display()),
    }
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install libnbd-bin qemu-utils): {e}"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn real_peers_read_a_snapshot() {
    let dir = tempfile::Builder::new()
        .prefix("bw-nbd-")
        .tempdir()
        .unwrap();
    let (data, holes) = test_image();
    let src = dir.path().join("source.raw");
    write_sparse(&src, &data, &holes);
    let snap = make_repo(dir.path(), &src);
    let served = serve(dir.path(), &snap[..10]);

    let list = ok("nbdinfo", &["--list", &served.uri]);
    assert!(
        list.contains("export=\"vda\"") && list.contains(&format!("export-size: {}", data.len())),
        "{list}"
    );
    let map = ok("nbdinfo", &["--map", &served.uri]);
    let got: Vec<(u64, u64, bool)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse::<u32>().unwrap() & 1 != 0,
            )
        })
        .collect();
    assert_eq!(got, expected_map(data.len() as u64, &holes), "{map}");

    let copy = dir.path().join("copy.raw");
    ok("nbdcopy", &[&served.uri, copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap() == data, "nbdcopy differs");
    let cmp = ok(
        "qemu-img",
        &["compare", "-f", "raw", src.to_str().unwrap(), &served.uri],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");

    if Path::new("/dev/fuse").exists() {
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut fuse = Command::new("nbdfuse")
            .arg(&mnt)
            .arg(&served.uri)
            .spawn()
            .unwrap();
        let file = mnt.join("nbd");
        let mut content = None;
        for _ in 0..100 {
            if std::fs::metadata(&file).is_ok_and(|m| m.len() == data.len() as u64) {
                content = std::fs::read(&file).ok();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = Command::new("fusermount3").arg("-uz").arg(&mnt).status();
        let _ = fuse.wait();
        assert!(content.expect("nbdfuse exposes the export") == data);
    } else {
        eprintln!("SKIP nbdfuse: /dev/fuse missing");
    }
}

#[test]
fn damaged_chunk_is_eio_and_server_stays_up() {
    let dir = tempfile::Builder::new()
        .prefix("bw-nbd-")
        .tempdir()
        .unwrap();
    let (data, holes) = test_image();
    let src = dir.path().join("source.raw");
    write_sparse(&src, &data, &holes);
    let snap = make_repo(dir.path(), &src);
    // Damage every pack a little.
    let mut packs = vec![];
    for e in walkdir(&dir.path().join("repo/data")) {
        packs.push(e);
    }
    let p = &packs[0];
    let mut b = std::fs::read(p).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    std::fs::write(p, &b).unwrap();
    let served = serve(dir.path(), &snap);
    let copy = dir.path().join("copy.raw");
    let o = run("nbdcopy", &[&served.uri, copy.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "nbdcopy of a damaged snapshot must fail"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Input/output error") || err.contains("EIO"),
        "{err}"
    );
    // Still serving.
    let list = ok("nbdinfo", &["--list", &served.uri]);
    assert!(list.contains("export=\"vda\""));
}

fn walkdir(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}
