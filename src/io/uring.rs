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

use super::slab::Slab;
use super::sync::fallocate_with_fallback;
use super::{
    Completion, Finished, IoEngine, IoEngineError, IoRequest, OpKind, Rejected, WorkerCompletions, result_from_len,
};
use io_uring::{IoUring, opcode, squeue, types};

/// The registered-file index of the disk in a ring bound to one file.
const DISK: u32 = 0;

/// A request the kernel owns until its completion is reaped.
struct InFlight {
    /// Index of the file in the ring's registered-file table.
    file: u32,
    expected: u64,
    /// Holds the iovec array the SQE points to (its heap buffer does not move when the slab
    /// grows) and the memory behind it.
    request: IoRequest,
}

/// An io_uring bound to one file, or to a small table of files (an image and its backing
/// chain) that operations address by index.
pub struct UringEngine {
    ring: IoUring,
    files: Vec<Arc<File>>,
    /// The worker's completion queue, whose eventfd the ring signals (held so it stays open).
    _completions: Arc<WorkerCompletions>,
    slab: Slab<InFlight>,
    inline_done: Finished,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine").field("in_flight", &self.slab.len()).finish()
    }
}

impl UringEngine {
    /// A ring with room for `entries` operations in flight on `file`, signalling `completions`.
    pub fn new(file: Arc<File>, entries: u32, completions: &Arc<WorkerCompletions>) -> Result<Self, IoEngineError> {
        Self::with_files(vec![file], entries, completions)
    }

    /// A ring on several files, addressed by their index in `files` with
    /// [`UringEngine::push_to`]; completions signal the worker's eventfd.
    pub fn with_files(
        files: Vec<Arc<File>>,
        entries: u32,
        completions: &Arc<WorkerCompletions>,
    ) -> Result<Self, IoEngineError> {
        let entries = entries.clamp(8, 4096).next_power_of_two();
        let ring = IoUring::builder().build(entries).map_err(IoEngineError::Setup)?;
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        ring.submitter().register_files(&fds).map_err(IoEngineError::Setup)?;
        ring.submitter().register_eventfd(completions.fd()).map_err(IoEngineError::Setup)?;
        Ok(UringEngine {
            ring,
            files,
            _completions: completions.clone(),
            slab: Slab::with_capacity(entries as usize),
            inline_done: Finished::default(),
        })
    }

    /// Requests the kernel holds.
    pub fn in_flight(&self) -> usize {
        self.slab.len()
    }
}

/// Finishes a short read or write synchronously from where the kernel stopped.
fn finish_short(file: &Arc<File>, op: &InFlight, done: u64) -> i32 {
    let rest = op.request.bufs.slice(done, op.expected - done);
    let r = match op.request.kind {
        OpKind::Read { offset } => rest.transfer(file.as_raw_fd(), offset + done, false, false),
        OpKind::Write { offset, dsync } => rest.transfer(file.as_raw_fd(), offset + done, true, dsync),
        _ => return 0,
    };
    if r < 0 { r } else { result_from_len(op.expected) }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        let n = self.in_flight();
        if n > 0 {
            // The kernel may still read or write the memory of these requests after the ring
            // is closed: it is leaked rather than freed under the I/O.
            log::error!("io_uring closed with {n} operations in flight; their memory is kept");
            self.slab.leak();
        }
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

    /// Queues `request` on the file with index `file` of the table given at construction.
    pub fn push_to(&mut self, file: u32, request: IoRequest) -> Result<(), Box<Rejected>> {
        let Some(target) = self.files.get(file as usize) else {
            self.inline_done.push(request, -libc::EBADF);
            return Ok(());
        };
        match request.kind {
            OpKind::Discard { .. } | OpKind::WriteZeroes { .. } => {
                let result = fallocate_with_fallback(target.as_raw_fd(), &request.op());
                self.inline_done.push(request, result);
                return Ok(());
            }
            OpKind::Read { .. } | OpKind::Write { .. } | OpKind::Flush => {}
        }
        if self.ring.submission().is_full() {
            if let Err(error) = self.submit() {
                return Err(Box::new(Rejected { error, request }));
            }
            if self.ring.submission().is_full() {
                return Err(Box::new(Rejected { error: IoEngineError::QueueFull, request }));
            }
        }
        let Ok(iov_cnt) = u32::try_from(request.bufs.iovecs().len()) else {
            return Err(Box::new(Rejected { error: IoEngineError::QueueFull, request }));
        };
        let iov = request.bufs.iovecs().as_ptr();
        let fixed = types::Fixed(file);
        let entry: squeue::Entry = match request.kind {
            OpKind::Read { offset } => opcode::Readv::new(fixed, iov, iov_cnt).offset(offset).build(),
            OpKind::Write { offset, dsync } => opcode::Writev::new(fixed, iov, iov_cnt)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            _ => opcode::Fsync::new(fixed).flags(types::FsyncFlags::DATASYNC).build(),
        };
        let expected = request.bufs.len();
        let idx = self.slab.insert(InFlight { file, expected, request });
        let entry = entry.user_data(idx as u64);
        // SAFETY: the entry points to the iovec array of a request the slab now owns until its
        // completion is reaped (or, if the ring goes away first, forever: see `Drop`); the
        // array's heap buffer does not move while the slab grows, and `Buffers` keeps the
        // memory it names mapped. The fixed file index was checked against the table
        // registered for the ring's lifetime.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The slot was filled just above, so the request is always there to hand back.
            if let Some(op) = self.slab.remove(idx) {
                return Err(Box::new(Rejected { error: IoEngineError::QueueFull, request: op.request }));
            }
        }
        Ok(())
    }
}

impl IoEngine for UringEngine {
    fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
        self.push_to(DISK, request)
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
        let UringEngine { ring, slab, files, .. } = self;
        // A pass over the completion queue; anything finishing later signals the eventfd.
        // Completions the kernel held back because the queue overflowed (more operations in
        // flight than it holds, e.g. requests split into many parts) come out with the next
        // system call, made here so that they cannot wait for a new request.
        for _ in 0..8 {
            for cqe in ring.completion() {
                let idx = cqe.user_data() as usize;
                let Some(op) = slab.remove(idx) else {
                    log::error!("io_uring returned unknown user data {idx}");
                    continue;
                };
                let res = cqe.result();
                let result = if res >= 0 && (res as u64) < op.expected {
                    finish_short(&files[op.file as usize], &op, res as u64)
                } else {
                    res
                };
                out.push(Completion { request: op.request, result });
            }
            if !ring.submission().cq_overflow() {
                break;
            }
            let _ = ring.submit();
        }
    }
}
