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
    // Groups by (source, policy), in order of first appearance.
    let mut groups: Vec<Vec<Snapshot>> = Vec::new();
    for s in snapshots {
        match groups.iter_mut().find(|g| g[0].group() == s.group()) {
            Some(g) => g.push(s),
            None => groups.push(vec![s]),
        }
    }
    let mut out = Vec::new();
    for mut snaps in groups {
        // Oldest first, as `apply` breaks ties in time by position.
        snaps.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        let times: Vec<_> = snaps.iter().map(|s| s.time).collect();
        let rules =
            retention::apply(&times, keep, tz).map_err(|e| Error::Invalid(e.to_string()))?;
        out.extend(
            snaps
                .into_iter()
                .zip(rules)
                .map(|(snapshot, rule)| Decision { snapshot, rule })
                .rev(),
        );
    }
    Ok(out)
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
