//! What a live restore's backfill has written so far, readable: a guest
//! read of a range the backfill has restored already is served from its
//! local file, not fetched from the repository again. On a disk that takes
//! minutes to backfill, the guest's reads of what is done cost a page-cache
//! read instead of a round trip to the bucket; and a guest read just before
//! the overlay moves onto the file no longer waits for the bucket.
//!
//! Safe by its order: a range counts only once the restore wrote it (after
//! the chunk was authenticated), in the file of the current pass; a pass
//! that starts over forgets everything before it opens (and maybe
//! truncates) the file, and reads hold the lock while they read the file.
//! A read that fails here is served from the repository instead.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use bulwark_store::read::restore::Watch;

#[derive(Default)]
pub struct LocalCopy {
    pass: RwLock<Option<Pass>>,
    served: AtomicU64,
}

struct Pass {
    file: File,
    written: Ranges,
}

impl LocalCopy {
    /// `[offset, offset + len)` from the file, if the backfill has written
    /// all of it; `None` otherwise (or if reading the file failed).
    pub fn read(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let pass = self.pass.read().unwrap_or_else(|e| e.into_inner());
        let pass = pass.as_ref()?;
        if !pass.written.holds(offset, len as u64) {
            return None;
        }
        let mut buf = vec![0u8; len];
        match pass.file.read_exact_at(&mut buf, offset) {
            Ok(()) => {
                self.served.fetch_add(len as u64, Ordering::Relaxed);
                Some(buf)
            }
            Err(e) => {
                tracing::debug!("reading the backfill's file at {offset}: {e}");
                None
            }
        }
    }

    /// Whether the backfill has written all of `[offset, offset + len)`:
    /// a check without I/O, so an export asks before it reads (most reads
    /// of most exports find nothing here).
    pub fn holds(&self, offset: u64, len: u64) -> bool {
        let pass = self.pass.read().unwrap_or_else(|e| e.into_inner());
        pass.as_ref().is_some_and(|p| p.written.holds(offset, len))
    }

    /// Bytes served from the file so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Option<Pass>> {
        self.pass.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Watch for LocalCopy {
    fn starting(&self) {
        *self.write() = None;
    }

    fn opened(&self, file: &File) {
        // Without a descriptor of our own nothing is served from the file.
        match file.try_clone() {
            Ok(file) => {
                *self.write() = Some(Pass {
                    file,
                    written: Ranges::default(),
                })
            }
            Err(e) => tracing::debug!("the backfill's file will not be read: {e}"),
        }
    }

    fn wrote(&self, offset: u64, len: u64) {
        if let Some(p) = self.write().as_mut() {
            p.written.add(offset, len);
        }
    }
}

/// Disjoint byte ranges, `start -> end`, merged where they touch.
#[derive(Default)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn add(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (mut start, mut end) = (offset, offset.saturating_add(len));
        // One that starts at or before us and reaches us: merged.
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Those that start inside us (or right at our end): merged.
        let inside: Vec<(u64, u64)> = self.0.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.0.remove(&s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    fn holds(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.0
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &e)| e >= end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_hold_only_what_was_added() {
        let mut r = Ranges::default();
        r.add(100, 50);
        r.add(300, 100);
        assert!(r.holds(100, 50) && r.holds(120, 10));
        assert!(!r.holds(90, 20) && !r.holds(140, 20) && !r.holds(150, 1));
        assert!(!r.holds(100, 250), "the gap 150..300");
        r.add(150, 150); // fills the gap exactly
        assert!(r.holds(100, 300));
        assert_eq!(r.0.len(), 1);
        r.add(50, 60); // overlaps the start
        r.add(390, 20); // overlaps the end
        assert_eq!(r.0.iter().next(), Some((&50, &410)));
        r.add(0, 0);
        assert!(!r.holds(0, 1));
        r.add(500, 10);
        r.add(480, 100); // swallows it
        assert_eq!(r.0.len(), 2);
        assert!(r.holds(480, 100) && !r.holds(410, 1));
    }

    #[test]
    fn a_pass_serves_what_it_wrote_and_a_new_pass_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let c = LocalCopy::default();
        assert_eq!(c.read(0, 10), None, "no pass yet");
        c.opened(&f);
        f.write_all_at(&[7; 4096], 8192).unwrap();
        assert_eq!(c.read(8192, 10), None, "written but not told");
        c.wrote(8192, 4096);
        assert_eq!(c.read(8192, 4096), Some(vec![7; 4096]));
        assert_eq!(c.read(8000, 300), None);
        assert_eq!(c.served(), 4096);
        c.starting();
        assert_eq!(c.read(8192, 10), None, "a new pass starts from nothing");
    }
}
