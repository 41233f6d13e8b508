//! `bulwark drill SNAPSHOT`: boot a snapshot as a throw-away, isolated
//! domain and check that it comes up (`docs/drill.md`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::drill::{self, Report, Spec};
use crate::libvirt::Libvirt;
use crate::units::human;
use crate::{secret, Global};

#[derive(clap::Args)]
pub struct Args {
    /// Snapshot id, unique id prefix, or VM@latest.
    snapshot: String,
    /// Pass when a console line matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    console: Option<String>,
    /// Pass when the QEMU guest agent answers guest-ping.
    #[arg(long)]
    guest_agent: bool,
    /// Pass when a screenshot is not blank and has changed since the first
    /// (the last one is kept as a PNG with the report).
    #[arg(long)]
    screenshot: bool,
    /// Time limit of each check, from the domain's start.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long)]
    json: bool,
    /// Where drills keep their labs and reports (the agent's state dir).
    #[arg(long, env = "BULWARK_STATE_DIR", default_value = crate::vm::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// libvirt connection.
    #[arg(long, env = "BULWARK_LIBVIRT_URI", default_value = "qemu:///system")]
    connect: String,
}

pub fn run(g: &Global, a: Args) -> Result<i32> {
    let spec = spec(a.console.as_deref(), a.guest_agent, a.screenshot, a.timeout)?;
    let libvirt = Libvirt::open(&a.connect)?;
    let repo = Arc::new(secret::open(g)?);
    let snap = repo.while_loading_index(|| repo.find_snapshot(&a.snapshot))?;
    if !a.json {
        eprintln!(
            "drill of snapshot {} of {} ({})",
            snap.id.short(),
            snap.source,
            snap.time.with_timezone(&chrono::Local).format("%F %T")
        );
    }
    tear_down_on_signal(&a.state_dir, &a.connect)?;
    let report = drill::run(&repo, &libvirt, snap, &spec, &a.state_dir)?;
    // The drill ran: its report stands even if the repository cannot take
    // it now (a read-only credential, an outage).
    if let Err(e) = drill::report::save_in_repository(&repo, &report) {
        tracing::warn!("{e:#}");
    }
    print(&report, a.json)?;
    Ok(if report.passed { 0 } else { 1 })
}

/// Ctrl-C or SIGTERM: the drill's domain and lab go before we exit.
fn tear_down_on_signal(state_dir: &std::path::Path, uri: &str) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing the signal handler")?;
    let (state_dir, uri) = (state_dir.to_path_buf(), uri.to_string());
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("interrupted: removing the drill's domain");
            drill::clean_up(&state_dir, &uri);
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

/// The checks asked for, checked before anything starts.
pub fn spec(
    console: Option<&str>,
    guest_agent: bool,
    screenshot: bool,
    timeout: Duration,
) -> Result<Spec> {
    let console = console
        .map(|re| regex_lite::Regex::new(re).with_context(|| format!("--console {re:?}")))
        .transpose()?;
    Ok(Spec {
        console,
        guest_agent,
        screenshot,
        timeout,
    })
}

fn print(r: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    for c in &r.checks {
        let verdict = if c.passed { "passed" } else { "FAILED" };
        match &c.detail {
            Some(d) => println!("{:<12} {verdict} after {:.1} s: {d}", c.name, c.seconds),
            None => println!("{:<12} {verdict} after {:.1} s", c.name, c.seconds),
        }
    }
    for f in &r.failed_reads {
        println!(
            "read failed: {} at offset {} ({} bytes): {}",
            f.disk, f.offset, f.length, f.error
        );
    }
    println!(
        "{}: snapshot {} of {} {} in {:.1} s; fetched {}, boot set {}",
        if r.passed { "PASSED" } else { "FAILED" },
        &r.snapshot[..8.min(r.snapshot.len())],
        r.source,
        if r.passed {
            "boots"
        } else {
            "did not pass its checks"
        },
        r.seconds,
        human(r.bytes_fetched),
        human(r.boot_set_bytes())
    );
    if let Some(p) = &r.screenshot {
        println!("screenshot: {}", p.display());
    }
    Ok(())
}
