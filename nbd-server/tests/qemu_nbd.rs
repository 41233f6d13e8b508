//! Our client against `qemu-nbd -r -B BITMAP`: dirty-bitmap and allocation
//! block status, and reads, on a qcow2 whose bitmap was added offline, the
//! way Bulwark reads stopped VMs' disks.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nbd_server::proto::consts::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use nbd_server::{BlockStatusExtent, Client, ClientOptions};
use testbed::nbd::run;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Kills qemu-nbd when the test ends, whatever happens.
struct QemuNbd(tokio::process::Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn qemu_io(disk: &Path, cmd: &str) {
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", cmd, disk.to_str().unwrap()],
    )
    .await;
}

fn ext(offset: u64, length: u64, flags: u32) -> BlockStatusExtent {
    BlockStatusExtent {
        offset,
        length,
        flags,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reads_dirty_bitmap_from_qemu_nbd() {
    let dir = tempfile::Builder::new()
        .prefix("nbd-qemu-")
        .tempdir()
        .unwrap();
    let disk = dir.path().join("disk.qcow2");
    let socket = dir.path().join("qemu-nbd.sock");
    let d = disk.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", d, "16M"]).await;
    // Written before the bitmap exists: allocated but clean.
    qemu_io(&disk, "write -P 0x11 0 64k").await;
    run("qemu-img", &["bitmap", "--add", d, "bw-0"]).await;
    qemu_io(&disk, "write -P 0xab 1M 128k").await;
    qemu_io(&disk, "write -P 0xcd 5M 64k").await;

    let child = tokio::process::Command::new("qemu-nbd")
        .args([
            "-r",
            "-f",
            "qcow2",
            "-x",
            "vda",
            "-B",
            "bw-0",
            "--persistent",
        ])
        .arg(format!("--socket={}", socket.display()))
        .arg(d)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-nbd (install qemu-utils)");
    let _guard = QemuNbd(child);
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let opts = ClientOptions::new("vda")
        .meta_context("base:allocation")
        .meta_context("qemu:dirty-bitmap:bw-0");
    let mut c = Client::connect_unix(&socket, &opts).await.unwrap();
    assert_eq!(c.size(), 16 * MIB);
    assert!(c.structured_replies());
    assert_eq!(c.meta_contexts().len(), 2, "{:?}", c.meta_contexts());

    // Exactly the ranges written after the bitmap was added are dirty.
    let dirty = c
        .block_status(0, c.size(), "qemu:dirty-bitmap:bw-0")
        .await
        .unwrap();
    assert_eq!(
        dirty,
        vec![
            ext(0, MIB, 0),
            ext(MIB, 128 * KIB, STATE_DIRTY),
            ext(MIB + 128 * KIB, 4 * MIB - 128 * KIB, 0),
            ext(5 * MIB, 64 * KIB, STATE_DIRTY),
            ext(5 * MIB + 64 * KIB, 11 * MIB - 64 * KIB, 0),
        ]
    );

    // Allocation covers every write, before or after the bitmap.
    let alloc = c
        .block_status(0, c.size(), "base:allocation")
        .await
        .unwrap();
    let allocated: Vec<(u64, u64)> = alloc
        .iter()
        .filter(|e| e.flags & STATE_HOLE == 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(
        allocated,
        vec![(0, 64 * KIB), (MIB, 128 * KIB), (5 * MIB, 64 * KIB)]
    );
    assert!(alloc
        .iter()
        .filter(|e| e.flags & STATE_HOLE != 0)
        .all(|e| e.flags & STATE_ZERO != 0));
    // A sub-range query starts and ends where asked.
    let part = c
        .block_status(MIB + 4096, MIB, "qemu:dirty-bitmap:bw-0")
        .await
        .unwrap();
    assert_eq!(part[0], ext(MIB + 4096, 128 * KIB - 4096, STATE_DIRTY));
    assert_eq!(part.iter().map(|e| e.length).sum::<u64>(), MIB);

    // Reads: data, holes (zeroes), and a range spanning both.
    let got = c.read(0, 6 * MIB as usize).await.unwrap();
    let mut want = vec![0u8; 6 * MIB as usize];
    want[..64 * KIB as usize].fill(0x11);
    want[MIB as usize..(MIB + 128 * KIB) as usize].fill(0xab);
    want[5 * MIB as usize..(5 * MIB + 64 * KIB) as usize].fill(0xcd);
    assert!(got == want, "read content differs");
    let tail = c.read(16 * MIB - 4096, 4096).await.unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    assert!(c.read(16 * MIB - 4096, 4097).await.is_err());

    c.disconnect().await.unwrap();
}
