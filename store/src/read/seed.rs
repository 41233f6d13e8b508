//! Pack bytes fetched before a reader could ask for them. A live restore's
//! boot set names the pack ranges its chunks lie in, and pack names need
//! no key: its server fetches them while its index loads, a round trip or
//! two before a reader could plan them, and the reader takes its spans
//! from here instead of fetching them again.
//!
//! Safe whatever the index says by then: a pack never changes once stored,
//! so a range of it holds the same bytes forever, and the reader opens
//! (authenticates) each chunk it takes from here as from any fetch. A range
//! that fails (its pack swept since the boot set was recorded) is just not
//! here, and the reader fetches as before.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::backend::Backend;
use crate::format::id::Id;
use crate::format::layout;

/// At most this many bytes are fetched ahead: a boot set is a few MiB,
/// and what is fetched here is held until read.
pub const MAX_BYTES: u64 = 64 << 20;

/// Pack ranges being fetched or fetched, each given out until every byte
/// of it was taken once (or [`Seeds::clear`]).
#[derive(Default)]
pub struct Seeds {
    state: Mutex<Vec<Seed>>,
    /// Signalled when a fetch ends.
    done: Condvar,
}

struct Seed {
    object: String,
    start: u64,
    len: u64,
    bytes: Loading,
    /// Bytes given out so far: when all were, the seed is dropped.
    taken: u64,
}

enum Loading {
    Pending,
    Ready(Arc<Vec<u8>>),
    Failed,
}

impl Seeds {
    pub fn new() -> Arc<Self> {
        Arc::new(Seeds::default())
    }

