//! Which snapshots of a group a prune keeps: Proxmox Backup Server's rules,
//! stated once.
//!
//! Snapshots are taken newest first. The rules run in the order keep-last,
//! -hourly, -daily, -weekly, -monthly, -yearly. Each puts snapshots into
//! buckets (every snapshot its own for keep-last; the local hour, day, ISO
//! week, month or year for the others) and keeps the newest snapshot of
//! each of its first N buckets, where
//! - a bucket that already holds a snapshot kept by an earlier rule is
//!   passed over and does not count toward N;
//! - an older snapshot in a bucket this rule has kept from is marked for
//!   removal there and then, so no later rule can keep it;
//! - the rule stops once it has N buckets.
//!
//! Whatever no rule kept is removed. Local time is the caller's time zone
//! (the CLI uses the host's, which honours `TZ`).

use std::collections::HashSet;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// How many buckets each rule keeps (0: the rule is off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepOptions {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
}

impl KeepOptions {
    /// At least one rule is on.
    pub fn any(&self) -> bool {
        Rule::ALL.iter().any(|r| self.count(*r) > 0)
    }

    fn count(&self, rule: Rule) -> u32 {
        match rule {
            Rule::Last => self.keep_last,
            Rule::Hourly => self.keep_hourly,
            Rule::Daily => self.keep_daily,
            Rule::Weekly => self.keep_weekly,
            Rule::Monthly => self.keep_monthly,
            Rule::Yearly => self.keep_yearly,
        }
    }
}

/// The rule that kept a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rule {
    #[serde(rename = "keep-last")]
    Last,
    #[serde(rename = "keep-hourly")]
    Hourly,
    #[serde(rename = "keep-daily")]
    Daily,
    #[serde(rename = "keep-weekly")]
    Weekly,
    #[serde(rename = "keep-monthly")]
    Monthly,
    #[serde(rename = "keep-yearly")]
    Yearly,
}

