//! The quiesce gate: every guest and NBD request holds a ticket while it runs; checkpoint,
//! start, stop and the end of failover close the gate (new requests wait), wait for the
//! tickets out, act, and reopen it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct State {
    closed: bool,
    inflight: usize,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Gate {
    m: Mutex<State>,
    cv: Condvar,
    /// Bumped when the gate closes and when it opens again: a request that ran without a
    /// ticket (the VM's direct disk reads) compares it before and after to learn whether a
    /// checkpoint or stage change overlapped it.
    generation: AtomicU64,
}

/// A running request; leaving drops it.
#[derive(Debug)]
pub struct Ticket<'a>(&'a Gate);

/// The gate is closed until this is dropped.
#[derive(Debug)]
pub struct Closed<'a>(&'a Gate);

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while the gate is closed, then registers a running request.
    pub fn enter(&self) -> Ticket<'_> {
        let mut g = self.lock();
        while g.closed {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.inflight += 1;
        Ticket(self)
    }

    /// Closes the gate and waits until no request runs (bounded by `timeout`; on timeout the
    /// gate is reopened and `None` returned).
    pub fn close(&self, timeout: Duration) -> Option<Closed<'_>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        // Another operation holds the gate: wait for it first.
        while g.closed {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.closed = true;
        self.generation.fetch_add(1, Ordering::AcqRel);
        while g.inflight > 0 {
            let now = Instant::now();
            if now >= deadline {
                g.closed = false;
                self.generation.fetch_add(1, Ordering::AcqRel);
                drop(g);
                self.cv.notify_all();
                return None;
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        Some(Closed(self))
    }

    /// See the `generation` field.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.inflight -= 1;
        let wake = g.closed && g.inflight == 0;
        drop(g);
        if wake {
            self.0.cv.notify_all();
        }
    }
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.closed = false;
        self.0.generation.fetch_add(1, Ordering::AcqRel);
        drop(g);
        self.0.cv.notify_all();
    }
}
