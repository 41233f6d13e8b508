//! GC against backups in flight, with the interleavings forced by hand
//! (`docs/gc.md`): a backup that reused a chunk before it was condemned
//! keeps it; one that starts after stores it again; repacking keeps every
//! live chunk readable; the streaming mark equals the full one; index
//! compaction beside a writer loses nothing.

use std::collections::{BTreeMap, BTreeSet};

use bulwark_store::backup::source::MemSource;
use bulwark_store::format::{index, layout};
use bulwark_store::maintain::gc::{self, Action, GcOptions, GcPlan, GcReport};
use bulwark_store::{
    BackupOptions, BackupSession, Id, LocalBackend, Mode, Repository, Secret, SnapshotMeta,
};
use chrono::Duration;
use rand::{Rng, RngCore};

mod common;
use common::*;

fn gc_now(repo: &Repository, repack_below: f64) -> GcReport {
    gc::run(
        repo,
        &GcOptions {
            grace: Duration::zero(),
            repack_below,
            dry_run: false,
        },
        &|_| {},
    )
    .unwrap()
}

fn data_bytes(repo: &Repository) -> u64 {
    repo.backend()
        .list("data/")
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum()
}

fn check(repo: &Repository, snap: &bulwark_store::Snapshot, want: &[u8], dir: &std::path::Path) {
    let got = restore(repo, snap, &dir.join("check.raw")).unwrap();
    assert!(got == want, "snapshot {} restores different bytes", snap.id);
    repo.invalidate_index();
    let all = repo.snapshots().unwrap();
    let report = bulwark_store::maintain::verify::verify(repo, &all, 2, &|_| {}).unwrap();
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
}

#[test]
fn a_backup_in_flight_keeps_the_chunks_it_reused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let a = random(4 << 20, 1);
    let first = backup(&repo, &mut MemSource::new(a.clone()), Mode::Full, 2);

    // A backup starts and sees the chunks of `first` as reusable...
    let mut session = BackupSession::new(&repo, &BackupOptions::default()).unwrap();
    // ...then `first` is pruned and a GC condemns its packs.
    repo.delete_snapshot(&first).unwrap();
    let r = gc_now(&repo, 0.5);
    assert!(r.packs_condemned >= 1, "{r:?}");
    // The backup in flight holds the deletion back, whatever the grace.
    let r = gc_now(&repo, 0.5);
    assert_eq!(r.packs_deleted, 0, "{r:?}");
    assert!(
        r.packs_waiting >= 1 && r.sessions_in_flight.len() == 1,
        "{r:?}"
    );

    // The backup reuses every condemned chunk (it loaded the index before
    // the condemnation) and finishes.
    session
        .backup_disk("image", &mut MemSource::new(a.clone()), Mode::Full)
        .unwrap();
    let second = session
        .finish(SnapshotMeta {
            source: "img".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(second.stats.chunks_new, 0, "{:?}", second.stats);
    assert!(second.stats.chunks_reused > 0);

    // The next GC finds them live again and keeps them.
    let r = gc_now(&repo, 0.5);
    assert_eq!(r.packs_deleted, 0, "{r:?}");
    assert!(r.packs_resurrected >= 1, "{r:?}");
    check(&repo, &second, &a, dir.path());
    // And later runs change nothing.
    let before = data_bytes(&repo);
    for _ in 0..2 {
        let r = gc_now(&repo, 0.5);
        assert_eq!((r.packs_deleted, r.packs_condemned), (0, 0), "{r:?}");
    }
    assert_eq!(data_bytes(&repo), before);
    check(&repo, &second, &a, dir.path());
}

#[test]
fn a_backup_after_the_condemnation_stores_the_chunks_again() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let a = random(4 << 20, 2);
    let first = backup(&repo, &mut MemSource::new(a.clone()), Mode::Full, 2);
    let stored = data_bytes(&repo);
    repo.delete_snapshot(&first).unwrap();
    let r = gc_now(&repo, 0.5);
    assert!(r.packs_condemned >= 1, "{r:?}");

    // Started after the record: the condemned chunks are not reused.
    let second = backup(&repo, &mut MemSource::new(a.clone()), Mode::Full, 2);
    assert!(second.stats.chunks_new > 0, "{:?}", second.stats);
    assert_eq!(second.stats.chunks_reused, 0, "{:?}", second.stats);

    let r = gc_now(&repo, 0.5);
    assert_eq!(r.packs_resurrected, 0, "{r:?}");
    assert!(r.packs_deleted >= 1, "{r:?}");
    assert!(r.index_objects_rewritten >= 1, "{r:?}");
    assert_eq!(data_bytes(&repo), stored, "one copy of the data is left");
    check(&repo, &second, &a, dir.path());
}

