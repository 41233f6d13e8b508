//! The Object Lock primitives of the S3 backend against a server that
//! enforces them (Ceph's radosgw, `testbed::rgw`), and the bucket policy of
//! `docs/immutability.md` as that server applies it.

use std::time::Duration;

use bulwark_store::backend::{
    bucket_policy, LockMode, ObjectLock, PolicyUsers, Retention, RetentionRule, S3Backend, S3Config,
};
use bulwark_store::{Backend, BackendError};
use chrono::Utc;
use testbed::rgw::{Credentials, LockServer};

fn backend(server: &LockServer, creds: &Credentials, bucket: &str, prefix: &str) -> S3Backend {
    S3Backend::new(S3Config {
        bucket: bucket.into(),
        prefix: prefix.into(),
        endpoint: Some(server.endpoint().into()),
        region: Some("us-east-1".into()),
        credentials: Some((creds.access_key.clone(), creds.secret_key.clone())),
        max_attempts: 2,
        initial_backoff: Duration::from_millis(5),
        ..Default::default()
    })
    .unwrap()
}

fn lock(b: &S3Backend) -> &dyn ObjectLock {
    b.object_lock().expect("S3 has object lock")
}

fn rule(mode: LockMode, secs: u64) -> RetentionRule {
    RetentionRule {
        mode,
        period: Duration::from_secs(secs),
        generation: Duration::from_secs(1),
    }
}

