//! The agent's configuration: `/etc/bulwark/agent.toml` (or `--config`).
//!
//! ```toml
//! state_dir = "/var/lib/bulwark"          # checkpoint records, schedule
//! socket = "/run/bulwark/agent.sock"      # control socket (CLI, hook)
//! libvirt_uri = "qemu:///system"
//! tick_seconds = 30                       # longest sleep: silence check (runs start on time)
//! max_concurrent_backups = 2              # host-wide; one at a time per VM anyway
//! schedule_spread = "10m"                 # per-host offset of calendar schedules
//! target_check = "5m"                     # how often each repository is checked
//! metrics_textfile = "/var/lib/prometheus/node-exporter/bulwark.prom"
//!
//! [repositories.main]
//! path = "/srv/bulwark"                   # a directory or s3://BUCKET/PREFIX
//! password_file = "/etc/bulwark/main.pass"   # or key_file = "..."
//! gc_schedule = "daily"                   # garbage collection (default: never)
//! gc_grace = "24h"                        # docs/gc.md
//! backup_credentials = "/etc/bulwark/main.backup"       # S3 keys for backups (docs/immutability.md)
//! maintenance_credentials = "/etc/bulwark/main.maint"   # ... for prune, GC, locks
//! lock_schedule = "daily"                 # locked repositories: extend locks when due
//!
//! [policies.hourly]
//! repository = "main"
//! schedule = "hourly"                     # calendar event (mon..fri 02:00, *:0/15) or every 15m
//! keep_hourly = 24                        # retention, applied by prune
//! keep_daily = 7
//! contacts = ["ops@example.com"]          # told when a backup fails
//!
//! [enforce]
//! require_protection = true               # report (and mail) VMs with no policy
//! default_policies = ["hourly"]           # given to VMs defined with none
//! allowed_repositories = ["main"]         # policies may target only these
//! contacts = ["ops@example.com"]          # told about unprotected VMs
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
    /// The scheduler's longest sleep: it wakes at each due time anyway;
    /// this paces the silence check and notices a stepped clock.
    #[serde(default = "default_tick")]
    pub tick_seconds: u64,
    #[serde(default)]
    pub repositories: BTreeMap<String, RepoConf>,
    #[serde(default)]
    pub policies: BTreeMap<String, PolicyConf>,
    /// Failure mail to the policies' contacts (none: failures are logged).
    #[serde(default)]
    pub smtp: Option<crate::mail::SmtpConfig>,
    /// Backups running at once on this host (each VM has one at a time).
    #[serde(default = "default_concurrent")]
    pub max_concurrent_backups: usize,
    /// Calendar schedules run up to this much later, by a stable per-host
    /// offset, so a fleet sharing a schedule does not hit a bucket at once.
    #[serde(default)]
    pub schedule_spread: Option<String>,
    /// How often each repository is checked for reachability.
    #[serde(default)]
    pub target_check: Option<String>,
    /// Prometheus metrics, rewritten after each job (node exporter's
    /// textfile collector reads it).
    #[serde(default)]
    pub metrics_textfile: Option<PathBuf>,
    #[serde(default)]
    pub enforce: Enforce,
    /// Sync jobs: copies of one repository's snapshots into a replica
    /// (another site), by name.
    #[serde(default)]
    pub sync: BTreeMap<String, SyncConf>,
    /// The dashboard (`bulwark web`).
    #[serde(default)]
    pub web: Option<crate::web::WebConf>,
    /// File backups of this host, by name (the snapshots' source).
    #[serde(default)]
    pub host: BTreeMap<String, HostConf>,
}

/// A file backup of this host (`[host.NAME]`): on `schedule`, `paths` are
/// backed up as a file snapshot of source NAME (`bulwark backup files`),
/// then NAME's snapshots are pruned by the `keep_*` rules.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConf {
    pub repository: String,
    pub paths: Vec<PathBuf>,
    pub schedule: String,
    /// Patterns left out (`--exclude`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Files of patterns (`--exclude-file`).
    #[serde(default)]
    pub exclude_files: Vec<PathBuf>,
    /// Descend into file systems mounted below the paths.
    #[serde(default)]
    pub cross_mounts: bool,
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    #[serde(default)]
    pub contacts: Vec<String>,
}

impl HostConf {
    pub fn keep(&self) -> bulwark_store::maintain::retention::KeepOptions {
        keep_options([
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ])
    }

