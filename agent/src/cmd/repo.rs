//! `bulwark repo ...`

use anyhow::{Context, Result};
use clap::Subcommand;
use store::{KdfParams, RepoConfig, Repository, Secret};

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
    },
    /// Show the repository's settings.
    Info {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(g: &Global, c: RepoCmd) -> Result<i32> {
    match c {
        RepoCmd::Init { json } => {
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
                RepoConfig::default(),
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
