//! An [`Export`] over a regular file (raw image), with holes found by
//! `SEEK_DATA`/`SEEK_HOLE`. Used by tests and the benchmark, and handy for
//! serving a restored raw image.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::export::{Export, ExportError, Extent, ExtentState};

/// A read-only raw file.
#[derive(Debug, Clone)]
pub struct FileExport {
    file: Arc<File>,
    size: u64,
}

impl FileExport {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file: Arc::new(file),
            size,
        })
    }

    /// `lseek` with SEEK_DATA/SEEK_HOLE; `None` when there is no data at or
    /// after `pos` (ENXIO). `lseek` moves the shared file position, which is
    /// harmless because reads use `pread`.
    fn seek(&self, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let pos =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: plain syscall on a file descriptor we own for `self`'s lifetime.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), pos, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }

    fn extents_sync(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d.min(end),
                Ok(None) => end,
                // Filesystems without SEEK_DATA: everything is data.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    out.push(extent(pos, end, ExtentState::Data));
                    break;
                }
                Err(e) => return Err(e),
            };
            if data > pos {
                out.push(extent(pos, data, ExtentState::Hole));
            }
            if data >= end {
                break;
            }
            let hole = self.seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            out.push(extent(data, hole, ExtentState::Data));
            pos = hole;
        }
        Ok(out)
    }
}

fn extent(start: u64, end: u64, state: ExtentState) -> Extent {
    Extent {
        offset: start,
        length: end - start,
        state,
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
