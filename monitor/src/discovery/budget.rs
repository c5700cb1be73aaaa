//! A time budget for the analysis of one binary.
//!
//! In host-wide mode every executable on the host is analysed, and the files are not ours:
//! a truncated download, a corrupted copy or a file crafted to be slow must cost a bounded
//! time, never stall the daemon. Every loop of discovery is also bounded by the file's own
//! size (ranges are clamped to the bytes that exist, and scans are capped), but a bound that
//! is linear in a large file, times a few passes, can still be minutes in the worst case.
//! The budget turns that into a typed error after a fixed time instead.
//!
//! It is cheap enough to check in inner loops: [`Budget::spent`] reads the clock once every
//! [`CLOCK_EVERY`] calls, and once spent it stays spent, so every scan below the check
//! stops at its next chunk and [`super::analyze_within`] returns
//! [`super::DiscoveryError::TooSlow`] instead of partial results.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Calls to [`Budget::spent`] between two reads of the clock. A scan step is at least a
/// hash lookup or an instruction decode (tens of nanoseconds), so the clock (about 20 ns
/// through the vDSO) is read every few microseconds and the budget is overrun by no more.
const CLOCK_EVERY: u32 = 256;

/// The time one analysis may take. Shared by reference with every scan of it; `Sync` so
/// that an image holding it can be shared read-only.
#[derive(Debug)]
pub struct Budget {
    started: Instant,
    limit: Duration,
    calls: AtomicU32,
    spent: AtomicBool,
}

impl Budget {
    /// A budget of `limit` from now.
    pub fn new(limit: Duration) -> Self {
        Budget {
            started: Instant::now(),
            limit,
            calls: AtomicU32::new(0),
            spent: AtomicBool::new(false),
        }
    }

    /// A budget that is never spent, for callers that bound the work another way (tests of
    /// one function, the unwind table of a binary already analysed within a budget).
    pub fn unlimited() -> Self {
        Self::new(Duration::MAX)
    }

    /// The limit this budget was made with.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// True once the budget is spent; cheap (see the module docs). Scans call it once per
    /// step or chunk and stop when it says so.
    pub fn spent(&self) -> bool {
        if self.spent.load(Ordering::Relaxed) {
            return true;
        }
        if !self
            .calls
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(CLOCK_EVERY)
        {
            return false;
        }
        self.check_clock()
    }

    /// Reads the clock now (for the checks between phases of an analysis).
    pub fn spent_now(&self) -> bool {
        self.spent.load(Ordering::Relaxed) || self.check_clock()
    }

    fn check_clock(&self) -> bool {
        let over = self.started.elapsed() > self.limit;
        if over {
            self.spent.store(true, Ordering::Relaxed);
        }
        over
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::unlimited()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_spent_after_its_limit_and_stays_spent() {
        let budget = Budget::new(Duration::from_millis(20));
        assert!(!budget.spent_now());
        assert!(!budget.spent());
        std::thread::sleep(Duration::from_millis(30));
        // `spent` reads the clock only every CLOCK_EVERY calls: within that many it knows.
        assert!((0..=CLOCK_EVERY).any(|_| budget.spent()));
        assert!(budget.spent(), "sticky");
        assert!(budget.spent_now());
    }

    #[test]
    fn an_unlimited_budget_is_never_spent() {
        let budget = Budget::unlimited();
        assert!((0..10 * CLOCK_EVERY).all(|_| !budget.spent()));
        assert!(!budget.spent_now());
    }
}
