//! Restores started from the dashboard run in a child process
//! (`bulwark web worker`, hidden) through the code paths of `bulwark
//! restore vm`: `vm::restore` for full restores, `live::start` for live
//! ones (then handed to the agent, as `restore vm --live` does). The child
//! reports on stdout, one JSON [`Event`] a line; its log goes to stderr.
//! A cancel is SIGTERM to the child: the CLI's interrupt handler removes
//! what the unfinished restores created, as for Ctrl-C.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bulwark_proto::{Done, Reply, Request};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::tasks::{Item, State, Task};
use crate::config::Config;
use crate::libvirt::Libvirt;
use crate::live::record::{Records, RepoSpec};
use crate::live::start::{self, LiveOptions};
use crate::vm::restore::{self, Options, Plan, Stage};
use crate::vm::rewrite::ImageFormat;

/// Where restored disks go unless a VM says otherwise.
pub const DEFAULT_STORAGE: &str = "/var/lib/libvirt/images";
/// Full restores run at once.
const PARALLEL: usize = 2;

/// What `POST /api/v1/restore` asks for.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Default: the only repository of the config.
    #[serde(default)]
    pub repository: Option<String>,
    pub vms: Vec<VmSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// An id, a unique id prefix, or `VM@latest`.
    pub snapshot: String,
    /// The new domain's name.
    #[serde(rename = "as")]
    pub name: String,
    #[serde(default)]
    pub live: bool,
    #[serde(default)]
    pub storage_dir: Option<PathBuf>,
    /// Start the restored VM (a live restore always starts).
    #[serde(default)]
    pub start: bool,
}

impl Job {
    /// Refusals that need no repository: no VMs, bad or repeated names.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.vms.is_empty() {
            return Err("no VMs to restore: `vms` is empty".into());
        }
        for (i, v) in self.vms.iter().enumerate() {
            if v.snapshot.trim().is_empty() {
                return Err(format!("vms[{i}]: no snapshot"));
            }
            if v.name.is_empty() || v.name.contains('/') || v.name.len() > 100 {
                return Err(format!(
                    "vms[{i}]: {:?} is not a usable domain name",
                    v.name
                ));
            }
            if self.vms.iter().filter(|w| w.name == v.name).count() > 1 {
                return Err(format!("{} is named twice", v.name));
            }
            if let Some(d) = &v.storage_dir {
                if !d.is_absolute() {
                    return Err(format!("vms[{i}]: storage_dir must be an absolute path"));
                }
            }
        }
        Ok(())
    }
}

/// What the child says, one per line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Every VM planned (nothing written yet): names and bytes.
    Planned {
        vms: Vec<(String, u64)>,
    },
    Started {
        vm: usize,
    },
    Progress {
        vm: usize,
        done: u64,
    },
    Done {
        vm: usize,
        outcome: Value,
    },
    Failed {
        vm: usize,
        error: String,
    },
    /// The job as a whole failed before any VM started.
    Error {
        error: String,
    },
}

/// The child: reads a [`Job`] on stdin, restores, reports. Exit 0 when
/// every VM is restored.
pub fn run_child(config: &Path) -> Result<i32> {
    let out = Out::default();
    let job: Job = serde_json::from_reader(std::io::stdin().lock()).context("reading the job")?;
    match run_job(config, &job, &out) {
        Ok(all_ok) => Ok(if all_ok { 0 } else { 1 }),
        Err(e) => {
            out.send(&Event::Error {
                error: format!("{e:#}"),
            });
            Ok(1)
        }
    }
}

/// Stdout, one event a line, shared by the restore threads.
#[derive(Default)]
struct Out(Mutex<()>);

impl Out {
    fn send(&self, e: &Event) {
        let _g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut o = std::io::stdout().lock();
        // The parent reads until EOF; a write that fails means it is gone.
        if serde_json::to_writer(&mut o, e).is_err()
            || writeln!(o).and_then(|()| o.flush()).is_err()
        {
            std::process::exit(1);
        }
    }
}

