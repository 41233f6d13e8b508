//! Live restore end to end: a VM snapshot in an S3 bucket (a replica, the
//! source deleted) boots at once as a new domain, reading through `bulwark-nbd`, while the agent streams its
//! disk into a local overlay; the server is killed and the agent restarted
//! in the middle, and the restore still completes with nothing lost.

mod vm_common;
use vm_common as common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::*;
use testbed::{Console, Image, Vm, VmOptions, BOOT_TIMEOUT};

fn status(env: &Env, name: &str) -> serde_json::Value {
    env.json(&["restore", "status", name, "--json"])[0].clone()
}

#[test]
fn live_restore_from_s3_boots_at_once_and_survives_server_and_agent_restarts() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let mut bucket = S3Repo::start("live");
    let pw = env.path("pw");
    std::fs::write(&pw, PW).unwrap();
    bucket.ok(&env, &["repo", "init"]);
    let vm = Vm::define(&image, VmOptions::default()).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&bucket.ok(&env, &["backup", "vm", vm.name(), "--json"])).unwrap();
    let snap = r["snapshot"].as_str().unwrap().to_string();
    // Refused after its server was started (a live restore starts it before
    // it reads the snapshot): the server is stopped, its files are gone.
    let out = env
        .cmd(&[
            "restore",
            "vm",
            &snap,
            "--as",
            vm.name(),
            "--live",
            "--wait",
            "--storage-dir",
            env.path("refused").to_str().unwrap(),
        ])
        .envs(bucket.server.env())
        .env("BULWARK_REPO", &bucket.repo)
        .env("BULWARK_PASSWORD", PW)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("exists already"),
        "{err}"
    );
    let live_dir = env.state_dir().join("live");
    for ext in ["sock", "nbd.log", "nbd.stats"] {
        let f = live_dir.join(format!("{}.{ext}", vm.name()));
        assert!(!f.exists(), "{} left behind", f.display());
    }
    let sock = live_dir.join(format!("{}.sock", vm.name()));
    let stray = Command::new("pgrep")
        .args(["-f", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!stray.status.success(), "a server still runs: {stray:?}");
    // The host never saw the VM: everything comes from the bucket.
    drop(vm);

    // The backup site's copy: a replica synced without the key, then the
    // source deleted. Everything below reads the replica alone.
    let source = bucket.repo.clone();
    bucket.repo = format!("{source}-offsite");
    bucket.ok(&env, &["repo", "init", "--replica-of", &source]);
    let replica = bucket.repo.clone();
    let synced: serde_json::Value = serde_json::from_str(&bucket.ok(
        &env,
        &["sync", "--from", &source, "--to", &replica, "--json"],
    ))
    .unwrap();
    assert_eq!(synced["snapshots_copied"], 1, "{synced}");
    let bucket_name = source["s3://".len()..].split('/').next().unwrap();
    std::fs::remove_dir_all(bucket.server.bucket_dir(bucket_name).join("live")).unwrap();
    let s3 = |args: &[&str]| bucket.ok(&env, args);

    let agent = Agent::start_with(&env, 3600, "", bucket.server.env());
    let name = testbed::unique_name("bw-live");
    let _domains = Restored(vec![name.clone()]);
    let images = env.path("images");
    let t0 = Instant::now();
    s3(&[
        "restore",
        "vm",
        &snap,
        "--as",
        &name,
        "--storage-dir",
        images.to_str().unwrap(),
        "--live",
        "--agent-socket",
        agent.socket.to_str().unwrap(),
        "--password-file",
        pw.to_str().unwrap(),
        // Slow enough that everything below happens during the stream.
        "--stream-mib-per-sec",
        "1",
    ]);
    let returned = t0.elapsed();
    let mut console = Console::new(images.join(format!("{name}-serial0.log")));
    let ready = console.wait_ready(BOOT_TIMEOUT).unwrap();
    assert_eq!(ready.marker, image.marker());
    eprintln!(
        "live restore: command returned after {:.1}s, guest ready after {:.1}s",
        returned.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(status(&env, &name)["phase"], "streaming");

    // A host-side write into the running VM during the stream.
    let off = image.scratch_offset();
    testbed::domain_qemu_io(&name, &format!("write -P 0x5a {off} 64k")).unwrap();

    // kill -9 of the server: the VM keeps running, the agent restarts it,
    // and a read of a range the stream has not reached yet waits for the
    // new server instead of failing.
    let unstreamed = off + (4 << 20);
    let s = status(&env, &name);
    assert_eq!(
        s["disks"][0]["on_base"], false,
        "the disk reads from its backfilled file already: {s}"
    );
    let pid = s["server_pid"].as_u64().unwrap();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    testbed::domain_qemu_io(&name, &format!("read {unstreamed} 64k"))
        .expect("a read during the server's restart waits for it");
    wait_for("the server's restart", 60, || {
        (status(&env, &name)["server_restarts"].as_u64() >= Some(1)).then_some(())
    });
    assert_eq!(virsh(&["domstate", &name]).trim(), "running");

    // The agent restarts too: the new one picks the restore up.
    drop(agent);
    assert_eq!(status(&env, &name)["phase"], "streaming");
    let _agent = Agent::start_with(&env, 3600, "", bucket.server.env());
    let done = wait_for("the end of the stream", 600, || {
        let s = status(&env, &name);
        assert!(s["phase"] == "streaming" || s["phase"] == "done", "{s}");
        (s["phase"] == "done").then_some(s)
    });
    assert_eq!(done["bytes_done"], done["bytes_total"], "{done}");

    // Local alone: no backing in libvirt's view or in the image.
    let xml = virsh(&["dumpxml", &name]);
    assert!(!xml.contains("protocol='nbd'"), "{xml}");
    let overlay = images.join(format!("{name}-vda.qcow2"));
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&overlay)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    // The written range still holds the write, read through the live VM.
    testbed::domain_qemu_io(&name, &format!("read -P 0x5a {off} 64k")).unwrap();

    // Outside the guest's filesystem (which it writes as it boots) the disk
    // equals the snapshot exactly, but for the range written above.
    virsh(&["destroy", &name]);
    let reference = env.path("ref.raw");
    s3(&[
        "restore",
        "image",
        &snap,
        "--to",
        reference.to_str().unwrap(),
    ]);
    let mut want = std::fs::read(&reference).unwrap();
    want[off as usize..off as usize + (64 << 10)].fill(0x5a);
    let got_raw = env.path("got.raw");
    qemu_img_to_raw(&overlay, &got_raw);
    let got = std::fs::read(&got_raw).unwrap();
    assert_eq!(got.len(), want.len());
    let (p0, p1) = (
        image.partition_offset() as usize,
        (image.partition_offset() + image.partition_size()) as usize,
    );
    assert!(
        got[..p0] == want[..p0],
        "the disk before the partition differs"
    );
    assert!(
        got[p1..] == want[p1..],
        "the disk after the partition differs"
    );
    // And the guest's files are the snapshot's.
    for f in ["/data/random.bin", "/data/text.txt", "/marker"] {
        let w = image.read_guest_file(&reference, f).unwrap();
        assert_eq!(image.read_guest_file(&got_raw, f).unwrap(), w, "{f}");
    }
}

