//! Where the bytes come from: [`ReadAt`] (a disk of a snapshot, an image
//! file, a byte slice in tests), windows onto it (partitions) and
//! bounds-checked field readers for the parsers.

use std::io;
use std::sync::Arc;

use crate::error::{corrupt, Error, Result};

/// A random-access, read-only source of bytes of known size.
pub trait ReadAt: Send + Sync {
    /// Fills `buf` from `offset`; fails rather than return fewer bytes.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn size(&self) -> u64;
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.as_slice().read_at(offset, buf)
    }
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

impl ReadAt for &[u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| past_end(offset, buf.len(), self.len() as u64))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

impl ReadAt for std::fs::File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn size(&self) -> u64 {
        // Size 0 when unknown: every read then fails, nothing is made up.
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }
}

fn past_end(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("read {offset}+{len} past the end ({size} bytes)"),
    )
}

/// `len` bytes of another source from `start`: a partition of a disk.
#[derive(Clone)]
pub struct Window {
    inner: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
}

impl Window {
    /// The window, clipped to what `inner` holds (a partition table may
    /// claim more than the disk has; reads past the disk then fail cleanly).
    pub fn new(inner: Arc<dyn ReadAt>, start: u64, len: u64) -> Self {
        let size = inner.size();
        let start = start.min(size);
        let len = len.min(size - start);
        Window { inner, start, len }
    }
}

impl ReadAt for Window {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.inner.read_at(self.start + offset, buf),
            _ => Err(past_end(offset, buf.len(), self.len)),
        }
    }
    fn size(&self) -> u64 {
        self.len
    }
}

/// Reads exactly `buf.len()` bytes at `offset` of `dev`, with the offset in
/// the error.
pub fn read_exact(dev: &dyn ReadAt, offset: u64, buf: &mut [u8]) -> Result<()> {
    dev.read_at(offset, buf).map_err(|source| Error::Io {
        offset,
        len: buf.len(),
        source,
    })
}

/// `len` bytes at `offset` of `dev`, in a new buffer. Callers bound `len`.
pub fn read_vec(dev: &dyn ReadAt, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    read_exact(dev, offset, &mut buf)?;
    Ok(buf)
}

/// Bounds-checked fields of an on-disk structure `what` held in a slice.
#[derive(Clone, Copy)]
pub struct Fields<'a> {
    pub bytes: &'a [u8],
    pub what: &'static str,
}

impl<'a> Fields<'a> {
    pub fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Fields { bytes, what }
    }

    /// `n` bytes at `o`.
    pub fn slice(&self, o: usize, n: usize) -> Result<&'a [u8]> {
        o.checked_add(n)
            .and_then(|end| self.bytes.get(o..end))
            .ok_or_else(|| {
                corrupt(
                    self.what,
                    format!("field {o}+{n} past the end of {} bytes", self.bytes.len()),
                )
            })
    }

    fn array<const N: usize>(&self, o: usize) -> Result<[u8; N]> {
        let s = self.slice(o, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub fn u8(&self, o: usize) -> Result<u8> {
        Ok(self.array::<1>(o)?[0])
    }
    pub fn le16(&self, o: usize) -> Result<u16> {
        self.array(o).map(u16::from_le_bytes)
    }
    pub fn le32(&self, o: usize) -> Result<u32> {
        self.array(o).map(u32::from_le_bytes)
    }
    pub fn le64(&self, o: usize) -> Result<u64> {
        self.array(o).map(u64::from_le_bytes)
    }
    pub fn be16(&self, o: usize) -> Result<u16> {
        self.array(o).map(u16::from_be_bytes)
    }
    pub fn be32(&self, o: usize) -> Result<u32> {
        self.array(o).map(u32::from_be_bytes)
    }
    pub fn be64(&self, o: usize) -> Result<u64> {
        self.array(o).map(u64::from_be_bytes)
    }
}

/// A label field: bytes up to the first NUL, trailing spaces trimmed;
/// `None` when empty.
pub fn label(raw: &[u8]) -> Option<String> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let s = String::from_utf8_lossy(&raw[..end]).trim_end().to_string();
    (!s.is_empty()).then_some(s)
}

/// UTF-16LE code units as a string (unpaired surrogates become U+FFFD),
/// stopping at a NUL.
pub fn utf16le(raw: &[u8]) -> String {
    let units = raw
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0);
    char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// `a * b` or a corruption error naming `what`.
pub fn mul(what: &'static str, a: u64, b: u64) -> Result<u64> {
    a.checked_mul(b)
        .ok_or_else(|| corrupt(what, format!("{a} * {b} overflows")))
}

/// `a + b` or a corruption error naming `what`.
pub fn add(what: &'static str, a: u64, b: u64) -> Result<u64> {
    a.checked_add(b)
        .ok_or_else(|| corrupt(what, format!("{a} + {b} overflows")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_reads_inside_and_refuses_past_its_end() {
        let disk: Arc<dyn ReadAt> = Arc::new((0u8..100).collect::<Vec<u8>>());
        let w = Window::new(disk, 10, 20);
        let mut b = [0u8; 5];
        w.read_at(15, &mut b).unwrap();
        assert_eq!(b, [25, 26, 27, 28, 29]);
        assert!(w.read_at(16, &mut b).is_err());
        assert!(w.read_at(u64::MAX - 1, &mut b).is_err());
    }

    #[test]
    fn window_is_clipped_to_its_source() {
        let disk: Arc<dyn ReadAt> = Arc::new(vec![0u8; 100]);
        assert_eq!(Window::new(disk.clone(), 90, 50).size(), 10);
        assert_eq!(Window::new(disk, 500, 50).size(), 0);
    }

    #[test]
    fn fields_refuse_out_of_bounds() {
        let f = Fields::new(&[1, 2, 3], "t");
        assert_eq!(f.le16(1).unwrap(), 0x0302);
        assert!(f.le32(0).is_err());
        assert!(f.slice(usize::MAX, 2).is_err());
    }
}
