//! `bulwark sync`: copy snapshots from one repository to a replica of it.
//!
//! The sync moves sealed objects as they are and needs no key: nothing here
//! asks for a passphrase (`docs/format.md`, "Replication").

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bulwark_store::sync::{Filters, SyncOptions, SyncPlan, SyncReport};
use bulwark_store::Backend;
use chrono::{DateTime, Utc};

use crate::config::{Config, Role};
use crate::units::human;
use crate::Global;

#[derive(clap::Args)]
pub struct Args {
    /// The source: a name of `[repositories.X]` in `--config`, or a
    /// location (`bulwark sync main offsite --config F`).
    #[arg(value_name = "FROM", conflicts_with_all = ["from", "to"], requires = "to_name")]
    from_name: Option<String>,
    /// The destination, the same way.
    #[arg(value_name = "TO")]
    to_name: Option<String>,
    /// The source repository, as `--repo` takes it (or a name with --config).
    #[arg(long, requires = "to")]
    from: Option<String>,
    /// The destination: a replica of the source (`bulwark repo init
    /// --replica-of SOURCE`).
    #[arg(long, requires = "from")]
    to: Option<String>,
    /// The agent config whose repositories the names refer to.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    select: SelectArgs,
    /// Also delete destination snapshots (of the selected sources and
    /// policies) that the source no longer has. Never the default.
    #[arg(long)]
    remove_vanished: bool,
    /// Copy at most this many MiB per second.
    #[arg(long, value_name = "MIB_PER_SEC")]
    rate: Option<f64>,
    /// Show what would be copied and change nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

/// Which snapshots a sync takes (the command line's and the agent's).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SelectArgs {
    /// Only sources matching this glob (repeatable; `!GLOB` excludes).
    #[arg(long = "source", value_name = "GLOB")]
    pub sources: Vec<String>,
    /// Only policies matching this glob (repeatable; `!GLOB` excludes).
    #[arg(long = "policy", value_name = "GLOB")]
    pub policies: Vec<String>,
    /// Of each source and policy, only the newest N snapshots.
    #[arg(long, value_name = "N")]
    pub transfer_last: Option<usize>,
    /// Only snapshots taken since this time: RFC 3339, or a duration ago
    /// (`7d`).
    #[arg(long, value_name = "TIME", value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
}

impl SelectArgs {
    pub fn filters(&self) -> Filters {
        Filters {
            sources: self.sources.clone(),
            policies: self.policies.clone(),
            transfer_last: self.transfer_last,
            since: self.since,
        }
    }
}

/// `2026-11-20T02:00:00Z`, or `7d` (that long ago).
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    crate::units::parse_time(s).or_else(|time_err| match crate::units::parse_duration(s) {
        Ok(d) => Ok(Utc::now() - d),
        Err(_) => Err(format!("{time_err}, nor a duration such as 7d")),
    })
}

pub fn run(g: &Global, a: Args) -> Result<i32> {
    let (from, to) = endpoints(&a)?;
    if let Some(r) = a.rate.filter(|r| !r.is_finite() || *r <= 0.0) {
        bail!("--rate {r}: must be a positive number of MiB per second");
    }
    let config = a.config.as_deref().map(Config::load).transpose()?;
    // Removing vanished snapshots deletes: the maintenance credentials.
    let dst_role = if a.remove_vanished {
        Role::Maintenance
    } else {
        Role::Backup
    };
    let src = resolve(g, &from, config.as_ref(), Role::Backup)?;
    let dst = resolve(g, &to, config.as_ref(), dst_role)?;
    let opts = SyncOptions {
        filters: a.select.filters(),
        remove_vanished: a.remove_vanished,
        rate_mib_per_sec: a.rate,
        parallel: 0,
        dry_run: a.dry_run,
        keep: None,
    };
    let progress = Bar::default();
    let report = bulwark_store::sync::run(src.as_ref(), dst.as_ref(), &opts, &progress)
        .with_context(|| format!("syncing {} to {}", src.location(), dst.location()))?;
    progress.finish();
    print_report(&report, &src, &dst, a.json)?;
    Ok(if report.snapshots_failed.is_empty() {
        0
    } else {
        1
    })
}

/// FROM and TO from `--from/--to` or the two names.
fn endpoints(a: &Args) -> Result<(String, String)> {
    match (&a.from, &a.to, &a.from_name, &a.to_name) {
        (Some(f), Some(t), None, None) | (None, None, Some(f), Some(t)) => {
            Ok((f.clone(), t.clone()))
        }
        _ => bail!("name the source and the destination: --from SOURCE --to DEST, or FROM TO"),
    }
}

/// A repository named in the config (with its credentials for `role`), or
/// a location as `--repo` takes it. A sync reads and writes whole objects
/// once: no local cache.
pub fn resolve(
    g: &Global,
    spec: &str,
    config: Option<&Config>,
    role: Role,
) -> Result<std::sync::Arc<dyn Backend>> {
    match config.and_then(|c| c.repositories.get(spec)) {
        Some(r) => r.backend_uncached(role),
        None if config.is_some() && !looks_like_location(spec) => {
            bail!("no repository {spec:?} in the config ([repositories.{spec}])")
        }
        None => {
            let mut location = g.backend.location(spec);
            location.cache = None;
            Ok(location.backend()?)
        }
    }
}

fn looks_like_location(spec: &str) -> bool {
    spec.contains('/') || spec.contains(':')
}

fn print_report(
    r: &SyncReport,
    src: &std::sync::Arc<dyn Backend>,
    dst: &std::sync::Arc<dyn Backend>,
    json: bool,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let verb = if r.dry_run { "would copy" } else { "copied" };
    println!(
        "{} -> {}: {verb} {} snapshots ({} packs, {} chunks, {}) in {:.1}s; {} already there",
        src.location(),
        dst.location(),
        r.snapshots_copied,
        r.packs_copied,
        r.chunks_copied,
        human(r.bytes_copied),
        r.seconds,
        r.snapshots_skipped,
    );
    if r.snapshots_unavailable > 0 {
        println!(
            "{} snapshots at the source cannot be synced (made before sync records, or pruned meanwhile)",
            r.snapshots_unavailable
        );
    }
    if r.snapshots_removed > 0 {
        let verb = if r.dry_run { "would remove" } else { "removed" };
        println!("{verb} {} vanished snapshots", r.snapshots_removed);
    }
    for f in &r.snapshots_failed {
        println!("FAILED {} ({}): {}", f.snapshot.short(), f.source, f.error);
    }
    Ok(())
}

/// The progress bar: bytes of the plan, with rate and ETA.
#[derive(Default)]
struct Bar(std::sync::OnceLock<indicatif::ProgressBar>);

impl Bar {
    fn finish(&self) {
        if let Some(pb) = self.0.get() {
            pb.finish_and_clear();
        }
    }
}

impl bulwark_store::sync::Progress for Bar {
    fn planned(&self, plan: &SyncPlan) {
        let _ = self.0.set(crate::progress::bar(plan.bytes(), "sync"));
    }
    fn copied(&self, bytes: u64) {
        if let Some(pb) = self.0.get() {
            pb.inc(bytes);
        }
    }
    fn snapshot(
        &self,
        record: &bulwark_store::format::sync_record::SyncRecord,
        outcome: &bulwark_store::Result<()>,
    ) {
        if let (Some(pb), Err(e)) = (self.0.get(), outcome) {
            pb.println(format!(
                "snapshot {} of {} failed: {e}",
                record.snapshot.short(),
                record.source
            ));
        }
    }
}
