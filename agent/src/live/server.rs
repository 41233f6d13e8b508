//! The `bulwark-nbd` process that serves a live restore's snapshot. It
//! outlives the command (or agent) that started it: QEMU reads through it
//! until the stream is done, whoever supervises. A supervisor that finds it
//! dead starts it again on the same socket; QEMU's NBD client reconnects.
//!
//! Where systemd manages the host, the server runs in a transient unit of
//! its own (`bulwark-live-NAME.scope`, made by `systemd-run --scope`), so
//! stopping or restarting the agent's unit, which ends every process in
//! its cgroup, leaves it serving; elsewhere it runs in a process group of
//! its own.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::record::LiveRestore;

/// `bulwark-nbd` next to this executable, else on the PATH.
fn binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|e| e.with_file_name("bulwark-nbd"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("bulwark-nbd"))
}

/// How the server is started: `bulwark-nbd` itself, or `systemd-run
/// --scope` that moves itself into the restore's unit and then becomes
/// `bulwark-nbd` (the same pid, our environment and stdio: no S3 key or
/// passphrase becomes a unit property other users could read).
fn command(name: &str) -> Command {
    let Some(unit) = unit_for(name) else {
        return Command::new(binary());
    };
    // A predecessor's unit may linger a moment after its server died (or
    // hold a server nobody recorded): gone first, or the name is taken.
    // Its outcome is not needed: systemd-run below reports a real problem.
    let _ = Command::new("systemctl")
        .args(["stop", "--quiet", &unit])
        .stderr(Stdio::null())
        .status();
    let mut c = Command::new("systemd-run");
    c.args(["--scope", "--quiet", "--collect"])
        .arg(format!("--unit={unit}"))
        .arg(format!(
            "--description=Bulwark live restore {name}: NBD server"
        ))
        .arg("--")
        .arg(binary());
    c
}

/// The unit a server for the restore `name` runs in, when systemd manages
/// the host (sd_booted(3)) and we may create units (root).
fn unit_for(name: &str) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    (root && Path::new("/run/systemd/system").is_dir()).then(|| unit_name(name))
}

/// `bulwark-live-NAME.scope`, each byte of NAME a unit name may not hold
/// written `\xNN` (as `systemd-escape` does, but `-` kept: it is valid in a
/// unit name and an operator types it).
pub fn unit_name(name: &str) -> String {
    let mut out = String::from("bulwark-live-");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b":_.-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out + ".scope"
}

