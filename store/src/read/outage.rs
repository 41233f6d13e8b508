//! Waiting out an unreachable repository. Readers (an export's reads, a
//! live restore's server opening its disks, its backfill) try again after
//! pauses of 250 ms doubling up to 5 s, until the outage wait has passed:
//! the rule stated once.

use std::time::{Duration, Instant};

const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// Longest pause between two tries of an unreachable backend.
const PAUSE_MAX: Duration = Duration::from_secs(5);

/// One outage's clock and the pause before the next try.
pub struct OutageWait {
    wait: Duration,
    since: Option<Instant>,
    pause: Duration,
}

impl OutageWait {
    /// The clock starts at the first failure (work that may run long
    /// before it fails: a backfill's pass).
    pub fn new(wait: Duration) -> Self {
        OutageWait {
            wait,
            since: None,
            pause: FIRST_PAUSE,
        }
    }

    /// The clock starts now (one request and its tries).
    pub fn from_now(wait: Duration) -> Self {
        OutageWait {
            since: Some(Instant::now()),
            ..Self::new(wait)
        }
    }

    /// A try failed: whether another is allowed (the next pause ends
    /// within the wait).
    pub fn failed(&mut self) -> bool {
        let since = *self.since.get_or_insert_with(Instant::now);
        since.elapsed() + self.pause <= self.wait
    }

    /// How long the repository has been failing (since the clock started).
    pub fn so_far(&self) -> Duration {
        self.since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// Sleeps the pause; the next is twice as long, up to the longest.
    pub fn pause(&mut self) {
        std::thread::sleep(self.pause);
        self.pause = (self.pause * 2).min(PAUSE_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_longest_and_end_with_the_wait() {
        let mut o = OutageWait::new(Duration::from_millis(800));
        assert_eq!(o.so_far(), Duration::ZERO, "no clock before a failure");
        // 250 + 500 ms fit in 800; the next pause (1 s) would not.
        assert!(o.failed());
        o.pause();
        assert!(o.failed());
        o.pause();
        assert!(!o.failed());
        assert!(o.so_far() >= Duration::from_millis(750));
        assert!(!OutageWait::from_now(Duration::ZERO).failed());
    }
}
