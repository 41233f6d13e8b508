//! Backfill for a live restore: while the exports serve the guest, each
//! disk is restored in parallel, as `bulwark restore` does, into a local
//! raw file. Once a file is complete (written, fsynced, renamed into place)
//! the live restore moves the overlay's backing from the export onto it:
//! the VM no longer depends on the repository, after about the time of a
//! full restore rather than of QEMU's one-request-at-a-time stream.
//! Meanwhile the export serves what the backfill has written from the file
//! ([`LocalCopy`]).
//!
//! A failed pass (the repository unreachable, a pack swept by a GC since the
//! index was loaded) is tried again with the index loaded afresh, until the
//! outage wait has passed since the first failure in a row.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_store::format::chunklist::ChunkList;
use bulwark_store::read::outage::OutageWait;
use bulwark_store::read::restore::{restore_to_path_watched, Overwrite, RestoreOptions};
use bulwark_store::{Repository, Snapshot};
use serde::{Deserialize, Serialize};

use crate::local_copy::LocalCopy;

/// One disk to backfill: `TARGET=PATH` on the command line.
#[derive(Clone, Debug)]
pub struct Job {
    pub disk: String,
    pub path: PathBuf,
}

/// Whoever reads what the backfill of a disk has written ([`LocalCopy`]).
pub type Copies = Vec<(String, Arc<LocalCopy>)>;

impl std::str::FromStr for Job {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((disk, path)) if !disk.is_empty() && !path.is_empty() => Ok(Job {
                disk: disk.to_string(),
                path: PathBuf::from(path),
            }),
            _ => Err(format!("{s:?}: expected DISK=PATH")),
        }
    }
}

/// Where a disk's backfill stands (in `--stats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub disk: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The file is complete and in place.
    pub done: bool,
    /// Why it stopped for good (the outage wait passed, a damaged chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds from the server's start to `done`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

/// The backfill of every disk given, each on a thread of its own (and
/// each restore parallel in itself); its progress is read while it runs.
pub struct Backfill {
    progress: Vec<Arc<Disk>>,
    /// Woken each time a disk's backfill ends (done or failed).
    ended: Arc<tokio::sync::Notify>,
}

struct Disk {
    done_bytes: AtomicU64,
    state: Mutex<Progress>,
    /// What the export reads of the file as it is written.
    copy: Arc<LocalCopy>,
}

impl Backfill {
    /// Starts the backfill of `jobs`.
    /// `mib_per_sec` caps it (0: none); `outage_wait` bounds the retries.
    pub fn start(
        repo: Arc<Repository>,
        replica: Option<Arc<Repository>>,
        snap: &Snapshot,
        jobs: Vec<Job>,
        copies: &Copies,
        mib_per_sec: u64,
        outage_wait: Duration,
    ) -> Result<Backfill, bulwark_store::Error> {
        let mut work = Vec::new();
        let mut progress = Vec::new();
        for j in jobs {
            let d = snap
                .disks
                .iter()
                .find(|d| d.name == j.disk)
                .ok_or_else(|| {
                    bulwark_store::Error::Invalid(format!("the snapshot has no disk {}", j.disk))
                })?;
            let copy = copies
                .iter()
                .find(|(n, _)| *n == j.disk)
                .map_or_else(Arc::default, |(_, c)| c.clone());
            let disk = Arc::new(Disk {
                copy,
                done_bytes: AtomicU64::new(0),
                state: Mutex::new(Progress {
                    disk: j.disk.clone(),
                    bytes_total: d.size,
                    ..Progress::default()
                }),
            });
            progress.push(disk.clone());
            work.push((j, d.chunk_list, d.size, disk));
        }
        let started = Instant::now();
        let ended = Arc::new(tokio::sync::Notify::new());
        // The disks side by side, as `restore vm` restores them: the
        // slowest alone sets the time to independence.
        for (job, list_id, size, disk) in work {
            let (repo, replica, ended) = (repo.clone(), replica.clone(), ended.clone());
            std::thread::spawn(move || {
                yield_cpu_to_the_guest();
                let sources: Vec<&Repository> =
                    std::iter::once(&*repo).chain(replica.as_deref()).collect();
                let r = backfill_disk(
                    &sources,
                    &job,
                    &list_id,
                    size,
                    &disk,
                    mib_per_sec,
                    outage_wait,
                );
                let mut st = disk.lock();
                match r {
                    Ok(()) => {
                        st.done = true;
                        st.bytes_done = size;
                        st.seconds = Some(started.elapsed().as_secs_f64());
                        tracing::info!(
                            "backfill of {} into {} done after {:.1}s",
                            job.disk,
                            job.path.display(),
                            started.elapsed().as_secs_f64()
                        );
                    }
                    Err(e) => {
                        tracing::error!("backfill of {} failed: {e}", job.disk);
                        st.error = Some(e.to_string());
                    }
                }
                drop(st);
                ended.notify_one();
            });
        }
        Ok(Backfill { progress, ended })
    }

    /// Resolves when a disk's backfill has ended since the last call (a
    /// wake-up is kept if nobody waited): the counters are written then,
    /// not at the next tick, since the live restore moves the disk onto
    /// its file as soon as it reads them.
    pub async fn ended(&self) {
        self.ended.notified().await
    }

