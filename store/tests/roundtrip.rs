//! The repository end to end on real files in a temp dir: backup, restore,
//! dedup, incremental, wrong keys and damage.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bulwark_store::backup::source::MemSource;
use bulwark_store::{ChunkList, Error, ImageFile, LocalBackend, Mode, Repository, Secret, Span};
use rand::RngCore;

mod common;
use common::*;

#[test]
fn sparse_image_file_roundtrips_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    // 24 MiB: holes, explicit zero runs, random and text data.
    let img = dir.path().join("disk.raw");
    let f = File::create(&img).unwrap();
    f.set_len(24 << 20).unwrap();
    f.write_all_at(&random(3 << 20, 1), 1 << 20).unwrap();
    f.write_all_at(&vec![0u8; 2 << 20], 5 << 20).unwrap();
    f.write_all_at(&text(4 << 20, 2), 9 << 20).unwrap();
    f.write_all_at(&random(100_000, 3), 20 << 20).unwrap();
    f.write_all_at(b"tail", (24 << 20) - 4).unwrap();
    drop(f);
    let original = std::fs::read(&img).unwrap();
    for threads in [1, 3] {
        let snap = backup(
            &repo,
            &mut ImageFile::open(&img).unwrap(),
            Mode::Full,
            threads,
        );
        // Holes are not read.
        assert!(
            snap.stats.bytes_read < 16 << 20,
            "read {}",
            snap.stats.bytes_read
        );
        let out = dir.path().join(format!("restored-{threads}.raw"));
        assert!(restore(&repo, &snap, &out).unwrap() == original);
        // The restore is sparse: zero extents are not written.
        let meta = std::fs::metadata(&out).unwrap();
        let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        assert!(
            allocated < 14 << 20,
            "restored image allocates {allocated} bytes"
        );
    }
}

#[test]
fn unchanged_backup_stores_almost_nothing_and_shared_halves_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let mut a = random(8 << 20, 10);
    a.extend(text(8 << 20, 11));
    let first = backup(&repo, &mut MemSource::new(a.clone()), Mode::Full, 2);
    assert!(first.stats.bytes_new >= 15 << 20);
    let second = backup(&repo, &mut MemSource::new(a.clone()), Mode::Full, 2);
    assert!(
        second.stats.bytes_new * 100 < second.stats.bytes_read,
        "unchanged image stored {} new bytes",
        second.stats.bytes_new
    );
    // An image sharing its first half with `a`: that half's chunks are reused.
    let mut b = a[..8 << 20].to_vec();
    b.extend(random(8 << 20, 12));
    let third = backup(&repo, &mut MemSource::new(b.clone()), Mode::Full, 2);
    assert!(
        third.stats.bytes_new < (8 << 20) + (1 << 20),
        "new {}",
        third.stats.bytes_new
    );
    assert!(third.stats.bytes_new >= 8 << 20);
    let la = repo.load_chunk_list(&first.disks[0].chunk_list).unwrap();
    let lb = repo.load_chunk_list(&third.disks[0].chunk_list).unwrap();
    let ids_a: std::collections::HashSet<_> = la.extents().iter().filter_map(|e| e.chunk).collect();
    let shared: u64 = lb
        .extents()
        .iter()
        .filter(|e| e.chunk.is_some_and(|c| ids_a.contains(&c)))
        .map(|e| e.len)
        .sum();
    assert!(shared >= 7 << 20, "shared only {shared} bytes");
    assert!(restore(&repo, &third, &dir.path().join("b.raw")).unwrap() == b);
}

/// Applies writes to `data` and returns them as dirty extents.
fn scribble(data: &mut [u8], seed: u64, n: usize, len: usize) -> Vec<Span> {
    let mut r = rng(seed);
    let mut dirty = Vec::new();
    for _ in 0..n {
        let off = (r.next_u64() as usize) % (data.len() - len);
        r.fill_bytes(&mut data[off..off + len]);
        dirty.push(Span::new(off as u64, len as u64));
    }
    dirty
}

