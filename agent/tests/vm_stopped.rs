//! `bulwark backup vm` on a stopped domain: `qemu-nbd -r -B BITMAP` exports
//! and bitmap rotation with `qemu-img bitmap`; then the same domain started,
//! where libvirt must learn the checkpoint made offline (redefined from the
//! agent's record); then destroyed, where the next backup must notice the
//! inconsistent bitmaps and read everything.

mod vm_common;
use vm_common as common;

use std::path::Path;
use std::process::Command;

use common::*;
use testbed::{Image, Vm, VmOptions, BOOT_TIMEOUT};

fn qemu_io_offline(disk: &Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(disk)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io {cmd}: {out:?}");
}

/// Bulwark's bitmaps and their flags.
fn bw_bitmaps(disk: &Path) -> Vec<(String, Vec<String>)> {
    let mut b = bitmaps(disk);
    b.retain(|(n, _)| n.starts_with("bw-"));
    b
}

#[test]
fn stopped_vm_rotates_bitmaps_then_running_then_destroyed() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let mut vm = Vm::define(&image, VmOptions::default()).unwrap();
    let name = vm.name().to_string();
    let disk = vm.disk_path().to_path_buf();
    let scratch = image.scratch_offset();

    // Stopped, first backup: full, and a bitmap appears.
    let r1 = env.backup(&name, &[]);
    assert_eq!(r1["running"], false);
    assert_eq!(r1["mode"], "full");
    let cp1 = r1["checkpoint"].as_str().unwrap().to_string();
    assert_eq!(
        bw_bitmaps(&disk),
        vec![(cp1.clone(), vec!["auto".to_string()])]
    );
    let ref1 = env.path("ref1.raw");
    reference(&disk, "qcow2", &ref1);

    // Offline writes, then incrementals through qemu-nbd -B.
    let mut refs = vec![(r1.clone(), ref1)];
    for (i, pat) in [0x5a, 0x6b].iter().enumerate() {
        let off = scratch + (i as u64) * (2 << 20);
        qemu_io_offline(&disk, &format!("write -P {pat} {off} 256k"));
        let r = env.backup(&name, &[]);
        assert_eq!(r["mode"], "incremental", "{r}");
        assert_incremental_bound(&r["disks"][0], 256 << 10);
        let rf = env.path(&format!("ref{}.raw", i + 2));
        reference(&disk, "qcow2", &rf);
        refs.push((r, rf));
    }
    // Rotation: the newest two bitmaps remain, both enabled.
    let names: Vec<String> = bw_bitmaps(&disk).into_iter().map(|b| b.0).collect();
    let want: Vec<String> = refs[1..]
        .iter()
        .map(|(r, _)| r["checkpoint"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    for w in &want {
        assert!(names.contains(w), "{names:?} lacks {w}");
    }
    for (r, rf) in &refs {
        env.assert_restores_to(r["snapshot"].as_str().unwrap(), "vda", rf);
    }

    // Start it: QEMU loads the bitmaps; libvirt has no checkpoint for the
    // one made offline, the backup redefines it and stays incremental.
    vm.start().unwrap();
    vm.wait_ready(BOOT_TIMEOUT).unwrap();
    vm.qemu_io(&format!("write -P 0x7c {} 64k", scratch + (6 << 20)))
        .unwrap();
    let ref4 = env.path("ref4.raw");
    vm.pause().unwrap();
    reference(&disk, "qcow2", &ref4);
    let r4 = env.backup(&name, &[]);
    vm.resume().unwrap();
    assert_eq!(r4["running"], true);
    assert_eq!(r4["mode"], "incremental", "{r4}");
    // The guest's own boot-time writes are dirty too; the bound still holds.
    assert_incremental_bound(&r4["disks"][0], 64 << 10);
    env.assert_restores_to(r4["snapshot"].as_str().unwrap(), "vda", &ref4);

    // `virsh destroy` sends QEMU SIGTERM: it stores its bitmaps before it
    // exits, so they stay consistent and the next backup is a (correct)
    // incremental.
    vm.destroy().unwrap();
    vm.start().unwrap();
    vm.wait_ready(BOOT_TIMEOUT).unwrap();
    vm.qemu_io(&format!("write -P 0x2c {} 64k", scratch + (4 << 20)))
        .unwrap();
    let ref45 = env.path("ref45.raw");
    vm.pause().unwrap();
    reference(&disk, "qcow2", &ref45);
    let r45 = env.backup(&name, &[]);
    vm.resume().unwrap();
    assert_incremental_bound(&r45["disks"][0], 64 << 10);
    env.assert_restores_to(r45["snapshot"].as_str().unwrap(), "vda", &ref45);

    // A real crash: QEMU killed with SIGKILL leaves the bitmaps in-use;
    // after the restart QEMU loads them as inconsistent and the next backup
    // reads everything.
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).unwrap();
    let st = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(st.success());
    let t = std::time::Instant::now();
    while vm.state().unwrap() != "shut off" {
        assert!(
            t.elapsed().as_secs() < 20,
            "VM still {}",
            vm.state().unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        bw_bitmaps(&disk)
            .iter()
            .all(|(_, f)| f.contains(&"in-use".to_string())),
        "{:?}",
        bw_bitmaps(&disk)
    );
    vm.start().unwrap();
    vm.wait_ready(BOOT_TIMEOUT).unwrap();
    vm.qemu_io(&format!("write -P 0x3d {} 64k", scratch + (7 << 20)))
        .unwrap();
    let ref5 = env.path("ref5.raw");
    vm.pause().unwrap();
    reference(&disk, "qcow2", &ref5);
    let r5 = env.backup(&name, &[]);
    vm.resume().unwrap();
    assert_eq!(r5["mode"], "full", "{r5}");
    let why = r5["reason"].as_str().unwrap();
    assert!(why.contains("inconsistent"), "{why}");
    assert!(u(&r5, "bytes_read") >= u(&refs[0].0, "bytes_read"));
    env.assert_restores_to(r5["snapshot"].as_str().unwrap(), "vda", &ref5);
    // The broken checkpoints are gone; a fresh chain continues incrementally.
    assert_eq!(
        checkpoints(&name),
        vec![r5["checkpoint"].as_str().unwrap().to_string()]
    );
    vm.qemu_io(&format!("write -P 0x4e {} 64k", scratch + (7 << 20)))
        .unwrap();
    let ref6 = env.path("ref6.raw");
    vm.pause().unwrap();
    reference(&disk, "qcow2", &ref6);
    let r6 = env.backup(&name, &[]);
    vm.resume().unwrap();
    assert_incremental_bound(&r6["disks"][0], 64 << 10);
    env.assert_restores_to(r6["snapshot"].as_str().unwrap(), "vda", &ref6);
}

/// A stopped domain whose second disk is `<disk type='block'>` on a loop
/// device (how LVM volumes are attached): backed up whole, restored bit for
/// bit to a file and over a device holding stale data.
#[test]
fn stopped_vm_with_block_disk_round_trips() {
    use rand::{RngCore, SeedableRng};
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let size = 8usize << 20;
    let dev = testbed::LoopDevice::with_contents(&env.path("lv"), size as u64, |b| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        rng.fill_bytes(&mut b[..size / 2]);
        b[size - 4096..].fill(0x42); // data after a long zero run
    })
    .unwrap();
    let opts = VmOptions {
        devices_xml: Some(format!(
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/>\
             <source dev='{}'/><target dev='vdb' bus='virtio'/></disk>",
            dev.path().display()
        )),
        ..VmOptions::default()
    };
    let vm = Vm::define(&image, opts).unwrap();
    let name = vm.name().to_string();

    for round in 0..2 {
        if round == 1 {
            // Change the device between backups: a raw disk is read whole.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dev.path())
                .unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &[0x99; 65536], 6 << 20).unwrap();
            f.sync_all().unwrap();
        }
        let want = dev.read_all().unwrap();
        let r = env.backup(&name, &[]);
        assert_eq!(r["running"], false, "{r}");
        let disks = r["disks"].as_array().unwrap();
        let vdb = disks.iter().find(|d| d["name"] == "vdb").expect("vdb");
        assert_eq!(vdb["mode"], "full", "a raw block disk has no bitmap: {vdb}");
        let snap = r["snapshot"].as_str().unwrap();

        let file = env.path(&format!("vdb-{round}.raw"));
        env.ok(&[
            "restore",
            "image",
            snap,
            "--disk",
            "vdb",
            "--to",
            file.to_str().unwrap(),
        ]);
        assert!(std::fs::read(&file).unwrap() == want, "round {round}: file");

        let target =
            testbed::LoopDevice::with_contents(&env.path(&format!("t{round}")), size as u64, |b| {
                b.fill(0xee)
            })
            .unwrap();
        env.ok(&[
            "restore",
            "image",
            snap,
            "--disk",
            "vdb",
            "--to",
            target.path().to_str().unwrap(),
            "--force",
        ]);
        assert!(target.read_all().unwrap() == want, "round {round}: device");
    }
}
