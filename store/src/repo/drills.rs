//! Restore drill reports (`drills/<snapshot id>.<time>`): what the agent's
//! drill found when it booted a snapshot, sealed like manifests, so any
//! host holding the key (and the dashboard) can say when a snapshot was
//! last proven bootable. The store keeps them as opaque JSON; the agent
//! defines their fields. Deleted with their snapshot.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::error::Result;
use crate::format::id::Id;
use crate::format::layout::{self, DRILLS};
use crate::format::object;
use crate::repo::condemned::delete_if_there;
use crate::repo::Repository;

/// The kind sealed into each report.
pub const KIND: &str = "drill";

impl Repository {
    /// Stores a drill report of `snapshot` made at `unix_secs`.
    pub fn put_drill_report(&self, snapshot: &Id, unix_secs: u64, report: &[u8]) -> Result<()> {
        let sealed = object::seal(&self.keys().session(), KIND, report);
        self.put_sealed(&layout::drill(snapshot, unix_secs), &sealed)
    }

    /// The newest report of each snapshot that has one, by snapshot id.
    pub fn latest_drill_reports(&self) -> Result<BTreeMap<Id, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for (id, name) in self.drill_reports_under(DRILLS)? {
            if let std::collections::btree_map::Entry::Vacant(v) = out.entry(id) {
                v.insert(self.load_drill_report(&name)?);
            }
        }
        Ok(out)
    }

    /// Every report's object name, newest first.
    pub fn drill_report_names(&self) -> Result<Vec<String>> {
        Ok(self
            .drill_reports_under(DRILLS)?
            .into_iter()
            .map(|(_, n)| n)
            .collect())
    }

    /// The report stored as `name` (from [`Self::drill_report_names`]).
    pub fn load_drill_report(&self, name: &str) -> Result<Vec<u8>> {
        let bytes = self.backend().get(name)?;
        object::open(self.keys(), KIND, name, &bytes)
    }

    /// The newest report of `snapshot`, if it has one.
    pub fn latest_drill_report(&self, snapshot: &Id) -> Result<Option<Vec<u8>>> {
        match self
            .drill_reports_under(&format!("{DRILLS}{snapshot}."))?
            .first()
        {
            Some((_, name)) => self.load_drill_report(name).map(Some),
            None => Ok(None),
        }
    }

    /// The reports listed under `prefix`: (snapshot, object name), newest
    /// first.
    fn drill_reports_under(&self, prefix: &str) -> Result<Vec<(Id, String)>> {
        let mut all: Vec<(u64, Id, String)> = self
            .backend()
            .list(prefix)?
            .into_iter()
            .filter_map(|o| layout::drill_of(&o.name).map(|(id, t)| (t, id, o.name)))
            .collect();
        all.sort_by(|a, b| b.cmp(a));
        Ok(all.into_iter().map(|(_, id, n)| (id, n)).collect())
    }
}

/// Deletes every drill report of a snapshot.
pub fn delete_all(backend: &dyn Backend, snapshot: &Id) -> Result<()> {
    for o in backend.list(&format!("{DRILLS}{snapshot}."))? {
        delete_if_there(backend, &o.name)?;
    }
    Ok(())
}
