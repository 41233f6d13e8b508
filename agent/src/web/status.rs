//! The agent's status document, as the dashboard reads it: asked over the
//! control socket (the same request as `bulwark agent status`), passed on
//! whole by `GET /api/v1/status`, and read into the typed view below for
//! the pages (fields the pages do not show are not named; missing ones
//! read as empty, so an older agent still renders).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use bulwark_proto::{Reply, Request};
use serde::Deserialize;
use serde_json::Value;

/// The document exactly as `bulwark agent status --json` prints it
/// (`"ok": true` included).
pub fn document(socket: &Path) -> Result<Value> {
    let reply: Reply<Value> =
        crate::daemon::request(socket, &Request::Status, Duration::from_secs(30))?;
    let doc = serde_json::to_value(&reply)?;
    reply.into_result().context("agent")?;
    Ok(doc)
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Status {
    pub host: String,
    pub version: String,
    pub now: u64,
    pub running: Vec<String>,
    pub queued: Vec<String>,
    pub targets: BTreeMap<String, Target>,
    pub domains: Vec<Domain>,
    pub problems: Vec<Problem>,
    pub runs: BTreeMap<String, Run>,
    pub gcs: BTreeMap<String, GcRun>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Target {
    pub ok: bool,
    pub checked: u64,
    pub kind: Option<String>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Domain {
    pub name: String,
    pub state: String,
    pub protected: bool,
    pub backing_up: bool,
    pub policies: Vec<Policy>,
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Policy {
    pub name: String,
    pub usable: bool,
    pub repository: Option<String>,
    pub schedule: Option<String>,
    pub last_run: Option<u64>,
    pub last_result: Option<String>,
    pub last_error: Option<String>,
    pub last_snapshot: Option<String>,
    pub next_run: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Problem {
    pub domain: Option<String>,
    pub repository: Option<String>,
    pub problem: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Run {
    pub at: u64,
    pub ok: bool,
    pub snapshot: Option<String>,
    pub error: Option<String>,
    pub prune_error: Option<String>,
    pub mode: Option<String>,
    pub seconds: f64,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub pruned: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct GcRun {
    pub at: u64,
    pub ok: bool,
    pub error: Option<String>,
    pub packs_deleted: u64,
    pub bytes_deleted: u64,
}

impl Status {
    /// Reads a status document (a reply, or a peer's `/api/v1/status`).
    pub fn from_document(doc: &Value) -> Result<Status> {
        Status::deserialize(doc).context("reading the agent's status document")
    }

    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.iter().find(|d| d.name == name)
    }
}
