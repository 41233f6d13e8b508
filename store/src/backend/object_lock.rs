//! What a bucket with S3 Object Lock offers beyond [`super::Backend`]:
//! object versions, delete markers, and a retain-until date per version
//! that nobody can shorten (compliance) or only with a permission Bulwark's
//! credentials never hold (governance).
//!
//! In a bucket with Object Lock (always versioned), [`super::Backend::delete`]
//! without a version writes a delete marker: the object leaves listings
//! and reads, its version stays until deleted by version id, which the
//! server refuses while it is locked.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::BackendError;

/// How a version is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Deletable early only with `s3:BypassGovernanceRetention`.
    Governance,
    /// Nobody deletes it or shortens its lock before the date.
    Compliance,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        }
    }
}

impl std::str::FromStr for LockMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "governance" => Ok(LockMode::Governance),
            "compliance" => Ok(LockMode::Compliance),
            m => Err(format!("{m:?}: the lock mode is governance or compliance")),
        }
    }
}

impl std::fmt::Display for LockMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A version's lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub mode: LockMode,
    pub until: DateTime<Utc>,
}

/// One version of an object, or a delete marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectVersion {
    /// Repository name (prefix stripped), e.g. `snapshots/<hex>`.
    pub name: String,
    pub version: String,
    /// As the server's clock had it (whole seconds on most servers).
    pub modified: DateTime<Utc>,
    pub size: u64,
    /// The current version of its name (a delete marker can be).
    pub latest: bool,
    pub delete_marker: bool,
}

/// A version's metadata as a HEAD returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionHead {
    pub version: String,
    pub modified: DateTime<Utc>,
    pub size: u64,
    pub retention: Option<Retention>,
}

/// Versioned, lockable storage (an S3 bucket with Object Lock).
pub trait ObjectLock: Send + Sync {
    /// Whether the bucket has Object Lock enabled: `Err` with the reason
    /// when it cannot be told (no permission, no such bucket).
    fn lock_enabled(&self) -> Result<bool, BackendError>;

    /// From now on, every [`super::Backend::put`] locks what it writes
    /// until `rule` says (`None`: no lock).
    fn lock_new_objects(&self, rule: Option<RetentionRule>);

    /// The rule set by [`ObjectLock::lock_new_objects`].
    fn new_object_rule(&self) -> Option<RetentionRule>;

    /// Every version and delete marker of names starting with `prefix`.
    fn list_versions(&self, prefix: &str) -> Result<Vec<ObjectVersion>, BackendError>;

    /// HEAD of `version` of `name` (`None`: the current one). `NotFound`
    /// when there is no such version, or the current one is a delete
    /// marker.
    fn head_version(&self, name: &str, version: Option<&str>) -> Result<VersionHead, BackendError>;

    /// Sets the lock of `version` of `name`: the server refuses to shorten
    /// one (and to change compliance into governance).
    fn set_retention(
        &self,
        name: &str,
        version: &str,
        retention: Retention,
    ) -> Result<(), BackendError>;

    /// Deletes `version` of `name` for good (or removes a delete marker);
    /// the server refuses while the version is locked.
    fn delete_version(&self, name: &str, version: &str) -> Result<(), BackendError>;

    /// Makes a copy of `version` of `name` its current version (locked by
    /// the rule of [`ObjectLock::lock_new_objects`]); the old versions stay.
    fn restore_version(&self, name: &str, version: &str) -> Result<(), BackendError>;
}

/// When new objects' locks run out: `period` after they are written,
/// rounded up to the next multiple of `generation` (from the Unix epoch),
/// so objects written over a whole generation share one retain-until date
/// and are extended together (Veeam's "generations").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionRule {
    pub mode: LockMode,
    pub period: std::time::Duration,
    pub generation: std::time::Duration,
}

