//! What a backup reads: a block-addressed source that can say which ranges
//! hold data, so holes are never read.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::extent::Span;

pub use crate::format::extent::DataExtent;

/// A disk being backed up. Reads may come from one thread at a time.
pub trait BlockSource: Send {
    fn size(&self) -> u64;

    /// Extents covering `[offset, offset + len)` in order, with no gaps.
    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<DataExtent>>;

    /// Fills `buf` from `offset` (which lies within the source).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// The data/hole map of `[offset, end)` of a file, from `SEEK_DATA` and
/// `SEEK_HOLE`: the one implementation for backups and the NBD file export.
///
/// The rule that keeps it safe: only a positive answer makes a hole. `ENXIO`
/// from `SEEK_DATA` is the kernel saying "no data after here"; `EINVAL` or
/// `ESPIPE` mean "no hole information" (block devices, some filesystems),
/// so the rest is data and gets read; any other error is returned. Block
/// devices are never asked: they are all data.
pub fn allocation_map(file: &File, offset: u64, end: u64) -> io::Result<Vec<DataExtent>> {
    let mut out = Vec::new();
    let all_data = |out: &mut Vec<DataExtent>, pos: u64| {
        if pos < end {
            out.push(DataExtent {
                offset: pos,
                len: end - pos,
                data: true,
            });
        }
    };
    if file.metadata()?.file_type().is_block_device() {
        all_data(&mut out, offset);
        return Ok(out);
    }
    let mut pos = offset;
    while pos < end {
        let data = match lseek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d.min(end),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) if no_hole_info(&e) => {
                all_data(&mut out, pos);
                break;
            }
            Err(e) => return Err(e),
        };
        if data > pos {
            out.push(DataExtent {
                offset: pos,
                len: data - pos,
                data: false,
            });
            pos = data;
            continue;
        }
        // `pos` holds data: it runs to the next hole. A SEEK_HOLE that
        // cannot say (or a file that shrank under us: ENXIO) keeps the rest
        // as data, which the read then checks.
        let hole = match lseek(file, pos, libc::SEEK_HOLE) {
            Ok(h) => h.min(end),
            Err(e) if no_hole_info(&e) || e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) => return Err(e),
        };
        let hole = hole.max(pos + 1);
        out.push(DataExtent {
            offset: pos,
            len: hole - pos,
            data: true,
        });
        pos = hole;
    }
    Ok(out)
}

fn no_hole_info(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ESPIPE))
}

/// `lseek` that leaves the file position alone for readers: callers read
/// with `pread`, so moving it is harmless.
fn lseek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    let off = libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor `file` owns; no memory is touched.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// A raw image file or block device. Holes come from [`allocation_map`], so
/// a sparse image costs only its data extents; a device is read whole (the
/// backup still stores long zero runs as zero extents).
pub struct ImageFile {
    file: File,
    size: u64,
    path: std::path::PathBuf,
    is_device: bool,
}

impl ImageFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        Self::from_file(file, path)
    }

    /// `file`, opened already as `path` (which names it in errors).
    pub fn from_file(file: File, path: &Path) -> Result<Self> {
        let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))
            .map_err(|e| Error::io(format!("size of {}", path.display()), e))?;
        let is_device = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .file_type()
            .is_block_device();
        Ok(ImageFile {
            file,
            size,
            path: path.to_path_buf(),
            is_device,
        })
    }

    /// A block device (read whole) rather than a file (read by extents).
    pub fn is_device(&self) -> bool {
        self.is_device
    }
}

impl BlockSource for ImageFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<DataExtent>> {
        let end = offset.saturating_add(len).min(self.size);
        allocation_map(&self.file, offset, end).map_err(|e| {
            Error::io(
                format!("finding data extents of {}", self.path.display()),
                e,
            )
        })
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
    pub holes: Vec<Span>,
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

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<DataExtent>> {
        let end = (offset + len).min(self.size());
        let mut out = Vec::new();
        let mut pos = offset;
        let mut holes = self.holes.clone();
        holes.sort();
        for Span {
            offset: hs,
            len: hl,
        } in holes
        {
            let he = hs + hl;
            if he <= pos || hs >= end {
                continue;
            }
            if hs > pos {
                out.push(DataExtent {
                    offset: pos,
                    len: hs - pos,
                    data: true,
                });
            }
            let s = hs.max(pos);
            let e = he.min(end);
            out.push(DataExtent {
                offset: s,
                len: e - s,
                data: false,
            });
            pos = e;
        }
        if pos < end {
            out.push(DataExtent {
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
    }

    #[test]
    fn no_hole_information_means_data() {
        // A pipe answers SEEK_DATA with ESPIPE: that must read as data.
        let mut fds = [0; 2];
        // SAFETY: pipe() fills two descriptors we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the descriptors are fresh and owned by nobody else.
        let (r, _w) = unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        let ex = allocation_map(&r, 0, 1 << 20).unwrap();
        assert_eq!(
            ex,
            vec![DataExtent {
                offset: 0,
                len: 1 << 20,
                data: true
            }]
        );
    }

    #[test]
    fn hole_at_the_end_and_all_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        let ex = allocation_map(&f, 0, 4 << 20).unwrap();
        assert!(ex.iter().all(|e| !e.data), "{ex:?}");
        assert_eq!(ex.iter().map(|e| e.len).sum::<u64>(), 4 << 20);
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        let ex = allocation_map(&f, 0, 4 << 20).unwrap();
        assert!(ex[0].data && ex[0].offset == 0, "{ex:?}");
        assert!(!ex.last().unwrap().data, "{ex:?}");
        assert_eq!(ex.iter().map(|e| e.len).sum::<u64>(), 4 << 20);
    }
}