fn qemu_img_to_raw(from: &Path, to: &Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// `restore vm SNAP --as NAME --storage-dir IMAGES --live --wait EXTRA...`
/// in the background; `s3` adds a bucket's credentials and repository.
fn spawn_live(
    env: &Env,
    snap: &str,
    name: &str,
    images: &Path,
    extra: &[&str],
    s3: Option<&S3Repo>,
) -> std::process::Child {
    let mut args = vec![
        "restore",
        "vm",
        snap,
        "--as",
        name,
        "--storage-dir",
        images.to_str().unwrap(),
        "--live",
        "--wait",
    ];
    args.extend_from_slice(extra);
    let mut cmd = env.cmd(&args);
    if let Some(b) = s3 {
        cmd.envs(b.server.env()).env("BULWARK_REPO", &b.repo);
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the server of restore `name` listens: it has found the
/// snapshot (its reads wait until the disks are open), and the domain
/// starts right after.
fn wait_for_server(env: &Env, name: &str) {
    let socket = env.state_dir().join("live").join(format!("{name}.sock"));
    wait_for("the server's socket", 120, || socket.exists().then_some(()));
}

/// The live restore `child` ended well and its record says done.
fn assert_done(env: &Env, name: &str, child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the live restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(env, name);
    assert_eq!(s["phase"], "done", "{s}");
    s
}

/// `restore image` of `snap`'s disk from `bucket` into the env's dir: the
/// reference a live-restored disk is compared with.
fn restore_reference(env: &Env, bucket: &S3Repo, snap: &str) -> std::path::PathBuf {
    let reference = env.path("ref.raw");
    bucket.ok(
        env,
        &[
            "restore",
            "image",
            snap,
            "--to",
            reference.to_str().unwrap(),
        ],
    );
    reference
}

/// The server's log of restore `name`.
fn server_log(env: &Env, name: &str) -> String {
    std::fs::read_to_string(env.state_dir().join("live").join(format!("{name}.nbd.log"))).unwrap()
}

/// The guest's files on `name`'s overlay equal those of `reference` (the
/// snapshot restored raw).
fn assert_guest_files(env: &Env, image: &Image, reference: &Path, overlay: &Path) -> Vec<u8> {
    let got_raw = env.path("got.raw");
    qemu_img_to_raw(overlay, &got_raw);
    for f in ["/data/random.bin", "/data/text.txt", "/marker"] {
        let w = image.read_guest_file(reference, f).unwrap();
        assert_eq!(image.read_guest_file(&got_raw, f).unwrap(), w, "{f}");
    }
    std::fs::read(&got_raw).unwrap()
}

/// A chunk damaged in the repository: guest reads of it fail with EIO, the
/// stream gives up and the restore is marked failed naming the failed read,
/// and what was written into the VM is still there.
#[test]
fn a_damaged_chunk_fails_the_live_restore_keeps_guest_writes_and_retry_finishes_it() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let vm = Vm::define(&image, VmOptions::default()).unwrap();
    env.backup(vm.name(), &[]);
    // A second backup whose only new data, a MiB of the scratch area, lands
    // in packs of its own: the ones damaged below.
    let packs = || testbed::files_under(&env.path("repo/data")).unwrap();
    let old_packs = packs();
    let bad = image.scratch_offset() + (1 << 20);
    let st = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("write -P 0x77 {bad} 1M")])
        .arg(vm.disk_path())
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let r = env.backup(vm.name(), &[]);
    assert_eq!(r["mode"], "incremental", "{r}");
    let snap = r["snapshot"].as_str().unwrap().to_string();
    let new_packs: Vec<_> = packs()
        .into_iter()
        .filter(|p| !old_packs.contains(p))
        .collect();
    assert!(!new_packs.is_empty());
    drop(vm);
    // Damaged before the restore starts: the guest boots from the first
    // backup's packs and never reads the scratch area; the stream and the
    // read below meet the damage.
    let originals: Vec<Vec<u8>> = new_packs
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    for p in &new_packs {
        // (A MiB of one byte compresses to a pack of a few dozen bytes.)
        let mut b = std::fs::read(p).unwrap();
        for x in b.iter_mut().step_by(7) {
            *x ^= 0x5a;
        }
        std::fs::write(p, &b).unwrap();
    }

    let name = testbed::unique_name("bw-livebad");
    let _domains = Restored(vec![name.clone()]);
    let images = env.path("images");
    // --wait: supervised in the foreground, no agent.
    let child = env
        .cmd(&[
            "restore",
            "vm",
            &snap,
            "--as",
            &name,
            "--storage-dir",
            images.to_str().unwrap(),
            "--live",
            "--wait",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut console = Console::new(images.join(format!("{name}-serial0.log")));
    console.wait_ready(BOOT_TIMEOUT).unwrap();
    let off = image.scratch_offset();
    testbed::domain_qemu_io(&name, &format!("write -P 0x3c {off} 64k")).unwrap();
    // Reading the damaged MiB: EIO in the VM, never wrong data.
    let err = testbed::domain_qemu_io(&name, &format!("read {bad} 1M")).unwrap_err();
    assert!(err.to_string().contains("Input/output error"), "{err}");

    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed live restore exits 1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(&env, &name);
    let why = s["reason"].as_str().unwrap_or_default();
    assert_eq!(s["phase"], "failed", "{s}");
    assert!(
        why.contains("damaged") || why.contains("authentication") || why.contains("chunk"),
        "the failed read is named: {why}"
    );
    // The VM and its overlay stay; the write is still there.
    assert_eq!(virsh(&["domstate", &name]).trim(), "running");
    testbed::domain_qemu_io(&name, &format!("read -P 0x3c {off} 64k")).unwrap();
    // A failed restore waits for the operator: with the packs repaired,
    // `restore retry` streams again to the end, the guest's write kept.
    for (p, b) in new_packs.iter().zip(&originals) {
        std::fs::write(p, b).unwrap();
    }
    let out = env.run(&["restore", "retry", &name, "--wait"]);
    assert!(out.status.success(), "retry: {out:?}");
    let s = status(&env, &name);
    assert_eq!(s["phase"], "done", "{s}");
    testbed::domain_qemu_io(&name, &format!("read -P 0x3c {off} 64k")).unwrap();
    testbed::domain_qemu_io(&name, &format!("read -P 0x77 {bad} 1M")).unwrap();
    // A done restore is a VM like any other: cancel refuses to destroy it.
    let out = env.run(&["restore", "cancel", &name]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is done"),
        "{out:?}"
    );
    assert_eq!(virsh(&["domstate", &name]).trim(), "running");
    let out = env.run(&["restore", "retry", &name]);
    assert!(
        !out.status.success(),
        "a done restore cannot be retried: {out:?}"
    );
}

/// The bucket unreachable for 60 s from the moment the guest starts: every
/// read of the guest's boot and of the stream waits (QEMU sees no error),
/// the guest comes up once the bucket is back, the stream ends, the guest's
/// write and the snapshot's data are there.
#[test]
fn a_bucket_outage_of_a_minute_makes_reads_wait_not_fail() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let bucket = S3Repo::start("outage");
    bucket.ok(&env, &["repo", "init"]);
    // Data in the scratch area, a pattern per MiB: read back below.
    let data = Patterned::backed_up(&env, &bucket, &image, 0x30);
    let (snap, scratch) = (data.snap.clone(), data.scratch);

    // The restore reads the bucket through the proxy, a second away until
    // the outage: the server serves (its socket is there) a round trip or
    // more before it can ask for a pack, so the outage below begins before
    // the backfill or the guest read any (on loopback the backfill of this
    // small disk took 0.1 s, and was done before the outage began).
    let far = testbed::s3::Faults {
        delay: std::time::Duration::from_secs(1),
        ..Default::default()
    };
    let proxy = testbed::s3::FaultProxy::start(bucket.server.port(), far).unwrap();
    let name = testbed::unique_name("bw-outage");
    let _domains = Restored(vec![name.clone()]);
    let images = env.path("images");
    let endpoint = proxy.endpoint();
    let child = spawn_live(
        &env,
        &snap,
        &name,
        &images,
        &["--s3-endpoint", &endpoint],
        Some(&bucket),
    );
    // The outage begins before the guest's first read.
    wait_for_server(&env, &name);
    proxy.set(testbed::s3::Faults {
        outage: true,
        ..Default::default()
    });
    let outage = Instant::now();
    let mut console = Console::new(images.join(format!("{name}-serial0.log")));
    std::thread::sleep(std::time::Duration::from_secs(60));
    let log = env.state_dir().join("live").join(format!("{name}.nbd.log"));
    assert!(
        console
            .text()
            .lines()
            .all(|l| !l.contains("bulwark-guest: ready")),
        "the guest came up during the outage: it never waited for the bucket: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let state = virsh(&["domstate", "--reason", &name]);
    // Up, or still starting: QEMU's own first reads wait as well.
    assert!(
        ["running (booted)", "paused (starting up)"].contains(&state.trim()),
        "{state}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    proxy.set(testbed::s3::Faults::default());
    let ended = outage.elapsed();
    let ready = console.wait_ready(BOOT_TIMEOUT).unwrap();
    assert_eq!(ready.marker, image.marker());
    eprintln!(
        "outage of {:.0}s; guest ready {:.1}s after it began",
        ended.as_secs_f64(),
        outage.elapsed().as_secs_f64()
    );
    let resets = proxy
        .stats
        .outage_resets
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(resets > 0, "no request met the outage: {:?}", proxy.stats);

    let off = scratch;
    testbed::domain_qemu_io(&name, &format!("write -P 0x5a {off} 64k")).unwrap();
    let s = assert_done(&env, &name, child);
    assert_eq!(s["server_restarts"], 0, "{s}");
    let stall = s["stall_seconds"].as_f64().unwrap_or_default();
    assert!(stall >= 30.0, "reads waited {stall}s in all: {s}");
    let text = console.text();
    for bad in ["I/O error", "bulwark-guest: error", "EXT4-fs error"] {
        assert!(!text.contains(bad), "the guest saw {bad:?}:\n{text}");
    }
    // The guest's write, and every MiB of the snapshot's scratch data.
    testbed::domain_qemu_io(&name, &format!("read -P 0x5a {off} 64k")).unwrap();
    data.assert_in(&name);
}

/// A backup in a bucket of a tiny VM with a pattern per MiB of its
/// scratch area (`first + k` in MiB k, for k in 1..8): what a live
/// restore's disk is read back against.
struct Patterned {
    snap: String,
    scratch: u64,
    first: u64,
}

impl Patterned {
    fn backed_up(env: &Env, bucket: &S3Repo, image: &Image, first: u64) -> Self {
        let vm = Vm::define(image, VmOptions::default()).unwrap();
        let scratch = image.scratch_offset();
        for k in 1..8u64 {
            let st = Command::new("qemu-io")
                .args([
                    "-f",
                    "qcow2",
                    "-c",
                    &format!("write -P {} {} 1M", first + k, scratch + (k << 20)),
                ])
                .arg(vm.disk_path())
                .output()
                .unwrap();
            assert!(st.status.success(), "{st:?}");
        }
        let r: serde_json::Value =
            serde_json::from_str(&bucket.ok(env, &["backup", "vm", vm.name(), "--json"])).unwrap();
        Patterned {
            snap: r["snapshot"].as_str().unwrap().to_string(),
            scratch,
            first,
        }
    }

    /// Every MiB of the pattern reads back from the domain `name`'s disk.
    fn assert_in(&self, name: &str) {
        for k in 1..8u64 {
            let at = self.scratch + (k << 20);
            testbed::domain_qemu_io(name, &format!("read -P {} {at} 1M", self.first + k)).unwrap();
        }
    }
}

/// When an outage longer than `--outage-wait` begins: the proxy holds
/// the first request of that step until the outage, whatever the timing.
#[derive(Clone, Copy, Debug)]
enum OutageBegins {
    /// As the server opens its disks (its first fetch of a chunk list; the
    /// command fetches none): it has found the snapshot and its socket
    /// listens, and it will not serve.
    WhileTheServerOpens,
    /// At the first fetch from a pack (`data/`): the server's disks are
    /// open, and the backfill (or the guest) reads data.
    WhileItStreams,
}

impl OutageBegins {
    /// The request the proxy holds until the outage.
    fn held(self) -> &'static str {
        match self {
            OutageBegins::WhileTheServerOpens => "/chunklists/",
            OutageBegins::WhileItStreams => "/data/",
        }
    }

    /// The step the failed restore's reason names.
    fn failed_step(self) -> &'static str {
        match self {
            OutageBegins::WhileTheServerOpens => "no bulwark-nbd has served",
            OutageBegins::WhileItStreams => "the backfill of vda failed",
        }
    }
}

/// `child`'s output, once it exits within `secs`; killed and failed if not.
fn output_within(child: std::process::Child, secs: u64) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("the command did not end within {secs} s");
        }
    }
}

