//! Many hosts, one bucket (the CI-sized `scripts/bench-writers.sh`): three
//! writers, each in a UTS namespace of its own (its own host name, which
//! session markers, GC locks and manifests carry), back up their own image
//! into one S3 bucket for a minute while a fourth host prunes and runs GC
//! with no grace in a loop. Afterwards: every snapshot verifies, every kept
//! one restores to the image it was taken of, and written = kept + pruned.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hasher};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore};
use testbed::cli::Runner;
use testbed::s3::S3Server;

const PW: &str = "writers test passphrase";
const WRITERS: usize = 3;
const RUN: Duration = Duration::from_secs(60);
const IMAGE_MIB: u64 = 8;
const KEEP: usize = 2;

/// `bulwark` as host `host`: its own UTS namespace and cache.
fn host(server: &S3Server, repo: &str, dir: &Path, host: &str) -> Runner {
    Runner::new("unshare")
        .envs(server.env())
        .env("BULWARK_REPO", repo)
        .env("BULWARK_PASSWORD", PW)
        .env("BULWARK_CACHE_DIR", dir.join(format!("cache-{host}")))
        .with_prefix(&[
            "--uts",
            "sh",
            "-c",
            "hostname \"$0\" && exec \"$@\"",
            host,
            env!("CARGO_BIN_EXE_bulwark"),
        ])
}

fn hash_of(path: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(&std::fs::read(path).unwrap());
    h.finish()
}

/// One writer's run: its snapshots, each with the hash of the image it was
/// taken of.
fn writer(bw: &Runner, image: &Path, source: &str) -> Vec<(String, u64)> {
    let mut rng = rand::thread_rng();
    let f = std::fs::File::create(image).unwrap();
    let mut data = vec![0u8; (IMAGE_MIB << 20) as usize];
    rng.fill_bytes(&mut data);
    f.write_all_at(&data, 0).unwrap();
    let mut written = Vec::new();
    let t = Instant::now();
    while t.elapsed() < RUN {
        let mut mib = vec![0u8; 1 << 20];
        rng.fill_bytes(&mut mib);
        f.write_all_at(&mib, rng.gen_range(0..IMAGE_MIB) << 20)
            .unwrap();
        let hash = hash_of(image);
        let r = bw.backup_image(image.to_str().unwrap(), source);
        written.push((r["snapshot"].as_str().unwrap().to_string(), hash));
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
    }
    written
}

#[test]
fn three_hosts_back_up_into_one_bucket_while_prune_and_gc_run() {
    let server = S3Server::start().unwrap();
    let bucket = server.create_bucket().unwrap();
    let repo = format!("s3://{bucket}/repo");
    let dir = tempfile::Builder::new()
        .prefix("bw-writers-")
        .tempdir()
        .unwrap();
    let maint = host(&server, &repo, dir.path(), "maint");
    maint.ok(&["repo", "init"]);

    let pruned = Mutex::new(BTreeSet::new());
    let gcs = Mutex::new(Vec::new());
    let written: BTreeMap<String, u64> = std::thread::scope(|s| {
        let writers: Vec<_> = (1..=WRITERS)
            .map(|w| {
                let (server, repo, dir) = (&server, &repo, dir.path());
                s.spawn(move || {
                    let bw = host(server, repo, dir, &format!("writer-{w}"));
                    writer(&bw, &dir.join(format!("w{w}.raw")), &format!("w{w}"))
                })
            })
            .collect();
        let t = Instant::now();
        while t.elapsed() < RUN {
            let keep = KEEP.to_string();
            let p = maint.json(&["prune", "--keep-last", &keep, "--json"]);
            pruned.lock().unwrap().extend(
                p.as_array()
                    .unwrap()
                    .iter()
                    .filter(|d| d["keep"] == false)
                    .map(|d| d["id"].as_str().unwrap().to_string()),
            );
            gcs.lock()
                .unwrap()
                .push(maint.json(&["gc", "--grace", "0s", "--json"]));
        }
        writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let pruned = pruned.into_inner().unwrap();
    let mut gcs = gcs.into_inner().unwrap();
    // Nothing in flight: these delete what the runs condemned.
    for _ in 0..2 {
        gcs.push(maint.json(&["gc", "--grace", "0s", "--json"]));
    }
    let sum = |k: &str| gcs.iter().map(|g| g[k].as_u64().unwrap()).sum::<u64>();
    eprintln!(
        "{} written, {} pruned, {} gc runs: {} packs condemned, {} deleted, {} resurrected",
        written.len(),
        pruned.len(),
        gcs.len(),
        sum("packs_condemned"),
        sum("packs_deleted"),
        sum("packs_resurrected")
    );
    assert!(gcs.len() >= 4 && !pruned.is_empty(), "{gcs:?}");
    assert!(sum("packs_deleted") > 0, "GC never deleted: {gcs:?}");

    // Written = kept + pruned, each snapshot by the host that wrote it.
    let snaps = maint.json(&["snapshots", "--json"]);
    let kept: BTreeMap<String, String> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let id = s["id"].as_str().unwrap().to_string();
            let source = s["source"].as_str().unwrap();
            assert_eq!(s["host"], format!("writer-{}", &source[1..]), "{s}");
            (id, source.to_string())
        })
        .collect();
    assert!(kept.keys().all(|id| !pruned.contains(id)));
    let accounted: BTreeSet<&String> = kept.keys().chain(&pruned).collect();
    assert_eq!(
        accounted,
        written.keys().collect::<BTreeSet<_>>(),
        "snapshots lost or unknown"
    );
    // Every snapshot verifies and every kept one restores bit for bit.
    let v = maint.json(&["verify", "--json"]);
    assert_eq!(v["damaged"], serde_json::json!([]), "{v}");
    assert_eq!(v["snapshots"], kept.len(), "{v}");
    let out = dir.path().join("restored.raw");
    for id in kept.keys() {
        let o = out.to_str().unwrap();
        maint.ok(&["restore", "image", id, "--to", o, "--force"]);
        assert_eq!(hash_of(&out), written[id], "snapshot {id} restores wrong");
    }
}
