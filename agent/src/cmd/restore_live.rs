//! `bulwark restore vm --live`, `bulwark restore status`,
//! `bulwark restore cancel`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bulwark_proto::{Done, Pong, Reply, Request};
use serde_json::json;

use super::human;
use super::restore_vm::{options, targets, Args};
use crate::libvirt::Libvirt;
use crate::live::record::{LiveRestore, Phase, Records, RepoSpec};
use crate::live::start::{self, LiveOptions};
use crate::live::supervise::supervise;
use crate::vm::restore::{self, Stage};
use crate::vm::rewrite::ImageFormat;
use crate::{progress, secret, Global};

pub fn run(g: &Global, a: Args) -> Result<i32> {
    let libvirt = Libvirt::open(&a.connect)?;
    let targets = targets(&a)?;
    let records = Records::new(&a.state_dir);
    let spec = RepoSpec {
        repo: g
            .repo
            .clone()
            .context("no repository: pass --repo or set BULWARK_REPO")?,
        password_file: g.password_file.as_ref().map(|p| absolute(p)).transpose()?,
        key_file: g.key_file.as_ref().map(|p| absolute(p)).transpose()?,
        s3_endpoint: g.backend.s3_endpoint.clone(),
    };
    let in_file = spec.password_file.is_some() || spec.key_file.is_some();
    let password = std::env::var("BULWARK_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty() && !in_file);
    if !a.wait {
        ping_agent(&a.agent_socket)?;
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
    let mut ropts = options(&libvirt, &a)?;
    ropts.format = ImageFormat::Qcow2;
    ropts.stage = Stage::Started;
    let o = LiveOptions {
        restore: ropts,
        records: &records,
        repo: spec,
        password,
        stream_mib_per_sec: a.stream_mib_per_sec,
    };
    let repo = Arc::new(secret::open(g)?);
    // Every VM is checked before any is made.
    let plans = repo.while_loading_index(|| -> Result<_> {
        let mut plans = Vec::new();
        for (snap, name) in &targets {
            if targets.iter().filter(|(_, n)| n == name).count() > 1 {
                bail!("{name} is named twice");
            }
            plans.push(start::plan(&libvirt, repo.find_snapshot(snap)?, name, &o)?);
        }
        Ok(plans)
    })?;
    restore::undo_on_interrupt(libvirt.clone())?;
    let mut started = Vec::new();
    for p in &plans {
        let r = start::start(&repo, &libvirt, p, &o)
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
        for r in &started {
            let req = Request::LiveAdopt {
                name: r.name.clone(),
            };
            let reply: Reply<Done> =
                crate::daemon::request(&a.agent_socket, &req, Duration::from_secs(30))?;
            reply
                .into_result()
                .with_context(|| format!("the agent did not take {} over", r.name))?;
        }
        if a.json {
            println!("{}", serde_json::to_string_pretty(&started)?);
        } else {
            println!("the agent supervises the streams: `bulwark restore status` shows them");
        }
        return Ok(0);
    }
    let finals = wait_all(&records, &started, &a.connect, o.password.as_deref());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&finals)?);
    } else {
        for r in &finals {
            println!("{}", line(r));
        }
    }
    Ok(if finals.iter().all(|r| r.phase == Phase::Done) {
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
                    out.unwrap_or_else(|e| {
                        let mut f = r.clone();
                        f.phase = Phase::Failed(format!("{e:#}"));
                        f
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(started)
            .map(|(h, r)| {
                h.join().unwrap_or_else(|_| {
                    let mut f = r.clone();
                    f.phase = Phase::Failed("the supervisor panicked".into());
                    f
                })
            })
            .collect()
    })
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

/// `NAME  streaming  1.2 GiB of 4.0 GiB  85 MiB/s  ETA 34s  [UNIT]`
fn line(r: &LiveRestore) -> String {
    let (rate, eta) = r.rate_and_eta();
    let phase = match &r.phase {
        Phase::Booting => "booting".to_string(),
        Phase::Streaming => "streaming".to_string(),
        Phase::Done => "done".to_string(),
        Phase::Cancelled => "cancelled".to_string(),
        Phase::Failed(why) => format!("failed: {why}"),
    };
    let eta = eta.map_or(String::new(), |s| format!("  ETA {:.0}s", s));
    // The server's systemd unit, where it runs in one.
    let unit = crate::live::server::unit(r).map_or(String::new(), |u| format!("  [{u}]"));
    format!(
        "{}  {}  {} of {}  {}/s{}{}",
        r.name,
        phase,
        human(r.bytes_done()),
        human(r.bytes_total()),
        human(rate as u64),
        eta,
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
