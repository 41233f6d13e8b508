//! One live restore's state, persisted in `STATE_DIR/live/NAME.json` so a
//! supervisor (the agent, or `--wait` in the foreground) can pick it up
//! after a restart. The phases and their rules are stated here once.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::statefile::StateFile;

/// Where a live restore is. The phase field of a [`LiveRestore`] is
/// private: it changes only through the transitions on that type, which
/// refuse the illegal ones.
///
/// ```text
/// Booting --streams started--> Streaming --every disk local--> Done
///    |                            |  ^
///    +------------fail------------+  | retry (the operator)
///                                 v  |
///                               Failed
/// any phase but Done --cancel--> Cancelled
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "phase", content = "reason")]
pub enum Phase {
    /// Overlays made, domain defined and starting.
    Booting,
    /// The domain runs; block-stream jobs copy the snapshot into the
    /// overlays.
    Streaming,
    /// Every disk is local: no backing, server stopped.
    Done,
    /// A stream failed (why): the VM and its overlays stay, guest writes
    /// with them; `bulwark restore retry NAME` tries again.
    Failed(String),
    /// `bulwark restore cancel`: the VM was destroyed.
    Cancelled,
}

impl Phase {
    /// The pickup rule, stated once: a supervisor (the agent at its start
    /// and when a command hands a restore over, or `--wait`) works on a
    /// restore in these phases only. A failed one waits for the operator's
    /// `restore retry`; done and cancelled ones are history.
    pub fn active(&self) -> bool {
        matches!(self, Phase::Booting | Phase::Streaming)
    }

    fn word(&self) -> &'static str {
        match self {
            Phase::Booting => "booting",
            Phase::Streaming => "streaming",
            Phase::Done => "done",
            Phase::Failed(_) => "failed",
            Phase::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Failed(why) => write!(f, "failed: {why}"),
            p => f.write_str(p.word()),
        }
    }
}

/// A transition the phase rules refuse.
#[derive(Debug, thiserror::Error)]
#[error("live restore {name} is {from}: it cannot be {to}")]
pub struct Refused {
    pub name: String,
    pub from: &'static str,
    pub to: &'static str,
}

/// How to open the repository again (the server is restarted from this).
/// Secrets are never written: only the files that hold them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RepoSpec {
    pub repo: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// A replica holding the same snapshot, read when the repository fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveDisk {
    /// Target device (`vda`): the export name and libvirt's disk name.
    pub target: String,
    /// The local qcow2 overlay the guest runs on.
    pub overlay: PathBuf,
    pub size: u64,
    /// Bytes streamed so far (the block job's cursor).
    #[serde(default)]
    pub done: u64,
    /// The stream finished and the backing is gone.
    #[serde(default)]
    pub local: bool,
    /// Streams started on this disk (restarts after failures count).
    #[serde(default)]
    pub pulls: u32,
    /// The local raw file the server restores the disk into (the
    /// backfill); `None`: the stream reads the server (records of earlier
    /// versions, or after the swap onto the file failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    /// The overlay reads from `base` now, not from the server: this disk
    /// no longer needs the repository.
    #[serde(default)]
    pub on_base: bool,
}

