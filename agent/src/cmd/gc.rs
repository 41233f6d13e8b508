//! `bulwark gc`: reclaim the packs no snapshot needs, safely while other
//! hosts back up (two phases with a grace period; `docs/gc.md`).

use anyhow::{bail, Result};
use store::gc::{self, GcOptions};

use super::human;
use crate::{progress, secret, Global};

#[derive(clap::Args)]
pub struct Args {
    /// Time between condemning a pack and deleting it: longer than any
    /// backup runs. `0s` when no backup can be running (two runs in a row
    /// then reclaim everything unreferenced).
    #[arg(long, default_value = "24h", value_parser = super::parse_duration)]
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
    let pb = progress::spinner("gc");
    let r = gc::run(
        &repo,
        &GcOptions {
            grace: a.grace,
            repack_below: a.repack_below / 100.0,
            dry_run: a.dry_run,
        },
        &|step| pb.set_message(format!("gc: {step}")),
    );
    pb.finish_and_clear();
    let r = r?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
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
