//! A drill's report: what each check found and when, what the drill read,
//! kept in the state dir (with the screenshot) and, small, in the
//! repository beside the snapshot (`drills/`), where any host holding the
//! key and the dashboard find it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bulwark_nbd::trace::{BootSetFile, BootSetReport};
use bulwark_store::repo::reports::{Fetched, BOOT_SET, DRILL};
use bulwark_store::Repository;
use serde::{Deserialize, Serialize};

pub use bulwark_nbd::trace::BootSet;

use super::checks::CheckResult;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub snapshot: String,
    pub source: String,
    pub host: String,
    /// When the drill started (RFC 3339).
    pub started: String,
    /// Every check passed.
    pub passed: bool,
    pub checks: Vec<CheckResult>,
    /// From the command's start to the end of the checks.
    pub seconds: f64,
    /// Bytes the drill's server fetched from the repository.
    pub bytes_fetched: u64,
    /// Per disk, the ranges the guest read until its checks passed.
    pub boot_set: Vec<BootSet>,
    /// Reads the repository could not answer (damaged or missing chunks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_reads: Vec<FailedRead>,
    /// The last screenshot, as a PNG in the state dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailedRead {
    pub disk: String,
    pub offset: u64,
    pub length: u64,
    pub error: String,
}

impl Report {
    /// Why it failed, in a line: the checks that did not pass and the
    /// reads that failed.
    pub fn failure(&self) -> Option<String> {
        if self.passed {
            return None;
        }
        let mut parts: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {}", c.name, c.detail.as_deref().unwrap_or("failed")))
            .collect();
        if let Some(r) = self.failed_reads.first() {
            parts.push(format!(
                "the guest's read of {} at offset {} ({} bytes) failed: {}{}",
                r.disk,
                r.offset,
                r.length,
                r.error,
                match self.failed_reads.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                }
            ));
        }
        Some(parts.join("; "))
    }

    /// Boot set size in bytes, all disks.
    pub fn boot_set_bytes(&self) -> u64 {
        self.boot_set.iter().map(|b| b.bytes).sum()
    }
}

/// Where a source's reports are kept on this host.
fn dir(state_dir: &Path, source: &str) -> PathBuf {
    let safe: String = source
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    state_dir.join("drill-reports").join(safe)
}

/// Keeps the report (and the screenshot, as a PNG beside it) in the state
/// dir; sets `report.screenshot`. Reports are named by start time, so they
/// sort oldest first.
pub fn save_local(state_dir: &Path, report: &mut Report, png: Option<&[u8]>) -> Result<PathBuf> {
    let d = dir(state_dir, &report.source);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let stem = report.started.replace(':', "");
    if let Some(png) = png {
        let p = d.join(format!("{stem}.png"));
        std::fs::write(&p, png).with_context(|| format!("writing {}", p.display()))?;
        report.screenshot = Some(p);
    }
    let p = d.join(format!("{stem}.json"));
    std::fs::write(&p, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

/// Stores the report beside its snapshot in the repository.
pub fn save_in_repository(repo: &Repository, report: &Report) -> Result<()> {
    let id: bulwark_store::Id = report
        .snapshot
        .parse()
        .context("the report's snapshot id")?;
    let at = chrono::DateTime::parse_from_rfc3339(&report.started)
        .context("the report's start time")?
        .timestamp()
        .max(0) as u64;
    repo.put_report(DRILL, &id, at, &serde_json::to_vec(report)?)
        .context("storing the drill report in the repository")
}

/// The newest drill report of each snapshot in the repository.
pub fn latest_in_repository(
    repo: &Repository,
) -> Result<std::collections::BTreeMap<bulwark_store::Id, Report>> {
    let mut out = std::collections::BTreeMap::new();
    for (id, bytes) in repo.latest_reports(DRILL)? {
        let r: Report = serde_json::from_slice(&bytes)
            .with_context(|| format!("the drill report of snapshot {}", id.short()))?;
        out.insert(id, r);
    }
    Ok(out)
}

/// How many of the newest reports of other snapshots are read looking for
/// one of the same VM.
const BOOT_SET_LOOKUPS: usize = 16;

/// A snapshot's own newest drill report and recorded boot set, fetched
/// sealed. Finding and fetching them needs no key, so a live restore
/// fetches them while its key unlocks ([`boot_set_for`] opens them): on S3
/// two round trips fewer before its server learns the boot set.
pub struct OwnReports {
    snapshot: bulwark_store::Id,
    drill: bulwark_store::Result<Fetched>,
    recorded: bulwark_store::Result<Fetched>,
}

impl OwnReports {
    /// Both families side by side (each a listing and a fetch).
    pub fn fetch(backend: &dyn bulwark_store::Backend, snapshot: &bulwark_store::Id) -> Self {
        let (drill, recorded) = std::thread::scope(|s| {
            let recorded = s.spawn(|| BOOT_SET.fetch_latest(backend, snapshot));
            let drill = DRILL.fetch_latest(backend, snapshot);
            let recorded = recorded
                .join()
                .unwrap_or_else(|_| Err(bulwark_store::Error::Invalid("panicked".into())));
            (drill, recorded)
        });
        OwnReports {
            snapshot: *snapshot,
            drill,
            recorded,
        }
    }
}

/// The boot set to fetch first for a live restore of `snap`: a passed
/// drill's of the snapshot, else the one its last live restore recorded,
/// else the newest of either kind of another snapshot of the same VM (its
/// boot path rarely moves between backups). With it, how long its guest's
/// reads were recorded.
pub fn boot_set_for(
    repo: &Repository,
    snap: &bulwark_store::Snapshot,
    fetched: Option<OwnReports>,
) -> Result<Option<BootSetFile>> {
    let from_drill = |b: &[u8]| -> Result<Option<BootSetFile>> {
        let r: Report = serde_json::from_slice(b).context("a drill report")?;
        let usable = r.passed && r.source == snap.source && r.boot_set_bytes() > 0;
        Ok(usable.then_some(BootSetFile {
            boot_set: r.boot_set,
            seconds: Some(r.seconds),
        }))
    };
    let from_live = |b: &[u8]| -> Result<Option<BootSetFile>> {
        let r: BootSetReport = serde_json::from_slice(b).context("a recorded boot set")?;
        Ok(
            (r.source == snap.source && r.bytes() > 0).then_some(BootSetFile {
                boot_set: r.boot_set,
                seconds: Some(r.seconds),
            }),
        )
    };
    let own = match fetched.filter(|f| f.snapshot == snap.id) {
        Some(f) => f,
        None => OwnReports::fetch(repo.backend().as_ref(), &snap.id),
    };
    let drill = own.drill.and_then(|f| repo.open_fetched(f));
    let recorded = own.recorded.and_then(|f| repo.open_fetched(f));
    if let Some(b) = drill? {
        if let Some(s) = from_drill(&b)? {
            return Ok(Some(s));
        }
    }
    if let Some(b) = recorded? {
        if let Some(s) = from_live(&b)? {
            return Ok(Some(s));
        }
    }
    for name in repo.report_names(DRILL)?.into_iter().take(BOOT_SET_LOOKUPS) {
        if let Some(s) = from_drill(&repo.load_report(DRILL, &name)?)? {
            return Ok(Some(s));
        }
    }
    for name in repo
        .report_names(BOOT_SET)?
        .into_iter()
        .take(BOOT_SET_LOOKUPS)
    {
        if let Some(s) = from_live(&repo.load_report(BOOT_SET, &name)?)? {
            return Ok(Some(s));
        }
    }
    Ok(None)
}
