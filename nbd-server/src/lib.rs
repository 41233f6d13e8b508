//! NBD (Network Block Device) for Bulwark: the wire protocol, a tokio server
//! for read-only exports, and a client for reading QEMU's backup exports.
//!
//! - [`proto`]: constants and pure parsers/encoders (the fuzz surface).
//! - [`Export`]: what a served image must provide ([`MemExport`] serves
//!   memory; the `bulwark-nbd` crate serves snapshots and raw files).
//! - [`Server`]: fixed-newstyle negotiation, structured replies,
//!   `base:allocation` block status, many requests in flight per connection.
//! - [`Client`]: structured reads and block status over any metadata
//!   context, e.g. `qemu:dirty-bitmap:backup-vda`.
//! - [`tls`]: `NBD_OPT_STARTTLS` credentials for both halves
//!   ([`ServerTls`], [`ClientTls`]), in QEMU's file layout.
//!
//! This crate does not depend on the store: the fuzz targets build it alone.

pub mod client;
pub mod export;
pub mod mem_export;
pub mod proto;
pub mod server;
mod stream;
pub mod tls;

pub use client::{BlockStatusExtent, Client, ClientError, ClientOptions};
pub use export::{BlockSize, Export, ExportError, Extent, ExtentState};
pub use mem_export::MemExport;
pub use server::{Server, ServerConfig, ServerHandle};
pub use tls::{ClientTls, ServerTls, TlsError, TlsMode};

/// Largest READ (and WRITE payload) the server accepts and the client sends:
/// 32 MiB, the limit qemu and nbdkit use too. Larger requests get EINVAL.
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
