//! `bulwark restore vm` on real libvirtd and QEMU: a running VM with a
//! qcow2 and a raw disk comes back as a new domain that boots, with its
//! disks equal to the snapshot and a new identity; two VMs come back from an
//! S3 repository in one command; existing names and files are refused; a
//! damaged chunk, a wrong key, an unreachable bucket, a full disk and
//! Ctrl-C leave no domain and no disk behind.

mod vm_common;
use vm_common as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use rand::{RngCore, SeedableRng};
use testbed::{Console, Image, Vm, VmOptions, BOOT_TIMEOUT};

/// `virsh` for cleanup and probes: whether it succeeded, nothing more.
fn virsh_ok(args: &[&str]) -> bool {
    Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn exists(name: &str) -> bool {
    virsh_ok(&["domuuid", name])
}

/// A second, raw disk with data, and a NIC with a fixed MAC.
fn extra_devices(env: &Env, seed: u64) -> (String, PathBuf) {
    let vdb = env.path(&format!("vdb-{seed}.raw"));
    let mut data = vec![0u8; 16 << 20];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data[..4 << 20]);
    std::fs::write(&vdb, &data).unwrap();
    let xml = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vdb' bus='virtio'/></disk>\
         <interface type='user'><mac address='52:54:00:0b:0b:{seed:02x}'/><model type='virtio'/></interface>",
        vdb.display()
    );
    (xml, vdb)
}

/// Asserts `image` (qcow2 or raw) holds what disk `disk` of `snap` holds.
fn assert_same_as_snapshot(env: &Env, snap: &str, disk: &str, image: &Path, format: &str) {
    let reference = env.path(&format!("ref-{}-{disk}.raw", &snap[..8]));
    if !reference.exists() {
        env.ok(&[
            "restore",
            "image",
            snap,
            "--disk",
            disk,
            "--to",
            reference.to_str().unwrap(),
        ]);
    }
    let out = Command::new("qemu-img")
        .args(["compare", "-f", format, "-F", "raw"])
        .arg(image)
        .arg(&reference)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} differs from {disk} of {snap}: {}",
        image.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn mac_of(name: &str) -> String {
    let xml = virsh(&["dumpxml", name]);
    let i = xml.find("<mac address='").expect("a mac") + 14;
    xml[i..i + 17].to_string()
}

#[test]
fn running_vm_comes_back_as_a_new_domain_that_boots() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let (devices, _vdb) = extra_devices(&env, 1);
    let mut vm = Vm::define(
        &image,
        VmOptions {
            devices_xml: Some(devices),
            ..VmOptions::default()
        },
    )
    .unwrap();
    vm.start().unwrap();
    vm.wait_ready(BOOT_TIMEOUT).unwrap();
    let name = vm.name().to_string();
    let r = env.backup(&name, &[]);
    assert_eq!(r["running"], true, "{r}");
    assert_eq!(r["disks"].as_array().unwrap().len(), 2, "{r}");
    let snap = r["snapshot"].as_str().unwrap().to_string();
    let images = env.path("images");
    let dir = images.to_str().unwrap();
    let new_name = testbed::unique_name("bw-restored");
    let look = format!("{new_name}-look");
    let mut restored = Restored(vec![new_name.clone(), look.clone()]);

    // Defined only: the disks equal the snapshot, bit for bit.
    let v = env.json(&[
        "restore",
        "vm",
        &snap,
        "--as",
        &look,
        "--storage-dir",
        dir,
        "--json",
    ]);
    assert_eq!(v[0]["ok"], true, "{v}");
    assert_eq!(v[0]["defined"], true);
    assert_eq!(v[0]["started"], false);
    assert_eq!(virsh(&["domstate", &look]).trim(), "shut off");
    for disk in ["vda", "vdb"] {
        let img = images.join(format!("{look}-{disk}.qcow2"));
        assert_same_as_snapshot(&env, &snap, disk, &img, "qcow2");
    }
    // --format raw gives raw images, equally exact.
    let raw_name = format!("{new_name}-raw");
    restored.0.push(raw_name.clone());
    env.ok(&[
        "restore",
        "vm",
        &snap,
        "--as",
        &raw_name,
        "--storage-dir",
        dir,
        "--format",
        "raw",
        "--disks-only",
    ]);
    assert!(!exists(&raw_name), "--disks-only defines nothing");
    assert_same_as_snapshot(
        &env,
        &snap,
        "vdb",
        &images.join(format!("{raw_name}-vdb.raw")),
        "raw",
    );

    // With --start: a new identity, and the guest boots from the restored disks.
    let v = env.json(&[
        "restore",
        "vm",
        &snap,
        "--as",
        &new_name,
        "--storage-dir",
        dir,
        "--start",
        "--json",
    ]);
    assert_eq!(v[0]["started"], true, "{v}");
    assert_eq!(virsh(&["domstate", &new_name]).trim(), "running");
    let mut console = Console::new(images.join(format!("{new_name}-serial0.log")));
    let ready = console.wait_ready(BOOT_TIMEOUT).unwrap();
    assert_eq!(ready.marker, image.marker());
    assert_ne!(virsh(&["domuuid", &new_name]), virsh(&["domuuid", &name]));
    assert_ne!(mac_of(&new_name), mac_of(&name));
    assert!(
        !virsh(&["dumpxml", &new_name]).contains("bulwark:policy"),
        "policies only with --protect"
    );
    drop(restored);
}

