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

pub mod null;
pub mod sync;
pub mod uring;

use std::collections::VecDeque;
use std::os::fd::RawFd;

/// One block-level operation. Offsets and lengths are in bytes and already validated against
/// the device size by the caller.
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

/// The result of one operation: bytes transferred (or 0) on success, `-errno` on failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The token given to [`IoEngine::push`].
    pub token: u64,
    /// Bytes transferred, or a negative errno.
    pub result: i32,
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

/// A per-thread I/O engine bound to one open file.
pub trait IoEngine: Send {
    /// Queue one operation.
    ///
    /// # Safety
    /// Every buffer described by the iovecs in `op` must stay valid (mapped, not reused) until the
    /// completion carrying `token` has been returned by [`IoEngine::reap`]. The iovec array itself
    /// must stay valid until the next [`IoEngine::submit`] returns.
    unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError>;

    /// Hand queued operations to the kernel.
    fn submit(&mut self) -> Result<(), IoEngineError>;

    /// Move every finished operation into `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);

    /// An fd that becomes readable when completions are ready, for engines that finish
    /// operations asynchronously. Engines without one complete everything by the time `push`
    /// returns, so reaping after `submit` is enough.
    fn notifier(&self) -> Option<RawFd>;

    /// Acknowledge the notifier's event (read the eventfd).
    fn clear_notifier(&self) {}
}

/// Completions that an inline engine produced at push time, waiting to be reaped.
#[derive(Debug, Default)]
pub struct Finished(VecDeque<Completion>);

impl Finished {
    pub fn push(&mut self, token: u64, result: i32) {
        self.0.push_back(Completion { token, result });
    }

    pub fn drain_into(&mut self, out: &mut Vec<Completion>) {
        out.extend(self.0.drain(..));
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