    /// The store's options for a backup of `name` by this entry.
    pub fn options(&self, name: &str) -> Result<bulwark_store::files::FilesOptions> {
        Ok(bulwark_store::files::FilesOptions {
            source: name.to_string(),
            paths: self.paths.clone(),
            excludes: bulwark_store::files::Excludes::new(&self.exclude, &self.exclude_files)
                .map_err(anyhow::Error::msg)?,
            cross_mounts: self.cross_mounts,
            reread: false,
            threads: 0,
            policy: Some(HOST_POLICY.to_string()),
            time: None,
        })
    }
}

/// The policy name of the agent's host file snapshots (prune groups them
/// by source and policy).
pub const HOST_POLICY: &str = "files";

/// A sync job (`[sync.NAME]`): on `schedule`, copy the snapshots of `from`
/// the filters select into `to` (a replica of it), then apply the
/// destination's own retention there. Needs no key of either
/// (docs/replication.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConf {
    /// The source: a name in `[repositories]`, read with its backup
    /// credentials.
    pub from: String,
    /// The destination: a name in `[repositories]`, written with its
    /// backup credentials (its maintenance ones prune it).
    pub to: String,
    pub schedule: String,
    /// Source globs (`!` excludes); none: all.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Policy globs (`!` excludes); none: all.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Of each source and policy, only the newest N.
    pub transfer_last: Option<usize>,
    /// Copy at most this many MiB per second.
    pub rate: Option<f64>,
    /// Also delete destination snapshots the source no longer has.
    #[serde(default)]
    pub remove_vanished: bool,
    /// The destination's retention, applied there after each run (none:
    /// it keeps everything it receives).
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Told when the job fails, and when it recovers.
    #[serde(default)]
    pub contacts: Vec<String>,
}

impl SyncConf {
    /// The destination's retention; `None` when it sets no number.
    pub fn keep(&self) -> Option<bulwark_store::maintain::retention::KeepOptions> {
        let k = keep_options([
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ]);
        k.any().then_some(k)
    }

    pub fn filters(&self) -> bulwark_store::sync::Filters {
        bulwark_store::sync::Filters {
            sources: self.sources.clone(),
            policies: self.policies.clone(),
            transfer_last: self.transfer_last,
            since: None,
        }
    }
}

/// What the operator requires of every VM on the host.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enforce {
    /// Every domain must name at least one policy of this agent.
    #[serde(default)]
    pub require_protection: bool,
    /// Policies given to a domain defined with none.
    #[serde(default)]
    pub default_policies: Vec<String>,
    /// The repositories policies may target (absent: any).
    pub allowed_repositories: Option<Vec<String>>,
    /// Told about unprotected VMs (default: every policy's contacts).
    #[serde(default)]
    pub contacts: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConf {
    pub path: String,
    /// The S3 endpoint of this repository (default: `BULWARK_S3_ENDPOINT`,
    /// the AWS variables or profile): two sites, two endpoints.
    pub endpoint: Option<String>,
    pub password_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How often the agent runs `gc` on this repository (none: never).
    pub gc_schedule: Option<String>,
    /// The GC's grace period (default 24h; `docs/gc.md`).
    pub gc_grace: Option<String>,
    /// S3 keys for backups and restores (`aws_access_key_id = ...` and
    /// `aws_secret_access_key = ...` lines; none: the environment).
    pub backup_credentials: Option<PathBuf>,
    /// S3 keys for prune, GC and lock extension (none: the environment).
    pub maintenance_credentials: Option<PathBuf>,
    /// How often the agent checks whether a locked repository's locks are
    /// due for extension (default daily; docs/immutability.md).
    pub lock_schedule: Option<String>,
}

/// Which of a repository's credentials a job uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Backups, restores: may write but not delete.
    Backup,
    /// Prune, GC, lock extension.
    Maintenance,
}

impl RepoConf {
    /// Where the repository is, with the environment's S3 options (the
    /// agent has no command line), reached with `role`'s credentials.
    pub fn location_as(&self, role: Role) -> Result<bulwark_store::Location> {
        let mut l = crate::secret::BackendArgs::default().location(&self.path);
        if let Some(e) = &self.endpoint {
            l.s3_endpoint = Some(e.clone());
        }
        let file = match role {
            Role::Backup => &self.backup_credentials,
            Role::Maintenance => &self.maintenance_credentials,
        };
        if let Some(f) = file {
            l.s3_credentials = Some(read_credentials(f)?);
        }
        Ok(l)
    }

    /// The repository's backend as `role`, without the local cache: what a
    /// sync reads or writes is whole objects, once each.
    pub fn backend_uncached(
        &self,
        role: Role,
    ) -> Result<std::sync::Arc<dyn bulwark_store::Backend>> {
        let mut l = self.location_as(role)?;
        l.cache = None;
        Ok(l.backend()?)
    }

