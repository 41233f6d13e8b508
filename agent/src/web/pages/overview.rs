//! The overview: for this host and each peer side by side, every domain
//! (state, policies with last and next run and last result, snapshots,
//! problems), the repositories with their health, and the jobs running and
//! queued. Refreshed live.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Response;
use maud::{html, Markup};

use super::{badge, bytes, live_region, respond, time, Fragment, Viewer};
use crate::web::cache::View;
use crate::web::status::{Domain, Status};
use crate::web::{status, Web};

/// One host's column.
pub struct Host {
    pub name: String,
    /// The status document, or why there is none.
    pub status: Result<Status, String>,
    /// This host (links to VM pages, snapshot counts from the cache).
    pub local: bool,
}

/// Everything the overview shows.
pub struct Overview<'a> {
    pub hosts: Vec<Host>,
    pub view: &'a View,
    /// Dashboard tasks running: (id, title).
    pub tasks: Vec<(u64, String)>,
}

pub async fn page(
    axum::extract::State(web): State<Arc<Web>>,
    Viewer(c): Viewer,
    Query(f): Query<Fragment>,
) -> Response {
    let local = status::ask(&web).await;
    let mut hosts = vec![Host {
        name: local
            .as_ref()
            .map(|s| s.host.clone())
            .unwrap_or_else(|_| crate::daemon::hostname()),
        status: local,
        local: true,
    }];
    for p in web.peers.seen() {
        hosts.push(Host {
            name: p.name,
            status: p
                .status
                .and_then(|d| status::from_document(&d).map_err(|e| format!("{e:#}"))),
            local: false,
        });
    }
    let view = web.cache.view();
    let tasks = web
        .tasks
        .all()
        .iter()
        .filter(|t| t.running())
        .map(|t| (t.id, t.title.clone()))
        .collect();
    let o = Overview {
        hosts,
        view: &view,
        tasks,
    };
    respond(
        &f,
        "Overview",
        "/",
        &c,
        live_region("overview", "/?fragment=1", 10, render(&o)),
        |r| r,
    )
}

/// The hosts side by side.
pub fn render(o: &Overview<'_>) -> Markup {
    html! {
        div.hosts {
            @for h in &o.hosts {
                section.host aria-labelledby={"host-" (h.name)} {
                    h2 id={"host-" (h.name)} { (h.name) @if !h.local { " " span.muted { "(peer)" } } }
                    @match &h.status {
                        Ok(s) => (host(s, h.local, o)),
                        Err(e) => p.error role="alert" { "No status: " (e) },
                    }
                }
            }
        }
    }
}

fn host(s: &Status, local: bool, o: &Overview<'_>) -> Markup {
    html! {
        @if !s.problems.is_empty() {
            h3 { "Problems" }
            ul.problems {
                @for p in &s.problems {
                    li { strong { (p.domain.as_deref().or(p.repository.as_deref()).unwrap_or("")) } ": " (p.problem) }
                }
            }
        }
        h3 { "Jobs" }
        p {
            "Backing up: " (list_or_none(&s.running)) ". Queued: " (list_or_none(&s.queued)) "."
            @if local && !o.tasks.is_empty() {
                " From this dashboard: "
                @for (i, (id, title)) in o.tasks.iter().enumerate() {
                    @if i > 0 { ", " }
                    a href={"/tasks/" (id)} { (title) }
                }
                "."
            }
        }
        h3 { "Repositories" }
        table.repos {
            thead { tr { th scope="col" { "Repository" } th scope="col" { "Health" } th scope="col" { "Snapshots" } th scope="col" { "Stored" } } }
            tbody {
                @for (name, t) in &s.targets {
                    @let r = if local { o.view.repos.get(name) } else { None };
                    tr {
                        td { (name) }
                        td {
                            @if t.ok { (badge("usable", "ok")) } @else {
                                (badge("not usable", "bad")) " " (t.kind.as_deref().unwrap_or("")) ": " (t.error.as_deref().unwrap_or(""))
                            }
                        }
                        td { (r.map_or("-".into(), |r| r.snapshots.to_string())) }
                        td { (r.map_or("-".into(), |r| bytes(r.sizes.stored))) }
                    }
                }
            }
        }
        h3 { "Domains (" (s.domains.len()) ")" }
        table.domains {
            thead { tr {
                th scope="col" { "Domain" } th scope="col" { "State" }
                th scope="col" { "Policy: last run, result, next run" }
                th scope="col" { "Snapshots" } th scope="col" { "Problems" }
            } }
            tbody {
                @for d in &s.domains { (domain(d, s.drills.get(&d.name), local, o.view)) }
            }
        }
    }
}