fn run_job(config: &Path, job: &Job, out: &Out) -> Result<bool> {
    let began_ms = chrono::Utc::now().timestamp_millis();
    job.check().map_err(anyhow::Error::msg)?;
    let cfg = Config::load(config)?;
    let name = match &job.repository {
        Some(n) => n.clone(),
        None if cfg.repositories.len() == 1 => {
            cfg.repositories.keys().next().cloned().unwrap_or_default()
        }
        None => bail!("name the repository"),
    };
    let rc = cfg
        .repositories
        .get(&name)
        .with_context(|| format!("no repository {name:?}"))?;
    let libvirt = Libvirt::open(&cfg.libvirt_uri)?;
    let repo = Arc::new(rc.open()?);
    let records = Records::new(&cfg.state_dir);
    let spec = RepoSpec {
        repo: rc.path.clone(),
        password_file: rc.password_file.clone(),
        key_file: rc.key_file.clone(),
        s3_endpoint: std::env::var("BULWARK_S3_ENDPOINT")
            .ok()
            .filter(|s| !s.is_empty()),
        replica: None,
    };
    let live_opts = |v: &VmSpec| LiveOptions {
        restore: options(v, Stage::Started, ImageFormat::Qcow2),
        records: &records,
        repo: spec.clone(),
        password: None,
        stream_mib_per_sec: 0,
        outage_wait_secs: crate::live::record::DEFAULT_OUTAGE_WAIT_SECS,
        began_ms,
    };
    // Every VM is checked before any is written.
    let plans = repo.while_loading_index(|| -> Result<Vec<Plan>> {
        job.vms
            .iter()
            .map(|v| {
                let snap = repo.find_snapshot(&v.snapshot)?;
                if v.live {
                    start::plan(&libvirt, snap, &v.name, &live_opts(v))
                } else {
                    let stage = if v.start {
                        Stage::Started
                    } else {
                        Stage::Defined
                    };
                    restore::plan(
                        &libvirt,
                        snap,
                        &v.name,
                        &options(v, stage, ImageFormat::Qcow2),
                    )
                }
                .with_context(|| v.name.clone())
            })
            .collect()
    })?;
    out.send(&Event::Planned {
        vms: plans.iter().map(|p| (p.name.clone(), p.bytes())).collect(),
    });
    restore::undo_on_interrupt(libvirt.clone())?;
    let mut all_ok = true;
    for (i, (v, p)) in job
        .vms
        .iter()
        .zip(&plans)
        .enumerate()
        .filter(|(_, (v, _))| v.live)
    {
        out.send(&Event::Started { vm: i });
        let r = start::start(&repo, &libvirt, p, &live_opts(v), None).and_then(|r| {
            adopt(&cfg.socket, &r.name)?;
            Ok(r)
        });
        all_ok &= report(
            out,
            i,
            r.map(|r| json!({"live": true, "name": r.name, "snapshot": r.snapshot})),
        );
    }
    let full: Vec<usize> = (0..plans.len()).filter(|&i| !job.vms[i].live).collect();
    all_ok &= restore_full(&repo, &libvirt, job, &plans, &full, out);
    Ok(all_ok)
}

fn options(v: &VmSpec, stage: Stage, format: ImageFormat) -> Options {
    Options {
        dir: v
            .storage_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STORAGE)),
        pool: None,
        format,
        keep_macs: false,
        protect: false,
        stage,
        threads: 0,
    }
}

/// The agent supervises the live restore from now on.
fn adopt(socket: &Path, name: &str) -> Result<()> {
    let req = Request::LiveAdopt {
        name: name.to_string(),
    };
    let reply: Reply<Done> = crate::daemon::request(socket, &req, Duration::from_secs(30))?;
    reply
        .into_result()
        .with_context(|| format!("the agent did not take {name} over"))?;
    Ok(())
}

fn report(out: &Out, vm: usize, r: Result<Value>) -> bool {
    match r {
        Ok(outcome) => {
            out.send(&Event::Done { vm, outcome });
            true
        }
        Err(e) => {
            out.send(&Event::Failed {
                vm,
                error: format!("{e:#}"),
            });
            false
        }
    }
}

