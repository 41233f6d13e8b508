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

/// Whether a checkpoint or bitmap is Bulwark's.
pub fn is_ours(name: &str) -> bool {
    name.starts_with(CHECKPOINT_PREFIX)
}

/// The first-bitmap rule, stated once for the hook and the agent: a qcow2
/// disk of a protected domain that carries no bitmap of Bulwark's (of
/// those named in `bitmaps`) gets [`HOOK_BITMAP`], so that its changes are
/// tracked from now on; one with any keeps what it has (a checkpoint
/// chain, or the first bitmap itself). Once a chain exists the agent
/// removes the first bitmap again.
pub fn needs_first_bitmap<'a>(bitmaps: impl IntoIterator<Item = &'a str>) -> bool {
    !bitmaps.into_iter().any(is_ours)
}

/// Where the agent listens unless configured otherwise, and where the hook
/// and the CLI look for it.
pub const DEFAULT_SOCKET: &str = "/run/bulwark/agent.sock";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_bitmap_is_one_of_ours() {
        // The agent finds the hook's bitmap by this prefix.
        assert!(is_ours(HOOK_BITMAP));
    }

    #[test]
    fn a_disk_gets_the_first_bitmap_only_without_one_of_ours() {
        assert!(needs_first_bitmap([]));
        assert!(needs_first_bitmap(["theirs", "backup-1"]));
        assert!(!needs_first_bitmap(["theirs", HOOK_BITMAP]));
        assert!(!needs_first_bitmap(["bw-1700000000-00ab"]));
    }
}