#[test]
fn incremental_reads_only_dirty_plus_resync_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let max = u64::from(repo.config().chunker.max);
    let mut disk = random(16 << 20, 20);
    disk.extend(text(16 << 20, 21));
    disk.extend(vec![0u8; 16 << 20]);
    let mut src = MemSource::new(disk.clone());
    src.holes.push(Span::new(40 << 20, 8 << 20));
    let full = backup(&repo, &mut src, Mode::Full, 2);
    let mut parent: ChunkList = repo.load_chunk_list(&full.disks[0].chunk_list).unwrap();
    let mut parent_snap = full;
    for round in 0..3u64 {
        // Writes land anywhere before the hole area (some in the zero run).
        let mut dirty = scribble(&mut disk[..40 << 20], 100 + round, 6, 40_000);
        // One write lands in the hole / zero area too.
        disk[44 << 20..(44 << 20) + 5000].fill(0x5a);
        dirty.push(Span::new(44 << 20, 5000));
        let dirty_bytes: u64 = dirty.iter().map(|d| d.len).sum();
        let mut src = MemSource::new(disk.clone());
        src.holes.push(Span::new(40 << 20, 4 << 20));
        src.holes.push(Span::new(45 << 20, 3 << 20));
        let threads = 1 + round as usize;
        let snap = backup(
            &repo,
            &mut src,
            Mode::Incremental {
                parent: &parent,
                dirty: &dirty,
            },
            threads,
        );
        let bound = dirty_bytes + dirty.len() as u64 * 2 * max;
        assert!(
            snap.stats.bytes_read <= bound && src.bytes_read <= bound,
            "round {round}: read {} > dirty {dirty_bytes} + 2 max chunks x {}",
            snap.stats.bytes_read,
            dirty.len()
        );
        let got = restore(&repo, &snap, &dir.path().join("inc.raw")).unwrap();
        assert!(got == disk, "round {round}: incremental restore differs");
        // The parent still restores to its own content (nothing shared was changed).
        assert!(restore(&repo, &parent_snap, &dir.path().join("p.raw")).is_ok());
        parent = repo.load_chunk_list(&snap.disks[0].chunk_list).unwrap();
        parent_snap = snap;
        eprintln!(
            "round {round}: dirty {dirty_bytes} read {}",
            parent_snap.stats.bytes_read
        );
    }
}

#[test]
fn wrong_passphrase_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let _ = new_repo(dir.path());
    let backend = Arc::new(LocalBackend::new(dir.path().join("repo")));
    match Repository::open(backend.clone(), &Secret::Passphrase("wrong".into())) {
        Err(Error::WrongKey) => {}
        other => panic!("expected WrongKey, got {other:?}"),
    }
    assert!(Repository::open(backend, &Secret::Passphrase(PW.into())).is_ok());
    let none = Arc::new(LocalBackend::new(dir.path().join("nothing")));
    assert!(matches!(
        Repository::open(none, &Secret::Passphrase(PW.into())),
        Err(Error::NoRepository(_))
    ));
}

#[test]
fn flipped_byte_is_found_by_verify_and_fails_restore() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let data = random(4 << 20, 30);
    let snap = backup(&repo, &mut MemSource::new(data), Mode::Full, 2);
    let all = repo.snapshots().unwrap();
    let ok = bulwark_store::maintain::verify::verify(&repo, &all, 2, &|_| {}).unwrap();
    assert!(ok.damaged.is_empty());
    assert!(ok.chunks > 10);
    // Flip one byte in the middle of a pack (inside some chunk's blob).
    let packs = repo.backend().list("data/").unwrap();
    let p = &packs[0];
    let path = dir.path().join("repo").join(&p.name);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let repo = Repository::open(repo.backend().clone(), &Secret::Passphrase(PW.into())).unwrap();
    let report = bulwark_store::maintain::verify::verify(&repo, &all, 2, &|_| {}).unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert_eq!(report.damaged[0].uses[0].snapshot, snap.id);
    let out = dir.path().join("r.raw");
    match restore(&repo, &snap, &out) {
        Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("disk offset"), "{detail}"),
        other => panic!(
            "restore of damaged snapshot must fail, got {:?}",
            other.map(|v| v.len())
        ),
    }
}

