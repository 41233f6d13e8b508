//! The store's error type: one enum, so callers can match on what went wrong
//! (wrong key, damaged data, backend trouble) without parsing strings.

use crate::backend::BackendError;
use crate::format::id::Id;

/// Everything the repository can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Backend(#[from] BackendError),

    #[error("no repository at {0} (run `bulwark repo init` first)")]
    NoRepository(String),

    #[error("a repository already exists at {0}")]
    AlreadyInitialized(String),

    #[error("wrong passphrase or key file: no key slot of this repository opens with it")]
    WrongKey,

    #[error("unsupported repository version {0}")]
    UnsupportedVersion(u32),

    /// Authentication failed or the content does not match its id: the bytes
    /// in the repository were changed after they were written.
    #[error("damaged {what}: {detail}")]
    Corrupt { what: String, detail: String },

    #[error("chunk {0} is not in the index (repository incomplete or damaged)")]
    MissingChunk(Id),

    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),

    #[error("snapshot prefix {0:?} is ambiguous")]
    AmbiguousSnapshot(String),

    #[error("source read failed at offset {offset}: {source}")]
    SourceRead {
        offset: u64,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("another gc is running on this repository: {0}")]
    GcRunning(String),

    /// A restore target that is there already and was not to be replaced.
    #[error("{0} already exists")]
    TargetExists(String),

    #[error("invalid input: {0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
