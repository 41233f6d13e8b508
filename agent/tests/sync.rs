//! `bulwark sync` and the agent's sync jobs against real S3 servers: two
//! `s3s-fs` processes (two endpoints, two credential sets) and a local
//! source. A history synced local -> S3 -> S3 without any passphrase in the
//! environment; a second sync copies nothing; a new snapshot costs about
//! its new packs; a sync killed with SIGKILL resumes without copying a pack
//! twice (counted in the bucket); a damaged source pack fails its snapshot
//! and never lands; with the source gone every snapshot restores
//! bit-identical from the last replica. The agent, without libvirt, runs a
//! sync job with the destination's own retention and reports its lag.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use testbed::cli::{sparse_image, stderr, Runner};
use testbed::s3::S3Server;

const PW_SRC: &str = "source passphrase";
const PW_A: &str = "first replica passphrase";
const PW_B: &str = "second replica passphrase";
const PREFIX: &str = "replica";

struct Sites {
    dir: tempfile::TempDir,
    a: S3Server,
    bucket_a: String,
    b: S3Server,
    bucket_b: String,
}

impl Sites {
    fn new() -> Sites {
        let a = S3Server::start().unwrap();
        let b = S3Server::start().unwrap();
        let s = Sites {
            dir: tempfile::tempdir().unwrap(),
            bucket_a: a.create_bucket().unwrap(),
            bucket_b: b.create_bucket().unwrap(),
            a,
            b,
        };
        for (name, pw) in [("pw-src", PW_SRC), ("pw-a", PW_A)] {
            std::fs::write(s.path(name), pw).unwrap();
        }
        for (name, server) in [("a.creds", &s.a), ("b.creds", &s.b)] {
            std::fs::write(
                s.path(name),
                format!(
                    "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                    server.access_key, server.secret_key
                ),
            )
            .unwrap();
        }
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn local(&self) -> PathBuf {
        self.path("local")
    }

    fn url_a(&self) -> String {
        format!("s3://{}/{PREFIX}", self.bucket_a)
    }

    fn url_b(&self) -> String {
        format!("s3://{}/{PREFIX}", self.bucket_b)
    }

    /// The three repositories by name, without a key for any: a sync needs
    /// none. The endpoints and credentials are the config's, not the
    /// environment's.
    fn repositories(&self) -> String {
        self.repositories_of(&["local", "a", "b"])
    }

    /// Some of them.
    fn repositories_of(&self, names: &[&str]) -> String {
        let mut out = String::new();
        for name in names {
            out += &match *name {
                "local" => format!("[repositories.local]\npath = {:?}\n\n", self.local()),
                "a" => s3_entry("a", &self.url_a(), &self.a, &self.path("a.creds")),
                _ => s3_entry("b", &self.url_b(), &self.b, &self.path("b.creds")),
            };
        }
        out
    }

    fn config(&self) -> PathBuf {
        let p = self.path("sites.toml");
        std::fs::write(&p, self.repositories()).unwrap();
        p
    }

    /// `bulwark` with no passphrase and no S3 credentials in its
    /// environment.
    fn keyless(&self) -> Runner {
        let mut r = Runner::new(env!("CARGO_BIN_EXE_bulwark"))
            .env("BULWARK_CACHE_DIR", self.path("cache"))
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_REGION", "us-east-1");
        for v in [
            "BULWARK_PASSWORD",
            "BULWARK_REPO",
            "BULWARK_S3_ENDPOINT",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL",
        ] {
            r = r.env_remove(v);
        }
        r
    }

    /// `bulwark` on the local source, with its passphrase.
    fn source(&self) -> Runner {
        self.keyless()
            .env("BULWARK_REPO", self.local())
            .env("BULWARK_PASSWORD", PW_SRC)
    }

    /// `bulwark` on a replica in `server`'s bucket, with that replica's
    /// own passphrase.
    fn at(&self, server: &S3Server, url: &str, pw: &str) -> Runner {
        self.keyless()
            .envs(server.env())
            .env("BULWARK_REPO", url)
            .env("BULWARK_PASSWORD", pw)
    }

    fn sync(&self, args: &[&str]) -> (Output, serde_json::Value) {
        let cfg = self.config();
        let mut all = vec!["sync"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", cfg.to_str().unwrap(), "--json"]);
        let out = self.keyless().run(&all);
        let v = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("sync {args:?}: {e}: {}", stderr(&out)));
        (out, v)
    }

    fn sync_ok(&self, args: &[&str]) -> serde_json::Value {
        let (out, v) = self.sync(args);
        assert!(out.status.success(), "sync {args:?}: {v} {}", stderr(&out));
        v
    }

    /// The pack objects in a bucket (s3s-fs keeps one file per object).
    fn packs_in(&self, server: &S3Server, bucket: &str) -> usize {
        count_packs(&server.bucket_dir(bucket).join(PREFIX).join("data"))
    }

    fn backup(&self, img: &Path, source: &str) -> String {
        let v = self.source().backup_image(img.to_str().unwrap(), source);
        v["snapshot"].as_str().unwrap().to_string()
    }
}

fn s3_entry(name: &str, url: &str, server: &S3Server, creds: &Path) -> String {
    format!(
        "[repositories.{name}]\npath = {url:?}\nendpoint = {e:?}\n\
         backup_credentials = {creds:?}\nmaintenance_credentials = {creds:?}\n\n",
        e = server.endpoint()
    )
}

/// Every file under `dir`: its name and size (s3s-fs keeps one file per
/// object).
fn files_under(dir: &Path) -> Vec<(String, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() {
                files_under(&p)
            } else {
                let len = e.metadata().map_or(0, |m| m.len());
                vec![(e.file_name().to_string_lossy().into_owned(), len)]
            }
        })
        .collect()
}

