//! Shared helpers of the `vm_*` tests.
#![allow(dead_code, clippy::new_without_default)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const PW: &str = "vm test passphrase";
/// FastCDC's largest chunk: the incremental bound allows re-chunking two
/// of them per dirty extent.
pub const MAX_CHUNK: u64 = 4 << 20;

pub struct Env {
    pub dir: tempfile::TempDir,
}

/// A live restore's server outlives a test that failed before the restore
/// ended: this env's (their command lines name its state directory) stop
/// with it.
impl Drop for Env {
    fn drop(&mut self) {
        let live = self.state_dir().join("live").join("");
        let _ = Command::new("pkill")
            .args(["-f", "--"])
            .arg(format!("^[^ ]*bulwark-nbd serve .*{}", live.display()))
            .status();
    }
}

impl Env {
    pub fn new() -> Self {
        let e = Env {
            dir: tempfile::Builder::new()
                .prefix("bw-vmtest-")
                .tempdir()
                .unwrap(),
        };
        e.ok(&["repo", "init"]);
        e
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// Records `keys` (`domain/policy`) as run just now, so an agent
    /// started next runs none of them before its schedule says (a policy
    /// that never ran runs as soon as the agent has listed the domains).
    /// Returns that time (seconds since the epoch).
    pub fn seed_runs(&self, keys: &[String]) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let runs: serde_json::Map<String, serde_json::Value> = keys
            .iter()
            .map(|k| (k.clone(), serde_json::json!({"at": now, "ok": true})))
            .collect();
        std::fs::create_dir_all(self.state_dir()).unwrap();
        let s = serde_json::json!({ "runs": runs });
        std::fs::write(self.state_dir().join("schedule.json"), s.to_string()).unwrap();
        now
    }

