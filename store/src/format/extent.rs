//! Ranges of a disk, in one vocabulary: "these bytes" ([`Span`]: a dirty
//! range, a hole) and "these bytes, data or zeros" ([`DataExtent`]: what a
//! source or a snapshot holds). A chunk list's extents also name their
//! chunk: `chunklist::Extent`. NBD's extents carry protocol flags and stay
//! in the NBD crate.

/// A byte range: `len` bytes from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
}

impl Span {
    pub const fn new(offset: u64, len: u64) -> Span {
        Span { offset, len }
    }

    /// One past the last byte (saturating).
    pub const fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// A byte range that holds data, or (`data == false`) is known to read as
/// zeros (a hole, an unallocated or zero cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataExtent {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

impl DataExtent {
    /// One past the last byte (saturating).
    pub const fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}