/// The full restores, [`PARALLEL`] at a time, progress every 250 ms.
fn restore_full(
    repo: &Arc<bulwark_store::Repository>,
    libvirt: &Libvirt,
    job: &Job,
    plans: &[Plan],
    which: &[usize],
    out: &Out,
) -> bool {
    let done: Vec<AtomicU64> = plans.iter().map(|_| AtomicU64::new(0)).collect();
    let next = AtomicUsize::new(0);
    let running = AtomicUsize::new(which.len());
    let ok = std::sync::atomic::AtomicBool::new(true);
    std::thread::scope(|s| {
        s.spawn(|| {
            while running.load(Ordering::Relaxed) > 0 {
                std::thread::sleep(Duration::from_millis(250));
                for &i in which {
                    out.send(&Event::Progress {
                        vm: i,
                        done: done[i].load(Ordering::Relaxed),
                    });
                }
            }
        });
        for _ in 0..PARALLEL.min(which.len()) {
            s.spawn(|| loop {
                let Some(&i) = which.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                out.send(&Event::Started { vm: i });
                let v = &job.vms[i];
                let stage = if v.start {
                    Stage::Started
                } else {
                    Stage::Defined
                };
                let opts = options(v, stage, ImageFormat::Qcow2);
                let r = restore::run(repo, libvirt, &plans[i], &opts, &|n| {
                    done[i].fetch_add(n, Ordering::Relaxed);
                });
                out.send(&Event::Progress {
                    vm: i,
                    done: done[i].load(Ordering::Relaxed),
                });
                let r = r.and_then(|o| Ok(serde_json::to_value(o)?));
                if !report(out, i, r) {
                    ok.store(false, Ordering::Relaxed);
                }
                running.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    ok.load(Ordering::Relaxed)
}

/// The parent's side: starts the child for `job` as task `t` and follows
/// its events and log until it exits.
pub fn spawn(config: &Path, t: Arc<Task>, job: &Job) -> Result<()> {
    t.set_items(job.vms.iter().map(|v| Item::new(&v.name, 0)).collect());
    let exe = std::env::current_exe().context("locating bulwark")?;
    let mut child = Command::new(exe)
        .args(["-v", "web", "worker", "--config"])
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the restore worker")?;
    let mut stdin = child.stdin.take().context("worker stdin")?;
    serde_json::to_writer(&mut stdin, job)?;
    drop(stdin);
    let stdout = child.stdout.take().context("worker stdout")?;
    let stderr = child.stderr.take().context("worker stderr")?;
    let pid = child.id();
    // Set under its lock when the child is reaped: its pid is ours until then.
    let reaped = Arc::new(Mutex::new(false));
    let r = reaped.clone();
    t.on_cancel(move || {
        let reaped = r.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            // SAFETY: our own child, not reaped yet (checked under the lock
            // the reaping holds), so the pid is still its.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    });
    let tl = t.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            tl.log(strip_ansi(&line));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            match serde_json::from_str::<Event>(&line) {
                Ok(e) => follow(&t, e),
                Err(e) => t.log(format!("worker said {line:?}: {e}")),
            }
        }
        let st = {
            let mut r = reaped.lock().unwrap_or_else(|e| e.into_inner());
            let st = child.wait();
            *r = true;
            st
        };
        let failed = t.to_json(false)["items"].as_array().is_none_or(|i| {
            i.iter()
                .any(|i| i["state"] == "failed" || i["state"] == "queued")
        });
        match st {
            Ok(s) if s.code() == Some(130) || s.code().is_none() => {
                t.item_all(|it| {
                    if it.state == "restoring" || it.state == "queued" {
                        it.state = "cancelled".into();
                    }
                });
                t.finish(State::Cancelled, None)
            }
            Ok(s) if s.success() && !failed => t.finish(State::Done, None),
            Ok(s) => t.finish(
                State::Failed(format!("the restore worker exited: {s}")),
                None,
            ),
            Err(e) => t.finish(State::Failed(format!("waiting for the worker: {e}")), None),
        }
    });
    Ok(())
}

fn follow(t: &Task, e: Event) {
    match e {
        Event::Planned { vms } => {
            for (i, (name, bytes)) in vms.into_iter().enumerate() {
                t.item(i, |it| {
                    it.name = name;
                    it.bytes_total = bytes;
                });
            }
            t.log("every VM planned: nothing exists under the new names");
        }
        Event::Started { vm } => t.start_item(vm),
        Event::Progress { vm, done } => t.item(vm, |it| it.bytes_done = done),
        Event::Done { vm, outcome } => {
            let live = outcome["live"] == true;
            t.item(vm, |it| {
                if live {
                    it.state = "live".into();
                    it.note = Some("running; the agent streams its disks in".into());
                } else {
                    it.state = "done".into();
                    it.bytes_done = it.bytes_total;
                }
            });
            t.log(format!("vm {vm}: {outcome}"));
        }
        Event::Failed { vm, error } => {
            t.item(vm, |it| {
                it.state = "failed".into();
                it.note = Some(error.clone());
            });
            t.log(format!("vm {vm} failed, nothing of it is left: {error}"));
        }
        Event::Error { error } => {
            t.item_all(|it| {
                it.state = "failed".into();
                it.note = Some(error.clone());
            });
            t.log(format!("failed before restoring anything: {error}"));
            t.finish(State::Failed(error), None);
        }
    }
}

/// Log lines without terminal colours.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(v: Value) -> std::result::Result<Job, String> {
        let j: Job = serde_json::from_value(v).map_err(|e| e.to_string())?;
        j.check().map(|()| j)
    }

    #[test]
    fn jobs_are_checked_before_any_repository_is_opened() {
        let j =
            job(json!({"vms": [{"snapshot": "web@latest", "as": "web-r", "live": true}]})).unwrap();
        assert!(j.vms[0].live && !j.vms[0].start);
        assert!(job(json!({"vms": []})).unwrap_err().contains("empty"));
        assert!(job(json!({"vms": [{"snapshot": "a", "as": "x/y"}]})).is_err());
        assert!(
            job(json!({"vms": [{"snapshot": "a", "as": "x"}, {"snapshot": "b", "as": "x"}]}))
                .unwrap_err()
                .contains("twice")
        );
        assert!(job(json!({"vms": [{"snapshot": "a", "as": "x", "storage_dir": "rel"}]})).is_err());
        assert!(job(json!({"vms": [{"snapshot": "a", "as": "x", "colour": 1}]})).is_err());
        assert_eq!(strip_ansi("\u{1b}[32m INFO\u{1b}[0m hi"), " INFO hi");
    }
}
