//! The repository format: what is stored and how. Nothing here touches a
//! backend; every type is bytes in, bytes out (`docs/format.md`).

pub mod blob;
pub mod chunker;
pub mod chunklist;
pub mod crypto;
pub mod extent;
pub mod id;
pub mod index;
pub mod keys;
pub mod layout;
pub(crate) mod object;
pub mod pack;
pub mod snapshot;
