//! Process-wide allocator tuning for the binaries.
//!
//! Backups, restores and exports run many threads that allocate and free
//! chunk buffers of 0.25-8 MiB. glibc gives threads up to 8 malloc arenas
//! a core, and each keeps what was freed in it: memory grew with the data
//! read (a 2 GiB backup held 222 MiB, an export 3x its cache). A few arenas
//! keep it near what is live (176 MiB; the export near its cache), and the
//! buffers are few and large, so their locks are seldom contended.

/// At most `n` malloc arenas for this process. Call first thing in `main`,
/// before any thread exists.
pub fn limit_malloc_arenas(n: i32) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable of the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, n);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = n;
}
