//! `bulwark verify [SNAPSHOT]`: exits 1 when anything is damaged.

use anyhow::Result;

use crate::units::human;
use crate::{progress, secret, Global};

#[derive(clap::Args)]
pub struct Args {
    /// Only this snapshot (id, prefix or SOURCE@latest); default all.
    snapshot: Option<String>,
    #[arg(long, default_value_t = 4)]
    threads: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Global, a: Args) -> Result<i32> {
    let repo = secret::open(g)?;
    let snaps = match &a.snapshot {
        Some(s) => vec![repo.find_snapshot(s)?],
        None => repo.snapshots()?,
    };
    let total: u64 = snaps
        .iter()
        .map(|s| s.disks.iter().map(|d| d.data_bytes).sum::<u64>())
        .sum();
    let pb = progress::bar(total, "verify");
    let report = bulwark_store::maintain::verify::verify(&repo, &snaps, a.threads, &|n| pb.inc(n))?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checked {} snapshot(s), {} chunk(s), {}",
            report.snapshots,
            report.chunks,
            human(report.bytes)
        );
        for d in &report.damaged {
            println!("DAMAGED {}: {}", d.object, d.reason);
            for u in &d.uses {
                println!(
                    "  used by snapshot {} disk {} at offset {}",
                    u.snapshot.short(),
                    u.disk,
                    u.offset
                );
            }
        }
    }
    if report.damaged.is_empty() {
        Ok(0)
    } else {
        eprintln!("error: {} damaged object(s)", report.damaged.len());
        Ok(1)
    }
}
