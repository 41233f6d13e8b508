//! The random-access read path (`DiskReader`): single flight, read-ahead
//! for sequential readers only, and damage confined to the reads that need
//! the damaged chunk.

use std::sync::{Arc, Barrier};

use bulwark_store::backend::ObjectInfo;
use bulwark_store::backup::source::MemSource;
use bulwark_store::read::reader::{open_disk, DiskReader};
use bulwark_store::{
    Backend, BackendError, Error, LocalBackend, Mode, RepoConfig, Repository, Secret, Snapshot,
};

mod common;
use common::*;

fn setup(mib: usize, seed: u64) -> (tempfile::TempDir, Arc<Repository>, Snapshot, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let data = random(mib << 20, seed);
    let snap = backup(&repo, &mut MemSource::new(data.clone()), Mode::Full, 2);
    (dir, Arc::new(repo), snap, data)
}

fn reader(repo: &Arc<Repository>, snap: &Snapshot) -> DiskReader {
    open_disk(repo.clone(), snap, "image", 256 << 20).unwrap()
}

#[test]
fn concurrent_readers_of_a_cold_range_cause_one_fetch() {
    let (_dir, repo, snap, data) = setup(8, 1);
    let r = Arc::new(reader(&repo, &snap));
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let off = 3 << 20;
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (r, barrier) = (r.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                barrier.wait();
                r.read_at(off, &mut buf).unwrap();
                buf
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap()[..] == data[off as usize..off as usize + 4096]);
    }
    let st = r.stats();
    assert_eq!(st.fetches, 1, "{st:?}");
    // Every other lookup (two per read when it straddles chunks, whose
    // boundaries depend on the repository key) was a hit or a wait.
    assert!(st.cache_hits >= n as u64 - 1, "{st:?}");
}

