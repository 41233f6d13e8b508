//! QEMU boots the tiny test image straight from a snapshot served by
//! `bulwark-nbd`: a local qcow2 overlay whose backing file is the NBD export
//! takes the guest's writes (the way live restore runs a VM).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_store::{
    BackupOptions, BackupSession, ImageFile, KdfParams, LocalBackend, Mode, RepoConfig, Repository,
    Secret, SnapshotMeta,
};
use testbed::{DiskFormat, Image, QemuVm, VmOptions};

#[test]
fn qemu_boots_from_the_export() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: qemu-system-x86_64 missing (run scripts/setup-test-host.sh)");
        return;
    }
    let image = Image::tiny().expect("build the tiny test image");
    let dir = tempfile::Builder::new()
        .prefix("bw-boot-")
        .tempdir()
        .unwrap();
    let kdf = KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    };
    let repo = Repository::init(
        Arc::new(LocalBackend::new(dir.path().join("repo"))),
        &Secret::Passphrase("boot".into()),
        &kdf,
        RepoConfig::default(),
    )
    .unwrap();
    let mut s = BackupSession::new(&repo, &BackupOptions::default()).unwrap();
    s.backup_disk(
        "vda",
        &mut ImageFile::open(&image.disk(DiskFormat::Raw)).unwrap(),
        Mode::Full,
    )
    .unwrap();
    let snap = s
        .finish(SnapshotMeta {
            source: "tiny".into(),
            ..Default::default()
        })
        .unwrap();

    let socket = dir.path().join("nbd.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_bulwark-nbd"))
        .args(["serve", "--snapshot", &snap.id.to_hex(), "--socket"])
        .arg(&socket)
        .arg("--repo")
        .arg(dir.path().join("repo"))
        .env("BULWARK_PASSWORD", "boot")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");

    // Reference: the same image booted from a local file.
    let mut local = QemuVm::new(&image, VmOptions::default()).unwrap();
    let t = Instant::now();
    local.start().unwrap();
    let r = local.wait_ready(Duration::from_secs(60)).unwrap();
    let local_secs = t.elapsed().as_secs_f64();
    assert_eq!(r.boots, 1);
    drop(local);

    let mut vm = QemuVm::new(&image, VmOptions::default()).unwrap();
    let overlay = vm.disk_path().to_path_buf();
    std::fs::remove_file(&overlay).unwrap();
    let backing = format!("nbd+unix:///vda?socket={}", socket.display());
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = Instant::now();
    vm.start().unwrap();
    let ready = vm.wait_ready(Duration::from_secs(90)).unwrap();
    let nbd_secs = t.elapsed().as_secs_f64();
    assert_eq!(ready.marker, image.marker());
    assert_eq!(
        ready.boots, 1,
        "the snapshot's boot counter, plus this boot"
    );
    eprintln!(
        "boot to ready: local file {local_secs:.1}s, from bulwark-nbd {nbd_secs:.1}s ({:.2}x)",
        nbd_secs / local_secs
    );
    drop(vm);
    let _ = server.kill();
    let _ = server.wait();
}
