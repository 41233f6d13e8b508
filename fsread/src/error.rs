//! One error type for every reader: what was read and why it failed, so a
//! hostile or damaged image ends in a sentence, never a panic.

use std::io;

/// What reading a volume or a filesystem can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source could not deliver the bytes (a damaged chunk, a read past
    /// its end).
    #[error("reading {len} bytes at offset {offset}: {source}")]
    Io {
        offset: u64,
        len: usize,
        source: io::Error,
    },

    /// The structure on disk contradicts itself or its bounds.
    #[error("{what}: corrupt: {detail}")]
    Corrupt { what: &'static str, detail: String },

    /// Valid, but a feature this reader does not implement.
    #[error("{0}")]
    Unsupported(String),

    #[error("{0}: no such file or directory")]
    NotFound(String),

    #[error("{0}: not a directory")]
    NotDir(String),

    /// A walk or a map would grow past a bound (a hostile image can
    /// describe more than any real one).
    #[error("{0}")]
    TooLarge(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A [`Error::Corrupt`] for filesystem `what`.
pub(crate) fn corrupt(what: &'static str, detail: impl Into<String>) -> Error {
    Error::Corrupt {
        what,
        detail: detail.into(),
    }
}
