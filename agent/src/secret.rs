//! Where the repository secret comes from: a key file, a password file,
//! $BULWARK_PASSWORD, or a prompt on the terminal, in that order.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bulwark_store::backend::location::default_cache_dir;
use bulwark_store::backend::CacheOptions;
use bulwark_store::{Backend, Location, Repository, Secret};

use crate::Global;

pub fn secret(g: &Global, confirm: bool) -> Result<Secret> {
    // Key file, password file, $BULWARK_PASSWORD: the same order bulwark-nbd uses.
    if let Some(secret) = bulwark_store::format::keys::secret_from_sources(
        g.key_file.as_deref(),
        g.password_file.as_deref(),
    )? {
        return Ok(secret);
    }
    if std::io::stdin().is_terminal() {
        let pw = rpassword::prompt_password("repository passphrase: ")?;
        if confirm && rpassword::prompt_password("again: ")? != pw {
            bail!("passphrases do not match");
        }
        if pw.is_empty() {
            bail!("empty passphrase");
        }
        return Ok(Secret::Passphrase(pw));
    }
    bail!("no passphrase: set BULWARK_PASSWORD, or pass --password-file or --key-file")
}

/// Options for remote (S3) repositories, shared by every command.
#[derive(clap::Args, Clone, Debug)]
pub struct BackendArgs {
    /// S3 endpoint for s3:// repositories (default: $AWS_ENDPOINT_URL_S3,
    /// $AWS_ENDPOINT_URL, the profile's endpoint_url, else AWS). A custom
    /// endpoint implies path-style addressing.
    #[arg(long, env = "BULWARK_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    /// Attempts per S3 request before giving up (retries back off
    /// exponentially with jitter, up to 10 s apart).
    #[arg(
        long,
        env = "BULWARK_S3_MAX_ATTEMPTS",
        default_value_t = 10,
        global = true
    )]
    pub s3_max_attempts: u32,
    /// Let S3 credentials and region come from EC2 instance metadata (the
    /// instance's role). Off by default: elsewhere that probe only fails.
    #[arg(long, env = "BULWARK_S3_IMDS", global = true)]
    pub s3_imds: bool,
    /// Local cache for remote repositories (default: $XDG_CACHE_HOME/bulwark,
    /// or /var/cache/bulwark as root); one subdirectory per repository id.
    #[arg(long, env = "BULWARK_CACHE_DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Do not cache a remote repository's objects locally.
    #[arg(long, global = true)]
    pub no_cache: bool,
    /// Bound on cached pack data (restores), in MiB.
    #[arg(long, default_value_t = 2048, global = true)]
    pub cache_max_mib: u64,
}

impl Default for BackendArgs {
    /// The command-line defaults (for the agent, which has no command line).
    fn default() -> Self {
        let env = Location::from_env("");
        BackendArgs {
            s3_endpoint: env.s3_endpoint,
            s3_max_attempts: env.s3_max_attempts,
            s3_imds: env.s3_imds,
            cache_dir: None,
            no_cache: false,
            cache_max_mib: 2048,
        }
    }
}

impl BackendArgs {
    /// The repository at `url`, reached as these options say.
    pub fn location(&self, url: &str) -> Location {
        let mut l = Location::new(url);
        l.s3_endpoint = self.s3_endpoint.clone();
        l.s3_max_attempts = self.s3_max_attempts;
        l.s3_imds = self.s3_imds;
        l.cache = (!self.no_cache).then(|| {
            let mut c = CacheOptions::new(self.cache_dir.clone().unwrap_or_else(default_cache_dir));
            c.max_range_bytes = self.cache_max_mib << 20;
            c
        });
        l
    }
}

fn repo_location(g: &Global) -> Result<&str> {
    match &g.repo {
        Some(r) => Ok(r),
        None => bail!("no repository: pass --repo PATH|s3://BUCKET/PREFIX or set BULWARK_REPO"),
    }
}

/// Where the repository of the command line is, and how to reach it.
pub fn location(g: &Global) -> Result<Location> {
    Ok(g.backend.location(repo_location(g)?))
}

pub fn backend(g: &Global) -> Result<Arc<dyn Backend>> {
    Ok(location(g)?.backend()?)
}

pub fn open(g: &Global) -> Result<Repository> {
    let backend = backend(g)?;
    let location = backend.location();
    let secret = secret(g, false)?;
    Repository::open(backend, &secret).with_context(|| format!("opening repository {location}"))
}

/// [`open`], and the snapshot `spec` in it (a full id's manifest is
/// fetched while the key is unlocked).
pub fn open_at(g: &Global, spec: &str) -> Result<(Repository, bulwark_store::Snapshot)> {
    let backend = backend(g)?;
    let location = backend.location();
    let secret = secret(g, false)?;
    Repository::open_at(backend, &secret, spec).map_err(|e| match e {
        bulwark_store::Error::SnapshotNotFound(_) | bulwark_store::Error::AmbiguousSnapshot(_) => {
            e.into()
        }
        e => anyhow::Error::from(e).context(format!("opening repository {location}")),
    })
}
