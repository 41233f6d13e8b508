//! The agent: runs policies on schedule and answers the CLI and the hook
//! on a Unix socket (one JSON object per line each way).
//!
//! Requests: `{"op":"ping"}`, `{"op":"status"}`,
//! `{"op":"backup","domain":D,"policy":P,"full":false}` (runs now, replies
//! with the report), and `{"op":"hook",...}` from `bulwark-hook` (answered
//! at once, recorded afterwards: the hook must never wait on a backup).
//!
//! The scheduler is interval-based: every `tick_seconds` it lists the
//! domains, reads the policies named in their metadata, and backs up each
//! (domain, policy) whose interval has passed since its last run. Backups
//! run one at a time. A failed backup is logged with the policy's contacts
//! (mail delivery is not implemented yet) and retried at the next tick.
//! After each successful backup the (domain, policy) group is pruned by the
//! policy's keep numbers; repositories with a `gc_schedule` get a GC on it,
//! one at a time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{self, Config};
use crate::vm::backup::{self, Options};
use crate::vm::domain;
use crate::vm::state::StateDir;
use crate::vm::virsh::Virsh;

/// Last result per `domain/policy`, and last GC per repository.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Schedule {
    runs: BTreeMap<String, Run>,
    #[serde(default)]
    gcs: BTreeMap<String, GcRun>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct GcRun {
    at: u64,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    packs_deleted: usize,
    bytes_deleted: u64,
    packs_condemned: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Run {
    /// Unix seconds of the last attempt.
    at: u64,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    /// Snapshots the prune after this backup removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pruned: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prune_error: Option<String>,
}

struct Agent {
    cfg: Config,
    state: StateDir,
    virsh: Virsh,
    /// One backup at a time.
    busy: Mutex<()>,
    /// One GC at a time (the repository's GC lock covers other hosts).
    gc_busy: Mutex<()>,
    schedule: Mutex<Schedule>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn run(cfg: Config) -> Result<()> {
    let state = StateDir::new(&cfg.state_dir);
    std::fs::create_dir_all(state.root())
        .with_context(|| format!("creating {}", state.root().display()))?;
    let sched_path = state.root().join("schedule.json");
    let schedule = std::fs::read(&sched_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let listener = bind(&cfg.socket)?;
    let agent = Arc::new(Agent {
        virsh: Virsh::new(cfg.libvirt_uri.clone()),
        cfg,
        state,
        busy: Mutex::new(()),
        gc_busy: Mutex::new(()),
        schedule: Mutex::new(schedule),
    });
    tracing::info!(
        "agent listening on {}, {} policies",
        agent.cfg.socket.display(),
        agent.cfg.policies.len()
    );
    {
        let a = agent.clone();
        std::thread::spawn(move || loop {
            if let Err(e) = a.tick() {
                tracing::warn!("scheduler: {e:#}");
            }
            std::thread::sleep(Duration::from_secs(a.cfg.tick_seconds.max(1)));
        });
    }
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let a = agent.clone();
                std::thread::spawn(move || {
                    if let Err(e) = a.serve(s) {
                        tracing::debug!("client: {e:#}");
                    }
                });
            }
            Err(e) => tracing::warn!("accept: {e}"),
        }
    }
    Ok(())
}

