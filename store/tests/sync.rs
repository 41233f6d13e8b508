//! Replication between local repositories, without the key: what a sync
//! copies, that a second one copies nothing, that a new snapshot costs
//! about its new packs, that a damaged pack never lands, that a sync killed
//! half-way resumes without copying a byte twice, that a GC repack at the
//! source keeps older snapshots syncable, and that every snapshot restores
//! bit-identical from the replica alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bulwark_store::backend::ObjectInfo;
use bulwark_store::maintain::gc::{self, GcOptions};
use bulwark_store::sync::{self, Filters, SyncOptions, SyncReport};
use bulwark_store::{
    Backend, BackendError, BackupOptions, BackupSession, LocalBackend, MemSource, Mode, Repository,
    Secret, Snapshot, SnapshotMeta,
};

mod common;
use common::*;

struct Site {
    _dir: tempfile::TempDir,
    src: Repository,
    dst_backend: Arc<LocalBackend>,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let src = new_repo(dir.path());
        let dst_backend = Arc::new(LocalBackend::new(dir.path().join("replica")));
        Repository::init_replica(
            dst_backend.clone(),
            src.backend().as_ref(),
            &Secret::Passphrase(PW.into()),
            &Secret::Passphrase(PW.into()),
            &cheap_kdf(),
            None,
        )
        .unwrap();
        Site {
            _dir: dir,
            src,
            dst_backend,
        }
    }

    fn sync(&self, opts: &SyncOptions) -> SyncReport {
        sync::run(
            self.src.backend().as_ref(),
            self.dst_backend.as_ref(),
            opts,
            &(),
        )
        .unwrap()
    }

    /// The replica, opened with the key (as a restore there would).
    fn replica(&self) -> Repository {
        Repository::open(self.dst_backend.clone(), &Secret::Passphrase(PW.into())).unwrap()
    }

    fn backup(&self, source: &str, data: &[u8]) -> Snapshot {
        let mut s = BackupSession::new(&self.src, &BackupOptions::default()).unwrap();
        s.backup_disk("image", &mut MemSource::new(data.to_vec()), Mode::Full)
            .unwrap();
        s.finish(SnapshotMeta {
            source: source.into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn pack_bytes(&self, backend: &dyn Backend) -> u64 {
        backend.list("data/").unwrap().iter().map(|o| o.size).sum()
    }
}

fn check_restores(repo: &Repository, snaps: &[(&Snapshot, &[u8])], dir: &std::path::Path) {
    repo.invalidate_index();
    for (s, want) in snaps {
        let got = restore(repo, s, &dir.join("check.raw")).unwrap();
        assert!(got == *want, "snapshot {} restores other bytes", s.id);
    }
    let all = repo.snapshots().unwrap();
    let v = bulwark_store::maintain::verify::verify(repo, &all, 2, &|_| {}).unwrap();
    assert!(v.damaged.is_empty(), "{:?}", v.damaged);
}

#[test]
fn a_sync_copies_what_is_missing_and_the_replica_restores_alone() {
    let site = Site::new();
    let a = random(3 << 20, 1);
    let b = [random(2 << 20, 2), a[..1 << 20].to_vec()].concat();
    let sa = site.backup("vm-a", &a);
    let sb = site.backup("vm-b", &b);

    let first = site.sync(&SyncOptions::default());
    assert_eq!((first.snapshots_copied, first.snapshots_skipped), (2, 0));
    assert!(first.snapshots_failed.is_empty(), "{first:?}");
    let src_packs = site.pack_bytes(site.src.backend().as_ref());
    assert_eq!(site.pack_bytes(site.dst_backend.as_ref()), src_packs);
    assert!(first.bytes_copied >= src_packs, "{first:?}");
    assert!(first.chunks_copied > 0);

    // Nothing new: nothing copied.
    let second = site.sync(&SyncOptions::default());
    assert_eq!((second.snapshots_copied, second.snapshots_skipped), (0, 2));
    assert_eq!(
        (second.bytes_copied, second.packs_copied),
        (0, 0),
        "{second:?}"
    );

    // A new snapshot costs about its own new packs.
    let c = [a.clone(), random(1 << 20, 3)].concat();
    let before = site.pack_bytes(site.src.backend().as_ref());
    let sc = site.backup("vm-a", &c);
    let new_packs = site.pack_bytes(site.src.backend().as_ref()) - before;
    let third = site.sync(&SyncOptions::default());
    assert_eq!(third.snapshots_copied, 1);
    assert!(
        third.bytes_copied >= new_packs && third.bytes_copied < new_packs + (64 << 10),
        "copied {} for {new_packs} new pack bytes",
        third.bytes_copied
    );

    // The source gone: the replica alone restores every snapshot.
    let dir = tempfile::tempdir().unwrap();
    std::fs::remove_dir_all(site._dir.path().join("repo")).unwrap();
    let replica = site.replica();
    assert_eq!(replica.snapshots().unwrap().len(), 3);
    check_restores(&replica, &[(&sa, &a), (&sb, &b), (&sc, &c)], dir.path());
}

#[test]
fn filters_pick_sources_and_the_newest_of_each() {
    let site = Site::new();
    for i in 0..3 {
        site.backup("web01", &random(1 << 20, 10 + i));
        site.backup("db01", &random(1 << 20, 20 + i));
    }
    let opts = SyncOptions {
        filters: Filters {
            sources: vec!["web*".into()],
            transfer_last: Some(2),
            ..Default::default()
        },
        ..Default::default()
    };
    let dry = site.sync(&SyncOptions {
        dry_run: true,
        ..opts.clone()
    });
    assert_eq!((dry.snapshots_selected, dry.snapshots_copied), (2, 2));
    assert!(
        site.dst_backend.list("snapshots/").unwrap().is_empty(),
        "a dry run copies nothing"
    );
    let r = site.sync(&opts);
    assert_eq!(r.snapshots_copied, 2);
    let replica = site.replica();
    let snaps = replica.snapshots().unwrap();
    assert!(snaps.iter().all(|s| s.source == "web01") && snaps.len() == 2);
    // Backfill: an older one, asked for, is copied too.
    let all = site.sync(&SyncOptions::default());
    assert_eq!((all.snapshots_copied, all.snapshots_skipped), (4, 2));
}

#[test]
fn a_damaged_pack_fails_its_snapshot_and_never_lands() {
    let site = Site::new();
    let good = site.backup("good", &random(2 << 20, 4));
    let bad = site.backup("bad", &random(2 << 20, 5));
    // Damage a pack only the second snapshot uses.
    let record = |id| {
        let name = format!("sync/{id}.00000000");
        let b = site.src.backend().get(&name).unwrap();
        bulwark_store::format::sync_record::SyncRecord::decode(&b, &name).unwrap()
    };
    let (rg, rb) = (record(good.id), record(bad.id));
    let victim = rb.packs.iter().find(|p| !rg.packs.contains(p)).unwrap();
    let path = site
        ._dir
        .path()
        .join("repo")
        .join(bulwark_store::format::layout::pack(victim));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let r = site.sync(&SyncOptions::default());
    assert_eq!(r.snapshots_copied, 1, "{r:?}");
    assert_eq!(r.snapshots_failed.len(), 1, "{r:?}");
    let f = &r.snapshots_failed[0];
    assert_eq!(f.snapshot, bad.id);
    assert!(
        f.error.contains(&victim.short()) && f.error.contains("SHA-256"),
        "{}",
        f.error
    );
    let dst = site.dst_backend.as_ref();
    assert!(!dst
        .exists(&bulwark_store::format::layout::pack(victim))
        .unwrap());
    assert!(!dst
        .exists(&bulwark_store::format::layout::snapshot(&bad.id))
        .unwrap());
    assert!(dst
        .exists(&bulwark_store::format::layout::snapshot(&good.id))
        .unwrap());
    assert!(
        dst.list(&format!("sync/{}", bad.id)).unwrap().is_empty(),
        "no metadata of the failed snapshot is left"
    );
}

/// A destination that fails every write after the first `allow`.
#[derive(Debug)]
struct Dies {
    inner: Arc<LocalBackend>,
    allow: usize,
    puts: AtomicUsize,
}

impl Backend for Dies {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        if self.puts.fetch_add(1, Ordering::SeqCst) >= self.allow {
            return Err(BackendError::Other("connection lost".into()));
        }
        self.inner.put(name, data)
    }
    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        self.inner.get(name)
    }
    fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        self.inner.get_range_into(name, offset, len, buf)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.inner.list(prefix)
    }
    fn delete(&self, name: &str) -> Result<(), BackendError> {
        self.inner.delete(name)
    }
}

