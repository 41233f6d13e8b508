//! End-to-end tests of the test bed itself: the image boots under plain QEMU
//! and under libvirtd, the guest follows instructions, and host-side writes
//! into a running VM's disk land. Needs root and scripts/setup-test-host.sh.

use std::process::Command;
use std::time::{Duration, Instant};

use sha2_free::sha256_hex;
use testbed::{Image, QemuVm, TestBed, Vm, VmOptions, BOOT_TIMEOUT};

/// Prints how long a boot took. Speed is not asserted here (a loaded CI
/// host boots slower; `wait_ready`'s timeout is what fails a boot that never
/// comes): set BULWARK_TESTBED_BOOT_LIMIT_SECS to hold a boot to a bar.
fn check_boot_time(what: &str, took: Duration) {
    eprintln!(
        "testbed: {what}: booted to ready in {:.2} s",
        took.as_secs_f64()
    );
    let limit = std::env::var("BULWARK_TESTBED_BOOT_LIMIT_SECS")
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .expect("BULWARK_TESTBED_BOOT_LIMIT_SECS is seconds")
        });
    if let Some(limit) = limit.map(Duration::from_secs) {
        assert!(took < limit, "{what}: boot took {took:?}, over {limit:?}");
    }
}

#[test]
fn plain_qemu_boots_from_disk_and_counts_boots() {
    let image = Image::tiny().unwrap();
    let mut vm = QemuVm::new(&image, VmOptions::qcow2()).unwrap();

    let t = Instant::now();
    vm.start().unwrap();
    let ready = vm.wait_ready(BOOT_TIMEOUT).unwrap();
    check_boot_time("plain QEMU, extlinux, qcow2", t.elapsed());
    assert_eq!(ready.marker, image.marker());
    assert_eq!(ready.boots, 1);

    // Host-side write through HMP on plain QEMU too, checked by qemu-io read.
    let off = image.scratch_offset();
    vm.qemu_io(&format!("write -P 0x5a {off} 64k")).unwrap();
    vm.qemu_io(&format!("read -P 0x5a {off} 64k")).unwrap();
    assert!(vm.qemu_io(&format!("read -P 0x00 {off} 64k")).is_err());

    vm.kill().unwrap();
    vm.start().unwrap();
    let ready = vm.wait_ready(BOOT_TIMEOUT).unwrap();
    assert_eq!(ready.marker, image.marker());
    assert_eq!(ready.boots, 2, "boot counter must survive on the disk");
    vm.kill().unwrap();
}

