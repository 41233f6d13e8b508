//! Which snapshots a sync takes: its filters, applied to the sync records.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::format::sync_record::SyncRecord;

/// `--source`, `--policy`, `--transfer-last`, `--since`.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    /// Globs of sources (`web*`); one starting with `!` excludes. None: all.
    pub sources: Vec<String>,
    /// Globs of policies, the same way; a snapshot without a policy matches
    /// only exclusions.
    pub policies: Vec<String>,
    /// Of each group (source, policy), only the newest N at the source.
    pub transfer_last: Option<usize>,
    /// Only snapshots taken at or after this time.
    pub since: Option<DateTime<Utc>>,
}

impl Filters {
    /// Refuses a pattern that is not a glob before anything is read.
    pub fn check(&self) -> Result<()> {
        for p in self.sources.iter().chain(&self.policies) {
            glob::Pattern::new(p.strip_prefix('!').unwrap_or(p))
                .map_err(|e| Error::Invalid(format!("{p:?} is not a pattern: {e}")))?;
        }
        Ok(())
    }

    /// The records the filters select, oldest first.
    pub fn select<'a>(&self, records: &'a [SyncRecord]) -> Vec<&'a SyncRecord> {
        let mut groups: BTreeMap<(&str, Option<&str>), Vec<&SyncRecord>> = BTreeMap::new();
        for r in records {
            if matches(&self.sources, Some(&r.source))
                && matches(&self.policies, r.policy.as_deref())
                && self.since.is_none_or(|t| r.time >= t)
            {
                groups.entry(r.group()).or_default().push(r);
            }
        }
        let mut out: Vec<&SyncRecord> = Vec::new();
        for mut g in groups.into_values() {
            g.sort_by_key(|r| (r.time, r.snapshot));
            let skip = self.transfer_last.map_or(0, |n| g.len().saturating_sub(n));
            out.extend(g.into_iter().skip(skip));
        }
        out.sort_by_key(|r| (r.time, r.snapshot));
        out
    }
}

/// Whether `value` passes `patterns`: not excluded by a `!` pattern, and
/// included by one of the others (or there are none).
fn matches(patterns: &[String], value: Option<&str>) -> bool {
    let hit = |p: &str| value.is_some_and(|v| glob::Pattern::new(p).is_ok_and(|g| g.matches(v)));
    let (exclude, include): (Vec<&String>, Vec<&String>) =
        patterns.iter().partition(|p| p.starts_with('!'));
    if exclude.iter().any(|p| hit(&p[1..])) {
        return false;
    }
    include.is_empty() || include.iter().any(|p| hit(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::id::Id;

    fn rec(source: &str, policy: Option<&str>, day: u32) -> SyncRecord {
        SyncRecord {
            version: 1,
            snapshot: Id::random(),
            generation: 0,
            source: source.into(),
            policy: policy.map(Into::into),
            host: "h".into(),
            time: format!("2026-11-{day:02}T02:00:00Z").parse().unwrap(),
            chunk_lists: vec![],
            packs: vec![],
        }
    }

    fn picked(f: &Filters, all: &[SyncRecord]) -> Vec<(String, u32)> {
        use chrono::Datelike;
        f.select(all)
            .into_iter()
            .map(|r| (r.source.clone(), r.time.day()))
            .collect()
    }

    #[test]
    fn filters_select_by_glob_group_and_time() {
        let all = vec![
            rec("web01", Some("daily"), 1),
            rec("web01", Some("daily"), 2),
            rec("web01", Some("daily"), 3),
            rec("web02", Some("weekly"), 2),
            rec("db01", Some("daily"), 4),
            rec("img", None, 5),
        ];
        let f = |sources: &[&str], policies: &[&str]| Filters {
            sources: sources.iter().map(|s| s.to_string()).collect(),
            policies: policies.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(picked(&Filters::default(), &all).len(), 6);
        assert_eq!(
            picked(&f(&["web*", "!web02"], &[]), &all),
            [
                ("web01".into(), 1),
                ("web01".into(), 2),
                ("web01".into(), 3)
            ]
        );
        assert_eq!(
            picked(&f(&[], &["daily"]), &all).len(),
            4,
            "a policy pattern skips image backups"
        );
        assert_eq!(picked(&f(&[], &["!weekly"]), &all).len(), 5);
        let last = Filters {
            transfer_last: Some(1),
            ..f(&["web*"], &[])
        };
        assert_eq!(
            picked(&last, &all),
            [("web02".into(), 2), ("web01".into(), 3)],
            "the newest of each group, oldest first"
        );
        let since = Filters {
            since: Some("2026-11-03T00:00:00Z".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(picked(&since, &all).len(), 3);
        assert!(f(&["[z-a"], &[]).check().is_err());
    }
}
