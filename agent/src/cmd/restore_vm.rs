//! `bulwark restore vm`: snapshots back as new libvirt domains, several at
//! once under one progress display (per VM and overall, with ETA).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;

use super::restore_live::{LiveArgs, Supervision};
use crate::libvirt::Libvirt;
use crate::vm::restore::{self, Options, Outcome, Plan, Stage};
use crate::vm::rewrite::ImageFormat;
use crate::{progress, Global};

#[derive(clap::Args)]
pub struct Args {
    /// What to restore: SNAPSHOT:NAME for each VM (SNAPSHOT is an id, an id
    /// prefix or VM@latest; NAME the new domain's), or one SNAPSHOT with --as.
    #[arg(required = true)]
    specs: Vec<String>,
    /// The new domain's name (one snapshot only).
    #[arg(long = "as")]
    as_name: Option<String>,
    /// Directory for the disk images.
    #[arg(
        long,
        default_value = "/var/lib/libvirt/images",
        conflicts_with = "pool"
    )]
    storage_dir: PathBuf,
    /// A libvirt storage pool (directory type) for the disk images.
    #[arg(long)]
    pool: Option<String>,
    /// Image format of the restored disks.
    #[arg(long, default_value = "qcow2", value_parser = ["qcow2", "raw"])]
    format: String,
    /// Keep the MAC addresses (the old VM is gone for good).
    #[arg(long)]
    keep_macs: bool,
    /// Keep Bulwark's backup policies in the new domain.
    #[arg(long)]
    protect: bool,
    /// Start the new domain.
    #[arg(long, conflicts_with_all = ["define_only", "disks_only"])]
    start: bool,
    /// Define the domain but do not start it (the default).
    #[arg(long, conflicts_with = "disks_only")]
    define_only: bool,
    /// Only restore the disk images.
    #[arg(long)]
    disks_only: bool,
    /// VMs restored at once.
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// Live restore: the VM boots at once from the backup while its disks
    /// are copied in behind it (qcow2 overlays; see `restore status`).
    #[arg(long, conflicts_with_all = ["define_only", "disks_only"])]
    live: bool,
    /// With --live: supervise in the foreground until every disk is local
    /// (without it, the running agent takes over).
    #[arg(long, requires = "live")]
    wait: bool,
    /// With --live: cap each disk's stream at this many MiB/s (0: none),
    /// leaving bandwidth to the guest's own reads.
    #[arg(long, default_value_t = 0, requires = "live")]
    stream_mib_per_sec: u64,
    /// With --live: how long the guest's reads and the streams wait for an
    /// unreachable repository (an S3 outage) before the restore fails
    /// (it can then be resumed with `restore retry`).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, requires = "live")]
    outage_wait: std::time::Duration,
    /// With --live: a replica holding the same snapshot (a directory or
    /// s3://BUCKET/PREFIX, opened with the same secret); the server reads
    /// from it what the repository cannot give, and serves from it alone
    /// if the repository cannot be opened.
    #[arg(long, value_name = "LOCATION", requires = "live")]
    replica: Option<String>,
    #[command(flatten)]
    sup: Supervision,
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Global, a: Args) -> Result<i32> {
    let libvirt = Libvirt::open(&a.sup.connect)?;
    let targets = restore::targets(&a.specs, a.as_name.as_deref())?;
    let opts = options(&libvirt, &a)?;
    if a.live {
        let live = LiveArgs {
            wait: a.wait,
            stream_mib_per_sec: a.stream_mib_per_sec,
            outage_wait_secs: a.outage_wait.as_secs(),
            replica: a.replica.clone(),
            sup: a.sup,
            json: a.json,
        };
        return super::restore_live::run(g, &libvirt, &targets, opts, live);
    }
    let (repo, plans) = restore::plan_all(g, &targets, |s, name| {
        restore::plan(&libvirt, s, name, &opts)
    })?;
    restore::undo_on_interrupt(libvirt.clone())?;
    let results = restore_all(&repo, &libvirt, &plans, &opts, a.parallel.max(1));
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if a.json {
        let v: Vec<_> = results
            .iter()
            .map(|(p, r)| match r {
                Ok(o) => serde_json::json!({"ok": true, "name": o.name, "snapshot": o.snapshot,
                    "disks": o.disks.iter().map(|(t, p)| serde_json::json!({"target": t, "path": p})).collect::<Vec<_>>(),
                    "nvram": o.nvram, "defined": o.defined, "started": o.started, "notes": o.notes, "seconds": o.seconds}),
                Err(e) => serde_json::json!({"ok": false, "name": p.name,
                    "snapshot": p.snapshot.id.to_string(), "error": format!("{e:#}")}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (p, r) in &results {
            match r {
                Ok(o) => {
                    let what = if o.started {
                        "started"
                    } else if o.defined {
                        "defined"
                    } else {
                        "disks restored"
                    };
                    println!(
                        "{}: {what} from snapshot {} in {:.1}s",
                        o.name,
                        p.snapshot.id.short(),
                        o.seconds
                    );
                    for (t, path) in &o.disks {
                        println!("  {t}: {}", path.display());
                    }
                    if let Some(p) = &o.nvram {
                        println!("  nvram: {}", p.display());
                    }
                    for n in &o.notes {
                        println!("  note: {n}");
                    }
                }
                Err(e) => eprintln!("{}: failed, nothing of it is left: {e:#}", p.name),
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// The restore options the arguments say.
fn options(libvirt: &Libvirt, a: &Args) -> Result<Options> {
    let dir = match &a.pool {
        Some(pool) => libvirt.pool_dir(pool)?,
        None => a.storage_dir.clone(),
    };
    Ok(Options {
        dir,
        pool: a.pool.clone(),
        format: if a.format == "raw" {
            ImageFormat::Raw
        } else {
            ImageFormat::Qcow2
        },
        keep_macs: a.keep_macs,
        protect: a.protect,
        stage: if a.start {
            Stage::Started
        } else if a.disks_only {
            Stage::Disks
        } else {
            Stage::Defined
        },
        threads: 0,
    })
}

type Results<'p> = Vec<(&'p Plan, Result<Outcome>)>;

fn restore_all<'p>(
    repo: &Arc<bulwark_store::Repository>,
    libvirt: &Libvirt,
    plans: &'p [Plan],
    opts: &Options,
    parallel: usize,
) -> Results<'p> {
    let multi = progress::multi();
    let total: u64 = plans.iter().map(Plan::bytes).sum();
    let overall = multi.add(progress::bar(total, "all"));
    let bars: Vec<_> = plans
        .iter()
        .map(|p| multi.add(progress::bar(p.bytes(), &p.name)))
        .collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Outcome>>>> =
        Mutex::new(plans.iter().map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..parallel.min(plans.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = plans.get(i) else { return };
                let r = restore::run(repo, libvirt, p, opts, &|n| {
                    bars[i].inc(n);
                    overall.inc(n);
                });
                bars[i].finish_and_clear();
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    overall.finish_and_clear();
    plans
        .iter()
        .zip(results.into_inner().unwrap_or_else(|e| e.into_inner()))
        .map(|(p, r)| (p, r.unwrap_or_else(|| Err(anyhow::anyhow!("not run")))))
        .collect()
}