    /// `bulwark` on the env's repository and state dir.
    pub fn bw(&self) -> testbed::cli::Runner {
        testbed::cli::Runner::new(env!("CARGO_BIN_EXE_bulwark"))
            .env("BULWARK_REPO", self.path("repo"))
            .env("BULWARK_PASSWORD", PW)
            .env("BULWARK_STATE_DIR", self.state_dir())
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        self.bw().cmd(args)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.bw().run(args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.bw().ok(args)
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.bw().json(args)
    }

    pub fn backup(&self, domain: &str, extra: &[&str]) -> serde_json::Value {
        let mut a = vec!["backup", "vm", domain, "--json"];
        a.extend_from_slice(extra);
        let v = self.json(&a);
        eprintln!("backup: {v}");
        v
    }

    /// Restores `disk` of `snapshot` and asserts it equals `reference`.
    pub fn assert_restores_to(&self, snapshot: &str, disk: &str, reference: &Path) {
        let out = self.path(&format!("restore-{}-{disk}.raw", &snapshot[..8]));
        self.ok(&[
            "restore",
            "image",
            snapshot,
            "--disk",
            disk,
            "--to",
            out.to_str().unwrap(),
            "--force",
        ]);
        assert_same(&out, reference);
        let _ = std::fs::remove_file(out);
    }
}

/// A raw copy of a disk as it is now (`qemu-img convert -U`): pause the VM
/// around it for a consistent reference.
pub fn reference(disk: &Path, format: &str, to: &Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-U", "-f", format, "-O", "raw"])
        .arg(disk)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

pub fn assert_same(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(
        x.len(),
        y.len(),
        "{} vs {}: sizes differ",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {i}", a.display(), b.display());
    }
}

pub fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// Asserts the incremental bound on one disk report: bytes read at most the
/// dirty bytes plus two chunks per dirty extent (an incremental re-chunks
/// from the chunk boundary before each extent; `docs/vm.md`).
pub fn assert_incremental_bound(disk: &serde_json::Value, min_dirty: u64) {
    assert_eq!(disk["mode"], "incremental", "{disk}");
    let dirty = u(disk, "dirty_bytes");
    let extents = u(disk, "dirty_extents");
    let read = u(disk, "bytes_read");
    assert!(dirty >= min_dirty, "dirty {dirty} < written {min_dirty}");
    let bound = dirty + 2 * extents * MAX_CHUNK;
    assert!(
        read <= bound,
        "read {read} > dirty {dirty} + 2 x {extents} x 4 MiB = {bound}"
    );
    assert!(read >= min_dirty, "read {read} < written {min_dirty}");
}

pub fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn checkpoints(domain: &str) -> Vec<String> {
    virsh(&["checkpoint-list", domain, "--name"])
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The persistent bitmaps in a qcow2 image with their flags (read with
/// `-U`: a running QEMU may hold it).
pub fn bitmaps(disk: &Path) -> Vec<(String, Vec<String>)> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(disk)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img info {}", disk.display());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.pointer("/format-specific/data/bitmaps")
        .and_then(|b| b.as_array())
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            let flags = b["flags"].as_array().cloned().unwrap_or_default();
            (
                b["name"].as_str().unwrap().to_string(),
                flags
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// Names of the persistent bitmaps in a qcow2 image.
pub fn bitmap_names(disk: &Path) -> Vec<String> {
    bitmaps(disk).into_iter().map(|(n, _)| n).collect()
}

/// Bulwark's policy element naming `policy`, for `VmOptions::metadata_xml`.
pub fn policy_xml(policy: &str) -> String {
    format!(
        "<bulwark:policies xmlns:bulwark='https://bulwark.dev/xmlns/libvirt/1'>\
         <bulwark:policy name='{policy}'/></bulwark:policies>"
    )
}

/// An agent daemon this test started, killed when dropped.
pub struct Agent {
    child: std::process::Child,
    pub socket: PathBuf,
}

impl Agent {
    /// Starts `bulwark agent run` with a config of one local repository
    /// (`main`, at the env's repo) and `rest` appended (policies, ...).
    pub fn start(env: &Env, tick_seconds: u64, rest: &str) -> Agent {
        Self::start_with(env, tick_seconds, rest, Vec::new())
    }

    /// [`Agent::start`] with more environment (S3 credentials, ...).
    pub fn start_with(
        env: &Env,
        tick_seconds: u64,
        rest: &str,
        vars: Vec<(String, String)>,
    ) -> Agent {
        Self::start_full(env, tick_seconds, "", rest, vars)
    }

    /// [`Agent::start_with`] with top-level keys (`top`) before the tables.
    pub fn start_full(
        env: &Env,
        tick_seconds: u64,
        top: &str,
        rest: &str,
        vars: Vec<(String, String)>,
    ) -> Agent {
        Self::spawn(env, tick_seconds, top, rest, vars, Stdio::inherit())
    }

    /// [`Agent::start_full`] with the agent's log (`BULWARK_LOG=info`)
    /// written to `log`, for a test that reads it.
    pub fn start_logged(env: &Env, top: &str, rest: &str, log: &Path) -> Agent {
        let vars = vec![
            ("BULWARK_LOG".to_string(), "info".to_string()),
            ("NO_COLOR".to_string(), "1".to_string()),
        ];
        let file = std::fs::File::create(log).unwrap();
        Self::spawn(env, 30, top, rest, vars, file.into())
    }

    fn spawn(
        env: &Env,
        tick_seconds: u64,
        top: &str,
        rest: &str,
        vars: Vec<(String, String)>,
        stderr: Stdio,
    ) -> Agent {
        let socket = env.path("agent.sock");
        let pw = env.path("pw");
        std::fs::write(&pw, PW).unwrap();
        let cfg = env.path("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "state_dir = {state:?}\nsocket = {socket:?}\ntick_seconds = {tick_seconds}\n{top}\n\
                 [repositories.main]\npath = {repo:?}\npassword_file = {pw:?}\n{rest}",
                state = env.state_dir(),
                repo = env.path("repo"),
            ),
        )
        .unwrap();
        // A killed agent's socket file stays behind: wait for a live one.
        let _ = std::fs::remove_file(&socket);
        // A group of its own, as under systemd: SIGTERM then reaches the
        // helpers of a backup in flight too (see Drop).
        let child = std::os::unix::process::CommandExt::process_group(
            env.cmd(&["agent", "run", "--config", cfg.to_str().unwrap()])
                .envs(vars)
                .stdout(Stdio::null())
                .stderr(stderr),
            0,
        )
        .spawn()
        .unwrap();
        let t = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(30),
                "agent did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Agent { child, socket }
    }

    pub fn status(&self, env: &Env) -> serde_json::Value {
        // Exit 1 when something is wrong: the JSON says what.
        let out = env.run(&[
            "agent",
            "status",
            "--json",
            "--socket",
            self.socket.to_str().unwrap(),
        ]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("agent status: {e}: {out:?}"))
    }

    /// A backup through the agent's socket; its report.
    pub fn backup(&self, env: &Env, domain: &str) -> serde_json::Value {
        let out = env.ok(&[
            "agent",
            "backup",
            domain,
            "--socket",
            self.socket.to_str().unwrap(),
        ]);
        serde_json::from_str(&out).unwrap()
    }
}

impl Drop for Agent {
    /// Stops the agent as systemd does: SIGTERM (it ends the helpers of a
    /// backup in flight, whose `qemu-nbd` would otherwise hold the disk's
    /// lock into the next test step), then SIGKILL if it lingers.
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(15) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms until it returns `Some`, failing after `secs`.
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let t = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Domains a test made (restored, live-restored): destroyed and undefined
/// at the end, quietly (some never got defined).
pub struct Restored(pub Vec<String>);

impl Drop for Restored {
    fn drop(&mut self) {
        for n in &self.0 {
            for args in [vec!["destroy", n], vec!["undefine", n, "--nvram"]] {
                let _ = Command::new("virsh")
                    .args(["-q", "-c", "qemu:///system"])
                    .args(args)
                    .output();
            }
        }
    }
}

/// A repository in a fresh bucket of a test S3 server (s3s-fs).
pub struct S3Repo {
    pub server: testbed::s3::S3Server,
    pub repo: String,
}

impl S3Repo {
    pub fn start(prefix: &str) -> S3Repo {
        let server = testbed::s3::S3Server::start().unwrap();
        let bucket = server.create_bucket().unwrap();
        let repo = format!("s3://{bucket}/{prefix}");
        S3Repo { server, repo }
    }

    /// `bulwark ARGS` on this repository (its cache in the env's dir); its
    /// stdout, failing the test if it fails.
    pub fn ok(&self, env: &Env, args: &[&str]) -> String {
        let out = env
            .cmd(args)
            .envs(self.server.env())
            .env("BULWARK_REPO", &self.repo)
            .env("BULWARK_CACHE_DIR", env.path("cache"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}
