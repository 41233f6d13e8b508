//! The prune simulator: which snapshots of a group (or of a synthetic
//! schedule, as Proxmox's simulator offers) the keep numbers would keep,
//! and by which rule, before anything is deleted. The decisions come from
//! `bulwark_store::maintain::retention::apply`, the rules `bulwark prune` applies, in the
//! host's local time as prune does.

use bulwark_store::maintain::retention::{self, KeepOptions, Rule};
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// Synthetic histories stop at this many snapshots.
pub const MAX_SYNTHETIC: usize = 5000;

/// What to simulate: a group (`source`, `policy`, in `repository`) or a
/// synthetic schedule over `days` up to now; and the keep numbers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub policy: Option<String>,
    /// A calendar event or interval (`daily 02:00`, `every 6h`).
    #[serde(default)]
    pub schedule: Option<String>,
    #[serde(default)]
    pub days: Option<u32>,
    #[serde(default)]
    pub keep_last: Option<u32>,
    #[serde(default)]
    pub keep_hourly: Option<u32>,
    #[serde(default)]
    pub keep_daily: Option<u32>,
    #[serde(default)]
    pub keep_weekly: Option<u32>,
    #[serde(default)]
    pub keep_monthly: Option<u32>,
    #[serde(default)]
    pub keep_yearly: Option<u32>,
}

impl Request {
    pub fn keep(&self) -> KeepOptions {
        KeepOptions {
            keep_last: self.keep_last.unwrap_or(0),
            keep_hourly: self.keep_hourly.unwrap_or(0),
            keep_daily: self.keep_daily.unwrap_or(0),
            keep_weekly: self.keep_weekly.unwrap_or(0),
            keep_monthly: self.keep_monthly.unwrap_or(0),
            keep_yearly: self.keep_yearly.unwrap_or(0),
        }
    }

    pub fn synthetic(&self) -> bool {
        self.schedule
            .as_deref()
            .is_some_and(|s| !s.trim().is_empty())
    }
}

/// One snapshot's fate.
#[derive(Clone, Debug, Serialize)]
pub struct Mark {
    pub time: DateTime<Utc>,
    /// The snapshot's id (none for synthetic ones).
    pub id: Option<String>,
    /// The rule that keeps it; `None`: removed.
    pub rule: Option<Rule>,
}

impl Mark {
    pub fn kept(&self) -> bool {
        self.rule.is_some()
    }
}

/// Decisions for `snaps` (time, id), newest first.
pub fn decide<Tz: TimeZone>(
    mut snaps: Vec<(DateTime<Utc>, Option<String>)>,
    keep: &KeepOptions,
    tz: &Tz,
) -> Result<Vec<Mark>, retention::RetentionError> {
    // Oldest first, as prune orders a group (ties broken by id).
    snaps.sort();
    let times: Vec<DateTime<Utc>> = snaps.iter().map(|(t, _)| *t).collect();
    let rules = retention::apply(&times, keep, tz)?;
    Ok(snaps
        .into_iter()
        .zip(rules)
        .rev()
        .map(|((time, id), rule)| Mark { time, id, rule })
        .collect())
}

/// The runs of `schedule` over the `days` before `now` (at most
/// [`MAX_SYNTHETIC`], the newest), in local time.
pub fn synthetic(
    schedule: &str,
    days: u32,
    now: DateTime<Utc>,
) -> Result<Vec<DateTime<Utc>>, String> {
    let s = crate::calendar::Schedule::parse(schedule)
        .map_err(|e| format!("schedule {schedule:?}: {e}"))?;
    let mut from = now - chrono::Duration::days(i64::from(days.min(3660)));
    // No need to walk further back than the last MAX_SYNTHETIC runs.
    if let Some(p) = s
        .period(&now.with_timezone(&chrono::Local))
        .and_then(|p| chrono::Duration::from_std(p * (MAX_SYNTHETIC as u32 + 1)).ok())
    {
        from = from.max(now - p);
    }
    let mut t = from.with_timezone(&chrono::Local);
    let mut out = std::collections::VecDeque::new();
    while let Some(n) = s.next_after(&t) {
        if n.with_timezone(&Utc) > now {
            break;
        }
        out.push_back(n.with_timezone(&Utc));
        t = n;
        if out.len() > MAX_SYNTHETIC {
            out.pop_front();
        }
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_follow_the_retention_rules_newest_first() {
        let t = |d: u32, h: u32| Utc.with_ymd_and_hms(2026, 3, d, h, 0, 0).unwrap();
        // Two a day for four days.
        let snaps: Vec<_> = (1..=4)
            .flat_map(|d| [(t(d, 2), None), (t(d, 14), None)])
            .collect();
        let keep = KeepOptions {
            keep_last: 1,
            keep_daily: 2,
            ..KeepOptions::default()
        };
        let m = decide(snaps, &keep, &Utc).unwrap();
        assert_eq!(m[0].time, t(4, 14));
        let rules: Vec<_> = m.iter().map(|m| m.rule.map(Rule::as_str)).collect();
        // keep-last takes the newest; day 4 is its bucket, so keep-daily
        // passes over it and keeps days 3 and 2.
        assert_eq!(
            rules,
            vec![
                Some("keep-last"),
                None,
                Some("keep-daily"),
                None,
                Some("keep-daily"),
                None,
                None,
                None
            ]
        );
        assert!(decide(vec![], &KeepOptions::default(), &Utc).is_err());
    }

    #[test]
    fn synthetic_histories_follow_the_schedule() {
        let now = Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap();
        let s = synthetic("every 6h", 2, now).unwrap();
        assert_eq!(s.len(), 8);
        assert!(s
            .windows(2)
            .all(|w| w[1] - w[0] == chrono::Duration::hours(6)));
        assert!(*s.last().unwrap() <= now);
        assert_eq!(
            synthetic("every 1m", 3660, now).unwrap().len(),
            MAX_SYNTHETIC
        );
        assert!(synthetic("sometimes", 2, now).is_err());
    }
}
