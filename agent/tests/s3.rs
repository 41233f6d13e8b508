//! The `bulwark` binary against a real S3 server (`s3s-fs` on loopback):
//! backup, snapshots, restore, verify, two writers at once, faults, and
//! `repo check-target`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use testbed::cli::{sparse_image, stderr, Runner};
use testbed::s3::{FaultProxy, Faults, S3Server};

const PW: &str = "s3 test passphrase";

struct Env {
    server: S3Server,
    bucket: String,
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let server = S3Server::start().unwrap();
        let bucket = server.create_bucket().unwrap();
        Env {
            server,
            bucket,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn init(self) -> Self {
        let out = self.run(&["repo", "init"]);
        assert!(out.status.success(), "init: {}", stderr(&out));
        self
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn repo(&self) -> String {
        format!("s3://{}/hosts", self.bucket)
    }

    fn bw(&self) -> Runner {
        Runner::new(env!("CARGO_BIN_EXE_bulwark"))
            .envs(self.server.env())
            .env("BULWARK_REPO", self.repo())
            .env("BULWARK_PASSWORD", PW)
            .env("BULWARK_CACHE_DIR", self.path("cache"))
            .env_remove("BULWARK_S3_ENDPOINT")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        self.bw().cmd(args)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.bw().run(args)
    }

    fn ok(&self, args: &[&str]) -> String {
        self.bw().ok(args)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        self.bw().json(args)
    }

    fn backup(&self, img: &Path, source: &str) -> String {
        let v = self.bw().backup_image(img.to_str().unwrap(), source);
        v["snapshot"].as_str().unwrap().to_string()
    }

    fn restore_matches(&self, snap: &str, img: &Path, extra: &[&str]) {
        let to = self.path(&format!("restored-{snap}"));
        let mut args = vec!["restore", "image", snap, "--to", to.to_str().unwrap()];
        args.push("--force");
        args.extend_from_slice(extra);
        self.ok(&args);
        assert!(
            std::fs::read(&to).unwrap() == std::fs::read(img).unwrap(),
            "restore of {snap} differs from {}",
            img.display()
        );
    }
}

#[test]
fn backup_snapshots_restore_verify_on_s3() {
    let e = Env::new().init();
    let img = e.path("disk.raw");
    sparse_image(&img, 24, 1);
    let s1 = e.backup(&img, "web");
    // Change a little and back up again: mostly deduplicated.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0xab; 300_000], 5 << 20).unwrap();
    drop(f);
    let img2 = e.path("disk2.raw");
    std::fs::copy(&img, &img2).unwrap();
    let second = e.bw().backup_image(img.to_str().unwrap(), "web");
    assert!(second["bytes_new"].as_u64().unwrap() < 8 << 20, "{second}");
    let s2 = second["snapshot"].as_str().unwrap().to_string();
    let list = e.json(&["snapshots", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[1]["parent"].as_str().unwrap(), s1);
    // Metadata was cached under the repository id.
    let info = e.json(&["repo", "info", "--json"]);
    let id = info["id"].as_str().unwrap();
    assert!(e
        .path("cache")
        .join(id)
        .join("snapshots")
        .join(&s2)
        .exists());
    e.restore_matches(&s2, &img2, &[]);
    e.restore_matches(&s2, &img2, &["--no-cache"]);
    let v = e.json(&["verify", "--json"]);
    assert!(v["damaged"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["snapshots"], 2);
    // The original content, restored from the first snapshot.
    let orig = e.path("orig.raw");
    sparse_image(&orig, 24, 1);
    e.restore_matches(&s1, &orig, &[]);
}

#[test]
fn two_hosts_back_up_into_one_bucket_at_once() {
    let e = Env::new().init();
    let (a, b) = (e.path("a.raw"), e.path("b.raw"));
    sparse_image(&a, 20, 2);
    sparse_image(&b, 20, 3);
    // The same content in both, so the writers race on the same new chunks.
    let shared = e.path("shared.raw");
    sparse_image(&shared, 6, 4);
    let s = std::fs::read(&shared).unwrap();
    File::options()
        .write(true)
        .open(&a)
        .unwrap()
        .write_all_at(&s, 8 << 20)
        .unwrap();
    File::options()
        .write(true)
        .open(&b)
        .unwrap()
        .write_all_at(&s, 8 << 20)
        .unwrap();
    let spawn = |img: &Path, src: &str, cache: &str| {
        e.cmd(&[
            "backup",
            "image",
            img.to_str().unwrap(),
            "--source",
            src,
            "--json",
        ])
        .env("BULWARK_CACHE_DIR", e.path(cache))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
    };
    let pa = spawn(&a, "host-a", "cache-a");
    let pb = spawn(&b, "host-b", "cache-b");
    let (oa, ob) = (
        pa.wait_with_output().unwrap(),
        pb.wait_with_output().unwrap(),
    );
    assert!(oa.status.success(), "a: {}", stderr(&oa));
    assert!(ob.status.success(), "b: {}", stderr(&ob));
    let sa: serde_json::Value = serde_json::from_slice(&oa.stdout).unwrap();
    let sb: serde_json::Value = serde_json::from_slice(&ob.stdout).unwrap();
    e.restore_matches(sa["snapshot"].as_str().unwrap(), &a, &[]);
    e.restore_matches(sb["snapshot"].as_str().unwrap(), &b, &["--no-cache"]);
    let v = e.json(&["verify", "--json"]);
    assert!(v["damaged"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["snapshots"], 2);
}

#[test]
fn backup_through_faults_loses_nothing() {
    let e = Env::new().init();
    let img = e.path("disk.raw");
    sparse_image(&img, 16, 5);
    let first = e.backup(&img, "db");
    let proxy = FaultProxy::start(
        e.server.port(),
        Faults {
            slow_down: 0.2,
            reset_request: 0.2,
            reset_response: 0.2,
            latency: Duration::from_millis(10),
            ..Faults::default()
        },
    )
    .unwrap();
    let img2 = e.path("disk2.raw");
    sparse_image(&img2, 24, 6);
    // 60% of requests fail here: with the default 10 attempts one request
    // in 170 gives up, so a backup of a few dozen requests would fail one
    // run in ten. 20 attempts make that one in 30 000 per request; the
    // faults injected and the integrity checks below are unchanged.
    let endpoint = proxy.endpoint();
    let via_proxy = ["--s3-endpoint", &endpoint];
    let mut args = vec![
        "--no-cache",
        "--s3-max-attempts",
        "20",
        "backup",
        "image",
        img2.to_str().unwrap(),
        "--source",
        "db",
        "--json",
    ];
    args.extend_from_slice(&via_proxy);
    let out = e.run(&args);
    assert!(
        out.status.success(),
        "backup under faults: {}",
        stderr(&out)
    );
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let st = &proxy.stats;
    eprintln!("faults injected: {st:?}");
    assert!(st.injected() >= 3, "{st:?}");
    // Straight to the server again: everything is there and intact.
    let v = e.json(&["verify", "--json", "--no-cache"]);
    assert!(v["damaged"].as_array().unwrap().is_empty(), "{v}");
    e.restore_matches(&first, &img, &["--no-cache"]);
    e.restore_matches(second["snapshot"].as_str().unwrap(), &img2, &[]);

    // Nothing gets through: a clear error naming the bucket, non-zero exit.
    proxy.set(Faults {
        slow_down: 1.0,
        ..Default::default()
    });
    let mut args = vec!["snapshots", "--no-cache", "--s3-max-attempts", "3"];
    args.extend_from_slice(&via_proxy);
    let t = std::time::Instant::now();
    let out = e.run(&args);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&e.bucket) && err.contains("SlowDown"), "{err}");
    assert!(err.contains("gave up after 3 attempts"), "{err}");
    eprintln!("gave up after {:?}: {err}", t.elapsed());
}

#[test]
fn check_target_tells_what_is_wrong() {
    let e = Env::new();
    let check = |extra: &[&str], env: &[(&str, &str)]| -> (i32, serde_json::Value) {
        let mut c = e.cmd(&["repo", "check-target", "--json"]);
        c.args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let v = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|err| panic!("{err}: {}", stderr(&out)));
        (out.status.code().unwrap(), v)
    };
    let (code, v) = check(&[], &[]);
    assert_eq!(
        (code, v["error"]["kind"].as_str()),
        (6, Some("no_repository")),
        "{v}"
    );
    let e = e.init();
    let check = |extra: &[&str], env: &[(&str, &str)]| -> (i32, serde_json::Value) {
        let mut c = e.cmd(&["repo", "check-target", "--json"]);
        c.args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let v = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|err| panic!("{err}: {}", stderr(&out)));
        (out.status.code().unwrap(), v)
    };
    let (code, v) = check(&[], &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["ok"], true);
    assert!(v["key_fingerprint"].is_string(), "{v}");

    let (code, v) = check(&[], &[("BULWARK_PASSWORD", "not it")]);
    assert_eq!(
        (code, v["error"]["kind"].as_str()),
        (7, Some("wrong_key")),
        "{v}"
    );

    let (code, v) = check(&[], &[("AWS_SECRET_ACCESS_KEY", "wrong")]);
    assert_eq!(
        (code, v["error"]["kind"].as_str()),
        (4, Some("credentials")),
        "{v}"
    );

    // No credentials at all: one line saying what to set, and no probe of
    // EC2 instance metadata (which off EC2 only times out). Then with an
    // (empty) profile configured: the SDK's chain finds nothing, and that
    // is one line too.
    for profile in [false, true] {
        let bare = |args: &[&str]| {
            let mut c = e.cmd(args);
            for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"] {
                c.env_remove(k);
            }
            if !profile {
                c.env_remove("AWS_CONFIG_FILE")
                    .env_remove("AWS_SHARED_CREDENTIALS_FILE");
            }
            c.env("HOME", e.path("no-home")).output().unwrap()
        };
        let out = bare(&["snapshots"]);
        let err = stderr(&out);
        assert!(!out.status.success());
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("AWS_ACCESS_KEY_ID") && err.contains("AWS_PROFILE"),
            "{err}"
        );
        assert!(
            !err.contains("IMDS") && !err.contains("Ec2Instance"),
            "{err}"
        );
        let out = bare(&["repo", "check-target", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (out.status.code(), v["error"]["kind"].as_str()),
            (Some(4), Some("credentials")),
            "{v}"
        );
    }

