//! Records of packs a GC condemned (`gc/condemned-<time>-<id>`): which
//! packs one run condemned, and when (`docs/gc.md`, rule 1). Writers load
//! them with the index and never reuse a chunk whose only copies are
//! condemned (rule 2); a later GC deletes the packs once no backup can have
//! reused them (rule 3), then the record.
//!
//! Below [`crate::repo::Repository`]: plain objects on a backend, so the
//! index loader and GC both read them without a circle.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError};
use crate::error::{Error, Result};
use crate::format::crypto::Keys;
use crate::format::id::{Id, IdSet};
use crate::format::layout::GC_CONDEMNED;
use crate::format::object;

const KIND: &str = "gc-record";

/// Clock skew between hosts (and time to store a record) that the rules
/// tolerate (rule 3). A record that took longer than half of it to store
/// is withdrawn.
pub const SKEW_MARGIN: Duration = Duration::minutes(10);

/// What one GC run condemned, and when.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub time: DateTime<Utc>,
    pub host: String,
    pub packs: Vec<Id>,
}

/// Every record, with its object name.
/// `keys` open the records sealed by earlier versions; without them those
/// are an error.
pub fn load(backend: &dyn Backend, keys: Option<&Keys>) -> Result<Vec<(String, Record)>> {
    let names: Vec<String> = backend
        .list(GC_CONDEMNED)?
        .into_iter()
        .map(|o| o.name)
        .collect();
    // Side by side: on S3 each record is a round trip, and every index
    // load (every backup, restore and export) waits for all of them.
    let records = crate::repo::load_each(&names, |name| match backend.get(name) {
        Ok(bytes) => open_record(name, bytes, keys).map(Some),
        // Swept by a GC that just finished: its packs are gone too.
        Err(BackendError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    })?;
    Ok(names
        .into_iter()
        .zip(records)
        .filter_map(|(n, r)| r.map(|r| (n, r)))
        .collect())
}

fn open_record(name: &str, bytes: Vec<u8>, keys: Option<&Keys>) -> Result<Record> {
    // Plain JSON (a sync must read them without the key); sealed by GCs
    // of before.
    let payload = if bytes.starts_with(b"{") {
        bytes
    } else {
        let keys = keys.ok_or_else(|| {
            Error::Invalid(format!(
                "{name} is sealed (written by an older GC): run `bulwark gc` with the key once"
            ))
        })?;
        object::open(keys, KIND, name, &bytes)?
    };
    serde_json::from_slice(&payload).map_err(|e| Error::corrupt(name, e.to_string()))
}

/// Packs condemned by any record: writers must not reuse their chunks.
pub fn packs(backend: &dyn Backend, keys: Option<&Keys>) -> Result<IdSet> {
    Ok(load(backend, keys)?
        .into_iter()
        .flat_map(|(_, r)| r.packs)
        .collect())
}

/// Stores a record of `packs`, withdrawn if storing it took so long that a
/// backup could have started without seeing it (rule 1).
pub fn write(backend: &dyn Backend, packs: Vec<Id>) -> Result<()> {
    let time = Utc::now();
    let rec = Record {
        time,
        host: crate::hostname(),
        packs,
    };
    let name = format!(
        "{GC_CONDEMNED}{}-{}",
        time.format("%Y%m%dT%H%M%S%.3fZ"),
        Id::random().short()
    );
    // In the clear: pack ids and a time, nothing a bucket listing does not
    // show already; a sync reads them without the key.
    backend.put(&name, &serde_json::to_vec(&rec).expect("serialize record"))?;
    if Utc::now() - time > SKEW_MARGIN / 2 {
        delete_if_there(backend, &name)?;
        return Err(Error::Invalid(
            "storing the GC record took too long; nothing was condemned (run gc again)".into(),
        ));
    }
    Ok(())
}

/// Deletes an object; one that is gone already is fine (a GC that did not
/// finish, or another's sweep).
pub(crate) fn delete_if_there(backend: &dyn Backend, name: &str) -> Result<()> {
    match backend.delete(name) {
        Ok(()) | Err(BackendError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
