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
use crate::repo;

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
    // Each with whether it is one to copy.
    let all = there
        .iter()
        .map(|r| (r, false))
        .chain(todo.iter().map(|r| (*r, true)));
    let wanted: std::collections::BTreeSet<_> = retention::by_group(
        all.collect(),
        |(r, _)| r.group(),
        |(r, _)| (r.time, r.snapshot),
        keep,
        tz,
    )
    .map_err(|e| Error::Invalid(e.to_string()))?
    .into_iter()
    .filter(|((_, new), rule)| *new && rule.is_some())
    .map(|((r, _), _)| r.snapshot)
    .collect();
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
    let mut records = super::plan::load_records(dst)?;
    records.retain(|r| manifests.contains(&r.snapshot));
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
    let selected = groups.select(&records).into_iter().cloned().collect();
    let decided = retention::by_group(
        selected,
        |r: &SyncRecord| (r.source.clone(), r.policy.clone()),
        |r| (r.time, r.snapshot),
        keep,
        tz,
    )
    .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(decided
        .into_iter()
        .map(|(record, rule)| Retained { record, rule })
        .collect())
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
