//! Where the repository secret comes from: a key file, a password file,
//! $BULWARK_PASSWORD, or a prompt on the terminal, in that order.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use store::backend::{CacheOptions, CachedBackend, S3Backend, S3Config};
use store::{Backend, LocalBackend, Repository, Secret};

use crate::Global;

pub fn secret(g: &Global, confirm: bool) -> Result<Secret> {
    // Key file, password file, $BULWARK_PASSWORD: the same order bulwark-nbd uses.
    if let Some(secret) =
        store::keys::secret_from_sources(g.key_file.as_deref(), g.password_file.as_deref())?
    {
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
        BackendArgs {
            s3_endpoint: std::env::var("BULWARK_S3_ENDPOINT").ok(),
            s3_max_attempts: 10,
            s3_imds: std::env::var("BULWARK_S3_IMDS").is_ok_and(|v| v == "1" || v == "true"),
            cache_dir: None,
            no_cache: false,
            cache_max_mib: 2048,
        }
    }
}

fn default_cache_dir() -> PathBuf {
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/bulwark");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("bulwark")
}

fn repo_location(g: &Global) -> Result<&str> {
    match &g.repo {
        Some(r) => Ok(r),
        None => bail!("no repository: pass --repo PATH|s3://BUCKET/PREFIX or set BULWARK_REPO"),
    }
}

/// The S3 settings when `--repo` is an `s3://` URL.
pub fn s3_config(g: &Global) -> Result<Option<S3Config>> {
    let repo = repo_location(g)?;
    if !repo.starts_with("s3://") {
        return Ok(None);
    }
    let mut cfg = S3Config::from_url(repo)?;
    cfg.endpoint = g.backend.s3_endpoint.clone().filter(|e| !e.is_empty());
    cfg.max_attempts = g.backend.s3_max_attempts.max(1);
    cfg.imds = g.backend.s3_imds;
    Ok(Some(cfg))
}

pub fn backend(g: &Global) -> Result<Arc<dyn Backend>> {
    let repo = repo_location(g)?;
    if let Some(cfg) = s3_config(g)? {
        let s3: Arc<dyn Backend> = Arc::new(S3Backend::new(cfg)?);
        if g.backend.no_cache {
            return Ok(s3);
        }
        let mut opts = CacheOptions::new(
            g.backend
                .cache_dir
                .clone()
                .unwrap_or_else(default_cache_dir),
        );
        opts.max_range_bytes = g.backend.cache_max_mib << 20;
        return Ok(Arc::new(CachedBackend::new(s3, opts)));
    }
    if repo.contains("://") {
        bail!("repository {repo:?}: use a directory or s3://BUCKET/PREFIX");
    }
    Ok(Arc::new(LocalBackend::new(repo)))
}

pub fn open(g: &Global) -> Result<Repository> {
    let backend = backend(g)?;
    let location = backend.location();
    let secret = secret(g, false)?;
    Repository::open(backend, &secret).with_context(|| format!("opening repository {location}"))
}
