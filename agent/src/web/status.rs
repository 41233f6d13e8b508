//! The agent's status, as the dashboard reads it: the same request and the
//! same typed document (`bulwark_proto::Status`) as `bulwark agent status`,
//! so `GET /api/v1/status` serves what `bulwark agent status --json` prints.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use bulwark_proto::{Reply, Request};
use serde::Deserialize;
use serde_json::Value;

pub use bulwark_proto::status::{DomainStatus as Domain, Status};

use super::Web;

/// Asks the agent over its control socket.
pub fn fetch(socket: &Path) -> Result<Status> {
    let reply: Reply<Status> =
        crate::daemon::request(socket, &Request::Status, Duration::from_secs(30))?;
    reply.into_result().context("agent")
}

/// [`fetch`] off the runtime, for a handler: the status, or why there is
/// none.
pub async fn ask(web: &Web) -> Result<Status, String> {
    let socket = web.cfg.socket.clone();
    tokio::task::spawn_blocking(move || fetch(&socket))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| format!("{e:#}")))
}

/// The document exactly as `bulwark agent status --json` prints it
/// (`"ok": true` included).
pub fn document(st: Status) -> Result<Value> {
    Ok(serde_json::to_value(Reply::Ok(st))?)
}

/// Reads a status document (a peer's `/api/v1/status`).
pub fn from_document(doc: &Value) -> Result<Status> {
    let reply: Reply<Status> =
        Reply::deserialize(doc).context("reading the agent's status document")?;
    reply.into_result().context("agent")
}

/// The domain named `name` in `st`.
pub fn domain<'a>(st: &'a Status, name: &str) -> Option<&'a Domain> {
    st.domains.iter().find(|d| d.name == name)
}