#[test]
fn disk_reader_random_reads_match_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let mut data = random(6 << 20, 40);
    data.extend(vec![0u8; 3 << 20]);
    data.extend(text(5 << 20, 41));
    let snap = backup(&repo, &mut MemSource::new(data.clone()), Mode::Full, 2);
    let repo = Arc::new(repo);
    let r = bulwark_store::read::reader::open_disk(repo.clone(), &snap, "image", 64 << 20).unwrap();
    assert_eq!(r.size(), data.len() as u64);
    let ex = r.extents(0, r.size());
    assert!(ex.iter().any(|e| !e.data && e.len >= 2 << 20), "{ex:?}");
    let mut rng = rng(42);
    let mut shared = 0;
    for _ in 0..300 {
        let off = rng.next_u64() % (data.len() as u64 - 1);
        let len = (1 + rng.next_u64() % 300_000).min(data.len() as u64 - off) as usize;
        let mut buf = vec![0xffu8; len];
        r.read_at(off, &mut buf).unwrap();
        assert!(
            buf[..] == data[off as usize..off as usize + len],
            "read {off}+{len}"
        );
        // The same through `read`, shared with the cache or copied.
        let got = r.read(off, len).unwrap();
        shared += u32::from(matches!(
            got,
            bulwark_store::read::reader::ReadData::Shared { .. }
        ));
        assert!(
            got.as_ref() == &data[off as usize..off as usize + len],
            "read {off}+{len}"
        );
    }
    assert!(
        shared > 10,
        "reads inside one chunk share it: {shared} of 300"
    );
    let st = r.stats();
    // Read-ahead: far fewer fetches than chunks read, and the cache serves most reads.
    let packs = repo.backend().list("data/").unwrap().len() as u64;
    let chunks = snap.disks[0].chunks;
    assert!(
        st.fetches <= 4 * packs && st.fetches * 4 < chunks,
        "{st:?}, {packs} packs, {chunks} chunks"
    );
    assert!(st.bytes_fetched <= 2 * snap.stats.bytes_stored, "{st:?}");
    assert!(st.cache_hits > 200, "{st:?}");
    assert!(r.read_at(data.len() as u64 - 1, &mut [0u8; 2]).is_err());
    assert!(r.read(data.len() as u64 - 1, 2).is_err());

    // Damage one pack: reads of its chunks fail, the reader keeps working.
    let packs = repo.backend().list("data/").unwrap();
    let path = dir.path().join("repo").join(&packs[0].name);
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(100).step_by(4096) {
        *b ^= 0x55;
    }
    std::fs::write(&path, &bytes).unwrap();
    let r = bulwark_store::read::reader::open_disk(repo.clone(), &snap, "image", 64 << 20).unwrap();
    let mut failures = 0;
    for off in (0..data.len() as u64).step_by(256 << 10) {
        let mut buf = vec![0u8; 4096];
        match r.read_at(off, &mut buf) {
            Ok(()) => assert!(buf[..] == data[off as usize..off as usize + 4096]),
            Err(Error::Corrupt { .. }) => failures += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(failures > 0);
}

/// Drill reports are sealed beside their snapshot: the newest per snapshot
/// is found, a wrong key cannot read them, and deleting the snapshot
/// deletes them.
#[test]
fn reports_follow_their_snapshot() {
    use bulwark_store::repo::reports::{BOOT_SET, DRILL};
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let mut src = bulwark_store::MemSource::new(random(1 << 20, 9));
    let a = backup(&repo, &mut src, Mode::Full, 1);
    let b = backup(&repo, &mut src, Mode::Full, 1);
    assert!(repo.latest_reports(DRILL).unwrap().is_empty());
    repo.put_report(DRILL, &a.id, 100, b"{\"passed\":false}")
        .unwrap();
    repo.put_report(DRILL, &a.id, 200, b"{\"passed\":true}")
        .unwrap();
    repo.put_report(DRILL, &b.id, 150, b"{\"passed\":true}")
        .unwrap();
    let all = repo.latest_reports(DRILL).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[&a.id], b"{\"passed\":true}");
    assert_eq!(
        repo.latest_report(DRILL, &a.id).unwrap().unwrap(),
        b"{\"passed\":true}"
    );
    // Sealed: the bytes on disk are not the report.
    let names = std::fs::read_dir(dir.path().join("repo/drills")).unwrap();
    for n in names {
        let raw = std::fs::read(n.unwrap().path()).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"passed"));
    }
    // A boot set of the same snapshot is another family: a drill lookup
    // never sees it, nor the other way round.
    repo.put_report(BOOT_SET, &a.id, 300, b"{\"boot_set\":[]}")
        .unwrap();
    assert_eq!(
        repo.latest_report(DRILL, &a.id).unwrap().unwrap(),
        b"{\"passed\":true}"
    );
    assert_eq!(repo.report_names(BOOT_SET).unwrap().len(), 1);
    assert!(repo
        .load_report(DRILL, &repo.report_names(BOOT_SET).unwrap()[0])
        .is_err());
    repo.delete_snapshot(&a).unwrap();
    assert!(repo.report_names(BOOT_SET).unwrap().is_empty());
    assert_eq!(repo.latest_report(DRILL, &a.id).unwrap(), None);
    assert_eq!(repo.latest_reports(DRILL).unwrap().len(), 1);
}