/// An outage longer than `--outage-wait`: the restore fails, as it says,
/// with the VM and a write into it kept; once the bucket is back `restore
/// retry` resumes it to the end, and every byte of the snapshot and the
/// write are there.
fn a_long_outage(begins: OutageBegins) {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let bucket = S3Repo::start("long-outage");
    bucket.ok(&env, &["repo", "init"]);
    let data = Patterned::backed_up(&env, &bucket, &image, 0x40);
    let (snap, scratch) = (data.snap.clone(), data.scratch);

    let faults = testbed::s3::Faults {
        hold: Some(begins.held().into()),
        ..Default::default()
    };
    let proxy = testbed::s3::FaultProxy::start(bucket.server.port(), faults).unwrap();
    let name = testbed::unique_name("bw-longout");
    let _domains = Restored(vec![name.clone()]);
    let images = env.path("images");
    let endpoint = proxy.endpoint();
    let child = spawn_live(
        &env,
        &snap,
        &name,
        &images,
        &["--s3-endpoint", &endpoint, "--outage-wait", "5s"],
        Some(&bucket),
    );
    // The command is done with the bucket once it defined the domain (the
    // boot set it may still look up is only a speed-up; QEMU's start
    // waits on the server); the server's counters say its disks are open.
    let libvirt = testbed::TestBed::ensure().unwrap();
    wait_for("the domain", 120, || {
        libvirt.virsh(["domstate", &name]).ok().map(drop)
    });
    let stats = env
        .state_dir()
        .join("live")
        .join(format!("{name}.nbd.stats"));
    if let OutageBegins::WhileItStreams = begins {
        wait_for("the server's counters", 120, || {
            stats.exists().then_some(())
        });
    }
    proxy.set(testbed::s3::Faults {
        outage: true,
        ..Default::default()
    });
    // Within the wait, the servers' own tries to open the repository and
    // a margin; a supervisor restarting servers without end never returns.
    let out = output_within(child, 180);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed live restore exits 1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(&env, &name);
    assert_eq!(s["phase"], "failed", "{s}");
    let why = s["reason"].as_str().unwrap_or_default();
    assert!(why.contains("unreachable"), "the outage is named: {why}");
    assert!(why.contains(begins.failed_step()), "{begins:?}: {why}");
    eprintln!("{begins:?}: the restore failed: {why}");
    // Counters are written once the disks are open.
    let opened = matches!(begins, OutageBegins::WhileItStreams);
    assert_eq!(stats.exists(), opened, "{}", server_log(&env, &name));
    let resets = proxy
        .stats
        .outage_resets
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(resets > 0, "no request met the outage: {:?}", proxy.stats);
    // The VM and its overlay stay, and take writes (its guest's reads
    // failed after the wait).
    assert_eq!(virsh(&["domstate", &name]).trim(), "running");
    let off = scratch;
    testbed::domain_qemu_io(&name, &format!("write -P 0x6b {off} 64k")).unwrap();

    // The bucket back, the operator resumes the restore.
    proxy.set(testbed::s3::Faults::default());
    let out = env
        .cmd(&["restore", "retry", &name, "--wait"])
        .envs(bucket.server.env())
        .output()
        .unwrap();
    assert!(out.status.success(), "retry: {out:?}");
    let s = status(&env, &name);
    assert_eq!(s["phase"], "done", "{s}");
    testbed::domain_qemu_io(&name, &format!("read -P 0x6b {off} 64k")).unwrap();
    data.assert_in(&name);
}

