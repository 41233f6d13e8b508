//! Tasks: what this dashboard started (restores, backups, prunes, GCs,
//! verifies) with their log lines, live while they run; and the agent's
//! own last runs (scheduled backups and GCs) from its status.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use serde_json::Value;

use super::{badge, bytes, form_message, live_region, respond, secs, time, Fragment, Viewer};
use crate::web::auth::Role;
use crate::web::status;
use crate::web::Web;

fn state_badge(v: &Value) -> Markup {
    let s = v["state"].as_str().unwrap_or("");
    badge(
        s,
        match s {
            "done" => "ok",
            "failed" => "bad",
            "cancelled" => "idle",
            _ => "warn",
        },
    )
}

pub async fn list(
    State(web): State<Arc<Web>>,
    Viewer(c): Viewer,
    Query(f): Query<Fragment>,
) -> Response {
    let st = status::ask(&web).await.ok();
    let tasks: Vec<Value> = web.tasks.all().iter().map(|t| t.to_json(false)).collect();
    let region = html! {
        h2 { "From this dashboard" }
        @if tasks.is_empty() { p { "None yet." } }
        @else {
            table #tasks {
                thead { tr { th scope="col" { "#" } th scope="col" { "Task" } th scope="col" { "User" } th scope="col" { "Started" } th scope="col" { "State" } } }
                tbody { @for t in &tasks { tr {
                    td { a href={"/tasks/" (t["id"])} { (t["id"]) } }
                    td { a href={"/tasks/" (t["id"])} { (t["title"].as_str().unwrap_or("")) } }
                    td { (t["user"].as_str().unwrap_or("")) }
                    td { (time(t["started"].as_u64())) }
                    td { (state_badge(t)) }
                } } }
            }
        }
        h2 { "The agent's last runs" }
        @match &st {
            None => p.error { "No status from the agent." },
            Some(s) => table #runs {
                thead { tr { th scope="col" { "Job" } th scope="col" { "At" } th scope="col" { "Result" } th scope="col" { "Mode" }
                    th scope="col" { "Took" } th scope="col" { "Read" } th scope="col" { "Stored" } } }
                tbody {
                    @for (key, r) in &s.runs { tr {
                        td { "backup " (key) } td { (time(Some(r.at))) }
                        td { @if r.ok && r.prune_error.is_none() { (badge("ok", "ok")) } @else { (badge("failed", "bad")) div.bad { (r.error.as_deref().or(r.prune_error.as_deref()).unwrap_or("")) } } }
                        td { (r.mode.as_deref().unwrap_or("-")) } td { (secs(r.seconds)) }
                        td { (bytes(r.bytes_read)) } td { (bytes(r.bytes_stored)) }
                    } }
                    @for (name, g) in &s.gcs { tr {
                        td { "gc " (name) } td { (time(Some(g.at))) }
                        td { @if g.ok { (badge("ok", "ok")) } @else { (badge("failed", "bad")) div.bad { (g.error.as_deref().unwrap_or("")) } } }
                        td { "-" } td { "-" } td { "-" } td { "freed " (bytes(g.bytes_deleted)) }
                    } }
                }
            },
        }
    };
    respond(
        &f,
        "Tasks",
        "/tasks",
        &c,
        live_region("tasks", "/tasks?fragment=1", 3, region),
        |r| r,
    )
}

pub async fn one(
    State(web): State<Arc<Web>>,
    Viewer(c): Viewer,
    Path(id): Path<u64>,
    Query(f): Query<Fragment>,
) -> Response {
    let Some(t) = web.tasks.get(id) else {
        return (StatusCode::NOT_FOUND, format!("no task {id}")).into_response();
    };
    let v = t.to_json(true);
    let title = format!("Task {id}: {}", t.title);
    let region = task(&v, c.role);
    respond(
        &f,
        &title,
        "/tasks",
        &c,
        live_region("task", &format!("/tasks/{id}?fragment=1"), 1, region),
        |r| r,
    )
}

fn task(v: &Value, role: Role) -> Markup {
    let u = |x: &Value, k: &str| x[k].as_u64().unwrap_or(0);
    html! {
        p #task-state data-state=(v["state"].as_str().unwrap_or("")) {
            (state_badge(v)) " started by " (v["user"].as_str().unwrap_or("")) " at " (time(v["started"].as_u64()))
            @if let Some(e) = v["error"].as_str() { div.bad role="alert" { (e) } }
        }
        @if v["cancellable"] == true && role >= Role::Operator {
            form data-api={"/api/v1/tasks/" (v["id"]) "/cancel"} data-then="reload" data-confirm="Cancel this task? What it created is removed." {
                button type="submit" { "Cancel" }
                (form_message())
            }
        }
        @if let Some(items) = v["items"].as_array().filter(|i| !i.is_empty()) {
            table #items {
                thead { tr { th scope="col" { "VM" } th scope="col" { "State" } th scope="col" { "Progress" } th scope="col" { "Rate" } th scope="col" { "ETA" } } }
                tbody { @for it in items {
                    @let name = it["name"].as_str().unwrap_or("");
                    tr data-name=(name) data-state=(it["state"].as_str().unwrap_or("")) {
                        th scope="row" { (name) }
                        td { (it["state"].as_str().unwrap_or("")) @if let Some(n) = it["note"].as_str() { div.muted { (n) } } }
                        td {
                            progress max=(u(it, "bytes_total").max(1)) value=(u(it, "bytes_done")) aria-label={"Progress of " (name)} {}
                            " " (bytes(u(it, "bytes_done"))) " of " (bytes(u(it, "bytes_total")))
                        }
                        td { (bytes(it["bytes_per_second"].as_f64().unwrap_or(0.0) as u64)) "/s" }
                        td { (it["eta_seconds"].as_f64().map_or("-".into(), secs)) }
                    }
                } }
            }
        }
        h2 { "Log" }
        pre.log tabindex="0" { @for l in v["lines"].as_array().into_iter().flatten() { (l.as_str().unwrap_or("")) "\n" } }
    }
}
