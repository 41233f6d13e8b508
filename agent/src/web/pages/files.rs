//! Files: pick a snapshot, walk its disks, volumes and directories, and
//! download a file or a zip (operators); the listing is `GET
//! /api/v1/files`, the downloads `GET /api/v1/files/download`.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use serde_json::Value;

use super::{bytes, layout, local, url_encode, Viewer};
use crate::web::auth::Role;
use crate::web::files::{listing, FilesQuery};
use crate::web::Web;

/// Snapshots offered in the picker (newest first).
const PICK: usize = 300;

pub async fn page(
    State(web): State<Arc<Web>>,
    Viewer(c): Viewer,
    Query(q): Query<PageQuery>,
) -> Response {
    let body = match q.snapshot.filter(|s| !s.is_empty()) {
        None => picker(&web),
        Some(snapshot) => {
            let fq = FilesQuery {
                snapshot,
                path: q.path.unwrap_or_default(),
                repository: q.repository,
                format: None,
            };
            let w = web.clone();
            let (fq, r) = tokio::task::spawn_blocking(move || {
                let r = listing(&w, &fq);
                (fq, r)
            })
            .await
            .unwrap_or_else(|e| {
                (
                    FilesQuery::default(),
                    Err(crate::web::api::ApiError::internal(e)),
                )
            });
            browse(&fq, r.map_err(|e| e.1), c.role)
        }
    };
    layout("Files", "/files", &c, body).into_response()
}

#[derive(serde::Deserialize)]
pub struct PageQuery {
    snapshot: Option<String>,
    path: Option<String>,
    repository: Option<String>,
}

/// The newest snapshots of every repository, to pick one.
fn picker(web: &Web) -> Markup {
    let view = web.cache.view();
    let mut snaps: Vec<_> = view
        .repos
        .values()
        .flat_map(|r| r.by_source.values().flatten())
        .collect();
    snaps.sort_by_key(|s| std::cmp::Reverse(s.time));
    snaps.truncate(PICK);
    html! {
        form #pick-snapshot method="get" action="/files" {
            label for="snapshot" { "Snapshot" }
            select #snapshot name="snapshot" required {
                @for s in &snaps {
                    option value=(s.id) { (s.source) " · " (local(&s.time)) " · " (s.id.short()) }
                }
            }
            button type="submit" { "Browse" }
        }
        @if snaps.is_empty() { p { "No snapshots yet." } }
    }
}

/// One place in a snapshot: its volumes, or a directory's entries.
fn browse(q: &FilesQuery, r: Result<Value, String>, role: Role) -> Markup {
    let here = |path: &str| {
        format!(
            "/files?snapshot={}&path={}",
            url_encode(&q.snapshot),
            url_encode(path)
        )
    };
    let download = |path: &str, zip: bool| {
        format!(
            "/api/v1/files/download?snapshot={}&path={}{}",
            url_encode(&q.snapshot),
            url_encode(path),
            if zip { "&format=zip" } else { "" }
        )
    };
    let path = q.path.trim_matches('/');
    let mut crumbs = vec![("disks".to_string(), String::new())];
    let mut at = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if !at.is_empty() {
            at.push('/');
        }
        at.push_str(part);
        crumbs.push((part.to_string(), at.clone()));
    }
    html! {
        nav #crumbs aria-label="Path" {
            a href="/files" { "Snapshots" } " · " code { (q.snapshot.get(..12).unwrap_or(&q.snapshot)) } " "
            @for (label, p) in &crumbs { a href=(here(p)) { (label) } " / " }
        }
        @match &r {
            Err(e) => p.error role="alert" { (e) },
            Ok(v) => @if let Some(vols) = v["volumes"].as_array() {
                table #volumes {
                    thead { tr { th scope="col" { "Volume" } th scope="col" { "Content" } th scope="col" { "Label" } th scope="col" { "Size" } } }
                    tbody { @for vol in vols {
                        @let p = vol["path"].as_str().unwrap_or("");
                        tr data-path=(p) {
                            th scope="row" { a href=(here(p)) { (p) } }
                            td { (vol["content"].as_str().unwrap_or("")) @if let Some(e) = vol["error"].as_str() { div.bad { (e) } } }
                            td { (vol["label"].as_str().unwrap_or("")) }
                            td { (bytes(vol["size"].as_u64().unwrap_or(0))) }
                        }
                    } }
                }
            } @else {
                @let entry = &v["entry"];
                @if role >= Role::Operator {
                    p.actions {
                        @if entry["type"] == "file" { a #download href=(download(path, false)) { "Download " (entry["name"].as_str().unwrap_or("")) } " " }
                        a #download-zip href=(download(path, true)) { "Download as zip" }
                    }
                }
                @if entry["type"] == "dir" {
                    table #entries {
                        thead { tr { th scope="col" { "Name" } th scope="col" { "Type" } th scope="col" { "Size" } th scope="col" { "Mode" } th scope="col" { "Modified" } } }
                        tbody { @for e in v["entries"].as_array().into_iter().flatten() {
                            @let p = e["path"].as_str().unwrap_or("");
                            @let kind = e["type"].as_str().unwrap_or("");
                            tr data-path=(p) data-type=(kind) {
                                th scope="row" {
                                    @if kind == "dir" || kind == "file" { a href=(here(p)) { (e["name"].as_str().unwrap_or("")) } }
                                    @else { (e["name"].as_str().unwrap_or("")) }
                                    @if let Some(t) = e["target"].as_str() { " → " (t) }
                                }
                                td { (kind) }
                                td { (bytes(e["size"].as_u64().unwrap_or(0))) }
                                td { code { (e["mode"].as_str().unwrap_or("")) } }
                                td { (e["mtime"].as_str().unwrap_or("-")) }
                            }
                        } }
                    }
                } @else {
                    dl #entry {
                        dt { "Type" } dd { (entry["type"].as_str().unwrap_or("")) }
                        dt { "Size" } dd data-bytes=(entry["size"]) { (bytes(entry["size"].as_u64().unwrap_or(0))) }
                        dt { "Mode" } dd { code { (entry["mode"].as_str().unwrap_or("")) } }
                        dt { "Modified" } dd { (entry["mtime"].as_str().unwrap_or("-")) }
                    }
                }
            },
        }
    }
}
