//! What the pages show of each repository, kept in the web process: a
//! summary of every snapshot and the repository's sizes. Opening 50k
//! sealed manifests per request would take seconds, so a refresh lists the
//! snapshot names (one listing) and opens only the manifests it has not
//! seen; names gone from the listing are dropped. Pages read an immutable
//! [`View`] (an `Arc` swapped in by the refresh) and never wait for one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bulwark_store::{Id, Repository};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Config, RepoConf};

/// One snapshot, as the pages list it.
#[derive(Clone, Debug, Serialize)]
pub struct Snap {
    pub id: Id,
    pub repository: String,
    pub source: String,
    pub policy: Option<String>,
    pub host: String,
    pub time: DateTime<Utc>,
    /// The disks' sizes (logical bytes).
    pub size: u64,
    /// Bytes covered by chunks.
    pub data_bytes: u64,
    /// What this backup added to the repository (compressed, sealed).
    pub stored: u64,
    pub disks: Vec<String>,
    /// A VM snapshot (has domain XML): `restore vm` takes it.
    pub vm: bool,
}

impl Snap {
    fn of(repository: &str, s: &bulwark_store::Snapshot) -> Snap {
        Snap {
            id: s.id,
            repository: repository.to_string(),
            source: s.source.clone(),
            policy: s.policy.clone(),
            host: s.host.clone(),
            time: s.time,
            size: s.size(),
            data_bytes: s.disks.iter().map(|d| d.data_bytes).sum(),
            stored: s.stats.bytes_stored,
            disks: s.disks.iter().map(|d| d.name.clone()).collect(),
            vm: s.domain_xml.is_some(),
        }
    }
}

/// Sizes of a repository's objects.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Sizes {
    /// Every object: packs, index, manifests, chunk lists.
    pub total: u64,
    /// Packs (the chunks as stored: compressed and sealed).
    pub stored: u64,
    pub packs: u64,
}

/// One repository as last seen.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepoView {
    pub name: String,
    pub location: String,
    /// Every snapshot by source, newest first.
    #[serde(skip)]
    pub by_source: BTreeMap<String, Vec<Arc<Snap>>>,
    pub snapshots: usize,
    /// Sum of the snapshots' disk sizes.
    pub logical: u64,
    /// Sum of the bytes their chunks cover.
    pub data: u64,
    pub sizes: Sizes,
    /// Unix seconds of the last refresh that worked.
    pub refreshed: Option<i64>,
    /// Why the last refresh failed.
    pub error: Option<String>,
}

impl RepoView {
    /// The view lists snapshot `id` of `source`.
    pub fn has(&self, source: &str, id: &Id) -> bool {
        self.by_source
            .get(source)
            .is_some_and(|l| l.iter().any(|s| s.id == *id))
    }

    /// Data bytes per stored byte (1.0 when nothing is stored).
    pub fn dedup_ratio(&self) -> f64 {
        if self.sizes.stored == 0 {
            1.0
        } else {
            self.data as f64 / self.sizes.stored as f64
        }
    }

    /// Builds a view from snapshot summaries (refreshes and benchmarks).
    pub fn from_snaps(
        name: &str,
        location: &str,
        snaps: impl IntoIterator<Item = Arc<Snap>>,
    ) -> RepoView {
        let mut v = RepoView {
            name: name.to_string(),
            location: location.to_string(),
            ..RepoView::default()
        };
        for s in snaps {
            v.snapshots += 1;
            v.logical += s.size;
            v.data += s.data_bytes;
            v.by_source.entry(s.source.clone()).or_default().push(s);
        }
        for list in v.by_source.values_mut() {
            list.sort_by(|a, b| b.time.cmp(&a.time).then(b.id.cmp(&a.id)));
        }
        v
    }
}

/// Everything, as of the last refreshes.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub repos: BTreeMap<String, Arc<RepoView>>,
}

impl View {
    /// The snapshots of `source` in every repository, newest first.
    pub fn of_source(&self, source: &str) -> Vec<Arc<Snap>> {
        let mut all: Vec<Arc<Snap>> = self
            .repos
            .values()
            .flat_map(|r| r.by_source.get(source).into_iter().flatten().cloned())
            .collect();
        all.sort_by_key(|s| std::cmp::Reverse(s.time));
        all
    }