#[test]
fn libvirt_boots_from_disk_and_counts_boots() {
    let image = Image::tiny().unwrap();
    TestBed::ensure().unwrap();
    let t = Instant::now();
    let mut vm = Vm::define(&image, VmOptions::raw()).unwrap();
    vm.start().unwrap();
    let ready = vm.wait_ready(BOOT_TIMEOUT).unwrap();
    check_boot_time("libvirt, extlinux, raw (define+start)", t.elapsed());
    assert!(vm.name().starts_with("bw-test-"));
    assert_eq!(ready.marker, image.marker());
    assert_eq!(ready.boots, 1);
    vm.wait_line(testbed::guest::IDLE, Duration::from_secs(10))
        .unwrap();

    let t = Instant::now();
    vm.destroy().unwrap();
    eprintln!(
        "testbed: libvirt destroy took {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(vm.state().unwrap(), "shut off");
    let t = Instant::now();
    vm.start().unwrap();
    let ready = vm.wait_ready(BOOT_TIMEOUT).unwrap();
    check_boot_time("libvirt, extlinux, raw, second boot", t.elapsed());
    assert_eq!(ready.boots, 2, "boot counter must survive on the disk");
    let t = Instant::now();
    drop(vm);
    eprintln!(
        "testbed: libvirt drop took {:.2} s",
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn guest_write_instruction_matches_host_read() {
    let image = Image::tiny().unwrap();
    let mut vm = Vm::define(
        &image,
        VmOptions::raw().kernel_args(["bulwark.write_mib=3", "bulwark.poweroff=1"]),
    )
    .unwrap();
    let t = Instant::now();
    vm.start().unwrap();
    let ready = vm.wait_ready(BOOT_TIMEOUT).unwrap();
    check_boot_time("libvirt, direct kernel, raw", t.elapsed());
    assert_eq!(ready.boots, 1);
    let wrote = vm.wait_wrote(Duration::from_secs(60)).unwrap();
    assert_eq!(wrote.mib, 3);
    assert_eq!(wrote.file, "/data/written-1.bin");
    vm.wait_line(testbed::guest::POWEROFF, Duration::from_secs(30))
        .unwrap();
    vm.wait_shut_off(Duration::from_secs(30)).unwrap();

    // Waiting on a stopped VM fails early, with the console tail.
    let t = Instant::now();
    let err = vm
        .wait_line("never printed", Duration::from_secs(30))
        .unwrap_err()
        .to_string();
    assert!(t.elapsed() < Duration::from_secs(10), "{err}");
    assert!(
        err.contains("shut off") && err.contains(testbed::guest::POWEROFF),
        "{err}"
    );

    let data = image.read_guest_file(vm.disk_path(), &wrote.file).unwrap();
    assert_eq!(data.len(), 3 << 20);
    assert_eq!(sha256_hex(&data), wrote.sha256);
    let marker = image.read_guest_file(vm.disk_path(), "/marker").unwrap();
    assert_eq!(String::from_utf8_lossy(&marker).trim(), image.marker());
}

#[test]
fn host_writes_into_running_libvirt_vm_disk() {
    let image = Image::tiny().unwrap();
    let mut vm = Vm::define(&image, VmOptions::qcow2().kernel_args(Vec::<String>::new())).unwrap();
    vm.start().unwrap();
    vm.wait_ready(BOOT_TIMEOUT).unwrap();

    let off = image.scratch_offset();
    vm.pause().unwrap();
    assert_eq!(vm.state().unwrap(), "paused");
    let out = vm.qemu_io(&format!("write -P 0xab {off} 128k")).unwrap();
    assert!(out.contains("wrote 131072/131072"), "{out}");
    vm.resume().unwrap();
    assert_eq!(vm.state().unwrap(), "running");
    vm.qemu_io(&format!("read -P 0xab {off} 128k")).unwrap();
    let err = vm.qemu_io(&format!("read -P 0xcd {off} 128k")).unwrap_err();
    assert!(
        err.to_string().contains("Pattern verification failed"),
        "{err}"
    );

    // Read back from the qcow2 on the host once QEMU is gone.
    vm.destroy().unwrap();
    let check = |pattern: &str| {
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-r", "-c"])
            .arg(format!("read -P {pattern} {off} 128k"))
            .arg(vm.disk_path())
            .output()
            .unwrap()
    };
    let ok = check("0xab");
    assert!(
        ok.status.success() && !String::from_utf8_lossy(&ok.stdout).contains("failed"),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let bad = check("0x00");
    assert!(String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"));
}

#[test]
fn dropping_a_vm_removes_domain_and_files() {
    let image = Image::tiny().unwrap();
    let bed = TestBed::ensure().unwrap();
    let opts = VmOptions {
        metadata_xml: Some(
            "<bw:backup xmlns:bw='https://bulwark.invalid/xmlns/test'><bw:policy name='hourly'/></bw:backup>"
                .into(),
        ),
        ..VmOptions::qcow2()
    };
    let vm = Vm::define(&image, opts).unwrap();
    let name = vm.name().to_string();
    let xml = bed.virsh(["dumpxml", &name]).unwrap();
    assert!(
        xml.contains("policy name='hourly'") || xml.contains("policy name=\"hourly\""),
        "{xml}"
    );
    let dir = vm.dir().to_path_buf();
    assert!(bed.virsh(["domstate", &name]).is_ok());
    // A panicking test drops its VM during unwinding, the same way.
    let r = std::panic::catch_unwind(move || {
        let _vm = vm;
        panic!("test panics");
    });
    assert!(r.is_err());
    assert!(
        bed.virsh(["domstate", &name]).is_err(),
        "{name} still defined"
    );
    assert!(!dir.exists(), "{} still exists", dir.display());
}

/// SHA-256 through coreutils' sha256sum: keeps the test bed free of crypto
/// crates.
mod sha2_free {
    use std::io::Write;
    use std::process::{Command, Stdio};

    pub fn sha256_hex(data: &[u8]) -> String {
        let mut child = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(data).unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_string()
    }
}
