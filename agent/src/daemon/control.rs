//! The control socket: one JSON object per line each way.
//!
//! Requests: `{"op":"ping"}`, `{"op":"status"}`,
//! `{"op":"backup","domain":D,"policy":P,"full":false}` (runs now, replies
//! with the report), and `{"op":"hook",...}` from `bulwark-hook` (answered
//! at once, recorded afterwards: the hook must never wait on a backup),
//! and `{"op":"live_adopt","name":N}` (the agent supervises live restore N).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::Agent;

/// Answers clients, a thread each, for as long as the process runs.
pub(super) fn serve(agent: Arc<Agent>, listener: UnixListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let a = agent.clone();
                std::thread::spawn(move || {
                    if let Err(e) = handle(&a, s) {
                        tracing::debug!("client: {e:#}");
                    }
                });
            }
            Err(e) => tracing::warn!("accept: {e}"),
        }
    }
}

/// Binds the control socket, replacing a stale one (nobody answering) but
/// never a live agent's.
pub(super) fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("another agent is listening on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

fn handle(agent: &Arc<Agent>, s: UnixStream) -> Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = String::new();
    BufReader::new(&s).take(1 << 20).read_line(&mut line)?;
    let req: Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(e) => {
            return reply(
                &s,
                &json!({"ok": false, "error": format!("bad request: {e}")}),
            )
        }
    };
    match req.get("op").and_then(Value::as_str) {
        Some("ping") => reply(
            &s,
            &json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}),
        ),
        Some("status") => reply(&s, &agent.status()),
        Some("hook") => {
            // Answer first: libvirt waits on the hook.
            reply(&s, &json!({"ok": true}))?;
            agent.record_hook(&req)
        }
        Some("backup") => {
            let dom = req.get("domain").and_then(Value::as_str).unwrap_or("");
            let policy = req.get("policy").and_then(Value::as_str);
            let full = req.get("full").and_then(Value::as_bool).unwrap_or(false);
            match agent.backup(dom, policy, full) {
                Ok(r) => reply(&s, &json!({"ok": true, "report": r})),
                Err(e) => reply(&s, &json!({"ok": false, "error": format!("{e:#}")})),
            }
        }
        Some("live_adopt") => {
            let name = req.get("name").and_then(Value::as_str).unwrap_or("");
            match agent.adopt_live(name) {
                Ok(()) => reply(&s, &json!({"ok": true})),
                Err(e) => reply(&s, &json!({"ok": false, "error": format!("{e:#}")})),
            }
        }
        other => reply(
            &s,
            &json!({"ok": false, "error": format!("unknown op {other:?}")}),
        ),
    }
}

fn reply(mut s: &UnixStream, v: &Value) -> Result<()> {
    let mut b = serde_json::to_vec(v)?;
    b.push(b'\n');
    s.write_all(&b)?;
    Ok(())
}

/// One request to a running agent; its reply.
pub fn request(socket: &Path, req: &Value, timeout: Duration) -> Result<Value> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the agent at {}", socket.display()))?;
    s.set_read_timeout(Some(timeout))?;
    let mut b = serde_json::to_vec(req)?;
    b.push(b'\n');
    s.write_all(&b)?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the agent's reply")?;
    serde_json::from_str(&line).context("parsing the agent's reply")
}
