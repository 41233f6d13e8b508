use thiserror::Error;

/// Why a byte sequence is not a valid NBD message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// The message ended before a field it announces.
    #[error("truncated message: needed {need} bytes, only {have} left")]
    Truncated { need: usize, have: usize },
    /// A magic number did not match: the peer does not speak NBD, or the
    /// stream lost its framing.
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    /// Bytes were left over after a fixed-layout payload.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// Strings are capped at 4096 bytes by the protocol.
    #[error("string of {0} bytes exceeds the 4096-byte limit")]
    StringTooLong(usize),
    /// Strings must be UTF-8 without NUL.
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
    /// A field holds a value the protocol forbids.
    #[error("invalid {what}: {value}")]
    Invalid { what: &'static str, value: u64 },
}
