//! Read-only, bounded readers of what a VM's disks hold: partition tables
//! (MBR, GPT), LVM2 logical volumes and filesystems (ext2/3/4, XFS, FAT,
//! NTFS), over any random-access source ([`ReadAt`]): a disk of a snapshot,
//! an image file, a byte slice in tests. Nothing here knows the repository.
//!
//! The images are the VM owner's: every reader treats them as hostile.
//! Sizes and counts read from disk are checked before use, walks are
//! bounded, and damage ends in an [`Error`], never a panic or a hang.
//!
//! - [`volume`]: what a set of disks holds, by path (`vda/p1`, ...);
//! - [`tree`]: the listing model every filesystem implements ([`Tree`]);
//! - [`part`], [`lvm`], [`ext4`], [`xfs`], [`fat`], [`ntfs`]: the formats.

pub mod error;
pub mod ext4;
mod extent;
pub mod fat;
pub mod io;
pub mod lvm;
pub mod ntfs;
pub mod part;
pub mod tree;
pub mod volume;
pub mod xfs;

pub use error::{Error, Result};
pub use io::{ReadAt, Window};
pub use tree::{lookup, valid_name, Entry, Kind, Meta, Node, Time, Tree};
pub use volume::{discover, resolve, Content, Place, Volume};
