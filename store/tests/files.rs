//! File snapshots in the repository's machinery: GC keeps the chunks a
//! file snapshot references (data and catalog), verify reads them, a sync
//! copies them and the replica restores the tree alone; a crafted catalog
//! with hostile paths and symlinks restores inside its target only.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use bulwark_store::files::catalog::{Catalog, Entry, Kind};
use bulwark_store::files::{self, FilesOptions};
use bulwark_store::maintain::gc::{self, GcOptions};
use bulwark_store::sync::{self, SyncOptions};
use bulwark_store::{LocalBackend, MemSource, Mode, Repository, Secret};
use chrono::Duration;

mod common;
use common::*;

fn gc_now(repo: &Repository) {
    for _ in 0..2 {
        gc::run(
            repo,
            &GcOptions {
                grace: Duration::zero(),
                repack_below: 0.5,
                dry_run: false,
            },
            &|_| {},
        )
        .unwrap();
    }
}

/// A small tree: files of random bytes, one text file, nested dirs.
fn make_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for (i, rel) in ["a/one", "a/b/two", "a/b/c/three", "top"]
        .iter()
        .enumerate()
    {
        let data = if i == 3 {
            text(100_000, 9)
        } else {
            random((i + 1) * 300_000, i as u64)
        };
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &data).unwrap();
        files.push((rel.to_string(), data));
    }
    files
}

fn assert_restores(
    repo: Repository,
    snap: &bulwark_store::Snapshot,
    src: &Path,
    files: &[(String, Vec<u8>)],
) {
    let out = tempfile::tempdir().unwrap();
    let r = files::restore::restore(Arc::new(repo), snap, &[], out.path()).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let base = out.path().join(src.strip_prefix("/").unwrap());
    for (rel, want) in files {
        let got = std::fs::read(base.join(rel)).unwrap();
        assert!(&got == want, "{rel} restores other bytes");
    }
}

#[test]
fn gc_keeps_a_file_snapshots_chunks_and_sync_copies_it() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let src = dir.path().join("tree");
    let files = make_tree(&src);
    let opts = FilesOptions {
        source: "host".into(),
        paths: vec![src.clone()],
        ..Default::default()
    };
    let b = files::backup(&repo, &opts).unwrap();
    assert!(b.errors.is_empty(), "{:?}", b.errors);
    assert_eq!(b.files, 4);
    // A disk snapshot, deleted: GC has something to remove beside the files.
    let gone = backup(
        &repo,
        &mut MemSource::new(random(2 << 20, 77)),
        Mode::Full,
        2,
    );
    repo.delete_snapshot(&gone).unwrap();
    let before: u64 = repo
        .backend()
        .list("data/")
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum();
    gc_now(&repo);
    let after: u64 = repo
        .backend()
        .list("data/")
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum();
    assert!(
        after < before - (1 << 20),
        "GC removed the deleted disk's packs"
    );
    repo.invalidate_index();
    let v = bulwark_store::maintain::verify::verify(&repo, &repo.snapshots().unwrap(), 2, &|_| {})
        .unwrap();
    assert!(v.damaged.is_empty(), "{:?}", v.damaged);

    // Sync to a replica, which restores the tree alone.
    let dst = Arc::new(LocalBackend::new(dir.path().join("replica")));
    Repository::init_replica(
        dst.clone(),
        repo.backend().as_ref(),
        &Secret::Passphrase(PW.into()),
        &Secret::Passphrase(PW.into()),
        &cheap_kdf(),
        None,
    )
    .unwrap();
    let rep = sync::run(
        repo.backend().as_ref(),
        dst.as_ref(),
        &SyncOptions::default(),
        &(),
    )
    .unwrap();
    assert_eq!(rep.snapshots_copied, 1, "{rep:?}");
    let replica = Repository::open(dst, &Secret::Passphrase(PW.into())).unwrap();
    let snap = replica.find_snapshot(&b.snapshot.id.to_hex()).unwrap();
    assert!(snap.is_files());
    assert_restores(replica, &snap, &src, &files);
    assert_restores(repo, &b.snapshot, &src, &files);
}

fn entry(path: &[u8], kind: Kind) -> Entry {
    Entry {
        path: path.to_vec(),
        kind: Some(kind),
        mode: 0o755,
        ..Default::default()
    }
}

fn file(path: &[u8], offset: u64, size: u64) -> Entry {
    Entry {
        offset,
        size,
        mode: 0o644,
        ..entry(path, Kind::File)
    }
}

fn link(path: &[u8], target: &[u8]) -> Entry {
    Entry {
        target: target.to_vec(),
        ..entry(path, Kind::Symlink)
    }
}

#[test]
fn a_hostile_catalog_restores_inside_its_target_only() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let outside_b = outside.as_os_str().as_bytes();
    let data = b"PWNED".to_vec();
    let catalog = Catalog {
        entries: vec![
            entry(b"d", Kind::Dir),
            // A symlink out, then entries through it.
            link(b"d/esc", outside_b),
            file(b"d/esc/pwned", 0, 5),
            link(b"d/up", b"../../../../../../.."),
            file(b"d/up/pwned", 0, 5),
            entry(b"d/up/newdir", Kind::Dir),
            // Paths that leave the target by name.
            file(b"../pwned", 0, 5),
            file(b"d/../../pwned", 0, 5),
            file(b"/abs-pwned", 0, 5),
            // A hard link to something outside.
            Entry {
                link: b"../../outside/x".to_vec(),
                ..file(b"d/hl", 0, 0)
            },
            // A file where the link was: replaces the link, not its target.
            file(b"d/esc", 0, 5),
            // Data past the stream's end.
            file(b"d/long", 0, 1 << 40),
            file(b"d/ok", 0, 5),
        ],
    };
    let snap = files::store_raw(&repo, "evil", &catalog, data).unwrap();
    let out = dir.path().join("out");
    let r = files::restore::restore(Arc::new(repo), &snap, &[], &out).unwrap();
    let outside_now: Vec<_> = std::fs::read_dir(&outside).unwrap().collect();
    assert!(outside_now.is_empty(), "wrote outside: {outside_now:?}");
    assert!(!dir.path().join("pwned").exists() && !Path::new("/abs-pwned").exists());
    assert!(!dir.path().parent().unwrap().join("pwned").exists());
    // The safe entries are there; the hostile ones listed.
    assert_eq!(std::fs::read(out.join("d/ok")).unwrap(), b"PWNED");
    let esc = std::fs::symlink_metadata(out.join("d/esc")).unwrap();
    assert!(esc.is_file(), "the planted link was replaced by the file");
    assert!(std::fs::symlink_metadata(out.join("d/up"))
        .unwrap()
        .is_symlink());
    let failed: Vec<&str> = r.errors.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(r.errors.len(), 8, "{:?}", r.errors);
    for p in [
        "/d/esc/pwned",
        "/d/up/pwned",
        "/d/up/newdir",
        "/d/hl",
        "/d/long",
    ] {
        assert!(failed.contains(&p), "{p} not refused: {failed:?}");
    }
}