/// The outage meets the server while it loads its index: every server
/// started again gives up opening the repository, and after the wait the
/// restore fails (it used to start servers without end).
#[test]
fn an_outage_longer_than_the_wait_while_the_server_opens_fails_the_restore_and_retry_resumes_it() {
    a_long_outage(OutageBegins::WhileTheServerOpens);
}

/// The outage meets the backfill: it fails after the wait, and so does
/// the restore.
#[test]
fn an_outage_longer_than_the_wait_while_it_streams_fails_the_restore_and_retry_resumes_it() {
    a_long_outage(OutageBegins::WhileItStreams);
}

/// The bucket unreachable from the guest's start, a replica named: the
/// server reads the replica, the guest comes up and the disks are
/// restored during the outage.
#[test]
fn a_live_restore_reads_the_replica_while_the_bucket_is_down() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let bucket = S3Repo::start("primary");
    bucket.ok(&env, &["repo", "init"]);
    let vm = Vm::define(&image, VmOptions::default()).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&bucket.ok(&env, &["backup", "vm", vm.name(), "--json"])).unwrap();
    let snap = r["snapshot"].as_str().unwrap().to_string();
    drop(vm);
    // The second site: a directory replica, synced.
    let replica = env.path("replica");
    let replica = replica.to_str().unwrap();
    bucket.ok(
        &env,
        &[
            "--repo",
            replica,
            "repo",
            "init",
            "--replica-of",
            &bucket.repo,
        ],
    );
    bucket.ok(&env, &["sync", "--from", &bucket.repo, "--to", replica]);

    // A second away until the outage, which so begins before the backfill
    // (or the guest) reads a pack (see the outage test above).
    let far = testbed::s3::Faults {
        delay: std::time::Duration::from_secs(1),
        ..Default::default()
    };
    let proxy = testbed::s3::FaultProxy::start(bucket.server.port(), far).unwrap();
    let name = testbed::unique_name("bw-replica");
    let _domains = Restored(vec![name.clone()]);
    let images = env.path("images");
    let endpoint = proxy.endpoint();
    let child = spawn_live(
        &env,
        &snap,
        &name,
        &images,
        &["--s3-endpoint", &endpoint, "--replica", replica],
        Some(&bucket),
    );
    wait_for_server(&env, &name);
    proxy.set(testbed::s3::Faults {
        outage: true,
        ..Default::default()
    });
    let mut console = Console::new(images.join(format!("{name}-serial0.log")));
    let ready = console.wait_ready(BOOT_TIMEOUT).unwrap();
    assert_eq!(ready.marker, image.marker());
    let off = image.scratch_offset();
    testbed::domain_qemu_io(&name, &format!("write -P 0x5a {off} 64k")).unwrap();
    assert_done(&env, &name, child);
    // All of it while the bucket was down.
    let resets = proxy
        .stats
        .outage_resets
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(resets > 0, "nothing met the outage: {:?}", proxy.stats);
    // The guest's reads and the backfill turned to the replica (the guest
    // may have read only what the backfill had written by then).
    let log = server_log(&env, &name);
    assert!(
        log.contains("backfill of vda: reading from the replica"),
        "{log}"
    );
    proxy.set(testbed::s3::Faults::default());
    testbed::domain_qemu_io(&name, &format!("read -P 0x5a {off} 64k")).unwrap();
    virsh(&["destroy", &name]);
    let reference = restore_reference(&env, &bucket, &snap);
    assert_guest_files(
        &env,
        &image,
        &reference,
        &images.join(format!("{name}-vda.qcow2")),
    );
}