    /// Whether the config names a key or password file (a replica only
    /// syncs touch may have neither).
    pub fn has_key(&self) -> bool {
        self.key_file.is_some() || self.password_file.is_some()
    }

    /// The secret from the key or password file the config names.
    pub fn secret(&self) -> Result<bulwark_store::Secret> {
        bulwark_store::format::keys::secret_from_sources(
            self.key_file.as_deref(),
            self.password_file.as_deref(),
        )?
        .with_context(|| format!("repository {}: no key_file or password_file", self.path))
    }

    /// Opens the repository with the backup credentials.
    pub fn open(&self) -> Result<bulwark_store::Repository> {
        self.open_as(Role::Backup)
    }

    /// Opens the repository with `role`'s credentials.
    pub fn open_as(&self, role: Role) -> Result<bulwark_store::Repository> {
        let secret = self.secret()?;
        self.location_as(role)?
            .open(&secret)
            .with_context(|| format!("opening repository {}", self.path))
    }

    pub fn gc_grace(&self) -> Result<chrono::Duration> {
        match &self.gc_grace {
            Some(g) => crate::units::parse_duration(g).map_err(|e| anyhow::anyhow!("gc_grace {e}")),
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
    /// When to prove the latest snapshot of each VM boots (a calendar
    /// event, e.g. `weekly`); no drills when unset.
    pub drill: Option<String>,
    /// The drill passes when a console line matches this regex ...
    pub drill_console: Option<String>,
    /// ... the guest agent answers ...
    #[serde(default)]
    pub drill_guest_agent: bool,
    /// ... and a screenshot is drawn on and changed after boot.
    #[serde(default)]
    pub drill_screenshot: bool,
    /// Time limit of each check (default 5m).
    pub drill_timeout: Option<String>,
}

impl PolicyConf {
    /// The drill's checks, when the policy has drills.
    pub fn drill_spec(&self) -> Result<Option<crate::drill::Spec>> {
        if self.drill.is_none() {
            return Ok(None);
        }
        let timeout = match &self.drill_timeout {
            Some(t) => {
                humantime::parse_duration(t).with_context(|| format!("drill_timeout {t:?}"))?
            }
            None => std::time::Duration::from_secs(300),
        };
        let spec = crate::cmd::drill::spec(
            self.drill_console.as_deref(),
            self.drill_guest_agent,
            self.drill_screenshot,
            timeout,
        )?;
        if spec.is_empty() {
            bail!("drill needs a check: drill_console, drill_guest_agent or drill_screenshot");
        }
        Ok(Some(spec))
    }

    /// The retention numbers, for prune (unset numbers are rules left off).
    pub fn keep(&self) -> bulwark_store::maintain::retention::KeepOptions {
        keep_options([
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ])
    }
}

/// `keep_last` .. `keep_yearly` as prune takes them (unset: the rule is off).
fn keep_options(
    [last, hourly, daily, weekly, monthly, yearly]: [Option<u32>; 6],
) -> bulwark_store::maintain::retention::KeepOptions {
    bulwark_store::maintain::retention::KeepOptions {
        keep_last: last.unwrap_or(0),
        keep_hourly: hourly.unwrap_or(0),
        keep_daily: daily.unwrap_or(0),
        keep_weekly: weekly.unwrap_or(0),
        keep_monthly: monthly.unwrap_or(0),
        keep_yearly: yearly.unwrap_or(0),
    }
}

fn default_state_dir() -> PathBuf {
    crate::vm::DEFAULT_STATE_DIR.into()
}
fn default_socket() -> PathBuf {
    bulwark_proto::DEFAULT_SOCKET.into()
}
fn default_uri() -> String {
    "qemu:///system".into()
}
fn default_tick() -> u64 {
    30
}
fn default_concurrent() -> usize {
    2
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

    /// Why a policy may not run here (`allowed_repositories`); `None` if it
    /// may.
    pub fn refusal(&self, policy: &str) -> Option<String> {
        let p = self.policies.get(policy)?;
        let allowed = self.enforce.allowed_repositories.as_ref()?;
        (!allowed.contains(&p.repository)).then(|| {
            format!(
                "policy {policy} targets repository {:?}, which [enforce] allowed_repositories \
                 does not allow (allowed: {})",
                p.repository,
                allowed.join(", ")
            )
        })
    }

    /// The policies that may run here, by name.
    pub fn usable_policy(&self, policy: &str) -> bool {
        self.policies.contains_key(policy) && self.refusal(policy).is_none()
    }

    /// Whether the agent has VMs to watch: a host at the backup site with
    /// only sync jobs runs without libvirt.
    pub fn uses_libvirt(&self) -> bool {
        !self.policies.is_empty() || self.enforce.require_protection
    }

    /// The calendar offset of this host (`schedule_spread`).
    pub fn spread(&self) -> Result<std::time::Duration> {
        match &self.schedule_spread {
            Some(s) => duration(s).context("schedule_spread"),
            None => Ok(std::time::Duration::ZERO),
        }
    }

    pub fn target_check(&self) -> Result<std::time::Duration> {
        match &self.target_check {
            Some(s) => duration(s).context("target_check"),
            None => Ok(std::time::Duration::from_secs(300)),
        }
    }

    /// Who hears about unprotected VMs.
    pub fn enforce_contacts(&self) -> Vec<String> {
        if !self.enforce.contacts.is_empty() {
            return self.enforce.contacts.clone();
        }
        self.contacts_of(|_| true)
    }

    /// The contacts of the policies `which` picks, each once, in order.
    pub fn contacts_of(&self, which: impl Fn(&PolicyConf) -> bool) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        for c in self
            .policies
            .values()
            .filter(|p| which(p))
            .flat_map(|p| &p.contacts)
        {
            if !all.contains(c) {
                all.push(c.clone());
            }
        }
        all
    }

    fn validate(&self) -> Result<()> {
        if self.max_concurrent_backups == 0 {
            bail!("max_concurrent_backups must be at least 1");
        }
        self.spread()?;
        self.target_check()?;
        for p in &self.enforce.default_policies {
            if !self.policies.contains_key(p) {
                bail!("[enforce] default_policies: no policy {p:?} in [policies]");
            }
            if let Some(why) = self.refusal(p) {
                bail!("[enforce] default_policies: {why}");
            }
        }
        for r in self.enforce.allowed_repositories.iter().flatten() {
            if !self.repositories.contains_key(r) {
                bail!("[enforce] allowed_repositories: no repository {r:?} in [repositories]");
            }
        }
        for (name, p) in &self.policies {
            if !self.repositories.contains_key(&p.repository) {
                bail!(
                    "policy {name}: no repository {:?} in [repositories]",
                    p.repository
                );
            }
            schedule(&p.schedule).with_context(|| format!("policy {name}"))?;
            if let Some(d) = &p.drill {
                schedule(d).with_context(|| format!("policy {name}: drill"))?;
            }
            p.drill_spec().with_context(|| format!("policy {name}"))?;
        }
        for (name, h) in &self.host {
            if !self.repositories.contains_key(&h.repository) {
                bail!(
                    "host {name}: no repository {:?} in [repositories]",
                    h.repository
                );
            }
            schedule(&h.schedule).with_context(|| format!("host {name}"))?;
            if h.paths.is_empty() || h.paths.iter().any(|p| !p.is_absolute()) {
                bail!("host {name}: paths must be absolute, and at least one");
            }
            h.options(name).with_context(|| format!("host {name}"))?;
        }
        for (name, j) in &self.sync {
            for (what, r) in [("from", &j.from), ("to", &j.to)] {
                if !self.repositories.contains_key(r) {
                    bail!("sync {name}: {what}: no repository {r:?} in [repositories]");
                }
            }
            if j.from == j.to {
                bail!("sync {name}: from and to are the same repository");
            }
            schedule(&j.schedule).with_context(|| format!("sync {name}"))?;
            j.filters()
                .check()
                .with_context(|| format!("sync {name}"))?;
            if j.rate.is_some_and(|r| !r.is_finite() || r <= 0.0) {
                bail!("sync {name}: rate must be a positive number of MiB per second");
            }
        }
        for (name, r) in &self.repositories {
            // A repository only syncs touch needs no key: a sync moves
            // sealed objects, and the replica's retention reads only its
            // plain sync records.
            let keyless_ok =
                r.gc_schedule.is_none() && !self.policies.values().any(|p| &p.repository == name);
            if r.password_file.is_none() && r.key_file.is_none() && !keyless_ok {
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

/// `30s`, `10m`, `2h`, `1d`.
fn duration(s: &str) -> Result<std::time::Duration> {
    humantime::parse_duration(s).map_err(|e| anyhow::anyhow!("{s:?}: {e}"))
}

/// A policy's or GC's schedule: a calendar event in the systemd/PBS syntax
/// (`hourly`, `mon..fri 02:00`, `*:0/15`) or an interval (`every 15m`).
pub fn schedule(s: &str) -> Result<crate::calendar::Schedule> {
    crate::calendar::Schedule::parse(s).map_err(|e| anyhow::anyhow!("schedule {s:?}: {e}"))
}

/// S3 keys from a file of `aws_access_key_id = ...` and
/// `aws_secret_access_key = ...` lines (the form of `~/.aws/credentials`;
/// `[section]` lines and `#` comments are skipped).
fn read_credentials(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading S3 credentials {}", path.display()))?;
    let (mut id, mut secret) = (None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_string()),
                "aws_secret_access_key" => secret = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(i), Some(s)) if !i.is_empty() && !s.is_empty() => Ok((i, s)),
        _ => bail!(
            "{}: needs aws_access_key_id and aws_secret_access_key lines",
            path.display()
        ),
    }
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

    #[test]
    fn drills_need_a_check_a_schedule_and_a_valid_pattern() {
        let cfg = |drill: &str| -> Result<()> {
            let c: Config = toml::from_str(&format!(
                "[repositories.main]\npath = \"/srv/r\"\npassword_file = \"/p\"\n\
                 [policies.p]\nrepository = \"main\"\nschedule = \"daily\"\n{drill}"
            ))?;
            c.validate()
        };
        cfg("").unwrap();
        cfg("drill = \"weekly\"\ndrill_console = \"login:\"\n").unwrap();
        cfg("drill = \"weekly\"\ndrill_guest_agent = true\ndrill_timeout = \"90s\"\n").unwrap();
        let e = cfg("drill = \"weekly\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("drill needs a check"), "{e:#}");
        let e = cfg("drill = \"every fortnight\"\ndrill_screenshot = true\n").unwrap_err();
        assert!(format!("{e:#}").contains("policy p: drill"), "{e:#}");
        let e = cfg("drill = \"weekly\"\ndrill_console = \"(\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("--console"), "{e:#}");
        let e = cfg("drill = \"weekly\"\ndrill_guest_agent = true\ndrill_timeout = \"soon\"\n")
            .unwrap_err();
        assert!(format!("{e:#}").contains("drill_timeout"), "{e:#}");
    }

    #[test]
    fn host_entries_need_a_repository_absolute_paths_and_valid_excludes() {
        let cfg = |host: &str| -> Result<Config> {
            let c: Config = toml::from_str(&format!(
                "[repositories.main]\npath = \"/srv/r\"\npassword_file = \"/p\"\n\
                 [host.h]\nschedule = \"daily\"\n{host}"
            ))?;
            c.validate()?;
            Ok(c)
        };
        let c = cfg("repository = \"main\"\npaths = [\"/etc\"]\nkeep_last = 3\n").unwrap();
        assert!(
            !c.uses_libvirt(),
            "a host with only file backups needs no libvirt"
        );
        assert_eq!(c.host["h"].keep().keep_last, 3);
        assert_eq!(c.host["h"].options("h").unwrap().source, "h");
        for (bad, why) in [
            (
                "repository = \"nope\"\npaths = [\"/etc\"]\n",
                "no repository",
            ),
            ("repository = \"main\"\npaths = [\"etc\"]\n", "absolute"),
            ("repository = \"main\"\npaths = []\n", "absolute"),
            (
                "repository = \"main\"\npaths = [\"/etc\"]\nexclude_files = [\"/nonexistent/x\"]\n",
                "host h",
            ),
        ] {
            let e = cfg(bad).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{bad}: {e:#}");
        }
    }

    /// The example operators copy must stay a valid config.
    #[test]
    fn the_shipped_example_parses() {
        let c: Config =
            toml::from_str(include_str!("../../libvirt-hooks/agent.toml.example")).unwrap();
        c.validate().unwrap();
        assert!(c.enforce.require_protection);
        assert_eq!(c.max_concurrent_backups, 2);
        assert_eq!(c.spread().unwrap(), std::time::Duration::from_secs(600));
    }

    #[test]
    fn enforcement_refuses_disallowed_repositories() {
        let c: Config = toml::from_str(
            r#"
            [repositories.main]
            path = "/srv/r"
            password_file = "/p"
            [repositories.other]
            path = "/srv/o"
            password_file = "/p"
            [policies.ok]
            repository = "main"
            schedule = "daily"
            [policies.off]
            repository = "other"
            schedule = "daily"
            [enforce]
            allowed_repositories = ["main"]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.usable_policy("ok") && !c.usable_policy("off") && !c.usable_policy("nope"));
        assert!(c.refusal("off").unwrap().contains("allowed_repositories"));
        let mut bad = c.clone();
        bad.enforce.default_policies = vec!["off".into()];
        assert!(bad.validate().is_err(), "a refused default policy");
        bad.enforce.default_policies = vec![];
        bad.enforce.allowed_repositories = Some(vec!["nowhere".into()]);
        assert!(bad.validate().is_err(), "an unknown allowed repository");
    }
}
