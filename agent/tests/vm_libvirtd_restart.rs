//! Restarting libvirtd while a protected VM runs: the VM keeps running (the
//! hook exits 0 on `reconnect`), and the next backup is still incremental.
//!
//! This restarts the host's libvirtd, which other tests and users may rely
//! on: it runs only with `BULWARK_TEST_RESTART_LIBVIRTD=1` (on a dedicated
//! test host), and otherwise says so and skips.

mod vm_common;
use vm_common as common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use testbed::{Image, Vm, VmOptions, BOOT_TIMEOUT};

/// The tests here restart the one libvirtd: one at a time.
static RESTARTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn enabled() -> bool {
    if std::env::var("BULWARK_TEST_RESTART_LIBVIRTD").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED: would restart a libvirtd this test did not start; \
             set BULWARK_TEST_RESTART_LIBVIRTD=1 on a dedicated test host"
        );
        return false;
    }
    true
}

/// Stops libvirtd (SIGTERM) and starts it again, waiting for it to answer.
fn restart_libvirtd() {
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
}

fn libvirtd_pid() -> Option<String> {
    std::fs::read_to_string("/run/libvirtd.pid")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
}

#[test]
fn libvirtd_restart_leaves_protected_vm_running() {
    if !enabled() {
        return;
    }
    let _one = RESTARTS.lock().unwrap_or_else(|e| e.into_inner());
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

    restart_libvirtd();
    assert_eq!(vm.state().unwrap(), "running");
    vm.qemu_io(&format!("write -P 0x55 {} 64k", image.scratch_offset()))
        .unwrap();
    let r2 = env.backup(vm.name(), &[]);
    assert_incremental_bound(&r2["disks"][0], 64 << 10);
}

/// The agent follows libvirtd through a restart: its event connection
/// comes back (a protected VM defined afterwards still gets its bitmap from
/// the define event) and its schedule keeps running.
#[test]
fn agent_reconnects_after_libvirtd_restarts() {
    if !enabled() {
        return;
    }
    let _one = RESTARTS.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let policy = format!("rs-{}", std::process::id());
    let opts = VmOptions {
        metadata_xml: Some(policy_xml(&policy)),
        ..VmOptions::default()
    };
    let first = Vm::define(&image, opts.clone()).unwrap();
    let agent = Agent::start(
        &env,
        1,
        &format!("[policies.{policy}]\nrepository = \"main\"\nschedule = \"every 2s\"\n"),
    );
    let key = format!("{}/{policy}", first.name());
    let run_at = |env: &Env| agent.status(env)["runs"][&key]["at"].as_u64();
    let before = wait_for("a scheduled backup", 60, || run_at(&env));
    assert_eq!(agent.status(&env)["libvirt_connections"], 1);

    restart_libvirtd();
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    wait_for("the agent to reconnect", 60, || {
        (agent.status(&env)["libvirt_connections"] == 2).then_some(())
    });
    let second = Vm::define(&image, opts).unwrap();
    // Only the define event tells the agent of this VM (no rescan after
    // the reconnect saw it): its bitmap, or the checkpoint of its first
    // scheduled backup that replaced it, shows the agent knows it.
    wait_for("the define event's bitmap after the restart", 30, || {
        bitmap_names(second.disk_path())
            .iter()
            .any(|b| b.starts_with("bw-"))
            .then_some(())
    });
    let after = wait_for("a scheduled backup after the restart", 60, || {
        run_at(&env).filter(|&t| t >= restarted)
    });
    assert!(after > before);
    let s = agent.status(&env);
    assert_eq!(s["runs"][&key]["ok"], true, "{s}");
}