#[test]
fn refusals_and_a_damaged_chunk_leave_nothing_behind() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let vm = Vm::define(&image, VmOptions::default()).unwrap();
    let name = vm.name().to_string();
    let r = env.backup(&name, &[]);
    let snap = r["snapshot"].as_str().unwrap().to_string();
    let images = env.path("images");
    std::fs::create_dir_all(&images).unwrap();
    let dir = images.to_str().unwrap();
    let _restored = Restored(vec!["never-defined".into()]);

    // Into a directory storage pool: the volumes appear in it.
    let pool = testbed::unique_name("bw-pool");
    let pool_dir = env.path("pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    virsh(&[
        "pool-create-as",
        &pool,
        "dir",
        "--target",
        pool_dir.to_str().unwrap(),
    ]);
    struct Pool(String);
    impl Drop for Pool {
        fn drop(&mut self) {
            virsh_ok(&["pool-destroy", &self.0]);
        }
    }
    let _pool = Pool(pool.clone());
    let in_pool = testbed::unique_name("bw-inpool");
    let _restored_pool = Restored(vec![in_pool.clone()]);
    env.ok(&["restore", "vm", &snap, "--as", &in_pool, "--pool", &pool]);
    let vols = virsh(&["vol-list", &pool]);
    assert!(vols.contains(&format!("{in_pool}-vda.qcow2")), "{vols}");
    assert!(virsh(&["dumpxml", &in_pool]).contains(pool_dir.to_str().unwrap()));

    // Onto the source's own name: refused.
    let out = env.run(&["restore", "vm", &snap, "--as", &name, "--storage-dir", dir]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    // Onto an existing image file: refused, the file untouched.
    let taken = testbed::unique_name("bw-taken");
    let file = images.join(format!("{taken}-vda.qcow2"));
    std::fs::write(&file, b"mine").unwrap();
    let out = env.run(&["restore", "vm", &snap, "--as", &taken, "--storage-dir", dir]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    assert_eq!(std::fs::read(&file).unwrap(), b"mine");
    assert!(!exists(&taken));
    std::fs::remove_file(&file).unwrap();

    // Damage every pack: the restore fails, and leaves no domain or file.
    for p in testbed::files_under(&env.path("repo/data")).unwrap() {
        let mut b = std::fs::read(&p).unwrap();
        for x in b.iter_mut().skip(200).step_by(8192) {
            *x ^= 0x5a;
        }
        std::fs::write(&p, &b).unwrap();
    }
    let bad = testbed::unique_name("bw-damaged");
    let out = env.run(&[
        "restore",
        "vm",
        &snap,
        "--as",
        &bad,
        "--storage-dir",
        dir,
        "--start",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("damaged") || err.contains("authentication"),
        "{err}"
    );
    assert!(!exists(&bad));
    let left: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn two_vms_from_s3_in_one_command() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let bucket = S3Repo::start("vms");
    let s3 = |args: &[&str]| bucket.ok(&env, args);
    s3(&["repo", "init"]);
    let mut snaps = Vec::new();
    let mut vms = Vec::new();
    for seed in [2, 3] {
        let (devices, _) = extra_devices(&env, seed);
        let vm = Vm::define(
            &image,
            VmOptions {
                devices_xml: Some(devices),
                ..VmOptions::default()
            },
        )
        .unwrap();
        let r: serde_json::Value =
            serde_json::from_str(&s3(&["backup", "vm", vm.name(), "--json"])).unwrap();
        snaps.push(r["snapshot"].as_str().unwrap().to_string());
        vms.push(vm);
    }
    let names: Vec<String> = (0..2)
        .map(|i| testbed::unique_name(&format!("bw-s3r{i}")))
        .collect();
    let _restored = Restored(names.clone());
    let images = env.path("images");
    let specs: Vec<String> = snaps
        .iter()
        .zip(&names)
        .map(|(s, n)| format!("{s}:{n}"))
        .collect();
    let mut args = vec!["restore", "vm"];
    args.extend(specs.iter().map(String::as_str));
    args.extend(["--storage-dir", images.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&s3(&args)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    for (i, n) in names.iter().enumerate() {
        let r = v
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n.as_str())
            .unwrap();
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["snapshot"].as_str(), Some(snaps[i].as_str()));
        assert!(exists(n));
        // The raw disk of each holds its own VM's data.
        let vdb = images.join(format!("{n}-vdb.qcow2"));
        let reference = env.path(&format!("vdb-{}.raw", i + 2));
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&vdb)
            .arg(&reference)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{n}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A UEFI domain (pflash loader, NVRAM file): the variables are backed up
/// with the disks and restored next to them, and the new domain points at
/// its own copy. (Defined only: the test host has no OVMF to boot it.)
#[test]
fn uefi_variables_travel_with_the_vm() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let dir = env.path("uefi");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.raw");
    std::fs::copy(image.raw(), &disk).unwrap();
    let vars = dir.join("VARS.fd");
    let mut nv = vec![0u8; 128 << 10];
    rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut nv);
    std::fs::write(&vars, &nv).unwrap();
    let name = testbed::unique_name("bw-uefi");
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>\
         <features><acpi/></features>\
         <os><type arch='x86_64' machine='q35'>hvm</type>\
         <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>\
         <nvram>{}</nvram></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        vars.display(),
        disk.display()
    );
    let xml_path = dir.join("domain.xml");
    std::fs::write(&xml_path, xml).unwrap();
    let new_name = format!("{name}-r");
    let _domains = Restored(vec![name.clone(), new_name.clone()]);
    virsh(&["define", xml_path.to_str().unwrap()]);
    let r = env.backup(&name, &[]);
    assert_eq!(r["nvram"].as_str(), vars.to_str(), "{r}");
    let snap = r["snapshot"].as_str().unwrap().to_string();
    let images = env.path("images");
    let v = env.json(&[
        "restore",
        "vm",
        &snap,
        "--as",
        &new_name,
        "--storage-dir",
        images.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(v[0]["ok"], true, "{v}");
    let restored = images.join(format!("{new_name}_VARS.fd"));
    assert_eq!(v[0]["nvram"].as_str(), restored.to_str());
    assert!(std::fs::read(&restored).unwrap() == nv, "NVRAM differs");
    let new_xml = virsh(&["dumpxml", "--inactive", &new_name]);
    assert!(
        new_xml.contains(&format!(">{}</nvram>", restored.display())),
        "{new_xml}"
    );
    assert_same_as_snapshot(
        &env,
        &snap,
        "vda",
        &images.join(format!("{new_name}-vda.qcow2")),
        "qcow2",
    );
}

/// Every file under `dir` (none if it does not exist).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    testbed::files_under(dir).unwrap_or_default()
}

/// A small tmpfs, unmounted when dropped: a disk that fills up.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: PathBuf, size: &str) -> SmallFs {
        std::fs::create_dir_all(&at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs (the tests run as root)");
        SmallFs(at)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A restore that fails for any cause, or is interrupted with Ctrl-C,
/// names the cause, exits non-zero and leaves no domain and no file:
/// wrong key, unreachable bucket, full disk, SIGINT in the middle.
#[test]
fn failed_or_interrupted_restores_leave_nothing_behind() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let bucket = S3Repo::start("cleanup");
    bucket.ok(&env, &["repo", "init"]);
    let vm = Vm::define(&image, VmOptions::default()).unwrap();
    let out = bucket.ok(&env, &["backup", "vm", vm.name(), "--json"]);
    let snap = serde_json::from_str::<serde_json::Value>(&out).unwrap()["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let name = testbed::unique_name("bw-undo");
    let _restored = Restored(vec![name.clone()]);
    // Each case's command: the restore, with `vars` over the bucket's.
    let restore = |dir: &Path, vars: &[(&str, String)]| {
        let mut c = env.cmd(&[
            "restore",
            "vm",
            &snap,
            "--as",
            &name,
            "--storage-dir",
            dir.to_str().unwrap(),
            "--no-cache",
            "--s3-max-attempts",
            "2",
        ]);
        c.envs(bucket.server.env())
            .env("BULWARK_REPO", &bucket.repo);
        for (k, v) in vars {
            c.env(k, v);
        }
        c
    };
    let assert_clean = |what: &str, dir: &Path| {
        assert!(!exists(&name), "{what}: the domain is left");
        assert_eq!(files_in(dir), Vec::<PathBuf>::new(), "{what}: files left");
    };

    let dir = env.path("wrong-key");
    let out = restore(&dir, &[("BULWARK_PASSWORD", "not it".into())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("passphrase"), "{err}");
    assert_clean("wrong key", &dir);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = env.path("unreachable");
    let out = restore(
        &dir,
        &[("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unreachable"),
        "{err}"
    );
    assert_clean("unreachable bucket", &dir);

    // 8 MiB for a disk with about 26 MiB of data.
    let small = SmallFs::mount(env.path("small"), "8m");
    let out = restore(&small.0, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("No space left"),
        "{err}"
    );
    assert_clean("full disk", &small.0);
    drop(small);

    // Slowed down by 300 ms per S3 request, interrupted once the disk
    // file exists.
    let proxy = testbed::s3::FaultProxy::start(
        bucket.server.port(),
        testbed::s3::Faults {
            latency: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .unwrap();
    let dir = env.path("interrupted");
    let child = restore(&dir, &[("AWS_ENDPOINT_URL", proxy.endpoint())])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the restore's first file", 60, || {
        (!files_in(&dir).is_empty()).then_some(())
    });
    // SAFETY: a plain kill(2) of the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_clean("Ctrl-C", &dir);
}
