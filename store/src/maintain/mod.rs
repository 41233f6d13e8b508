//! Keeping a repository in shape: which snapshots to keep ([`retention`],
//! [`prune`]), reclaiming what none needs ([`gc`]), checking what is there
//! ([`verify`]).

pub mod gc;
pub mod prune;
pub mod retention;
pub mod verify;
