//! Locked repositories against an S3 server that enforces Object Lock
//! (Ceph's radosgw, `testbed::rgw`), with the bucket policy of
//! `docs/immutability.md`: a backup credential that cannot destroy, a
//! maintenance credential for prune, GC and locks, an attack and the
//! recovery from it, locks that follow retention, and GC after they run out.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_store::backend::{bucket_policy, PolicyUsers, S3Backend, S3Config};
use bulwark_store::{Backend, BackendError};
use chrono::{DateTime, Utc};
use testbed::cli::{sparse_image, stderr, Runner};
use testbed::rgw::{Credentials, LockServer};

const PW: &str = "lock test passphrase";
const PREFIX: &str = "hosts";

struct Env {
    server: &'static LockServer,
    bucket: String,
    backup: Credentials,
    maint: Credentials,
    dir: tempfile::TempDir,
}

impl Env {
    /// A bucket with Object Lock, its two users and the policy between them.
    fn new() -> Self {
        let server = LockServer::shared().unwrap();
        let bucket = server.create_bucket().unwrap();
        let backup = server.create_user("backup").unwrap();
        let maint = server.create_user("maint").unwrap();
        let policy = bucket_policy(&PolicyUsers {
            bucket: &bucket,
            prefix: PREFIX,
            backup: &format!("arn:aws:iam:::user/{}", backup.user),
            maintenance: &format!("arn:aws:iam:::user/{}", maint.user),
        });
        server.set_policy(&bucket, &policy).unwrap();
        Env {
            server,
            bucket,
            backup,
            maint,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `bulwark` with `creds`, no cache (each run reads the bucket).
    fn bw(&self, creds: &Credentials) -> Runner {
        Runner::new(env!("CARGO_BIN_EXE_bulwark"))
            .envs(self.server.env(creds))
            .env("BULWARK_REPO", format!("s3://{}/{PREFIX}", self.bucket))
            .env("BULWARK_PASSWORD", PW)
            .env("BULWARK_CACHE_DIR", self.path("cache"))
            .env("BULWARK_S3_MAX_ATTEMPTS", "2")
            .env_remove("BULWARK_S3_ENDPOINT")
    }

    fn s3(&self, creds: &Credentials) -> S3Backend {
        S3Backend::new(S3Config {
            bucket: self.bucket.clone(),
            prefix: PREFIX.into(),
            endpoint: Some(self.server.endpoint().into()),
            region: Some("us-east-1".into()),
            credentials: Some((creds.access_key.clone(), creds.secret_key.clone())),
            max_attempts: 2,
            initial_backoff: Duration::from_millis(5),
            ..Default::default()
        })
        .unwrap()
    }

    fn backup_image(&self, img: &Path, source: &str) -> String {
        let v = self
            .bw(&self.backup)
            .backup_image(img.to_str().unwrap(), source);
        v["snapshot"].as_str().unwrap().to_string()
    }

    fn restore_matches(&self, snap: &str, img: &Path) {
        let to = self.path(&format!("restored-{snap}"));
        self.bw(&self.backup).ok(&[
            "restore",
            "image",
            snap,
            "--to",
            to.to_str().unwrap(),
            "--force",
            "--no-cache",
        ]);
        assert!(
            std::fs::read(&to).unwrap() == std::fs::read(img).unwrap(),
            "restore of {snap} differs from {}",
            img.display()
        );
    }
}

fn failed(r: &Runner, args: &[&str]) -> String {
    let out = r.run(args);
    assert!(!out.status.success(), "{args:?} should have failed");
    stderr(&out)
}

fn refused<T: std::fmt::Debug>(r: Result<T, BackendError>, what: &str) {
    match r {
        Err(BackendError::Other(m)) if m.contains("access denied") => {}
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

/// The bucket's clock moves in whole seconds: a time strictly between
/// what happened before and what happens after.
fn a_second_apart() -> DateTime<Utc> {
    std::thread::sleep(Duration::from_millis(1100));
    let t = Utc::now();
    std::thread::sleep(Duration::from_millis(1100));
    t
}

#[test]
fn init_needs_a_bucket_with_object_lock() {
    let e = Env::new();
    let owner = &e.server.owner;
    let plain = e.server.create_plain_bucket().unwrap();
    let err = failed(
        &e.bw(owner).env("BULWARK_REPO", format!("s3://{plain}/x")),
        &["repo", "init", "--object-lock", "governance:1d"],
    );
    assert!(err.contains("has no Object Lock"), "{err}");
    let local = e.path("local");
    let err = failed(
        &e.bw(owner).env("BULWARK_REPO", &local),
        &["repo", "init", "--object-lock", "compliance:1d"],
    );
    assert!(err.contains("cannot lock objects"), "{err}");
    assert!(!local.join("config").exists());
    let err = failed(
        &e.bw(&e.maint),
        &["repo", "init", "--object-lock", "sealed:1d"],
    );
    assert!(err.contains("governance or compliance"), "{err}");

    e.bw(&e.maint)
        .ok(&["repo", "init", "--object-lock", "compliance:2d"]);
    let info = e.bw(&e.backup).json(&["repo", "info", "--json"]);
    assert_eq!(info["object_lock"]["mode"], "compliance", "{info}");
    assert_eq!(info["object_lock"]["period_secs"], 2 * 86400, "{info}");
    let text = e.bw(&e.backup).ok(&["repo", "info"]);
    assert!(text.contains("lock        compliance for 2d"), "{text}");
    // Config and key slot are locked like everything after them.
    let s3 = e.s3(&e.maint);
    let lock = s3.object_lock().unwrap();
    for name in [
        "config".to_string(),
        s3.list("keys/").unwrap()[0].name.clone(),
    ] {
        let r = lock.head_version(&name, None).unwrap().retention.unwrap();
        assert!(
            r.until > Utc::now() + chrono::Duration::hours(47),
            "{name}: {r:?}"
        );
    }
}

#[test]
fn an_attack_destroys_nothing_and_recover_undoes_what_it_hid() {
    let e = Env::new();
    e.bw(&e.maint)
        .ok(&["repo", "init", "--object-lock", "governance:1h"]);
    let (a, b) = (e.path("a.raw"), e.path("b.raw"));
    sparse_image(&a, 12, 11);
    sparse_image(&b, 12, 12);
    let sa0 = e.backup_image(&a, "web");
    let sa = e.backup_image(&a, "web");
    let sb = e.backup_image(&b, "db");
    let before = a_second_apart();
    let s3 = e.s3(&e.backup);
    let lock = s3.object_lock().unwrap();
    let names: Vec<String> = s3.list("").unwrap().into_iter().map(|o| o.name).collect();
    assert!(names.len() > 8, "{names:?}");

    // With the backup credential: prune fails, gc deletes nothing, and
    // every delete, version delete and lock change of every object fails.
    let bw = e.bw(&e.backup);
    let err = failed(&bw, &["prune", "--source", "web", "--keep-last", "1"]);
    assert!(err.contains("access denied"), "{err}");
    let _ = bw.run(&["gc", "--grace", "0s"]);
    let _ = bw.run(&["gc", "--grace", "0s"]);
    assert_eq!(bw.snapshot_ids().len(), 3);
    for n in &names {
        assert!(s3.exists(n).unwrap(), "{n}");
    }
    refused(lock.list_versions(""), "listing versions");
    let soon = bulwark_store::backend::Retention {
        mode: bulwark_store::backend::LockMode::Governance,
        until: Utc::now() + chrono::Duration::seconds(5),
    };
    for n in &names {
        refused(s3.delete(n), n);
        let v = lock.head_version(n, None).unwrap().version;
        refused(lock.delete_version(n, &v), n);
        refused(lock.set_retention(n, &v, soon), n);
    }
    // Overwrites go through (S3 cannot forbid them and still allow writes)
    // but land as new versions over locked ones.
    e.server
        .put_raw(
            &e.backup,
            &e.bucket,
            &format!("{PREFIX}/config"),
            b"{\"ransom\": 1}",
        )
        .unwrap();
    let manifest = format!("snapshots/{sa}");
    e.server
        .put_raw(
            &e.backup,
            &e.bucket,
            &format!("{PREFIX}/{manifest}"),
            b"gone",
        )
        .unwrap();
    failed(&bw, &["snapshots"]);

    // A stolen maintenance credential hides everything, and still deletes
    // no locked version.
    let m3 = e.s3(&e.maint);
    let mlock = m3.object_lock().unwrap();
    let mut locked = 0;
    for v in mlock.list_versions("").unwrap() {
        let head = match v.delete_marker {
            false => mlock.head_version(&v.name, Some(&v.version)).unwrap(),
            true => continue,
        };
        // The attacker's overwrites were written without a lock.
        if head.retention.is_some_and(|r| r.until > Utc::now()) {
            refused(mlock.delete_version(&v.name, &v.version), &v.name);
            locked += 1;
        }
    }
    assert!(locked >= names.len(), "{locked} locked versions");
    for o in m3.list("").unwrap() {
        m3.delete(&o.name).unwrap();
    }
    assert!(m3.list("").unwrap().is_empty());

    // The dry run lists and changes nothing.
    let mw = e.bw(&e.maint);
    let as_of = before.to_rfc3339();
    let plan = mw.json(&["repo", "recover", "--as-of", &as_of, "--dry-run", "--json"]);
    let steps = plan["steps"].as_array().unwrap();
    let stepped: BTreeSet<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    for n in &names {
        assert!(stepped.contains(n.as_str()), "no step for {n}: {plan}");
    }
    // Anything else was written since (the failed GCs' locks): hidden.
    for s in steps
        .iter()
        .filter(|s| !names.iter().any(|n| s["name"] == n.as_str()))
    {
        assert_eq!(s["action"], "hide", "{s}");
    }
    let restored: BTreeSet<&str> = steps
        .iter()
        .filter(|s| s["action"] == "restore")
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(restored, BTreeSet::from(["config", manifest.as_str()]));
    assert!(m3.list("").unwrap().is_empty());

    let done = mw.json(&["repo", "recover", "--as-of", &as_of, "--json"]);
    assert_eq!(done["steps"], plan["steps"]);
    let mut listed: Vec<String> = m3.list("").unwrap().into_iter().map(|o| o.name).collect();
    listed.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(bw.snapshot_ids().len(), 3);
    e.restore_matches(&sa0, &a);
    e.restore_matches(&sa, &a);
    e.restore_matches(&sb, &b);
    let v = bw.json(&["verify", "--json"]);
    assert!(v["damaged"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["snapshots"], 3);
}

#[test]
fn locks_follow_kept_snapshots_and_gc_reclaims_once_they_run_out() {
    let e = Env::new();
    let mw = e.bw(&e.maint);
    mw.ok(&["repo", "init", "--object-lock", "governance:30s"]);
    let (old, new) = (e.path("old.raw"), e.path("new.raw"));
    sparse_image(&old, 8, 21);
    sparse_image(&new, 8, 22);
    let s_old = e.backup_image(&old, "vm");
    let s_new = e.backup_image(&new, "vm");
    mw.ok(&["prune", "--source", "vm", "--keep-last", "1"]);
    assert_eq!(mw.snapshot_ids(), vec![s_new.clone()]);

    // Which objects the kept snapshot needs, as the repository says.
    let s3 = e.s3(&e.maint);
    let lock = s3.object_lock().unwrap();
    let repo = bulwark_store::Repository::open(
        std::sync::Arc::new(e.s3(&e.maint)),
        &bulwark_store::Secret::Passphrase(PW.into()),
    )
    .unwrap();
    let needed = bulwark_store::maintain::lock::needed_objects(&repo).unwrap();
    let r = mw.json(&["repo", "extend-locks", "--json"]);
    let target: DateTime<Utc> = r["target"].as_str().unwrap().parse().unwrap();
    assert_eq!(r["needed"].as_u64().unwrap() as usize, needed.len(), "{r}");
    assert!(target > Utc::now() + chrono::Duration::seconds(30), "{r}");

    // Each version's own lock: extended if kept, not if pruned.
    let mut pruned = Vec::new();
    for v in lock.list_versions("").unwrap() {
        if v.delete_marker || v.name.starts_with("locks/") {
            continue;
        }
        let until = lock
            .head_version(&v.name, Some(&v.version))
            .unwrap()
            .retention
            .unwrap()
            .until;
        if needed.contains(&v.name) {
            assert!(until >= target, "{} kept but locked until {until}", v.name);
        } else {
            assert!(until < target, "{} pruned but locked until {until}", v.name);
            pruned.push((v.name.clone(), until));
        }
    }
    let old_manifest = format!("snapshots/{s_old}");
    assert!(pruned.iter().any(|(n, _)| *n == old_manifest), "{pruned:?}");
    let pruned_packs: Vec<&String> = pruned
        .iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("data/"))
        .collect();
    assert!(
        !pruned_packs.is_empty(),
        "the old image's packs: {pruned:?}"
    );

    // GC removes the old packs from view; their locks hold the bytes.
    mw.ok(&["gc", "--grace", "0s"]);
    let g = mw.json(&["gc", "--grace", "0s", "--json"]);
    assert!(
        g["packs_deleted"].as_u64().unwrap() >= pruned_packs.len() as u64,
        "{g}"
    );
    assert!(
        g["lock"]["bytes_held_by_locks"].as_u64().unwrap() > 0,
        "{g}"
    );
    for p in &pruned_packs {
        assert!(!s3.exists(p).unwrap(), "{p}");
    }

    // Once the pruned objects' locks have run out, the next GC deletes
    // their versions: no delete it issues is refused (it would fail).
    let last = pruned.iter().map(|(_, u)| *u).max().unwrap();
    let wait = (last - Utc::now()).to_std().unwrap_or_default();
    std::thread::sleep(wait + Duration::from_millis(1500));
    let g = mw.json(&["gc", "--grace", "0s", "--json"]);
    assert!(
        g["lock"]["versions_deleted"].as_u64().unwrap() >= pruned.len() as u64,
        "{g}"
    );
    let left: BTreeSet<String> = lock
        .list_versions("")
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    for (n, _) in &pruned {
        assert!(!left.contains(n), "{n} still has versions");
    }
    e.restore_matches(&s_new, &new);
}

/// The agent checks a locked repository's locks on `lock_schedule` with
/// the maintenance credentials named in its config (none in its
/// environment), extends them when due, and `agent status` says when they
/// would run out before the next check.
#[test]
fn the_agent_extends_locks_with_the_maintenance_credentials() {
    let e = Env::new();
    e.bw(&e.maint)
        .ok(&["repo", "init", "--object-lock", "governance:40s"]);
    let img = e.path("a.raw");
    sparse_image(&img, 4, 31);
    e.backup_image(&img, "web");
    let creds = |c: &Credentials, name: &str| {
        let p = e.path(name);
        std::fs::write(
            &p,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                c.access_key, c.secret_key
            ),
        )
        .unwrap();
        p
    };
    let (backup, maint) = (
        creds(&e.backup, "backup.creds"),
        creds(&e.maint, "maint.creds"),
    );
    std::fs::write(e.path("pw"), PW).unwrap();
    let start = |schedule: &str, tag: &str| {
        let socket = e.path(&format!("agent-{tag}.sock"));
        let cfg = e.path(&format!("agent-{tag}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "state_dir = {state:?}\nsocket = {socket:?}\ntick_seconds = 1\n\n\
                 [repositories.main]\npath = \"s3://{bucket}/{PREFIX}\"\npassword_file = {pw:?}\n\
                 backup_credentials = {backup:?}\nmaintenance_credentials = {maint:?}\n\
                 lock_schedule = \"{schedule}\"\n",
                state = e.path(&format!("state-{tag}")),
                bucket = e.bucket,
                pw = e.path("pw"),
            ),
        )
        .unwrap();
        let child = Runner::new(env!("CARGO_BIN_EXE_bulwark"))
            .envs(e.server.env(&e.maint))
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("BULWARK_CACHE_DIR", e.path("agent-cache"))
            .cmd(&["agent", "run", "--config", cfg.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        (KillOnDrop(child), socket)
    };
    let status = |socket: &Path| -> Option<serde_json::Value> {
        let out = Runner::new(env!("CARGO_BIN_EXE_bulwark")).run(&[
            "agent",
            "status",
            "--json",
            "--socket",
            socket.to_str()?,
        ]);
        serde_json::from_slice(&out.stdout).ok()
    };
    let wait_lock = |socket: &Path| {
        let t = std::time::Instant::now();
        loop {
            if let Some(s) = status(socket).filter(|s| s["locks"]["main"]["at"].is_u64()) {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "no lock check");
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    let (agent, socket) = start("every 1s", "a");
    let s = wait_lock(&socket);
    let run = &s["locks"]["main"];
    assert_eq!(run["ok"], true, "{s}");
    assert!(run["extended"].as_u64().unwrap() > 0, "{s}");
    let until: DateTime<Utc> = run["locked_until"].as_str().unwrap().parse().unwrap();
    let s3 = e.s3(&e.maint);
    assert_eq!(s3.list("locks/").unwrap().len(), 1);
    let config = s3
        .object_lock()
        .unwrap()
        .head_version("config", None)
        .unwrap();
    assert_eq!(config.retention.unwrap().until, until);
    let problems = s["problems"].to_string();
    assert!(!problems.contains("locks of repository main"), "{problems}");
    drop(agent);

    // Checked once a year: the locks run out first, and status says so.
    let (_agent, socket) = start("yearly", "b");
    let s = wait_lock(&socket);
    let problems = s["problems"].to_string();
    assert!(
        problems.contains("locks of repository main run out at"),
        "{problems}"
    );
    // A pass was not due again: no second one.
    assert_eq!(s["locks"]["main"]["extended"], 0, "{s}");
    assert_eq!(s3.list("locks/").unwrap().len(), 1);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
