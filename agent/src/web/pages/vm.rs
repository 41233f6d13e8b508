//! One VM: its policies and state, back up now, protect and unprotect, and
//! its snapshots (time, size, stored bytes, disks, policy), each with a
//! link into the restore wizard.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use maud::{html, Markup};

use super::{badge, bytes, form_message, live_region, local, respond, time, Fragment, Viewer};
use crate::web::auth::Role;
use crate::web::status::{self, Status};
use crate::web::Web;

/// Snapshots listed on the page (the newest).
const SHOWN: usize = 300;

pub async fn page(
    State(web): State<Arc<Web>>,
    Viewer(c): Viewer,
    Path(name): Path<String>,
    Query(f): Query<Fragment>,
) -> Response {
    let st = status::ask(&web).await;
    let url = format!("/vm/{}?fragment=1", super::url_encode(&name));
    let region = live_region("vm", &url, 10, details(&web, &name, &st));
    let actions = actions(&web, &name, &st, c.role);
    respond(
        &f,
        &format!("VM {name}"),
        "/",
        &c,
        region,
        |r| html! { (actions) (r) },
    )
}

fn details(web: &Web, name: &str, st: &Result<Status, String>) -> Markup {
    let snaps = web.cache.view().of_source(name);
    html! {
        @match st {
            Ok(s) => @match status::domain(s, name) {
                Some(d) => {
                    p { "State: " (d.state) @if d.backing_up { " " (badge("backing up", "warn")) } }
                    @if !d.problems.is_empty() { ul.problems { @for p in &d.problems { li { (p) } } } }
                    table {
                        thead { tr { th scope="col" { "Policy" } th scope="col" { "Repository" } th scope="col" { "Schedule" }
                            th scope="col" { "Last run" } th scope="col" { "Result" } th scope="col" { "Next run" } } }
                        tbody { @for p in &d.policies { tr {
                            td { (p.name) } td { (p.repository.as_deref().unwrap_or("-")) } td { (p.schedule.as_deref().unwrap_or("-")) }
                            td { (time(p.last_run)) }
                            td { (p.last_result.as_deref().unwrap_or("never")) @if let Some(e) = &p.last_error { div.bad { (e) } } }
                            td { (time(p.next_run)) }
                        } } }
                    }
                },
                None => p.note { "The agent does not know a domain " (name) " (snapshots of it are listed below)." },
            },
            Err(e) => p.error role="alert" { "No status from the agent: " (e) },
        }
        h2 { "Snapshots (" (snaps.len()) ")" }
        @if snaps.len() > SHOWN { p.muted { "The newest " (SHOWN) " are shown." } }
        table #snapshots {
            thead { tr {
                th scope="col" { "Time" } th scope="col" { "Id" } th scope="col" { "Policy" } th scope="col" { "Size" }
                th scope="col" { "Data" } th scope="col" { "Stored" } th scope="col" { "Disks" } th scope="col" { "Repository" } th scope="col" { "" }
            } }
            tbody {
                @for s in snaps.iter().take(SHOWN) {
                    tr data-snapshot=(s.id.to_hex()) {
                        td { (local(&s.time)) } td { code { (s.id.short()) } } td { (s.policy.as_deref().unwrap_or("-")) }
                        td { (bytes(s.size)) } td { (bytes(s.data_bytes)) } td { (bytes(s.stored)) }
                        td { (s.disks.join(", ")) } td { (s.repository) }
                        td { @if s.vm { a href={"/restore?vm=" (super::url_encode(name)) "&snapshot=" (s.id.to_hex())} { "Restore…" } } }
                    }
                }
            }
        }
    }
}

fn actions(web: &Web, name: &str, st: &Result<Status, String>, role: Role) -> Markup {
    let named: Vec<String> = st
        .as_ref()
        .ok()
        .and_then(|s| status::domain(s, name))
        .map(|d| d.policies.iter().map(|p| p.name.clone()).collect())
        .unwrap_or_default();
    html! {
        div.actions {
            @if role >= Role::Operator {
                form data-api="/api/v1/backup" data-then="task" aria-label="Back up now" {
                    input type="hidden" name="domain" value=(name);
                    label { "Policy " select name="policy" {
                        @for p in &named { option value=(p) { (p) } }
                    } }
                    label { input type="checkbox" name="full"; " full" }
                    button type="submit" disabled[named.is_empty()] { "Back up now" }
                    (form_message())
                }
            }
            @if role >= Role::Admin {
                form data-api="/api/v1/protect" data-then="reload" aria-label="Protect" {
                    input type="hidden" name="domain" value=(name);
                    fieldset {
                        legend { "Policies" }
                        @for p in web.cfg.policies.keys() {
                            label { input type="checkbox" name="policies[]" value=(p) checked[named.contains(p)]; " " (p) }
                        }
                    }
                    button type="submit" { "Protect" }
                    (form_message())
                }
                form data-api="/api/v1/unprotect" data-then="reload" data-confirm="Remove every Bulwark policy from this VM?" aria-label="Unprotect" {
                    input type="hidden" name="domain" value=(name);
                    button type="submit" disabled[named.is_empty()] { "Unprotect" }
                    (form_message())
                }
            }
        }
    }
}
