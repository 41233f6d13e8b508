//! The S3 backend against a real S3 server (`s3s-fs` on loopback, started
//! by the test bed), with and without a fault-injecting proxy in between.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use bulwark_store::backend::s3::FailureKind;
use bulwark_store::backend::{CacheOptions, CachedBackend, S3Backend, S3Config};
use bulwark_store::backup::source::MemSource;
use bulwark_store::read::restore::{restore_to_file, RestoreOptions};
use bulwark_store::{
    Backend, BackendError, BackupOptions, BackupSession, KdfParams, Mode, Repository, Secret,
    SnapshotMeta,
};
use rand::{RngCore, SeedableRng};
use testbed::s3::{FaultProxy, Faults, S3Server};

mod common;
use common::small_config;

fn config(server: &S3Server, endpoint: &str, bucket: &str, prefix: &str) -> S3Config {
    S3Config {
        bucket: bucket.into(),
        prefix: prefix.into(),
        endpoint: Some(endpoint.into()),
        region: Some("us-east-1".into()),
        credentials: Some((server.access_key.clone(), server.secret_key.clone())),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(200),
        ..Default::default()
    }
}

fn backend(server: &S3Server, bucket: &str, prefix: &str) -> S3Backend {
    S3Backend::new(config(server, &server.endpoint(), bucket, prefix)).unwrap()
}

#[test]
fn objects_ranges_listing_from_many_threads() {
    let server = S3Server::start().unwrap();
    let bucket = server.create_bucket().unwrap();
    let b = Arc::new(backend(&server, &bucket, "some/prefix"));
    assert_eq!(b.location(), format!("s3://{bucket}/some/prefix"));
    assert!(matches!(
        b.get("index/nope"),
        Err(BackendError::NotFound(_))
    ));
    assert!(!b.exists("index/nope").unwrap());
    b.put("data/ab/abcd", b"hello world").unwrap();
    assert!(b.exists("data/ab/abcd").unwrap());
    assert_eq!(b.get("data/ab/abcd").unwrap(), b"hello world");
    assert_eq!(b.get_range("data/ab/abcd", 6, 5).unwrap(), b"world");
    assert_eq!(b.get_range("data/ab/abcd", 6, 100).unwrap(), b"world");
    assert_eq!(b.get_range("data/ab/abcd", 100, 5).unwrap(), b"");
    b.put("config", b"{}").unwrap();
    assert!(matches!(
        b.put("config", b"{}"),
        Err(BackendError::AlreadyExists(_))
    ));
    // 1100 objects (more than one listing page) from 16 threads at once.
    std::thread::scope(|s| {
        for t in 0..16 {
            let b = b.clone();
            s.spawn(move || {
                for i in (t..1100).step_by(16) {
                    let name = format!("index/{i:05}");
                    b.put(&name, name.as_bytes()).unwrap();
                    assert_eq!(b.get(&name).unwrap(), name.as_bytes());
                }
            });
        }
    });
    let mut l = b.list("index/").unwrap();
    l.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(l.len(), 1100);
    assert_eq!(l[7].name, "index/00007");
    assert_eq!(l[7].size, 11);
    assert_eq!(b.list("data/").unwrap().len(), 1);
    // The prefix is respected: another prefix of the same bucket is empty.
    assert!(backend(&server, &bucket, "other")
        .list("")
        .unwrap()
        .is_empty());
    b.delete("data/ab/abcd").unwrap();
    assert!(!b.exists("data/ab/abcd").unwrap());

    // From tokio spawn_blocking threads (how the NBD server calls it).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt.block_on(async {
        let mut hs = Vec::new();
        for i in 0..8 {
            let b = b.clone();
            hs.push(tokio::task::spawn_blocking(move || {
                b.get(&format!("index/{i:05}")).unwrap()
            }));
        }
        let mut out = Vec::new();
        for h in hs {
            out.push(h.await.unwrap());
        }
        out
    });
    assert_eq!(got[3], b"index/00003");
    // Dropping the last handle inside an async task must not panic.
    rt.block_on(async move { drop(b) });
}

fn image(mib: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; mib << 20];
    for (i, block) in v.chunks_mut(1 << 20).enumerate() {
        match i % 3 {
            0 => rng.fill_bytes(block),
            1 => {}
            _ => {
                for (j, b) in block.iter_mut().enumerate() {
                    *b = b"the quick brown fox\n"[j % 20];
                }
            }
        }
    }
    v
}

fn secret() -> Secret {
    Secret::Passphrase("s3 test".into())
}

fn kdf() -> KdfParams {
    KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    }
}

