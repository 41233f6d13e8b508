//! A replica's own retention, applied without its key: each snapshot's
//! sync record carries its group, its time and the names of its objects,
//! which is all prune needs (`keep_weekly = 52` at the backup site while
//! the source keeps a week of dailies). Space comes back with the
//! replica's GC, which does need the key.

use chrono::TimeZone;

use super::select::Filters;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::format::layout;
use crate::format::sync_record::SyncRecord;
use crate::maintain::retention::{self, KeepOptions, Rule};
use crate::repo::{self, sync_records};

/// One replica snapshot and the rule that keeps it (`None`: removed).
#[derive(Clone, Debug)]
pub struct Retained {
    pub record: SyncRecord,
    pub rule: Option<Rule>,
}

/// Of the snapshots a sync would copy, those the destination's retention
/// keeps, counted together with what the destination has: a replica that
/// keeps weeklies does not copy a daily only to prune it after the run
/// (and again on the next one).
pub fn worth_copying<'a, Tz: TimeZone>(
    dst: &dyn Backend,
    todo: Vec<&'a SyncRecord>,
    keep: &KeepOptions,
    tz: &Tz,
) -> Result<Vec<&'a SyncRecord>> {
    let there = replica_records(dst)?;
    // Per group, its snapshots and whether each is one to copy.
    type Group<'r> = (&'r str, Option<&'r str>);
    let mut by_group: std::collections::BTreeMap<Group, Vec<(&SyncRecord, bool)>> =
        Default::default();
    for r in there.iter() {
        by_group.entry(r.group()).or_default().push((r, false));
    }
    for r in &todo {
        by_group.entry(r.group()).or_default().push((r, true));
    }
    let mut wanted = std::collections::BTreeSet::new();
    for mut snaps in by_group.into_values() {
        snaps.sort_by_key(|(r, _)| (r.time, r.snapshot));
        let times: Vec<_> = snaps.iter().map(|(r, _)| r.time).collect();
        let rules =
            retention::apply(&times, keep, tz).map_err(|e| Error::Invalid(e.to_string()))?;
        for ((r, new), rule) in snaps.into_iter().zip(rules) {
            if new && rule.is_some() {
                wanted.insert(r.snapshot);
            }
        }
    }
    Ok(todo
        .into_iter()
        .filter(|r| wanted.contains(&r.snapshot))
        .collect())
}

/// The records of the replica's complete snapshots (those with a
/// manifest: a record without one is what a killed sync left, and must not
/// count as a kept snapshot).
fn replica_records(dst: &dyn Backend) -> Result<Vec<SyncRecord>> {
    let manifests = super::plan::ids_under(dst, layout::SNAPSHOTS)?;
    let mut records = Vec::new();
    for (id, name) in sync_records::newest(dst)? {
        if manifests.contains(&id) {
            // A record gone meanwhile was pruned by someone else.
            records.extend(sync_records::load(dst, &name)?);
        }
    }
    Ok(records)
}

/// The retention decisions for the snapshots at `dst` of the groups the
/// filters' sources and policies select (their `transfer_last` and
/// `since` pick what to copy, not what to keep), newest first per group.
pub fn plan<Tz: TimeZone>(
    dst: &dyn Backend,
    filters: &Filters,
    keep: &KeepOptions,
    tz: &Tz,
) -> Result<Vec<Retained>> {
    let groups = Filters {
        transfer_last: None,
        since: None,
        ..filters.clone()
    };
    let records = replica_records(dst)?;
    let mut by_group: std::collections::BTreeMap<(String, Option<String>), Vec<SyncRecord>> =
        Default::default();
    for r in groups.select(&records) {
        let (s, p) = r.group();
        by_group
            .entry((s.to_string(), p.map(String::from)))
            .or_default()
            .push(r.clone());
    }
    let mut out = Vec::new();
    for snaps in by_group.into_values() {
        // Oldest first (as `select` returns them), as `apply` breaks ties.
        let times: Vec<_> = snaps.iter().map(|r| r.time).collect();
        let rules =
            retention::apply(&times, keep, tz).map_err(|e| Error::Invalid(e.to_string()))?;
        out.extend(
            snaps
                .into_iter()
                .zip(rules)
                .map(|(record, rule)| Retained { record, rule })
                .rev(),
        );
    }
    Ok(out)
}

/// Removes the snapshots the plan does not keep; returns how many.
pub fn execute(dst: &dyn Backend, plan: &[Retained]) -> Result<usize> {
    let mut n = 0;
    for r in plan.iter().filter(|r| r.rule.is_none()) {
        repo::delete_snapshot_objects(dst, &r.record.snapshot, &r.record.chunk_lists)?;
        n += 1;
    }
    Ok(n)
}
