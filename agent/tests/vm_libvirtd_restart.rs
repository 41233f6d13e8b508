//! Restarting libvirtd while a protected VM runs: the VM keeps running (the
//! hook exits 0 on `reconnect`), and the next backup is still incremental.
//!
//! This restarts the host's libvirtd, which other tests and users may rely
//! on: it runs only with `BULWARK_TEST_RESTART_LIBVIRTD=1` (on a dedicated
//! test host), and otherwise says so and skips.

#[path = "vm_common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use testbed::{Image, Vm, VmOptions, BOOT_TIMEOUT};

fn libvirtd_pid() -> Option<String> {
    std::fs::read_to_string("/run/libvirtd.pid")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
}

#[test]
fn libvirtd_restart_leaves_protected_vm_running() {
    if std::env::var("BULWARK_TEST_RESTART_LIBVIRTD").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED: would restart a libvirtd this test did not start; \
             set BULWARK_TEST_RESTART_LIBVIRTD=1 on a dedicated test host"
        );
        return;
    }
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let mut vm = Vm::define(
        &image,
        VmOptions {
            metadata_xml: Some(
                "<bulwark:policies xmlns:bulwark='https://bulwark.dev/xmlns/libvirt/1'>\
                 <bulwark:policy name='hourly'/></bulwark:policies>"
                    .into(),
            ),
            ..VmOptions::default()
        },
    )
    .unwrap();
    vm.start().unwrap();
    vm.wait_ready(BOOT_TIMEOUT).unwrap();
    let r1 = env.backup(vm.name(), &[]);
    assert_eq!(r1["mode"], "full");

    let pid = libvirtd_pid().expect("libvirtd pid file");
    assert!(Command::new("kill").arg(&pid).status().unwrap().success());
    let t = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "libvirtd did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(Command::new("libvirtd")
        .arg("-d")
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    while Command::new("virsh")
        .args(["-c", "qemu:///system", "version"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "libvirtd did not come back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(vm.state().unwrap(), "running");
    vm.qemu_io(&format!("write -P 0x55 {} 64k", image.scratch_offset()))
        .unwrap();
    let r2 = env.backup(vm.name(), &[]);
    assert_incremental_bound(&r2["disks"][0], 64 << 10);
}
