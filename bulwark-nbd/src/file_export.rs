//! An [`Export`] over a raw image file or block device, with holes found by
//! `SEEK_DATA`/`SEEK_HOLE` ([`bulwark_store::backup::source::allocation_map`]). Used by tests and the benchmark, and handy for
//! serving a restored raw image.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use nbd_server::{Export, ExportError, Extent};

/// A read-only raw file.
#[derive(Debug, Clone)]
pub struct FileExport {
    file: Arc<File>,
    size: u64,
}

impl FileExport {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = File::open(path)?;
        // Seeking to the end sizes block devices too (their metadata says 0).
        let size = io::Seek::seek(&mut &file, io::SeekFrom::End(0))?;
        Ok(Self {
            file: Arc::new(file),
            size,
        })
    }

    /// The data/hole map, from the store's one implementation (which never
    /// turns "no hole information" into a hole).
    fn extents_sync(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        Ok(
            bulwark_store::backup::source::allocation_map(&self.file, offset, end)?
                .into_iter()
                .map(|e| Extent::data_or_hole(e.offset, e.len, e.data))
                .collect(),
        )
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        // Two lseeks on a cached inode: cheap enough to run inline.
        Ok(self.extents_sync(offset, len)?)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        let file = Arc::clone(&self.file);
        let buf = tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            let mut buf = BytesMut::zeroed(len as usize);
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf.freeze())
        })
        .await
        .map_err(|e| ExportError::Other(format!("read task failed: {e}")))??;
        Ok(buf)
    }

    fn prefetch(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return;
        };
        // SAFETY: advisory syscall on our own descriptor; failure is harmless.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED);
        }
    }
}
