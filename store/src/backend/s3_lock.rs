//! [`ObjectLock`] for [`S3Backend`]: versions, delete markers and
//! retention through the S3 API (`GetObjectLockConfiguration`,
//! `ListObjectVersions`, `HeadObject`, `PutObjectRetention`,
//! `DeleteObject` with a version id, `CopyObject` of a version).

use chrono::{DateTime, Utc};

use aws_sdk_s3::types::{
    ObjectLockEnabled, ObjectLockMode, ObjectLockRetention, ObjectLockRetentionMode,
};

use super::object_lock::{
    LockMode, ObjectLock, ObjectVersion, Retention, RetentionRule, VersionHead,
};
use super::s3::{classify, Failure, FailureKind, S3Backend};
use super::BackendError;

pub(super) fn mode(m: LockMode) -> ObjectLockMode {
    match m {
        LockMode::Governance => ObjectLockMode::Governance,
        LockMode::Compliance => ObjectLockMode::Compliance,
    }
}

pub(super) fn time(t: DateTime<Utc>) -> aws_sdk_s3::primitives::DateTime {
    aws_sdk_s3::primitives::DateTime::from_secs_and_nanos(t.timestamp(), t.timestamp_subsec_nanos())
}

fn chrono_time(t: &aws_sdk_s3::primitives::DateTime) -> DateTime<Utc> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos()).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn lock_mode(m: &str) -> Option<LockMode> {
    match m.to_ascii_uppercase().as_str() {
        "GOVERNANCE" => Some(LockMode::Governance),
        "COMPLIANCE" => Some(LockMode::Compliance),
        _ => None,
    }
}

/// A field the server must send and did not.
fn missing(what: &str) -> Failure {
    Failure {
        kind: FailureKind::Other,
        retry: false,
        message: format!("the server's answer has no {what}"),
    }
}

/// `bucket/key?versionId=V`, the key percent-encoded but for `/`.
fn copy_source(bucket: &str, key: &str, version: &str) -> String {
    let mut out = format!("{bucket}/");
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out.push_str("?versionId=");
    out.push_str(version);
    out
}

impl S3Backend {
    /// The retention a `put` gives a new object now, if any.
    pub(super) fn new_retention(&self) -> Option<Retention> {
        self.new_object_rule().map(|r| r.retention(Utc::now()))
    }

    fn strip<'a>(&self, key: &'a str) -> Option<&'a str> {
        let prefix = self.key("");
        key.strip_prefix(prefix.as_str())
    }
}

impl ObjectLock for S3Backend {
    fn lock_enabled(&self) -> Result<bool, BackendError> {
        let bucket = self.cfg.bucket.clone();
        self.call("get object lock configuration of", "", move |c, _| {
            let req = c.get_object_lock_configuration().bucket(&bucket);
            async move {
                match req.send().await {
                    Ok(o) => Ok(o
                        .object_lock_configuration()
                        .and_then(|c| c.object_lock_enabled())
                        == Some(&ObjectLockEnabled::Enabled)),
                    Err(e)
                        if e.as_service_error()
                            .and_then(|s| aws_sdk_s3::error::ProvideErrorMetadata::code(s))
                            == Some("ObjectLockConfigurationNotFoundError") =>
                    {
                        Ok(false)
                    }
                    Err(e) => Err(classify(e, true)),
                }
            }
        })
    }

    fn lock_new_objects(&self, rule: Option<RetentionRule>) {
        *self.new_rule.lock().unwrap_or_else(|e| e.into_inner()) = rule;
    }