#[test]
fn an_interrupted_sync_resumes_without_copying_a_byte_twice() {
    let site = Site::new();
    let a = random(6 << 20, 6);
    let sa = site.backup("vm", &a);
    let total = site.pack_bytes(site.src.backend().as_ref());
    // Writes stop after the marker and three packs.
    let dies = Dies {
        inner: site.dst_backend.clone(),
        allow: 4,
        puts: AtomicUsize::new(0),
    };
    let opts = SyncOptions {
        parallel: 1,
        ..Default::default()
    };
    let r = sync::run(site.src.backend().as_ref(), &dies, &opts, &()).unwrap();
    assert_eq!(
        (r.snapshots_copied, r.snapshots_failed.len()),
        (0, 1),
        "{r:?}"
    );
    let landed = site.pack_bytes(site.dst_backend.as_ref());
    assert!(landed > 0 && landed < total, "{landed} of {total}");
    assert!(site.dst_backend.list("snapshots/").unwrap().is_empty());

    let again = site.sync(&SyncOptions::default());
    assert_eq!(again.snapshots_copied, 1);
    let metadata: u64 = ["index/", "chunklists/", "sync/", "snapshots/"]
        .iter()
        .flat_map(|p| site.dst_backend.list(p).unwrap())
        .map(|o| o.size)
        .sum();
    assert_eq!(
        again.bytes_copied,
        total - landed + metadata,
        "the resumed sync copied exactly what was missing"
    );
    let dir = tempfile::tempdir().unwrap();
    check_restores(&site.replica(), &[(&sa, &a)], dir.path());
}

