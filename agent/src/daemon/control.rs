//! The control socket: one JSON object per line each way, a
//! [`Request`] in and a [`Reply`] out (both in `bulwark-proto`, shared with
//! the hook).
//!
//! `backup` runs now and replies with the report; `hook` (from
//! `bulwark-hook`) is answered at once and recorded afterwards: the hook
//! must never wait on a backup; `live_adopt` makes this agent supervise a
//! live restore.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bulwark_proto::{Backed, Done, Pong, Reply, Request};
use serde::de::DeserializeOwned;
use serde::Serialize;

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
    // Parsed once: an unknown op or a missing field is refused here.
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return reply(&s, &Reply::<Done>::err(format!("bad request: {e}"))),
    };
    match req {
        Request::Ping => reply(
            &s,
            &Reply::Ok(Pong {
                version: env!("CARGO_PKG_VERSION").into(),
            }),
        ),
        Request::Status => reply(&s, &Reply::Ok(agent.status())),
        Request::Hook(ev) => {
            // Answer first: libvirt waits on the hook.
            reply(&s, &Reply::Ok(Done {}))?;
            agent.record_hook(&ev)
        }
        Request::Backup {
            domain,
            policy,
            full,
        } => {
            let r = agent.backup(&domain, policy.as_deref(), full);
            reply(&s, &answer(r.map(|report| Backed { report })))
        }
        Request::LiveAdopt { name } => {
            reply(&s, &answer(agent.adopt_live(&name).map(|()| Done {})))
        }
    }
}

/// A job's outcome as a reply: the error with its whole chain of causes.
fn answer<T>(r: Result<T>) -> Reply<T> {
    match r {
        Ok(t) => Reply::Ok(t),
        Err(e) => Reply::err(format!("{e:#}")),
    }
}

fn reply<T: Serialize>(mut s: &UnixStream, r: &Reply<T>) -> Result<()> {
    let mut b = serde_json::to_vec(r)?;
    b.push(b'\n');
    s.write_all(&b)?;
    Ok(())
}

/// One request to a running agent; its reply, whose payload the caller
/// names (`Pong` for `ping`, `Done` for `live_adopt`, ...). A refusal is a
/// `Reply::Err`, not an `Err`: that is for the socket and the parsing.
pub fn request<T: DeserializeOwned>(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Reply<T>> {
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