#[test]
fn two_runs_with_no_grace_reclaim_everything_unreferenced() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let keep = random(3 << 20, 3);
    let kept = backup(&repo, &mut MemSource::new(keep.clone()), Mode::Full, 2);
    let live = data_bytes(&repo);
    let mut gone = Vec::new();
    for seed in 10..13 {
        gone.push(backup(
            &repo,
            &mut MemSource::new(random(2 << 20, seed)),
            Mode::Full,
            2,
        ));
    }
    assert!(data_bytes(&repo) > live + (6 << 20));
    for s in &gone {
        repo.delete_snapshot(s).unwrap();
    }
    // A dry run changes nothing.
    let dry = gc::run(
        &repo,
        &GcOptions {
            grace: Duration::zero(),
            dry_run: true,
            ..Default::default()
        },
        &|_| {},
    )
    .unwrap();
    assert!(dry.packs_condemned >= 3, "{dry:?}");
    assert!(repo.backend().list("gc/").unwrap().is_empty());
    let r1 = gc_now(&repo, 0.5);
    let r2 = gc_now(&repo, 0.5);
    assert_eq!(r1.packs_condemned, dry.packs_condemned);
    assert_eq!(r2.packs_deleted, r1.packs_condemned, "{r2:?}");
    assert_eq!(
        data_bytes(&repo),
        live,
        "only the kept snapshot's packs remain"
    );
    assert!(
        repo.backend().list("gc/").unwrap().is_empty(),
        "records and locks gone"
    );
    assert!(repo.backend().list("sessions/").unwrap().is_empty());
    check(&repo, &kept, &keep, dir.path());
}

#[test]
fn repacking_keeps_live_chunks_and_frees_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    // One backup of two sources interleaved in 256 KiB stripes, so packs
    // mix chunks that stay live with chunks that die.
    let (x, y) = (random(8 << 20, 4), random(8 << 20, 5));
    let mut mixed = Vec::with_capacity(16 << 20);
    for (cx, cy) in x.chunks(256 << 10).zip(y.chunks(256 << 10)) {
        mixed.extend_from_slice(cx);
        mixed.extend_from_slice(cy);
    }
    let both = backup(&repo, &mut MemSource::new(mixed), Mode::Full, 2);
    // The second snapshot holds only x's stripes (y's zeroed): most of its
    // chunks are new, but any chunk wholly inside an x stripe is shared.
    let mut only_x = Vec::with_capacity(16 << 20);
    for cx in x.chunks(256 << 10) {
        only_x.extend_from_slice(cx);
        only_x.extend_from_slice(&[0u8; 256 << 10]);
    }
    let kept = backup(&repo, &mut MemSource::new(only_x.clone()), Mode::Full, 2);
    assert!(kept.stats.chunks_reused > 0, "{:?}", kept.stats);
    let before = data_bytes(&repo);
    repo.delete_snapshot(&both).unwrap();

    let r1 = gc_now(&repo, 1.0);
    assert!(r1.packs_repacked >= 1, "{r1:?}");
    check(&repo, &kept, &only_x, dir.path());
    let r2 = gc_now(&repo, 1.0);
    assert_eq!(r2.packs_deleted, r1.packs_condemned, "{r2:?}");
    assert!(data_bytes(&repo) < before);
    check(&repo, &kept, &only_x, dir.path());
    // Nothing is left to reclaim.
    let r3 = gc_now(&repo, 1.0);
    assert_eq!((r3.packs_condemned, r3.packs_deleted), (0, 0), "{r3:?}");
}