fn list_or_none(l: &[String]) -> String {
    if l.is_empty() {
        "nothing".into()
    } else {
        l.join(", ")
    }
}

/// One domain's row (compact: 500 of them stay well under 200 KB).
fn domain(
    d: &Domain,
    drill: Option<&bulwark_proto::status::DrillRun>,
    local: bool,
    view: &View,
) -> Markup {
    let (count, latest) = if local {
        snapshots_of(view, &d.name)
    } else {
        (0, None)
    };
    html! {
        tr {
            td { @if local { a href={"/vm/" (d.name)} { (d.name) } } @else { (d.name) } }
            td { (d.state) @if d.backing_up { " " (badge("backing up", "warn")) } }
            td {
                @if d.policies.is_empty() { span.muted { "none" } }
                @for p in &d.policies {
                    div {
                        b { (p.name) } " "
                        @if !p.usable { (badge("refused", "bad")) } @else {
                            (time(p.last_run)) " "
                            @match p.last_result.as_deref() {
                                Some("ok") => (badge("ok", "ok")),
                                Some(r) => (badge(r, "bad")),
                                None => (badge("never", "idle")),
                            }
                            " → " (time(p.next_run))
                        }
                    }
                }
                @if let Some(r) = drill {
                    div.drill {
                        "restore drill " (time(Some(r.at))) " "
                        @if r.ok {
                            (badge("booted", "ok")) " in " (format!("{:.0} s", r.seconds))
                        } @else {
                            (badge("failed", "bad"))
                            @if let Some(t) = r.last_ok { "; last proven bootable " (time(Some(t))) }
                        }
                    }
                }
            }
            td { @if local { (count) @if let Some(t) = latest { ", last " (super::local(&t)) } } @else { "-" } }
            td { @for p in &d.problems { div.bad { (p) } } }
        }
    }
}

/// How many snapshots of `source` the cache holds, and the newest's time.
fn snapshots_of(view: &View, source: &str) -> (usize, Option<chrono::DateTime<chrono::Utc>>) {
    let mut n = 0;
    let mut latest = None;
    for r in view.repos.values() {
        if let Some(l) = r.by_source.get(source) {
            n += l.len();
            latest = latest.max(l.first().map(|s| s.time));
        }
    }
    (n, latest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_proto::status::DrillRun;

    #[test]
    fn a_domain_row_shows_its_last_drill() {
        let d = Domain {
            name: "web01".into(),
            ..Default::default()
        };
        let view = View::default();
        let passed = DrillRun {
            at: 1_700_000_000,
            ok: true,
            seconds: 23.4,
            last_ok: Some(1_700_000_000),
            ..Default::default()
        };
        let row = domain(&d, Some(&passed), true, &view).into_string();
        assert!(
            row.contains("restore drill") && row.contains("booted") && row.contains("23 s"),
            "{row}"
        );
        let failed = DrillRun {
            ok: false,
            last_ok: Some(1_600_000_000),
            ..passed
        };
        let row = domain(&d, Some(&failed), true, &view).into_string();
        assert!(
            row.contains("failed") && row.contains("last proven bootable"),
            "{row}"
        );
        assert!(!domain(&d, None, true, &view)
            .into_string()
            .contains("drill"));
    }
}
