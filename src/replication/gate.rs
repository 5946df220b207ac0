//! The quiesce gate: every guest and NBD request holds a ticket while it runs; checkpoint,
//! start, stop and the end of failover close the gate (new requests wait), wait for the
//! tickets out, act, and reopen it.
//!
//! # Hot path
//!
//! Requests enter and leave far more often than the gate closes, so entering and leaving an
//! open gate touch one atomic word and no lock. `state` holds the closed flag in its top bit
//! and the number of live tickets in the bits below. The mutex and the two condition
//! variables are only used on the slow paths: a request that finds the gate closed, a
//! closer, the reopening, and the last ticket to leave a gate that is closing.
//!
//! # Ordering and wake-ups
//!
//! Invariants the code relies on (each is checked at the place it is used):
//!
//! 1. `CLOSED` is set and cleared only while `m` is held. Whoever holds `m` therefore sees
//!    a stable closed flag; only the ticket count moves under it.
//! 2. Every change of `state` after construction is a read-modify-write on that one word, so
//!    all of them are in a single total order (its modification order), and each release
//!    RMW heads a release sequence that every later RMW continues.
//! 3. The fast `enter` increments only by a compare-exchange from a value *without*
//!    `CLOSED`. The closer sets `CLOSED` with a `fetch_or` whose result carries the ticket
//!    count at that point of the modification order. An entry ordered before the `fetch_or`
//!    is counted in what the closer waits for; an entry ordered after it sees `CLOSED`, fails
//!    its exchange and waits in the slow path. So no request slips in after the closer saw
//!    zero tickets.
//! 4. A leaving ticket decrements with release ordering; when its decrement took the count
//!    from one to zero with `CLOSED` set, it takes `m` and then signals `drained`. The
//!    closer reads the count with acquire ordering while holding `m` and only then waits on
//!    `drained` (which releases `m` atomically). Either it read the count after the last
//!    decrement (and sees zero), or it was already waiting when the leaver got `m`, so the
//!    signal reaches it: the closer cannot miss the last leave.
//! 5. Reopening (a `Closed` dropped, or a close that timed out) clears `CLOSED` with release
//!    ordering under `m` and then signals `opened`; a request waiting in the slow path reads
//!    the flag under `m` before it waits, so it cannot miss the reopening either.
//!
//! Happens-before: a request's work is ordered before the closer's (its release decrement
//! is read by the closer's acquire load or `fetch_or`, directly or through the release
//! sequence of 2.), and the closer's work before any request admitted after it reopened
//! (the release clear of `CLOSED` is read, directly or through later RMWs, by the acquire
//! increment that admits the request). That is what the mutex gave before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Top bit of `Gate::state`: the gate is closed (or closing).
const CLOSED: u64 = 1 << 63;
/// The bits of `Gate::state` below `CLOSED`: how many tickets are live.
const COUNT: u64 = CLOSED - 1;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Gate {
    /// `CLOSED` | number of live tickets.
    state: AtomicU64,
    /// Guards changes of `CLOSED` and the waits below; holds no data of its own.
    m: Mutex<()>,
    /// Signalled when the gate reopens: requests and closers waiting for an open gate.
    opened: Condvar,
    /// Signalled by the last ticket to leave a closing gate: the one closer waiting for it.
    drained: Condvar,
    /// Bumped when the gate closes and when it opens again: a request that ran without a
    /// ticket (the VM's direct disk reads) compares it before and after to learn whether a
    /// checkpoint or stage change overlapped it. Even while the gate is open, odd while it
    /// is closed.
    generation: AtomicU64,
}

/// A running request; leaving drops it.
#[derive(Debug)]
pub struct Ticket<'a>(&'a Gate);

/// The gate is closed until this is dropped.
#[derive(Debug)]
pub struct Closed<'a>(&'a Gate);

