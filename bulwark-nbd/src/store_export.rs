//! Snapshot disks as NBD exports: the repository's [`DiskReader`] behind the
//! [`Export`] trait. Reads run on tokio's blocking pool, so requests in
//! flight fetch and decrypt chunks in parallel; zero extents are holes and
//! never touch the repository.
//!
//! An export can be served before its disk is open ([`StoreExport::pending`]):
//! a client negotiates with the size the snapshot states, and its requests
//! wait until the reader is in its [`ReaderSlot`]. A live restore's QEMU
//! starts while the server loads the index.

use std::sync::Arc;
use std::time::Instant;

use bulwark_store::read::reader::DiskReader;
use bytes::Bytes;
use nbd_server::{BlockSize, Export, ExportError, Extent};
use tokio::sync::watch;

use crate::demand::DemandStats;
use crate::local_copy::LocalCopy;
use crate::trace::ReadTrace;

pub struct StoreExport {
    size: u64,
    reader: watch::Receiver<Option<Arc<DiskReader>>>,
    trace: Option<Arc<ReadTrace>>,
    demand: Arc<DemandStats>,
    /// What a backfill has written of this disk, read before the repository.
    local: Option<Arc<LocalCopy>>,
}

/// Where a pending export's reader goes once its disk is open. Dropped
/// unfilled (the disk could not be opened), it fails the requests that
/// wait and every later one.
pub struct ReaderSlot(watch::Sender<Option<Arc<DiskReader>>>);

impl ReaderSlot {
    pub fn fill(self, reader: Arc<DiskReader>) {
        self.0.send_replace(Some(reader));
    }
}

impl StoreExport {
    pub fn new(reader: Arc<DiskReader>) -> Self {
        let size = reader.size();
        let (_, rx) = watch::channel(Some(reader));
        Self::with_receiver(size, rx)
    }

    /// An export of `size` bytes whose reader comes later, through the slot.
    pub fn pending(size: u64) -> (Self, ReaderSlot) {
        let (tx, rx) = watch::channel(None);
        (Self::with_receiver(size, rx), ReaderSlot(tx))
    }

    fn with_receiver(size: u64, reader: watch::Receiver<Option<Arc<DiskReader>>>) -> Self {
        StoreExport {
            size,
            reader,
            trace: None,
            demand: Arc::default(),
            local: None,
        }
    }

    /// Records every read (and failed read) in `trace`.
    pub fn traced(mut self, trace: Arc<ReadTrace>) -> Self {
        self.trace = Some(trace);
        self
    }

    /// Serves what the backfill has written of this disk from its file.
    pub fn with_local_copy(mut self, local: Arc<LocalCopy>) -> Self {
        self.local = Some(local);
        self
    }

    /// Counts the reads that waited for the repository in `demand`.
    pub fn with_demand(mut self, demand: Arc<DemandStats>) -> Self {
        self.demand = demand;
        self
    }

    /// The reader, once the disk is open; whether the request had to wait
    /// for it (a wait for the repository like any miss).
    async fn reader(&self) -> Result<(Arc<DiskReader>, bool), ExportError> {
        if let Some(r) = self.reader.borrow().as_ref() {
            return Ok((r.clone(), false));
        }
        // Err: the slot was dropped unfilled.
        let mut rx = self.reader.clone();
        let opened = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|r| r.clone());
        let r = opened.ok_or_else(|| ExportError::Other("the disk could not be opened".into()))?;
        Ok((r, true))
    }
}

fn export_error(offset: u64, e: bulwark_store::Error) -> ExportError {
    match e {
        bulwark_store::Error::Corrupt { .. } | bulwark_store::Error::MissingChunk(_) => {
            ExportError::Damaged {
                offset,
                reason: e.to_string(),
            }
        }
        other => ExportError::Other(other.to_string()),
    }
}

impl Export for StoreExport {
    fn size(&self) -> u64 {
        self.size
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        // QEMU asks for block status as it starts: a wait for the disk to
        // open is the VM's wait for the repository too.
        let t0 = Instant::now();
        let (reader, waited) = self.reader().await?;
        if waited {
            self.demand.miss(t0.elapsed());
            tracing::debug!(
                "block status {offset}+{len} waited {:.3}s for the disk to open",
                t0.elapsed().as_secs_f64()
            );
        }
        Ok(reader
            .extents(offset, len)
            .into_iter()
            .map(|e| Extent::data_or_hole(e.offset, e.len, e.data))
            .collect())
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        if let Some(t) = &self.trace {
            t.read(offset, len.into());
        }
        if let Some(local) = self.local.clone().filter(|l| l.holds(offset, len.into())) {
            // `read` checks again: a backfill that started over meanwhile
            // leaves the read to the repository.
            let got = tokio::task::spawn_blocking(move || local.read(offset, len as usize))
                .await
                .map_err(|e| ExportError::Other(format!("read task failed: {e}")))?;
            if let Some(b) = got {
                return Ok(Bytes::from(b));
            }
        }
        let t0 = Instant::now();
        let (reader, waited) = self.reader().await?;
        let miss = waited || !reader.is_cached(offset, len.into());
        let r = tokio::task::spawn_blocking(move || {
            reader
                .read(offset, len as usize)
                .map(Bytes::from_owner)
                .map_err(|e| export_error(offset, e))
        })
        .await
        .map_err(|e| ExportError::Other(format!("read task failed: {e}")))?;
        if miss {
            self.demand.miss(t0.elapsed());
            // Which reads waited, and when: the timeline of a slow start.
            tracing::debug!(
                "read {offset}+{len} waited {:.3}s{}",
                t0.elapsed().as_secs_f64(),
                if waited {
                    " (the disk was opening)"
                } else {
                    ""
                }
            );
        }
        if let (Err(e), Some(t)) = (&r, &self.trace) {
            t.failed(offset, len.into(), e.to_string());
        }
        r
    }

    fn prefetch(&self, offset: u64, len: u64) {
        // A hint: warm the cache in the background; failures show up when
        // the range is really read. Before the disk is open there is
        // nothing to warm (its boot set is queued first then).
        let Some(reader) = self.reader.borrow().clone() else {
            return;
        };
        tokio::task::spawn_blocking(move || {
            if let Err(e) = reader.prefetch(offset, len) {
                tracing::debug!("prefetch {offset}+{len}: {e}");
            }
        });
    }

    fn block_size(&self) -> BlockSize {
        BlockSize {
            min: 1,
            preferred: 64 * 1024,
            max: nbd_server::MAX_REQUEST_LEN,
        }
    }
}
