//! Small sealed reports beside a snapshot, `PREFIX<snapshot id>.<time>`,
//! in two families: restore drill reports (`drills/`: what the agent's
//! drill found when it booted the snapshot, so any host holding the key and
//! the dashboard can say when it was last proven bootable) and boot sets
//! (`bootsets/`: the blocks a live restore's guest read first, which the
//! next live restore of the VM fetches first). The store keeps them as
//! opaque JSON; the agent and the NBD server define their fields. Deleted
//! with their snapshot; not copied by sync.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::error::Result;
use crate::format::id::Id;
use crate::format::layout::{BOOT_SETS, DRILLS};
use crate::format::object;
use crate::repo::condemned::delete_if_there;
use crate::repo::Repository;

/// One family of reports: where they live and the kind sealed into each.
#[derive(Clone, Copy, Debug)]
pub struct Reports {
    prefix: &'static str,
    kind: &'static str,
}

/// Restore drill reports.
pub const DRILL: Reports = Reports {
    prefix: DRILLS,
    kind: "drill",
};

/// Boot sets recorded by live restores.
pub const BOOT_SET: Reports = Reports {
    prefix: BOOT_SETS,
    kind: "boot-set",
};

impl Reports {
    fn name(&self, snapshot: &Id, unix_secs: u64) -> String {
        format!("{}{snapshot}.{unix_secs:016x}", self.prefix)
    }

    /// The snapshot and time of a report's name, if it is one of these.
    fn parse(&self, name: &str) -> Option<(Id, u64)> {
        let (id, t) = name.strip_prefix(self.prefix)?.split_once('.')?;
        Some((id.parse().ok()?, u64::from_str_radix(t, 16).ok()?))
    }

    /// The newest report of `snapshot`, still sealed (no key needed).
    pub fn fetch_latest(self, backend: &dyn Backend, snapshot: &Id) -> Result<Fetched> {
        let found = match self
            .listed(backend, &format!("{}{snapshot}.", self.prefix))?
            .into_iter()
            .next()
        {
            Some((_, name)) => {
                let sealed = backend.get(&name)?;
                Some((name, sealed))
            }
            None => None,
        };
        Ok(Fetched {
            reports: self,
            found,
        })
    }

    /// These reports listed under `prefix`: (snapshot, object name), newest
    /// first.
    fn listed(&self, backend: &dyn Backend, prefix: &str) -> Result<Vec<(Id, String)>> {
        let mut all: Vec<(u64, Id, String)> = backend
            .list(prefix)?
            .into_iter()
            .filter_map(|o| self.parse(&o.name).map(|(id, t)| (t, id, o.name)))
            .collect();
        all.sort_by(|a, b| b.cmp(a));
        Ok(all.into_iter().map(|(_, id, n)| (id, n)).collect())
    }
}

impl Repository {
    /// Stores a report of `snapshot` made at `unix_secs`.
    pub fn put_report(&self, r: Reports, snapshot: &Id, unix_secs: u64, body: &[u8]) -> Result<()> {
        let sealed = object::seal(&self.keys().session(), r.kind, body);
        self.put_sealed(&r.name(snapshot, unix_secs), &sealed)
    }

    /// The newest report of each snapshot that has one, by snapshot id.
    pub fn latest_reports(&self, r: Reports) -> Result<BTreeMap<Id, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for (id, name) in self.reports_under(r, r.prefix)? {
            if let std::collections::btree_map::Entry::Vacant(v) = out.entry(id) {
                v.insert(self.load_report(r, &name)?);
            }
        }
        Ok(out)
    }

    /// Every report's object name, newest first.
    pub fn report_names(&self, r: Reports) -> Result<Vec<String>> {
        Ok(self
            .reports_under(r, r.prefix)?
            .into_iter()
            .map(|(_, n)| n)
            .collect())
    }

    /// The report stored as `name` (from [`Self::report_names`]).
    pub fn load_report(&self, r: Reports, name: &str) -> Result<Vec<u8>> {
        let bytes = self.backend().get(name)?;
        object::open(self.keys(), r.kind, name, &bytes)
    }

    /// The newest report of `snapshot`, if it has one.
    pub fn latest_report(&self, r: Reports, snapshot: &Id) -> Result<Option<Vec<u8>>> {
        self.open_fetched(r.fetch_latest(self.backend().as_ref(), snapshot)?)
    }

    /// The report [`Reports::fetch_latest`] fetched, opened with the key.
    pub fn open_fetched(&self, f: Fetched) -> Result<Option<Vec<u8>>> {
        match f.found {
            Some((name, sealed)) => {
                object::open(self.keys(), f.reports.kind, &name, &sealed).map(Some)
            }
            None => Ok(None),
        }
    }

    /// The reports listed under `prefix`: (snapshot, object name), newest
    /// first.
    fn reports_under(&self, r: Reports, prefix: &str) -> Result<Vec<(Id, String)>> {
        r.listed(self.backend().as_ref(), prefix)
    }
}

/// A snapshot's newest report of one family, fetched sealed: finding and
/// fetching it needs no key, so a live restore does it while the key
/// unlocks (on S3 two round trips off its start).
#[derive(Debug)]
pub struct Fetched {
    reports: Reports,
    /// Its object name and sealed bytes; `None`: the snapshot has none.
    found: Option<(String, Vec<u8>)>,
}

/// Deletes every report of a snapshot, of both families.
pub fn delete_all(backend: &dyn Backend, snapshot: &Id) -> Result<()> {
    for r in [DRILL, BOOT_SET] {
        for o in backend.list(&format!("{}{snapshot}.", r.prefix))? {
            delete_if_there(backend, &o.name)?;
        }
    }
    Ok(())
}
