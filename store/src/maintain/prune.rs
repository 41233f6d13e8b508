//! Prune: apply the retention rules ([`crate::maintain::retention`]) to each group of
//! snapshots, (source, policy), and remove what they do not keep. Chunks
//! stay until a GC finds them unreferenced (`docs/gc.md`).

use chrono::TimeZone;

use crate::error::{Error, Result};
use crate::format::snapshot::Snapshot;
use crate::maintain::retention::{self, KeepOptions, Rule};
use crate::repo::Repository;

/// One snapshot and the rule that keeps it (`None`: removed).
#[derive(Clone, Debug)]
pub struct Decision {
    pub snapshot: Snapshot,
    pub rule: Option<Rule>,
}

impl Decision {
    pub fn keep(&self) -> bool {
        self.rule.is_some()
    }
}

/// Decisions for every snapshot of `snapshots`, group by group (groups in
/// order of first appearance, snapshots newest first within a group).
pub fn plan<Tz: TimeZone>(
    snapshots: Vec<Snapshot>,
    keep: &KeepOptions,
    tz: &Tz,
) -> Result<Vec<Decision>> {
    let decided = retention::by_group(
        snapshots,
        |s| (s.source.clone(), s.policy.clone()),
        |s| (s.time, s.id),
        keep,
        tz,
    )
    .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(decided
        .into_iter()
        .map(|(snapshot, rule)| Decision { snapshot, rule })
        .collect())
}

/// Removes the snapshots `decisions` do not keep; returns how many.
pub fn execute(repo: &Repository, decisions: &[Decision]) -> Result<usize> {
    let mut n = 0;
    for d in decisions.iter().filter(|d| !d.keep()) {
        repo.delete_snapshot(&d.snapshot)?;
        n += 1;
    }
    Ok(n)
}
