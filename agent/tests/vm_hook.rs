//! Policy metadata (`bulwark protect` / `unprotect`) and `bulwark-hook`:
//! called as libvirt calls it (domain XML from libvirtd on stdin), and, when
//! the host's libvirtd loaded it, through a real VM start.

mod vm_common;
use vm_common as common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use testbed::{Image, Vm, VmOptions, BOOT_TIMEOUT};

const POLICY_XML: &str = "<bulwark:policies xmlns:bulwark='https://bulwark.dev/xmlns/libvirt/1'>\
    <bulwark:policy name='hourly'/></bulwark:policies>";

fn hook_bin() -> PathBuf {
    // Built by the workspace next to the bulwark binary.
    let p = Path::new(env!("CARGO_BIN_EXE_bulwark")).with_file_name("bulwark-hook");
    if !p.exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "bulwark-hook"])
            .status()
            .unwrap();
        assert!(st.success());
    }
    p
}

fn call_hook(conf: &Path, args: &[&str], xml: &str) -> (std::process::ExitStatus, Duration) {
    let t = Instant::now();
    let mut child = Command::new(hook_bin())
        .args(args)
        .env("BULWARK_HOOK_CONF", conf)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(xml.as_bytes());
    let st = child.wait().unwrap();
    (st, t.elapsed())
}

#[test]
fn protect_unprotect_and_hook_called_like_libvirt() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let vm = Vm::define(&image, VmOptions::default()).unwrap();
    let name = vm.name();

    env.ok(&["protect", name, "--policy", "hourly", "--policy", "weekly"]);
    let xml = virsh(&["dumpxml", name, "--inactive"]);
    assert!(xml.contains("https://bulwark.dev/xmlns/libvirt/1"), "{xml}");
    assert!(
        xml.contains("name=\"weekly\"") || xml.contains("name='weekly'"),
        "{xml}"
    );

    // The hook, with the agent listening on a test socket.
    let sock = env.path("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let conf = env.path("hook.conf");
    std::fs::write(&conf, format!("socket = {}\n", sock.display())).unwrap();
    let got = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        (&s).write_all(b"ok\n").unwrap();
        line
    });
    let (st, took) = call_hook(&conf, &[name, "prepare", "begin", "-"], &xml);
    assert!(st.success());
    assert!(took < Duration::from_secs(5), "{took:?}");
    let msg: serde_json::Value = serde_json::from_str(&got.join().unwrap()).unwrap();
    assert_eq!(msg["event"], "prepare begin");
    assert_eq!(msg["domain"], name);
    assert_eq!(msg["unclean"], false);
    assert_eq!(msg["bitmaps_added"], serde_json::json!(["vda"]));
    assert_eq!(bitmap_names(vm.disk_path()), vec!["bw-hook"]);
    // Agent down, any event: exit 0, quickly, nothing added twice.
    std::fs::remove_file(&sock).unwrap();
    for op in [
        ["prepare", "begin"],
        ["reconnect", "begin"],
        ["release", "end"],
    ] {
        let (st, took) = call_hook(&conf, &[name, op[0], op[1], "-"], &xml);
        assert!(st.success(), "{op:?}");
        assert!(took < Duration::from_secs(5), "{op:?} {took:?}");
    }
    assert_eq!(bitmap_names(vm.disk_path()), vec!["bw-hook"]);

    // Unprotected domains are left alone.
    env.ok(&["unprotect", name]);
    let xml = virsh(&["dumpxml", name, "--inactive"]);
    assert!(!xml.contains("bulwark.dev"), "{xml}");

    // A first backup starts the chain and drops the hook's bitmap.
    let r = env.backup(name, &[]);
    assert_eq!(r["mode"], "full");
    assert_eq!(
        bitmap_names(vm.disk_path()),
        vec![r["checkpoint"].as_str().unwrap().to_string()]
    );
}

/// A domain defined with policy metadata gets its bitmap at first start,
/// through libvirtd running the installed hook. libvirtd looks for hooks
/// only when it starts: if it was started before any qemu hook existed
/// (scripts/setup-test-host.sh installs one first), this test says so and
/// skips rather than restart a libvirtd it did not start.
#[test]
fn protected_vm_gets_bitmaps_at_first_start_through_libvirtd() {
    let hook = Path::new("/etc/libvirt/hooks/qemu.d/bulwark");
    if !hook.exists() {
        eprintln!(
            "SKIPPED: no {} (scripts/setup-test-host.sh installs it before starting libvirtd)",
            hook.display()
        );
        return;
    }
    let env = Env::new();
    let bin = hook_bin();
    env.ok(&["hook", "install", "--binary", bin.to_str().unwrap()]);
    let image = Image::tiny().unwrap();
    let mut vm = Vm::define(
        &image,
        VmOptions {
            metadata_xml: Some(POLICY_XML.to_string()),
            ..VmOptions::default()
        },
    )
    .unwrap();
    assert!(bitmap_names(vm.disk_path()).is_empty());
    vm.start().unwrap();
    vm.wait_ready(BOOT_TIMEOUT).unwrap();
    let q = virsh(&[
        "qemu-monitor-command",
        vm.name(),
        r#"{"execute":"query-block"}"#,
    ]);
    if !q.contains("bw-hook") {
        eprintln!(
            "SKIPPED: libvirtd did not run {} (it was started before the hook existed; \
             restart libvirtd once to load hooks)",
            hook.display()
        );
        return;
    }
    // Backups use it from the start: the first is full, the next incremental.
    let r1 = env.backup(vm.name(), &[]);
    assert_eq!(r1["mode"], "full");
    vm.qemu_io(&format!("write -P 0x11 {} 64k", image.scratch_offset()))
        .unwrap();
    let r2 = env.backup(vm.name(), &[]);
    assert_incremental_bound(&r2["disks"][0], 64 << 10);
}
