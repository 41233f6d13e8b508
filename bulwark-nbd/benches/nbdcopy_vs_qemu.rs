//! Throughput of our server against `qemu-nbd` on the same image, side by
//! side in one run: `nbdcopy` copies a 1 GiB raw image (30% random, 40%
//! zeroes as sparse holes, 30% text) from each server over a Unix socket
//! to `null:`. The page cache is warmed first (the "warm" bar of the design
//! brief: >= 0.8 x qemu-nbd). Runs alternate; the best of each is reported.
//!
//! `cargo bench -p bulwark-nbd --bench nbdcopy_vs_qemu` (env `NBD_BENCH_MIB`
//! changes the size, `NBD_BENCH_RUNS` the number of runs per server,
//! `NBD_BENCH_DENSE=1` writes the zeroes out instead of leaving holes).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_nbd::FileExport;
use nbd_server::{Server, ServerConfig};
use rand::{Rng, SeedableRng};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Per 10 MiB stripe: 3 MiB random, 4 MiB hole, 3 MiB text.
/// With `dense`, the zero run is written out (allocated zeroes) instead of
/// left as a hole, so every byte crosses the socket.
fn make_image(path: &Path, mib: u64, dense: bool) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    let f = std::fs::File::create(path)?;
    f.set_len(mib * MIB)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut random = vec![0u8; 3 * MIB as usize];
    let phrase = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit. ";
    let text: Vec<u8> = phrase
        .iter()
        .copied()
        .cycle()
        .take(3 * MIB as usize)
        .collect();
    let mut off = 0;
    while off < mib * MIB {
        rng.fill(&mut random[..]);
        let r = random.len().min((mib * MIB - off) as usize);
        f.write_all_at(&random[..r], off)?;
        let z_off = off + 3 * MIB;
        if dense && z_off < mib * MIB {
            let z = (4 * MIB).min(mib * MIB - z_off) as usize;
            f.write_all_at(&vec![0u8; z], z_off)?;
        }
        let t_off = off + 7 * MIB;
        if t_off < mib * MIB {
            let t = text.len().min((mib * MIB - t_off) as usize);
            f.write_all_at(&text[..t], t_off)?;
        }
        off += 10 * MIB;
    }
    f.sync_all()
}

fn nbdcopy(uri: &str) -> Duration {
    let start = Instant::now();
    let st = Command::new("nbdcopy")
        .args([uri, "null:"])
        .status()
        .expect("nbdcopy (install libnbd-bin)");
    assert!(st.success(), "nbdcopy {uri} failed");
    start.elapsed()
}

fn wait_for(path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{} never appeared", path.display());
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // useful either: only run the real thing when asked to benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("nbdcopy_vs_qemu: skipped (run with `cargo bench`)");
        return;
    }
    let mib = env_or("NBD_BENCH_MIB", 1024);
    let runs = env_or("NBD_BENCH_RUNS", 3);
    let dir = tempfile::Builder::new()
        .prefix("nbd-bench-")
        .tempdir()
        .expect("tempdir");
    let image = dir.path().join("image.raw");
    let dense = std::env::var_os("NBD_BENCH_DENSE").is_some();
    make_image(&image, mib, dense).expect("write image");
    // Warm the page cache for both servers alike.
    std::fs::read(&image).expect("read image");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ours_sock = dir.path().join("ours.sock");
    let handle = {
        let _guard = rt.enter();
        let export = Arc::new(FileExport::open(&image).expect("open image"));
        Server::new(ServerConfig::default())
            .add_export("vda", export, None)
            .bind_unix(&ours_sock)
            .expect("bind")
    };

    let qemu_sock = dir.path().join("qemu.sock");
    let mut qemu = Command::new("qemu-nbd")
        .args([
            "-r",
            "-f",
            "raw",
            "-x",
            "vda",
            "--persistent",
            "--shared=16",
        ])
        .arg("--cache=writeback")
        .arg(format!("--socket={}", qemu_sock.display()))
        .arg(&image)
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-nbd (install qemu-utils)");
    wait_for(&qemu_sock);

    let ours_uri = format!("nbd+unix:///vda?socket={}", ours_sock.display());
    let qemu_uri = format!("nbd+unix:///vda?socket={}", qemu_sock.display());
    let (mut best_ours, mut best_qemu) = (Duration::MAX, Duration::MAX);
    for i in 0..runs {
        let o = nbdcopy(&ours_uri);
        let q = nbdcopy(&qemu_uri);
        println!(
            "run {i}: bulwark {:.3}s, qemu-nbd {:.3}s",
            o.as_secs_f64(),
            q.as_secs_f64()
        );
        best_ours = best_ours.min(o);
        best_qemu = best_qemu.min(q);
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    rt.block_on(handle.shutdown());

    let mibs = |d: Duration| mib as f64 / d.as_secs_f64();
    let (o, q) = (mibs(best_ours), mibs(best_qemu));
    let zeros = if dense { "allocated zeroes" } else { "holes" };
    println!(
        "image: {mib} MiB (30% random, 40% {zeros}, 30% text), nbdcopy -> null:, best of {runs}"
    );
    println!("bulwark nbd-server: {o:8.1} MiB/s");
    println!("qemu-nbd          : {q:8.1} MiB/s");
    println!("ratio             : {:.2} x qemu-nbd (bar: >= 0.80)", o / q);
}
