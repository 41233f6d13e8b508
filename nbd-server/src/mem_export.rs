//! An in-memory [`Export`] with explicit holes: for tests of this crate and
//! of its users (no file system, exact control over the extent map).

use bytes::Bytes;

use crate::export::{Export, ExportError, Extent, ExtentState};

/// Bytes in memory plus a list of ranges reported as holes (which must hold
/// zeroes). Can be told to fail reads in a range to exercise EIO paths.
#[derive(Debug, Clone)]
pub struct MemExport {
    data: Bytes,
    holes: Vec<(u64, u64)>,
    damaged: Option<(u64, u64)>,
}

impl MemExport {
    /// `holes` are `(offset, length)` pairs; they are zeroed in `data`.
    pub fn new(mut data: Vec<u8>, mut holes: Vec<(u64, u64)>) -> Self {
        let size = data.len() as u64;
        holes.retain(|&(o, l)| l > 0 && o < size);
        for h in holes.iter_mut() {
            h.1 = h.1.min(size - h.0);
            data[h.0 as usize..(h.0 + h.1) as usize].fill(0);
        }
        holes.sort_unstable();
        Self {
            data: data.into(),
            holes,
            damaged: None,
        }
    }

    /// Reads touching `[offset, offset+len)` fail with `Damaged`.
    pub fn with_damage(mut self, offset: u64, len: u64) -> Self {
        self.damaged = Some((offset, len));
        self
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let end = offset.saturating_add(len).min(self.size());
        let mut out = Vec::new();
        let mut pos = offset;
        for &(ho, hl) in &self.holes {
            let he = ho + hl;
            if he <= pos || ho >= end {
                continue;
            }
            if ho > pos {
                out.push(Extent {
                    offset: pos,
                    length: ho - pos,
                    state: ExtentState::Data,
                });
                pos = ho;
            }
            let e = he.min(end);
            out.push(Extent {
                offset: pos,
                length: e - pos,
                state: ExtentState::Hole,
            });
            pos = e;
        }
        if pos < end {
            out.push(Extent {
                offset: pos,
                length: end - pos,
                state: ExtentState::Data,
            });
        }
        Ok(out)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        let end = offset
            .checked_add(len.into())
            .filter(|&e| e <= self.size())
            .ok_or(ExportError::OutOfRange {
                offset,
                length: len.into(),
            })?;
        if let Some((d, dl)) = self.damaged {
            if offset < d + dl && d < end {
                return Err(ExportError::Damaged {
                    offset: d.max(offset),
                    reason: "injected damage".into(),
                });
            }
        }
        Ok(self.data.slice(offset as usize..end as usize))
    }
}
