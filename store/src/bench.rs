//! `bulwark benchmark`: single-core throughput of each primitive and of the
//! whole backup pipeline on the same data, so the pipeline can be judged
//! against the serial bound of its own parts (like
//! `proxmox-backup-client benchmark`).

use std::sync::Arc;
use std::time::Instant;

use rand::{RngCore, SeedableRng};

use crate::backend::{Backend, BackendError, ObjectInfo};
use crate::backup::source::MemSource;
use crate::error::Result;
use crate::format::crypto::{Keys, MasterKey, Opener};
use crate::format::keys::{KdfParams, Secret};
use crate::repo::{RepoConfig, Repository};
use crate::{BackupOptions, BackupSession, Mode, SnapshotMeta};

/// Throughput of one measured step, in bytes of input per second.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Figure {
    pub name: String,
    pub mib_per_s: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub data_mib: u64,
    pub primitives: Vec<Figure>,
    /// Serial bound: the data through CDC + HMAC + zstd + AES-GCM seal, one
    /// after the other on one core (seal applied to the compressed bytes,
    /// as the pipeline does).
    pub serial_bound_mib_per_s: f64,
    pub pipeline_1_core_mib_per_s: f64,
    pub pipeline_all_cores_mib_per_s: f64,
    pub cores: usize,
    pub pipeline_1_core_percent_of_bound: f64,
}

/// Mixed test data: half random, half text-like, no zero runs (zeros skip
/// every primitive and would flatter the pipeline).
pub fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    let words: &[&[u8]] = &[
        b"the ",
        b"backup ",
        b"of ",
        b"virtual ",
        b"machine ",
        b"disk ",
        b"block ",
        b"chunk ",
        b"restore ",
        b"snapshot ",
        b"\n",
        b"2026-11-23 ",
        b"INFO ",
        b"error=0 ",
    ];
    let mut pos = 0;
    while pos < len {
        let seg = (1 << 20).min(len - pos);
        if (pos >> 20) % 2 == 0 {
            rng.fill_bytes(&mut out[pos..pos + seg]);
        } else {
            let mut p = pos;
            while p < pos + seg {
                let w = words[(rng.next_u32() as usize) % words.len()];
                let n = w.len().min(pos + seg - p);
                out[p..p + n].copy_from_slice(&w[..n]);
                p += n;
            }
        }
        pos += seg;
    }
    out
}

