//! Side-by-side with virtnbdbackup (Debian package) on the same test VM
//! image: full, then incremental after the same host-side writes. Ignored
//! by default (needs virtnbdbackup; about 40 s). Run:
//! `cargo test -p bulwark --test vm_bench -- --ignored --nocapture`.

mod vm_common;
use vm_common as common;

use std::process::Command;
use std::time::Instant;

use common::*;
use testbed::{Image, Vm, VmOptions, BOOT_TIMEOUT};

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn writes(vm: &Vm, image: &Image) {
    let s = image.scratch_offset();
    for (i, pat) in [0x21, 0x32, 0x43].iter().enumerate() {
        vm.qemu_io(&format!("write -P {pat} {} 1M", s + (i as u64) * (2 << 20)))
            .unwrap();
    }
}

#[test]
#[ignore = "benchmark: needs virtnbdbackup; run with --ignored --nocapture"]
fn bench_against_virtnbdbackup() {
    if Command::new("virtnbdbackup")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: virtnbdbackup not installed (apt-get install virtnbdbackup)");
        return;
    }
    let image = Image::tiny().unwrap();
    let env = Env::new();

    // Bulwark.
    let mut a = Vm::define(&image, VmOptions::default()).unwrap();
    a.start().unwrap();
    a.wait_ready(BOOT_TIMEOUT).unwrap();
    let t = Instant::now();
    let f = env.backup(a.name(), &[]);
    let bw_full = t.elapsed().as_secs_f64();
    writes(&a, &image);
    let t = Instant::now();
    let i = env.backup(a.name(), &[]);
    let bw_inc = t.elapsed().as_secs_f64();
    drop(a);

    // virtnbdbackup on another VM from the same image.
    let mut b = Vm::define(&image, VmOptions::default()).unwrap();
    b.start().unwrap();
    b.wait_ready(BOOT_TIMEOUT).unwrap();
    let out = env.path("vnb");
    let vnb = |level: &str| {
        let t = Instant::now();
        let o = Command::new("virtnbdbackup")
            .args(["-d", b.name(), "-l", level, "-n", "-S"])
            .arg(env.dir.path())
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "virtnbdbackup {level}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        t.elapsed().as_secs_f64()
    };
    let v_full = vnb("full");
    let v_full_bytes = dir_bytes(&out);
    writes(&b, &image);
    let v_inc = vnb("inc");
    let v_inc_bytes = dir_bytes(&out) - v_full_bytes;

    eprintln!("| tool | full: time, stored | incremental (3 x 1 MiB): time, read, stored |");
    eprintln!("| --- | --- | --- |");
    eprintln!(
        "| bulwark | {bw_full:.2} s, {} B (read {} B) | {bw_inc:.2} s, read {} B, stored {} B |",
        u(&f, "bytes_stored"),
        u(&f, "bytes_read"),
        u(&i, "bytes_read"),
        u(&i, "bytes_stored")
    );
    eprintln!(
        "| virtnbdbackup | {v_full:.2} s, {v_full_bytes} B | {v_inc:.2} s, stored {v_inc_bytes} B |"
    );
}
