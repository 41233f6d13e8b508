//! The prune simulator: a group of a repository, or a synthetic schedule
//! over some days, and the keep numbers; a calendar shows each snapshot
//! kept (with its rule) or removed. A plain GET form: a result can be
//! bookmarked. Admins can then prune the group for real.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use chrono::{Datelike, NaiveDate};
use maud::{html, Markup};

use super::{form_message, layout, Viewer};
use crate::web::auth::Role;
use crate::web::simulate::{Mark, Request};
use crate::web::Web;

const KEEPS: [(&str, &str); 6] = [
    ("keep_last", "Last"),
    ("keep_hourly", "Hourly"),
    ("keep_daily", "Daily"),
    ("keep_weekly", "Weekly"),
    ("keep_monthly", "Monthly"),
    ("keep_yearly", "Yearly"),
];

/// The form's fields (empty ones are unset).
fn request(q: Option<&str>) -> Result<Request, String> {
    let mut r = Request::default();
    let mut group_mode = false;
    for (k, v) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
        let v = v.trim().to_string();
        if v.is_empty() {
            continue;
        }
        let num = || {
            v.parse::<u32>()
                .map_err(|_| format!("{k}: {v:?} is not a number"))
        };
        match &*k {
            "repository" => r.repository = Some(v),
            "group" => {
                // `source` or `source/policy`.
                let (s, p) = v
                    .split_once('/')
                    .map_or((v.as_str(), None), |(s, p)| (s, Some(p)));
                r.source = Some(s.to_string());
                r.policy = p.map(str::to_string);
            }
            "schedule" => r.schedule = Some(v),
            "days" => r.days = Some(num()?),
            "keep_last" => r.keep_last = Some(num()?),
            "keep_hourly" => r.keep_hourly = Some(num()?),
            "keep_daily" => r.keep_daily = Some(num()?),
            "keep_weekly" => r.keep_weekly = Some(num()?),
            "keep_monthly" => r.keep_monthly = Some(num()?),
            "keep_yearly" => r.keep_yearly = Some(num()?),
            "mode" => group_mode = v == "group",
            _ => {}
        }
    }
    if group_mode {
        r.schedule = None;
    }
    Ok(r)
}

fn keep_value(r: &Request, k: &str) -> Option<u32> {
    match k {
        "keep_last" => r.keep_last,
        "keep_hourly" => r.keep_hourly,
        "keep_daily" => r.keep_daily,
        "keep_weekly" => r.keep_weekly,
        "keep_monthly" => r.keep_monthly,
        _ => r.keep_yearly,
    }
}

pub async fn page(
    State(web): State<Arc<Web>>,
    Viewer(c): Viewer,
    RawQuery(q): RawQuery,
) -> Response {
    let asked = q.as_deref().is_some_and(|q| !q.is_empty());
    let req = request(q.as_deref());
    let (form_req, result) = match req {
        Ok(r) if asked => {
            let out = crate::web::api::run_simulation(&web, &r).map_err(|e| e.1);
            (r, Some(out))
        }
        Ok(r) => (r, None),
        Err(e) => (Request::default(), Some(Err(e))),
    };
    let body = html! {
        (form(&web, &form_req))
        @match &result {
            None => {},
            Some(Err(e)) => p.error role="alert" { (e) },
            Some(Ok(marks)) => {
                (summary(marks))
                @if c.role >= Role::Admin && !form_req.synthetic() && marks.iter().any(|m| !m.kept()) {
                    (apply(&form_req))
                }
                (calendar(marks))
            },
        }
    };
    layout("Prune simulator", "/prune", &c, body).into_response()
}

fn form(web: &Web, r: &Request) -> Markup {
    let view = web.cache.view();
    let groups: Vec<(String, String)> = view
        .repos
        .iter()
        .flat_map(|(repo, v)| {
            let mut g: Vec<(String, String)> = v
                .by_source
                .iter()
                .flat_map(|(src, l)| {
                    let mut ps: Vec<Option<&str>> = l.iter().map(|s| s.policy.as_deref()).collect();
                    ps.sort();
                    ps.dedup();
                    ps.into_iter().map(move |p| match p {
                        Some(p) => format!("{src}/{p}"),
                        None => src.clone(),
                    })
                })
                .map(|g| (repo.clone(), g))
                .collect();
            g.sort();
            g
        })
        .collect();
    let current = r.source.as_ref().map(|s| match &r.policy {
        Some(p) => format!("{s}/{p}"),
        None => s.clone(),
    });
    let synthetic = r.synthetic();
    html! {
        form #simulate method="get" action="/prune" {
            fieldset {
                legend { "Snapshots" }
                label { input type="radio" name="mode" value="group" checked[!synthetic]; " a group: " }
                select name="group" aria-label="Group (VM and policy)" {
                    @for (repo, g) in &groups {
                        option value=(g) selected[current.as_deref() == Some(g.as_str())] { (g) " (" (repo) ")" }
                    }
                }
                @if web.cfg.repositories.len() > 1 {
                    label { " in " select name="repository" {
                        @for n in web.cfg.repositories.keys() { option value=(n) selected[r.repository.as_deref() == Some(n.as_str())] { (n) } }
                    } }
                }
                br;
                label { input type="radio" name="mode" value="synthetic" checked[synthetic]; " a synthetic schedule: " }
                input name="schedule" value=(r.schedule.as_deref().unwrap_or("daily 02:00")) aria-label="Schedule (calendar event or every N)";
                label { " over " input name="days" type="number" min="1" max="3660" value=(r.days.unwrap_or(90)); " days" }
            }
            fieldset {
                legend { "Keep" }
                @for (k, label) in KEEPS {
                    label { (label) " " input name=(k) type="number" min="0" value=[keep_value(r, k)]; }
                }
            }
            button type="submit" { "Simulate" }
        }
    }
}

