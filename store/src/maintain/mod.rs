//! Keeping a repository in shape: which snapshots to keep ([`retention`],
//! [`prune`]), reclaiming what none needs ([`gc`]), checking what is there
//! ([`verify`]), and in a locked repository keeping the locks on what is
//! kept and reclaiming what expired ([`lock`]).

pub mod gc;
pub mod lock;
pub mod prune;
pub mod retention;
pub mod verify;
