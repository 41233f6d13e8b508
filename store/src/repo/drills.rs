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
        let mut newest: BTreeMap<Id, (u64, String)> = BTreeMap::new();
        for o in self.backend().list(DRILLS)? {
            let Some((id, t)) = layout::drill_of(&o.name) else {
                continue; // not a report of ours
            };
            if newest.get(&id).is_none_or(|(have, _)| t > *have) {
                newest.insert(id, (t, o.name));
            }
        }
        let mut out = BTreeMap::new();
        for (id, (_, name)) in newest {
            let bytes = self.backend().get(&name)?;
            out.insert(id, object::open(self.keys(), KIND, &name, &bytes)?);
        }
        Ok(out)
    }

    /// Every report's object name, newest first.
    pub fn drill_report_names(&self) -> Result<Vec<String>> {
        let mut all: Vec<(u64, String)> = self
            .backend()
            .list(DRILLS)?
            .into_iter()
            .filter_map(|o| layout::drill_of(&o.name).map(|(_, t)| (t, o.name)))
            .collect();
        all.sort_by(|a, b| b.cmp(a));
        Ok(all.into_iter().map(|(_, n)| n).collect())
    }

    /// The report stored as `name` (from [`Self::drill_report_names`]).
    pub fn load_drill_report(&self, name: &str) -> Result<Vec<u8>> {
        let bytes = self.backend().get(name)?;
        object::open(self.keys(), KIND, name, &bytes)
    }

    /// The newest report of `snapshot`, if it has one.
    pub fn latest_drill_report(&self, snapshot: &Id) -> Result<Option<Vec<u8>>> {
        let names = self.backend().list(&format!("{DRILLS}{snapshot}."))?;
        let Some(name) = names
            .into_iter()
            .filter_map(|o| layout::drill_of(&o.name).map(|(_, t)| (t, o.name)))
            .max()
            .map(|(_, n)| n)
        else {
            return Ok(None);
        };
        let bytes = self.backend().get(&name)?;
        object::open(self.keys(), KIND, &name, &bytes).map(Some)
    }
}

/// Deletes every drill report of a snapshot.
pub fn delete_all(backend: &dyn Backend, snapshot: &Id) -> Result<()> {
    for o in backend.list(&format!("{DRILLS}{snapshot}."))? {
        delete_if_there(backend, &o.name)?;
    }
    Ok(())
}
