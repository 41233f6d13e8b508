//! Live restores: phase, streamed of total, throughput, ETA, cancel.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Response;
use maud::{html, Markup};
use serde_json::Value;

use super::{badge, bytes, form_message, live_region, respond, secs, Fragment, Viewer};
use crate::web::auth::Role;
use crate::web::Web;

pub async fn page(
    State(web): State<Arc<Web>>,
    Viewer(c): Viewer,
    Query(f): Query<Fragment>,
) -> Response {
    let dir = web.cfg.state_dir.clone();
    let list = tokio::task::spawn_blocking(move || crate::web::api::live_list(&dir))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| format!("{e:#}")));
    let region = live_region("live", "/live?fragment=1", 2, render(&list, c.role));
    respond(&f, "Live restores", "/live", &c, region, |r| r)
}

fn render(list: &Result<Vec<Value>, String>, role: Role) -> Markup {
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    html! {
        @match list {
            Err(e) => p.error role="alert" { (e) },
            Ok(l) if l.is_empty() => p { "No live restores." },
            Ok(l) => table #live-restores {
                thead { tr {
                    th scope="col" { "VM" } th scope="col" { "From" } th scope="col" { "Phase" } th scope="col" { "Streamed" }
                    th scope="col" { "Throughput" } th scope="col" { "ETA" } th scope="col" { "Server restarts" } th scope="col" { "" }
                } }
                tbody {
                    @for r in l {
                        @let name = r["name"].as_str().unwrap_or("");
                        @let phase = r["phase"].as_str().unwrap_or("");
                        tr data-name=(name) data-phase=(phase) {
                            th scope="row" { (name) }
                            td { (r["source"].as_str().unwrap_or("")) " " code { (r["snapshot"].as_str().map_or("", |s| &s[..s.len().min(12)])) } }
                            td {
                                (badge(phase, match phase { "done" => "ok", "failed" => "bad", "cancelled" => "idle", _ => "warn" }))
                                @if let Some(why) = r["reason"].as_str() { div.bad { (why) } }
                            }
                            td {
                                progress max=(u(r, "bytes_total").max(1)) value=(u(r, "bytes_done")) aria-label={"Streamed of " (name)} {}
                                " " (bytes(u(r, "bytes_done"))) " of " (bytes(u(r, "bytes_total")))
                            }
                            td { (bytes(r["bytes_per_second"].as_f64().unwrap_or(0.0) as u64)) "/s" }
                            td { (r["eta_seconds"].as_f64().map_or("-".into(), secs)) }
                            td { (u(r, "server_restarts")) }
                            td {
                                @if role >= Role::Operator && (phase == "streaming" || phase == "booting") {
                                    form data-api={"/api/v1/live/" (name) "/cancel"} data-then="reload"
                                        data-confirm={"Cancel the live restore of " (name) "? The VM is destroyed and its overlays removed."} {
                                        button type="submit" { "Cancel" }
                                        (form_message())
                                    }
                                }
                            }
                        }
                    }
                }
            },
        }
    }
}
