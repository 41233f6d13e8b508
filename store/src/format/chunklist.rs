//! A disk's content in a snapshot: a run of extents from offset 0 to the
//! disk's size, each either a chunk or zeros. Zero and unallocated ranges
//! cost no chunk, so restores stay sparse and a 1 TiB mostly-empty disk has a
//! short list.

use crate::error::{Error, Result};
use crate::format::id::Id;
use crate::format::object::Reader;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    /// `None`: the range reads as zeros.
    pub chunk: Option<Id>,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkList {
    extents: Vec<Extent>,
}

impl ChunkList {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the next extent; neighbouring zero extents merge.
    pub fn push(&mut self, len: u64, chunk: Option<Id>) {
        if len == 0 {
            return;
        }
        let offset = self.size();
        if chunk.is_none() {
            if let Some(last) = self.extents.last_mut() {
                if last.chunk.is_none() {
                    last.len += len;
                    return;
                }
            }
        }
        self.extents.push(Extent { offset, len, chunk });
    }

    pub fn size(&self) -> u64 {
        self.extents.last().map_or(0, Extent::end)
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Index of the extent containing `offset` (None at or past the end).
    pub fn find(&self, offset: u64) -> Option<usize> {
        let i = self.extents.partition_point(|e| e.end() <= offset);
        (i < self.extents.len()).then_some(i)
    }

    /// Whether an extent starts exactly at `offset`.
    pub fn is_boundary(&self, offset: u64) -> bool {
        self.find(offset)
            .is_some_and(|i| self.extents[i].offset == offset)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.extents.len() * 41);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        for e in &self.extents {
            match e.chunk {
                None => {
                    out.push(0);
                    out.extend_from_slice(&e.len.to_le_bytes());
                }
                Some(id) => {
                    out.push(1);
                    out.extend_from_slice(&e.len.to_le_bytes());
                    out.extend_from_slice(&id.0);
                }
            }
        }
        out
    }

    pub fn decode(payload: &[u8], name: &str) -> Result<Self> {
        let mut r = Reader::new(payload, name);
        r.expect(MAGIC)?;
        let n = r.u64()?;
        let mut list = ChunkList::new();
        for _ in 0..n {
            let tag = r.u8()?;
            let len = r.u64()?;
            let chunk = match tag {
                0 => None,
                1 => Some(r.id()?),
                _ => return Err(Error::corrupt(name, "bad extent tag")),
            };
            list.size()
                .checked_add(len)
                .ok_or_else(|| Error::corrupt(name, "extent past 2^64"))?;
            list.extents.push(Extent {
                offset: list.size(),
                len,
                chunk,
            });
        }
        if !r.done() {
            return Err(Error::corrupt(name, "trailing bytes"));
        }
        Ok(list)
    }
}

const MAGIC: &[u8; 4] = b"BWCL";
pub const KIND: &str = "chunklist";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_merge_find_roundtrip() {
        let mut l = ChunkList::new();
        let a = Id::random();
        l.push(10, Some(a));
        l.push(5, None);
        l.push(5, None);
        l.push(20, Some(a));
        assert_eq!(l.extents().len(), 3);
        assert_eq!(l.size(), 40);
        assert_eq!(l.find(9), Some(0));
        assert_eq!(l.find(10), Some(1));
        assert_eq!(l.find(40), None);
        assert!(l.is_boundary(20) && !l.is_boundary(21));
        assert_eq!(ChunkList::decode(&l.encode(), "t").unwrap(), l);
        assert!(ChunkList::decode(&l.encode()[..30], "t").is_err());
    }
}
