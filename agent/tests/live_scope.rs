//! Live restore servers in transient systemd units. Where systemd is PID 1
//! (and the test runs as root), `bulwark-nbd` for a live restore runs in
//! `bulwark-live-NAME.scope`, outside the cgroup of whoever started it: the
//! test starts it from a service of its own with systemd's default kill
//! mode (as the agent's unit now is), stops that service, and the server
//! still serves the snapshot bit for bit; killed, it starts again under
//! the same name; stopped, its unit is gone. Elsewhere the test prints why
//! it is skipped (this project's build machines have no systemd PID 1).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bulwark::live::record::{LiveDisk, LiveRestore, Records, RepoSpec};
use bulwark::live::server;
use testbed::cli::Runner;

const PW: &str = "live scope passphrase";
/// Set for the starter: the state dir and the restore's name.
const STARTER_ENV: &str = "BULWARK_TEST_SCOPE_STARTER";

fn why_not_systemd() -> Option<String> {
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if pid1.trim() != "systemd" || !Path::new("/run/systemd/system").is_dir() {
        return Some(format!(
            "systemd is not PID 1 here (PID 1 is {:?})",
            pid1.trim()
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: no units can be made".into());
    }
    None
}

/// `bulwark-nbd` is found on the PATH from a test binary (it sits beside
/// `bulwark`, not beside the test).
fn with_bins_on_path() {
    let bins = Path::new(env!("CARGO_BIN_EXE_bulwark")).parent().unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bins.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    std::env::set_var("PATH", std::env::join_paths(dirs).unwrap());
}

fn systemctl(args: &[&str]) -> (bool, String) {
    let o = Command::new("systemctl").args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).trim().to_string(),
    )
}

/// The snapshot's disk through the server equals the image.
fn serves(r: &LiveRestore, image: &Path) -> bool {
    let uri = format!("nbd+unix:///vda?socket={}", r.socket.display());
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&uri)
        .arg(image)
        .status()
        .is_ok_and(|s| s.success())
}

/// Units left by a failed run are stopped.
struct Units(Vec<String>);

impl Drop for Units {
    fn drop(&mut self) {
        for u in &self.0 {
            let _ = Command::new("systemctl").args(["stop", u]).status();
        }
    }
}

#[test]
fn live_restore_server_runs_in_its_own_unit_and_outlives_its_starter() {
    if let Some(why) = why_not_systemd() {
        eprintln!("skipped: {why}");
        return;
    }
    with_bins_on_path();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pw = dir.join("pw");
    std::fs::write(&pw, PW).unwrap();
    let bw = Runner::new(env!("CARGO_BIN_EXE_bulwark"))
        .env("BULWARK_REPO", dir.join("repo"))
        .env("BULWARK_PASSWORD", PW);
    bw.ok(&["repo", "init"]);
    let image = dir.join("disk.raw");
    testbed::cli::sparse_image(&image, 24, 7);
    let snap = bw.backup_image(image.to_str().unwrap(), "scope-src")["snapshot"]
        .as_str()
        .unwrap()
        .to_string();

    let state = dir.join("state");
    let records = Records::new(&state);
    let name = testbed::unique_name("bw-scope");
    let mut r = record(&records, &name, &snap, &dir.join("repo"), &pw);
    records.save(&mut r).unwrap();
    let unit = server::unit_name(&name);
    let starter = format!("{name}-starter.service");
    let _units = Units(vec![unit.clone(), starter.clone()]);

    // The starter: this test binary again, in a service with the default
    // kill mode, starting the server as the agent would.
    let exe = std::env::current_exe().unwrap();
    Command::new("systemd-run")
        .args(["--quiet", "--collect"])
        .arg(format!("--unit={starter}"))
        .arg(format!("--setenv={STARTER_ENV}={}:{name}", state.display()))
        .arg(format!("--setenv=PATH={}", std::env::var("PATH").unwrap()))
        .arg(exe)
        .args(["--exact", "starter", "--ignored", "--nocapture"])
        .status()
        .unwrap();
    let t = Instant::now();
    while records.load(&name).unwrap().server_pid.is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the starter did not start it"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = records.load(&name).unwrap();
    assert!(server::alive(&r));
    assert_eq!(server::unit(&r).as_deref(), Some(unit.as_str()));
    assert_eq!(systemctl(&["is-active", &unit]), (true, "active".into()));
    assert!(serves(&r, &image));
    let status = bw.json(&[
        "restore",
        "status",
        &name,
        "--json",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(status[0]["server_unit"], unit.as_str(), "{status:#}");

    // Stopping the starter's unit ends its whole cgroup, not the server.
    let (stopped, _) = systemctl(&["stop", &starter]);
    assert!(stopped);
    assert!(server::alive(&r), "the server went with its starter");
    assert!(serves(&r, &image));

    // Killed, it starts again under the same unit name.
    let pid = r.server_pid.unwrap();
    // SAFETY: signalling the server this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let t = Instant::now();
    while server::alive(&r) {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = records
        .update(&name, |r| {
            r.server_pid = Some(server::spawn(r, None)?.ready()?);
            Ok(())
        })
        .unwrap();
    assert_eq!(server::unit(&r).as_deref(), Some(unit.as_str()));
    assert!(serves(&r, &image));

    // Stopped: the unit is gone, and so is the socket.
    server::stop(&r);
    assert!(!server::alive(&r));
    assert!(!r.socket.exists());
    let t = Instant::now();
    while systemctl(&["is-active", &unit]).0 {
        assert!(t.elapsed() < Duration::from_secs(10), "{unit} still active");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The starter half (run by the test above through systemd-run; does
/// nothing elsewhere): starts the recorded restore's server, records its
/// pid, and waits to be stopped.
#[test]
#[ignore = "run by live_restore_server_runs_in_its_own_unit_and_outlives_its_starter"]
fn starter() {
    let Some(spec) = std::env::var_os(STARTER_ENV) else {
        return;
    };
    let spec = spec.into_string().unwrap();
    let (state, name) = spec.rsplit_once(':').unwrap();
    let records = Records::new(Path::new(state));
    records
        .update(name, |r| {
            r.server_pid = Some(server::spawn(r, None)?.ready()?);
            Ok(())
        })
        .unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn record(records: &Records, name: &str, snap: &str, repo: &Path, pw: &Path) -> LiveRestore {
    let mut r = LiveRestore::new(
        name.to_string(),
        snap.parse().unwrap(),
        "scope-src".into(),
        RepoSpec {
            repo: repo.display().to_string(),
            password_file: Some(PathBuf::from(pw)),
            key_file: None,
            s3_endpoint: None,
            replica: None,
        },
        records.dir().join(format!("{name}.sock")),
        records.dir().join(format!("{name}.nbd.log")),
        vec![LiveDisk {
            target: "vda".into(),
            overlay: records.dir().join(format!("{name}.qcow2")),
            size: 24 << 20,
            done: 0,
            local: false,
            pulls: 1,
            base: None,
            on_base: false,
        }],
        0,
    );
    r.streams_started().unwrap();
    r
}
