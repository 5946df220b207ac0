//! Shared/exclusive locks on sector ranges. Writers that must not interleave with readers of
//! the same sectors (copy-before-write, the failover merge) take a range exclusively; readers
//! take it shared. Callers never hold one range while waiting for another, so there is no
//! lock-order cycle.
//!
//! Fairness: requests are served in arrival order among those that conflict. A waiting
//! exclusive request holds back every later request overlapping it, shared ones included, so
//! a stream of overlapping readers (the secondary VM) cannot starve a writer (the primary's
//! copy-before-write, whose delay would cut the replication link). A waiter only ever waits
//! for holders and for earlier waiters, so no cycle can form.
//!
//! Waking: a release hands ranges to the waiters that can proceed now, in arrival order, and
//! wakes exactly those (each waiter sleeps on its own condition variable), so a release does
//! not wake every waiter to re-check the table.

use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug, Clone, Copy)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

impl Held {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }

    fn conflicts(&self, other: &Held) -> bool {
        self.overlaps(other.start, other.end) && (self.exclusive || other.exclusive)
    }
}

/// A request waiting for its range, with the condition variable only it waits on.
#[derive(Debug)]
struct Waiting {
    req: Held,
    wake: Arc<Condvar>,
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    held: Vec<Held>,
    /// Requests waiting, in arrival order.
    waiting: Vec<Waiting>,
}

impl Table {
    /// Whether `req` may be granted: no held range and no earlier waiter conflicts with it
    /// (`earlier`: the waiters ahead of it).
    fn grantable(&self, req: &Held, earlier: &[Waiting]) -> bool {
        !self.held.iter().any(|h| h.conflicts(req)) && !earlier.iter().any(|w| w.req.conflicts(req))
    }

    /// Hands the range to every waiter that can proceed now, in arrival order, and wakes only
    /// those.
    fn grant(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            if self.grantable(&self.waiting[i].req, &self.waiting[..i]) {
                let w = self.waiting.remove(i);
                self.held.push(w.req);
                w.wake.notify_one();
            } else {
                i += 1;
            }
        }
    }
}

/// The lock table.
#[derive(Debug, Default)]
pub struct RangeLock {
    table: Mutex<Table>,
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acquire(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let mut g = self.table();
        g.next += 1;
        let me = Held { id: g.next, start, end, exclusive };
        if g.grantable(&me, &g.waiting) {
            g.held.push(me);
            return RangeGuard { lock: self, id: me.id };
        }
        // Queue up; a release hands the range over (`Table::grant`) and wakes this waiter only.
        let wake = Arc::new(Condvar::new());
        g.waiting.push(Waiting { req: me, wake: wake.clone() });
        while !g.held.iter().any(|h| h.id == me.id) {
            g = wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        RangeGuard { lock: self, id: me.id }
    }

    #[cfg(test)]
    fn waiters(&self) -> usize {
        self.table().waiting.len()
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
        let mut g = self.lock.table();
        g.held.retain(|h| h.id != self.id);
        g.grant();
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

    /// Issue 10 item E: a waiting exclusive request holds back later overlapping shared
    /// requests (before, readers kept overlapping the held range and the writer starved).
    #[test]
    fn waiting_exclusive_blocks_new_shared() {
        let l = Arc::new(RangeLock::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let reader = l.shared(0, 10);
        let (l2, o2) = (l.clone(), order.clone());
        let writer = std::thread::spawn(move || {
            let _w = l2.exclusive(0, 10);
            o2.lock().unwrap().push("writer");
        });
        wait_for(|| l.waiters() == 1);
        let (l3, o3) = (l.clone(), order.clone());
        let late_reader = std::thread::spawn(move || {
            let _r = l3.shared(5, 6);
            o3.lock().unwrap().push("late reader");
        });
        // The late reader queues behind the writer instead of joining the held shared range.
        wait_for(|| l.waiters() == 2);
        assert!(order.lock().unwrap().is_empty());
        // A disjoint reader is not held back.
        drop(l.shared(20, 30));
        drop(reader);
        writer.join().unwrap();
        late_reader.join().unwrap();
        assert_eq!(*order.lock().unwrap(), ["writer", "late reader"]);
    }

    /// A release grants the waiters that can proceed, in order, and leaves the others
    /// queued: a later disjoint waiter is not held back by an earlier blocked one.
    #[test]
    fn release_grants_only_waiters_that_can_proceed() {
        let l = Arc::new(RangeLock::default());
        let a = l.exclusive(0, 10);
        let b = l.exclusive(20, 30);
        let spawn = |s: u64, e: u64, x: bool| {
            let l = l.clone();
            std::thread::spawn(move || drop(if x { l.exclusive(s, e) } else { l.shared(s, e) }))
        };
        let w1 = spawn(5, 25, true); // needs both
        wait_for(|| l.waiters() == 1);
        let w2 = spawn(0, 8, false); // needs a, and queues behind w1 (overlaps it)
        wait_for(|| l.waiters() == 2);
        let w3 = spawn(40, 50, false); // free: granted at once
        w3.join().unwrap();
        assert_eq!(l.waiters(), 2);
        // The release decides in the releasing thread: when drop returns, the table is final.
        drop(a);
        // w1 still waits for b; w2 overlaps w1, so it stays queued behind it.
        assert_eq!(l.waiters(), 2);
        drop(b);
        w1.join().unwrap();
        w2.join().unwrap();
        assert_eq!(l.waiters(), 0);
    }

    /// Polls a lock-table condition (there is no event for "a thread is now waiting").
    fn wait_for(f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "condition not reached");
            std::thread::yield_now();
        }
    }

    /// Property: under random concurrent shared/exclusive requests, no exclusive range ever
    /// overlaps another held range, and every request is granted (no deadlock).
    #[test]
    fn random_mix_is_exclusive_and_live() {
        let l = Arc::new(RangeLock::default());
        let holders = Arc::new(Mutex::new(Vec::<(u64, u64, bool)>::new()));
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let (l, holders) = (l.clone(), holders.clone());
                std::thread::spawn(move || {
                    let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    for _ in 0..2000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let start = x % 64;
                        let end = start + 1 + (x >> 8) % 16;
                        let exclusive = (x >> 20) % 3 == 0;
                        let _g = if exclusive { l.exclusive(start, end) } else { l.shared(start, end) };
                        {
                            let mut h = holders.lock().unwrap();
                            for &(a, b, e) in h.iter() {
                                let overlap = a < end && start < b;
                                assert!(!(overlap && (e || exclusive)), "conflicting ranges held at once");
                            }
                            h.push((start, end, exclusive));
                        }
                        std::thread::yield_now();
                        let mut h = holders.lock().unwrap();
                        let i = h.iter().position(|&r| r == (start, end, exclusive)).unwrap();
                        h.swap_remove(i);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(l.waiters(), 0);
    }
}
