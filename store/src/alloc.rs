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

/// For a process that backs up: buffers of 8 MiB or more (its packs) are
/// mapped on their own and unmapped when freed. glibc's threshold otherwise
/// slides up to the largest buffer freed (a 16 MiB pack), after which packs
/// come from the heap, which keeps what they leave: a backup of 8 GiB into
/// S3 held 256-270 MiB where 193 are live, and more with more data. Below
/// it stay the chunk buffers (up to the 4 MiB chunk maximum), reused from
/// the heap (a 4 MiB threshold mapped those too and made that backup 35%
/// slower). Not for restores and exports: their memory does not grow so,
/// and mapping their large fetch buffers apart made them 15-25% slower.
pub fn map_large_buffers_apart() {
    #[cfg(target_env = "gnu")]
    // SAFETY: as above.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
    }
}
