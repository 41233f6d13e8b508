//! What the server serves: the [`Export`] trait that the repository (and the
//! test/benchmark file exports) implement, and the extent model it speaks.

use std::future::Future;

use bytes::Bytes;
use thiserror::Error;

use crate::proto::consts::{EINVAL, EIO, STATE_HOLE, STATE_ZERO};

/// Allocation state of a byte range, as `base:allocation` and the
/// OFFSET_HOLE read path need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentState {
    /// Allocated; contents unknown (must be read).
    Data,
    /// Allocated but known to read as zeroes.
    Zero,
    /// Not allocated; reads as zeroes (a sparse hole, or a zero run the
    /// repository stored without a chunk).
    Hole,
}

impl ExtentState {
    /// Flags of this state in the `base:allocation` context.
    pub fn allocation_flags(self) -> u32 {
        match self {
            Self::Data => 0,
            Self::Zero => STATE_ZERO,
            Self::Hole => STATE_HOLE | STATE_ZERO,
        }
    }

    /// Whether the range is known to read as zeroes without reading it.
    pub fn reads_as_zero(self) -> bool {
        !matches!(self, Self::Data)
    }
}

/// A contiguous range with one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub state: ExtentState,
}

impl Extent {
    /// A range that holds data, or (`data == false`) reads as zeros.
    pub fn data_or_hole(offset: u64, length: u64, data: bool) -> Self {
        Extent {
            offset,
            length,
            state: if data {
                ExtentState::Data
            } else {
                ExtentState::Hole
            },
        }
    }
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        Self {
            min: 1,
            preferred: 4096,
            max: crate::MAX_REQUEST_LEN,
        }
    }
}

/// Why an export could not answer; mapped to an NBD error value.
#[derive(Debug, Error)]
pub enum ExportError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data failed verification (bad MAC, missing chunk, ...): the
    /// client gets EIO for this request and the connection stays up.
    #[error("damaged data at offset {offset}: {reason}")]
    Damaged { offset: u64, reason: String },
    #[error("range {offset}+{length} is outside the export")]
    OutOfRange { offset: u64, length: u64 },
    #[error("{0}")]
    Other(String),
}

impl ExportError {
    /// The NBD error value sent to the client.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            Self::OutOfRange { .. } => EINVAL,
            _ => EIO,
        }
    }
}

/// A read-only disk image the server can serve.
///
/// The server validates ranges before calling in: `offset + len <= size()`
/// always holds, and `len` never exceeds [`crate::MAX_REQUEST_LEN`].
/// Methods take `&self` and are called concurrently from many requests.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes; fixed for the export's lifetime.
    fn size(&self) -> u64;

    /// Extents covering `[offset, offset + len)`, in order. Gaps and
    /// overhang are tolerated (gaps are treated as data), so an export that
    /// knows nothing may return a single `Data` extent.
    fn extents(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, ExportError>> + Send;

    /// Exactly `len` bytes at `offset` (holes read as zeroes). Damage must
    /// surface as an error, never as silently wrong bytes.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, ExportError>> + Send;

    /// `NBD_CMD_CACHE`: the client will read this range soon. A hint only.
    fn prefetch(&self, _offset: u64, _len: u64) {}

    /// Block size constraints to advertise.
    fn block_size(&self) -> BlockSize {
        BlockSize::default()
    }
}