impl LiveDisk {
    /// Reads of this disk still go to the server.
    pub fn needs_server(&self) -> bool {
        !self.local && !self.on_base
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveRestore {
    /// The new domain's name (also this record's).
    pub name: String,
    pub snapshot: bulwark_store::Id,
    pub source: String,
    pub repo: RepoSpec,
    /// The Unix socket `bulwark-nbd` serves the snapshot on.
    pub socket: PathBuf,
    /// Its log (read for the cause of a failed read).
    pub server_log: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_pid: Option<u32>,
    #[serde(flatten)]
    phase: Phase,
    pub disks: Vec<LiveDisk>,
    /// Unix seconds.
    pub started: i64,
    pub updated: i64,
    /// Unix milliseconds of the start of the command (or request) that
    /// made the restore: `independent_after` counts from it, as a user's
    /// clock does. 0 in records written before it existed.
    #[serde(default)]
    pub started_ms: i64,
    /// Stream bandwidth cap in MiB/s (0: none), so guest reads keep theirs.
    #[serde(default)]
    pub stream_mib_per_sec: u64,
    /// Times the server had to be started again.
    #[serde(default)]
    pub server_restarts: u32,
    /// Unix milliseconds since when no server has served: set when the
    /// supervisor finds the server not running, cleared once a server
    /// writes its counters (it does once its disks are open). See
    /// [`LiveRestore::server_down`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_down_since_ms: Option<i64>,
    /// The boot set the server fetches first (a drill's of this VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_set_file: Option<PathBuf>,
    /// How long reads wait for an unreachable repository before they fail.
    #[serde(default = "default_outage_wait")]
    pub outage_wait_secs: u64,
    /// Seconds from the start until no disk needed the repository any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub independent_after: Option<f64>,
}

/// Where the server whose log is `log` writes its counters.
pub fn stats_path(log: &Path) -> PathBuf {
    log.with_extension("stats")
}

/// Guest reads and the streams wait out this long an outage of the
/// repository (records written before the setting existed get it too).
pub const DEFAULT_OUTAGE_WAIT_SECS: u64 = 300;

fn default_outage_wait() -> u64 {
    DEFAULT_OUTAGE_WAIT_SECS
}

impl LiveRestore {
    /// A new restore's record, booting.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        snapshot: bulwark_store::Id,
        source: String,
        repo: RepoSpec,
        socket: PathBuf,
        server_log: PathBuf,
        disks: Vec<LiveDisk>,
        stream_mib_per_sec: u64,
    ) -> Self {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let now = now_ms / 1000;
        LiveRestore {
            name,
            snapshot,
            source,
            repo,
            socket,
            server_log,
            server_pid: None,
            phase: Phase::Booting,
            disks,
            started: now,
            updated: now,
            started_ms: now_ms,
            stream_mib_per_sec,
            server_restarts: 0,
            server_down_since_ms: None,
            boot_set_file: None,
            outage_wait_secs: DEFAULT_OUTAGE_WAIT_SECS,
            independent_after: None,
        }
    }

    /// Where the server writes its counters (`bulwark-nbd serve --stats`).
    pub fn stats_path(&self) -> PathBuf {
        stats_path(&self.server_log)
    }

    /// The server's counters, when it has written them.
    pub fn stats(&self) -> Option<bulwark_nbd::demand::ServeStats> {
        let b = std::fs::read(self.stats_path()).ok()?;
        serde_json::from_slice(&b).ok()
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Booting -> Streaming: every disk's stream has started.
    pub fn streams_started(&mut self) -> Result<(), Refused> {
        self.go(matches!(self.phase, Phase::Booting), Phase::Streaming)
    }

    /// Streaming -> Done: every disk is local.
    pub fn finished(&mut self) -> Result<(), Refused> {
        self.go(matches!(self.phase, Phase::Streaming), Phase::Done)
    }

    /// Booting or Streaming -> Failed, with the reason.
    pub fn fail(&mut self, why: impl Into<String>) -> Result<(), Refused> {
        self.go(self.phase.active(), Phase::Failed(why.into()))
    }

    /// Failed -> Streaming, on the operator's word: each stream gets its
    /// budget of restarts afresh, and the server its outage wait.
    pub fn retry(&mut self) -> Result<(), Refused> {
        self.go(matches!(self.phase, Phase::Failed(_)), Phase::Streaming)?;
        for d in &mut self.disks {
            d.pulls = 0;
        }
        self.server_down_since_ms = None;
        Ok(())
    }

    /// The restart rule, stated once: the server was found not running at
    /// `now_ms`; whether to start it again. It is started again while no
    /// server has served for at most the outage wait (a server killed or
    /// crashed, QEMU reconnects); past that the repository has been out of
    /// reach longer than the restore was told to wait (each server gives up
    /// opening it after that wait, and a new one would too), and the
    /// restore should fail instead of starting servers without end.
    pub fn server_down(&mut self, now_ms: i64) -> bool {
        let since = *self.server_down_since_ms.get_or_insert(now_ms);
        now_ms.saturating_sub(since) <= (self.outage_wait_secs as i64).saturating_mul(1000)
    }

    /// A server serves again (it wrote its counters after `server_down`).
    pub fn server_served(&mut self) {
        self.server_down_since_ms = None;
    }

    /// Any phase but Done -> Cancelled.
    pub fn cancel(&mut self) -> Result<(), Refused> {
        self.go(!matches!(self.phase, Phase::Done), Phase::Cancelled)
    }

    fn go(&mut self, allowed: bool, to: Phase) -> Result<(), Refused> {
        if !allowed {
            return Err(Refused {
                name: self.name.clone(),
                from: self.phase.word(),
                to: to.word(),
            });
        }
        self.phase = to;
        Ok(())
    }

    pub fn bytes_total(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }

    pub fn bytes_done(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| if d.local { d.size } else { d.done })
            .sum()
    }

    /// Seconds since the start, to the millisecond where the record
    /// knows it.
    pub fn seconds_since_start(&self) -> f64 {
        let start = match self.started_ms {
            0 => self.started * 1000,
            ms => ms,
        };
        (chrono::Utc::now().timestamp_millis() - start) as f64 / 1000.0
    }

    /// Throughput since the start (bytes/s) and the ETA in seconds.
    pub fn rate_and_eta(&self) -> (f64, Option<f64>) {
        let secs = (self.updated - self.started).max(1) as f64;
        let rate = self.bytes_done() as f64 / secs;
        let left = self.bytes_total().saturating_sub(self.bytes_done()) as f64;
        let eta = (rate > 0.0 && self.phase.active()).then(|| left / rate);
        (rate, eta)
    }
}

/// The directory of live restore records, one [`StateFile`] each.
#[derive(Clone, Debug)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn new(state_dir: &Path) -> Self {
        Records {
            dir: state_dir.join("live"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> StateFile<LiveRestore> {
        StateFile::new(self.dir.join(format!("{name}.json")))
    }

    pub fn exists(&self, name: &str) -> bool {
        self.file(name).exists()
    }

    /// The socket the restore `name`'s server serves on (short: a Unix
    /// socket path has ~107 bytes).
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// Its server's log.
    pub fn server_log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.nbd.log"))
    }

    pub fn load(&self, name: &str) -> Result<LiveRestore> {
        self.file(name)
            .load()?
            .with_context(|| format!("no live restore {name}"))
    }

    /// Writes atomically, stamping `updated`.
    pub fn save(&self, r: &mut LiveRestore) -> Result<()> {
        r.updated = chrono::Utc::now().timestamp();
        Ok(self.file(&r.name).save(r)?)
    }

    /// Loads, changes and saves a record under its lock (supervisor,
    /// `cancel` and `retry` may run in different processes); a change that
    /// fails is not saved.
    pub fn update(
        &self,
        name: &str,
        f: impl FnOnce(&mut LiveRestore) -> Result<()>,
    ) -> Result<LiveRestore> {
        let file = self.file(name);
        let _lock = file.lock()?;
        let mut r = self.load(name)?;
        f(&mut r)?;
        self.save(&mut r)?;
        Ok(r)
    }

    /// Every record, by name.
    pub fn all(&self) -> Result<Vec<LiveRestore>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.dir.display())),
        };
        for e in rd {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "json") {
                // Gone between the listing and now: cancelled meanwhile.
                if let Some(r) = StateFile::new(p).load()? {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a: &LiveRestore, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(phase: Phase) -> LiveRestore {
        LiveRestore {
            name: "web-live".into(),
            snapshot: "ab".repeat(32).parse().unwrap(),
            source: "web".into(),
            repo: RepoSpec::default(),
            socket: "/s".into(),
            server_log: "/l".into(),
            server_pid: Some(7),
            boot_set_file: None,
            outage_wait_secs: DEFAULT_OUTAGE_WAIT_SECS,
            independent_after: None,
            phase,
            disks: vec![LiveDisk {
                target: "vda".into(),
                overlay: "/o.qcow2".into(),
                size: 100,
                done: 40,
                local: false,
                pulls: 1,
                base: None,
                on_base: false,
            }],
            started: 1000,
            updated: 1010,
            started_ms: 0,
            stream_mib_per_sec: 0,
            server_restarts: 0,
            server_down_since_ms: None,
        }
    }

    #[test]
    fn phases_round_trip_flat_in_the_record() {
        for p in [
            Phase::Booting,
            Phase::Streaming,
            Phase::Done,
            Phase::Cancelled,
            Phase::Failed("chunk x is damaged".into()),
        ] {
            let v = serde_json::to_value(rec(p.clone())).unwrap();
            assert!(v["phase"].is_string(), "{v}");
            let back: LiveRestore = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(back.phase, p, "{v}");
        }
        let v = serde_json::to_value(rec(Phase::Failed("why".into()))).unwrap();
        assert_eq!(v["phase"], "failed");
        assert_eq!(v["reason"], "why");
    }

    #[test]
    fn progress_counts_local_disks_whole() {
        let mut r = rec(Phase::Streaming);
        assert_eq!((r.bytes_done(), r.bytes_total()), (40, 100));
        let (rate, eta) = r.rate_and_eta();
        assert_eq!(rate, 4.0);
        assert_eq!(eta, Some(15.0));
        r.disks[0].local = true;
        r.phase = Phase::Done;
        assert_eq!(r.bytes_done(), 100);
        assert_eq!(r.rate_and_eta().1, None);
    }

    #[test]
    fn a_server_down_longer_than_the_outage_wait_is_not_started_again() {
        let mut r = rec(Phase::Streaming);
        r.outage_wait_secs = 5;
        assert!(r.server_down(10_000), "found down: start it again");
        assert!(r.server_down(15_000), "5 s down is within the wait");
        assert!(!r.server_down(15_001), "past the wait: fail instead");
        r.server_served();
        assert!(
            r.server_down(20_000),
            "a server served: the wait starts anew"
        );
        assert!(!r.server_down(25_001));
        r.fail("unreachable").unwrap();
        r.retry().unwrap();
        assert!(r.server_down(30_000), "a retry gives the wait afresh");
    }

    #[test]
    fn transitions_follow_the_rules() {
        let mut r = rec(Phase::Booting);
        assert!(r.finished().is_err(), "done before streaming");
        assert!(r.retry().is_err(), "retry of a running restore");
        r.streams_started().unwrap();
        assert!(r.streams_started().is_err());
        r.fail("stream stopped").unwrap();
        assert_eq!(r.phase(), &Phase::Failed("stream stopped".into()));
        assert!(
            !r.phase().active(),
            "a failed restore waits for the operator"
        );
        assert!(r.fail("again").is_err());
        r.retry().unwrap();
        assert_eq!((r.phase(), r.disks[0].pulls), (&Phase::Streaming, 0));
        r.finished().unwrap();
        let e = r.cancel().unwrap_err().to_string();
        assert_eq!(e, "live restore web-live is done: it cannot be cancelled");
        let mut r = rec(Phase::Failed("x".into()));
        r.cancel().unwrap();
        assert!(r.retry().is_err() && r.streams_started().is_err());
    }
}
