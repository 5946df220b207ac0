//! Bounds on the log lines a guest, a frontend or a control client can cause.
//!
//! Every log line such a peer can trigger goes through a [`LogLimit`]: the first lines are
//! written, then only every 1000th (with the count so far), so a peer repeating the same
//! mistake costs a few lines, not gigabytes of log.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lines written before thinning out.
const BURST: u64 = 20;
/// After the burst, one line in this many.
const EVERY: u64 = 1000;

/// Counts the events of one kind and says which ones may be logged.
#[derive(Debug, Default)]
pub struct LogLimit(AtomicU64);

impl LogLimit {
    /// A fresh limit (usable in a `static`).
    pub const fn new() -> Self {
        LogLimit(AtomicU64::new(0))
    }

    /// Counts one event; true when it may be logged (the first 20, then every 1000th).
    pub fn allow(&self) -> bool {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        n <= BURST || n.is_multiple_of(EVERY)
    }

    /// Events counted so far (logged or not).
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_one_in_a_thousand() {
        let l = LogLimit::new();
        let allowed = (0..10_000).filter(|_| l.allow()).count();
        assert_eq!(allowed, 20 + 10);
        assert_eq!(l.count(), 10_000);
    }
}
