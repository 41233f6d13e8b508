//! The work the agent does: a backup of one (domain, policy) followed by
//! the prune of its group, and a GC of one repository. One backup and one
//! GC at a time; each records its result in the schedule.

use anyhow::{bail, Context, Result};

use super::scheduler::{now, GcRun, Run};
use super::Agent;
use crate::config::{self, PolicyConf, RepoConf};
use crate::libvirt::Libvirt;
use crate::vm::backup::{self, Options};
use crate::vm::domain;

impl Agent {
    /// Backs up `dom` by `policy` (by default the first of its policies this
    /// agent knows), then prunes its group.
    pub(super) fn backup(
        &self,
        dom: &str,
        policy: Option<&str>,
        full: bool,
    ) -> Result<backup::Report> {
        if dom.is_empty() {
            bail!("no domain");
        }
        // A connection per job: one that died with libvirtd is never reused.
        let libvirt = Libvirt::open(&self.cfg.libvirt_uri)?;
        let policy_name = match policy {
            Some(p) => p.to_string(),
            None => {
                let info = domain::parse(&libvirt.domain(dom)?.xml(true)?)?;
                info.policies
                    .into_iter()
                    .find(|p| self.cfg.policies.contains_key(p))
                    .with_context(|| format!("{dom} names no policy of this agent"))?
            }
        };
        let pol = self
            .cfg
            .policies
            .get(&policy_name)
            .with_context(|| format!("no policy {policy_name}"))?;
        let rc = self
            .cfg
            .repositories
            .get(&pol.repository)
            .with_context(|| format!("no repository {}", pol.repository))?;
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        // An unreachable repository is a failed backup like any other:
        // recorded, and mailed.
        let repo = open_repo(rc);
        let r = repo
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .and_then(|repo| {
                backup::backup(
                    repo,
                    &Options {
                        domain: dom.to_string(),
                        full,
                        policy: Some(policy_name.clone()),
                        threads: 0,
                        state: self.state.clone(),
                        libvirt,
                    },
                )
            });
        let run = match (&r, &repo) {
            (Ok(rep), Ok(repo)) => {
                let (pruned, prune_error) = match prune(repo, dom, &policy_name, pol) {
                    Ok(n) => (n, None),
                    Err(e) => {
                        tracing::error!(
                            "prune of {dom} ({policy_name}) failed: {e:#}; contacts: {}",
                            pol.contacts.join(", ")
                        );
                        (None, Some(format!("{e:#}")))
                    }
                };
                Run {
                    at: now(),
                    ok: true,
                    snapshot: Some(rep.snapshot.clone()),
                    error: None,
                    mode: Some(rep.mode.to_string()),
                    pruned,
                    prune_error,
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(
                    "backup of {dom} ({policy_name}) failed: {e:#}; contacts: {}",
                    pol.contacts.join(", ")
                );
                Run {
                    at: now(),
                    ok: false,
                    snapshot: None,
                    error: Some(format!("{e:#}")),
                    mode: None,
                    pruned: None,
                    prune_error: None,
                }
            }
        };
        self.record(|s| {
            s.runs.insert(format!("{dom}/{policy_name}"), run);
        })?;
        self.alert(dom, &policy_name, pol, r.as_ref().err());
        r
    }

    /// Tells the policy's contacts: one mail per failure streak, one on
    /// recovery (the streak rule lives in `mail::Notifier`). Never fails
    /// the backup: a mail that cannot be queued is logged.
    fn alert(&self, dom: &str, policy: &str, pol: &PolicyConf, err: Option<&anyhow::Error>) {
        let Some((alerts, sender)) = &self.alerts else {
            return;
        };
        let job = crate::mail::Job {
            vm: dom,
            policy,
            repository: &pol.repository,
            contacts: &pol.contacts,
        };
        let now = chrono::Utc::now();
        let mut a = alerts.lock().unwrap_or_else(|e| e.into_inner());
        let queued = match err {
            Some(e) => a.failure(&job, &format!("{e:#}"), &[], now),
            None => a.success(&job, now),
        };
        match queued {
            Ok(true) => sender.wake(),
            Ok(false) => {}
            Err(e) => tracing::error!("mail about {dom} ({policy}) not queued: {e}"),
        }
    }

    /// One GC of repository `name`, recorded.
    pub(super) fn gc(&self, name: &str, rc: &RepoConf) {
        let _gc = self.gc_busy.lock().unwrap_or_else(|p| p.into_inner());
        let r = rc.gc_grace().and_then(|grace| {
            let repo = open_repo(rc)?;
            let opts = store::gc::GcOptions {
                grace,
                ..Default::default()
            };
            Ok(store::gc::run(&repo, &opts, &|_| {})?)
        });
        let run = match r {
            Ok(rep) => {
                tracing::info!(
                    "gc of {name}: deleted {} packs ({} B), condemned {}",
                    rep.packs_deleted,
                    rep.bytes_deleted,
                    rep.packs_condemned
                );
                GcRun {
                    at: now(),
                    ok: true,
                    error: None,
                    packs_deleted: rep.packs_deleted,
                    bytes_deleted: rep.bytes_deleted,
                    packs_condemned: rep.packs_condemned,
                }
            }
            Err(e) => {
                tracing::error!("gc of {name} failed: {e:#}");
                GcRun {
                    at: now(),
                    ok: false,
                    error: Some(format!("{e:#}")),
                    packs_deleted: 0,
                    bytes_deleted: 0,
                    packs_condemned: 0,
                }
            }
        };
        if let Err(e) = self.record(|s| {
            s.gcs.insert(name.to_string(), run);
        }) {
            tracing::warn!("recording gc of {name}: {e:#}");
        }
    }
}

fn open_repo(rc: &config::RepoConf) -> Result<store::Repository> {
    let g = crate::Global {
        repo: Some(rc.path.clone()),
        password_file: rc.password_file.clone(),
        key_file: rc.key_file.clone(),
        verbose: 0,
        backend: Default::default(),
    };
    crate::secret::open(&g)
}

/// Prunes the (domain, policy) group by the policy's numbers; `None` when
/// the policy sets none.
fn prune(
    repo: &store::Repository,
    dom: &str,
    policy: &str,
    pol: &PolicyConf,
) -> Result<Option<usize>> {
    let keep = pol.keep();
    if !keep.any() {
        return Ok(None);
    }
    let snaps: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| s.source == dom && s.policy.as_deref() == Some(policy))
        .collect();
    let decisions = store::prune::plan(snaps, &keep, &chrono::Local)?;
    let n = store::prune::execute(repo, &decisions)?;
    if n > 0 {
        tracing::info!("pruned {n} snapshots of {dom} ({policy})");
    }
    Ok(Some(n))
}
