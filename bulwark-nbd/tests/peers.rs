//! Our server against real NBD clients: nbdinfo, nbdcopy, qemu-img, nbdfuse.

use std::sync::Arc;

use bulwark_nbd::FileExport;
use testbed::nbd::*;

/// Parse `nbdinfo --map` text output into (offset, length, is_hole).
fn parse_map(text: &str) -> Vec<(u64, u64, bool)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let t: u32 = f[2].parse().unwrap();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), t & 1 != 0)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_see_memory_and_file_exports() {
    let tmp = tempfile::Builder::new()
        .prefix("nbd-peers-")
        .tempdir()
        .unwrap();
    let (src, data, holes) = source_image(tmp.path());
    let file = Arc::new(FileExport::open(&src).unwrap());
    let mem = mem_export();

    let served_mem = serve(vec![("mem", mem)]);
    let served = serve(vec![("vda", Arc::clone(&file)), ("vdb", file)]);

    // --list shows both exports with their size.
    let list = stdout(&run("nbdinfo", &["--list", &served.uri("")]).await);
    assert!(list.contains("export=\"vda\""), "{list}");
    assert!(list.contains("export=\"vdb\""), "{list}");
    assert!(
        list.contains(&format!("export-size: {}", data.len())),
        "{list}"
    );
    assert!(list.contains("base:allocation"), "{list}");

    // --map matches the holes of the source, for both export kinds.
    let want = expected_map(data.len() as u64, &holes);
    for uri in [served.uri("vda"), served_mem.uri("mem")] {
        let map = parse_map(&stdout(&run("nbdinfo", &["--map", &uri]).await));
        assert_eq!(map, want, "map of {uri}");
    }

    // nbdcopy produces a bit-identical copy.
    for uri in [served.uri("vdb"), served_mem.uri("mem")] {
        let copy = tmp.path().join("copy.raw");
        run("nbdcopy", &[&uri, copy.to_str().unwrap()]).await;
        assert!(
            std::fs::read(&copy).unwrap() == data,
            "nbdcopy {uri} differs"
        );
        std::fs::remove_file(&copy).unwrap();
    }

    // qemu-img (QEMU's NBD client, structured reads and block status).
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            src.to_str().unwrap(),
            &served.uri("vda"),
        ],
    )
    .await;
    assert!(stdout(&cmp).contains("identical"), "{}", stdout(&cmp));

    served.shutdown().await;
    served_mem.shutdown().await;
}

/// nbdfuse exposes the export as a file; skipped (with a note) where FUSE
/// is unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdfuse_exposes_export_as_file() {
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: /dev/fuse missing");
        return;
    }
    let (data, _) = test_image();
    let served = serve(vec![("vda", mem_export())]);
    let mnt = served.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut fuse = tokio::process::Command::new("nbdfuse")
        .arg(&mnt)
        .arg(served.uri("vda"))
        .kill_on_drop(true)
        .spawn()
        .expect("nbdfuse (install nbdfuse)");
    let file = mnt.join("nbd");
    let mut ok = false;
    for _ in 0..100 {
        if std::fs::metadata(&file)
            .map(|m| m.len() == data.len() as u64)
            .unwrap_or(false)
        {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let content = if ok {
        let f = file.clone();
        tokio::task::spawn_blocking(move || std::fs::read(f))
            .await
            .unwrap()
            .ok()
    } else {
        None
    };
    // Lazy (-z): right after the read the kernel may still hold the file
    // for a moment, and a plain -u then fails with EBUSY and leaves the mount.
    let _ = tokio::process::Command::new("fusermount3")
        .arg("-uz")
        .arg(&mnt)
        .status()
        .await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), fuse.wait()).await;
    let _ = fuse.kill().await;
    assert!(ok, "nbdfuse never exposed {}", file.display());
    assert!(
        content.expect("read through FUSE") == data,
        "FUSE content differs"
    );
    served.shutdown().await;
}