#[test]
fn a_repack_at_the_source_keeps_older_snapshots_syncable() {
    let site = Site::new();
    // Packs that mix what `keep` needs with what only `gone` needs.
    let live: Vec<Vec<u8>> = (0..12).map(|i| random(256 << 10, 100 + i)).collect();
    let dead: Vec<Vec<u8>> = (0..12).map(|i| random(256 << 10, 200 + i)).collect();
    let mixed: Vec<u8> = live
        .iter()
        .zip(&dead)
        .flat_map(|(l, d)| [l.clone(), d.clone()].concat())
        .collect();
    let kept: Vec<u8> = live.concat();
    let gone = site.backup("vm", &mixed);
    let keep = site.backup("vm", &kept);
    site.src.delete_snapshot(&gone).unwrap();
    let gc_all = || {
        gc::run(
            &site.src,
            &GcOptions {
                grace: chrono::Duration::zero(),
                repack_below: 1.0,
                dry_run: false,
            },
            &|_| {},
        )
        .unwrap()
    };
    let r1 = gc_all();
    let r2 = gc_all();
    assert!(
        r1.packs_repacked > 0 && r2.packs_deleted > 0,
        "{r1:?} {r2:?}"
    );
    // `keep`'s record is a newer generation listing only packs that exist.
    let names = site
        .src
        .backend()
        .list(&format!("sync/{}.", keep.id))
        .unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    let name = &names[0].name;
    let b = site.src.backend().get(name).unwrap();
    let rec = bulwark_store::format::sync_record::SyncRecord::decode(&b, name).unwrap();
    assert!(rec.generation > 0, "{rec:?}");
    for p in &rec.packs {
        assert!(
            site.src
                .backend()
                .exists(&bulwark_store::format::layout::pack(p))
                .unwrap(),
            "{name} lists a pack GC deleted"
        );
    }
    let r = site.sync(&SyncOptions::default());
    assert_eq!(
        (r.snapshots_copied, r.snapshots_failed.len()),
        (1, 0),
        "{r:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    check_restores(&site.replica(), &[(&keep, &kept)], dir.path());
}

#[test]
fn unrelated_repositories_and_a_missing_replica_are_refused() {
    let site = Site::new();
    site.backup("vm", &random(1 << 20, 11));
    let other = tempfile::tempdir().unwrap();
    let unrelated = new_repo(other.path());
    let e = sync::run(
        site.src.backend().as_ref(),
        unrelated.backend().as_ref(),
        &SyncOptions::default(),
        &(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a replica"), "{e}");
    let nowhere = LocalBackend::new(other.path().join("none"));
    let e = sync::run(
        site.src.backend().as_ref(),
        &nowhere,
        &SyncOptions::default(),
        &(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--replica-of"), "{e}");
    let e = sync::run(
        site.src.backend().as_ref(),
        site.src.backend().as_ref(),
        &SyncOptions::default(),
        &(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("same repository"), "{e}");
}

#[test]
fn the_replica_keeps_its_own_retention_without_the_key() {
    use bulwark_store::maintain::retention::KeepOptions;
    use bulwark_store::sync::retain;
    let site = Site::new();
    let mut snaps = Vec::new();
    for day in 1..=4u32 {
        let data = random(1 << 20, day as u64);
        let mut s = BackupSession::new(&site.src, &BackupOptions::default()).unwrap();
        s.backup_disk("image", &mut MemSource::new(data.clone()), Mode::Full)
            .unwrap();
        let snap = s
            .finish(SnapshotMeta {
                source: "vm-a".into(),
                time: Some(format!("2026-11-0{day}T02:00:00Z").parse().unwrap()),
                ..Default::default()
            })
            .unwrap();
        snaps.push((snap, data));
    }
    assert_eq!(site.sync(&SyncOptions::default()).snapshots_copied, 4);
    // What a killed sync leaves: a record whose manifest never came. It
    // must not count as a kept snapshot.
    let stray = bulwark_store::format::sync_record::SyncRecord {
        snapshot: bulwark_store::Id::random(),
        time: "2026-11-09T02:00:00Z".parse().unwrap(),
        ..bulwark_store::repo::sync_records::load(
            site.dst_backend.as_ref(),
            &bulwark_store::repo::sync_records::newest(site.dst_backend.as_ref())
                .unwrap()
                .into_values()
                .next()
                .unwrap(),
        )
        .unwrap()
        .unwrap()
    };
    bulwark_store::repo::sync_records::put(site.dst_backend.as_ref(), &stray).unwrap();

    let keep = KeepOptions {
        keep_last: 2,
        ..Default::default()
    };
    let plan = retain::plan(
        site.dst_backend.as_ref(),
        &Filters::default(),
        &keep,
        &chrono::Utc,
    )
    .unwrap();
    let kept: Vec<_> = plan
        .iter()
        .filter(|r| r.rule.is_some())
        .map(|r| r.record.snapshot)
        .collect();
    assert_eq!(kept, vec![snaps[3].0.id, snaps[2].0.id]);
    assert_eq!(
        retain::execute(site.dst_backend.as_ref(), &plan).unwrap(),
        2
    );

    // The source keeps all four; the replica the newest two, which restore.
    assert_eq!(site.src.snapshots().unwrap().len(), 4);
    let replica = site.replica();
    let left: Vec<_> = replica.snapshots().unwrap().iter().map(|s| s.id).collect();
    assert_eq!(left, vec![snaps[2].0.id, snaps[3].0.id]);
    // The next sync, told the replica's retention, does not bring back
    // what it would prune; a new snapshot it does copy.
    let newer = random(1 << 20, 9);
    let mut s = BackupSession::new(&site.src, &BackupOptions::default()).unwrap();
    s.backup_disk("image", &mut MemSource::new(newer.clone()), Mode::Full)
        .unwrap();
    let s5 = s
        .finish(SnapshotMeta {
            source: "vm-a".into(),
            time: Some("2026-11-05T02:00:00Z".parse().unwrap()),
            ..Default::default()
        })
        .unwrap();
    let again = site.sync(&SyncOptions {
        keep: Some(keep),
        ..Default::default()
    });
    assert_eq!((again.snapshots_copied, again.snapshots_skipped), (1, 4));
    assert_eq!(replica.snapshots().unwrap().len(), 3);
    let dir = tempfile::tempdir().unwrap();
    check_restores(
        &replica,
        &[
            (&snaps[2].0, &snaps[2].1),
            (&snaps[3].0, &snaps[3].1),
            (&s5, &newer),
        ],
        dir.path(),
    );
}

/// Runs `f` once, at the first byte the sync copies.
struct AtFirstCopy<F: Fn() + Sync>(std::sync::Once, F);

impl<F: Fn() + Sync> sync::Progress for AtFirstCopy<F> {
    fn copied(&self, _bytes: u64) {
        self.0.call_once(|| (self.1)());
    }
}

#[test]
fn gc_on_either_side_racing_a_sync_deletes_nothing_referenced() {
    let site = Site::new();
    let a = random(3 << 20, 21);
    let b = random(3 << 20, 22);
    let sa = site.backup("vm-a", &a);
    let sb = site.backup("vm-b", &b);
    let zero = GcOptions {
        grace: chrono::Duration::zero(),
        ..Default::default()
    };
    // While the first snapshot's packs are being copied: GC at the
    // destination (condemn, then sweep: what the sync has written so far is
    // referenced by no manifest there yet), and at the source vm-b pruned
    // and collected at once, so its packs vanish before the sync gets to
    // them.
    let race = AtFirstCopy(std::sync::Once::new(), || {
        let replica = site.replica();
        for _ in 0..2 {
            gc::run(&replica, &zero, &|_| {}).unwrap();
        }
        site.src.delete_snapshot(&sb).unwrap();
        for _ in 0..2 {
            gc::run(&site.src, &zero, &|_| {}).unwrap();
        }
    });
    let r = sync::run(
        site.src.backend().as_ref(),
        site.dst_backend.as_ref(),
        &SyncOptions::default(),
        &race,
    )
    .unwrap();
    assert!(race.0.is_completed(), "the race ran");
    assert_eq!(r.snapshots_copied, 1, "{r:?}");
    // vm-b, pruned mid-run, failed (its packs went) and left nothing.
    assert_eq!(r.snapshots_failed.len(), 1, "{r:?}");
    assert_eq!(r.snapshots_failed[0].snapshot, sb.id);
    let dst = site.dst_backend.as_ref();
    assert!(!dst
        .exists(&bulwark_store::format::layout::snapshot(&sb.id))
        .unwrap());
    assert!(dst.list(&format!("sync/{}", sb.id)).unwrap().is_empty());

    // More GC at the destination after the sync: vm-a is whole.
    let replica = site.replica();
    for _ in 0..2 {
        gc::run(&replica, &zero, &|_| {}).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    check_restores(&replica, &[(&sa, &a)], dir.path());
    // The next sync has nothing to do: vm-b is gone at the source.
    let again = site.sync(&SyncOptions::default());
    assert_eq!(
        (
            again.snapshots_copied,
            again.snapshots_skipped,
            again.snapshots_failed.len()
        ),
        (0, 1, 0),
        "{again:?}"
    );
}
