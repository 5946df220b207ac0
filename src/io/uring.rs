//! The io_uring engine: one ring per worker thread, completions signalled on an eventfd that
//! the worker's epoll loop watches.
//!
//! Reads, writes and flushes go through the ring. Discard and write-zeroes run inline with
//! `fallocate` (rare, metadata-only, and they need the fallback chain in [`super::sync`]).
//! Each queued operation takes an entry of an internal slab; the slab index is the SQE's user
//! data, so no allocation happens per operation and a short transfer can be finished from the
//! recorded iovecs.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::sync::{advance, fallocate_with_fallback};
use super::{Completion, Finished, IoEngine, IoEngineError, Op, iovecs_len, result_from_len};

/// The registered-file index of the disk in a ring bound to one file.
const DISK: u32 = 0;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Read,
    Write { dsync: bool },
    Flush,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    token: u64,
    /// Index of the file in the ring's registered-file table.
    file: u32,
    kind: Kind,
    offset: u64,
    iov: *const libc::iovec,
    iov_cnt: usize,
    expected: u64,
}

// SAFETY: the raw iovec pointer is only dereferenced by the thread owning the engine, and the
// caller of `push` guarantees the array stays valid until the completion is reaped.
unsafe impl Send for InFlight {}

/// An io_uring bound to one file, or to a small table of files (an image and its backing
/// chain) that operations address by index.
pub struct UringEngine {
    ring: IoUring,
    files: Vec<Arc<File>>,
    eventfd: EventFd,
    slab: Vec<Option<InFlight>>,
    free: Vec<usize>,
    inline_done: Finished,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine").field("in_flight", &(self.slab.len() - self.free.len())).finish()
    }
}

impl UringEngine {
    /// A ring with room for `entries` operations in flight on `file`.
    pub fn new(file: Arc<File>, entries: u32) -> Result<Self, IoEngineError> {
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(IoEngineError::Setup)?;
        Self::with_files(vec![file], entries, eventfd)
    }

    /// A ring on several files, addressed by their index in `files` with
    /// [`UringEngine::push_to`]; completions signal `eventfd` (which the caller may also
    /// signal for completions of its own).
    pub fn with_files(files: Vec<Arc<File>>, entries: u32, eventfd: EventFd) -> Result<Self, IoEngineError> {
        let entries = entries.clamp(8, 4096).next_power_of_two();
        let ring = IoUring::builder().build(entries).map_err(IoEngineError::Setup)?;
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        ring.submitter().register_files(&fds).map_err(IoEngineError::Setup)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd()).map_err(IoEngineError::Setup)?;
        Ok(UringEngine {
            ring,
            files,
            eventfd,
            slab: Vec::with_capacity(entries as usize),
            free: Vec::new(),
            inline_done: Finished::default(),
        })
    }

    fn alloc(&mut self, op: InFlight) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(op);
                i
            }
            None => {
                self.slab.push(Some(op));
                self.slab.len() - 1
            }
        }
    }
}

/// Finishes a short read or write synchronously from where the kernel stopped.
fn finish_short(file: &Arc<File>, op: &InFlight, done: u64) -> i32 {
    // SAFETY: the caller of `push` keeps the iovec array valid until this completion is
    // reaped, which is happening now.
    let iovecs = unsafe { std::slice::from_raw_parts(op.iov, op.iov_cnt) };
    let rest = advance(iovecs, done);
    let mut tmp = super::sync::SyncEngine::new(file.clone());
    let sub = match op.kind {
        Kind::Read => Op::Read { offset: op.offset + done, iovecs: &rest },
        Kind::Write { dsync } => Op::Write { offset: op.offset + done, iovecs: &rest, dsync },
        Kind::Flush => return 0,
    };
    // SAFETY: `rest` points into the caller's buffers, alive until this completion.
    if let Err(e) = unsafe { tmp.push(&sub, 0) } {
        log::error!("cannot finish short transfer: {e}");
        return -libc::EIO;
    }
    let mut out = Vec::with_capacity(1);
    tmp.reap(&mut out);
    match out.first() {
        Some(c) if c.result < 0 => c.result,
        _ => result_from_len(op.expected),
    }
}