/// Binds the control socket, replacing a stale one (nobody answering) but
/// never a live agent's.
fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("another agent is listening on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

impl Agent {
    fn serve(&self, s: UnixStream) -> Result<()> {
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut line = String::new();
        BufReader::new(&s).take(1 << 20).read_line(&mut line)?;
        let req: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                return reply(
                    &s,
                    &json!({"ok": false, "error": format!("bad request: {e}")}),
                )
            }
        };
        match req.get("op").and_then(Value::as_str) {
            Some("ping") => reply(
                &s,
                &json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}),
            ),
            Some("status") => {
                let sched = self
                    .schedule
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                reply(
                    &s,
                    &json!({"ok": true, "policies": self.cfg.policies.keys().collect::<Vec<_>>(),
                            "runs": sched.runs, "gcs": sched.gcs,
                            "busy": self.busy.try_lock().is_err()}),
                )
            }
            Some("hook") => {
                // Answer first: libvirt waits on the hook.
                reply(&s, &json!({"ok": true}))?;
                self.record_hook(&req)
            }
            Some("backup") => {
                let dom = req.get("domain").and_then(Value::as_str).unwrap_or("");
                let policy = req.get("policy").and_then(Value::as_str);
                let full = req.get("full").and_then(Value::as_bool).unwrap_or(false);
                match self.backup(dom, policy, full) {
                    Ok(r) => reply(&s, &json!({"ok": true, "report": r})),
                    Err(e) => reply(&s, &json!({"ok": false, "error": format!("{e:#}")})),
                }
            }
            other => reply(
                &s,
                &json!({"ok": false, "error": format!("unknown op {other:?}")}),
            ),
        }
    }

    fn record_hook(&self, req: &Value) -> Result<()> {
        let uuid = req.get("uuid").and_then(Value::as_str).unwrap_or("");
        let event = req.get("event").and_then(Value::as_str).unwrap_or("");
        let dom = req.get("domain").and_then(Value::as_str).unwrap_or("");
        if uuid.is_empty() || uuid.contains('/') || uuid.contains("..") {
            bail!("hook event without a usable uuid");
        }
        tracing::info!("hook: {dom}: {event}");
        let _lock = self.state.lock(uuid)?;
        let mut st = self.state.load(uuid)?;
        st.domain = dom.to_string();
        st.last_event = Some(event.to_string());
        if req.get("unclean").and_then(Value::as_bool) == Some(true) {
            tracing::warn!("{dom}: bitmaps in use at start: it crashed; next backup reads all");
            st.unclean_stop = true;
        }
        self.state.save(&st)
    }

    fn backup(&self, dom: &str, policy: Option<&str>, full: bool) -> Result<backup::Report> {
        if dom.is_empty() {
            bail!("no domain");
        }
        let policy_name = match policy {
            Some(p) => p.to_string(),
            None => {
                let info = domain::parse(&self.virsh.dumpxml(dom, true)?)?;
                info.policies
                    .into_iter()
                    .find(|p| self.cfg.policies.contains_key(p))
                    .with_context(|| format!("{dom} names no policy of this agent"))?
            }
        };
        let pol = self
            .cfg
            .policies
            .get(&policy_name)
            .with_context(|| format!("no policy {policy_name}"))?;
        let rc = self
            .cfg
            .repositories
            .get(&pol.repository)
            .with_context(|| format!("no repository {}", pol.repository))?;
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let repo = open_repo(rc)?;
        let r = backup::backup(
            &repo,
            &Options {
                domain: dom.to_string(),
                full,
                policy: Some(policy_name.clone()),
                threads: 0,
                state: self.state.clone(),
                virsh: self.virsh.clone(),
            },
        );
        let key = format!("{dom}/{policy_name}");
        let run = match &r {
            Ok(rep) => {
                let (pruned, prune_error) = match prune(&repo, dom, &policy_name, pol) {
                    Ok(n) => (n, None),
                    Err(e) => {
                        tracing::error!(
                            "prune of {dom} ({policy_name}) failed: {e:#}; contacts: {}",
                            pol.contacts.join(", ")
                        );
                        (None, Some(format!("{e:#}")))
                    }
                };
                Run {
                    at: now(),
                    ok: true,
                    snapshot: Some(rep.snapshot.clone()),
                    error: None,
                    mode: Some(rep.mode.to_string()),
                    pruned,
                    prune_error,
                }
            }
            Err(e) => {
                tracing::error!(
                    "backup of {dom} ({policy_name}) failed: {e:#}; contacts: {}",
                    pol.contacts.join(", ")
                );
                Run {
                    at: now(),
                    ok: false,
                    snapshot: None,
                    error: Some(format!("{e:#}")),
                    mode: None,
                    pruned: None,
                    prune_error: None,
                }
            }
        };
        self.record(|s| {
            s.runs.insert(key, run);
        })?;
        r
    }

    /// Updates the schedule and stores it (a lost write only means a run
    /// may repeat after a restart).
    fn record(&self, f: impl FnOnce(&mut Schedule)) -> Result<()> {
        let mut sched = self.schedule.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut sched);
        let path = self.state.root().join("schedule.json");
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, serde_json::to_vec_pretty(&*sched)?).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
        Ok(())
    }

    /// Runs GC on every repository whose `gc_schedule` is due.
    fn gc_due(&self) {
        for (name, rc) in &self.cfg.repositories {
            let Some(every) = rc.gc_schedule.as_deref() else {
                continue;
            };
            let Ok(every) = config::interval(every) else {
                continue; // refused when the config was loaded
            };
            let last = self
                .schedule
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .gcs
                .get(name)
                .map(|r| r.at);
            if last.is_some_and(|t| now() < t + every.as_secs()) {
                continue;
            }
            let _gc = self.gc_busy.lock().unwrap_or_else(|p| p.into_inner());
            let r = rc.gc_grace().and_then(|grace| {
                let repo = open_repo(rc)?;
                let opts = store::gc::GcOptions {
                    grace,
                    ..Default::default()
                };
                Ok(store::gc::run(&repo, &opts, &|_| {})?)
            });
            let run = match r {
                Ok(rep) => {
                    tracing::info!(
                        "gc of {name}: deleted {} packs ({} B), condemned {}",
                        rep.packs_deleted,
                        rep.bytes_deleted,
                        rep.packs_condemned
                    );
                    GcRun {
                        at: now(),
                        ok: true,
                        error: None,
                        packs_deleted: rep.packs_deleted,
                        bytes_deleted: rep.bytes_deleted,
                        packs_condemned: rep.packs_condemned,
                    }
                }
                Err(e) => {
                    tracing::error!("gc of {name} failed: {e:#}");
                    GcRun {
                        at: now(),
                        ok: false,
                        error: Some(format!("{e:#}")),
                        packs_deleted: 0,
                        bytes_deleted: 0,
                        packs_condemned: 0,
                    }
                }
            };
            if let Err(e) = self.record(|s| {
                s.gcs.insert(name.clone(), run);
            }) {
                tracing::warn!("recording gc of {name}: {e:#}");
            }
        }
    }

    /// Backs up every (domain, policy) that is due, then collects garbage
    /// where that is due.
    fn tick(&self) -> Result<()> {
        let r = self.backups_due();
        self.gc_due();
        r
    }

    fn backups_due(&self) -> Result<()> {
        if self.cfg.policies.is_empty() {
            return Ok(());
        }
        let names = self.virsh.run(&["list", "--all", "--name"])?;
        for dom in names.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let Ok(xml) = self.virsh.dumpxml(dom, true) else {
                continue; // undefined meanwhile
            };
            let Ok(info) = domain::parse(&xml) else {
                continue;
            };
            for p in &info.policies {
                let Some(pol) = self.cfg.policies.get(p) else {
                    continue;
                };
                let every = config::interval(&pol.schedule)?.as_secs();
                let last = self
                    .schedule
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .runs
                    .get(&format!("{dom}/{p}"))
                    .map(|r| r.at);
                if last.is_some_and(|t| now() < t + every) {
                    continue;
                }
                tracing::info!("scheduled backup of {dom} ({p})");
                let _ = self.backup(dom, Some(p), false);
            }
        }
        Ok(())
    }
}