/// A restore or an export reads only its snapshot's part of the index
/// (`Repository::index_for`): for every chunk of the snapshot it answers
/// as the full index does (same pack, offset, length, reusability), even
/// for chunks stored twice with one copy condemned; it holds nothing else;
/// and the snapshot restores through it bit-identical.
#[test]
fn an_index_narrowed_to_a_snapshot_answers_as_the_full_index() {
    use bulwark_store::maintain::gc::{self, GcOptions};
    use std::collections::BTreeSet;
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let a = random(3 << 20, 80);
    let gone = backup(&repo, &mut MemSource::new(a.clone()), Mode::Full, 2);
    let mut b = a.clone();
    b[1 << 20..(1 << 20) + 4096].fill(7);
    let other = backup(
        &repo,
        &mut MemSource::new(random(2 << 20, 81)),
        Mode::Full,
        2,
    );
    // `a`'s packs condemned, then its chunks stored again: two copies.
    repo.delete_snapshot(&gone).unwrap();
    let zero = GcOptions {
        grace: chrono::Duration::zero(),
        ..Default::default()
    };
    gc::run(&repo, &zero, &|_| {}).unwrap();
    let kept = backup(&repo, &mut MemSource::new(b.clone()), Mode::Full, 2);

    repo.invalidate_index();
    let list = repo.load_chunk_list(&kept.disks[0].chunk_list).unwrap();
    let mine: BTreeSet<bulwark_store::Id> = bulwark_store::read::reader::chunks_of(&list).collect();
    let narrow = repo.index_for(mine.iter().copied()).unwrap();
    let full = repo.index().unwrap();
    assert_eq!(narrow.len(), mine.len());
    assert!(full.len() > narrow.len());
    // Most of `kept`'s chunks were `gone`'s too: a copy in a condemned pack.
    assert!(full.packs().iter().any(|p| full.is_condemned(&p.id)));
    for id in &mine {
        let (n, f) = (narrow.get(id).unwrap(), full.get(id).unwrap());
        assert_eq!(narrow.pack(&n).id, full.pack(&f).id, "{id}");
        assert_eq!((n.offset, n.len), (f.offset, f.len), "{id}");
        assert!(
            narrow.reusable(id) && full.reusable(id),
            "{id}: the live copy wins"
        );
    }
    let others = repo.load_chunk_list(&other.disks[0].chunk_list).unwrap();
    for id in bulwark_store::read::reader::chunks_of(&others) {
        assert!(!narrow.contains(&id), "a chunk of another snapshot");
    }
    // Loaded while the chunks are found (a server's start): the same answers.
    repo.invalidate_index();
    let (found, beside) = repo
        .index_for_found(|| {
            let list = repo.load_chunk_list(&kept.disks[0].chunk_list)?;
            let chunks = bulwark_store::read::reader::chunks_of(&list).collect();
            Ok((list.size(), chunks))
        })
        .unwrap();
    assert_eq!(found, b.len() as u64);
    assert_eq!(beside.len(), narrow.len());
    for id in &mine {
        let (x, n) = (beside.get(id).unwrap(), narrow.get(id).unwrap());
        assert_eq!(beside.pack(&x).id, narrow.pack(&n).id, "{id}");
        assert_eq!((x.offset, x.len), (n.offset, n.len), "{id}");
        assert!(beside.reusable(id), "{id}");
    }
    // A find that fails ends the load with its error (no loader left waiting).
    repo.invalidate_index();
    let Err(e) = repo.index_for_found(|| -> bulwark_store::Result<((), Vec<_>)> {
        Err(bulwark_store::Error::Invalid("no such list".into()))
    }) else {
        panic!("a failed find gave an index");
    };
    assert!(e.to_string().contains("no such list"), "{e}");
    // A restore narrows on its own (nothing cached) and gets the bytes.
    repo.invalidate_index();
    let got = restore(&repo, &kept, &dir.path().join("out.raw")).unwrap();
    assert!(got == b);
}

