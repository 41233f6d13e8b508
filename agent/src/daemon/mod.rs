//! The agent: runs policies on schedule, follows libvirt's events, and
//! answers the CLI and the hook on a Unix socket.
//!
//! Threads, each in its own module: [`control`] (the socket protocol),
//! [`scheduler`] (what is due, and the record of last runs), [`watch`]
//! (libvirt events: every domain and its policies, bitmaps, records),
//! [`targets`] (is each repository usable), the work itself in [`jobs`]
//! (backup + prune, GC; [`slots`] says when one may start), and the
//! supervision of live restores in [`live`], restore drills in [`drills`]. What an operator sees is in
//! [`status`] and [`metrics`]; what the host requires, in [`enforce`].
//! A failed job is logged, recorded, mailed once per streak (`mail`), and
//! retried when next due.

mod control;
mod drills;
mod enforce;
mod hosts;
mod jobs;
mod live;
mod locks;
mod metrics;
mod replicate;
mod scheduler;
mod slots;
mod status;
mod targets;
mod watch;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};

pub use control::request;

use crate::config::Config;
use crate::config::PolicyConf;
use crate::mail::{Alerts, Job, SenderThread, SmtpSender, Task};
use crate::vm::state::StateDir;
use scheduler::Schedule;
use slots::Slots;
use targets::Target;
use watch::Inventory;

struct Agent {
    cfg: Config,
    state: StateDir,
    inventory: Inventory,
    /// Connections to libvirtd so far (each followed by a full rescan).
    connections: AtomicU64,
    /// One backup per VM, `max_concurrent_backups` per host.
    slots: Arc<Slots>,
    /// Pulled when what is due may have changed (the scheduler waits on it).
    wake: scheduler::Wake,
    /// When each scheduled job last started (a retry waits a tick).
    started: Mutex<BTreeMap<String, u64>>,
    /// Unprotected domains already logged (`[enforce]`).
    unprotected: Mutex<std::collections::BTreeSet<String>>,
    /// The last reachability check of each repository.
    targets: Mutex<BTreeMap<String, Target>>,
    /// One GC at a time (the repository's GC lock covers other hosts).
    gc_busy: Mutex<()>,
    /// One restore drill at a time on this host.
    drill_busy: Mutex<()>,
    schedule: Mutex<Schedule>,
    /// Live restores a thread of this agent supervises.
    live: Mutex<std::collections::BTreeSet<String>>,
    /// Failure mail: the streak state and outbox, and the sender draining
    /// it (none without `[smtp]`).
    alerts: Option<(Mutex<Alerts>, SenderThread)>,
}

pub fn run(cfg: Config) -> Result<()> {
    let state = StateDir::new(&cfg.state_dir);
    std::fs::create_dir_all(state.root())
        .with_context(|| format!("creating {}", state.root().display()))?;
    let schedule = Schedule::load(&state.root().join("schedule.json"));
    let listener = control::bind(&cfg.socket)?;
    exit_on_sigterm(&cfg)?;
    let alerts = match &cfg.smtp {
        Some(smtp) => Some(mail(smtp, &state)?),
        None => None,
    };
    // Before any connection opens: keepalive and events need the loop.
    crate::libvirt::events::start_event_loop();
    for (name, _) in cfg.policies.iter().filter(|(n, _)| !cfg.usable_policy(n)) {
        if let Some(why) = cfg.refusal(name) {
            tracing::error!("{why}: refused");
        }
    }
    let agent = Arc::new(Agent {
        slots: Arc::new(Slots::new(cfg.max_concurrent_backups)),
        wake: Default::default(),
        started: Mutex::new(BTreeMap::new()),
        cfg,
        state,
        inventory: Inventory::default(),
        connections: AtomicU64::new(0),
        targets: Mutex::new(BTreeMap::new()),
        unprotected: Mutex::new(Default::default()),
        gc_busy: Mutex::new(()),
        drill_busy: Mutex::new(()),
        schedule: Mutex::new(schedule),
        live: Mutex::new(Default::default()),
        alerts,
    });
    agent.resume_live();
    // What drills killed with an earlier agent left behind.
    crate::drill::clean_up(&agent.cfg.state_dir, &agent.cfg.libvirt_uri);
    tracing::info!(
        "agent listening on {}, {} policies",
        agent.cfg.socket.display(),
        agent.cfg.policies.len()
    );
    if agent.cfg.uses_libvirt() {
        let a = agent.clone();
        std::thread::spawn(move || watch::run(&a));
    } else {
        tracing::info!("no policies: not watching libvirt (a host for file backups and sync jobs)");
    }
    let a = agent.clone();
    std::thread::spawn(move || scheduler::run(&a));
    let a = agent.clone();
    std::thread::spawn(move || targets::run(&a));
    control::serve(agent, listener);
    Ok(())
}

