//! `bulwark prune`: remove snapshots by retention rules (Proxmox Backup
//! Server's semantics, `bulwark_store::maintain::retention`), per group of (source, policy).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bulwark_store::maintain::prune;
use bulwark_store::maintain::retention::KeepOptions;

use crate::config::Config;
use crate::{secret, Global};

#[derive(clap::Args)]
pub struct Args {
    /// Only the snapshots of this source (VM or image source).
    #[arg(long)]
    source: Option<String>,
    /// Only the snapshots made by this policy; without --keep-* options,
    /// its own retention numbers from the agent config apply.
    #[arg(long)]
    policy: Option<String>,
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
    /// The agent config holding the policy's numbers.
    #[arg(long, default_value = crate::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Show what would be kept and removed, and why; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Global, a: Args) -> Result<i32> {
    let mut keep = KeepOptions {
        keep_last: a.keep_last,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
        keep_yearly: a.keep_yearly,
    };
    if !keep.any() {
        let Some(policy) = &a.policy else {
            bail!("name at least one rule (--keep-last, --keep-daily, ...) or a --policy whose numbers apply");
        };
        let cfg = Config::load(&a.config)?;
        let p = cfg
            .policies
            .get(policy)
            .with_context(|| format!("no policy {policy:?} in {}", a.config.display()))?;
        keep = p.keep();
        if !keep.any() {
            bail!("policy {policy} sets no keep_* numbers: nothing to prune by");
        }
    }
    let repo = secret::open(g)?;
    let snaps: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| a.source.as_ref().is_none_or(|x| &s.source == x))
        .filter(|s| a.policy.is_none() || s.policy == a.policy)
        .collect();
    let decisions = prune::plan(snaps, &keep, &chrono::Local)?;
    let removed = if a.dry_run {
        0
    } else {
        prune::execute(&repo, &decisions)?
    };
    if a.json {
        let v: Vec<_> = decisions
            .iter()
            .map(|d| {
                serde_json::json!({
                    "id": d.snapshot.id,
                    "source": d.snapshot.source,
                    "policy": d.snapshot.policy,
                    "time": d.snapshot.time.to_rfc3339(),
                    "keep": d.keep(),
                    "rule": d.rule.map(|r| r.as_str()),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let mut group = None;
    for d in &decisions {
        let s = &d.snapshot;
        let g = (s.source.as_str(), s.policy.as_deref());
        if group != Some(g) {
            match g.1 {
                Some(p) => println!("{} (policy {p}):", g.0),
                None => println!("{}:", g.0),
            }
            group = Some(g);
        }
        let local = s.time.with_timezone(&chrono::Local);
        println!(
            "  {:<6}  {}  {}  {}",
            if d.keep() { "keep" } else { "remove" },
            s.id.short(),
            local.format("%Y-%m-%d %H:%M:%S"),
            d.rule.map_or("", |r| r.as_str())
        );
    }
    let kept = decisions.iter().filter(|d| d.keep()).count();
    if a.dry_run {
        println!(
            "dry run: would keep {kept}, remove {}",
            decisions.len() - kept
        );
    } else {
        println!("kept {kept}, removed {removed} (`bulwark gc` reclaims their space)");
    }
    Ok(0)
}
