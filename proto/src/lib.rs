//! What Bulwark's agent and its clients (the CLI, `bulwark-hook`) say to
//! each other on the control socket, and the names both sides must agree
//! on.
//!
//! The socket speaks one JSON object per line each way: a [`Request`]
//! tagged by `op`, answered by a [`Reply`] (`{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`).
//!
//! This crate is std-only by default so that `bulwark-hook`, which libvirt
//! runs synchronously while holding its locks, stays tiny: the hook builds
//! its only message with [`HookEvent::to_json_line`]. The agent turns on
//! the `serde` feature to read and write every message.

mod hook;
mod names;
mod reply;
mod request;
pub mod status;

pub use hook::HookEvent;
pub use names::{
    is_ours, needs_first_bitmap, CHECKPOINT_PREFIX, DEFAULT_SOCKET, HOOK_BITMAP, XMLNS,
};
pub use reply::{Backed, Done, Pong, Refused, Reply};
pub use request::Request;
pub use status::Status;
