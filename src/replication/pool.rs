//! Threads that run the secondary VM's requests while replicating.
//!
//! The buffer logic (per-sector resolution over three files, range locks, the quiesce gate) is
//! written as plain blocking code; running it on a pool instead of the queue's worker thread
//! keeps many requests in flight per queue without ever holding a lock across an asynchronous
//! boundary. A finished request is queued for its virtqueue worker and the worker's
//! completion eventfd is signalled.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, mpsc};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::block::{Completion, Op};

/// An [`Op`] whose iovec array travels as a raw pointer.
#[derive(Debug, Clone, Copy)]
pub enum SendOp {
    /// See [`Op::Read`].
    Read { offset: u64, iov: *const libc::iovec, n: usize },
    /// See [`Op::Write`].
    Write { offset: u64, iov: *const libc::iovec, n: usize, dsync: bool },
    /// See [`Op::Flush`].
    Flush,
    /// See [`Op::Discard`].
    Discard { offset: u64, len: u64 },
    /// See [`Op::WriteZeroes`].
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

// SAFETY: the pointers refer to the submitting worker's iovec array and guest buffers, which
// its `BlockQueue::push` contract keeps alive until the completion is reaped; the pool thread
// only uses them before it queues that completion.
unsafe impl Send for SendOp {}

impl SendOp {
    /// Captures `op`.
    pub fn new(op: &Op<'_>) -> Self {
        match *op {
            Op::Read { offset, iovecs } => SendOp::Read { offset, iov: iovecs.as_ptr(), n: iovecs.len() },
            Op::Write { offset, iovecs, dsync } => {
                SendOp::Write { offset, iov: iovecs.as_ptr(), n: iovecs.len(), dsync }
            }
            Op::Flush => SendOp::Flush,
            Op::Discard { offset, len } => SendOp::Discard { offset, len },
            Op::WriteZeroes { offset, len, unmap } => SendOp::WriteZeroes { offset, len, unmap },
        }
    }

    /// Rebuilds the [`Op`] and passes it to `f`.
    ///
    /// # Safety
    /// The iovec array captured by [`SendOp::new`] must still be alive.
    pub unsafe fn with<R>(&self, f: impl FnOnce(&Op<'_>) -> R) -> R {
        match *self {
            SendOp::Read { offset, iov, n } => {
                // SAFETY: guaranteed by the caller.
                let iovecs = unsafe { std::slice::from_raw_parts(iov, n) };
                f(&Op::Read { offset, iovecs })
            }
            SendOp::Write { offset, iov, n, dsync } => {
                // SAFETY: guaranteed by the caller.
                let iovecs = unsafe { std::slice::from_raw_parts(iov, n) };
                f(&Op::Write { offset, iovecs, dsync })
            }
            SendOp::Flush => f(&Op::Flush),
            SendOp::Discard { offset, len } => f(&Op::Discard { offset, len }),
            SendOp::WriteZeroes { offset, len, unmap } => f(&Op::WriteZeroes { offset, len, unmap }),
        }
    }
}

/// Where a queue's finished requests wait for its worker.
pub struct DoneQueue {
    list: Mutex<Vec<Completion>>,
    /// Signalled after each completion: the queue's io_uring eventfd when it has one (so one fd
    /// wakes the worker for both kinds of completion), else our own.
    notify: RawFd,
    own: Option<EventFd>,
}

impl DoneQueue {
    /// A queue signalling `notify`, or a fresh eventfd when `None`.
    pub fn new(notify: Option<RawFd>) -> std::io::Result<Arc<Self>> {
        let own = match notify {
            Some(_) => None,
            None => Some(EventFd::new(EFD_NONBLOCK)?),
        };
        let fd = notify.unwrap_or_else(|| own.as_ref().map_or(-1, |e| e.as_raw_fd()));
        Ok(Arc::new(DoneQueue { list: Mutex::new(Vec::new()), notify: fd, own }))
    }

    /// The fd the worker waits on.
    pub fn notifier(&self) -> RawFd {
        self.notify
    }

    /// Resets our own eventfd (the io_uring one is reset by its engine).
    pub fn clear(&self) {
        if let Some(e) = &self.own {
            let _ = e.read();
        }
    }

    pub fn push(&self, c: Completion) {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to an eventfd that lives as long as the queue.
        let _ = unsafe { libc::write(self.notify, (&one as *const u64).cast(), 8) };
    }

    /// Moves finished requests into `out`.
    pub fn drain_into(&self, out: &mut Vec<Completion>) {
        out.append(&mut self.list.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

type Task = Box<dyn FnOnce() -> i32 + Send>;

/// A fixed set of threads taking tasks from one channel.
pub struct Pool {
    tx: Mutex<mpsc::Sender<(Task, u64, Arc<DoneQueue>)>>,
}

impl Pool {
    /// Starts `threads` threads.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<(Task, u64, Arc<DoneQueue>)>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("secondary-io-{i}")).spawn(move || {
                loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((task, token, done)) = job else { return };
                    let result = task();
                    done.push(Completion { token, result });
                }
            })?;
        }
        Ok(Pool { tx: Mutex::new(tx) })
    }

    /// Runs `task` on a pool thread; its result is queued on `done` with `token`.
    pub fn spawn(&self, task: Task, token: u64, done: &Arc<DoneQueue>) -> bool {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).send((task, token, done.clone())).is_ok()
    }
}
