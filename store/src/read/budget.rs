//! The memory a [`crate::read::reader::DiskReader`] holds, against one
//! budget (its cache size): opened chunks in the cache, fetches in flight
//! (their pack bytes and the chunks opened from them) and the idle fetch
//! buffers kept for the next fetch. The cache gives way to the other two,
//! and a fetch that would overflow its share waits for one in flight to end.

/// Byte accounting of one reader; lives under the reader's lock.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    /// Opened chunks in the cache.
    cached: usize,
    /// Fetches in flight: reserved when they start, released as they end.
    loading: usize,
    /// Idle fetch buffers (their capacity).
    spare: usize,
    /// Most ever held at once once the cache gave way (for tests and logs).
    peak: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget {
            limit,
            cached: 0,
            loading: 0,
            spare: 0,
            peak: 0,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether a fetch costing `cost` may start now within `share` of the
    /// budget (the cache gives way). One always may when none is in flight,
    /// so the reader never stalls.
    pub fn fits(&self, cost: usize, share: usize) -> bool {
        self.loading == 0 || self.loading + self.spare + cost <= share
    }

    pub fn start(&mut self, cost: usize) {
        self.loading += cost;
    }

    pub fn end(&mut self, cost: usize) {
        self.loading -= cost.min(self.loading);
    }

    /// An idle buffer of `bytes` may be kept if idle buffers stay within
    /// an eighth of the budget.
    pub fn keeps_spare(&self, bytes: usize) -> bool {
        self.spare + bytes <= self.limit / 8
    }

    pub fn add_spare(&mut self, bytes: usize) {
        self.spare += bytes;
    }

    pub fn take_spare(&mut self, bytes: usize) {
        self.spare -= bytes.min(self.spare);
    }

    pub fn cache(&mut self, bytes: usize) {
        self.cached += bytes;
    }

    pub fn uncache(&mut self, bytes: usize) {
        self.cached -= bytes.min(self.cached);
    }

    /// Bytes the cache must give up to stay within the budget.
    pub fn over(&self) -> usize {
        self.held().saturating_sub(self.limit)
    }

    /// Records what is held now; called once the cache has given way.
    pub fn settle(&mut self) {
        self.peak = self.peak.max(self.held());
    }

    pub fn peak(&self) -> usize {
        self.peak
    }

    fn held(&self) -> usize {
        self.cached + self.loading + self.spare
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetches_beyond_their_share_wait_but_one_always_starts() {
        let mut b = Budget::new(100);
        assert!(b.fits(80, 50), "nothing in flight: a fetch starts");
        b.start(30);
        assert!(b.fits(20, 50));
        assert!(!b.fits(21, 50));
        b.add_spare(10);
        assert!(!b.fits(20, 50), "idle buffers count");
        b.end(30);
        assert!(b.fits(60, 50));
    }

    #[test]
    fn the_cache_gives_way_to_fetches_and_idle_buffers() {
        let mut b = Budget::new(100);
        b.cache(90);
        assert_eq!(b.over(), 0);
        b.start(20);
        b.add_spare(5);
        assert_eq!(b.over(), 15);
        b.uncache(15);
        b.settle();
        assert_eq!(b.peak(), 100);
        assert!(b.keeps_spare(7) && !b.keeps_spare(8));
    }
}