impl RetentionRule {
    /// The retain-until date for something written (or extended) at `now`.
    pub fn until(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let g = self.generation.as_secs().max(1) as i64;
        let t = now.timestamp() + self.period.as_secs() as i64;
        // Up to the boundary; a time on one stays (never short of `period`
        // as whole seconds go, since `now` is truncated down first).
        let end = if now.timestamp_subsec_nanos() == 0 && t % g == 0 {
            t
        } else {
            (t.div_euclid(g) + 1) * g
        };
        DateTime::from_timestamp(end, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    pub fn retention(&self, now: DateTime<Utc>) -> Retention {
        Retention {
            mode: self.mode,
            until: self.until(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn locks_end_on_generation_boundaries_at_least_a_period_away() {
        let r = RetentionRule {
            mode: LockMode::Governance,
            period: Duration::from_secs(100),
            generation: Duration::from_secs(30),
        };
        let at = |s: i64, ns: u32| DateTime::from_timestamp(s, ns).unwrap();
        assert_eq!(r.until(at(1000, 0)).timestamp(), 1110);
        assert_eq!(r.until(at(1010, 0)).timestamp(), 1110);
        assert_eq!(r.until(at(1010, 1)).timestamp(), 1140);
        assert_eq!(r.until(at(1011, 0)).timestamp(), 1140);
        for s in 0..200 {
            let u = r.until(at(s, 5));
            assert!(u >= at(s, 5) + chrono::Duration::seconds(100));
            assert!(u < at(s, 5) + chrono::Duration::seconds(131));
            assert_eq!(u.timestamp() % 30, 0);
        }
    }
}

/// Who may do what in a locked repository's bucket (an S3 bucket policy,
/// `docs/immutability.md`).
#[derive(Clone, Debug)]
pub struct PolicyUsers<'a> {
    pub bucket: &'a str,
    /// Key prefix of the repository, without slashes at either end (empty:
    /// the whole bucket).
    pub prefix: &'a str,
    /// Principal ARN of the backup credential (the hosts' daily one), e.g.
    /// `arn:aws:iam::123456789012:user/backup` (AWS) or
    /// `arn:aws:iam:::user/backup` (Ceph).
    pub backup: &'a str,
    /// Principal ARN of the maintenance credential (prune, GC, locks).
    pub maintenance: &'a str,
}

/// The bucket policy that lets the backup credential write and read but
/// never delete, overwrite a lock or change the bucket, and lets the
/// maintenance credential delete only what no lock holds. Neither may
/// bypass governance locks. The bucket's owner keeps every right: keep its
/// keys off the hosts.
pub fn bucket_policy(u: &PolicyUsers) -> String {
    let bucket = format!("arn:aws:s3:::{}", u.bucket);
    let objects = if u.prefix.is_empty() {
        format!("{bucket}/*")
    } else {
        format!("{bucket}/{}/*", u.prefix)
    };
    let sessions = if u.prefix.is_empty() {
        format!("{bucket}/sessions/*")
    } else {
        format!("{bucket}/{}/sessions/*", u.prefix)
    };
    let never = [
        "s3:BypassGovernanceRetention",
        "s3:PutBucketObjectLockConfiguration",
        "s3:PutBucketVersioning",
        "s3:PutBucketPolicy",
        "s3:DeleteBucketPolicy",
        "s3:PutLifecycleConfiguration",
        "s3:DeleteBucket",
    ];
    let statement = |sid: &str, effect: &str, who: &str, actions: &[&str], res: &[&str]| {
        serde_json::json!({
            "Sid": sid,
            "Effect": effect,
            "Principal": {"AWS": [who]},
            "Action": actions,
            "Resource": res,
        })
    };
    let backup_never: Vec<&str> = ["s3:DeleteObjectVersion", "s3:PutObjectRetention"]
        .into_iter()
        .chain(never)
        .collect();
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            statement(
                "BackupWritesAndReads",
                "Allow",
                u.backup,
                &["s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:GetBucketObjectLockConfiguration"],
                &[&bucket, &objects],
            ),
            statement(
                "BackupEndsItsSessions",
                "Allow",
                u.backup,
                &["s3:DeleteObject"],
                &[&sessions],
            ),
            statement("BackupNeverDestroys", "Deny", u.backup, &backup_never, &[&bucket, &objects]),
            statement(
                "Maintenance",
                "Allow",
                u.maintenance,
                &[
                    "s3:GetObject",
                    "s3:GetObjectVersion",
                    "s3:PutObject",
                    "s3:ListBucket",
                    "s3:ListBucketVersions",
                    "s3:GetBucketObjectLockConfiguration",
                    "s3:GetObjectRetention",
                    "s3:PutObjectRetention",
                    "s3:DeleteObject",
                    "s3:DeleteObjectVersion",
                ],
                &[&bucket, &objects],
            ),
            statement("MaintenanceNeverShortens", "Deny", u.maintenance, &never, &[&bucket, &objects]),
        ]
    });
    serde_json::to_string_pretty(&policy).expect("a policy serializes")
}