fn rate(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

/// Best of `rounds` runs of `f`, in seconds.
fn best(rounds: usize, mut f: impl FnMut()) -> f64 {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// Discards data: the pipeline measured without storage speed in the way.
#[derive(Debug)]
struct NullBackend;

impl Backend for NullBackend {
    fn location(&self) -> String {
        "null".into()
    }
    fn put(&self, _: &str, _: &[u8]) -> Result<(), BackendError> {
        Ok(())
    }
    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        Err(BackendError::NotFound(name.into()))
    }
    fn get_range_into(
        &self,
        name: &str,
        _: u64,
        _: u64,
        _: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        Err(BackendError::NotFound(name.into()))
    }
    fn list(&self, _: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        Ok(Vec::new())
    }
    fn delete(&self, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
}

pub fn run(data_mib: u64, rounds: usize) -> Result<BenchReport> {
    let data = mixed_data((data_mib as usize) << 20, 7);
    let (primitives, serial) = primitives(&data, rounds);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let p1 = pipeline_rate(&data, rounds, 1)?;
    let pn = pipeline_rate(&data, rounds, cores)?;
    Ok(BenchReport {
        data_mib,
        primitives,
        serial_bound_mib_per_s: serial,
        pipeline_1_core_mib_per_s: p1,
        pipeline_all_cores_mib_per_s: pn,
        cores,
        pipeline_1_core_percent_of_bound: 100.0 * p1 / serial,
    })
}

/// Each primitive alone over `data`, best of `rounds`; and the serial bound
/// of the pipeline (CDC + HMAC + zstd + seal, one after the other).
fn primitives(data: &[u8], rounds: usize) -> (Vec<Figure>, f64) {
    let n = data.len();
    let cfg = RepoConfig::default();
    let keys = Keys::derive(&MasterKey::generate());
    let chunker = crate::format::chunker::Chunker::new(cfg.chunker, keys.cdc_seed());
    let level = cfg.compression_level;

    let mut bounds = Vec::new();
    let t_cdc = best(rounds, || {
        bounds.clear();
        let mut pos = 0;
        while pos < n {
            let c = chunker.next_cut(&data[pos..], true).unwrap_or(n - pos);
            bounds.push((pos, pos + c));
            pos += c;
        }
    });
    let chunks: Vec<&[u8]> = bounds.iter().map(|&(s, e)| &data[s..e]).collect();
    let t_hmac = best(rounds, || {
        for c in &chunks {
            std::hint::black_box(keys.chunk_id(c));
        }
    });
    let mut compressed: Vec<Vec<u8>> = Vec::new();
    let t_zstd = best(rounds, || {
        compressed = chunks
            .iter()
            .map(|c| zstd::bulk::compress(c, level).unwrap_or_else(|_| c.to_vec()))
            .collect();
    });
    let comp_bytes: usize = compressed.iter().map(Vec::len).sum();
    let t_unzstd = best(rounds, || {
        for (c, z) in chunks.iter().zip(&compressed) {
            std::hint::black_box(zstd::bulk::decompress(z, c.len()).ok());
        }
    });
    let session = keys.session();
    let mut sealed: Vec<Vec<u8>> = Vec::new();
    // The pipeline keeps a chunk raw when zstd does not shrink it.
    let stored: Vec<&[u8]> = chunks
        .iter()
        .zip(&compressed)
        .map(|(c, z)| if z.len() < c.len() { &z[..] } else { *c })
        .collect();
    let stored_bytes: usize = stored.iter().map(|s| s.len()).sum();
    let t_seal = best(rounds, || {
        sealed = stored.iter().map(|s| session.seal(b"bench", s)).collect();
    });
    let opener = Opener::new(&keys, session.salt());
    let t_open = best(rounds, || {
        for s in &sealed {
            std::hint::black_box(opener.open(b"bench", s).ok());
        }
    });
    let figure = |name: String, bytes: usize, t: f64| Figure {
        name,
        mib_per_s: rate(bytes, t),
    };
    let comp_percent = 100.0 * comp_bytes as f64 / n as f64;
    let figures = vec![
        figure("CDC (FastCDC 2020, keyed gear)".into(), n, t_cdc),
        figure("HMAC-SHA256 (chunk id)".into(), n, t_hmac),
        figure(format!("zstd -{level} compress"), n, t_zstd),
        figure(
            format!("zstd decompress ({comp_percent:.0}% of input)"),
            n,
            t_unzstd,
        ),
        figure("AES-256-GCM seal".into(), stored_bytes, t_seal),
        figure("AES-256-GCM open".into(), stored_bytes, t_open),
    ];
    (figures, rate(n, t_cdc + t_hmac + t_zstd + t_seal))
}

/// The whole backup pipeline on `threads` into a backend that stores
/// nothing: best MiB/s of `rounds`.
fn pipeline_rate(data: &[u8], rounds: usize, threads: usize) -> Result<f64> {
    let mut best_rate: f64 = 0.0;
    for _ in 0..rounds {
        let backend: Arc<dyn Backend> = Arc::new(NullBackend);
        let kdf = KdfParams {
            m_cost_kib: 8,
            t_cost: 1,
            p_cost: 1,
        };
        let repo = Repository::init(
            backend,
            &Secret::Passphrase("bench".into()),
            &kdf,
            RepoConfig::default(),
        )?;
        let mut src = MemSource::new(data.to_vec());
        let t = Instant::now();
        let opts = BackupOptions {
            threads,
            uploaders: 1,
        };
        let mut s = BackupSession::new(&repo, &opts)?;
        s.backup_disk("bench", &mut src, Mode::Full)?;
        s.finish(SnapshotMeta {
            source: "bench".into(),
            ..Default::default()
        })?;
        best_rate = best_rate.max(rate(data.len(), t.elapsed().as_secs_f64()));
    }
    Ok(best_rate)
}

/// The raw object copy rate between two backends: every object under
/// `prefix` read whole from `src` and written to `dst`, `parallel` at once
/// (the baseline a sync is measured against: the same bytes, the same SDK,
/// no planning, no checks). Returns (bytes, seconds).
pub fn copy_objects(
    src: &dyn Backend,
    dst: &dyn Backend,
    prefix: &str,
    parallel: usize,
) -> Result<(u64, f64)> {
    let objects = src.list(prefix)?;
    let bytes = std::sync::atomic::AtomicU64::new(0);
    let started = Instant::now();
    crate::repo::for_each_parallel(&objects, parallel, |o| {
        let data = src.get(&o.name)?;
        dst.put(&o.name, &data)?;
        bytes.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    })?;
    let total = bytes.into_inner();
    Ok((total, started.elapsed().as_secs_f64()))
}