/// Pack objects under `dir` (named by 64 hex digits).
fn count_packs(dir: &Path) -> usize {
    files_under(dir)
        .iter()
        .filter(|(n, _)| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .count()
}

fn dir_bytes(dir: &Path) -> u64 {
    files_under(dir).iter().map(|(_, len)| len).sum()
}

fn n(v: &serde_json::Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

/// A versioned copy of an image, to compare restores with.
fn keep(img: &Path, as_: &Path) -> PathBuf {
    std::fs::copy(img, as_).unwrap();
    as_.to_path_buf()
}

fn restores_identical(r: &Runner, snap: &str, want: &Path, dir: &Path) {
    let to = dir.join(format!("restored-{snap}"));
    r.ok(&[
        "restore",
        "image",
        snap,
        "--to",
        to.to_str().unwrap(),
        "--force",
    ]);
    assert!(
        std::fs::read(&to).unwrap() == std::fs::read(want).unwrap(),
        "snapshot {snap} restores other bytes than {}",
        want.display()
    );
    std::fs::remove_file(&to).unwrap();
}

#[test]
fn a_history_syncs_local_to_s3_to_s3_without_a_key_and_restores_from_the_last_copy() {
    let s = Sites::new();
    s.source().ok(&["repo", "init"]);
    let web = s.path("web.raw");
    sparse_image(&web, 16, 1);
    let db = s.path("db.raw");
    sparse_image(&db, 12, 2);
    let mut history: Vec<(String, PathBuf)> = Vec::new();
    history.push((s.backup(&web, "web"), keep(&web, &s.path("web-1"))));
    history.push((s.backup(&db, "db"), keep(&db, &s.path("db-1"))));
    let f = std::fs::OpenOptions::new().write(true).open(&web).unwrap();
    f.write_all_at(&[0x5a; 200_000], 3 << 20).unwrap();
    history.push((s.backup(&web, "web"), keep(&web, &s.path("web-2"))));

    // Replicas with key slots of their own: the first made from the
    // source's location, the second from the config's name of the first.
    let a = s.at(&s.a, &s.url_a(), PW_A);
    a.ok(&[
        "repo",
        "init",
        "--replica-of",
        s.local().to_str().unwrap(),
        "--source-password-file",
        s.path("pw-src").to_str().unwrap(),
    ]);
    let cfg = s.config();
    let b = s.at(&s.b, &s.url_b(), PW_B);
    b.ok(&[
        "repo",
        "init",
        "--replica-of",
        "a",
        "--config",
        cfg.to_str().unwrap(),
        "--source-password-file",
        s.path("pw-a").to_str().unwrap(),
    ]);
    let info = b.json(&["repo", "info", "--json"]);
    assert!(info["replica_of"].is_string(), "{info}");

    // local -> a, with no passphrase and no credentials in the environment.
    let first = s.sync_ok(&["local", "a"]);
    assert_eq!(
        (
            n(&first, "snapshots_copied"),
            n(&first, "snapshots_skipped")
        ),
        (3, 0),
        "{first}"
    );
    assert!(n(&first, "chunks_copied") > 0 && n(&first, "bytes_copied") > 0);
    assert!(first["seconds"].as_f64().is_some(), "{first}");
    assert_eq!(
        s.packs_in(&s.a, &s.bucket_a),
        count_packs(&s.local().join("data"))
    );
    let again = s.sync_ok(&["local", "a"]);
    assert_eq!(
        (
            n(&again, "snapshots_copied"),
            n(&again, "snapshots_skipped"),
            n(&again, "bytes_copied"),
            n(&again, "chunks_copied")
        ),
        (0, 3, 0, 0),
        "a second sync copies nothing: {again}"
    );
    // a -> b (S3 to S3, two endpoints), by option names this time.
    let cfg = s.config();
    let out = s.keyless().run(&[
        "sync",
        "--from",
        "a",
        "--to",
        "b",
        "--config",
        cfg.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ab: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n(&ab, "snapshots_copied"), 3, "{ab}");

    // A new snapshot costs about its own new packs.
    let packs_before = dir_bytes(&s.local().join("data"));
    let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.write_all_at(&[0xa5; 500_000], 1 << 20).unwrap();
    history.push((s.backup(&db, "db"), keep(&db, &s.path("db-2"))));
    let new_pack_bytes = dir_bytes(&s.local().join("data")) - packs_before;
    let third = s.sync_ok(&["local", "a"]);
    assert_eq!(n(&third, "snapshots_copied"), 1, "{third}");
    let copied = n(&third, "bytes_copied");
    assert!(
        copied >= new_pack_bytes && copied < new_pack_bytes + (256 << 10),
        "copied {copied} B for {new_pack_bytes} B of new packs"
    );

    // A big new snapshot, synced a -> b slowly and killed half-way: the
    // resumed run copies exactly the packs that had not landed.
    let big = s.path("big.raw");
    sparse_image(&big, 40, 7);
    history.push((s.backup(&big, "big"), keep(&big, &s.path("big-1"))));
    s.sync_ok(&["local", "a"]);
    let plan = s.sync_ok(&["a", "b", "--dry-run"]);
    let planned = n(&plan, "packs_copied") as usize;
    assert!(planned >= 2, "{plan}");
    let before = s.packs_in(&s.b, &s.bucket_b);
    let mut child = s
        .keyless()
        .cmd(&[
            "sync",
            "a",
            "b",
            "--config",
            cfg.to_str().unwrap(),
            "--rate",
            "4",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while s.packs_in(&s.b, &s.bucket_b) < before + 1 {
        assert!(t.elapsed() < Duration::from_secs(60), "no pack landed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let landed = s.packs_in(&s.b, &s.bucket_b) - before;
    assert!(
        landed < planned,
        "the kill came too late: {landed} of {planned}"
    );
    let resumed = s.sync_ok(&["a", "b"]);
    assert_eq!(
        n(&resumed, "packs_copied") as usize + landed,
        planned,
        "the resumed sync copies only what had not landed: {resumed}"
    );
    // db's second snapshot may have completed before the kill; big's not.
    assert!(n(&resumed, "snapshots_copied") >= 1, "{resumed}");
    assert_eq!(b.snapshot_ids().len(), 5);

    // A damaged source pack: its snapshot fails, is named, and never lands.
    let fresh = s.path("fresh.raw");
    sparse_image(&fresh, 8, 9);
    let damaged = s.backup(&fresh, "fresh");
    let victim = newest_pack(&s.local().join("data"));
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();
    let (out, bad) = s.sync(&["local", "a"]);
    assert_eq!(out.status.code(), Some(1), "{bad}");
    assert_eq!(
        bad["snapshots_failed"][0]["snapshot"],
        damaged.as_str(),
        "{bad}"
    );
    let pack_name = victim.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        bad["snapshots_failed"][0]["error"]
            .as_str()
            .unwrap()
            .contains(&pack_name[..8]),
        "{bad}"
    );
    let a_dir = s.a.bucket_dir(&s.bucket_a).join(PREFIX);
    assert!(!a_dir.join("snapshots").join(&damaged).exists());
    assert!(!a_dir
        .join("data")
        .join(&pack_name[..2])
        .join(&pack_name)
        .exists());

    // The source and the first replica gone: the second alone restores
    // every snapshot bit-identical, with its own passphrase.
    std::fs::remove_dir_all(s.local()).unwrap();
    std::fs::remove_dir_all(&a_dir).unwrap();
    let listed = b.snapshot_ids();
    assert_eq!(listed.len(), history.len(), "{listed:?}");
    for (snap, img) in &history {
        restores_identical(&b, snap, img, s.dir.path());
    }
    b.ok(&["verify"]);
}

/// The newest pack file under `data/` (the last backup's).
fn newest_pack(data: &Path) -> PathBuf {
    let mut all = Vec::new();
    for d in std::fs::read_dir(data).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            let m = f.metadata().unwrap().modified().unwrap();
            all.push((m, f.path()));
        }
    }
    all.sort();
    all.pop().unwrap().1
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_agent_runs_a_sync_job_without_libvirt_with_the_destinations_retention() {
    let s = Sites::new();
    s.source().ok(&["repo", "init"]);
    let img = s.path("web.raw");
    sparse_image(&img, 6, 3);
    let mut snaps = Vec::new();
    for i in 0..4u8 {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[i; 4096], 0).unwrap();
        snaps.push(s.backup(&img, "web"));
    }
    s.at(&s.a, &s.url_a(), PW_A).ok(&[
        "repo",
        "init",
        "--replica-of",
        s.local().to_str().unwrap(),
        "--source-password-file",
        s.path("pw-src").to_str().unwrap(),
    ]);
    // A pull host: no policies, no libvirt, no key of either repository.
    let socket = s.path("agent.sock");
    let cfg = s.path("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {state:?}\nsocket = {socket:?}\ntick_seconds = 1\n\
             libvirt_uri = \"qemu+unix:///system?socket=/nonexistent\"\n\n{repos}\n\
             [sync.offsite]\nfrom = \"local\"\nto = \"a\"\nschedule = \"every 2s\"\n\
             sources = [\"web*\"]\nkeep_last = 2\n",
            state = s.path("state"),
            repos = s.repositories_of(&["local", "a"]),
        ),
    )
    .unwrap();
    let _agent = KillOnDrop(
        s.keyless()
            .env("BULWARK_S3_MAX_ATTEMPTS", "2")
            .cmd(&["agent", "run", "--config", cfg.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = || -> Option<serde_json::Value> {
        let out = s
            .keyless()
            .run(&["agent", "status", "--json", "--socket", socket.to_str()?]);
        serde_json::from_slice(&out.stdout).ok()
    };
    let wait = |what: &str, ok: &dyn Fn(&serde_json::Value) -> bool| {
        let t = Instant::now();
        loop {
            if let Some(st) = status().filter(|st| ok(st)) {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "{what}: {:?}",
                status()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let st = wait("a complete sync run", &|st| {
        st["syncs"]["offsite"]["ok"] == true
    });
    let run = &st["syncs"]["offsite"];
    // Told the destination keeps two, the job copied two, not four.
    assert_eq!(
        (n(run, "snapshots_copied"), n(run, "snapshots_skipped")),
        (2, 2),
        "{run}"
    );
    assert_eq!(st["libvirt_connections"], 0, "{st}");
    assert!(st["problems"].as_array().unwrap().is_empty(), "{st}");
    let a = s.at(&s.a, &s.url_a(), PW_A);
    let mut at_a = a.snapshot_ids();
    at_a.sort();
    let mut want = snaps[2..].to_vec();
    want.sort();
    assert_eq!(at_a, want);

    // Two more backups: the next runs copy them and prune the replica back
    // to two, while the source keeps all six.
    for i in 4..6u8 {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[i; 4096], 0).unwrap();
        snaps.push(s.backup(&img, "web"));
    }
    let t = Instant::now();
    loop {
        let mut at_a = a.snapshot_ids();
        at_a.sort();
        let mut want = snaps[4..].to_vec();
        want.sort();
        if at_a == want {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "replica has {at_a:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(s.source().snapshot_ids().len(), 6);
    let last = std::fs::read(&img).unwrap();
    let restored = s.path("restored.raw");
    a.ok(&[
        "restore",
        "image",
        &snaps[5],
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&restored).unwrap() == last);

    // The destination unreachable: the job fails and status says how far
    // behind the replica is.
    let data = s.a.bucket_dir(&s.bucket_a);
    std::fs::rename(&data, s.path("moved-bucket")).unwrap();
    let st = wait("a failed run", &|st| st["syncs"]["offsite"]["ok"] == false);
    let problems = st["problems"].to_string();
    assert!(
        problems.contains("sync offsite failed") && problems.contains("behind local"),
        "{problems}"
    );
    assert!(st["syncs"]["offsite"]["last_ok"].is_u64(), "{st}");
}
