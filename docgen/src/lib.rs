//! What the Debian package ships beside the binaries, generated so it
//! cannot drift from them: man pages and shell completions from the clap
//! definitions ([`man`], [`completions`]), and the copyright file from the
//! crates the binaries link ([`copyright`]). `scripts/build-deb.sh` runs
//! the `bulwark-docgen` binary.

pub mod completions;
pub mod copyright;
pub mod man;