impl Gate {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while the gate is closed, then registers a running request.
    pub fn enter(&self) -> Ticket<'_> {
        // Fast path: one compare-exchange while the gate is open (invariant 3). Acquire on
        // success: the request sees what the last closer did before it reopened.
        let mut s = self.state.load(Ordering::Relaxed);
        while s & CLOSED == 0 {
            match self.state.compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Ticket(self),
                Err(now) => s = now,
            }
        }
        self.enter_slow()
    }

    /// Registers a running request without waiting: false while the gate is closed (or
    /// closing). A true answer must be matched by exactly one [`Gate::leave`]: for requests
    /// that outlive a call (the VM's writes on a worker's io_uring), which cannot block the
    /// worker on a closed gate.
    pub fn try_hold(&self) -> bool {
        let mut s = self.state.load(Ordering::Relaxed);
        while s & CLOSED == 0 {
            // As the fast path of `enter` (invariant 3).
            match self.state.compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
        false
    }

    /// Ends a request registered by [`Gate::try_hold`] (what dropping a [`Ticket`] does).
    pub fn leave(&self) {
        // Release: the closer that reads the count sees this request's work.
        let prev = self.state.fetch_sub(1, Ordering::Release);
        debug_assert!(prev & COUNT > 0, "gate ticket count underflow");
        if prev == CLOSED | 1 {
            // The last ticket out of a closing gate. Taking `m` before signalling means the
            // closer is either waiting already or has not yet read the count (invariant 4).
            let g = self.lock();
            drop(g);
            self.drained.notify_one();
        }
    }

    #[cold]
    fn enter_slow(&self) -> Ticket<'_> {
        let mut g = self.lock();
        // Under `m` the closed flag cannot change (invariant 1), so a plain increment after
        // reading it clear cannot race with a closer; the wait releases `m` atomically
        // (invariant 5).
        while self.state.load(Ordering::Acquire) & CLOSED != 0 {
            g = self.opened.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        self.state.fetch_add(1, Ordering::Acquire);
        drop(g);
        Ticket(self)
    }

    /// Closes the gate and waits until no request runs (bounded by `timeout`; on timeout the
    /// gate is reopened and `None` returned).
    pub fn close(&self, timeout: Duration) -> Option<Closed<'_>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        // Another operation holds the gate: wait for it first.
        while self.state.load(Ordering::Acquire) & CLOSED != 0 {
            g = self.opened.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        // Set under `m` (invariant 1); the result orders every entry before or after it
        // (invariant 3).
        let mut s = self.state.fetch_or(CLOSED, Ordering::AcqRel);
        self.generation.fetch_add(1, Ordering::AcqRel);
        // Read under `m` before each wait (invariant 4).
        while s & COUNT > 0 {
            let now = Instant::now();
            if now >= deadline {
                self.reopen(g);
                return None;
            }
            g = self.drained.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            s = self.state.load(Ordering::Acquire);
        }
        drop(g);
        Some(Closed(self))
    }

    /// Clears `CLOSED` under `m` (invariants 1 and 5), bumps the generation back to even and
    /// wakes everyone waiting for the gate.
    fn reopen(&self, g: MutexGuard<'_, ()>) {
        self.state.fetch_and(COUNT, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(g);
        self.opened.notify_all();
    }

    /// See the `generation` field.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        let g = self.0.lock();
        self.0.reopen(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::{Arc, mpsc};
    use std::thread;

    /// A bound for every wait in these tests; far above what any of them needs.
    const DEADLINE: Duration = Duration::from_secs(20);

    #[test]
    fn gate_open_enter_and_close() {
        let gate = Gate::default();
        assert_eq!(gate.generation(), 0);
        let a = gate.enter();
        let b = gate.enter();
        assert_eq!(gate.state.load(Ordering::Relaxed), 2);
        drop((a, b));
        let closed = gate.close(DEADLINE).expect("no ticket is live");
        assert_eq!(gate.generation(), 1, "odd while closed");
        drop(closed);
        assert_eq!(gate.generation(), 2, "even once open");
        assert_eq!(gate.state.load(Ordering::Relaxed), 0);
        // A zero timeout still closes a gate nobody holds.
        drop(gate.close(Duration::ZERO).expect("nobody holds the gate"));
        assert_eq!(gate.generation(), 4);
    }

    #[test]
    fn gate_close_waits_for_ticket_and_blocks_entries() {
        let gate = Arc::new(Gate::default());
        let ticket_held = gate.enter();
        let (closed_tx, closed_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let closer = {
            let gate = Arc::clone(&gate);
            thread::spawn(move || {
                // Longer than the test waits below: a missed wake-up fails the test instead of
                // completing at the close's own timeout.
                let closed = gate.close(DEADLINE * 3).expect("the ticket leaves well before the deadline");
                closed_tx.send(gate.generation()).unwrap();
                release_rx.recv_timeout(DEADLINE).expect("test releases the gate");
                drop(closed);
            })
        };
        // The closer marks the gate closed, then must wait for the ticket.
        let start = Instant::now();
        while gate.generation() != 1 {
            assert!(start.elapsed() < DEADLINE, "closer never closed the gate");
            thread::yield_now();
        }
        assert!(closed_rx.recv_timeout(Duration::from_millis(100)).is_err(), "close returned with a ticket live");
        drop(ticket_held);
        assert_eq!(closed_rx.recv_timeout(DEADLINE).expect("close completes once the ticket left"), 1);

        // While closed, a new request waits.
        let (entered_tx, entered_rx) = mpsc::channel();
        let enterer = {
            let gate = Arc::clone(&gate);
            thread::spawn(move || {
                let _t = gate.enter();
                entered_tx.send(gate.generation()).unwrap();
            })
        };
        assert!(entered_rx.recv_timeout(Duration::from_millis(100)).is_err(), "entered a closed gate");
        release_tx.send(()).unwrap();
        assert_eq!(entered_rx.recv_timeout(DEADLINE).expect("enters once reopened"), 2);
        closer.join().unwrap();
        enterer.join().unwrap();
        assert_eq!(gate.state.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn gate_second_close_waits_for_the_first() {
        let gate = Arc::new(Gate::default());
        let first = gate.close(DEADLINE).unwrap();
        let (tx, rx) = mpsc::channel();
        let second = {
            let gate = Arc::clone(&gate);
            thread::spawn(move || {
                let c = gate.close(DEADLINE * 3).expect("closes after the first reopened");
                tx.send(gate.generation()).unwrap();
                drop(c);
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "two closers at once");
        drop(first);
        assert_eq!(rx.recv_timeout(DEADLINE).expect("second close completes"), 3);
        second.join().unwrap();
        assert_eq!(gate.generation(), 4);
    }

    #[test]
    fn gate_close_times_out_while_ticket_held_and_reopens() {
        let gate = Arc::new(Gate::default());
        let ticket = gate.enter();
        let timeout = Duration::from_millis(50);
        let start = Instant::now();
        assert!(gate.close(timeout).is_none(), "closed with a ticket live");
        let took = start.elapsed();
        assert!(took >= timeout, "gave up after {took:?}, before its timeout");
        assert!(took < DEADLINE, "took {took:?}");
        assert_eq!(gate.generation(), 2, "closed then reopened");
        assert_eq!(gate.state.load(Ordering::Relaxed), 1, "open, the one ticket still counted");

        // The gate is open: another thread enters and leaves without waiting.
        let (tx, rx) = mpsc::channel();
        let other = {
            let gate = Arc::clone(&gate);
            thread::spawn(move || {
                let _t = gate.enter();
                tx.send(()).unwrap();
            })
        };
        rx.recv_timeout(DEADLINE).expect("enters the reopened gate");
        other.join().unwrap();

        // Once the held ticket leaves (with the gate open: nobody to wake), a close succeeds.
        drop(ticket);
        let closed = gate.close(DEADLINE).expect("no ticket is live");
        assert_eq!(gate.generation(), 3);
        drop(closed);
        assert_eq!(gate.state.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn gate_stress_no_ticket_live_while_closed() {
        const ENTERERS: usize = 4;
        const CLOSES: usize = 300;
        const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
        let gate = Arc::new(Gate::default());
        // Requests inside the gate, counted by the requests themselves.
        let inside = Arc::new(AtomicUsize::new(0));
        // Set by the closer while it holds `Closed`; a request that sees it broke the gate.
        let closed_now = Arc::new(AtomicBool::new(false));
        let violations = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let entries = Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = mpsc::channel();

        let enterers: Vec<_> = (0..ENTERERS)
            .map(|i| {
                let done_tx = done_tx.clone();
                let (gate, inside, closed_now, violations, stop, entries) = (
                    Arc::clone(&gate),
                    Arc::clone(&inside),
                    Arc::clone(&closed_now),
                    Arc::clone(&violations),
                    Arc::clone(&stop),
                    Arc::clone(&entries),
                );
                thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let t = gate.enter();
                        inside.fetch_add(1, Ordering::SeqCst);
                        if closed_now.load(Ordering::SeqCst) {
                            violations.fetch_add(1, Ordering::SeqCst);
                        }
                        // Vary the time held: mostly short, sometimes a few yields.
                        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407 + i as u64);
                        for _ in 0..(n >> 61) {
                            thread::yield_now();
                        }
                        if closed_now.load(Ordering::SeqCst) {
                            violations.fetch_add(1, Ordering::SeqCst);
                        }
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(t);
                        entries.fetch_add(1, Ordering::Relaxed);
                    }
                    done_tx.send(()).unwrap();
                })
            })
            .collect();

        let started = Instant::now();
        // Closes that began while a request was inside, i.e. had to wait for a ticket.
        let mut contended = 0;
        for round in 0..CLOSES {
            // Let requests run between closes: wait (bounded) until one more got through the
            // open gate, so every close races with live requesters.
            let target = entries.load(Ordering::Relaxed) + 1;
            while entries.load(Ordering::Relaxed) < target {
                assert!(started.elapsed() < DEADLINE, "no request got through the open gate (round {round})");
                thread::yield_now();
            }
            if inside.load(Ordering::SeqCst) > 0 {
                contended += 1;
            }
            let before = Instant::now();
            let closed = gate.close(CLOSE_TIMEOUT).unwrap_or_else(|| panic!("close {round} timed out"));
            // A close that missed the last leave would still return once its timeout ran out.
            assert!(before.elapsed() < CLOSE_TIMEOUT, "close {round} took {:?}", before.elapsed());
            assert_eq!(gate.generation() % 2, 1, "generation odd while closed");
            closed_now.store(true, Ordering::SeqCst);
            // Hold the gate a little while checking nobody is inside.
            for _ in 0..(round % 4) {
                assert_eq!(inside.load(Ordering::SeqCst), 0, "a ticket is live while closed (round {round})");
                thread::yield_now();
            }
            assert_eq!(inside.load(Ordering::SeqCst), 0, "a ticket is live while closed (round {round})");
            assert_eq!(gate.state.load(Ordering::SeqCst), CLOSED, "closed with no ticket counted");
            closed_now.store(false, Ordering::SeqCst);
            drop(closed);
        }
        stop.store(true, Ordering::Relaxed);
        for i in 0..ENTERERS {
            done_rx.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("only {i} of the requesters finished"));
        }
        for t in enterers {
            t.join().unwrap();
        }
        assert_eq!(violations.load(Ordering::SeqCst), 0, "requests ran while the gate was closed");
        assert_eq!(gate.generation(), 2 * CLOSES as u64);
        assert_eq!(gate.state.load(Ordering::SeqCst), 0, "every ticket left");
        assert!(entries.load(Ordering::Relaxed) >= CLOSES, "requests ran between every two closes");
        assert!(contended > 0, "no close raced with a live ticket");
    }
}
