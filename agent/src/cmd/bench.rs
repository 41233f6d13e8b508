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
}

pub fn run(a: Args) -> Result<i32> {
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