    /// Fetches `ranges` (pack, start, length), in order, `parallel` at a
    /// time, up to [`MAX_BYTES`] in all. Returns at once; readers asking
    /// for a range still coming wait for it.
    pub fn fetch(
        self: &Arc<Self>,
        backend: Arc<dyn Backend>,
        ranges: &[(Id, u64, u64)],
        parallel: usize,
    ) {
        let mut budget = MAX_BYTES;
        let wanted: Vec<(String, u64, u64)> = ranges
            .iter()
            .take_while(|(_, _, len)| {
                let fits = *len <= budget;
                budget = budget.saturating_sub(*len);
                fits
            })
            .map(|(pack, start, len)| (layout::pack(pack), *start, *len))
            .collect();
        self.lock()
            .extend(wanted.iter().map(|(object, start, len)| Seed {
                object: object.clone(),
                start: *start,
                len: *len,
                bytes: Loading::Pending,
                taken: 0,
            }));
        let queue = Arc::new(Mutex::new(wanted.into_iter()));
        for _ in 0..parallel.max(1) {
            let (me, queue, backend) = (self.clone(), queue.clone(), backend.clone());
            std::thread::spawn(move || loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some((object, start, len)) = next else {
                    break;
                };
                let got = backend.get_range(&object, start, len);
                if let Err(e) = &got {
                    tracing::debug!("fetching {object} {start}+{len} ahead: {e}");
                }
                // Failed or short: not held, and the reader fetches the
                // range itself (a seed is a speed-up, never a source of truth).
                me.landed(&object, start, got.ok().filter(|b| b.len() as u64 == len));
            });
        }
    }

    fn landed(&self, object: &str, start: u64, bytes: Option<Vec<u8>>) {
        let mut st = self.lock();
        if let Some(s) = st
            .iter_mut()
            .find(|s| s.object == object && s.start == start && matches!(s.bytes, Loading::Pending))
        {
            s.bytes = bytes.map_or(Loading::Failed, |b| Loading::Ready(Arc::new(b)));
        }
        st.retain(|s| !matches!(s.bytes, Loading::Failed));
        drop(st);
        self.done.notify_all();
    }

    /// Copies `[start, start + len)` of `object` into `buf` (cleared
    /// first) if ranges here hold all of it (one, or several back to back:
    /// a reader's coalesced read), waiting for those still fetched; false
    /// if they do not (or a fetch failed).
    pub fn take(&self, object: &str, start: u64, len: u64, buf: &mut Vec<u8>) -> bool {
        let end = start + len;
        let mut st = self.lock();
        let parts = loop {
            let Some(parts) = tiling(&st, object, start, end) else {
                return false;
            };
            if parts
                .iter()
                .all(|&k| matches!(st[k].bytes, Loading::Ready(_)))
            {
                break parts;
            }
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        };
        buf.clear();
        for &k in &parts {
            let s = &mut st[k];
            let Loading::Ready(b) = &s.bytes else {
                unreachable!("checked above, under the same lock")
            };
            let (from, to) = (start.max(s.start), end.min(s.start + s.len));
            buf.extend_from_slice(&b[(from - s.start) as usize..(to - s.start) as usize]);
            s.taken += to - from;
        }
        st.retain(|s| s.taken < s.len);
        true
    }

    /// Drops every range not taken yet (their fetches still end, unseen).
    pub fn clear(&self) {
        self.lock().clear();
        self.done.notify_all();
    }

    /// Bytes fetched and held, not yet all taken.
    pub fn held(&self) -> u64 {
        self.lock()
            .iter()
            .filter(|s| matches!(s.bytes, Loading::Ready(_)))
            .map(|s| s.len)
            .sum()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Seed>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The ranges of `object` that hold `[start, end)` between them, in order;
/// `None` if a byte of it is in none.
fn tiling(seeds: &[Seed], object: &str, start: u64, end: u64) -> Option<Vec<usize>> {
    let mut parts = Vec::new();
    let mut at = start;
    while at < end {
        let k = seeds
            .iter()
            .position(|s| s.object == object && s.start <= at && at < s.start + s.len)?;
        parts.push(k);
        at = seeds[k].start + seeds[k].len;
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    /// A local backend holding one pack of `bytes`.
    fn one_pack(bytes: &[u8]) -> (tempfile::TempDir, Arc<dyn Backend>, Id) {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path()));
        let p = Id::random();
        backend.put(&layout::pack(&p), bytes).unwrap();
        (dir, backend, p)
    }

    #[test]
    fn ranges_are_given_out_until_taken_and_missing_packs_are_not_there() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let (_dir, backend, a) = one_pack(&bytes);
        let gone = Id::random();
        let seeds = Seeds::new();
        seeds.fetch(backend, &[(a, 1000, 2000), (gone, 0, 10)], 2);
        let mut buf = vec![9; 3];
        // Waits for the fetch; a part of the range, then the rest.
        assert!(seeds.take(&layout::pack(&a), 1500, 100, &mut buf));
        assert_eq!(buf, bytes[1500..1600]);
        assert_eq!(seeds.held(), 2000);
        assert!(
            !seeds.take(&layout::pack(&a), 900, 200, &mut buf),
            "not held: starts before"
        );
        assert!(
            !seeds.take(&layout::pack(&a), 2900, 200, &mut buf),
            "not held: ends after"
        );
        assert!(seeds.take(&layout::pack(&a), 1000, 500, &mut buf));
        assert!(seeds.take(&layout::pack(&a), 1600, 1400, &mut buf));
        assert_eq!(buf, bytes[1600..3000]);
        assert_eq!(seeds.held(), 0, "all taken: dropped");
        assert!(!seeds.take(&layout::pack(&a), 1000, 100, &mut buf));
        // The missing pack's range failed: not there, not waited for.
        assert!(!seeds.take(&layout::pack(&gone), 0, 10, &mut buf));
    }

    #[test]
    fn a_read_across_ranges_back_to_back_takes_from_each() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let (_dir, backend, p) = one_pack(&bytes);
        let seeds = Seeds::new();
        seeds.fetch(backend, &[(p, 100, 100), (p, 200, 300), (p, 600, 100)], 3);
        let mut buf = Vec::new();
        assert!(seeds.take(&layout::pack(&p), 150, 300, &mut buf));
        assert_eq!(buf, bytes[150..450]);
        assert!(
            !seeds.take(&layout::pack(&p), 450, 200, &mut buf),
            "a gap at 500..600"
        );
        assert!(seeds.take(&layout::pack(&p), 100, 50, &mut buf));
        assert!(seeds.take(&layout::pack(&p), 450, 50, &mut buf));
        assert_eq!(buf, bytes[450..500]);
        assert_eq!(seeds.held(), 100, "only the range at 600 is left");
    }

    #[test]
    fn the_bytes_ahead_are_bounded() {
        let (_dir, backend, p) = one_pack(&[7; 64]);
        let seeds = Seeds::new();
        let huge = (p, 0, MAX_BYTES);
        seeds.fetch(backend, &[(p, 0, 64), huge], 1);
        let mut buf = Vec::new();
        assert!(seeds.take(&layout::pack(&p), 0, 64, &mut buf));
        assert_eq!(
            seeds.lock().len(),
            0,
            "the range past the bound was never asked for"
        );
    }
}
