//! `bulwark backup vm` on a running libvirt domain (real libvirtd, QEMU TCG):
//! full, then incrementals through pull-mode backups and checkpoints;
//! every snapshot restores bit-identical to the disk at its backup.

mod vm_common;
use vm_common as common;

use common::*;
use testbed::{Image, Vm, VmOptions, BOOT_TIMEOUT};

#[test]
fn running_vm_full_then_incremental() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let mut vm = Vm::define(&image, VmOptions::default()).unwrap();
    vm.start().unwrap();
    vm.wait_ready(BOOT_TIMEOUT).unwrap();
    let name = vm.name().to_string();
    let scratch = image.scratch_offset();

    // Full: the reference is the disk while the VM is paused across the
    // backup start (pull mode exports the disk as it was at that moment).
    let ref1 = env.path("ref1.raw");
    vm.pause().unwrap();
    reference(vm.disk_path(), "qcow2", &ref1);
    let r1 = env.backup(&name, &[]);
    vm.resume().unwrap();
    assert_eq!(r1["mode"], "full", "{r1}");
    assert_eq!(r1["running"], true);
    let size = u(&r1, "size");
    assert_eq!(size, image.disk_size());
    assert!(
        u(&r1, "bytes_read") < size,
        "full read skips unallocated: {r1}"
    );

    // Host-side writes into the scratch area, two extents.
    vm.qemu_io(&format!("write -P 0xab {scratch} 128k"))
        .unwrap();
    vm.qemu_io(&format!("write -P 0xcd {} 64k", scratch + (3 << 20)))
        .unwrap();
    let ref2 = env.path("ref2.raw");
    vm.pause().unwrap();
    reference(vm.disk_path(), "qcow2", &ref2);
    let r2 = env.backup(&name, &[]);
    vm.resume().unwrap();
    assert_eq!(r2["mode"], "incremental", "{r2}");
    assert_eq!(r2["parent"], r1["snapshot"]);
    assert_incremental_bound(&r2["disks"][0], 192 << 10);

    // A third one rotates checkpoints: libvirt keeps only the newest two.
    vm.qemu_io(&format!("write -P 0xef {} 1M", scratch + (5 << 20)))
        .unwrap();
    let ref3 = env.path("ref3.raw");
    vm.pause().unwrap();
    reference(vm.disk_path(), "qcow2", &ref3);
    let r3 = env.backup(&name, &[]);
    vm.resume().unwrap();
    assert_incremental_bound(&r3["disks"][0], 1 << 20);
    let cps = checkpoints(&name);
    assert_eq!(cps.len(), 2, "{cps:?}");
    assert!(cps.contains(&r3["checkpoint"].as_str().unwrap().to_string()));
    assert!(!cps.contains(&r1["checkpoint"].as_str().unwrap().to_string()));

    for (r, reference) in [(&r1, &ref1), (&r2, &ref2), (&r3, &ref3)] {
        env.assert_restores_to(r["snapshot"].as_str().unwrap(), "vda", reference);
    }
    // Still running, no job left behind.
    assert_eq!(vm.state().unwrap(), "running");
}

/// Raw disks hold no persistent bitmaps: every backup reads all allocated
/// data, says so, and creates no checkpoint.
#[test]
fn running_raw_vm_reads_everything_each_time() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let mut vm = Vm::define(&image, VmOptions::raw()).unwrap();
    vm.start().unwrap();
    vm.wait_ready(BOOT_TIMEOUT).unwrap();
    let name = vm.name().to_string();
    let r1 = env.backup(&name, &[]);
    vm.qemu_io(&format!("write -P 0x99 {} 64k", image.scratch_offset()))
        .unwrap();
    let reference_path = env.path("ref.raw");
    vm.pause().unwrap();
    reference(vm.disk_path(), "raw", &reference_path);
    let r2 = env.backup(&name, &[]);
    vm.resume().unwrap();
    for r in [&r1, &r2] {
        assert_eq!(r["mode"], "full", "{r}");
        let why = r["disks"][0]["reason"].as_str().unwrap();
        assert!(why.contains("raw disk"), "{why}");
        assert!(r.get("checkpoint").is_none(), "{r}");
    }
    assert!(u(&r2, "bytes_read") >= u(&r1, "bytes_read"));
    assert!(checkpoints(&name).is_empty());
    env.assert_restores_to(r2["snapshot"].as_str().unwrap(), "vda", &reference_path);
}
