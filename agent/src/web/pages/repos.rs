//! Repositories: size, stored vs logical, dedup ratio, health, last GC and
//! last verify, with buttons to verify and collect garbage now.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Response;
use maud::html;
use serde_json::Value;

use super::{badge, bytes, form_message, live_region, respond, time, Fragment, Viewer};
use crate::web::auth::Role;
use crate::web::status;
use crate::web::Web;

pub async fn page(
    State(web): State<Arc<Web>>,
    Viewer(c): Viewer,
    Query(f): Query<Fragment>,
) -> Response {
    let st = status::ask(&web).await.ok();
    let rows = crate::web::api::repository_rows(&web, st.as_ref());
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let region = html! {
        table #repositories {
            thead { tr {
                th scope="col" { "Repository" } th scope="col" { "Health" } th scope="col" { "Snapshots" }
                th scope="col" { "Logical" } th scope="col" { "Data" } th scope="col" { "Stored (packs)" } th scope="col" { "Dedup ratio" }
                th scope="col" { "Size" } th scope="col" { "Last GC" } th scope="col" { "Last verify" } th scope="col" { "" }
            } }
            tbody { @for r in &rows {
                @let name = r["name"].as_str().unwrap_or("");
                tr data-name=(name) {
                    th scope="row" { (name) div.muted { (r["location"].as_str().unwrap_or("")) } }
                    td {
                        @match r["usable"].as_bool() {
                            Some(true) => (badge("usable", "ok")),
                            Some(false) => { (badge("not usable", "bad")) div.bad { (r["problem"].as_str().unwrap_or("")) } },
                            None => (badge("unknown", "idle")),
                        }
                        @if let Some(e) = r["error"].as_str() { div.bad { (e) } }
                    }
                    td { (u(r, "snapshots")) }
                    td { (bytes(u(r, "logical_bytes"))) } td { (bytes(u(r, "data_bytes"))) }
                    td { (bytes(u(r, "stored_bytes"))) " in " (u(r, "packs")) " packs" }
                    td { (format!("{:.2}", r["dedup_ratio"].as_f64().unwrap_or(1.0))) }
                    td { (bytes(u(r, "total_bytes"))) }
                    td { @match r["last_gc"].as_object() {
                        Some(g) => { (time(g["at"].as_u64())) " " @if g["ok"] == true { (badge("ok", "ok")) } @else { (badge("failed", "bad")) } },
                        None => "never (by the agent)",
                    } }
                    td { @match r["last_verify"].as_object() {
                        Some(v) => { (time(v["at"].as_u64())) " " @if v["ok"] == true { (badge("ok", "ok")) } @else { (badge("damaged", "bad")) } },
                        None => "never (from here)",
                    } }
                    td {
                        @if c.role >= Role::Operator {
                            form data-api={"/api/v1/repositories/" (name) "/verify"} data-then="task" {
                                button type="submit" { "Verify" } (form_message())
                            }
                        }
                        @if c.role >= Role::Admin {
                            form data-api={"/api/v1/repositories/" (name) "/gc"} data-then="task" data-confirm="Run a garbage collection now?" {
                                button type="submit" { "GC" } (form_message())
                            }
                        }
                    }
                }
            } }
        }
        p.muted { "Logical: the disks' sizes summed over snapshots. Data: what their chunks cover. Dedup ratio: data per stored byte." }
    };
    respond(
        &f,
        "Repositories",
        "/repositories",
        &c,
        live_region("repos", "/repositories?fragment=1", 10, region),
        |r| r,
    )
}