/// `Repository::open_at` finds what `find_snapshot` finds (a full id, whose
/// manifest it fetches while the key is unlocked, a prefix, `@latest`),
/// says a missing one is not found, and still refuses a wrong secret.
#[test]
fn open_at_finds_the_snapshot_find_snapshot_finds() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let snap = backup(
        &repo,
        &mut MemSource::new(random(1 << 20, 90)),
        Mode::Full,
        2,
    );
    let backend = || -> Arc<dyn bulwark_store::Backend> {
        Arc::new(LocalBackend::new(dir.path().join("repo")))
    };
    let secret = Secret::Passphrase(PW.into());
    let hex = snap.id.to_hex();
    for spec in [
        hex.clone(),
        hex[..8].to_string(),
        format!("{}@latest", snap.source),
    ] {
        let (r, found) = Repository::open_at(backend(), &secret, &spec).unwrap();
        assert_eq!(found.id, snap.id, "{spec}");
        assert_eq!(found.disks.len(), snap.disks.len());
        assert_eq!(r.find_snapshot(&spec).unwrap().id, snap.id);
    }
    let missing = "ab".repeat(32);
    assert!(matches!(
        Repository::open_at(backend(), &secret, &missing),
        Err(Error::SnapshotNotFound(_))
    ));
    assert!(Repository::open_at(backend(), &Secret::Passphrase("wrong".into()), &hex).is_err());

    // open_at lists the index while the key unlocks: the reader's index
    // from that listing finds every chunk of the snapshot, as a fresh one
    // does; one of a snapshot stored since is loaded from a new listing.
    let (r, found) = Repository::open_at(backend(), &secret, &hex).unwrap();
    let chunks = |s: &bulwark_store::Snapshot| -> Vec<bulwark_store::Id> {
        let list = r.load_chunk_list(&s.disks[0].chunk_list).unwrap();
        bulwark_store::read::reader::chunks_of(&list).collect()
    };
    let full = repo.index().unwrap();
    let ix = r.index_for(chunks(&found)).unwrap();
    for id in chunks(&found) {
        assert_eq!(ix.get(&id), full.get(&id), "{id}");
    }
    let (r, _) = Repository::open_at(backend(), &secret, &hex).unwrap();
    let later = backup(
        &repo,
        &mut MemSource::new(random(1 << 20, 91)),
        Mode::Full,
        2,
    );
    let ix = r.index_for(chunks(&later)).unwrap();
    for id in chunks(&later) {
        assert!(ix.contains(&id), "chunk {id} of the later snapshot");
    }
}
