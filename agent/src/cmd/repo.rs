//! `bulwark repo ...`

use anyhow::{Context, Result};
use bulwark_store::{KdfParams, RepoConfig, Repository, Secret};
use clap::Subcommand;

use crate::Global;
use crate::{secret, target};

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
        object_lock: Option<bulwark_store::maintain::lock::LockSettings>,
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
        #[arg(long, value_parser = crate::units::parse_time)]
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
                    let (text, bytes) = bulwark_store::format::keys::new_key_file();
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

fn check_target(g: &Global, json: bool) -> Result<i32> {
    let mut steps: Vec<(&str, String)> = Vec::new();
    let mut info = serde_json::json!({});
    let r = match secret::location(g) {
        Ok(l) => target::check_steps(&l, || secret::secret(g, false), &mut steps, &mut info),
        Err(e) => Err(target::failed("invalid", 1, format!("{e:#}"))),
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