fn backup(repo: &Repository, data: &[u8], uploaders: usize) -> bulwark_store::Snapshot {
    let mut src = MemSource::new(data.to_vec());
    let mut s = BackupSession::new(
        repo,
        &BackupOptions {
            threads: 2,
            uploaders,
        },
    )
    .unwrap();
    s.backup_disk("disk", &mut src, Mode::Full).unwrap();
    s.finish(SnapshotMeta {
        source: "vm".into(),
        ..Default::default()
    })
    .unwrap()
}

fn restore(repo: &Repository, snap: &bulwark_store::Snapshot, dir: &std::path::Path) -> Vec<u8> {
    let list = repo.load_chunk_list(&snap.disks[0].chunk_list).unwrap();
    let path = dir.join(format!("restored-{}", snap.id.short()));
    let f = File::create(&path).unwrap();
    f.set_len(snap.disks[0].size).unwrap();
    restore_to_file(repo, &list, &f, &RestoreOptions { threads: 8 }, &|_| {}).unwrap();
    std::fs::read(&path).unwrap()
}

#[test]
fn repository_roundtrip_with_cache() {
    let server = S3Server::start().unwrap();
    let bucket = server.create_bucket().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cached = || -> Arc<dyn Backend> {
        Arc::new(CachedBackend::new(
            Arc::new(backend(&server, &bucket, "repo")),
            CacheOptions::new(tmp.path().join("cache")),
        ))
    };
    let repo = Repository::init(cached(), &secret(), &kdf(), small_config()).unwrap();
    let data = image(9, 1);
    let snap = backup(&repo, &data, 8);
    drop(repo);

    let repo = Repository::open(cached(), &secret()).unwrap();
    let cache_dir = tmp.path().join("cache").join(repo.config().id.to_string());
    assert!(cache_dir
        .join("snapshots")
        .join(snap.id.to_string())
        .exists());
    assert_eq!(restore(&repo, &snap, tmp.path()), data);
    let report =
        bulwark_store::maintain::verify::verify(&repo, &repo.snapshots().unwrap(), 4, &|_| {})
            .unwrap();
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);

    // A restore reads each range once: it keeps none of them.
    let ranges = cache_dir.join("ranges");
    assert!(!ranges.exists(), "a restore filled the range cache");

    // An export's demand reads are kept (backwards: no read-ahead, whose
    // stream is read once and not kept). Remove the packs behind the
    // server's back: a second export of the snapshot is served from the
    // range cache...
    let export = |repo: &Arc<Repository>| {
        let r =
            bulwark_store::read::reader::open_disk(repo.clone(), &snap, "disk", 1 << 20).unwrap();
        let mut buf = vec![0u8; r.size() as usize];
        for (i, block) in buf.chunks_mut(256 << 10).enumerate().rev() {
            r.read_at(i as u64 * (256 << 10), block)?;
        }
        Ok::<_, bulwark_store::Error>(buf)
    };
    let repo = Arc::new(repo);
    assert_eq!(export(&repo).unwrap(), data);
    assert!(ranges.exists());
    let packs = server.bucket_dir(&bucket).join("repo/data");
    let saved = tmp.path().join("saved-data");
    std::fs::rename(&packs, &saved).unwrap();
    let repo = Arc::new(Repository::open(cached(), &secret()).unwrap());
    assert_eq!(export(&repo).unwrap(), data);
    // ... and so is a restore, which reads what is cached...
    assert_eq!(restore(&repo, &snap, tmp.path()), data);
    // ...until a listing shows they are gone, which evicts them.
    assert!(repo.backend().list("data/").unwrap().is_empty());
    assert!(repo.backend().get_range(&packname(&repo), 0, 10).is_err());
    assert!(export(&repo).is_err());
    std::fs::rename(&saved, &packs).unwrap();
    assert_eq!(restore(&repo, &snap, tmp.path()), data);
}

fn packname(repo: &Repository) -> String {
    bulwark_store::format::layout::pack(&repo.index().unwrap().packs()[0].id)
}

