//! Damaged and hostile images: random bytes written over the blocks a walk
//! of the pristine image reads (superblocks, group descriptors, inode
//! tables, extent and btree blocks, directory blocks, partition tables,
//! LVM metadata) must end in errors, never a panic or a hang.
//!
//! Each round mutates a copy, then discovers volumes, walks every tree and
//! reads every file, in a thread with a deadline. Seeds are printed: a
//! failure is reproducible with `FSREAD_FUZZ_SEED`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fsread::{Content, Kind, Node, ReadAt, Tree};
use rand::{Rng, SeedableRng};
use testbed::fsimage::{self, Caps};

/// Rounds per filesystem (each a full walk of a damaged copy).
const ROUNDS: u64 = 400;
/// A walk of these small images takes milliseconds; this is a hang.
const DEADLINE: Duration = Duration::from_secs(20);

/// Records which 512-byte sectors are read.
struct Recorder {
    data: Vec<u8>,
    seen: Mutex<BTreeSet<u64>>,
}

impl ReadAt for Recorder {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut s = self.seen.lock().unwrap();
        for sector in offset / 512..(offset + buf.len() as u64).div_ceil(512) {
            s.insert(sector);
        }
        self.data.as_slice().read_at(offset, buf)
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
}

/// The pristine image with some bytes changed.
struct Patched {
    base: Arc<Recorder>,
    patches: BTreeMap<u64, u8>,
}

impl ReadAt for Patched {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.base.data.as_slice().read_at(offset, buf)?;
        for (at, v) in self.patches.range(offset..offset + buf.len() as u64) {
            buf[(at - offset) as usize] = *v;
        }
        Ok(())
    }
    fn size(&self) -> u64 {
        self.base.data.len() as u64
    }
}

/// Discovers, walks and reads everything; the number of errors met.
fn exercise(dev: Arc<dyn ReadAt>) -> usize {
    let mut errors = 0;
    for v in fsread::discover(&[("vda".into(), dev)]) {
        if !matches!(v.content, Content::Fs(_) | Content::Damaged(_)) {
            continue;
        }
        let Ok(tree) = v.tree() else {
            errors += 1;
            continue;
        };
        match tree.root() {
            Ok(root) => errors += walk(tree.as_ref(), &root, &mut BTreeSet::new(), 0),
            Err(_) => errors += 1,
        }
    }
    errors
}

fn walk(tree: &dyn Tree, dir: &Node, seen: &mut BTreeSet<u64>, depth: usize) -> usize {
    if depth > 64 || !seen.insert(dir.id) {
        return 1;
    }
    let entries = match tree.list(dir) {
        Ok(e) => e,
        Err(_) => return 1,
    };
    let mut errors = 0;
    let mut buf = vec![0u8; 1 << 20];
    for e in entries {
        match e.node.meta.kind {
            Kind::Dir => errors += walk(tree, &e.node, seen, depth + 1),
            Kind::Symlink => errors += usize::from(tree.read_link(&e.node).is_err()),
            Kind::File => {
                // Sizes are the image's word: read at most 64 MiB of each.
                let mut off = 0u64;
                while off < e.node.meta.size.min(64 << 20) {
                    match tree.read(&e.node, off, &mut buf) {
                        Ok(0) => break,
                        Ok(n) => off += n as u64,
                        Err(_) => {
                            errors += 1;
                            break;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    errors
}

fn fuzz(name: &str, caps: Caps, make: impl Fn(&Path, &Path)) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    fsimage::populate(
        &src,
        Caps {
            big_sparse: false,
            ..caps
        },
    )
    .unwrap();
    let img = t.path().join("img");
    make(&src, &img);
    let rec = Arc::new(Recorder {
        data: std::fs::read(&img).unwrap(),
        seen: Mutex::new(BTreeSet::new()),
    });
    assert_eq!(
        exercise(rec.clone()),
        0,
        "{name}: the pristine image reads without errors"
    );
    let sectors: Vec<u64> = rec.seen.lock().unwrap().iter().copied().collect();
    let base: u64 = std::env::var("FSREAD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::random::<u32>() as u64);
    let mut errors = 0;
    for round in 0..ROUNDS {
        let seed = base + round;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // A few sectors, a few bytes each (damage that still parses far
        // enough to reach the deeper structures), or one sector of noise.
        let mut patches = BTreeMap::new();
        if round % 4 == 3 {
            let s = sectors[rng.gen_range(0..sectors.len())];
            patches.extend((0..512).map(|i| (s * 512 + i, rng.gen::<u8>())));
        }
        for _ in 0..rng.gen_range(1..=4) {
            let s = sectors[rng.gen_range(0..sectors.len())];
            for _ in 0..rng.gen_range(1..=8) {
                let value = match rng.gen_range(0..4) {
                    0 => 0,
                    1 => 0xFF,
                    _ => rng.gen(),
                };
                patches.insert(s * 512 + rng.gen_range(0..512), value);
            }
        }
        let data = Patched {
            base: rec.clone(),
            patches,
        };
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(move || exercise(Arc::new(data)));
            let _ = tx.send(r);
        });
        match rx.recv_timeout(DEADLINE) {
            Ok(Ok(n)) => errors += n,
            Ok(Err(_)) => panic!("{name}: panicked on seed {seed} (FSREAD_FUZZ_SEED={seed})"),
            Err(_) => panic!(
                "{name}: no answer after {:?} on seed {seed}",
                started.elapsed()
            ),
        }
    }
    eprintln!(
        "{name}: {ROUNDS} damaged copies from seed {base}: {errors} errors met, no panic, no hang"
    );
}

#[test]
fn ext4_damaged() {
    fuzz("ext4", fsimage::EXT4, |s, i| {
        fsimage::ext4(s, i, 16 << 20, "KNOWN", &["-b", "1024"]).unwrap()
    });
}

#[test]
fn ext3_damaged() {
    fuzz("ext3", fsimage::EXT4, |s, i| {
        fsimage::ext4(s, i, 16 << 20, "KNOWN", &["-t", "ext3"]).unwrap()
    });
}

#[test]
fn xfs_damaged() {
    fuzz("xfs", fsimage::XFS, |s, i| {
        fsimage::xfs(s, i, 300 << 20, "KNOWN").unwrap()
    });
}

#[test]
fn vfat_damaged() {
    fuzz("vfat", fsimage::VFAT, |s, i| {
        fsimage::vfat(s, i, 40 << 20, "KNOWN").unwrap()
    });
}

#[test]
fn ntfs_damaged() {
    fuzz("ntfs", fsimage::NTFS, |s, i| {
        fsimage::ntfs(s, i, 16 << 20, "KNOWN").unwrap()
    });
}

/// Partition tables and LVM metadata: an MBR disk with an LVM PV holding
/// an ext4 volume.
#[test]
fn partitions_and_lvm_damaged() {
    fuzz("mbr+lvm", fsimage::EXT4, |s, i| {
        let fs = i.with_extension("ext4");
        fsimage::ext4(s, &fs, 16 << 20, "KNOWN", &[]).unwrap();
        fsimage::make_file(i, 40 << 20).unwrap();
        let off = fsimage::partition(i, "dos", &[(36, "8e")]).unwrap();
        let vg = format!("fz{}", std::process::id());
        let lvs = fsimage::lvm(i, off[0], 36 << 20, &vg, &[("root", 16)]).unwrap();
        fsimage::place(&fs, i, lvs[0].offset).unwrap();
    });
}
