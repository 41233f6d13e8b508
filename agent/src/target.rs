//! Reaching a repository from this host, step by step: endpoint,
//! credentials, bucket, repository, key. `bulwark repo check-target` shows
//! the steps; the agent checks its repositories with [`check`].

use anyhow::Result;
use bulwark_store::backend::s3::FailureKind;
use bulwark_store::backend::S3Backend;
use bulwark_store::{Error, Location, Repository, Secret};

/// One failed step: its kind (`unreachable`, `credentials`, `no_bucket`,
/// `no_repository`, `wrong_key`, `invalid`, `error`), the exit code
/// `check-target` gives it, and what went wrong.
pub struct Failed {
    pub kind: &'static str,
    pub code: i32,
    pub message: String,
}

pub fn failed(kind: &'static str, code: i32, message: impl Into<String>) -> Failed {
    Failed {
        kind,
        code,
        message: message.into(),
    }
}

/// The steps without output: the kind of failure and its message.
pub fn check(
    location: &Location,
    secret: impl FnOnce() -> Result<Secret>,
) -> std::result::Result<(), (&'static str, String)> {
    let mut steps = Vec::new();
    let mut info = serde_json::json!({});
    check_steps(location, secret, &mut steps, &mut info).map_err(|f| (f.kind, f.message))
}

/// Runs the steps in order, noting each that passed in `steps` and what it
/// learnt in `info` (for `--json`); the first failure ends it.
pub fn check_steps(
    location: &Location,
    secret: impl FnOnce() -> Result<Secret>,
    steps: &mut Vec<(&'static str, String)>,
    info: &mut serde_json::Value,
) -> Result<(), Failed> {
    let s3cfg = location
        .s3_config()
        .map_err(|e| failed("invalid", 1, e.to_string()))?;
    if let Some(mut cfg) = s3cfg {
        // A quick answer: few attempts, short timeouts.
        cfg.max_attempts = cfg.max_attempts.min(3);
        cfg.connect_timeout = std::time::Duration::from_secs(5);
        let s3 = S3Backend::new(cfg).map_err(|e| match e {
            bulwark_store::backend::BackendError::Credentials(m) => failed("credentials", 4, m),
            e => failed("error", 1, e.to_string()),
        })?;
        info["endpoint"] = s3.endpoint().into();
        info["bucket"] = s3.bucket().into();
        if let Err(e) = s3.check() {
            let (kind, code) = match e.kind {
                FailureKind::Unreachable => ("unreachable", 3),
                FailureKind::Credentials => ("credentials", 4),
                FailureKind::NoBucket => ("no_bucket", 5),
                _ => ("error", 1),
            };
            return Err(failed(kind, code, e.message));
        }
        steps.push(("endpoint", s3.endpoint().to_string()));
        steps.push(("credentials", "accepted".into()));
        steps.push(("bucket", s3.bucket().to_string()));
    }
    let backend = location
        .backend()
        .map_err(|e| failed("invalid", 1, e.to_string()))?;
    let at = backend.location();
    let config = Repository::read_config(backend.as_ref()).map_err(|e| match e {
        Error::NoRepository(_) => failed(
            "no_repository",
            6,
            format!("no repository at {at} (run `bulwark repo init`)"),
        ),
        Error::Corrupt { .. } | Error::UnsupportedVersion(_) => {
            failed("no_repository", 6, format!("{at}/config: {e}"))
        }
        e => failed("error", 1, e.to_string()),
    })?;
    info["repository"] = config.id.to_string().into();
    steps.push(("repository", config.id.to_string()));
    let secret = secret().map_err(|e| failed("wrong_key", 7, format!("{e:#}")))?;
    let repo = Repository::open(backend, &secret).map_err(|e| match e {
        Error::WrongKey => failed("wrong_key", 7, e.to_string()),
        e => failed("error", 1, e.to_string()),
    })?;
    info["key_fingerprint"] = repo.keys().fingerprint().into();
    steps.push(("key", repo.keys().fingerprint().to_string()));
    Ok(())
}
