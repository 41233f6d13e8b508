//! The `bulwark` binary end to end on a local datastore: real files, real
//! processes, exit codes and output checked.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use rand::{RngCore, SeedableRng};
use testbed::cli::{sparse_image, stderr, Runner};

const PW: &str = "test passphrase";

struct Env {
    dir: tempfile::TempDir,
    bw: Runner,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bw = Runner::new(env!("CARGO_BIN_EXE_bulwark"))
            .env("BULWARK_REPO", dir.path().join("repo"))
            .env("BULWARK_PASSWORD", PW);
        let e = Env { dir, bw };
        e.ok(&["repo", "init"]);
        e
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        self.bw.cmd(args)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.bw.run(args)
    }

    fn ok(&self, args: &[&str]) -> String {
        self.bw.ok(args)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        self.bw.json(args)
    }
}

#[test]
fn backup_twice_restore_verify() {
    let e = Env::new();
    let img = e.path("disk.raw");
    sparse_image(&img, 40, 1);
    let first = e.bw.backup_image(img.to_str().unwrap(), "web");
    for k in [
        "snapshot",
        "bytes_read",
        "bytes_new",
        "bytes_stored",
        "seconds",
    ] {
        assert!(first.get(k).is_some(), "missing {k} in {first}");
    }
    assert!(
        first["bytes_read"].as_u64().unwrap() <= 32 << 20,
        "holes must not be read"
    );
    let second = e.bw.backup_image(img.to_str().unwrap(), "web");
    let (new, read) = (
        second["bytes_new"].as_u64().unwrap(),
        second["bytes_read"].as_u64().unwrap(),
    );
    assert!(
        new * 100 < read,
        "unchanged image stored {new} of {read} bytes"
    );

    let list = e.json(&["snapshots", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[1]["parent"], first["snapshot"]);

    let out = e.path("restored.raw");
    e.ok(&[
        "restore",
        "image",
        "web@latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
    // Never overwrite without --force.
    let again = e.run(&[
        "restore",
        "image",
        "web@latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(!again.status.success() && stderr(&again).contains("--force"));
    // By id prefix too.
    let id = first["snapshot"].as_str().unwrap();
    let out2 = e.path("first.raw");
    e.ok(&[
        "restore",
        "image",
        &id[..12],
        "--to",
        out2.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out2).unwrap() == std::fs::read(&img).unwrap());

    let v = e.ok(&["verify"]);
    assert!(v.contains("checked 2 snapshot(s)"), "{v}");
}

/// A file system mounted by a test; unmounted on drop (`-o loop`: the
/// loop device goes with it).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A restore onto a btrfs mounted with compression is stored compressed:
/// blocks reserved ahead would be written in place, uncompressed, so the
/// restore reserves none there.
#[test]
fn a_restore_onto_compressed_btrfs_is_stored_compressed() {
    let e = Env::new();
    let img = e.path("disk.raw");
    std::fs::write(&img, vec![b'a'; 32 << 20]).unwrap();
    e.bw.backup_image(img.to_str().unwrap(), "c");
    let fs = e.path("btrfs.img");
    File::create(&fs).unwrap().set_len(300 << 20).unwrap();
    let mkfs = Command::new("mkfs.btrfs")
        .arg("-q")
        .arg(&fs)
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{mkfs:?}");
    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Command::new("mount")
        .args(["-o", "loop,compress=zstd"])
        .arg(&fs)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(m.status.success(), "{m:?}");
    let _mounted = Mounted(mnt.clone());
    let out = mnt.join("restored.raw");
    e.ok(&[
        "restore",
        "image",
        "c@latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
    let df = Command::new("btrfs")
        .args(["filesystem", "df", "-b"])
        .arg(&mnt)
        .output()
        .unwrap();
    let df = String::from_utf8_lossy(&df.stdout);
    let used: u64 = df
        .lines()
        .find(|l| l.starts_with("Data"))
        .and_then(|l| l.rsplit("used=").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no data line in {df}"));
    // Uncompressed it would take all 32 MiB.
    assert!(used < 8 << 20, "32 MiB of one byte take {used} B: {df}");
}

#[test]
fn wrong_passphrase_and_missing_repo_fail_cleanly() {
    let e = Env::new();
    let out = e
        .cmd(&["snapshots"])
        .env("BULWARK_PASSWORD", "nope")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("wrong passphrase"),
        "{}",
        stderr(&out)
    );
    let out = e
        .cmd(&["snapshots"])
        .env("BULWARK_REPO", e.path("none"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no repository"), "{}", stderr(&out));
    let out = e.run(&["repo", "init"]);
    assert!(!out.status.success() && stderr(&out).contains("already exists"));
}

#[test]
fn key_file_repository() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("repo.key");
    let repo = dir.path().join("repo");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bulwark"))
            .args(args)
            .arg("--repo")
            .arg(&repo)
            .arg("--key-file")
            .arg(&key)
            .env_remove("BULWARK_PASSWORD")
            .output()
            .unwrap()
    };
    assert!(run(&["repo", "init"]).status.success());
    assert!(key.exists());
    let img = dir.path().join("a.raw");
    sparse_image(&img, 6, 5);
    assert!(
        run(&["backup", "image", img.to_str().unwrap(), "--source", "a"])
            .status
            .success()
    );
    let other = dir.path().join("other.key");
    std::fs::write(&other, bulwark_store::format::keys::new_key_file().0).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["snapshots", "--repo"])
        .arg(&repo)
        .arg("--key-file")
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success() && stderr(&out).contains("wrong passphrase or key file"));
}

#[test]
fn flipped_byte_fails_verify_and_restore_loudly() {
    let e = Env::new();
    let img = e.path("disk.raw");
    sparse_image(&img, 20, 2);
    e.ok(&["backup", "image", img.to_str().unwrap(), "--source", "db"]);
    assert!(e.run(&["verify"]).status.success());
    // Flip one byte in the middle of the largest pack.
    let mut packs: Vec<_> = testbed::files_under(&e.path("repo/data")).unwrap();
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let pack = packs.last().unwrap();
    let mut bytes = std::fs::read(pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(pack, &bytes).unwrap();

    let v = e.run(&["verify"]);
    assert_eq!(v.status.code(), Some(1));
    let text = String::from_utf8_lossy(&v.stdout);
    assert!(
        text.contains("DAMAGED chunk") && text.contains("used by snapshot"),
        "{text}"
    );
    let out = e.path("r.raw");
    let r = e.run(&[
        "restore",
        "image",
        "db@latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("damaged chunk"), "{}", stderr(&r));
    assert!(
        !out.exists(),
        "a failed restore must not leave an image behind"
    );
    let left: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("r.raw"))
        .collect();
    assert!(left.is_empty(), "partial files left behind: {left:?}");
}

#[test]
fn sigkill_midway_leaves_a_repository_that_verifies_and_backs_up() {
    let e = Env::new();
    let small = e.path("small.raw");
    sparse_image(&small, 8, 3);
    e.ok(&[
        "backup",
        "image",
        small.to_str().unwrap(),
        "--source",
        "small",
    ]);
    // A big random image: many packs, so the kill lands mid-backup.
    let big = e.path("big.raw");
    {
        let f = File::create(&big).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut block = vec![0u8; 8 << 20];
        for i in 0..48u64 {
            rng.fill_bytes(&mut block);
            f.write_all_at(&block, i * (8 << 20)).unwrap();
        }
    }
    let packs_before = testbed::files_under(&e.path("repo/data")).unwrap().len();
    let mut child = e
        .cmd(&["backup", "image", big.to_str().unwrap(), "--source", "big"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while testbed::files_under(&e.path("repo/data")).unwrap().len() < packs_before + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "backup wrote no packs"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup finished before the kill"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let snaps = e.json(&["snapshots", "--json"]);
    assert_eq!(
        snaps.as_array().unwrap().len(),
        1,
        "no snapshot from the killed run"
    );
    assert!(e.run(&["verify"]).status.success());
    let done = e.bw.backup_image(big.to_str().unwrap(), "big");
    assert!(done["bytes_read"].as_u64().unwrap() == 384 << 20);
    let out = e.path("big.out");
    e.ok(&[
        "restore",
        "image",
        "big@latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&big).unwrap());
    assert!(e.run(&["verify"]).status.success());
}

/// Backs up block device `src` (whole), restores it to a new file and over
/// a device full of stale bytes, and checks both bit for bit.
fn device_round_trip(e: &Env, name: &str, src: &testbed::LoopDevice) {
    let want = src.read_all().unwrap();
    let size = want.len() as u64;
    let dev = src.path().to_str().unwrap();
    let b = e.bw.backup_image(dev, name);
    assert_eq!(b["block_device"], true, "{b}");
    assert_eq!(b["size"].as_u64(), Some(size), "{b}");
    assert_eq!(
        b["bytes_read"].as_u64(),
        Some(size),
        "a device is read whole: {b}"
    );
    let zeros = want.chunks(256 << 10).filter(|c| c.iter().all(|&x| x == 0));
    let zero_bytes = zeros.count() as u64 * (256 << 10);
    assert!(
        b["bytes_zero"].as_u64().unwrap() >= zero_bytes / 2,
        "long zero runs become zero extents: {b} ({zero_bytes} in aligned runs)"
    );
    let snap = format!("{name}@latest");

    // To a file: identical, and sparse where the device held zeros.
    let file = e.path(&format!("{name}.raw"));
    e.ok(&["restore", "image", &snap, "--to", file.to_str().unwrap()]);
    let got = std::fs::read(&file).unwrap();
    assert!(got == want, "{name}: file restore differs");
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(
        allocated <= size - zero_bytes + (8 << 20),
        "{name}: restored file not sparse ({allocated} allocated)"
    );

    // Over another device holding stale data: zero extents must be written.
    let target =
        testbed::LoopDevice::with_contents(&e.path(&format!("{name}-t")), size, |b| b.fill(0xee))
            .unwrap();
    let t = target.path().to_str().unwrap();
    let r = e.run(&["restore", "image", &snap, "--to", t]);
    assert_eq!(r.status.code(), Some(1), "a device needs --force");
    assert!(stderr(&r).contains("--force"), "{}", stderr(&r));
    assert!(target.read_all().unwrap().iter().all(|&x| x == 0xee));
    e.ok(&["restore", "image", &snap, "--to", t, "--force"]);
    assert!(
        target.read_all().unwrap() == want,
        "{name}: device restore differs"
    );
}

#[test]
fn block_devices_back_up_whole_and_restore_to_files_and_devices() {
    let e = Env::new();
    let size = 16u64 << 20;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);

    let random =
        testbed::LoopDevice::with_contents(&e.path("random"), size, |b| rng.fill_bytes(b)).unwrap();
    device_round_trip(&e, "random", &random);
    // The plain output says why nothing was skipped.
    let out = e.ok(&[
        "backup",
        "image",
        random.path().to_str().unwrap(),
        "--source",
        "random",
    ]);
    assert!(out.contains("block device: read whole"), "{out}");
    assert!(out.contains("read 16.0 MiB of 16.0 MiB"), "{out}");

    let half = testbed::LoopDevice::with_contents(&e.path("half"), size, |b| {
        rng.fill_bytes(&mut b[..(size / 2) as usize])
    })
    .unwrap();
    device_round_trip(&e, "half", &half);

    // A filesystem made on the device itself, with files in it.
    let files = e.path("files");
    std::fs::create_dir(&files).unwrap();
    for i in 0..5 {
        let mut data = vec![0u8; 300_000 * (i + 1)];
        rng.fill_bytes(&mut data);
        std::fs::write(files.join(format!("f{i}")), data).unwrap();
    }
    let fs = testbed::LoopDevice::with_contents(&e.path("fs"), size, |_| {}).unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&files)
        .arg(fs.path())
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "mkfs.ext4: {mkfs:?}");
    device_round_trip(&e, "fs", &fs);
}

#[test]
fn sparse_file_backup_says_what_it_skipped() {
    let e = Env::new();
    let img = e.path("sparse.raw");
    let f = File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&[7u8; 1 << 20], 8 << 20).unwrap();
    drop(f);
    let out = e.ok(&["backup", "image", img.to_str().unwrap(), "--source", "s"]);
    assert!(out.contains("read 1.0 MiB of 64.0 MiB"), "{out}");
    assert!(out.contains("63.0 MiB in holes not read"), "{out}");
}

fn data_bytes(e: &Env) -> u64 {
    testbed::files_under(&e.path("repo/data"))
        .unwrap()
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// A crafted history (via `--time`) pruned by daily/weekly/monthly rules:
/// the dry run names the rule of each snapshot as worked out by hand, the
/// real prune removes exactly the others, and two `gc --grace 0s` free
/// exactly the packs of their unique data. What is left verifies and
/// restores bit for bit.
#[test]
fn prune_a_crafted_history_then_gc_reclaims_its_unique_data() {
    let e = Env::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let mut base = vec![0u8; 4 << 20];
    rng.fill_bytes(&mut base);
    // (time, expected rule): newest first these are kept by daily (2),
    // weekly (2: W11 is taken by daily, so W10 and W9) and monthly (3:
    // March is taken, so February and January); the older snapshot of a
    // kept day or week is removed.
    let history = [
        ("2026-01-10T12:00:00Z", Some("keep-monthly")),
        ("2026-02-10T12:00:00Z", Some("keep-monthly")),
        ("2026-03-01T12:00:00Z", Some("keep-weekly")), // Sun, W09
        ("2026-03-02T12:00:00Z", None),                // Mon, W10
        ("2026-03-05T12:00:00Z", Some("keep-weekly")), // Thu, W10
        ("2026-03-09T08:00:00Z", None),                // Mon, W11
        ("2026-03-09T20:00:00Z", Some("keep-daily")),
        ("2026-03-10T12:00:00Z", Some("keep-daily")),
    ];
    let mut snaps = Vec::new();
    for (i, (time, _)) in history.iter().enumerate() {
        let mut unique = vec![0u8; 2 << 20];
        rng.fill_bytes(&mut unique);
        let img = e.path(&format!("db-{i}.raw"));
        std::fs::write(&img, [base.as_slice(), &unique].concat()).unwrap();
        let b = e.json(&[
            "backup",
            "image",
            img.to_str().unwrap(),
            "--source",
            "db",
            "--time",
            time,
            "--json",
        ]);
        snaps.push((b["snapshot"].as_str().unwrap().to_string(), img, b));
    }
    let rules = [
        "--keep-daily",
        "2",
        "--keep-weekly",
        "2",
        "--keep-monthly",
        "3",
    ];
    let prune = |extra: &[&str]| {
        let mut c = e.cmd(&[&["prune", "--source", "db"], &rules[..], extra].concat());
        c.env("TZ", "UTC");
        let out = c.output().unwrap();
        assert!(out.status.success(), "prune: {}", stderr(&out));
        out
    };
    let dry: serde_json::Value =
        serde_json::from_slice(&prune(&["--dry-run", "--json"]).stdout).unwrap();
    let dry = dry.as_array().unwrap();
    assert_eq!(dry.len(), history.len());
    for ((id, _, _), (time, rule)) in snaps.iter().zip(&history) {
        let d = dry.iter().find(|d| d["id"] == id.as_str()).unwrap();
        assert_eq!(d["rule"].as_str(), *rule, "{time}: {d}");
        assert_eq!(d["keep"], rule.is_some(), "{d}");
        assert_eq!(
            chrono::DateTime::parse_from_rfc3339(d["time"].as_str().unwrap()).unwrap(),
            chrono::DateTime::parse_from_rfc3339(time).unwrap()
        );
    }
    assert_eq!(
        e.json(&["snapshots", "--json"]).as_array().unwrap().len(),
        8
    );
    // No rule and no policy: refused, nothing removed.
    let r = e.run(&["prune", "--source", "db"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("--keep"), "{}", stderr(&r));

    let text = String::from_utf8(prune(&[]).stdout).unwrap();
    assert!(text.contains("removed 2"), "{text}");
    let left: Vec<String> = e.bw.snapshot_ids();
    let want: Vec<&String> = snaps
        .iter()
        .zip(&history)
        .filter(|(_, (_, r))| r.is_some())
        .map(|((id, _, _), _)| id)
        .collect();
    assert_eq!(left.len(), want.len());
    assert!(want.iter().all(|w| left.contains(w)), "{left:?}");

    // Each backup's new data went into packs of its own: the removed
    // snapshots' packs are what GC frees.
    let removed: u64 = snaps
        .iter()
        .zip(&history)
        .filter(|(_, (_, r))| r.is_none())
        .map(|((_, _, b), _)| b["bytes_stored"].as_u64().unwrap())
        .sum();
    let before = data_bytes(&e);
    e.ok(&["gc", "--grace", "0s"]);
    assert_eq!(data_bytes(&e), before, "the first run only condemns");
    e.ok(&["gc", "--grace", "0s"]);
    let freed = before - data_bytes(&e);
    assert!(
        freed >= removed && freed <= removed + (64 << 10),
        "freed {freed}, the removed snapshots stored {removed}"
    );
    let v = e.json(&["verify", "--json"]);
    assert!(v["damaged"].as_array().unwrap().is_empty(), "{v}");
    for (id, img, _) in snaps.iter().filter(|(id, _, _)| left.contains(id)) {
        let out = e.path(&format!("r-{id}.raw"));
        e.ok(&["restore", "image", id, "--to", out.to_str().unwrap()]);
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(img).unwrap(),
            "{id}"
        );
    }
}