    fn new_object_rule(&self) -> Option<RetentionRule> {
        *self.new_rule.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn list_versions(&self, prefix: &str) -> Result<Vec<ObjectVersion>, BackendError> {
        let mut out = Vec::new();
        let mut marker: (Option<String>, Option<String>) = (None, None);
        loop {
            let bucket = self.cfg.bucket.clone();
            let m = marker.clone();
            let (page, next) = self.call("list versions", prefix, move |c, key| {
                let req = c
                    .list_object_versions()
                    .bucket(&bucket)
                    .prefix(key)
                    .set_key_marker(m.0.clone())
                    .set_version_id_marker(m.1.clone());
                async move {
                    let o = req.send().await.map_err(|e| classify(e, true))?;
                    let mut page = Vec::new();
                    for v in o.versions() {
                        page.push((
                            v.key().ok_or_else(|| missing("key"))?.to_string(),
                            v.version_id()
                                .ok_or_else(|| missing("version id"))?
                                .to_string(),
                            v.last_modified()
                                .map(chrono_time)
                                .ok_or_else(|| missing("time"))?,
                            v.size().unwrap_or(0).max(0) as u64,
                            v.is_latest().unwrap_or(false),
                            false,
                        ));
                    }
                    for d in o.delete_markers() {
                        page.push((
                            d.key().ok_or_else(|| missing("key"))?.to_string(),
                            d.version_id()
                                .ok_or_else(|| missing("version id"))?
                                .to_string(),
                            d.last_modified()
                                .map(chrono_time)
                                .ok_or_else(|| missing("time"))?,
                            0,
                            d.is_latest().unwrap_or(false),
                            true,
                        ));
                    }
                    let next = if o.is_truncated().unwrap_or(false) {
                        Some((
                            o.next_key_marker().map(str::to_string),
                            o.next_version_id_marker().map(str::to_string),
                        ))
                    } else {
                        None
                    };
                    Ok((page, next))
                }
            })?;
            for (key, version, modified, size, latest, delete_marker) in page {
                if let Some(name) = self.strip(&key) {
                    out.push(ObjectVersion {
                        name: name.to_string(),
                        version,
                        modified,
                        size,
                        latest,
                        delete_marker,
                    });
                }
            }
            match next {
                Some(n) if n.0.is_some() => marker = n,
                Some(_) => {
                    return Err(BackendError::Other(format!(
                        "S3 list versions {prefix} in bucket {}: a truncated page without a next \
                         key marker",
                        self.cfg.bucket
                    )))
                }
                None => break,
            }
        }
        Ok(out)
    }

    fn head_version(&self, name: &str, version: Option<&str>) -> Result<VersionHead, BackendError> {
        let bucket = self.cfg.bucket.clone();
        let version = version.map(str::to_string);
        self.call("head", name, move |c, key| {
            let req = c
                .head_object()
                .bucket(&bucket)
                .key(key)
                .set_version_id(version.clone());
            async move {
                let o = req.send().await.map_err(|e| classify(e, false))?;
                let retention = match (o.object_lock_mode(), o.object_lock_retain_until_date()) {
                    (Some(m), Some(u)) => Some(Retention {
                        mode: lock_mode(m.as_str()).ok_or_else(|| missing("known lock mode"))?,
                        until: chrono_time(u),
                    }),
                    _ => None,
                };
                Ok(VersionHead {
                    version: o
                        .version_id()
                        .ok_or_else(|| missing("version id"))?
                        .to_string(),
                    modified: o
                        .last_modified()
                        .map(chrono_time)
                        .ok_or_else(|| missing("time"))?,
                    size: o.content_length().unwrap_or(0).max(0) as u64,
                    retention,
                })
            }
        })
    }

    fn set_retention(&self, name: &str, version: &str, r: Retention) -> Result<(), BackendError> {
        let bucket = self.cfg.bucket.clone();
        let version = version.to_string();
        let retention = ObjectLockRetention::builder()
            .mode(match r.mode {
                LockMode::Governance => ObjectLockRetentionMode::Governance,
                LockMode::Compliance => ObjectLockRetentionMode::Compliance,
            })
            .retain_until_date(time(r.until))
            .build();
        self.call("set retention of", name, move |c, key| {
            let req = c
                .put_object_retention()
                .bucket(&bucket)
                .key(key)
                .version_id(&version)
                .retention(retention.clone());
            async move {
                req.send().await.map_err(|e| classify(e, false))?;
                Ok(())
            }
        })
    }

    fn delete_version(&self, name: &str, version: &str) -> Result<(), BackendError> {
        let bucket = self.cfg.bucket.clone();
        let version = version.to_string();
        self.call("delete version of", name, move |c, key| {
            let req = c
                .delete_object()
                .bucket(&bucket)
                .key(key)
                .version_id(&version);
            async move {
                req.send().await.map_err(|e| classify(e, false))?;
                Ok(())
            }
        })
    }

    fn restore_version(&self, name: &str, version: &str) -> Result<(), BackendError> {
        let bucket = self.cfg.bucket.clone();
        let source = copy_source(&bucket, &self.key(name), version);
        let lock = self.new_retention();
        self.call("restore version of", name, move |c, key| {
            let req = c
                .copy_object()
                .bucket(&bucket)
                .key(key)
                .copy_source(&source)
                .set_object_lock_mode(lock.map(|r| mode(r.mode)))
                .set_object_lock_retain_until_date(lock.map(|r| time(r.until)));
            async move {
                req.send().await.map_err(|e| classify(e, false))?;
                Ok(())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sources_are_encoded() {
        assert_eq!(
            copy_source("b", "p q/snapshots/ab", "v1"),
            "b/p%20q/snapshots/ab?versionId=v1"
        );
    }
}
