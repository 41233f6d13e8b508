//! Bulwark's NBD exports and the `bulwark-nbd` server: snapshot disks
//! ([`StoreExport`]) and raw files ([`FileExport`]) behind the protocol
//! crate's [`nbd_server::Export`] trait. The protocol, server and client
//! themselves are in `nbd-server`, which does not depend on the store.

pub mod backfill;
pub mod cli;
pub mod demand;
pub mod file_export;
pub mod local_copy;
pub mod store_export;
pub mod trace;

pub use file_export::FileExport;
pub use store_export::StoreExport;