    /// Sources that have VM snapshots, in every repository.
    pub fn vm_sources(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .repos
            .values()
            .flat_map(|r| {
                r.by_source
                    .iter()
                    .filter(|(_, l)| l.iter().any(|s| s.vm))
                    .map(|(n, _)| n.clone())
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// What a refresh keeps between runs for one repository.
struct Known {
    repo: Option<Arc<Repository>>,
    snaps: HashMap<Id, Arc<Snap>>,
    sizes_at: Option<Instant>,
    sizes: Sizes,
}

/// How often the repositories' object sizes are listed again (a listing
/// of every pack).
const SIZES_EVERY: Duration = Duration::from_secs(120);

pub struct Cache {
    view: RwLock<Arc<View>>,
    known: BTreeMap<String, Mutex<Known>>,
    confs: BTreeMap<String, RepoConf>,
}

impl Cache {
    pub fn new(cfg: &Config) -> Cache {
        Cache {
            view: RwLock::new(Arc::new(View::default())),
            known: cfg
                .repositories
                .keys()
                .map(|n| {
                    (
                        n.clone(),
                        Mutex::new(Known {
                            repo: None,
                            snaps: HashMap::new(),
                            sizes_at: None,
                            sizes: Sizes::default(),
                        }),
                    )
                })
                .collect(),
            confs: cfg.repositories.clone(),
        }
    }

    /// A cache holding `view` (benchmarks, tests).
    pub fn with_view(view: View) -> Cache {
        Cache {
            view: RwLock::new(Arc::new(view)),
            known: BTreeMap::new(),
            confs: BTreeMap::new(),
        }
    }

    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The open repository `name` (opened once, then shared).
    pub fn repo(&self, name: &str) -> anyhow::Result<Arc<Repository>> {
        let known = self
            .known
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no repository {name:?}"))?;
        let mut k = known.lock().unwrap_or_else(|e| e.into_inner());
        open(&mut k, name, &self.confs[name])
    }

    /// The repository with the credentials that may delete (prune, GC):
    /// its maintenance credentials when the config names them (the backup
    /// ones may not delete), else the shared handle.
    pub fn maintenance_repo(&self, name: &str) -> anyhow::Result<Arc<Repository>> {
        match self.confs.get(name) {
            Some(rc) if rc.maintenance_credentials.is_some() => Ok(Arc::new(
                rc.open_as(crate::config::Role::Maintenance)
                    .map_err(|e| e.context(format!("repository {name}")))?,
            )),
            _ => self.repo(name),
        }
    }

    /// Refreshes one repository's view now and forgets the shared handle's
    /// index (after a change the dashboard made: a GC moves chunks).
    pub fn changed(&self, name: &str) {
        if let Some(k) = self.known.get(name) {
            if let Some(r) = &k.lock().unwrap_or_else(|e| e.into_inner()).repo {
                r.invalidate_index();
            }
        }
        self.refresh(name);
    }

    /// Refreshes every repository (each failure is kept in its view).
    pub fn refresh_all(&self) {
        for name in self.confs.keys() {
            self.refresh(name);
        }
    }

    /// Refreshes one repository's view.
    pub fn refresh(&self, name: &str) {
        let (Some(known), Some(rc)) = (self.known.get(name), self.confs.get(name)) else {
            return;
        };
        let mut k = known.lock().unwrap_or_else(|e| e.into_inner());
        let view = match refresh_one(&mut k, name, rc) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("web: repository {name}: {e:#}");
                let old = self.view().repos.get(name).cloned().unwrap_or_default();
                RepoView {
                    name: name.to_string(),
                    location: rc.path.clone(),
                    error: Some(format!("{e:#}")),
                    ..(*old).clone()
                }
            }
        };
        let mut all = self.view.write().unwrap_or_else(|e| e.into_inner());
        let mut next = (**all).clone();
        next.repos.insert(name.to_string(), Arc::new(view));
        *all = Arc::new(next);
    }
}

fn open(k: &mut Known, name: &str, rc: &RepoConf) -> anyhow::Result<Arc<Repository>> {
    if let Some(r) = &k.repo {
        return Ok(r.clone());
    }
    let r = Arc::new(
        rc.open()
            .map_err(|e| e.context(format!("repository {name}")))?,
    );
    k.repo = Some(r.clone());
    Ok(r)
}

/// Lists snapshot names, opens the new manifests, forgets the gone ones.
fn refresh_one(k: &mut Known, name: &str, rc: &RepoConf) -> anyhow::Result<RepoView> {
    let repo = open(k, name, rc)?;
    let listed: Vec<Id> = repo
        .backend()
        .list(bulwark_store::format::layout::SNAPSHOTS)?
        .into_iter()
        .filter_map(|o| {
            o.name[bulwark_store::format::layout::SNAPSHOTS.len()..]
                .parse()
                .ok()
        })
        .collect();
    let new: Vec<&Id> = listed.iter().filter(|i| !k.snaps.contains_key(i)).collect();
    let added = !new.is_empty();
    if new.len() > 32 {
        // Many at once (the first refresh): the store opens them in parallel.
        for s in repo.snapshots()? {
            k.snaps
                .entry(s.id)
                .or_insert_with(|| Arc::new(Snap::of(name, &s)));
        }
    } else {
        for id in new {
            let s = repo.find_snapshot(&id.to_hex())?;
            k.snaps.insert(s.id, Arc::new(Snap::of(name, &s)));
        }
    }
    let changed = added || listed.len() != k.snaps.len();
    let keep: std::collections::HashSet<&Id> = listed.iter().collect();
    k.snaps.retain(|id, _| keep.contains(id));
    // Backups, prunes and GCs change the sizes; so does time (other hosts).
    if changed || k.sizes_at.is_none_or(|t| t.elapsed() > SIZES_EVERY) {
        let now = sizes(&repo)?;
        // Other packs (a backup, a GC's repack or delete): the shared
        // handle's index is stale; the next reader loads it again.
        if changed || now != k.sizes {
            repo.invalidate_index();
        }
        k.sizes = now;
        k.sizes_at = Some(Instant::now());
    }
    let mut v = RepoView::from_snaps(name, &rc.path, k.snaps.values().cloned());
    v.sizes = k.sizes.clone();
    v.refreshed = Some(Utc::now().timestamp());
    Ok(v)
}

fn sizes(repo: &Repository) -> anyhow::Result<Sizes> {
    let mut s = Sizes::default();
    for prefix in bulwark_store::format::layout::METADATA
        .iter()
        .chain([&bulwark_store::format::layout::DATA])
    {
        for o in repo.backend().list(prefix)? {
            s.total += o.size;
            if *prefix == bulwark_store::format::layout::DATA {
                s.stored += o.size;
                s.packs += 1;
            }
        }
    }
    Ok(s)
}

/// Refreshes every repository now, then every `every`, on a thread of its
/// own, for as long as the process runs.
pub fn keep_fresh(web: Arc<super::Web>, every: Duration) {
    std::thread::spawn(move || loop {
        web.cache.refresh_all();
        std::thread::sleep(every);
    });
}
