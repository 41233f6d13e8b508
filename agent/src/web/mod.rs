//! `bulwark web`: the dashboard, served by Bulwark itself from the agent's
//! config (its `[web]` section).
//!
//! Every page is server-rendered HTML built on the JSON API under
//! `/api/v1` that scripts use too; a little plain JS (embedded, like the
//! CSS: no Node toolchain, no CDN) refreshes regions and sends changes.
//!
//! - [`server`]: listening (plain HTTP on loopback, HTTPS beyond it), the
//!   routes, security headers;
//! - [`auth`]: the users file (argon2id), sessions, CSRF, login rate limit,
//!   roles, bearer tokens for other dashboards;
//! - [`api`]: the JSON handlers; [`pages`]: the HTML ones;
//! - [`tasks`]: what the dashboard started (restores, backups, verify, GC,
//!   prune), with progress and log lines; [`worker`] runs restores in a
//!   child process through `vm::restore` and `live::start`, the code paths
//!   of `bulwark restore vm`, so a cancel is the CLI's interrupt;
//! - [`cache`]: snapshot summaries per repository, refreshed incrementally
//!   by listing names; [`peers`]: other hosts' dashboards over HTTPS;
//! - [`files`]: a snapshot's files, listed and downloaded through
//!   `bulwark files`' code;
//! - [`simulate`]: the prune simulator on the store's retention rules;
//! - [`audit`]: every change, with its user.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cache;
pub mod files;
pub mod pages;
pub mod peers;
pub mod server;
pub mod simulate;
pub mod status;
pub mod tasks;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::Config;

/// The `[web]` section of the agent's config.
///
/// ```toml
/// [web]
/// listen = "127.0.0.1:8440"               # loopback: plain HTTP is allowed
/// users_file = "/etc/bulwark/web-users.toml"   # bulwark web user add ...
/// tls_cert = "/etc/bulwark/web.crt"       # PEM chain: HTTPS (needed beyond loopback)
/// tls_key = "/etc/bulwark/web.key"
/// session = "12h"                         # how long a login lasts
///
/// [[web.peers]]                           # other hosts shown side by side
/// name = "hv2"
/// url = "https://hv2.example.com:8440"
/// token = "..."                           # bulwark web token add (on hv2)
/// ca_file = "/etc/bulwark/hv2-ca.pem"     # default: the system's roots
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConf {
    #[serde(default = "default_listen")]
    pub listen: String,
    pub users_file: PathBuf,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(default = "default_session")]
    pub session: String,
    #[serde(default)]
    pub peers: Vec<Peer>,
}

/// Another host's dashboard, read with a bearer token.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    pub url: String,
    pub token: String,
    pub ca_file: Option<PathBuf>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8440";

fn default_listen() -> String {
    DEFAULT_LISTEN.into()
}

fn default_session() -> String {
    "12h".into()
}

/// Everything a request handler may need, shared by all of them.
pub struct Web {
    pub cfg: Config,
    pub conf: WebConf,
    /// The config file (the restore worker reads it again).
    pub config_path: PathBuf,
    pub sessions: auth::Sessions,
    pub limiter: auth::Limiter,
    pub tasks: tasks::Tasks,
    pub cache: cache::Cache,
    pub peers: peers::Peers,
    pub audit: audit::Audit,
    /// Served over TLS: cookies get `Secure`.
    pub tls: bool,
}

impl Web {
    pub fn new(
        cfg: Config,
        conf: WebConf,
        config_path: PathBuf,
        tls: bool,
    ) -> anyhow::Result<Arc<Web>> {
        let dir = cfg.state_dir.join("web");
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        let session = humantime::parse_duration(&conf.session)
            .map_err(|e| anyhow::anyhow!("[web] session {:?}: {e}", conf.session))?;
        Ok(Arc::new(Web {
            sessions: auth::Sessions::new(session),
            limiter: auth::Limiter::default(),
            tasks: tasks::Tasks::new(dir.join("verify.json")),
            cache: cache::Cache::new(&cfg),
            peers: peers::Peers::new(&conf.peers)?,
            audit: audit::Audit::new(dir.join("audit.log")),
            cfg,
            conf,
            config_path,
            tls,
        }))
    }

    /// The repository a request means: the one named, else the only one.
    pub fn repository(&self, name: Option<&str>) -> Result<String, String> {
        match name {
            Some(n) if self.cfg.repositories.contains_key(n) => Ok(n.to_string()),
            Some(n) => Err(format!("no repository {n:?} in the config")),
            None if self.cfg.repositories.len() == 1 => Ok(self
                .cfg
                .repositories
                .keys()
                .next()
                .cloned()
                .unwrap_or_default()),
            None => Err(format!(
                "name the repository (one of: {})",
                self.cfg
                    .repositories
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}