fn open_repo(rc: &config::RepoConf) -> Result<store::Repository> {
    let g = crate::Global {
        repo: Some(rc.path.clone()),
        password_file: rc.password_file.clone(),
        key_file: rc.key_file.clone(),
        verbose: 0,
        backend: Default::default(),
    };
    crate::secret::open(&g)
}

/// Prunes the (domain, policy) group by the policy's numbers; `None` when
/// the policy sets none.
fn prune(
    repo: &store::Repository,
    dom: &str,
    policy: &str,
    pol: &config::PolicyConf,
) -> Result<Option<usize>> {
    let keep = pol.keep();
    if !keep.any() {
        return Ok(None);
    }
    let snaps: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| s.source == dom && s.policy.as_deref() == Some(policy))
        .collect();
    let decisions = store::prune::plan(snaps, &keep, &chrono::Local)?;
    let n = store::prune::execute(repo, &decisions)?;
    if n > 0 {
        tracing::info!("pruned {n} snapshots of {dom} ({policy})");
    }
    Ok(Some(n))
}

fn reply(mut s: &UnixStream, v: &Value) -> Result<()> {
    let mut b = serde_json::to_vec(v)?;
    b.push(b'\n');
    s.write_all(&b)?;
    Ok(())
}

/// One request to a running agent; its reply.
pub fn request(socket: &Path, req: &Value, timeout: Duration) -> Result<Value> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the agent at {}", socket.display()))?;
    s.set_read_timeout(Some(timeout))?;
    let mut b = serde_json::to_vec(req)?;
    b.push(b'\n');
    s.write_all(&b)?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the agent's reply")?;
    serde_json::from_str(&line).context("parsing the agent's reply")
}