/// A GC repacks and sweeps (`gc --grace 0s`, twice) the packs a live
/// restore streams from (an S3 bucket, 20 ms away through the fault proxy):
/// the server reads the chunks' new copies, the stream ends, and the disk
/// is the snapshot's.
#[test]
fn a_live_restore_streams_on_while_gc_repacks_and_sweeps_its_packs() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let bucket = S3Repo::start("gc");
    bucket.ok(&env, &["repo", "init"]);
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&bucket.ok(&env, args)).unwrap()
    };
    let vm = Vm::define(&image, VmOptions::default()).unwrap();
    let scratch = image.scratch_offset();
    let qemu_io = |cmd: &str| {
        let st = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(vm.disk_path())
            .output()
            .unwrap();
        assert!(st.status.success(), "{cmd}: {st:?}");
    };
    // 256 MiB of random data past the partitions, beyond what the server
    // reads ahead of a slow stream (a quarter of its cache) for a while.
    let (far, far_len) = (192u64 << 20, 256u64 << 20);
    let st = Command::new("qemu-img")
        .args(["resize", "-f", "qcow2"])
        .arg(vm.disk_path())
        .arg("512M")
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let random = env.path("random.bin");
    let mut rng_data = vec![0u8; far_len as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in rng_data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    std::fs::write(&random, &rng_data).unwrap();
    drop(rng_data);
    qemu_io(&format!("write -s {} {far} {far_len}", random.display()));
    json(&["backup", "vm", vm.name(), "--json"]);
    // The second snapshot changes 64 KiB in every 16 MiB of it: once the
    // first is pruned, every pack of that data holds a dead chunk, so a GC
    // repacks all of them.
    for k in 0..far_len >> 24 {
        qemu_io(&format!("write -P 0x42 {} 64k", far + (k << 24)));
    }
    let r = json(&["backup", "vm", vm.name(), "--json"]);
    let snap = r["snapshot"].as_str().unwrap().to_string();
    drop(vm);
    // The bucket's objects are files of the S3 server's directory.
    let bucket_name = bucket.repo["s3://".len()..].split('/').next().unwrap();
    let data = bucket.server.bucket_dir(bucket_name).join("gc/data");
    let packs = || testbed::files_under(&data).unwrap();
    let before = packs();

    let name = testbed::unique_name("bw-livegc");
    let _domains = Restored(vec![name.clone()]);
    let images = env.path("images");
    // The backfill takes a minute: the GC and the read below happen early
    // in it, even on a loaded host (at 10 MiB/s a slow domain start once
    // let the backfill end before the read, which then met no gone pack).
    // The restore reads the bucket 20 ms away, through the proxy; the
    // prune and the GC run beside it, from another host as it were.
    let near = testbed::s3::Faults {
        delay: std::time::Duration::from_millis(20),
        ..Default::default()
    };
    let proxy = testbed::s3::FaultProxy::start(bucket.server.port(), near).unwrap();
    let endpoint = proxy.endpoint();
    let child = spawn_live(
        &env,
        &snap,
        &name,
        &images,
        &["--s3-endpoint", &endpoint, "--stream-mib-per-sec", "5"],
        Some(&bucket),
    );
    wait_for_server(&env, &name);

    let pruned = json(&["prune", "--keep-last", "1", "--json"]);
    eprintln!("prune: {pruned}");
    for _ in 0..2 {
        let gc = json(&["gc", "--grace", "0s", "--repack-below", "100", "--json"]);
        eprintln!("gc: {gc}");
    }
    let after = packs();
    let gone = before.iter().filter(|p| !after.contains(p)).count();
    assert!(gone > 0, "the GC deleted no pack");
    let s = status(&env, &name);
    assert_eq!(s["phase"], "streaming", "{s}");
    assert_eq!(
        s["disks"][0]["on_base"], false,
        "backfilled before the GC: {s}"
    );
    // Reads of data the server has not read yet: their packs are gone.
    // In the middle of the far data: a full pack (16 MiB of it) always
    // holds a dead chunk there, while the last one may not (the end of the
    // data cuts it short), and the server's read-ahead behind the guest's
    // boot (up to a quarter of its cache past the partition's data) never
    // gets there.
    wait_for("the domain", 60, || {
        (virsh(&["domstate", &name]).trim() == "running").then_some(())
    });
    for k in [5u64, 9] {
        let far_read = far + (k << 24) + (8 << 20);
        testbed::domain_qemu_io(&name, &format!("read {far_read} 64k")).unwrap();
    }
    let s = status(&env, &name);
    assert_eq!(
        s["disks"][0]["on_base"], false,
        "backfilled before the read: {s}"
    );
    let mut console = Console::new(images.join(format!("{name}-serial0.log")));
    console.wait_ready(BOOT_TIMEOUT).unwrap();
    let off = scratch + (4 << 20);
    testbed::domain_qemu_io(&name, &format!("write -P 0x5a {off} 64k")).unwrap();

    assert_done(&env, &name, child);
    let log = server_log(&env, &name);
    assert!(
        log.contains("reloading the index"),
        "the server's reads never met a swept pack:\n{log}"
    );
    assert!(
        log.contains("backfill of vda") && log.contains("trying again"),
        "the backfill never met a swept pack:\n{log}"
    );
    testbed::domain_qemu_io(&name, &format!("read -P 0x5a {off} 64k")).unwrap();

    // Outside the guest's filesystem the disk is the snapshot's, but for
    // the range written above.
    virsh(&["destroy", &name]);
    let reference = restore_reference(&env, &bucket, &snap);
    let mut want = std::fs::read(&reference).unwrap();
    want[off as usize..off as usize + (64 << 10)].fill(0x5a);
    let got = assert_guest_files(
        &env,
        &image,
        &reference,
        &images.join(format!("{name}-vda.qcow2")),
    );
    let p1 = (image.partition_offset() + image.partition_size()) as usize;
    assert!(
        got[p1..] == want[p1..],
        "the disk after the partition differs"
    );
}