impl Rule {
    /// In the order they are applied.
    pub const ALL: [Rule; 6] = [
        Rule::Last,
        Rule::Hourly,
        Rule::Daily,
        Rule::Weekly,
        Rule::Monthly,
        Rule::Yearly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Last => "keep-last",
            Rule::Hourly => "keep-hourly",
            Rule::Daily => "keep-daily",
            Rule::Weekly => "keep-weekly",
            Rule::Monthly => "keep-monthly",
            Rule::Yearly => "keep-yearly",
        }
    }

    /// The bucket of `t` (local time in `tz`); `i` makes keep-last's
    /// buckets one per snapshot.
    fn bucket<Tz: TimeZone>(self, t: &DateTime<Utc>, i: usize, tz: &Tz) -> (i32, u32, u32, u32) {
        let l = t.with_timezone(tz);
        match self {
            Rule::Last => (0, 0, 0, i as u32),
            Rule::Hourly => (l.year(), l.month(), l.day(), l.hour() + 1),
            Rule::Daily => (l.year(), l.month(), l.day(), 0),
            Rule::Weekly => {
                let w = l.iso_week();
                (w.year(), w.week(), 0, 0)
            }
            Rule::Monthly => (l.year(), l.month(), 0, 0),
            Rule::Yearly => (l.year(), 0, 0, 0),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RetentionError {
    #[error("no keep rule given: name at least one (--keep-last, --keep-daily, ...)")]
    NoRule,
}

/// The rules applied group by group: `items` grouped by `group` (groups in
/// order of first appearance), each group ordered oldest first by
/// `order` (time, then a tie-breaking id), every item returned with the
/// rule that keeps it, newest first within its group. Prune (snapshots)
/// and a replica's retention (sync records) both decide through here.
pub fn by_group<T, G: PartialEq, Tz: TimeZone>(
    items: Vec<T>,
    group: impl Fn(&T) -> G,
    order: impl Fn(&T) -> (DateTime<Utc>, crate::format::id::Id),
    keep: &KeepOptions,
    tz: &Tz,
) -> Result<Vec<(T, Option<Rule>)>, RetentionError> {
    let mut groups: Vec<(G, Vec<T>)> = Vec::new();
    for it in items {
        let g = group(&it);
        match groups.iter_mut().find(|(k, _)| *k == g) {
            Some((_, members)) => members.push(it),
            None => groups.push((g, vec![it])),
        }
    }
    let mut out = Vec::new();
    for (_, mut members) in groups {
        // Oldest first, as `apply` breaks ties in time by position.
        members.sort_by_key(|it| order(it));
        let times: Vec<_> = members.iter().map(|it| order(it).0).collect();
        let rules = apply(&times, keep, tz)?;
        out.extend(members.into_iter().zip(rules).rev());
    }
    Ok(out)
}

/// For each of `times` (any order), the rule that keeps it, or `None` if it
/// is to be removed. Ties in time are broken by position (later = newer).
pub fn apply<Tz: TimeZone>(
    times: &[DateTime<Utc>],
    keep: &KeepOptions,
    tz: &Tz,
) -> Result<Vec<Option<Rule>>, RetentionError> {
    if !keep.any() {
        return Err(RetentionError::NoRule);
    }
    // Newest first.
    let mut order: Vec<usize> = (0..times.len()).collect();
    order.sort_by(|&a, &b| times[b].cmp(&times[a]).then(b.cmp(&a)));
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Keep(Rule),
        Remove,
    }
    let mut mark = vec![Mark::Open; times.len()];
    for rule in Rule::ALL {
        let n = keep.count(rule) as usize;
        if n == 0 {
            continue;
        }
        let bucket = |i: usize| rule.bucket(&times[i], i, tz);
        // Buckets that earlier rules already keep a snapshot of.
        let taken: HashSet<_> = order
            .iter()
            .filter(|&&i| matches!(mark[i], Mark::Keep(_)))
            .map(|&i| bucket(i))
            .collect();
        let mut mine = HashSet::new();
        for &i in &order {
            if mark[i] != Mark::Open {
                continue;
            }
            let b = bucket(i);
            if taken.contains(&b) {
                continue;
            }
            if mine.contains(&b) {
                mark[i] = Mark::Remove;
                continue;
            }
            if mine.len() >= n {
                break;
            }
            mine.insert(b);
            mark[i] = Mark::Keep(rule);
        }
    }
    Ok(mark
        .into_iter()
        .map(|m| match m {
            Mark::Keep(r) => Some(r),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::FixedOffset;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn keep(f: impl FnOnce(&mut KeepOptions)) -> KeepOptions {
        let mut k = KeepOptions::default();
        f(&mut k);
        k
    }

    /// Rules of `times` (RFC 3339) in UTC.
    fn rules(times: &[&str], k: &KeepOptions) -> Vec<Option<Rule>> {
        let t: Vec<_> = times.iter().map(|s| utc(s)).collect();
        apply(&t, k, &Utc).unwrap()
    }

    #[test]
    fn no_rule_is_refused() {
        let t = [utc("2026-01-01T00:00:00Z")];
        assert_eq!(
            apply(&t, &KeepOptions::default(), &Utc),
            Err(RetentionError::NoRule)
        );
    }

    #[test]
    fn keep_last() {
        let r = rules(
            &[
                "2026-01-01T00:00:00Z",
                "2026-01-02T00:00:00Z",
                "2026-01-03T00:00:00Z",
            ],
            &keep(|k| k.keep_last = 2),
        );
        assert_eq!(r, vec![None, Some(Rule::Last), Some(Rule::Last)]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        let r = rules(
            &[
                "2026-03-01T08:00:00Z",
                "2026-03-01T20:00:00Z",
                "2026-03-02T08:00:00Z",
                "2026-03-02T20:00:00Z",
                "2026-03-03T08:00:00Z",
            ],
            &keep(|k| k.keep_daily = 2),
        );
        use Rule::Daily as D;
        assert_eq!(r, vec![None, None, None, Some(D), Some(D)]);
    }

    #[test]
    fn a_bucket_kept_by_an_earlier_rule_does_not_count() {
        // keep-last 1 keeps the newest (day 3); daily's 2 buckets are then
        // days 2 and 1, not 3 and 2.
        let r = rules(
            &[
                "2026-03-01T12:00:00Z",
                "2026-03-02T12:00:00Z",
                "2026-03-03T08:00:00Z",
                "2026-03-03T12:00:00Z",
            ],
            &keep(|k| {
                k.keep_last = 1;
                k.keep_daily = 2;
            }),
        );
        assert_eq!(
            r,
            vec![Some(Rule::Daily), Some(Rule::Daily), None, Some(Rule::Last)]
        );
    }

    #[test]
    fn older_snapshots_of_a_kept_bucket_are_removed_there_and_then() {
        // Daily keeps day 10's newest; the older one of day 10 is removed
        // by daily, so weekly cannot keep it, and weekly's buckets are the
        // weeks before.
        let r = rules(
            &[
                "2026-02-27T12:00:00Z", // Fri, week 9
                "2026-03-04T12:00:00Z", // Wed, week 10
                "2026-03-10T06:00:00Z", // Tue, week 11
                "2026-03-10T18:00:00Z", // Tue, week 11
            ],
            &keep(|k| {
                k.keep_daily = 1;
                k.keep_weekly = 2;
            }),
        );
        assert_eq!(
            r,
            vec![
                Some(Rule::Weekly),
                Some(Rule::Weekly),
                None,
                Some(Rule::Daily)
            ]
        );
    }

    #[test]
    fn iso_week_53_spans_the_new_year() {
        // 2020-12-31 (Thu) and 2021-01-01 (Fri) are both 2020-W53;
        // 2021-01-04 (Mon) is 2021-W01.
        let r = rules(
            &[
                "2020-12-28T12:00:00Z",
                "2020-12-31T12:00:00Z",
                "2021-01-01T12:00:00Z",
                "2021-01-04T12:00:00Z",
            ],
            &keep(|k| k.keep_weekly = 3),
        );
        use Rule::Weekly as W;
        assert_eq!(r, vec![None, None, Some(W), Some(W)]);
        // Only two buckets exist here, so a third would reach back further.
        let r = rules(
            &[
                "2020-12-20T12:00:00Z",
                "2020-12-31T12:00:00Z",
                "2021-01-03T12:00:00Z",
            ],
            &keep(|k| k.keep_weekly = 2),
        );
        assert_eq!(r, vec![Some(W), None, Some(W)]);
    }

    #[test]
    fn buckets_are_in_local_time() {
        // 23:30 UTC on Dec 31 is already the new year two hours east.
        let t = [utc("2025-12-31T10:00:00Z"), utc("2025-12-31T23:30:00Z")];
        let k = keep(|k| k.keep_yearly = 5);
        let east = FixedOffset::east_opt(2 * 3600).unwrap();
        assert_eq!(
            apply(&t, &k, &east).unwrap(),
            vec![Some(Rule::Yearly), Some(Rule::Yearly)]
        );
        assert_eq!(apply(&t, &k, &Utc).unwrap(), vec![None, Some(Rule::Yearly)]);
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let times = [
            "2026-01-05T10:00:00Z",
            "2026-01-01T10:00:00Z",
            "2026-01-03T10:00:00Z",
            "2026-01-03T11:00:00Z",
            "2026-02-01T10:00:00Z",
            "2025-12-15T10:00:00Z",
            "2025-11-15T10:00:00Z",
        ];
        let k = keep(|k| {
            k.keep_daily = 2;
            k.keep_monthly = 2;
        });
        let forward = rules(&times, &k);
        let mut rev: Vec<&str> = times.to_vec();
        rev.reverse();
        let mut backward = rules(&rev, &k);
        backward.reverse();
        assert_eq!(forward, backward);
        // Daily keeps Feb 1 and Jan 5; their months are taken, so monthly's
        // two buckets are December and November.
        use Rule::{Daily as D, Monthly as M};
        assert_eq!(
            forward,
            vec![Some(D), None, None, None, Some(D), Some(M), Some(M)]
        );
    }

    #[test]
    fn daylight_saving_changes_in_the_local_zone() {
        let berlin = chrono_tz::Europe::Berlin;
        // Fall back (2026-10-25): 02:30 CEST and 02:30 CET are one local
        // hour, so keep-hourly keeps only the newer of the two.
        let t = [
            utc("2026-10-25T00:30:00Z"), // 02:30 CEST
            utc("2026-10-25T01:30:00Z"), // 02:30 CET
            utc("2026-10-25T02:30:00Z"), // 03:30 CET
        ];
        let k = keep(|k| k.keep_hourly = 5);
        assert_eq!(
            apply(&t, &k, &berlin).unwrap(),
            vec![None, Some(Rule::Hourly), Some(Rule::Hourly)]
        );
        // Spring forward (2026-03-29): 22:30 UTC is still the 28th before
        // the change and already the 30th after it.
        let t = [
            utc("2026-03-28T22:30:00Z"), // Mar 28 23:30 CET
            utc("2026-03-28T23:30:00Z"), // Mar 29 00:30 CET
            utc("2026-03-29T21:30:00Z"), // Mar 29 23:30 CEST
            utc("2026-03-29T22:30:00Z"), // Mar 30 00:30 CEST
        ];
        let k = keep(|k| k.keep_daily = 10);
        use Rule::Daily as D;
        assert_eq!(
            apply(&t, &k, &berlin).unwrap(),
            vec![Some(D), None, Some(D), Some(D)]
        );
        // The same in UTC puts them on other days.
        assert_eq!(
            apply(&t, &k, &Utc).unwrap(),
            vec![None, Some(D), None, Some(D)]
        );
    }

    #[test]
    fn random_histories_keep_the_newest_and_respect_n() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let base = utc("2024-01-01T00:00:00Z");
        for _ in 0..200 {
            let n = rng.gen_range(1..60);
            let t: Vec<_> = (0..n)
                .map(|_| base + chrono::Duration::minutes(rng.gen_range(0..2 * 365 * 24 * 60)))
                .collect();
            let k = KeepOptions {
                keep_last: rng.gen_range(0..3),
                keep_hourly: rng.gen_range(0..3),
                keep_daily: rng.gen_range(0..5),
                keep_weekly: rng.gen_range(0..4),
                keep_monthly: rng.gen_range(0..4),
                keep_yearly: rng.gen_range(1..3),
            };
            let r = apply(&t, &k, &Utc).unwrap();
            let newest = (0..n).max_by_key(|&i| (t[i], i)).unwrap();
            assert!(r[newest].is_some(), "the newest snapshot is always kept");
            for rule in Rule::ALL {
                let kept = r.iter().filter(|x| **x == Some(rule)).count();
                assert!(kept <= k.count(rule) as usize, "{rule:?} kept {kept}");
            }
        }
    }
}
