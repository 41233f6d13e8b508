//! Names the agent and the hook each use and must never disagree on: a
//! mismatch would not fail loudly, it would make the hook ignore protected
//! domains or add bitmaps the agent does not recognise as its own.

/// Bulwark's XML namespace in a domain's `<metadata>`: a domain carrying it
/// is protected.
pub const XMLNS: &str = "https://bulwark.dev/xmlns/libvirt/1";

/// Prefix of every checkpoint and dirty bitmap Bulwark creates; anything
/// else on a disk belongs to someone else and is left alone.
pub const CHECKPOINT_PREFIX: &str = "bw-";

/// The bitmap `bulwark-hook` (or the agent, from a define event) adds to a
/// protected domain's disks before its first backup.
pub const HOOK_BITMAP: &str = "bw-hook";

/// Where the agent listens unless configured otherwise, and where the hook
/// and the CLI look for it.
pub const DEFAULT_SOCKET: &str = "/run/bulwark/agent.sock";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_bitmap_is_one_of_ours() {
        // The agent finds the hook's bitmap by this prefix.
        assert!(HOOK_BITMAP.starts_with(CHECKPOINT_PREFIX));
    }
}
