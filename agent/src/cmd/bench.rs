//! `bulwark benchmark`

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// MiB of test data per measurement.
    #[arg(long, default_value_t = 256)]
    size: u64,
    /// Repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long)]
    json: bool,
    /// Instead: the raw object copy rate from this location (every pack
    /// under `data/`, read and written whole with the S3 SDK, no checks):
    /// the baseline of `bulwark sync` (scripts/bench-sync.sh).
    #[arg(long, value_name = "LOCATION", requires = "copy_to")]
    copy_from: Option<String>,
    /// Where `--copy-from` copies to.
    #[arg(long, value_name = "LOCATION", requires = "copy_from")]
    copy_to: Option<String>,
    /// Instead: fill the repository (`--repo`) with a synthetic history
    /// of this many chunks, index and chunk lists only, no chunk data
    /// (scripts/bench-scale.sh).
    #[arg(long, value_name = "CHUNKS", hide = true)]
    synthetic: Option<u64>,
    /// Disks of the synthetic history.
    #[arg(long, default_value_t = 30, hide = true)]
    synthetic_sources: u64,
    /// Snapshots of each synthetic disk.
    #[arg(long, default_value_t = 10, hide = true)]
    synthetic_snapshots: u64,
}

pub fn run(g: &crate::Global, a: Args) -> Result<i32> {
    if let (Some(from), Some(to)) = (&a.copy_from, &a.copy_to) {
        return copy_rate(from, to, a.json);
    }
    if let Some(chunks) = a.synthetic {
        let shape = bulwark_store::synth::Shape {
            chunks,
            sources: a.synthetic_sources.max(1),
            per_source: a.synthetic_snapshots.max(1),
        };
        let repo = crate::secret::open(g)?;
        bulwark_store::synth::fill(&repo, shape, &|l| tracing::info!("{l}"))?;
        return Ok(0);
    }
    let r = bulwark_store::bench::run(a.size, a.rounds.max(1))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    println!(
        "{} MiB of mixed data (half random, half text), best of {}:",
        r.data_mib, a.rounds
    );
    println!("{:<44} {:>10}", "primitive (one core)", "MiB/s");
    for f in &r.primitives {
        println!("{:<44} {:>10.0}", f.name, f.mib_per_s);
    }
    println!(
        "{:<44} {:>10.0}",
        "serial bound (CDC+HMAC+zstd+seal)", r.serial_bound_mib_per_s
    );
    println!(
        "{:<44} {:>10.0}   {:.0}% of the serial bound",
        "backup pipeline, 1 core", r.pipeline_1_core_mib_per_s, r.pipeline_1_core_percent_of_bound
    );
    println!(
        "{:<44} {:>10.0}   {:.2}x one core",
        format!("backup pipeline, {} cores", r.cores),
        r.pipeline_all_cores_mib_per_s,
        r.pipeline_all_cores_mib_per_s / r.pipeline_1_core_mib_per_s
    );
    Ok(0)
}

fn copy_rate(from: &str, to: &str, json: bool) -> Result<i32> {
    let env = crate::secret::BackendArgs::default();
    let (mut src, mut dst) = (env.location(from), env.location(to));
    src.cache = None;
    dst.cache = None;
    let (src, dst) = (src.backend()?, dst.backend()?);
    let parallel = bulwark_store::sync::default_parallel(src.as_ref(), dst.as_ref());
    let (bytes, secs) =
        bulwark_store::bench::copy_objects(src.as_ref(), dst.as_ref(), "data/", parallel)?;
    let mib_s = bytes as f64 / (1 << 20) as f64 / secs.max(1e-9);
    if json {
        println!(
            "{}",
            serde_json::json!({"bytes": bytes, "seconds": secs, "mib_per_s": mib_s, "parallel": parallel})
        );
    } else {
        println!(
            "raw object copy: {bytes} B in {secs:.2}s = {mib_s:.1} MiB/s ({parallel} at once)"
        );
    }
    Ok(0)
}
