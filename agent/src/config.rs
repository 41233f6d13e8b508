//! The agent's configuration: `/etc/bulwark/agent.toml` (or `--config`).
//!
//! ```toml
//! state_dir = "/var/lib/bulwark"          # checkpoint records, schedule
//! socket = "/run/bulwark/agent.sock"      # control socket (CLI, hook)
//! libvirt_uri = "qemu:///system"
//! tick_seconds = 30                       # how often schedules are checked
//!
//! [repositories.main]
//! path = "/srv/bulwark"                   # a directory or s3://BUCKET/PREFIX
//! password_file = "/etc/bulwark/main.pass"   # or key_file = "..."
//! gc_schedule = "daily"                   # garbage collection (default: never)
//! gc_grace = "24h"                        # docs/gc.md
//!
//! [policies.hourly]
//! repository = "main"
//! schedule = "hourly"                     # calendar event (mon..fri 02:00, *:0/15) or every 15m
//! keep_hourly = 24                        # retention, applied by prune
//! keep_daily = 7
//! contacts = ["ops@example.com"]          # told when a backup fails
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_uri")]
    pub libvirt_uri: String,
    #[serde(default = "default_tick")]
    pub tick_seconds: u64,
    #[serde(default)]
    pub repositories: BTreeMap<String, RepoConf>,
    #[serde(default)]
    pub policies: BTreeMap<String, PolicyConf>,
    /// Failure mail to the policies' contacts (none: failures are logged).
    #[serde(default)]
    pub smtp: Option<crate::mail::SmtpConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConf {
    pub path: String,
    pub password_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How often the agent runs `gc` on this repository (none: never).
    pub gc_schedule: Option<String>,
    /// The GC's grace period (default 24h; `docs/gc.md`).
    pub gc_grace: Option<String>,
}

impl RepoConf {
    pub fn gc_grace(&self) -> Result<chrono::Duration> {
        match &self.gc_grace {
            Some(g) => crate::cmd::parse_duration(g).map_err(|e| anyhow::anyhow!("gc_grace {e}")),
            None => Ok(chrono::Duration::hours(24)),
        }
    }
}

/// A backup policy: where, when, how long to keep, whom to tell.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConf {
    pub repository: String,
    pub schedule: String,
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    #[serde(default)]
    pub contacts: Vec<String>,
}

impl PolicyConf {
    /// The retention numbers, for prune (unset numbers are rules left off).
    pub fn keep(&self) -> store::retention::KeepOptions {
        store::retention::KeepOptions {
            keep_last: self.keep_last.unwrap_or(0),
            keep_hourly: self.keep_hourly.unwrap_or(0),
            keep_daily: self.keep_daily.unwrap_or(0),
            keep_weekly: self.keep_weekly.unwrap_or(0),
            keep_monthly: self.keep_monthly.unwrap_or(0),
            keep_yearly: self.keep_yearly.unwrap_or(0),
        }
    }
}

fn default_state_dir() -> PathBuf {
    crate::vm::DEFAULT_STATE_DIR.into()
}
fn default_socket() -> PathBuf {
    "/run/bulwark/agent.sock".into()
}
fn default_uri() -> String {
    "qemu:///system".into()
}
fn default_tick() -> u64 {
    30
}

pub const DEFAULT_PATH: &str = "/etc/bulwark/agent.toml";

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        c.validate()
            .with_context(|| format!("checking {}", path.display()))?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        for (name, p) in &self.policies {
            if !self.repositories.contains_key(&p.repository) {
                bail!(
                    "policy {name}: no repository {:?} in [repositories]",
                    p.repository
                );
            }
            schedule(&p.schedule).with_context(|| format!("policy {name}"))?;
        }
        for (name, r) in &self.repositories {
            if r.password_file.is_none() && r.key_file.is_none() {
                bail!("repository {name}: set password_file or key_file");
            }
            if let Some(s) = &r.gc_schedule {
                schedule(s).with_context(|| format!("repository {name}: gc_schedule"))?;
            }
            r.gc_grace().with_context(|| format!("repository {name}"))?;
        }
        Ok(())
    }
}

/// A policy's or GC's schedule: a calendar event in the systemd/PBS syntax
/// (`hourly`, `mon..fri 02:00`, `*:0/15`) or an interval (`every 15m`).
pub fn schedule(s: &str) -> Result<crate::calendar::Schedule> {
    crate::calendar::Schedule::parse(s).map_err(|e| anyhow::anyhow!("schedule {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_config_and_schedules() {
        let c: Config = toml::from_str(
            r#"
            state_dir = "/tmp/s"
            [repositories.main]
            path = "/srv/r"
            password_file = "/etc/p"
            [policies.hourly]
            repository = "main"
            schedule = "every 15m"
            keep_last = 3
            contacts = ["a@b"]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/bulwark/agent.sock"));
        assert!(schedule("every 15m").is_ok());
        assert!(schedule("mon..fri 02:00").is_ok());
        assert!(schedule("every fortnight").is_err());
        let bad: Config =
            toml::from_str("[policies.x]\nrepository = \"nope\"\nschedule = \"hourly\"\n").unwrap();
        assert!(bad.validate().is_err());
    }
}
