//! I/O engines: how a worker thread moves bytes between guest memory and a file.
//!
//! Every engine has the same shape (push operations, submit, reap completions) so the block
//! stack and the virtqueue worker never care which one runs:
//! - [`uring::UringEngine`]: one io_uring per worker, completions signalled on an eventfd
//!   (the fast path);
//! - [`sync::SyncEngine`]: plain `preadv2`/`pwritev2`/`fallocate` executed at push time (the
//!   reference implementation and fallback when io_uring is unavailable);
//! - [`null::NullEngine`]: completes everything at once without touching memory (measures the
//!   vhost-user path alone).

pub mod aligned;
pub mod buffers;
pub mod completion;
pub mod null;
pub mod slab;
pub mod sync;
pub mod uring;

use std::collections::VecDeque;

pub use buffers::Buffers;
pub use completion::{Lane, WorkerCompletions};

/// A borrowed view of one block-level operation, for the code that carries it out. Offsets
/// and lengths are in bytes and already validated against the device size by the caller.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// Scatter read into `iovecs`.
    Read { offset: u64, iovecs: &'a [libc::iovec] },
    /// Gather write from `iovecs`; `dsync` makes the data durable before completion.
    Write { offset: u64, iovecs: &'a [libc::iovec], dsync: bool },
    /// Make every completed write durable (fdatasync).
    Flush,
    /// Deallocate a range; later reads return zeroes.
    Discard { offset: u64, len: u64 },
    /// Zero a range; `unmap` allows deallocating it.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// What an [`IoRequest`] does; the data, if any, is the request's [`Buffers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read into the buffers.
    Read { offset: u64 },
    /// Write the buffers; `dsync` makes the data durable before completion.
    Write { offset: u64, dsync: bool },
    /// Make every completed write durable.
    Flush,
    /// Deallocate a range; later reads return zeroes.
    Discard { offset: u64, len: u64 },
    /// Zero a range; `unmap` allows deallocating it.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// One operation as an owned value: handed down the block stack with the memory it needs, and
/// handed back, whole, in its [`Completion`].
#[derive(Debug)]
pub struct IoRequest {
    /// The submitter's tag (a layer that passes a request down may put its own here and
    /// restore the submitter's before handing it back).
    pub token: u64,
    /// What to do.
    pub kind: OpKind,
    /// The data (empty for flush, discard and write-zeroes).
    pub bufs: Buffers,
}

impl IoRequest {
    /// A request tagged `token`.
    pub fn new(token: u64, kind: OpKind, bufs: Buffers) -> Self {
        IoRequest { token, kind, bufs }
    }

    /// The borrowed view the engines and the replication paths work on.
    pub fn op(&self) -> Op<'_> {
        let iovecs = self.bufs.iovecs();
        match self.kind {
            OpKind::Read { offset } => Op::Read { offset, iovecs },
            OpKind::Write { offset, dsync } => Op::Write { offset, iovecs, dsync },
            OpKind::Flush => Op::Flush,
            OpKind::Discard { offset, len } => Op::Discard { offset, len },
            OpKind::WriteZeroes { offset, len, unmap } => Op::WriteZeroes { offset, len, unmap },
        }
    }

    /// The byte range it reads or changes (None for a flush).
    pub fn range(&self) -> Option<(u64, u64)> {
        match self.kind {
            OpKind::Read { offset } | OpKind::Write { offset, .. } => Some((offset, self.bufs.len())),
            OpKind::Discard { offset, len } | OpKind::WriteZeroes { offset, len, .. } => Some((offset, len)),
            OpKind::Flush => None,
        }
    }
}

/// A finished request: the request itself, and bytes transferred (or 0) on success,
/// `-errno` on failure.
#[derive(Debug)]
pub struct Completion {
    /// The request, handed back.
    pub request: IoRequest,
    /// Bytes transferred, or a negative errno.
    pub result: i32,
}

impl Completion {
    /// The request's token.
    pub fn token(&self) -> u64 {
        self.request.token
    }
}

/// Errors an engine reports at its edge.
#[derive(Debug, thiserror::Error)]
pub enum IoEngineError {
    /// The submission queue is full: reap completions, then push again (backpressure).
    #[error("submission queue full")]
    QueueFull,
    /// Setting up the engine failed.
    #[error("cannot set up the I/O engine")]
    Setup(#[source] std::io::Error),
    /// Submitting to the kernel failed.
    #[error("cannot submit I/O")]
    Submit(#[source] std::io::Error),
}

/// A request that could not be queued, handed back with the reason.
#[derive(Debug)]
pub struct Rejected {
    /// Why.
    pub error: IoEngineError,
    /// The request, untouched.
    pub request: IoRequest,
}

/// The shape of every I/O engine and of every layer of the block stack: push owned requests,
/// submit, reap completions.
///
/// The worker calls `reap` after every `submit` and whenever its [`WorkerCompletions`] eventfd
/// fires; an implementation may therefore finish requests inside `push` and hand them out at
/// the next `reap` without waking anyone.
pub trait IoEngine: Send {
    /// Queues one request; a request that cannot be queued comes back in the error.
    fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>>;

    /// Hands queued requests to the kernel / the next layer.
    fn submit(&mut self) -> Result<(), IoEngineError>;

    /// Moves every finished request into `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);
}

/// Requests an engine finished at push time, waiting to be reaped.
#[derive(Debug, Default)]
pub struct Finished(VecDeque<Completion>);

impl Finished {
    /// Queues `request` finished with `result`.
    pub fn push(&mut self, request: IoRequest, result: i32) {
        self.0.push_back(Completion { request, result });
    }

    /// Moves everything into `out`.
    pub fn drain_into(&mut self, out: &mut Vec<Completion>) {
        out.extend(self.0.drain(..));
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Total byte length of an iovec list.
pub fn iovecs_len(iovecs: &[libc::iovec]) -> u64 {
    iovecs.iter().map(|v| v.iov_len as u64).sum()
}

/// The part of an iovec list covering bytes [offset, offset + len).
pub fn slice_iovecs(iovecs: &[libc::iovec], mut offset: u64, mut len: u64, out: &mut Vec<libc::iovec>) {
    out.clear();
    for v in iovecs {
        if len == 0 {
            break;
        }
        let l = v.iov_len as u64;
        if offset >= l {
            offset -= l;
            continue;
        }
        let take = (l - offset).min(len);
        out.push(libc::iovec {
            // Stays inside the buffer: offset < l and offset + take <= l.
            iov_base: v.iov_base.cast::<u8>().wrapping_add(offset as usize).cast(),
            iov_len: take as usize,
        });
        len -= take;
        offset = 0;
    }
}

/// Reads or writes a whole iovec list at `offset` of `fd` with blocking syscalls; returns the
/// byte count or `-errno`.
///
/// # Safety
/// The iovecs must describe live buffers (writable ones for reads).
pub unsafe fn transfer(fd: std::os::fd::RawFd, offset: u64, iovecs: &[libc::iovec], write: bool, dsync: bool) -> i32 {
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    // SAFETY: forwarded contract.
    unsafe { sync::rw_all(fd, offset, iovecs, write, flags) }
}

/// Converts a byte count to the `i32` result field; requests are bounded far below 2 GiB by the
/// advertised limits, anything larger saturates.
pub fn result_from_len(len: u64) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

/// `fallocate` mode bits used for discard and write-zeroes.
pub(crate) fn fallocate_mode(op: &Op<'_>) -> Option<(u64, u64, i32)> {
    match *op {
        Op::Discard { offset, len } => Some((offset, len, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)),
        Op::WriteZeroes { offset, len, unmap: true } => {
            Some((offset, len, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE))
        }
        Op::WriteZeroes { offset, len, unmap: false } => {
            Some((offset, len, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE))
        }
        Op::Read { .. } | Op::Write { .. } | Op::Flush => None,
    }
}

#[cfg(test)]
pub(crate) mod tests;