/// On SIGTERM, pass it on to our own process group (qemu-nbd, qemu-img of
/// a backup in progress), then exit: systemd signals the unit's whole
/// cgroup anyway, a shell only us. Live restore servers run in groups (and
/// under systemd, units) of their own and keep serving; a drill in flight
/// is torn down (its domain would outlive us).
fn exit_on_sigterm(cfg: &Config) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM])
        .context("installing the SIGTERM handler")?;
    let (state_dir, uri) = (cfg.state_dir.clone(), cfg.libvirt_uri.clone());
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            tracing::info!("SIGTERM: stopping");
            crate::drill::clean_up(&state_dir, &uri);
            // SAFETY: plain syscalls. Only when we lead the group (systemd,
            // or a shell job), never a group we merely joined; the signal
            // this sends us too is caught by the handler above.
            unsafe {
                if libc::getpgrp() == libc::getpid() {
                    libc::kill(0, libc::SIGTERM);
                }
            }
            std::process::exit(0);
        }
    });
    Ok(())
}

/// The mail streak state and outbox in the state dir, and their sender.
fn mail(smtp: &crate::mail::SmtpConfig, state: &StateDir) -> Result<(Mutex<Alerts>, SenderThread)> {
    let host = hostname();
    let alerts = Alerts::open(
        &host,
        state.root().join("mail-state.json"),
        state.root().join("outbox"),
    )?;
    let sender = SmtpSender::new(smtp, &host).context("[smtp]")?;
    let thread = SenderThread::spawn(
        alerts.outbox().clone(),
        Box::new(sender),
        std::time::Duration::from_secs(30),
    );
    Ok((Mutex::new(alerts), thread))
}

/// This host's name (mail names the host a backup failed on).
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if r == 0 && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".into()
    }
}

impl Agent {
    /// `(domain, policies)` of every domain with a policy this agent may
    /// run, those policies only.
    fn protected(&self) -> Vec<(String, Vec<String>)> {
        self.inventory
            .all()
            .into_iter()
            .filter_map(|(d, ps)| {
                let ps: Vec<String> = ps
                    .into_iter()
                    .filter(|p| self.cfg.usable_policy(p))
                    .collect();
                (!ps.is_empty()).then_some((d, ps))
            })
            .collect()
    }

    /// Tells a job's contacts: one mail per failure streak, one on
    /// recovery (the streak rule lives in `mail::Notifier`). Never fails
    /// the job: a mail that cannot be queued is logged.
    fn alert(&self, job: &Job<'_>, failure: Option<&str>, log: &[String]) {
        let Some((alerts, sender)) = &self.alerts else {
            return;
        };
        let now = chrono::Utc::now();
        let mut a = alerts.lock().unwrap_or_else(|e| e.into_inner());
        let queued = match failure {
            Some(e) => a.failure(job, e, log, now),
            None => a.success(job, now),
        };
        match queued {
            Ok(true) => sender.wake(),
            Ok(false) => {}
            Err(e) => tracing::error!("mail about {} ({}) not queued: {e}", job.vm, job.policy),
        }
    }

    /// A silent (domain, policy): one mail until its next success.
    fn alert_silence(
        &self,
        dom: &str,
        policy: &str,
        pol: &PolicyConf,
        period: std::time::Duration,
    ) {
        let Some((alerts, sender)) = &self.alerts else {
            return;
        };
        let job = Job {
            task: Task::Backup,
            vm: dom,
            policy,
            repository: &pol.repository,
            contacts: &pol.contacts,
        };
        let mut a = alerts.lock().unwrap_or_else(|e| e.into_inner());
        match a.check_silence(&job, period, chrono::Utc::now()) {
            Ok(true) => {
                tracing::warn!("{dom} ({policy}): no successful backup for twice its period");
                sender.wake()
            }
            Ok(false) => {}
            Err(e) => tracing::error!("mail about {dom} ({policy}) not queued: {e}"),
        }
    }

    /// A `bulwark-hook` event, into the domain's record.
    fn record_hook(&self, ev: &bulwark_proto::HookEvent) -> Result<()> {
        let (uuid, dom, event) = (&ev.uuid, &ev.domain, &ev.event);
        if uuid.is_empty() || uuid.contains('/') || uuid.contains("..") {
            bail!("hook event without a usable uuid");
        }
        tracing::info!("hook: {dom}: {event}");
        let _lock = self.state.lock(uuid)?;
        let mut st = self.state.load(uuid)?;
        st.domain = dom.clone();
        st.last_event = Some(event.clone());
        if ev.unclean {
            tracing::warn!("{dom}: bitmaps in use at start: it crashed; next backup reads all");
            st.unclean_stop = true;
        }
        self.state.save(&st)
    }
}