/// The mark phase reads one chunk list at a time into a table of the
/// index. On a history of many snapshots sharing chunks (random edits of
/// two random disks, every third snapshot pruned), it must mark exactly
/// what the full mark held (the set of every listed chunk list's ids), and
/// condemn or repack exactly the packs the old rules over that set and
/// every index object's blob lists did.
#[test]
fn streaming_mark_equals_the_full_mark() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let bases = [random(2 << 20, 40), random(3 << 20, 41)];
    let mut r = rng(42);
    let mut snaps = Vec::new();
    for k in 0..14 {
        let mut img = bases[k % 2].clone();
        for _ in 0..r.gen_range(1..4) {
            let at = r.gen_range(0..img.len() - (96 << 10));
            r.fill_bytes(&mut img[at..at + (96 << 10)]);
        }
        snaps.push(backup(&repo, &mut MemSource::new(img), Mode::Full, 2));
    }
    for s in snaps.iter().step_by(3) {
        repo.delete_snapshot(s).unwrap();
    }

    // The old full mark, and each pack's live and chunk bytes by the old rule.
    let mut full = BTreeSet::new();
    for s in repo.snapshots().unwrap() {
        let list = repo.load_chunk_list(&s.disks[0].chunk_list).unwrap();
        full.extend(list.extents().iter().filter_map(|e| e.chunk));
    }
    let mut bytes: BTreeMap<Id, (u64, u64)> = BTreeMap::new();
    for o in repo.backend().list("index/").unwrap() {
        let got = repo.backend().get(&o.name).unwrap();
        for p in index::open(repo.keys(), &got, &o.name).unwrap() {
            let e = bytes.entry(p.id).or_default();
            for b in &p.blobs {
                e.1 += u64::from(b.len);
                if full.contains(&b.id) {
                    e.0 += u64::from(b.len);
                }
            }
        }
    }
    let opts = GcOptions {
        grace: Duration::zero(),
        repack_below: 0.6,
        dry_run: true,
    };
    let plan = GcPlan::compute(&repo, &opts, &|_| {}).unwrap();
    let marked: BTreeSet<Id> = plan.live_chunks().collect();
    assert_eq!(marked, full);
    assert_eq!(plan.report().live_chunks, full.len());
    assert!(repo.index().unwrap().len() > full.len(), "some chunks died");

    let want: BTreeMap<Id, Action> = bytes
        .iter()
        .filter_map(|(p, &(live, all))| {
            let a = if live == 0 {
                Action::Condemn
            } else if (live as f64) < opts.repack_below * all as f64 {
                Action::Repack { live_bytes: live }
            } else {
                return None;
            };
            Some((*p, a))
        })
        .collect();
    let got: BTreeMap<Id, Action> = plan
        .actions
        .iter()
        .map(|a| (a.pack, a.action.clone()))
        .collect();
    assert!(want.values().any(|a| *a == Action::Condemn), "{want:?}");
    assert!(
        want.values().any(|a| matches!(a, Action::Repack { .. })),
        "{want:?}"
    );
    assert_eq!(got, want);
}

/// Index compaction beside a writer: a thread backs up through its own
/// handle on the repository (as another host would) while compactions run
/// in a loop. No entry is lost: every pack in the bucket is indexed after,
/// every snapshot restores bit-identical and verifies, and the index is
/// held in fewer objects than were written.
#[test]
fn index_compaction_beside_a_writer_loses_no_entry() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let mut kept = random_backups(&repo, 50..56);
    let objects_before = repo.backend().list(layout::INDEX).unwrap().len();
    let writing = std::sync::atomic::AtomicBool::new(true);
    let (written, merged) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let backend = std::sync::Arc::new(LocalBackend::new(dir.path().join("repo")));
            let other = Repository::open(backend, &Secret::Passphrase(PW.into())).unwrap();
            let out = random_backups(&other, 60..72);
            writing.store(false, std::sync::atomic::Ordering::SeqCst);
            out
        });
        let (mut runs, mut merged) = (0, 0);
        while writing.load(std::sync::atomic::Ordering::SeqCst) || runs < 2 {
            merged += gc::compact_index(&repo).unwrap().merged;
            runs += 1;
        }
        (writer.join().unwrap(), merged)
    });
    assert!(merged >= objects_before, "merged {merged}");
    let objects_written = objects_before + written.len();
    kept.extend(written);

    repo.invalidate_index();
    let index = repo.index().unwrap();
    let indexed: BTreeSet<Id> = index.packs().iter().map(|p| p.id).collect();
    let stored: BTreeSet<Id> = repo
        .backend()
        .list(layout::DATA)
        .unwrap()
        .iter()
        .filter_map(|o| layout::pack_id(&o.name))
        .collect();
    assert_eq!(indexed, stored, "every pack stored is indexed");
    let objects_after = repo.backend().list(layout::INDEX).unwrap().len();
    assert!(
        objects_after < objects_written,
        "{objects_after} index objects of {objects_written} written"
    );
    for (snap, data) in &kept {
        let got = restore(&repo, snap, &dir.path().join("check.raw")).unwrap();
        assert!(
            got == *data,
            "snapshot {} restores different bytes",
            snap.id
        );
    }
    let all = repo.snapshots().unwrap();
    assert_eq!(all.len(), kept.len());
    let report = bulwark_store::maintain::verify::verify(&repo, &all, 2, &|_| {}).unwrap();
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
}

/// A backup of 1 MiB of random data per seed, with its data.
fn random_backups(
    repo: &Repository,
    seeds: std::ops::Range<u64>,
) -> Vec<(bulwark_store::Snapshot, Vec<u8>)> {
    seeds
        .map(|seed| {
            let data = random(1 << 20, seed);
            let snap = backup(repo, &mut MemSource::new(data.clone()), Mode::Full, 2);
            (snap, data)
        })
        .collect()
}