fn rule_name(m: &Mark) -> &'static str {
    m.rule
        .map_or("removed", |r| r.as_str().trim_start_matches("keep-"))
}

fn summary(marks: &[Mark]) -> Markup {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for m in marks {
        *by.entry(rule_name(m)).or_default() += 1;
    }
    let kept = marks.iter().filter(|m| m.kept()).count();
    html! {
        p #summary data-kept=(kept) data-removed=(marks.len() - kept) {
            strong { (kept) " kept" } ", " strong { (marks.len() - kept) " removed" } " of " (marks.len()) ". "
            @for (rule, n) in &by { span class={"rule " (rule)} { (rule) ": " (n) } " " }
        }
    }
}

fn apply(r: &Request) -> Markup {
    html! {
        form #prune-now data-api="/api/v1/prune" data-then="task" data-confirm="Remove the snapshots marked removed? This cannot be undone." {
            @if let Some(repo) = &r.repository { input type="hidden" name="repository" value=(repo); }
            input type="hidden" name="source" value=(r.source.as_deref().unwrap_or(""));
            @if let Some(p) = &r.policy { input type="hidden" name="policy" value=(p); }
            @for (k, _) in KEEPS { @if let Some(v) = keep_value(r, k) { input type="hidden" name=(k) value=(v) data-type="number"; } }
            button type="submit" { "Prune this group now" }
            (form_message())
        }
    }
}

/// Months, newest first; each a week-by-week grid with each day's
/// snapshots marked kept (and by which rule) or removed.
fn calendar(marks: &[Mark]) -> Markup {
    let mut days: BTreeMap<NaiveDate, Vec<&Mark>> = BTreeMap::new();
    for m in marks {
        days.entry(m.time.with_timezone(&chrono::Local).date_naive())
            .or_default()
            .push(m);
    }
    let mut months: Vec<(i32, u32)> = days.keys().map(|d| (d.year(), d.month())).collect();
    months.dedup();
    months.reverse();
    html! {
        div #calendar.calendar {
            @for (y, mo) in months {
                @let first = NaiveDate::from_ymd_opt(y, mo, 1);
                @if let Some(first) = first {
                    table.month {
                        caption { (first.format("%B %Y")) }
                        thead { tr { @for d in ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"] { th scope="col" { (d) } } } }
                        tbody { @for week in weeks(first) { tr {
                            @for day in week { td {
                                @if let Some(day) = day {
                                    span.day { (day.day()) }
                                    @if let Some(list) = days.get(&day) {
                                        ul { @for m in list.iter().rev() {
                                            li class=(if m.kept() { "k" } else { "r" }) data-t=(m.time.to_rfc3339()) data-rule=(rule_name(m)) {
                                                (m.time.with_timezone(&chrono::Local).format("%H:%M")) " " (rule_name(m))
                                            }
                                        } }
                                    }
                                }
                            } }
                        } } }
                    }
                }
            }
        }
    }
}

/// The month of `first` as weeks of Monday..Sunday (None outside it).
fn weeks(first: NaiveDate) -> Vec<[Option<NaiveDate>; 7]> {
    let mut out = Vec::new();
    let mut week = [None; 7];
    let mut d = first;
    while d.month() == first.month() {
        let i = d.weekday().num_days_from_monday() as usize;
        week[i] = Some(d);
        if i == 6 {
            out.push(week);
            week = [None; 7];
        }
        match d.succ_opt() {
            Some(n) => d = n,
            None => break,
        }
    }
    if week.iter().any(Option::is_some) {
        out.push(week);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_reads_empty_fields_as_unset() {
        let r = request(Some(
            "mode=group&group=web%2Fdaily&keep_last=&keep_daily=7&schedule=daily",
        ))
        .unwrap();
        assert_eq!(r.source.as_deref(), Some("web"));
        assert_eq!(r.policy.as_deref(), Some("daily"));
        assert_eq!((r.keep_last, r.keep_daily), (None, Some(7)));
        assert!(!r.synthetic(), "mode=group wins over a schedule field");
        assert!(request(Some("keep_daily=x")).is_err());
        let w = weeks(NaiveDate::from_ymd_opt(2026, 3, 1).unwrap());
        // March 2026 starts on a Sunday: six rows.
        assert_eq!(w.len(), 6);
        assert_eq!(w[0][6].map(|d| d.day()), Some(1));
    }
}
