//! Where a repository is and how to reach it: the one place that turns a
//! location (a directory, or `s3://BUCKET/PREFIX`) and its options (S3
//! endpoint, retries, metadata credentials, local cache) into a backend.
//! The CLI's flags, `bulwark-nbd` and the agent's config each produce a
//! [`Location`] and open through it, so they cannot drift apart.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::{Backend, BackendError, CacheOptions, CachedBackend, LocalBackend};
use crate::format::keys::Secret;
use crate::repo::Repository;
use crate::Snapshot;

/// A repository's location and the options that say how to reach it.
#[derive(Clone, Debug)]
pub struct Location {
    /// A directory, or `s3://BUCKET[/PREFIX]`.
    pub url: String,
    /// S3 endpoint (`None`: the AWS variables or profile, else AWS).
    pub s3_endpoint: Option<String>,
    /// Attempts per S3 request, the first included.
    pub s3_max_attempts: u32,
    /// Let S3 credentials come from EC2 instance metadata.
    pub s3_imds: bool,
    /// S3 access key id and secret (`None`: the environment or a profile).
    pub s3_credentials: Option<(String, String)>,
    /// Local cache of a remote repository's objects (`None`: none).
    pub cache: Option<CacheOptions>,
}

impl Location {
    /// `url` with the defaults: 10 attempts, no metadata credentials, no
    /// cache.
    pub fn new(url: impl Into<String>) -> Location {
        Location {
            url: url.into(),
            s3_endpoint: None,
            s3_max_attempts: 10,
            s3_imds: false,
            s3_credentials: None,
            cache: None,
        }
    }

    /// `url` with the S3 options a process without a command line takes
    /// from its environment: `BULWARK_S3_ENDPOINT`, `BULWARK_S3_IMDS=1`.
    pub fn from_env(url: impl Into<String>) -> Location {
        let mut l = Location::new(url);
        l.s3_endpoint = std::env::var("BULWARK_S3_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty());
        l.s3_imds = std::env::var("BULWARK_S3_IMDS").is_ok_and(|v| v == "1" || v == "true");
        l
    }

    pub fn is_s3(&self) -> bool {
        self.url.starts_with("s3://")
    }

    /// The S3 settings when the location is `s3://`.
    #[cfg(feature = "s3")]
    pub fn s3_config(&self) -> Result<Option<crate::backend::S3Config>, BackendError> {
        if !self.is_s3() {
            return Ok(None);
        }
        let mut cfg = crate::backend::S3Config::from_url(&self.url)?;
        cfg.endpoint = self.s3_endpoint.clone().filter(|e| !e.is_empty());
        cfg.max_attempts = self.s3_max_attempts.max(1);
        cfg.imds = self.s3_imds;
        cfg.credentials = self.s3_credentials.clone();
        Ok(Some(cfg))
    }

    /// The backend: local, or S3 behind the cache when there is one.
    pub fn backend(&self) -> Result<Arc<dyn Backend>, BackendError> {
        #[cfg(feature = "s3")]
        if let Some(cfg) = self.s3_config()? {
            let s3: Arc<dyn Backend> = Arc::new(crate::backend::S3Backend::new(cfg)?);
            return Ok(match &self.cache {
                Some(opts) => Arc::new(CachedBackend::new(s3, opts.clone())),
                None => s3,
            });
        }
        if self.url.contains("://") {
            return Err(BackendError::Other(format!(
                "repository {:?}: use a directory or s3://BUCKET/PREFIX",
                self.url
            )));
        }
        Ok(Arc::new(LocalBackend::new(&self.url)))
    }

    /// Opens the repository here with `secret`.
    pub fn open(&self, secret: &Secret) -> crate::Result<Repository> {
        Repository::open(self.backend()?, secret)
    }

    /// Opens the repository here and finds the snapshot `spec` in it
    /// ([`Repository::open_at`]).
    pub fn open_at(&self, secret: &Secret, spec: &str) -> crate::Result<(Repository, Snapshot)> {
        Repository::open_at(self.backend()?, secret, spec)
    }
}

/// Where a remote repository's cache goes by default: `/var/cache/bulwark`
/// for root, else `$XDG_CACHE_HOME/bulwark` (or `~/.cache/bulwark`).
pub fn default_cache_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_local_and_other_schemes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let b = Location::new(dir.path().to_str().unwrap())
            .backend()
            .unwrap();
        assert_eq!(b.location(), dir.path().display().to_string());
        let e = Location::new("ftp://x/y").backend().unwrap_err();
        assert!(e.to_string().contains("s3://BUCKET/PREFIX"), "{e}");
    }

    #[cfg(feature = "s3")]
    #[test]
    fn s3_options_reach_the_s3_config() {
        let mut l = Location::new("s3://bkt/some/prefix");
        l.s3_endpoint = Some("http://127.0.0.1:9000".into());
        l.s3_max_attempts = 0;
        l.s3_imds = true;
        let c = l.s3_config().unwrap().unwrap();
        assert_eq!(
            (c.bucket.as_str(), c.prefix.as_str()),
            ("bkt", "some/prefix")
        );
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(c.max_attempts, 1, "at least one attempt");
        assert!(c.imds);
        assert!(Location::new("/srv/r").s3_config().unwrap().is_none());
    }
}