/// The unit the running server is in (`bulwark-live-NAME.scope`), from its
/// cgroup; `None` when it is not running or runs without one.
pub fn unit(r: &LiveRestore) -> Option<String> {
    if !alive(r) {
        return None;
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", r.server_pid?)).ok()?;
    cgroup
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .find(|u| u.starts_with("bulwark-live-"))
        .map(str::to_string)
}

/// How long the first server records the guest's reads as its boot set.
pub const BOOT_SET_WINDOW_SECS: u64 = 60;

/// A server started that may not serve yet: it opens the repository and
/// loads its index meanwhile (on S3, a chain of round trips the caller
/// can spend making overlays and defining the domain).
pub struct Starting {
    child: Option<std::process::Child>,
    pid: u32,
    first_line: std::sync::mpsc::Receiver<std::io::Result<String>>,
    /// Its stdin, when the plan comes later ([`Planned::Later`]).
    plan: Option<std::process::ChildStdin>,
    log: PathBuf,
}

impl Starting {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where a server started with [`Planned::Later`] reads its plan.
    pub fn plan_pipe(&mut self) -> Result<PlanPipe> {
        Ok(PlanPipe(
            self.plan.take().context("the server takes no plan")?,
        ))
    }

    /// Waits until the server serves; its pid.
    pub fn ready(mut self) -> Result<u32> {
        let t = Instant::now();
        loop {
            if let Ok(Ok(line)) = self.first_line.recv_timeout(Duration::from_millis(100)) {
                if line.trim() == "ready" {
                    return Ok(self.pid);
                }
            }
            let Some(child) = self.child.as_mut() else {
                bail!("bulwark-nbd is gone");
            };
            if let Some(st) = child.try_wait()? {
                bail!(
                    "bulwark-nbd exited ({st}) before serving: {}",
                    last_error_in(&self.log).unwrap_or_default()
                );
            }
            if t.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                bail!("bulwark-nbd did not start serving within 120 s");
            }
        }
    }

    /// Stops a server that will not be used (the start failed before its
    /// record was saved).
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A server's stdin, for its [`ServePlan`](bulwark_nbd::cli::ServePlan).
pub struct PlanPipe(std::process::ChildStdin);

impl PlanPipe {
    /// Tells the server what it serves for: the snapshot planned (it
    /// refuses another), the backfill jobs (`DISK=PATH`) and the boot set
    /// file. It reads them once its disks are open; the pipe holds them.
    pub fn send(mut self, plan: &bulwark_nbd::cli::ServePlan) -> Result<()> {
        use std::io::Write;
        let mut line = serde_json::to_vec(plan)?;
        line.push(b'\n');
        self.0
            .write_all(&line)
            .context("sending the server its plan")
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        // Reaped by whoever outlives it (init, or this reaper).
        if let Some(mut child) = self.child.take() {
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}

/// Starts the server for `r` without waiting for it to serve.
pub fn spawn(r: &LiveRestore, password: Option<&str>) -> Result<Starting> {
    let launch = Launch {
        name: &r.name,
        snapshot: r.snapshot.to_hex(),
        socket: &r.socket,
        log: &r.server_log,
        repo: &r.repo,
        outage_wait_secs: r.outage_wait_secs,
        stream_mib_per_sec: r.stream_mib_per_sec,
        // The first server of a restore sees the guest boot: what it reads
        // is the boot set of the VM's next live restore. A restarted one
        // would record whatever the guest does later.
        record_boot_set: matches!(r.phase(), super::record::Phase::Booting),
        plan: Planned::Now {
            backfill: backfill_jobs(r),
            boot_set: r.boot_set_file.clone().filter(|b| b.exists()),
        },
    };
    launch.spawn(password)
}

/// `DISK=PATH` of each disk of `r` the server still restores into its file.
pub fn backfill_jobs(r: &LiveRestore) -> Vec<String> {
    r.disks
        .iter()
        .filter(|d| d.needs_server())
        .filter_map(|d| Some(format!("{}={}", d.target, d.base.as_ref()?.display())))
        .collect()
}

/// How a server learns what to backfill and which boot set to fetch.
pub enum Planned {
    /// On its command line.
    Now {
        backfill: Vec<String>,
        boot_set: Option<PathBuf>,
    },
    /// Later, through [`PlanPipe::send`]: a live restore starts its
    /// server first, so both open the repository and read the snapshot at
    /// once (on S3 a chain of round trips each).
    Later,
}

/// What a server is started with.
pub struct Launch<'a> {
    pub name: &'a str,
    /// A snapshot id, prefix or `SOURCE@latest`.
    pub snapshot: String,
    pub socket: &'a Path,
    pub log: &'a Path,
    pub repo: &'a super::record::RepoSpec,
    pub outage_wait_secs: u64,
    pub stream_mib_per_sec: u64,
    pub record_boot_set: bool,
    pub plan: Planned,
}

impl Launch<'_> {
    pub fn spawn(self, password: Option<&str>) -> Result<Starting> {
        // A socket left by a killed server would make the bind fail.
        remove_if_there(self.socket)?;
        // The last server's counters would speak for this one (a failed
        // backfill, above all) until it writes its own.
        let stats = super::record::stats_path(self.log);
        remove_if_there(&stats)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = command(self.name);
        cmd.args(["serve", "--snapshot", &self.snapshot, "--socket"])
            .arg(self.socket)
            .env("BULWARK_REPO", &self.repo.repo)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0);
        if let Some(p) = &self.repo.password_file {
            cmd.arg("--password-file").arg(p);
        }
        if let Some(k) = &self.repo.key_file {
            cmd.arg("--key-file").arg(k);
        }
        cmd.arg("--stats").arg(&stats);
        cmd.arg("--outage-wait")
            .arg(self.outage_wait_secs.to_string());
        cmd.arg("--backfill-mib-per-sec")
            .arg(self.stream_mib_per_sec.to_string());
        match &self.plan {
            Planned::Now { backfill, boot_set } => {
                for b in backfill {
                    cmd.arg("--backfill").arg(b);
                }
                if let Some(b) = boot_set {
                    cmd.arg("--boot-set").arg(b);
                }
            }
            Planned::Later => {
                cmd.arg("--plan-on-stdin").stdin(Stdio::piped());
            }
        }
        if self.record_boot_set {
            cmd.arg("--record-boot-set")
                .arg(BOOT_SET_WINDOW_SECS.to_string());
        }
        if let Some(rep) = &self.repo.replica {
            cmd.arg("--replica").arg(rep);
        }
        if let Some(e) = &self.repo.s3_endpoint {
            cmd.env("BULWARK_S3_ENDPOINT", e);
        }
        if let Some(pw) = password {
            cmd.env("BULWARK_PASSWORD", pw);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("server stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let r = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(r.map(|_| line));
        });
        Ok(Starting {
            plan: child.stdin.take(),
            child: Some(child),
            pid,
            first_line: rx,
            log: self.log.to_path_buf(),
        })
    }
}

fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Whether the recorded server runs (and is ours: its command line names
/// this restore's socket, so a recycled pid is never taken for it).
pub fn alive(r: &LiveRestore) -> bool {
    let Some(pid) = r.server_pid else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let socket = r.socket.to_string_lossy();
    !zombie
        && String::from_utf8_lossy(&cmdline)
            .split('\0')
            .any(|a| a == socket)
}

/// Stops the server (SIGTERM, then SIGKILL after 10 s).
pub fn stop(r: &LiveRestore) {
    if !alive(r) {
        return;
    }
    let Some(pid) = r.server_pid else { return };
    // SAFETY: signalling a pid we verified is our server.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let t = Instant::now();
    while alive(r) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(r) {
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let _ = std::fs::remove_file(&r.socket);
}

/// The last failed read the server logged (names the damaged chunk), or
/// why systemd-run could not start it.
pub fn last_error(r: &LiveRestore) -> Option<String> {
    last_error_in(&r.server_log)
}

fn last_error_in(log: &Path) -> Option<String> {
    let log = std::fs::read_to_string(log).ok()?;
    log.lines()
        .rev()
        .find(|l| {
            // systemd-run says "Failed to start ...".
            let l = l.to_lowercase();
            l.contains("failed") || l.contains("error")
        })
        .map(|l| l.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_escape_what_units_cannot_hold() {
        assert_eq!(unit_name("web01"), "bulwark-live-web01.scope");
        assert_eq!(unit_name("web-live_2.b"), "bulwark-live-web-live_2.b.scope");
        assert_eq!(
            unit_name("a b/ä\\"),
            "bulwark-live-a\\x20b\\x2f\\xc3\\xa4\\x5c.scope"
        );
    }
}
