//! `bulwark restore vm --live`, `bulwark restore status`,
//! `bulwark restore cancel`, `bulwark restore retry`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bulwark_proto::{Done, Pong, Reply, Request};
use serde_json::json;

use crate::libvirt::Libvirt;
use crate::live::record::{LiveRestore, Phase, Records, RepoSpec};
use crate::live::start::{self, LiveOptions};
use crate::live::supervise::supervise;
use crate::units::human;
use crate::vm::restore::{self, Options, Stage};
use crate::vm::rewrite::ImageFormat;
use crate::{progress, Global};

/// Who supervises live restores, and where their records are.
#[derive(clap::Args)]
pub struct Supervision {
    /// The agent's socket (with --live, the agent supervises the restore).
    #[arg(long, default_value = bulwark_proto::DEFAULT_SOCKET)]
    agent_socket: PathBuf,
    /// Where live restore records live (the agent's state dir).
    #[arg(long, env = "BULWARK_STATE_DIR", default_value = crate::vm::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// libvirt connection.
    #[arg(long, env = "BULWARK_LIBVIRT_URI", default_value = "qemu:///system")]
    pub(super) connect: String,
}

/// What `restore vm --live` adds to a restore's options.
pub struct LiveArgs {
    pub wait: bool,
    pub stream_mib_per_sec: u64,
    pub outage_wait_secs: u64,
    pub replica: Option<String>,
    pub sup: Supervision,
    pub json: bool,
}

pub fn run(
    g: &Global,
    libvirt: &Libvirt,
    targets: &[(String, String)],
    mut ropts: Options,
    a: LiveArgs,
) -> Result<i32> {
    let began_ms = chrono::Utc::now().timestamp_millis();
    let records = Records::new(&a.sup.state_dir);
    let spec = RepoSpec {
        repo: g
            .repo
            .clone()
            .context("no repository: pass --repo or set BULWARK_REPO")?,
        password_file: g.password_file.as_ref().map(|p| absolute(p)).transpose()?,
        key_file: g.key_file.as_ref().map(|p| absolute(p)).transpose()?,
        s3_endpoint: g.backend.s3_endpoint.clone(),
        replica: a.replica.clone(),
    };
    let in_file = spec.password_file.is_some() || spec.key_file.is_some();
    let password = foreground_password(in_file);
    if !a.wait {
        ping_agent(&a.sup.agent_socket)?;
        if !in_file {
            bail!(
                "the agent restarts a live restore's NBD server on its own, so it needs the \
                 repository's secret in a file: pass --password-file or --key-file (or --wait \
                 to supervise in the foreground)"
            );
        }
    } else if !in_file && password.is_none() {
        bail!("a live restore needs --password-file, --key-file or $BULWARK_PASSWORD");
    }
    ropts.format = ImageFormat::Qcow2;
    ropts.stage = Stage::Started;
    let o = LiveOptions {
        restore: ropts,
        records: &records,
        repo: spec,
        password,
        stream_mib_per_sec: a.stream_mib_per_sec,
        outage_wait_secs: a.outage_wait_secs,
        began_ms,
    };
    // Each server opens the repository and finds its snapshot while we do,
    // and each boot set is fetched meanwhile.
    let backend = crate::secret::backend(g)?;
    let mut early = targets
        .iter()
        .map(|(snap, name)| start::early(snap, name, &o, Some(backend.clone())).map(Some))
        .collect::<Result<Vec<_>>>()?;
    let (repo, plans) = restore::plan_all(g, targets, |s, name| start::plan(libvirt, s, name, &o))?;
    restore::undo_on_interrupt(libvirt.clone())?;
    let mut started = Vec::new();
    for (p, early) in plans.iter().zip(&mut early) {
        let r = start::start(&repo, libvirt, p, &o, early.take())
            .with_context(|| format!("live restore of {}", p.name))?;
        if !a.json {
            println!(
                "{}: running from snapshot {}, streaming {} into {}",
                r.name,
                r.snapshot.short(),
                human(r.bytes_total()),
                o.restore.dir.display()
            );
        }
        started.push(r);
    }
    if !a.wait {
        hand_over(&a.sup.agent_socket, &started)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&started)?);
        } else {
            println!("the agent supervises the streams: `bulwark restore status` shows them");
        }
        return Ok(0);
    }
    let finals = wait_all(&records, &started, &a.sup.connect, o.password.as_deref());
    print_finals(&finals, a.json)
}

/// The passphrase for a server supervised in the foreground, when no file
/// holds the secret.
fn foreground_password(in_file: bool) -> Option<String> {
    std::env::var("BULWARK_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty() && !in_file)
}

/// Has the running agent supervise `restores`.
fn hand_over(socket: &std::path::Path, restores: &[LiveRestore]) -> Result<()> {
    for r in restores {
        let req = Request::LiveAdopt {
            name: r.name.clone(),
        };
        let reply: Reply<Done> = crate::daemon::request(socket, &req, Duration::from_secs(30))?;
        reply
            .into_result()
            .with_context(|| format!("the agent did not take {} over", r.name))?;
    }
    Ok(())
}

/// Prints how each restore ended; exit 0 when every one is done.
fn print_finals(finals: &[LiveRestore], json: bool) -> Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(finals)?);
    } else {
        for r in finals {
            println!("{}", line(r));
        }
    }
    Ok(if finals.iter().all(|r| *r.phase() == Phase::Done) {
        0
    } else {
        1
    })
}