#[test]
fn backup_through_faults_then_verify() {
    let server = S3Server::start().unwrap();
    let bucket = server.create_bucket().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let proxy = FaultProxy::start(server.port(), Faults::default()).unwrap();
    let open = || -> Arc<dyn Backend> {
        Arc::new(S3Backend::new(config(&server, &proxy.endpoint(), &bucket, "")).unwrap())
    };
    let repo = Repository::init(open(), &secret(), &kdf(), small_config()).unwrap();
    let first = image(4, 2);
    let s1 = backup(&repo, &first, 4);
    // A request fails an attempt with probability 0.3, so it fails all
    // ten of its attempts about once in 170,000: at 0.45 (0.15 each) a run's
    // hundred requests failed the test about once in thirty runs.
    proxy.set(Faults {
        slow_down: 0.1,
        reset_request: 0.1,
        reset_response: 0.1,
        latency: Duration::from_millis(5),
        ..Default::default()
    });
    let second = image(6, 3);
    let repo = Repository::open(open(), &secret()).unwrap();
    let s2 = backup(&repo, &second, 8);
    // Both snapshots restore bit-identical, still through the faults.
    let repo = Repository::open(open(), &secret()).unwrap();
    assert_eq!(restore(&repo, &s1, tmp.path()), first);
    assert_eq!(restore(&repo, &s2, tmp.path()), second);
    let report =
        bulwark_store::maintain::verify::verify(&repo, &repo.snapshots().unwrap(), 4, &|_| {})
            .unwrap();
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert_eq!(report.snapshots, 2);
    let st = &proxy.stats;
    assert!(st.injected() >= 5, "faults injected: {st:?}");
    eprintln!("faults injected: {st:?}");

    // When every request fails, the error says where and why, once the
    // attempts are spent.
    proxy.set(Faults {
        slow_down: 1.0,
        ..Default::default()
    });
    let mut c = config(&server, &proxy.endpoint(), &bucket, "");
    c.max_attempts = 3;
    let b = S3Backend::new(c).unwrap();
    let e = b.put("index/x", b"x").unwrap_err().to_string();
    assert!(e.contains(&bucket), "{e}");
    assert!(e.contains("gave up after 3 attempts"), "{e}");
    assert!(e.contains("SlowDown"), "{e}");
}

#[test]
fn check_tells_causes_apart() {
    let server = S3Server::start().unwrap();
    let bucket = server.create_bucket().unwrap();
    backend(&server, &bucket, "x").check().unwrap();

    let missing = backend(&server, "no-such-bucket-here", "");
    assert_eq!(missing.check().unwrap_err().kind, FailureKind::NoBucket);

    let mut c = config(&server, &server.endpoint(), &bucket, "");
    c.credentials = Some((server.access_key.clone(), "wrong secret".into()));
    let e = S3Backend::new(c).unwrap().check().unwrap_err();
    assert_eq!(e.kind, FailureKind::Credentials, "{}", e.message);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut c = config(&server, &format!("http://127.0.0.1:{port}"), &bucket, "");
    c.connect_timeout = Duration::from_secs(2);
    let e = S3Backend::new(c).unwrap().check().unwrap_err();
    assert_eq!(e.kind, FailureKind::Unreachable, "{}", e.message);
    assert!(
        e.message.contains(&format!("127.0.0.1:{port}")),
        "{}",
        e.message
    );
}

/// An S3 outage longer than the backend's own retries: a reader told to
/// wait it out returns the right bytes once the bucket is back; one that
/// is not fails with the cause.
#[test]
fn a_reader_waits_out_an_outage() {
    use bulwark_store::read::reader::open_disk;
    let server = S3Server::start().unwrap();
    let bucket = server.create_bucket().unwrap();
    let proxy = FaultProxy::start(server.port(), Faults::default()).unwrap();
    let open = || -> Arc<dyn Backend> {
        let mut c = config(&server, &proxy.endpoint(), &bucket, "");
        c.max_attempts = 3;
        Arc::new(S3Backend::new(c).unwrap())
    };
    let repo = Repository::init(open(), &secret(), &kdf(), small_config()).unwrap();
    let data = image(4, 7);
    let snap = backup(&repo, &data, 2);
    let repo = Arc::new(Repository::open(open(), &secret()).unwrap());
    let patient = open_disk(repo.clone(), &snap, "disk", 64 << 20).unwrap();
    patient.wait_out_outages(Duration::from_secs(60));
    let hasty = open_disk(repo, &snap, "disk", 64 << 20).unwrap();

    proxy.set(Faults {
        outage: true,
        ..Default::default()
    });
    let mut buf = vec![0u8; 1 << 20];
    let e = hasty.read_at(0, &mut buf).unwrap_err().to_string();
    assert!(e.contains("gave up after 3 attempts"), "{e}");
    let outage = Duration::from_secs(4);
    let t = std::time::Instant::now();
    let got = std::thread::scope(|s| {
        let reading = s.spawn(|| {
            let mut buf = vec![0u8; 2 << 20];
            patient.read_at(2 << 20, &mut buf).map(|()| buf)
        });
        std::thread::sleep(outage);
        proxy.set(Faults::default());
        reading.join().unwrap()
    });
    let got = got.expect("the patient reader failed");
    assert!(got[..] == data[2 << 20..4 << 20]);
    assert!(
        t.elapsed() >= outage,
        "the read did not wait: {:?}",
        t.elapsed()
    );
    assert!(
        proxy
            .stats
            .outage_resets
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4,
        "{:?}",
        proxy.stats
    );
}
