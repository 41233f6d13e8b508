//! The read path: how a disk's chunks are fetched ([`fetch`]), written back
//! whole ([`restore`]) or served at random offsets ([`reader`]: NBD exports,
//! FUSE mounts, live restores).

mod budget;
pub mod fetch;
pub mod outage;
pub mod reader;
pub mod restore;
pub mod seed;
