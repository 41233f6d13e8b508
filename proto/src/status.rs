//! The agent's status document (the answer to `status`, and what `bulwark
//! agent status --json` prints): every domain on the host with its
//! policies, last result, next run and problems; the repositories' checks;
//! and the earlier flat fields (`runs`, `gcs`, `protected`, ...) kept for
//! scripts that read them. Times are Unix seconds; snapshot ids are hex.

use std::collections::BTreeMap;

/// Everything the agent knows, in one document.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Status {
    pub host: String,
    pub version: String,
    pub now: u64,
    /// Every policy of the host's config.
    pub policies: Vec<String>,
    /// Policies the host refuses to run, and why.
    pub refused_policies: BTreeMap<String, String>,
    /// Protected domains and the usable policies they name.
    pub protected: BTreeMap<String, Vec<String>>,
    pub libvirt_connections: u64,
    /// The last run per `domain/policy`.
    pub runs: BTreeMap<String, Run>,
    /// The last GC per repository.
    pub gcs: BTreeMap<String, GcRun>,
    /// The last lock check per locked repository.
    #[cfg_attr(feature = "serde", serde(default))]
    pub locks: BTreeMap<String, LockRun>,
    /// The last run of each sync job (`[sync.NAME]`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub syncs: BTreeMap<String, SyncRun>,
    /// The last restore drill of each VM (a policy's `drill`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub drills: BTreeMap<String, DrillRun>,
    /// The last file backup of each `[host.NAME]`.
    #[cfg_attr(feature = "serde", serde(default))]
    pub hosts: BTreeMap<String, Run>,
    /// A backup is running.
    pub busy: bool,
    /// Domains being backed up now.
    pub running: Vec<String>,
    /// `domain/policy` jobs queued or running.
    pub queued: Vec<String>,
    /// The last check of each repository.
    pub targets: BTreeMap<String, Target>,
    pub domains: Vec<DomainStatus>,
    /// Everything wrong, domain by domain, then the repositories.
    pub problems: Vec<Problem>,
}

/// One (domain, policy)'s last backup, as the agent keeps it.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Run {
    /// The last attempt.
    pub at: u64,
    pub ok: bool,
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub snapshot: Option<String>,
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub error: Option<String>,
    /// `full`, `incremental` or `mixed`.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub mode: Option<String>,
    /// Snapshots the prune after this backup removed.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub pruned: Option<usize>,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub prune_error: Option<String>,
    /// How long the backup took, what it read and stored.
    #[cfg_attr(feature = "serde", serde(default))]
    pub seconds: f64,
    #[cfg_attr(feature = "serde", serde(default))]
    pub bytes_read: u64,
    #[cfg_attr(feature = "serde", serde(default))]
    pub bytes_stored: u64,
    /// The last successful run and its snapshot, kept across failures.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub last_ok: Option<u64>,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub last_snapshot: Option<String>,
    /// Set while failing: the first failed run of the streak.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub failing_since: Option<u64>,
}

/// One repository's last GC.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GcRun {
    pub at: u64,
    pub ok: bool,
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub error: Option<String>,
    pub packs_deleted: usize,
    pub bytes_deleted: u64,
    pub packs_condemned: usize,
}

/// One sync job's last run.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SyncRun {
    pub at: u64,
    pub ok: bool,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub error: Option<String>,
    /// The repositories it copies from and to.
    pub from: String,
    pub to: String,
    pub snapshots_copied: usize,
    pub snapshots_skipped: usize,
    /// Snapshots that failed to copy (the run is not ok).
    pub snapshots_failed: usize,
    /// Removed at the destination by its own retention after the run.
    pub snapshots_pruned: usize,
    pub bytes_copied: u64,
    pub seconds: f64,
    /// The end of the last run that left nothing behind (the destination
    /// was as current as the source then).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub last_ok: Option<u64>,
}

/// A VM's last restore drill: its latest snapshot booted in isolation
/// and checked.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DrillRun {
    pub at: u64,
    /// Every check passed.
    pub ok: bool,
    pub policy: String,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub snapshot: Option<String>,
    /// Why it failed (checks not passed, failed reads), or why it could
    /// not run.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub error: Option<String>,
    /// From the drill's start to its last check.
    pub seconds: f64,
    pub bytes_fetched: u64,
    /// The blocks the guest read until its checks passed.
    pub boot_set_bytes: u64,
    /// The end of the last drill that passed: "last proven bootable".
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub last_ok: Option<u64>,
}

/// What the last check of a locked repository's locks found.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LockRun {
    pub at: u64,
    pub ok: bool,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub error: Option<String>,
    /// Everything kept snapshots need is locked until then (RFC 3339; none:
    /// the repository is not locked).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub locked_until: Option<String>,
    /// Locks set by this check (0 when none was due).
    pub extended: usize,
}

/// The last check of one repository.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Target {
    pub ok: bool,
    pub checked: u64,
    /// Since when it has been in this state (ok or not).
    pub since: u64,
    /// `unreachable`, `credentials`, `no_bucket`, `no_repository`,
    /// `wrong_key`, ... (as `repo check-target --json` says).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub kind: Option<String>,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub error: Option<String>,
}

/// One domain on the host.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DomainStatus {
    pub name: String,
    /// `running`, `shut off`, or `unknown` (libvirtd not reached).
    pub state: String,
    /// Names at least one policy this host runs.
    pub protected: bool,
    pub backing_up: bool,
    pub policies: Vec<PolicyStatus>,
    pub problems: Vec<String>,
}

/// One policy a domain names. An unusable one (undefined here, or refused)
/// has only its name, `usable: false` and perhaps its repository.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PolicyStatus {
    pub name: String,
    pub usable: bool,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub repository: Option<String>,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub schedule: Option<String>,
    #[cfg_attr(feature = "serde", serde(default))]
    pub last_run: Option<u64>,
    /// `ok` or `failed`.
    #[cfg_attr(feature = "serde", serde(default))]
    pub last_result: Option<String>,
    #[cfg_attr(feature = "serde", serde(default))]
    pub last_error: Option<String>,
    #[cfg_attr(feature = "serde", serde(default))]
    pub last_ok: Option<u64>,
    #[cfg_attr(feature = "serde", serde(default))]
    pub last_snapshot: Option<String>,
    #[cfg_attr(feature = "serde", serde(default))]
    pub failing_since: Option<u64>,
    #[cfg_attr(feature = "serde", serde(default))]
    pub next_run: Option<u64>,
}

/// Something wrong with a domain or a repository.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Problem {
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub domain: Option<String>,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub repository: Option<String>,
    pub problem: String,
}

impl Problem {
    /// What it is about: the domain's or the repository's name.
    pub fn subject(&self) -> &str {
        self.domain
            .as_deref()
            .or(self.repository.as_deref())
            .unwrap_or("")
    }
}
