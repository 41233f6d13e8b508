//! Backing up libvirt domains: reading the domain, driving libvirt
//! (checkpoints, pull-mode backups) and qemu-nbd/qemu-img, and the agent's
//! own record of checkpoints.
//!
//! libvirt is driven through `virsh` (module [`virsh`]), the only place that
//! knows how; swapping it for the `virt` crate touches that module alone.

pub mod backup;
pub mod domain;
pub mod nbdsrc;
pub mod qemu;
pub mod restore;
pub mod rewrite;
pub mod state;
pub mod virsh;

/// Bulwark's XML namespace in domain `<metadata>`.
pub const XMLNS: &str = "https://bulwark.dev/xmlns/libvirt/1";
/// Prefix of every checkpoint / bitmap Bulwark creates.
pub const CHECKPOINT_PREFIX: &str = "bw-";
/// Default state directory (checkpoint records, sockets, scratch files).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/bulwark";
