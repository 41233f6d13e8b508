//! A snapshot's files for the dashboard: the listing and the downloads of
//! `bulwark files` (`cmd::files`: the same volume discovery, path rules,
//! entry JSON and zip writer), opened on the dashboard's repository handle.
//!
//! - `GET /api/v1/files?snapshot=ID&path=P` (viewer): what `P` names: the
//!   volumes (no path, or a disk), or an entry and, for a directory, its
//!   entries;
//! - `GET /api/v1/files/download?snapshot=ID&path=P[&format=zip]`
//!   (operator, logged): a file's bytes, or a zip of a file or a tree.

use std::io::{Seek, Write};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{ApiError, ApiResult, Caller};
use super::auth::Role;
use super::Web;
use crate::cmd::files::{archive, list, Located, Session, Target};

/// Memory for decrypted chunks per request.
const CACHE_MIB: usize = 64;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesQuery {
    pub snapshot: String,
    #[serde(default)]
    pub path: String,
    pub repository: Option<String>,
    /// `zip` (a tree always comes as one).
    pub format: Option<String>,
}

/// What a path of a snapshot names, as the API and the page show it.
pub fn listing(web: &Web, q: &FilesQuery) -> Result<Value, ApiError> {
    let session = open(web, q)?;
    let path = q.path.trim_matches('/');
    let v = match session.resolve(path).map_err(not_found)? {
        Target::Volumes(vols) => json!({
            "snapshot": q.snapshot,
            "path": path,
            "volumes": vols.iter().map(|v| list::volume_json(v)).collect::<Vec<_>>(),
        }),
        Target::Node(e) => {
            let mut entries = Vec::new();
            if e.node.meta.kind == fsread::Kind::Dir {
                list::children(&e, &mut |c| {
                    entries.push(list::entry_json(c));
                    Ok(())
                })
                .map_err(not_found)?;
            }
            json!({
                "snapshot": q.snapshot,
                "path": path,
                "entry": list::entry_json(&e),
                "entries": entries,
            })
        }
    };
    Ok(v)
}

/// `GET /api/v1/files`.
pub async fn api_list(
    State(web): State<Arc<Web>>,
    _c: Caller,
    Query(q): Query<FilesQuery>,
) -> ApiResult {
    let v = tokio::task::spawn_blocking(move || listing(&web, &q))
        .await
        .map_err(ApiError::internal)??;
    Ok(axum::Json(v).into_response())
}

/// `GET /api/v1/files/download`: written to a temporary file first (the
/// tree is read synchronously; a zip needs to seek), then streamed.
pub async fn download(
    State(web): State<Arc<Web>>,
    c: Caller,
    Query(q): Query<FilesQuery>,
) -> ApiResult {
    c.need(Role::Operator)?;
    let zip = match q.format.as_deref() {
        None => false,
        Some("zip") => true,
        Some(f) => return Err(ApiError::bad(format!("format {f:?}: only zip"))),
    };
    let detail = json!({"snapshot": q.snapshot, "path": q.path, "zip": zip});
    let w = web.clone();
    let r = tokio::task::spawn_blocking(move || write_download(&w, &q, zip))
        .await
        .map_err(ApiError::internal)?;
    web.audit.record(
        &c.user,
        "download",
        detail,
        if r.is_ok() { "ok" } else { "failed" },
    );
    let Download {
        file,
        name,
        zip,
        refused,
    } = r?;
    let len = file.metadata().map_err(ApiError::internal)?.len();
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if zip {
            "application/zip"
        } else {
            "application/octet-stream"
        }),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    // Entries a zip leaves out, as `bulwark files get --zip` does (links
    // leaving the tree, devices).
    h.insert("x-bulwark-refused", HeaderValue::from(refused));
    // The name is the VM owner's: only safe characters reach the header.
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let disposition = format!("attachment; filename=\"{safe}\"");
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&disposition).map_err(ApiError::internal)?,
    );
    Ok(resp)
}

/// A download, in an unnamed temporary file in the state dir, rewound.
struct Download {
    file: std::fs::File,
    name: String,
    zip: bool,
    /// Entries a zip left out.
    refused: usize,
}

fn write_download(web: &Web, q: &FilesQuery, zip: bool) -> Result<Download, ApiError> {
    let session = open(web, q)?;
    let path = q.path.trim_matches('/');
    let Target::Node(e) = session.resolve(path).map_err(not_found)? else {
        return Err(ApiError::bad(format!(
            "{path:?} is a disk or volume without a filesystem: name a partition or volume"
        )));
    };
    let name = e.path.rsplit('/').next().unwrap_or("download").to_string();
    let dir = web.cfg.state_dir.join("web");
    let mut f = tempfile::tempfile_in(&dir).map_err(ApiError::internal)?;
    let zip = zip || e.node.meta.kind != fsread::Kind::File;
    let refused = if zip {
        write_zip(&e, &mut f)?
    } else {
        archive::copy_file(&e, &mut f).map_err(ApiError::from)?;
        0
    };
    f.rewind().map_err(ApiError::internal)?;
    Ok(Download {
        file: f,
        name: if zip { format!("{name}.zip") } else { name },
        zip,
        refused,
    })
}

/// A zip of `e`; the entries refused. An unreadable entry fails the
/// download (a partial archive would pass for a whole one).
fn write_zip(e: &Located, f: &mut std::fs::File) -> Result<usize, ApiError> {
    let out = std::io::BufWriter::with_capacity(1 << 20, &mut *f);
    let (refused, errors) = archive::zip_into(std::slice::from_ref(e), out)?;
    if errors > 0 {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{}: {errors} entries unreadable", e.path),
        ));
    }
    f.flush().map_err(ApiError::internal)?;
    Ok(refused)
}

fn open(web: &Web, q: &FilesQuery) -> Result<Session, ApiError> {
    let name = web
        .repository(q.repository.as_deref())
        .map_err(ApiError::bad)?;
    let repo = web.cache.repo(&name)?;
    // A snapshot newer than the last refresh: its chunks may be missing
    // from the shared handle's index until the refresh sees it.
    let snap = repo
        .find_snapshot(&q.snapshot)
        .map_err(|e| not_found(e.into()))?;
    if !web
        .cache
        .view()
        .repos
        .get(&name)
        .is_some_and(|r| r.has(&snap.source, &snap.id))
    {
        web.cache.refresh(&name);
    }
    Session::open_in(repo, &snap.id.to_hex(), CACHE_MIB).map_err(not_found)
}

fn not_found(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("{e:#}"))
}