/// `cargo test --release -p bulwark --test vm_live_restore -- --ignored --nocapture`:
/// time to the guest's ready marker, live from S3 against booting the same
/// disk from a local file; and time to fully restored, live against
/// `bulwark restore image` of the same disk, from the same bucket.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn live_restore_bench() {
    let image = Image::tiny().unwrap();
    let env = Env::new();
    let bucket = S3Repo::start("bench");
    // No local cache: every read of the restores below goes to the bucket.
    let s3 = |args: &[&str]| {
        let mut a = args.to_vec();
        a.push("--no-cache");
        bucket.ok(&env, &a)
    };
    s3(&["repo", "init"]);
    // Baseline: the same disk, booted from a local file.
    let mut vm = Vm::define(&image, VmOptions::default()).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&s3(&["backup", "vm", vm.name(), "--json"])).unwrap();
    let snap = r["snapshot"].as_str().unwrap().to_string();
    let t = Instant::now();
    vm.start().unwrap();
    vm.wait_ready(BOOT_TIMEOUT).unwrap();
    let local_boot = t.elapsed().as_secs_f64();
    drop(vm);

    let name = testbed::unique_name("bw-livebench");
    let _domains = Restored(vec![name.clone()]);
    let images = env.path("images");
    let t = Instant::now();
    let mut child = env
        .cmd(&[
            "restore",
            "vm",
            &snap,
            "--as",
            &name,
            "--storage-dir",
            images.to_str().unwrap(),
            "--live",
            "--wait",
            "--no-cache",
        ])
        .envs(bucket.server.env())
        .env("BULWARK_REPO", &bucket.repo)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The command ends when every disk is local, maybe before the boot.
    let done = std::thread::spawn(move || {
        assert!(child.wait().unwrap().success());
        t.elapsed().as_secs_f64()
    });
    let mut console = Console::new(images.join(format!("{name}-serial0.log")));
    console.wait_ready(BOOT_TIMEOUT).unwrap();
    let live_boot = t.elapsed().as_secs_f64();
    let live_done = done.join().unwrap();

    let to = env.path("full.raw");
    let t = Instant::now();
    s3(&["restore", "image", &snap, "--to", to.to_str().unwrap()]);
    let full = t.elapsed().as_secs_f64();
    println!("| | seconds | ratio |");
    println!("| --- | --- | --- |");
    println!("| boot from a local qcow2 file to ready | {local_boot:.2} | 1.00 |");
    println!(
        "| live restore from S3 to ready | {live_boot:.2} | {:.2}x (bar: at most 1.5x) |",
        live_boot / local_boot
    );
    println!("| restore image from S3 (cold, no cache) | {full:.2} | 1.00 |");
    println!(
        "| live restore from S3 to fully local | {live_done:.2} | {:.2}x |",
        live_done / full
    );
}