    pub fn progress(&self) -> Vec<Progress> {
        self.progress
            .iter()
            .map(|d| {
                let mut p = d.lock().clone();
                if !p.done {
                    p.bytes_done = d.done_bytes.load(Ordering::Relaxed).min(p.bytes_total);
                }
                p
            })
            .collect()
    }
}

impl Disk {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Lowers this thread's CPU priority to nice 10 (never raises it), which the restore's
/// worker threads inherit. On a small host the backfill's decryption and
/// decompression compete with the booting guest for the same cores, and
/// the guest is what the operator waits on: under contention the backfill
/// now takes about a tenth of a core's share against a vCPU's, and every
/// idle cycle otherwise. The guest's own reads are served by the server's
/// other threads, at normal priority. Failing to lower it costs only the
/// guest's speed, so it is logged, not raised.
fn yield_cpu_to_the_guest() {
    const NICE: i32 = 10;
    // SAFETY: getpriority and setpriority have no memory preconditions; on
    // Linux `who` 0 with PRIO_PROCESS names the calling thread alone.
    // A server an operator runs nicer than that stays so.
    if unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) } >= NICE {
        return;
    }
    // SAFETY: as above.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) } != 0 {
        tracing::debug!(
            "backfill keeps normal CPU priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Restores one disk into `job.path` (nothing is there until it is whole),
/// trying again after failures until `outage_wait` has passed since the
/// first of them, from each of `sources` in turn (the repository, then a
/// replica). A file already there is a backfill an earlier server
/// finished.
fn backfill_disk(
    sources: &[&Repository],
    job: &Job,
    list_id: &bulwark_store::Id,
    size: u64,
    disk: &Disk,
    mib_per_sec: u64,
    outage_wait: Duration,
) -> bulwark_store::Result<()> {
    if job.path.exists() {
        return Ok(());
    }
    let mut outage = OutageWait::new(outage_wait);
    let mut attempt = 0usize;
    loop {
        let repo = sources[attempt % sources.len()];
        if attempt % sources.len() == 1 {
            tracing::warn!("backfill of {}: reading from the replica", job.disk);
        }
        attempt += 1;
        disk.done_bytes.store(0, Ordering::Relaxed);
        let r = repo
            .load_chunk_list(list_id)
            .and_then(|list| one_pass(repo, &list, size, job, disk, mib_per_sec));
        let e = match r {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        // Damage does not heal by waiting: only the backend's failures
        // (unreachable, a pack gone since the index was loaded) are retried.
        if !matches!(e, bulwark_store::Error::Backend(_)) {
            return Err(e);
        }
        if !outage.failed() {
            return Err(e);
        }
        tracing::warn!(
            "backfill of {}: {e}; trying again ({:.0}s so far)",
            job.disk,
            outage.so_far().as_secs_f64()
        );
        // A GC may have moved chunks: plan against the index as it is now.
        repo.invalidate_index();
        // The next source at once (a replica); the same one after a pause.
        if attempt % sources.len() == 0 {
            outage.pause();
        }
    }
}

fn one_pass(
    repo: &Repository,
    list: &ChunkList,
    size: u64,
    job: &Job,
    disk: &Disk,
    mib_per_sec: u64,
) -> bulwark_store::Result<()> {
    let t0 = Instant::now();
    // The restore counts the zero extents as done at once: the cap is on data.
    let zeros: u64 = list
        .extents()
        .iter()
        .filter(|e| e.chunk.is_none())
        .map(|e| e.len)
        .sum();
    let progress = |n: u64| {
        let done = disk.done_bytes.fetch_add(n, Ordering::Relaxed) + n;
        if mib_per_sec > 0 {
            // Called from the restore's workers: sleeping here holds them
            // to the cap.
            let data = done.saturating_sub(zeros);
            let due = Duration::from_secs_f64(data as f64 / (mib_per_sec << 20) as f64);
            if let Some(ahead) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    };
    restore_to_path_watched(
        repo,
        list,
        size,
        &job.path,
        Overwrite::Never,
        &RestoreOptions::default(),
        &progress,
        &*disk.copy,
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backfill_and_the_threads_it_starts_yield_to_the_guest() {
        // SAFETY: getpriority has no memory preconditions (0: this thread).
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let base = nice();
        let (own, inherited) = std::thread::spawn(move || {
            yield_cpu_to_the_guest();
            let own = nice();
            (own, std::thread::spawn(nice).join().unwrap())
        })
        .join()
        .unwrap();
        let want = base.max(10);
        assert_eq!((own, inherited), (want, want));
        // The thread that started it keeps its priority.
        assert_eq!(nice(), base);
    }

    #[test]
    fn jobs_parse_disk_equals_path() {
        let j: Job = "vda=/var/lib/x/vda.base".parse().unwrap();
        assert_eq!(
            (j.disk.as_str(), j.path.to_str()),
            ("vda", Some("/var/lib/x/vda.base"))
        );
        for bad in ["vda", "=x", "vda=", ""] {
            assert!(bad.parse::<Job>().is_err(), "{bad}");
        }
    }
}
