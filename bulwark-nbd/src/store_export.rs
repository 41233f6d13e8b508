//! Snapshot disks as NBD exports: the repository's [`DiskReader`] behind the
//! [`Export`] trait. Reads run on tokio's blocking pool, so requests in
//! flight fetch and decrypt chunks in parallel; zero extents are holes and
//! never touch the repository.

use std::sync::Arc;

use bulwark_store::read::reader::DiskReader;
use bytes::Bytes;
use nbd_server::{BlockSize, Export, ExportError, Extent};

use crate::demand::DemandStats;
use crate::trace::ReadTrace;

pub struct StoreExport {
    reader: Arc<DiskReader>,
    trace: Option<Arc<ReadTrace>>,
    demand: Arc<DemandStats>,
}

impl StoreExport {
    pub fn new(reader: Arc<DiskReader>) -> Self {
        StoreExport {
            reader,
            trace: None,
            demand: Arc::default(),
        }
    }

    /// Records every read (and failed read) in `trace`.
    pub fn traced(reader: Arc<DiskReader>, trace: Arc<ReadTrace>) -> Self {
        StoreExport {
            trace: Some(trace),
            ..Self::new(reader)
        }
    }

    /// Counts the reads that waited for the repository in `demand`.
    pub fn with_demand(mut self, demand: Arc<DemandStats>) -> Self {
        self.demand = demand;
        self
    }

    pub fn reader(&self) -> &Arc<DiskReader> {
        &self.reader
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
        self.reader.size()
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        Ok(self
            .reader
            .extents(offset, len)
            .into_iter()
            .map(|e| Extent::data_or_hole(e.offset, e.len, e.data))
            .collect())
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        let reader = self.reader.clone();
        if let Some(t) = &self.trace {
            t.read(offset, len.into());
        }
        let miss = !reader.is_cached(offset, len.into());
        let t0 = std::time::Instant::now();
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
        }
        if let (Err(e), Some(t)) = (&r, &self.trace) {
            t.failed(offset, len.into(), e.to_string());
        }
        r
    }

    fn prefetch(&self, offset: u64, len: u64) {
        let reader = self.reader.clone();
        // A hint: warm the cache in the background; failures show up when
        // the range is really read.
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
