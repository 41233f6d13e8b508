//! Measures a lock-extension pass over many objects on radosgw
//! (`scripts/bench-lock-extend.sh`): writes N small locked objects into a
//! fresh bucket (PUTs in parallel), then extends them all, as
//! `bulwark_store::maintain::lock::extend` does for what kept snapshots need, and prints the
//! requests and seconds as JSON.
//!
//! Usage: lock_extend [N]   (default 100000)

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bulwark_store::backend::{LockMode, S3Backend, S3Config};
use bulwark_store::maintain::lock::LockSettings;
use bulwark_store::Backend;
use testbed::rgw::LockServer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).map_or(Ok(100_000), |a| a.parse())?;
    let server = LockServer::start()?;
    let bucket = server.create_bucket()?;
    let s3 = S3Backend::new(S3Config {
        bucket,
        prefix: "bench".into(),
        endpoint: Some(server.endpoint().into()),
        region: Some("us-east-1".into()),
        credentials: Some((
            server.owner.access_key.clone(),
            server.owner.secret_key.clone(),
        )),
        ..Default::default()
    })?;
    let lock = s3.object_lock().ok_or("no object lock")?;
    let settings = LockSettings::new(LockMode::Governance, Duration::from_secs(3600))?;
    lock.lock_new_objects(Some(settings.rule()));

    // N objects named like packs, 64 bytes each, 32 PUTs in flight.
    let names: Vec<String> = (0..n)
        .map(|i| {
            let h = format!("{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15);
            format!("data/{}/{h}", &h[..2])
        })
        .collect();
    let t = Instant::now();
    let next = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..32 {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = names.get(i) else { break };
                s3.put(name, &[7u8; 64]).expect("put");
            });
        }
    });
    let write_s = t.elapsed().as_secs_f64();

    // A pass a whole generation later: every object is due.
    let needed: BTreeSet<String> = names.into_iter().collect();
    let later = chrono::Utc::now() + settings.generation() * 2;
    let r = bulwark_store::maintain::lock::extend_versions(lock, &settings, &needed, later)?;
    println!(
        "{}",
        serde_json::json!({
            "objects": n,
            "write_seconds": write_s,
            "extend": r,
        })
    );
    Ok(())
}
