//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use bulwark_store::read::restore::{restore_to_file, RestoreOptions};
use bulwark_store::{
    BackupOptions, BackupSession, ChunkerParams, KdfParams, LocalBackend, Mode, RepoConfig,
    Repository, Secret, Snapshot, SnapshotMeta,
};
use rand::{RngCore, SeedableRng};

pub const PW: &str = "correct horse";

pub fn small_config() -> RepoConfig {
    RepoConfig {
        chunker: ChunkerParams {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        },
        pack_size: 1 << 20,
        ..RepoConfig::default()
    }
}

pub fn cheap_kdf() -> KdfParams {
    KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    }
}

pub fn new_repo(dir: &Path) -> Repository {
    let backend = Arc::new(LocalBackend::new(dir.join("repo")));
    Repository::init(
        backend,
        &Secret::Passphrase(PW.into()),
        &cheap_kdf(),
        small_config(),
    )
    .unwrap()
}

pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng(seed).fill_bytes(&mut v);
    v
}

pub fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut r = rng(seed);
    let words = [
        "alpha ", "beta ", "gamma ", "delta\n", "backup ", "restore ",
    ];
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(words[(r.next_u32() % 6) as usize].as_bytes());
    }
    v.truncate(len);
    v
}

pub fn backup(
    repo: &Repository,
    src: &mut dyn bulwark_store::BlockSource,
    mode: Mode<'_>,
    threads: usize,
) -> Snapshot {
    let mut s = BackupSession::new(
        repo,
        &BackupOptions {
            threads,
            uploaders: 2,
        },
    )
    .unwrap();
    s.backup_disk("image", src, mode).unwrap();
    s.finish(SnapshotMeta {
        source: "img".into(),
        ..Default::default()
    })
    .unwrap()
}

pub fn restore(repo: &Repository, snap: &Snapshot, out: &Path) -> bulwark_store::Result<Vec<u8>> {
    let list = repo.load_chunk_list(&snap.disks[0].chunk_list)?;
    let f = File::create(out).unwrap();
    f.set_len(snap.disks[0].size).unwrap();
    restore_to_file(repo, &list, &f, &RestoreOptions::default(), &|_| {})?;
    Ok(std::fs::read(out).unwrap())
}
