//! Markers of backups in flight (`sessions/<id>`), so a GC on another host
//! knows which backups may have reused chunks it has just condemned
//! (`docs/gc.md`, rule 3).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::backend::BackendError;
use crate::error::{Error, Result};
use crate::format::id::Id;
use crate::format::{layout, object};
use crate::repo::Repository;

pub const KIND: &str = "session";

/// A marker older than this is taken for a crashed backup's.
pub const STALE_AFTER: chrono::Duration = chrono::Duration::hours(48);

/// What a marker says.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Marker {
    pub id: Id,
    pub host: String,
    pub pid: u32,
    pub started: DateTime<Utc>,
}

impl Marker {
    /// A marker that still protects its backup: not older than
    /// [`STALE_AFTER`], and on this host only while its process lives.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        if now - self.started > STALE_AFTER {
            return false;
        }
        if self.host == crate::hostname() {
            // SAFETY: kill with signal 0 only checks that the pid exists.
            let r = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
            let gone =
                r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            return !gone;
        }
        true
    }
}

/// A backup's marker, removed when dropped.
pub struct Session<'r> {
    repo: &'r Repository,
    marker: Marker,
}

impl<'r> Session<'r> {
    /// Stores the marker; the caller loads the index only after this.
    pub fn begin(repo: &'r Repository) -> Result<Self> {
        let marker = Marker {
            id: Id::random(),
            host: crate::hostname(),
            pid: std::process::id(),
            started: Utc::now(),
        };
        let json = serde_json::to_vec(&marker).expect("serialize marker");
        let sealed = object::seal(&repo.keys().session(), KIND, &json);
        repo.backend().put(&layout::session(&marker.id), &sealed)?;
        Ok(Session { repo, marker })
    }

    pub fn marker(&self) -> &Marker {
        &self.marker
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // A marker left behind only delays GC (it goes stale): never fatal.
        if let Err(e) = self
            .repo
            .backend()
            .delete(&layout::session(&self.marker.id))
        {
            tracing::warn!("could not remove session marker: {e}");
        }
    }
}

/// Every marker in the repository (live or not). A marker deleted while
/// listing is skipped: its backup just ended.
pub fn list(repo: &Repository) -> Result<Vec<Marker>> {
    let mut out = Vec::new();
    for o in repo.backend().list(layout::SESSIONS)? {
        let bytes = match repo.backend().get(&o.name) {
            Ok(b) => b,
            Err(BackendError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let payload = object::open(repo.keys(), KIND, &o.name, &bytes)?;
        let m: Marker =
            serde_json::from_slice(&payload).map_err(|e| Error::corrupt(&o.name, e.to_string()))?;
        out.push(m);
    }
    Ok(out)
}