#[test]
fn a_damaged_chunk_fails_only_the_reads_that_need_it() {
    let (dir, repo, snap, data) = setup(4, 2);
    let list = repo.load_chunk_list(&snap.disks[0].chunk_list).unwrap();
    let index = repo.index().unwrap();
    // Damage the third chunk inside its pack: its neighbours in the same
    // pack (and ranged read) stay good.
    let victim = list.extents()[2];
    let loc = index.get(&victim.chunk.unwrap()).unwrap();
    let pack = index.pack(&loc).id.to_hex();
    let path = dir.path().join("repo/data").join(&pack[..2]).join(&pack);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[loc.offset as usize + 40] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let r = reader(&repo, &snap);
    for e in list.extents() {
        let mut buf = vec![0u8; e.len as usize];
        let got = r.read_at(e.offset, &mut buf);
        if e.offset == victim.offset {
            match got {
                Err(Error::Corrupt { detail, .. }) => {
                    assert!(
                        detail.contains(&format!("disk offset {}", e.offset)),
                        "{detail}"
                    )
                }
                other => panic!("damaged chunk read gave {other:?}"),
            }
        } else {
            got.unwrap();
            assert!(buf[..] == data[e.offset as usize..e.end() as usize]);
        }
    }
    // Again, now from the cache: the same answer.
    let mut buf = vec![0u8; 10];
    assert!(matches!(
        r.read_at(victim.offset + 5, &mut buf),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn sequential_reads_are_read_ahead_and_fetch_each_byte_once() {
    let (_dir, repo, snap, data) = setup(48, 3);
    let r = reader(&repo, &snap);
    let step = 128 << 10;
    for off in (0..data.len()).step_by(step) {
        let mut buf = vec![0u8; step];
        r.read_at(off as u64, &mut buf).unwrap();
        assert!(buf[..] == data[off..off + step]);
    }
    let st = r.stats();
    let stored = snap.stats.bytes_stored;
    assert!(st.readahead_fetches > 0, "{st:?}");
    // Most fetches are read-ahead (on a loaded host a demand read may
    // overtake the read-ahead now and then: not more than one in four).
    assert!(
        st.readahead_fetches * 4 >= st.fetches * 3,
        "demand reads should rarely wait on a fetch of their own: {st:?}"
    );
    assert!(
        st.bytes_fetched as f64 <= 1.1 * stored as f64,
        "fetched {} for {stored} stored: {st:?}",
        st.bytes_fetched
    );
    assert_eq!(st.bytes_served, data.len() as u64);
}

#[test]
fn scattered_reads_fetch_only_what_they_need() {
    let (_dir, repo, snap, data) = setup(64, 4);
    let r = reader(&repo, &snap);
    let list = repo.load_chunk_list(&snap.disks[0].chunk_list).unwrap();
    let mib = 1u64 << 20;
    // 8 MiB apart (at least 6 packs of the test repository, more than a
    // stream's reach), each read inside one chunk so it needs one span:
    // chunk boundaries depend on the repository key.
    let order = [0u64, 32, 16, 48, 8, 40, 24, 56];
    for k in order {
        let e = &list.extents()[list.find(k * mib).unwrap()];
        let off = e.offset + (e.len - 4096) / 2;
        let mut buf = vec![0u8; 4096];
        r.read_at(off, &mut buf).unwrap();
        assert!(buf[..] == data[off as usize..off as usize + 4096]);
    }
    let st = r.stats();
    assert_eq!(st.readahead_fetches, 0, "{st:?}");
    assert_eq!(st.fetches, order.len() as u64, "{st:?}");
    // One span each (a pack of the test repository is about 1 MiB).
    assert!(
        st.bytes_fetched <= order.len() as u64 * (mib + (256 << 10)),
        "{st:?}"
    );
}

/// A pass over twice as much data as the cache holds, then a second pass:
/// the first evicts what it has left behind rather than what it cached at
/// its start, so the second finds that part (plain LRU would have evicted
/// every span before the second pass reached it) and each pass still
/// fetches every byte at most about once.
#[test]
fn a_scan_larger_than_the_cache_keeps_its_start_for_the_next_pass() {
    let (_dir, repo, snap, data) = setup(48, 5);
    // 24 MiB of opened chunks for 48 MiB of data: half of it fits.
    let r = open_disk(repo.clone(), &snap, "image", 24 << 20).unwrap();
    let step = 256 << 10;
    let pass = || {
        for off in (0..data.len()).step_by(step) {
            let mut buf = vec![0u8; step];
            r.read_at(off as u64, &mut buf).unwrap();
            assert!(buf[..] == data[off..off + step]);
        }
        r.stats()
    };
    let first = pass();
    let second = pass();
    let stored = snap.stats.bytes_stored;
    let second_fetched = second.bytes_fetched - first.bytes_fetched;
    assert!(
        first.bytes_fetched as f64 <= 1.1 * stored as f64,
        "first pass fetched {} for {stored} stored",
        first.bytes_fetched
    );
    assert!(
        (second_fetched as f64) < 0.85 * stored as f64,
        "the second pass found nothing of the first in the cache: fetched {second_fetched} \
         for {stored} stored ({second:?})"
    );
    assert!(second.cache_hits > first.cache_hits, "{first:?} {second:?}");
}

/// A reader started before a GC repacked and swept its snapshot's packs
/// (a live restore beside `gc --grace 0s`, twice) reads the chunks' new
/// copies instead of failing.
#[test]
fn a_reader_follows_chunks_a_gc_repacked_and_swept() {
    use bulwark_store::maintain::gc::{self, GcOptions};
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(new_repo(dir.path()));
    // Packs mix the kept snapshot's chunks with chunks that die: 256 KiB
    // stripes of two sources, the second then zeroed.
    let (x, y) = (random(8 << 20, 11), random(8 << 20, 12));
    let mut mixed = Vec::with_capacity(16 << 20);
    let mut only_x = Vec::with_capacity(16 << 20);
    for (cx, cy) in x.chunks(256 << 10).zip(y.chunks(256 << 10)) {
        mixed.extend_from_slice(cx);
        mixed.extend_from_slice(cy);
        only_x.extend_from_slice(cx);
        only_x.extend_from_slice(&[0u8; 256 << 10]);
    }
    let both = backup(&repo, &mut MemSource::new(mixed), Mode::Full, 2);
    let kept = backup(&repo, &mut MemSource::new(only_x.clone()), Mode::Full, 2);
    let packs_before: Vec<String> = repo
        .backend()
        .list("data/")
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();

    // The reader plans its spans now, against the packs as they are.
    let r = reader(&repo, &kept);
    let mut first = vec![0u8; 64 << 10];
    r.read_at(0, &mut first).unwrap();
    assert!(first[..] == only_x[..64 << 10]);

    repo.delete_snapshot(&both).unwrap();
    let opts = GcOptions {
        grace: chrono::Duration::zero(),
        repack_below: 1.0,
        dry_run: false,
    };
    let r1 = gc::run(&repo, &opts, &|_| {}).unwrap();
    assert!(r1.packs_repacked >= 1, "{r1:?}");
    let r2 = gc::run(&repo, &opts, &|_| {}).unwrap();
    assert!(r2.packs_deleted >= 1, "{r2:?}");
    let left: Vec<String> = repo
        .backend()
        .list("data/")
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert!(
        packs_before.iter().any(|p| !left.contains(p)),
        "the GC deleted none of the packs the reader planned against"
    );

    // Every byte, through the reader planned before the GC, in 1 MiB reads
    // from the end backwards (nothing was read ahead).
    let mut got = vec![0u8; only_x.len()];
    for (k, piece) in got.chunks_mut(1 << 20).enumerate().rev() {
        r.read_at((k as u64) << 20, piece).unwrap();
    }
    assert!(got == only_x, "bytes read after the GC differ");
}

/// A local repository whose ranged reads take a while and that wants many
/// in flight (as S3 does): read-ahead threads all busy at once.
#[derive(Debug)]
struct Slow(LocalBackend);

impl Backend for Slow {
    fn location(&self) -> String {
        self.0.location()
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        self.0.put(name, data)
    }
    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        self.0.get(name)
    }
    fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        std::thread::sleep(std::time::Duration::from_millis(20));
        self.0.get_range_into(name, offset, len, buf)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.0.list(prefix)
    }
    fn delete(&self, name: &str) -> Result<(), BackendError> {
        self.0.delete(name)
    }
    fn read_concurrency(&self) -> usize {
        16
    }
}

/// A boot set four times the cache queued at once, then read through: the
/// read-ahead in flight (16 threads, 4 MiB ranged reads) and the idle fetch
/// buffers are counted with the cache, and fetches that would overflow it
/// wait; unbounded, 16 reads of 4 MiB plus their opened chunks would hold
/// 128 MiB at once.
#[test]
fn read_ahead_in_flight_stays_within_the_cache_budget() {
    let dir = tempfile::tempdir().unwrap();
    let config = RepoConfig {
        pack_size: 16 << 20,
        ..small_config()
    };
    let secret = Secret::Passphrase(PW.into());
    let local = || LocalBackend::new(dir.path().join("repo"));
    let repo = Repository::init(Arc::new(local()), &secret, &cheap_kdf(), config).unwrap();
    let data = random(128 << 20, 13);
    let snap = backup(&repo, &mut MemSource::new(data.clone()), Mode::Full, 2);
    let repo = Arc::new(Repository::open(Arc::new(Slow(local())), &secret).unwrap());
    let budget = 32u64 << 20;
    let r = open_disk(repo, &snap, "image", budget as usize).unwrap();
    let queued = r.prefetch_in_order(&[(0, data.len() as u64)]);
    assert_eq!(queued, snap.stats.bytes_stored, "the whole disk is queued");
    let mut got = vec![0u8; data.len()];
    for (k, piece) in got.chunks_mut(1 << 20).enumerate() {
        r.read_at((k as u64) << 20, piece).unwrap();
    }
    assert!(got == data, "bytes read differ");
    let st = r.stats();
    assert!(st.readahead_fetches >= 8, "{st:?}");
    assert!(
        st.peak_bytes > budget / 2,
        "the budget was never used: {st:?}"
    );
    assert!(
        st.peak_bytes <= budget,
        "held {} MiB at once for a budget of 32 MiB: {st:?}",
        st.peak_bytes >> 20
    );
}

/// A boot set's pack ranges fetched before the reader opens: the reads and
/// the read-ahead of its spans take them instead of fetching, byte for byte
/// the same; a range of a pack that is gone is not there, and its span is
/// fetched as before.
#[test]
fn spans_are_taken_from_pack_ranges_fetched_ahead() {
    use bulwark_store::read::seed::Seeds;
    let (_dir, repo, snap, data) = setup(16, 21);
    // Where a first reader finds the data of two scattered ranges.
    let boot = [(0u64, 4096u64), (9 << 20, 200 << 10)];
    let ranges = reader(&repo, &snap).pack_ranges(&boot, 1 << 20);
    assert!(!ranges.is_empty());
    let bytes: u64 = ranges.iter().map(|r| r.2).sum();

    let seeds = Seeds::new();
    seeds.fetch(repo.backend().clone(), &ranges, 4);
    let r = reader(&repo, &snap);
    r.take_from(seeds.clone());
    for &(off, len) in &boot {
        let mut buf = vec![0u8; len as usize];
        r.read_at(off, &mut buf).unwrap();
        assert!(buf[..] == data[off as usize..(off + len) as usize]);
    }
    let st = r.stats();
    assert_eq!((st.fetches, st.bytes_fetched), (0, 0), "{st:?}");
    assert_eq!(st.seeded_bytes, bytes, "{st:?}");
    assert_eq!(seeds.held(), 0, "every range taken once and let go");

    // Queued in order (a boot set's read-ahead): taken the same way.
    let seeds = Seeds::new();
    seeds.fetch(repo.backend().clone(), &ranges, 4);
    let r = reader(&repo, &snap);
    r.take_from(seeds.clone());
    r.prefetch_in_order(&boot);
    let mut buf = vec![0u8; 200 << 10];
    r.read_at(9 << 20, &mut buf).unwrap();
    assert!(buf[..] == data[9 << 20..(9 << 20) + (200 << 10)]);
    let wait = std::time::Instant::now();
    while r.stats().seeded_bytes < bytes && wait.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(r.stats().seeded_bytes, bytes, "{:?}", r.stats());
    assert_eq!(r.stats().bytes_fetched, 0, "{:?}", r.stats());

    // A pack that is gone: its ranges fail and the reader fetches.
    let seeds = Seeds::new();
    let gone: Vec<_> = ranges
        .iter()
        .map(|&(_, s, l)| (bulwark_store::Id::random(), s, l))
        .collect();
    seeds.fetch(repo.backend().clone(), &gone, 4);
    let r = reader(&repo, &snap);
    r.take_from(seeds);
    let mut buf = vec![0u8; 4096];
    r.read_at(0, &mut buf).unwrap();
    assert!(buf[..] == data[..4096]);
    assert_eq!(r.stats().seeded_bytes, 0);
    assert!(r.stats().bytes_fetched > 0);
}

/// A file restore tells its watcher (a live restore's server) each range
/// once the bytes are in the file: the zero extents at once (holes of the
/// new file), each chunk after it is written; `starting` comes before the
/// file is opened, so a watcher forgets an earlier pass first. What it was
/// told covers the disk, and the file reads right at every range told.
#[test]
fn a_watched_file_restore_tells_each_range_once_it_is_in_the_file() {
    use bulwark_store::read::restore::{restore_to_path_watched, Overwrite, RestoreOptions, Watch};
    use std::os::unix::fs::FileExt;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Told {
        events: Mutex<Vec<&'static str>>,
        file: Mutex<Option<std::fs::File>>,
        ranges: Mutex<Vec<(u64, Vec<u8>)>>,
    }
    impl Watch for Told {
        fn starting(&self) {
            self.events.lock().unwrap().push("starting");
        }
        fn opened(&self, file: &std::fs::File) {
            self.events.lock().unwrap().push("opened");
            *self.file.lock().unwrap() = Some(file.try_clone().unwrap());
        }
        fn wrote(&self, offset: u64, len: u64) {
            // Read back at once, through our own descriptor.
            let f = self.file.lock().unwrap();
            let mut b = vec![0u8; len as usize];
            f.as_ref().unwrap().read_exact_at(&mut b, offset).unwrap();
            self.ranges.lock().unwrap().push((offset, b));
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(&dir.path().join("repo"));
    // Data, a zero stretch, data.
    let mut data = random(6 << 20, 31);
    data[2 << 20..4 << 20].fill(0);
    let snap = backup(&repo, &mut MemSource::new(data.clone()), Mode::Full, 2);
    let list = repo.load_chunk_list(&snap.disks[0].chunk_list).unwrap();
    let to = dir.path().join("out.raw");
    let told = Told::default();
    restore_to_path_watched(
        &repo,
        &list,
        snap.disks[0].size,
        &to,
        Overwrite::Never,
        &RestoreOptions::default(),
        &|_| {},
        &told,
    )
    .unwrap();
    assert_eq!(told.events.lock().unwrap()[..], ["starting", "opened"]);
    let out = std::fs::read(&to).unwrap();
    assert!(out == data);
    let mut ranges = told.ranges.lock().unwrap().clone();
    ranges.sort();
    let mut at = 0;
    for (offset, bytes) in &ranges {
        assert_eq!(*offset, at, "told ranges leave a gap or overlap at {at}");
        let end = at as usize + bytes.len();
        assert!(
            bytes[..] == data[at as usize..end],
            "not in the file when told, at {at}"
        );
        at = end as u64;
    }
    assert_eq!(at, data.len() as u64, "told ranges cover the disk");
    assert!(
        ranges.len() == list.extents().len(),
        "each extent once: {} told, {} extents",
        ranges.len(),
        list.extents().len()
    );
}
