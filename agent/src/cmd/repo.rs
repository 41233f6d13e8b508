//! `bulwark repo ...`

use anyhow::{Context, Result};
use clap::Subcommand;
use store::backend::s3::FailureKind;
use store::backend::S3Backend;
use store::{Error, KdfParams, Location, RepoConfig, Repository, Secret};

use crate::secret;
use crate::Global;

#[derive(Subcommand)]
pub enum RepoCmd {
    /// Create a new repository. With --key-file, the key file is created if
    /// it does not exist (keep a copy somewhere safe: without it, or the
    /// passphrase, the backups cannot be read).
    Init {
        #[arg(long)]
        json: bool,
        /// Lock every object with S3 Object Lock, `governance:PERIOD` or
        /// `compliance:PERIOD` (e.g. `compliance:30d`), on a bucket with
        /// Object Lock enabled (docs/immutability.md).
        #[arg(long, value_name = "MODE:PERIOD", value_parser = super::lock::parse_settings)]
        object_lock: Option<store::lock::LockSettings>,
    },
    /// Show the repository's settings.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Check that this host reaches the repository with these credentials
    /// and this key: endpoint, credentials, bucket, repository, key, in
    /// that order. Exit codes: 0 ok, 3 endpoint unreachable, 4 bad
    /// credentials or access denied, 5 no such bucket, 6 no repository
    /// there, 7 wrong key (or none given), 1 anything else.
    CheckTarget {
        #[arg(long)]
        json: bool,
    },
    /// Locked repositories: lock everything kept snapshots need until a
    /// generation past the lock period (the agent does it on schedule).
    ExtendLocks {
        #[arg(long)]
        json: bool,
    },
    /// Put the repository back as it was at a time, from object versions:
    /// delete markers and overwrites since then undone, objects written
    /// since hidden; nothing locked is touched (docs/immutability.md).
    Recover {
        /// RFC 3339, e.g. 2026-12-04T09:00:00Z.
        #[arg(long, value_parser = super::parse_time)]
        as_of: chrono::DateTime<chrono::Utc>,
        /// List what would be brought back, hidden or restored.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(g: &Global, c: RepoCmd) -> Result<i32> {
    match c {
        RepoCmd::ExtendLocks { json } => super::lock::extend(g, json),
        RepoCmd::Recover {
            as_of,
            dry_run,
            json,
        } => super::lock::recover(g, as_of, dry_run, json),
        RepoCmd::Init { json, object_lock } => {
            let backend = secret::backend(g)?;
            let secret = match &g.key_file {
                Some(path) if !path.exists() => {
                    let (text, bytes) = store::keys::new_key_file();
                    write_private(path, &text)?;
                    eprintln!("created key file {}", path.display());
                    Secret::KeyFile(bytes)
                }
                _ => secret::secret(g, true)?,
            };
            let location = backend.location();
            let repo = Repository::init(
                backend,
                &secret,
                &KdfParams::default(),
                RepoConfig {
                    object_lock,
                    ..RepoConfig::default()
                },
            )
            .with_context(|| format!("creating repository at {location}"))?;
            if json {
                println!("{}", serde_json::to_string(repo.config())?);
            } else {
                println!(
                    "created repository {} at {location}",
                    repo.config().id.short()
                );
            }
            Ok(0)
        }
        RepoCmd::CheckTarget { json } => check_target(g, json),
        RepoCmd::Info { json } => {
            let repo = secret::open(g)?;
            let ix = repo.index()?;
            if json {
                let mut v = serde_json::to_value(repo.config())?;
                v["chunks"] = ix.len().into();
                v["packs"] = ix.packs().len().into();
                v["key_fingerprint"] = repo.keys().fingerprint().into();
                println!("{v}");
            } else {
                let c = repo.config();
                println!("repository  {} at {}", c.id, repo.backend().location());
                println!("key         {}", repo.keys().fingerprint());
                println!(
                    "chunker     FastCDC min {} avg {} max {}",
                    c.chunker.min, c.chunker.avg, c.chunker.max
                );
                println!("packs       {} ({} chunks)", ix.packs().len(), ix.len());
                if let Some(l) = &c.object_lock {
                    println!("lock        {l}");
                }
            }
            Ok(0)
        }
    }
}

fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating key file {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// One failed step of `check-target`.
struct Failed {
    kind: &'static str,
    code: i32,
    message: String,
}

fn failed(kind: &'static str, code: i32, message: impl Into<String>) -> Failed {
    Failed {
        kind,
        code,
        message: message.into(),
    }
}

fn check_target(g: &Global, json: bool) -> Result<i32> {
    let mut steps: Vec<(&str, String)> = Vec::new();
    let mut info = serde_json::json!({});
    let r = match secret::location(g) {
        Ok(l) => check_steps(&l, || secret::secret(g, false), &mut steps, &mut info),
        Err(e) => Err(failed("invalid", 1, format!("{e:#}"))),
    };
    let location = g.repo.clone().unwrap_or_default();
    match &r {
        Ok(()) => {
            if json {
                info["ok"] = true.into();
                info["location"] = location.into();
                info["checks"] = steps.iter().map(|(n, _)| *n).collect::<Vec<_>>().into();
                println!("{info}");
            } else {
                for (n, d) in &steps {
                    println!("ok  {n:<11} {d}");
                }
                println!("target {location} is usable from this host");
            }
            Ok(0)
        }
        Err(f) => {
            if json {
                info["ok"] = false.into();
                info["location"] = location.into();
                info["checks"] = steps.iter().map(|(n, _)| *n).collect::<Vec<_>>().into();
                info["error"] = serde_json::json!({"kind": f.kind, "message": f.message});
                println!("{info}");
            } else {
                for (n, d) in &steps {
                    println!("ok  {n:<11} {d}");
                }
                println!("FAIL {}: {}", f.kind, f.message);
            }
            Ok(f.code)
        }
    }
}

/// `check-target` without output: the kind of failure (`unreachable`,
/// `credentials`, `no_bucket`, `no_repository`, `wrong_key`, ...) and its
/// message. The agent checks its repositories with it.
pub(crate) fn check(
    location: &Location,
    secret: impl FnOnce() -> Result<Secret>,
) -> std::result::Result<(), (&'static str, String)> {
    let mut steps = Vec::new();
    let mut info = serde_json::json!({});
    check_steps(location, secret, &mut steps, &mut info).map_err(|f| (f.kind, f.message))
}

fn check_steps(
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
            store::backend::BackendError::Credentials(m) => failed("credentials", 4, m),
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
