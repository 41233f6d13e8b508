//! The NBD wire format: constants plus pure, allocation-light parsers and
//! encoders. Nothing here does I/O, so every parser can be fed arbitrary bytes
//! (this module is the fuzz surface): parsers return [`ProtoError`] and never
//! panic.
//!
//! Covers fixed-newstyle negotiation (options and option replies), the
//! transmission-phase request, simple replies and structured reply chunks,
//! following `doc/proto.md` of the reference implementation.

pub mod consts;
mod error;
pub mod handshake;
pub mod transmission;
mod wire;

pub use error::ProtoError;
