//! A disk read over NBD (libvirt's backup export or qemu-nbd) as the
//! store's [`BlockSource`]: allocation from `base:allocation`, dirty ranges
//! from `qemu:dirty-bitmap:*`.

use std::path::Path;

use anyhow::{Context, Result};
use bulwark_store::BlockSource;
use bulwark_store::{DataExtent, Span};
use nbd_server::proto::consts::{STATE_DIRTY, STATE_ZERO};
use nbd_server::{Client, ClientOptions};

pub const ALLOCATION: &str = "base:allocation";

pub struct NbdSource {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    size: u64,
    has_allocation: bool,
}

fn to_io(e: nbd_server::ClientError) -> std::io::Error {
    match e {
        nbd_server::ClientError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

impl NbdSource {
    /// Connects to `export` on a Unix socket, asking for allocation and, if
    /// given, a dirty-bitmap context.
    pub fn connect(socket: &Path, export: &str, bitmap_context: Option<&str>) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting I/O runtime")?;
        let mut opts = ClientOptions::new(export).meta_context(ALLOCATION);
        if let Some(b) = bitmap_context {
            opts = opts.meta_context(b);
        }
        let client = rt
            .block_on(Client::connect_unix(socket, &opts))
            .with_context(|| format!("NBD connect to {export} on {}", socket.display()))?;
        if let Some(b) = bitmap_context {
            if client.context_id(b).is_none() {
                anyhow::bail!("NBD server did not grant {b}");
            }
        }
        let has_allocation = client.context_id(ALLOCATION).is_some();
        Ok(NbdSource {
            rt,
            size: client.size(),
            client: Some(client),
            has_allocation,
        })
    }

    /// Ranges marked dirty in `context` (merged, in order).
    pub fn dirty(&mut self, context: &str) -> Result<Vec<Span>> {
        let size = self.size;
        let rt = &self.rt;
        let c = self.client.as_mut().context("NBD connection closed")?;
        let ext = rt
            .block_on(c.block_status(0, size, context))
            .with_context(|| format!("block status {context}"))?;
        Ok(ext
            .into_iter()
            .filter(|e| e.flags & STATE_DIRTY != 0)
            .map(|e| Span::new(e.offset, e.length))
            .collect())
    }

    pub fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.disconnect());
        }
    }
}

impl BlockSource for NbdSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&mut self, offset: u64, len: u64) -> bulwark_store::Result<Vec<DataExtent>> {
        if !self.has_allocation {
            return Ok(vec![DataExtent {
                offset,
                len,
                data: true,
            }]);
        }
        let len = len.min(self.size.saturating_sub(offset));
        let rt = &self.rt;
        let c = self
            .client
            .as_mut()
            .ok_or_else(|| bulwark_store::Error::Invalid("NBD connection closed".into()))?;
        let ext = rt
            .block_on(c.block_status(offset, len, ALLOCATION))
            .map_err(|e| bulwark_store::Error::SourceRead {
                offset,
                source: to_io(e),
            })?;
        Ok(ext
            .into_iter()
            .map(|e| DataExtent {
                offset: e.offset,
                len: e.length,
                data: e.flags & STATE_ZERO == 0,
            })
            .collect())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> bulwark_store::Result<()> {
        let len = buf.len();
        let rt = &self.rt;
        let c = self
            .client
            .as_mut()
            .ok_or_else(|| bulwark_store::Error::SourceRead {
                offset,
                source: std::io::Error::other("NBD connection closed"),
            })?;
        let data =
            rt.block_on(c.read(offset, len))
                .map_err(|e| bulwark_store::Error::SourceRead {
                    offset,
                    source: to_io(e),
                })?;
        buf.copy_from_slice(&data);
        Ok(())
    }
}
