//! Backing up and restoring libvirt domains: the domain XML, the
//! checkpoint chain, qemu-nbd/qemu-img, and the agent's own record of
//! checkpoints. libvirt itself is reached through [`crate::libvirt`].

pub mod backup;
pub mod chain;
pub mod domain;
pub mod nbdsrc;
pub mod qemu;
pub mod restore;
pub mod rewrite;
pub mod state;

/// Bulwark's XML namespace in domain `<metadata>`, and the prefix of every
/// checkpoint / bitmap Bulwark creates: shared with `bulwark-hook`.
pub use bulwark_proto::{CHECKPOINT_PREFIX, XMLNS};
/// Default state directory (checkpoint records, sockets, scratch files).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/bulwark";