    let (code, v) = check(&["--repo", "s3://no-such-bucket-bw/x"], &[]);
    assert_eq!(
        (code, v["error"]["kind"].as_str()),
        (5, Some("no_bucket")),
        "{v}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let ep = format!("http://127.0.0.1:{port}");
    let (code, v) = check(&["--s3-endpoint", &ep], &[]);
    assert_eq!(
        (code, v["error"]["kind"].as_str()),
        (3, Some("unreachable")),
        "{v}"
    );
    assert!(v["error"]["message"].as_str().unwrap().contains(&ep), "{v}");
}

/// Two writers back up into one bucket, rounds after round, while `gc`
/// (grace 1 s) runs over and over and each round prunes the previous
/// snapshots. The images flip between two versions of one region, so the
/// chunks a prune just made garbage are the ones the next backup needs:
/// the race of `docs/gc.md`. Nothing may be lost, and once the writers stop
/// two `gc --grace 0s` leave no garbage.
#[test]
fn gc_races_two_writers_and_loses_nothing() {
    let e = Env::new().init();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut region = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    };
    let sources = ["host-a", "host-b"];
    let bases: Vec<Vec<u8>> = (0..2).map(|_| region(8 << 20)).collect();
    let flips: Vec<[Vec<u8>; 2]> = (0..2).map(|_| [region(3 << 20), region(3 << 20)]).collect();
    let mut kept: Vec<(String, PathBuf)> = Vec::new();
    let mut gc_runs = 0;
    let mut tally = [
        ("packs_condemned", 0u64),
        ("packs_deleted", 0),
        ("packs_resurrected", 0),
    ];
    let mut held_back = 0u64;
    for round in 0..6 {
        let mut children = Vec::new();
        let mut images = Vec::new();
        for (i, src) in sources.iter().enumerate() {
            let mut img = bases[i].clone();
            img[2 << 20..5 << 20].copy_from_slice(&flips[i][round % 2]);
            let path = e.path(&format!("{src}-{round}.raw"));
            std::fs::write(&path, &img).unwrap();
            let child = e
                .cmd(&[
                    "backup",
                    "image",
                    path.to_str().unwrap(),
                    "--source",
                    src,
                    "--json",
                ])
                .env("BULWARK_CACHE_DIR", e.path(&format!("cache-{src}")))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            children.push(child);
            images.push(path);
        }
        // GC over and over while the backups run (at least once).
        loop {
            let out = e
                .cmd(&["gc", "--grace", "1s", "--repack-below", "90", "--json"])
                .env("BULWARK_CACHE_DIR", e.path("cache-gc"))
                .output()
                .unwrap();
            // Another GC cannot be running: this test runs one at a time.
            assert!(out.status.success(), "gc: {}", stderr(&out));
            gc_runs += 1;
            let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            for (k, v) in tally.iter_mut() {
                *v += r[*k].as_u64().unwrap();
            }
            held_back += u64::from(!r["sessions_in_flight"].as_array().unwrap().is_empty());
            if children.iter_mut().all(|c| c.try_wait().unwrap().is_some()) {
                break;
            }
        }
        for (child, img) in children.into_iter().zip(images) {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "backup: {}", stderr(&out));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            kept.push((v["snapshot"].as_str().unwrap().to_string(), img));
        }
        // Keep the newest snapshot of each source: the other version's
        // chunks become garbage, and the next round needs them again.
        for src in sources {
            e.ok(&["prune", "--source", src, "--keep-last", "1"]);
        }
    }
    eprintln!("{gc_runs} gc runs, {tally:?}, {held_back} held back by backups in flight");
    assert!(gc_runs >= 6);
    // The race is real: GCs condemned packs while the writers ran, and then
    // deleted some, kept some a backup reused, or were held back by one.
    assert!(tally[0].1 > 0, "{tally:?}");
    assert!(tally[1].1 + tally[2].1 + held_back > 0, "{tally:?}");
    let listed: Vec<String> = e.bw().snapshot_ids();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let check = |e: &Env| {
        let v = e.json(&["verify", "--json"]);
        assert!(v["damaged"].as_array().unwrap().is_empty(), "{v}");
        for (snap, img) in kept.iter().filter(|(s, _)| listed.contains(s)) {
            e.restore_matches(snap, img, &["--no-cache"]);
        }
    };
    check(&e);
    // With the writers done, two runs without grace reclaim everything.
    e.ok(&["gc", "--grace", "0s"]);
    e.ok(&["gc", "--grace", "0s"]);
    let dry = e.json(&["gc", "--grace", "0s", "--dry-run", "--json"]);
    assert_eq!(dry["packs_condemned"], 0, "{dry}");
    assert_eq!(dry["packs_waiting"], 0, "{dry}");
    assert_eq!(dry["packs_deleted"], 0, "{dry}");
    check(&e);
}