/// Asserts `r` failed because the server said no (not because it was
/// unreachable or the name was wrong).
fn denied<T: std::fmt::Debug>(r: Result<T, BackendError>, what: &str) -> String {
    match r {
        Err(BackendError::Other(m)) if m.contains("access denied") => m,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn locked_versions_cannot_be_deleted_or_shortened() {
    let server = LockServer::shared().unwrap();
    let bucket = server.create_bucket().unwrap();
    let b = backend(server, &server.owner, &bucket, "repo");
    let l = lock(&b);
    assert!(l.lock_enabled().unwrap());
    let plain = server.create_plain_bucket().unwrap();
    assert!(!lock(&backend(server, &server.owner, &plain, ""))
        .lock_enabled()
        .unwrap());

    // Every put carries the rule's lock.
    l.lock_new_objects(Some(rule(LockMode::Governance, 3600)));
    let before = Utc::now();
    b.put("data/ab/gov", b"governed").unwrap();
    let head = l.head_version("data/ab/gov", None).unwrap();
    let r = head.retention.expect("a lock");
    assert_eq!(r.mode, LockMode::Governance);
    assert!(r.until >= before + chrono::Duration::seconds(3599), "{r:?}");
    l.lock_new_objects(Some(rule(LockMode::Compliance, 3600)));
    b.put("data/ab/comp", b"complied").unwrap();
    let comp = l.head_version("data/ab/comp", None).unwrap();
    let until = comp.retention.unwrap().until;

    // No version delete, shortening, or mode change goes through.
    denied(
        l.delete_version("data/ab/gov", &head.version),
        "delete governed",
    );
    denied(
        l.delete_version("data/ab/comp", &comp.version),
        "delete complied",
    );
    let shorter = Retention {
        mode: LockMode::Compliance,
        until: until - chrono::Duration::seconds(600),
    };
    denied(
        l.set_retention("data/ab/comp", &comp.version, shorter),
        "shorten",
    );
    let weaker = Retention {
        mode: LockMode::Governance,
        until: until + chrono::Duration::seconds(600),
    };
    denied(
        l.set_retention("data/ab/comp", &comp.version, weaker),
        "to governance",
    );
    // Longer is allowed.
    let longer = Retention {
        mode: LockMode::Compliance,
        until: until + chrono::Duration::seconds(600),
    };
    l.set_retention("data/ab/comp", &comp.version, longer)
        .unwrap();
    let after = l.head_version("data/ab/comp", Some(&comp.version)).unwrap();
    assert_eq!(after.retention, Some(longer));

    // A plain delete only hides: a delete marker on top of the version.
    b.delete("data/ab/gov").unwrap();
    assert!(!b.exists("data/ab/gov").unwrap());
    assert!(b
        .list("data/")
        .unwrap()
        .iter()
        .all(|o| o.name != "data/ab/gov"));
    let versions = l.list_versions("data/ab/gov").unwrap();
    assert_eq!(versions.len(), 2, "{versions:?}");
    let marker = versions.iter().find(|v| v.delete_marker).unwrap();
    assert!(marker.latest);
    let kept = versions.iter().find(|v| !v.delete_marker).unwrap();
    assert_eq!(
        (kept.version.as_str(), kept.size),
        (head.version.as_str(), 8)
    );
    // The hidden version reads by id, and comes back as a copy.
    assert_eq!(
        l.head_version("data/ab/gov", Some(&head.version))
            .unwrap()
            .size,
        8
    );
    l.restore_version("data/ab/gov", &head.version).unwrap();
    assert_eq!(b.get("data/ab/gov").unwrap(), b"governed");
    // Delete markers are not locked.
    l.delete_version("data/ab/gov", &marker.version).unwrap();
    assert_eq!(l.list_versions("data/ab/gov").unwrap().len(), 2);

    // Once a lock runs out the version can go.
    l.lock_new_objects(Some(rule(LockMode::Compliance, 1)));
    b.put("data/ab/short", b"brief").unwrap();
    let short = l.head_version("data/ab/short", None).unwrap();
    let wait = short.retention.unwrap().until - Utc::now();
    std::thread::sleep(wait.to_std().unwrap_or_default() + Duration::from_millis(1100));
    l.delete_version("data/ab/short", &short.version).unwrap();
    assert!(l.list_versions("data/ab/short").unwrap().is_empty());
}

/// The policy of `docs/immutability.md`: the backup user writes and reads
/// but destroys nothing; the maintenance user hides and deletes what is not
/// locked; neither bypasses a governance lock (the owner can: the right
/// exists and the policy withholds it).
#[test]
fn the_bucket_policy_keeps_each_credential_to_its_job() {
    let server = LockServer::shared().unwrap();
    let bucket = server.create_bucket().unwrap();
    let backup = server.create_user("backup").unwrap();
    let maint = server.create_user("maint").unwrap();
    let policy = bucket_policy(&PolicyUsers {
        bucket: &bucket,
        prefix: "repo",
        backup: &format!("arn:aws:iam:::user/{}", backup.user),
        maintenance: &format!("arn:aws:iam:::user/{}", maint.user),
    });
    server.set_policy(&bucket, &policy).unwrap();
    let b = backend(server, &backup, &bucket, "repo");
    let m = backend(server, &maint, &bucket, "repo");
    let gov = rule(LockMode::Governance, 3600);

    // Backup: writes (locked), reads, lists; ends its own sessions.
    lock(&b).lock_new_objects(Some(gov));
    b.put("data/ab/x", b"pack").unwrap();
    b.put("sessions/s1", b"marker").unwrap();
    assert_eq!(b.get("data/ab/x").unwrap(), b"pack");
    assert_eq!(b.list("").unwrap().len(), 2);
    assert!(lock(&b).lock_enabled().unwrap());
    b.delete("sessions/s1").unwrap();
    let head = lock(&m).head_version("data/ab/x", None).unwrap();
    assert_eq!(head.retention.unwrap().mode, LockMode::Governance);

    // ... and destroys nothing.
    denied(b.delete("data/ab/x"), "backup hides a pack");
    denied(lock(&b).list_versions(""), "backup lists versions");
    denied(
        lock(&b).delete_version("data/ab/x", &head.version),
        "backup deletes a version",
    );
    let shorter = Retention {
        mode: LockMode::Governance,
        until: Utc::now() + chrono::Duration::seconds(60),
    };
    denied(
        lock(&b).set_retention("data/ab/x", &head.version, shorter),
        "backup shortens",
    );
    assert!(lock(&m)
        .list_versions("")
        .unwrap()
        .iter()
        .all(|v| v.name != "data/ab/x" || !v.delete_marker));

    // Maintenance: hides, reads versions, extends, deletes markers; never
    // a locked version, never shortens.
    let longer = Retention {
        mode: LockMode::Governance,
        until: Utc::now() + chrono::Duration::seconds(7200),
    };
    lock(&m)
        .set_retention("data/ab/x", &head.version, longer)
        .unwrap();
    denied(
        lock(&m).set_retention("data/ab/x", &head.version, shorter),
        "maintenance shortens",
    );
    denied(
        lock(&m).delete_version("data/ab/x", &head.version),
        "maintenance deletes a locked version",
    );
    m.delete("data/ab/x").unwrap();
    let marker = lock(&m)
        .list_versions("data/ab/x")
        .unwrap()
        .into_iter()
        .find(|v| v.delete_marker)
        .unwrap();
    lock(&m)
        .delete_version("data/ab/x", &marker.version)
        .unwrap();
    assert_eq!(b.get("data/ab/x").unwrap(), b"pack");

    // Governance bypass: an S3 right the policy withholds from both, and
    // the owner has.
    let key = "repo/data/ab/x";
    for who in [&backup, &maint] {
        let e = server
            .delete_bypassing(who, &bucket, key, &head.version)
            .unwrap_err()
            .to_string();
        assert!(e.contains("403"), "{}: {e}", who.user);
    }
    assert_eq!(m.get("data/ab/x").unwrap(), b"pack");
    server
        .delete_bypassing(&server.owner, &bucket, key, &head.version)
        .unwrap();
    assert!(lock(&m).list_versions("data/ab/x").unwrap().is_empty());
}
