//! One module per command group.

pub mod agent;
pub mod bench;
pub mod check_config;
pub mod completions;
pub mod drill;
pub mod files;
pub mod gc;
pub mod host_files;
pub mod image;
pub mod lock;
pub mod mount;
pub mod mount_tree;
pub mod prune;
pub mod repo;
pub mod restore_live;
pub mod restore_vm;
pub mod schedule;
pub mod snapshots;
pub mod sync;
pub mod verify;
pub mod vm;
pub mod web;
