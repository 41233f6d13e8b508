//! `bulwark gc`: reclaim the packs no snapshot needs, safely while other
//! hosts back up (two phases with a grace period; `docs/gc.md`).

use anyhow::{bail, Result};
use bulwark_store::maintain::gc::{self, Action, GcOptions, GcPlan, PackAction};

use crate::units::human;
use crate::{progress, secret, Global};

#[derive(clap::Args)]
pub struct Args {
    /// Time between condemning a pack and deleting it: longer than any
    /// backup runs. `0s` when no backup can be running (two runs in a row
    /// then reclaim everything unreferenced).
    #[arg(long, default_value = "24h", value_parser = crate::units::parse_duration)]
    grace: chrono::Duration,
    /// Repack packs whose live bytes are below this percentage of their size.
    #[arg(long, default_value_t = 50.0)]
    repack_below: f64,
    /// Say what would be deleted and condemned; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Global, a: Args) -> Result<i32> {
    if !(0.0..=100.0).contains(&a.repack_below) {
        bail!("--repack-below takes a percentage from 0 to 100");
    }
    let repo = secret::open(g)?;
    let opts = GcOptions {
        grace: a.grace,
        repack_below: a.repack_below / 100.0,
        dry_run: a.dry_run,
    };
    let pb = progress::spinner("gc");
    let step = |step: &str| pb.set_message(format!("gc: {step}"));
    // A dry run is the plan alone, shown pack by pack.
    let r = if a.dry_run {
        GcPlan::compute(&repo, &opts, &step).map(|p| (p.report().clone(), Some(p.actions)))
    } else {
        gc::run(&repo, &opts, &step).map(|r| (r, None))
    };
    pb.finish_and_clear();
    let (r, actions) = r?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        if let Some(actions) = &actions {
            v["actions"] = serde_json::to_value(actions)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    if let Some(actions) = &actions {
        print_plan(actions);
    }
    let would = if r.dry_run { "would be " } else { "" };
    println!(
        "{} snapshots use {} chunks in {} packs ({})",
        r.snapshots,
        r.live_chunks,
        r.packs,
        human(r.bytes)
    );
    println!(
        "deleted: {} packs, {} {would}freed",
        r.packs_deleted,
        human(r.bytes_deleted)
    );
    println!(
        "condemned: {} packs, {} (deleted by a gc after the grace period; {} repacked first, {} live copied)",
        r.packs_condemned,
        human(r.bytes_condemned),
        r.packs_repacked,
        human(r.bytes_repacked)
    );
    if r.packs_resurrected > 0 {
        println!(
            "kept: {} condemned packs a backup reused meanwhile",
            r.packs_resurrected
        );
    }
    if r.packs_waiting > 0 {
        println!(
            "waiting: {} condemned packs, grace not over",
            r.packs_waiting
        );
    }
    for s in &r.sessions_in_flight {
        println!("held back by a backup in flight: {s}");
    }
    if r.compaction.merged > 0 {
        println!(
            "index: {} small objects merged into {}",
            r.compaction.merged, r.compaction.written
        );
    }
    if let Some(l) = &r.lock {
        println!(
            "locks: {} removed versions {would}deleted ({}), {} held by locks ({}{})",
            l.versions_deleted,
            human(l.bytes_deleted),
            l.versions_held,
            human(l.bytes_held_by_locks),
            l.next_expiry
                .map(|t| format!(", the first runs out {}", t.to_rfc3339()))
                .unwrap_or_default()
        );
        if l.versions_overwritten > 0 {
            println!(
                "locks: {} overwritten versions kept (only an attack overwrites: see `repo recover`)",
                l.versions_overwritten
            );
        }
    }
    Ok(0)
}

/// A dry run's plan, a line per pack (the first few of each kind).
fn print_plan(actions: &[PackAction]) {
    const SHOWN: usize = 20;
    let mut seen: std::collections::BTreeMap<&str, usize> = Default::default();
    for p in actions {
        let (verb, why) = match &p.action {
            Action::Delete => (
                "delete",
                "condemned earlier, grace over, unused".to_string(),
            ),
            Action::Condemn => ("condemn", "no snapshot uses it".to_string()),
            Action::Repack { live_bytes } => {
                ("repack", format!("only {} live", human(*live_bytes)))
            }
            Action::Resurrect => (
                "keep",
                "condemned, but a backup reused it since".to_string(),
            ),
            Action::Wait { until } => ("wait", format!("grace until {}", until.to_rfc3339())),
        };
        let n = seen.entry(verb).or_default();
        *n += 1;
        if *n <= SHOWN {
            println!(
                "{verb:<7} pack {} {:>10}  {why}",
                p.pack.short(),
                human(p.bytes)
            );
        }
    }
    for (verb, n) in seen.into_iter().filter(|(_, n)| *n > SHOWN) {
        println!("{verb:<7} ... and {} more packs", n - SHOWN);
    }
}
