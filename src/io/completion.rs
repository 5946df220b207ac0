//! The worker's completion queue: one per virtqueue worker, one eventfd the worker sleeps on.
//!
//! Every layer of a worker's block stack is handed the same [`WorkerCompletions`] when its
//! queue is opened. io_uring rings register its eventfd as their completion notifier; work
//! that finishes on another thread (the secondary's buffer path, the primary's forwarded
//! writes, the qcow2 metadata threads) is posted on a [`Lane`] of it, which wakes the worker
//! through the same eventfd. Each layer reaps its own lane in `reap`, so a completion comes
//! back to the layer that owns it without tagging tokens, and no layer ever writes another
//! layer's descriptor.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::Completion;

/// One worker's completion notifier (see the module documentation).
#[derive(Debug)]
pub struct WorkerCompletions {
    eventfd: EventFd,
}

impl WorkerCompletions {
    /// A fresh queue with its own non-blocking eventfd.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(WorkerCompletions { eventfd: EventFd::new(EFD_NONBLOCK)? }))
    }

    /// The eventfd: the worker polls it, io_uring rings register it.
    pub fn fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Wakes the worker.
    pub fn wake(&self) {
        // A failed write only means the counter is saturated: the worker wakes anyway.
        let _ = self.eventfd.write(1);
    }

    /// Acknowledges a wake-up (the worker then reaps its whole stack).
    pub fn clear(&self) {
        let _ = self.eventfd.read();
    }

    /// A lane for completions (of any type the layer chooses) made on other threads.
    pub fn lane<T>(self: &Arc<Self>) -> Arc<Lane<T>> {
        Arc::new(Lane { list: Mutex::new(Vec::new()), queued: AtomicBool::new(false), worker: self.clone() })
    }
}

/// Completions one layer receives from other threads, in the worker's queue.
#[derive(Debug)]
pub struct Lane<T = Completion> {
    list: Mutex<Vec<T>>,
    /// Whether `list` may hold something: most reaps find the lane empty and skip the lock.
    queued: AtomicBool,
    /// Holding the worker's queue keeps its eventfd open while any thread may still post.
    worker: Arc<WorkerCompletions>,
}

impl<T> Lane<T> {
    /// Queues a completion and wakes the worker, unless a wake-up for this lane is already
    /// pending: the flag is set from the first post after a drain until the next drain, and
    /// that first post woke the worker, whose reap (always after it cleared the eventfd)
    /// takes everything posted meanwhile.
    pub fn post(&self, c: T) {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.worker.wake();
        }
    }

    /// Moves the queued completions into `out`.
    pub fn drain_into(&self, out: &mut Vec<T>) {
        // Cleared before taking the list: a post racing with this either lands in the list
        // taken now or sets the flag again for the next reap (its wake-up calls that).
        if self.queued.swap(false, Ordering::AcqRel) {
            out.append(&mut self.list.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Buffers, IoRequest, OpKind};

    #[test]
    fn a_post_from_another_thread_wakes_the_worker_and_reaches_its_lane_only() {
        let worker = WorkerCompletions::new().unwrap();
        let (a, b) = (worker.lane::<Completion>(), worker.lane::<Completion>());
        let poster = a.clone();
        std::thread::spawn(move || {
            poster.post(Completion { request: IoRequest::new(5, OpKind::Flush, Buffers::none()), result: 0 })
        })
        .join()
        .unwrap();
        let mut pfd = libc::pollfd { fd: worker.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "the worker was not woken");
        worker.clear();
        let mut out = Vec::new();
        b.drain_into(&mut out);
        assert!(out.is_empty(), "another layer's lane got the completion");
        a.drain_into(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].request.token, 5);
    }

    /// Posts between two drains write the eventfd once; a post after a drain wakes again.
    #[test]
    fn posts_before_a_drain_share_one_wake_up() {
        let worker = WorkerCompletions::new().unwrap();
        let lane = worker.lane::<usize>();
        let count = || worker.eventfd.read().unwrap_or(0);
        for i in 0..5 {
            lane.post(i);
        }
        assert_eq!(count(), 1, "every post wrote the eventfd");
        let mut out = Vec::new();
        lane.drain_into(&mut out);
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
        lane.post(9);
        assert_eq!(count(), 1, "a post after the drain did not wake the worker");
        lane.drain_into(&mut out);
        assert_eq!(out.last(), Some(&9));
    }
}
