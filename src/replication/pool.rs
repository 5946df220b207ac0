//! Threads that run the secondary VM's requests while replicating.
//!
//! The buffer logic (per-sector resolution over three files, range locks, the quiesce gate) is
//! written as plain blocking code; running it on a pool instead of the queue's worker thread
//! keeps many requests in flight per queue without ever holding a lock across an asynchronous
//! boundary. A finished request is queued for its virtqueue worker and the worker's
//! completion eventfd is signalled.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, mpsc};

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
    /// Whether `list` may hold something: the worker reaps after every request it submits,
    /// and most of those reaps (direct reads, pass-through) find nothing here.
    queued: std::sync::atomic::AtomicBool,
    /// Signalled after each completion: a duplicate of the queue's io_uring eventfd when it has
    /// one (so one fd wakes the worker for both kinds of completion), else our own eventfd.
    /// Owned either way, so a pool thread finishing late never writes to a descriptor number
    /// that was closed and reused meanwhile.
    notify: OwnedFd,
    /// Whether `notify` is our own eventfd (reset here) rather than the engine's (reset by it).
    own: bool,
}

impl DoneQueue {
    /// A queue signalling (a duplicate of) `notify`, or a fresh eventfd when `None`.
    pub fn new(notify: Option<RawFd>) -> std::io::Result<Arc<Self>> {
        let own = notify.is_none();
        let fd = match notify {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open for this call;
            // the result is a new descriptor we own (checked below).
            Some(fd) => unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) },
            // SAFETY: plain eventfd creation; the result is a new descriptor we own.
            None => unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) },
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created for us and nothing else owns it.
        let notify = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Arc::new(DoneQueue {
            list: Mutex::new(Vec::new()),
            queued: std::sync::atomic::AtomicBool::new(false),
            notify,
            own,
        }))
    }

    /// The fd the worker waits on.
    pub fn notifier(&self) -> RawFd {
        self.notify.as_raw_fd()
    }

    /// Resets our own eventfd (the io_uring one is reset by its engine).
    pub fn clear(&self) {
        if self.own {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a local from a non-blocking eventfd we own.
            let _ = unsafe { libc::read(self.notify.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
    }

    /// Queues a finished request and wakes the worker.
    pub fn push(&self, c: Completion) {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        self.queued.store(true, std::sync::atomic::Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to an eventfd this queue owns.
        let _ = unsafe { libc::write(self.notify.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Moves finished requests into `out`.
    pub fn drain_into(&self, out: &mut Vec<Completion>) {
        // Cleared before taking the list: a push racing with this either lands in the list
        // taken now or sets the flag again for the next reap (its eventfd write wakes it).
        if self.queued.swap(false, std::sync::atomic::Ordering::AcqRel) {
            out.append(&mut self.list.lock().unwrap_or_else(|e| e.into_inner()));
        }
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

#[cfg(test)]
mod done_queue_tests {
    use super::*;
    use std::io::Read;

    /// The engine's eventfd goes away while a pool thread still holds the queue; its number is
    /// reused by a file. The late completion must not write into that file.
    #[test]
    fn a_late_completion_never_writes_to_a_reused_descriptor() {
        // SAFETY: plain eventfd creation; owned right below.
        let engine_fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(engine_fd >= 0);
        // SAFETY: just created, owned here only.
        let engine = unsafe { OwnedFd::from_raw_fd(engine_fd) };
        let done = DoneQueue::new(Some(engine_fd)).unwrap();
        drop(engine);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("victim");
        std::fs::write(&path, b"").unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        // Put the file exactly at the freed number (as the kernel's lowest-free rule would).
        // SAFETY: dup2 onto a number this test just closed and owns again below.
        assert_eq!(unsafe { libc::dup2(file.as_raw_fd(), engine_fd) }, engine_fd);
        // SAFETY: engine_fd now names a duplicate of `file`, owned only here.
        let victim = unsafe { std::fs::File::from_raw_fd(engine_fd) };
        done.push(Completion { token: 1, result: 0 });
        let mut content = Vec::new();
        (&victim).read_to_end(&mut content).unwrap();
        assert!(content.is_empty(), "the completion wrote into the reused descriptor");
        let mut out = Vec::new();
        done.drain_into(&mut out);
        assert_eq!(out.len(), 1);
    }
}
