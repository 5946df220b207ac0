//! Shared/exclusive locks on sector ranges. Writers that must not interleave with readers of
//! the same sectors (copy-before-write, the failover merge) take a range exclusively; readers
//! take it shared. Callers never hold one range while waiting for another, so there is no
//! lock-order cycle.

use std::sync::{Condvar, Mutex};

#[derive(Debug, Clone, Copy)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

/// The lock table.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<(u64, Vec<Held>)>,
    cv: Condvar,
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    fn acquire(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let mut g = self.held.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let conflict = g.1.iter().any(|h| h.start < end && start < h.end && (exclusive || h.exclusive));
            if !conflict {
                g.0 += 1;
                let id = g.0;
                g.1.push(Held { id, start, end, exclusive });
                return RangeGuard { lock: self, id };
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Locks [start, end) shared.
    pub fn shared(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.acquire(start, end, false)
    }

    /// Locks [start, end) exclusively.
    pub fn exclusive(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.acquire(start, end, true)
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.lock.held.lock().unwrap_or_else(|e| e.into_inner());
        g.1.retain(|h| h.id != self.id);
        drop(g);
        self.lock.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn shared_coexist_exclusive_waits() {
        let l = Arc::new(RangeLock::default());
        let a = l.shared(0, 10);
        let _b = l.shared(5, 15);
        let _c = l.exclusive(20, 30); // disjoint
        let got = Arc::new(AtomicBool::new(false));
        let (l2, got2) = (l.clone(), got.clone());
        let t = std::thread::spawn(move || {
            let _x = l2.exclusive(8, 9);
            got2.store(true, Ordering::SeqCst);
        });
        // The exclusive locker cannot get in while `a` and `_b` are held; releasing both lets
        // it through (join waits for that event).
        assert!(!got.load(Ordering::SeqCst));
        drop(a);
        drop(_b);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }
}