fn absolute(p: &std::path::Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

fn ping_agent(socket: &std::path::Path) -> Result<()> {
    crate::daemon::request(socket, &Request::Ping, Duration::from_secs(5))
        .and_then(|r: Reply<Pong>| Ok(r.into_result()?))
        .with_context(|| {
            format!(
                "no agent answers at {} to supervise the live restore: start it, \
                 or pass --wait to supervise in the foreground",
                socket.display()
            )
        })?;
    Ok(())
}

/// Supervises every restore in the foreground, one bar each.
fn wait_all(
    records: &Records,
    started: &[LiveRestore],
    uri: &str,
    password: Option<&str>,
) -> Vec<LiveRestore> {
    let multi = progress::multi();
    std::thread::scope(|s| {
        let handles: Vec<_> = started
            .iter()
            .map(|r| {
                let bar = multi.add(progress::bar(r.bytes_total(), &r.name));
                s.spawn(move || {
                    let out = supervise(records, &r.name, uri, password, &|now| {
                        bar.set_position(now.bytes_done())
                    });
                    bar.finish_and_clear();
                    out.unwrap_or_else(|e| failed(r, format!("{e:#}")))
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(started)
            .map(|(h, r)| {
                h.join()
                    .unwrap_or_else(|_| failed(r, "the supervisor panicked".into()))
            })
            .collect()
    })
}

/// What to show of a restore whose supervisor stopped with `why` (the
/// record itself says what the supervisor last saved).
fn failed(r: &LiveRestore, why: String) -> LiveRestore {
    let mut f = r.clone();
    if let Err(e) = f.fail(why) {
        tracing::debug!("{e}");
    }
    f
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// One live restore (default: all).
    name: Option<String>,
    #[arg(long, env = "BULWARK_STATE_DIR", default_value = crate::vm::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn status(a: StatusArgs) -> Result<i32> {
    let records = Records::new(&a.state_dir);
    let list = match &a.name {
        Some(n) => vec![records.load(n)?],
        None => records.all()?,
    };
    if a.json {
        let v: Vec<_> = list
            .iter()
            .map(|r| {
                let (rate, eta) = r.rate_and_eta();
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["bytes_total"] = json!(r.bytes_total());
                v["bytes_done"] = json!(r.bytes_done());
                v["bytes_per_second"] = json!(rate);
                v["eta_seconds"] = json!(eta);
                v["server_unit"] = json!(crate::live::server::unit(r));
                // What the guest waited for, whatever its CPU hides.
                let st = r.stats().unwrap_or_default();
                v["boot_set"] = json!(st.boot_set);
                v["boot_set_bytes"] = json!(st.boot_set_bytes);
                v["boot_set_ahead_bytes"] = json!(st.boot_set_ahead_bytes);
                v["demand_misses"] = json!(st.demand_misses);
                v["stall_seconds"] = json!(st.stall_seconds);
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if list.is_empty() {
        println!("no live restores");
    } else {
        for r in &list {
            println!("{}", line(r));
        }
    }
    Ok(0)
}

/// `NAME  streaming  1.2 GiB of 4.0 GiB  85 MiB/s  ETA 34s  guest waited 0.4 s in 12 reads  [UNIT]`
fn line(r: &LiveRestore) -> String {
    let (rate, eta) = r.rate_and_eta();
    let phase = r.phase();
    let eta = eta.map_or(String::new(), |s| format!("  ETA {:.0}s", s));
    // The server's systemd unit, where it runs in one.
    let unit = crate::live::server::unit(r).map_or(String::new(), |u| format!("  [{u}]"));
    let waited = r.stats().map_or(String::new(), |st| {
        format!(
            "  guest waited {:.1} s in {} reads{}",
            st.stall_seconds,
            st.demand_misses,
            if st.boot_set { " (boot set first)" } else { "" }
        )
    });
    format!(
        "{}  {}  {} of {}  {}/s{}{}{}",
        r.name,
        phase,
        human(r.bytes_done()),
        human(r.bytes_total()),
        human(rate as u64),
        eta,
        waited,
        unit
    )
}

#[derive(clap::Args)]
pub struct CancelArgs {
    name: String,
    /// Keep the (stopped) domain and its overlays.
    #[arg(long)]
    keep: bool,
    #[arg(long, env = "BULWARK_STATE_DIR", default_value = crate::vm::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[arg(long, env = "BULWARK_LIBVIRT_URI", default_value = "qemu:///system")]
    connect: String,
}

pub fn cancel(a: CancelArgs) -> Result<i32> {
    let r = crate::live::cancel(&Records::new(&a.state_dir), &a.name, &a.connect, a.keep)?;
    println!(
        "{}: cancelled{}",
        r.name,
        if a.keep {
            " (domain and overlays kept)"
        } else {
            ", domain and overlays removed"
        }
    );
    Ok(0)
}

#[derive(clap::Args)]
pub struct RetryArgs {
    /// The failed live restore.
    name: String,
    /// Supervise in the foreground until every disk is local (without it,
    /// the running agent takes over).
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    sup: Supervision,
    #[arg(long)]
    json: bool,
}

/// `restore retry`: a failed live restore streams again (its server is
/// stopped here and started afresh by the supervisor, each stream gets its
/// restarts afresh).
pub fn retry(a: RetryArgs) -> Result<i32> {
    let records = Records::new(&a.sup.state_dir);
    if !a.wait {
        ping_agent(&a.sup.agent_socket)?;
    }
    // A fresh server too: nothing it read before the fix is kept.
    let r = records.update(&a.name, |r| {
        r.retry()?;
        crate::live::server::stop(r);
        Ok(())
    })?;
    if !a.wait {
        hand_over(&a.sup.agent_socket, std::slice::from_ref(&r))?;
        println!("{}: streaming again, supervised by the agent", r.name);
        return Ok(0);
    }
    let in_file = r.repo.password_file.is_some() || r.repo.key_file.is_some();
    let password = foreground_password(in_file);
    let finals = wait_all(&records, &[r], &a.sup.connect, password.as_deref());
    print_finals(&finals, a.json)
}
