//! One GC at a time per repository (`docs/gc.md`, rule 5): `gc/lock-<id>`
//! objects, the older live one wins. Two GCs racing could otherwise
//! rewrite the index from stale views.

use chrono::Utc;

use crate::backend::BackendError;
use crate::backup::session::Marker;
use crate::error::{Error, Result};
use crate::format::id::Id;
use crate::format::layout::GC_LOCK as LOCK;
use crate::format::object;
use crate::repo::Repository;

const LOCK_KIND: &str = "gc-lock";

/// One GC at a time per repository (rule 5), removed when dropped.
pub(super) struct GcLock<'r> {
    repo: &'r Repository,
    name: String,
}

impl<'r> GcLock<'r> {
    pub(super) fn acquire(repo: &'r Repository) -> Result<Self> {
        let me = Marker {
            id: Id::random(),
            host: crate::hostname(),
            pid: std::process::id(),
            started: Utc::now(),
        };
        let name = format!("{LOCK}{}", me.id);
        let json = serde_json::to_vec(&me).expect("serialize lock");
        repo.backend().put(
            &name,
            &object::seal(&repo.keys().session(), LOCK_KIND, &json),
        )?;
        let lock = GcLock { repo, name };
        let now = Utc::now();
        for o in repo.backend().list(LOCK)? {
            if o.name == lock.name {
                continue;
            }
            let bytes = match repo.backend().get(&o.name) {
                Ok(b) => b,
                Err(BackendError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let payload = object::open(repo.keys(), LOCK_KIND, &o.name, &bytes)?;
            let other: Marker = serde_json::from_slice(&payload)
                .map_err(|e| Error::corrupt(&o.name, e.to_string()))?;
            // The older run goes on; ties are broken by id. Both see both.
            if other.is_live(now) && (other.started, other.id) < (me.started, me.id) {
                return Err(Error::GcRunning(format!(
                    "{} pid {} since {}",
                    other.host,
                    other.pid,
                    other.started.to_rfc3339()
                )));
            }
        }
        Ok(lock)
    }
}

impl Drop for GcLock<'_> {
    fn drop(&mut self) {
        // A lock left behind goes stale with its process (or in 48 h).
        if let Err(e) = self.repo.backend().delete(&self.name) {
            tracing::warn!("could not remove GC lock {}: {e}", self.name);
        }
    }
}
