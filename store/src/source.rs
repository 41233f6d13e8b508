//! What a backup reads: a block-addressed source that can say which ranges
//! hold data, so holes are never read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// A range of the source and whether it may hold data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceExtent {
    pub offset: u64,
    pub len: u64,
    /// `false`: known to read as zeros (hole, unallocated, zero cluster).
    pub data: bool,
}

/// A disk being backed up. Reads may come from one thread at a time.
pub trait BlockSource: Send {
    fn size(&self) -> u64;

    /// Extents covering `[offset, offset + len)` in order, with no gaps.
    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<SourceExtent>>;

    /// Fills `buf` from `offset` (which lies within the source).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// A raw image file (or block device). Holes come from SEEK_DATA/SEEK_HOLE,
/// so a sparse image costs only its data extents.
pub struct ImageFile {
    file: File,
    size: u64,
}

impl ImageFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))
            .map_err(|e| Error::io(format!("size of {}", path.display()), e))?;
        Ok(ImageFile { file, size })
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        // SAFETY: lseek on a file descriptor we own; no memory is touched.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        (r >= 0).then_some(r as u64)
    }
}

impl BlockSource for ImageFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        let end = (offset + len).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            // ENXIO (None) from SEEK_DATA: no data after pos. Filesystems
            // without hole support report everything as data, which is right.
            let data = self.seek(pos, libc::SEEK_DATA).unwrap_or(end).min(end);
            if data > pos {
                out.push(SourceExtent {
                    offset: pos,
                    len: data - pos,
                    data: false,
                });
                pos = data;
                continue;
            }
            let hole = self
                .seek(pos, libc::SEEK_HOLE)
                .unwrap_or(end)
                .min(end)
                .max(pos + 1);
            out.push(SourceExtent {
                offset: pos,
                len: hole - pos,
                data: true,
            });
            pos = hole;
        }
        Ok(out)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| Error::SourceRead { offset, source })
    }
}

/// An in-memory source, for tests and benchmarks.
pub struct MemSource {
    pub data: Vec<u8>,
    /// Ranges reported as holes (they must hold zeros in `data`).
    pub holes: Vec<(u64, u64)>,
    /// Bytes handed out by `read_at`, to check what a backup read.
    pub bytes_read: u64,
}

impl MemSource {
    pub fn new(data: Vec<u8>) -> Self {
        MemSource {
            data,
            holes: Vec::new(),
            bytes_read: 0,
        }
    }
}

impl BlockSource for MemSource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        let end = (offset + len).min(self.size());
        let mut out = Vec::new();
        let mut pos = offset;
        let mut holes = self.holes.clone();
        holes.sort();
        for (hs, hl) in holes {
            let he = hs + hl;
            if he <= pos || hs >= end {
                continue;
            }
            if hs > pos {
                out.push(SourceExtent {
                    offset: pos,
                    len: hs - pos,
                    data: true,
                });
            }
            let s = hs.max(pos);
            let e = he.min(end);
            out.push(SourceExtent {
                offset: s,
                len: e - s,
                data: false,
            });
            pos = e;
        }
        if pos < end {
            out.push(SourceExtent {
                offset: pos,
                len: end - pos,
                data: true,
            });
        }
        Ok(out)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let s = offset as usize;
        let src = self
            .data
            .get(s..s + buf.len())
            .ok_or_else(|| Error::Invalid("read past end of source".into()))?;
        buf.copy_from_slice(src);
        self.bytes_read += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn image_file_reports_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        drop(f);
        let mut src = ImageFile::open(&p).unwrap();
        let ex = src.extents(0, 8 << 20).unwrap();
        let total: u64 = ex.iter().map(|e| e.len).sum();
        assert_eq!(total, 8 << 20);
        let data: u64 = ex.iter().filter(|e| e.data).map(|e| e.len).sum();
        assert!((4096..(8 << 20)).contains(&data), "{ex:?}");
        let mut buf = [0u8; 4096];
        src.read_at(4 << 20, &mut buf).unwrap();
        assert_eq!(buf, [1u8; 4096]);
        let _ = std::io::stdout().flush();
    }
}