impl UringEngine {
    /// Points entry `index` of the registered-file table at `file` (a descriptor that now
    /// names another file); operations in flight keep the file they started on.
    pub fn replace_file(&mut self, index: u32, file: Arc<File>) -> std::io::Result<()> {
        let slot = self.files.get_mut(index as usize).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBADF))?;
        self.ring.submitter().register_files_update(index, &[file.as_raw_fd()])?;
        *slot = file;
        Ok(())
    }

    /// Queues `op` on the file with index `file` of the table given at construction.
    ///
    /// # Safety
    /// As [`IoEngine::push`].
    pub unsafe fn push_to(&mut self, file: u32, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
        let Some(target) = self.files.get(file as usize) else {
            self.inline_done.push(token, -libc::EBADF);
            return Ok(());
        };
        let (kind, offset, iovecs) = match *op {
            Op::Read { offset, iovecs } => (Kind::Read, offset, iovecs),
            Op::Write { offset, iovecs, dsync } => (Kind::Write { dsync }, offset, iovecs),
            Op::Flush => (Kind::Flush, 0, &[][..]),
            Op::Discard { .. } | Op::WriteZeroes { .. } => {
                let result = fallocate_with_fallback(target.as_raw_fd(), op);
                self.inline_done.push(token, result);
                return Ok(());
            }
        };
        if self.ring.submission().is_full() {
            self.submit()?;
            if self.ring.submission().is_full() {
                return Err(IoEngineError::QueueFull);
            }
        }
        let iov_cnt = u32::try_from(iovecs.len()).map_err(|_| IoEngineError::QueueFull)?;
        let idx = self.alloc(InFlight {
            token,
            file,
            kind,
            offset,
            iov: iovecs.as_ptr(),
            iov_cnt: iovecs.len(),
            expected: iovecs_len(iovecs),
        });
        let fixed = types::Fixed(file);
        let entry: squeue::Entry = match kind {
            Kind::Read => opcode::Readv::new(fixed, iovecs.as_ptr(), iov_cnt).offset(offset).build(),
            Kind::Write { dsync } => opcode::Writev::new(fixed, iovecs.as_ptr(), iov_cnt)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Kind::Flush => opcode::Fsync::new(fixed).flags(types::FsyncFlags::DATASYNC).build(),
        };
        let entry = entry.user_data(idx as u64);
        // SAFETY: the entry references the iovec array and buffers that the caller keeps valid
        // until the completion is reaped (this function's contract); the fixed file index was
        // checked against the table registered for the ring's lifetime.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.slab[idx] = None;
            self.free.push(idx);
            return Err(IoEngineError::QueueFull);
        }
        Ok(())
    }
}

impl IoEngine for UringEngine {
    unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
        // SAFETY: forwarded contract.
        unsafe { self.push_to(DISK, op, token) }
    }

    fn submit(&mut self) -> Result<(), IoEngineError> {
        // Nothing queued since the last submit (and no completions held back by an overflowed
        // completion queue, which only a system call flushes): no system call.
        {
            let sq = self.ring.submission();
            if sq.is_empty() && !sq.cq_overflow() {
                return Ok(());
            }
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: the completion queue is overflowing; the caller reaps and retries.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(IoEngineError::Submit(e)),
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.inline_done.drain_into(out);
        let UringEngine { ring, slab, free, files, .. } = self;
        // A pass over the completion queue; anything finishing later signals the eventfd.
        // Completions the kernel held back because the queue overflowed (more operations in
        // flight than it holds, e.g. requests split into many parts) come out with the next
        // system call, made here so that they cannot wait for a new request.
        for _ in 0..8 {
            for cqe in ring.completion() {
                let idx = cqe.user_data() as usize;
                let Some(op) = slab.get_mut(idx).and_then(Option::take) else {
                    log::error!("io_uring returned unknown user data {idx}");
                    continue;
                };
                free.push(idx);
                let res = cqe.result();
                let result = if res >= 0 && (res as u64) < op.expected {
                    finish_short(&files[op.file as usize], &op, res as u64)
                } else {
                    res
                };
                out.push(Completion { token: op.token, result });
            }
            if !ring.submission().cq_overflow() {
                break;
            }
            let _ = ring.submit();
        }
    }

    fn notifier(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }

    fn clear_notifier(&self) {
        let _ = self.eventfd.read();
    }
}
