//! The restore wizard: (1) pick one or several VMs, (2) a snapshot for
//! each, full or live, the new names and storage, (3) launch: the task
//! page then shows each VM's progress and ETA live, with a cancel button.
//! Launching posts to `/api/v1/restore`, which runs `bulwark restore vm`'s
//! code paths.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup};

use super::{bytes, form_message, layout, local, Viewer};
use crate::web::auth::Role;
use crate::web::worker::DEFAULT_STORAGE;
use crate::web::Web;

/// Snapshots offered per VM (the newest).
const OFFERED: usize = 100;

/// The query: `vm` (repeated), `snapshot` (preselects, for one VM) and
/// `repository`.
#[derive(Default)]
struct Picks {
    vms: Vec<String>,
    snapshot: Option<String>,
    repository: Option<String>,
}

fn picks(q: Option<&str>) -> Picks {
    let mut p = Picks::default();
    for (k, v) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
        match &*k {
            "vm" if !v.is_empty() && !p.vms.contains(&v.to_string()) => p.vms.push(v.into_owned()),
            "snapshot" if !v.is_empty() => p.snapshot = Some(v.into_owned()),
            "repository" if !v.is_empty() => p.repository = Some(v.into_owned()),
            _ => {}
        }
    }
    p
}

pub async fn page(
    State(web): State<Arc<Web>>,
    Viewer(c): Viewer,
    RawQuery(q): RawQuery,
) -> Response {
    let p = picks(q.as_deref());
    let repo = match web.repository(p.repository.as_deref()) {
        Ok(r) => r,
        Err(e) => return choose_repository(&web, &c, &e).into_response(),
    };
    let body = if p.vms.is_empty() {
        step_one(&web, &repo)
    } else {
        step_two(&web, &repo, &p, c.role)
    };
    layout("Restore", "/restore", &c, body).into_response()
}

fn choose_repository(web: &Web, c: &crate::web::api::Caller, why: &str) -> Html<String> {
    layout(
        "Restore",
        "/restore",
        c,
        html! {
            p { (why) }
            form method="get" action="/restore" {
                label { "Repository " select name="repository" {
                    @for r in web.cfg.repositories.keys() { option value=(r) { (r) } }
                } }
                button type="submit" { "Next" }
            }
        },
    )
}

/// Step 1: the VMs that have snapshots in the repository.
fn step_one(web: &Web, repo: &str) -> Markup {
    let view = web.cache.view();
    let r = view.repos.get(repo);
    let vms: Vec<(&String, usize)> = r
        .map(|r| {
            r.by_source
                .iter()
                .filter(|(_, l)| l.iter().any(|s| s.vm))
                .map(|(n, l)| (n, l.len()))
                .collect()
        })
        .unwrap_or_default();
    html! {
        ol.steps { li aria-current="step" { "Choose VMs" } li { "Snapshots and options" } li { "Restore" } }
        form #pick method="get" action="/restore" {
            input type="hidden" name="repository" value=(repo);
            fieldset {
                legend { "Step 1: VMs to restore from " (repo) }
                @if vms.is_empty() { p.note { "No VM snapshots in this repository yet." } }
                ul.picks {
                    @for (name, n) in &vms {
                        li { label { input type="checkbox" name="vm" value=(name); " " (name) " " span.muted { "(" (n) " snapshots)" } } }
                    }
                }
            }
            button type="submit" { "Next" }
        }
    }
}

/// Step 2: a snapshot, a name, full or live, storage, per VM; launch.
fn step_two(web: &Web, repo: &str, p: &Picks, role: Role) -> Markup {
    let view = web.cache.view();
    let r = view.repos.get(repo);
    html! {
        ol.steps { li { a href={"/restore?repository=" (repo)} { "Choose VMs" } } li aria-current="step" { "Snapshots and options" } li { "Restore" } }
        form #wizard data-wizard="/api/v1/restore" data-repository=(repo) {
            table {
                caption { "Step 2: a snapshot and options for each VM" }
                thead { tr {
                    th scope="col" { "VM" } th scope="col" { "Snapshot" } th scope="col" { "New name" }
                    th scope="col" { "Mode" } th scope="col" { "Storage directory" } th scope="col" { "Start" }
                } }
                tbody {
                    @for (i, vm) in p.vms.iter().enumerate() {
                        @let snaps: Vec<_> = r.and_then(|r| r.by_source.get(vm)).into_iter().flatten().filter(|s| s.vm).take(OFFERED).collect();
                        tr.vm data-vm=(vm) {
                            th scope="row" { (vm) }
                            td {
                                @if snaps.is_empty() { span.bad { "no VM snapshot" } }
                                @else {
                                    select name="snapshot" aria-label={"Snapshot of " (vm)} id={"snap-" (i)} {
                                        @for s in &snaps {
                                            option value=(s.id.to_hex()) selected[p.snapshot.as_deref() == Some(&s.id.to_hex())] {
                                                (local(&s.time)) " · " (s.id.short()) " · " (s.policy.as_deref().unwrap_or("-")) " · " (bytes(s.size))
                                            }
                                        }
                                    }
                                }
                            }
                            td { input name="as" value={(vm) "-restored"} required aria-label={"New name for " (vm)}; }
                            td {
                                select name="mode" aria-label={"Mode for " (vm)} {
                                    option value="full" { "full restore" }
                                    option value="live" { "live (boots now)" }
                                }
                            }
                            td { input name="storage_dir" value=(DEFAULT_STORAGE) required aria-label={"Storage directory for " (vm)}; }
                            td { input type="checkbox" name="start" aria-label={"Start " (vm)}; }
                        }
                    }
                }
            }
            p.muted { "A live restore always starts the VM; its disks stream in behind it (see Live restores)." }
            @if role >= Role::Operator {
                button type="submit" { "Step 3: restore" }
            } @else {
                p.note { "Restoring needs the operator role." }
            }
            (form_message())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_read_repeated_vms() {
        let p = picks(Some("repository=main&vm=a&vm=b%20c&vm=a&snapshot=ab12"));
        assert_eq!(p.vms, vec!["a", "b c"]);
        assert_eq!(p.snapshot.as_deref(), Some("ab12"));
        assert_eq!(p.repository.as_deref(), Some("main"));
        assert!(picks(None).vms.is_empty());
    }
}
