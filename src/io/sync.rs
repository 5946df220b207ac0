//! The synchronous engine: each operation runs to completion inside `push`.
//!
//! It is the reference the io_uring engine is tested against, the fallback when io_uring is
//! unavailable, and the home of the `fallocate` fallbacks both engines share.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    Completion, Finished, IoEngine, IoEngineError, IoRequest, Op, OpKind, Rejected, fallocate_mode, result_from_len,
};

/// Runs every operation with a blocking syscall at push time.
#[derive(Debug)]
pub struct SyncEngine {
    file: Arc<File>,
    finished: Finished,
}

impl SyncEngine {
    /// An engine for `file`.
    pub fn new(file: Arc<File>) -> Self {
        SyncEngine { file, finished: Finished::default() }
    }
}

impl SyncEngine {
    /// Runs `op` now; the byte count or `-errno`.
    pub fn run(&self, request: &IoRequest) -> i32 {
        let fd = self.file.as_raw_fd();
        match request.kind {
            OpKind::Read { offset } => request.bufs.transfer(fd, offset, false, false),
            OpKind::Write { offset, dsync } => request.bufs.transfer(fd, offset, true, dsync),
            OpKind::Flush => {
                // SAFETY: plain syscall on an fd we own.
                if unsafe { libc::fdatasync(fd) } == 0 { 0 } else { -errno() }
            }
            OpKind::Discard { .. } | OpKind::WriteZeroes { .. } => fallocate_with_fallback(fd, &request.op()),
        }
    }
}

impl IoEngine for SyncEngine {
    fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
        let result = self.run(&request);
        self.finished.push(request, result);
        Ok(())
    }

    fn submit(&mut self) -> Result<(), IoEngineError> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.finished.drain_into(out);
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Transfers the whole iovec list, continuing after short transfers.
///
/// # Safety
/// The iovecs must describe live buffers (writable ones for reads).
pub(crate) unsafe fn rw_all(fd: RawFd, offset: u64, iovecs: &[libc::iovec], write: bool, flags: i32) -> i32 {
    let total = super::iovecs_len(iovecs);
    let mut done: u64 = 0;
    let mut local: Vec<libc::iovec> = Vec::new();
    let mut current: &[libc::iovec] = iovecs;
    while done < total {
        let Ok(pos) = libc::off_t::try_from(offset + done) else {
            return -libc::EINVAL;
        };
        let cnt = current.len().min(1024) as i32;
        // SAFETY: `current` points to `cnt` valid iovecs whose buffers the caller keeps alive.
        let n = unsafe {
            if write {
                libc::pwritev2(fd, current.as_ptr(), cnt, pos, flags)
            } else {
                libc::preadv2(fd, current.as_ptr(), cnt, pos, flags)
            }
        };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return -e;
        }
        if n == 0 {
            // End of file inside the device size: the file shrank under us.
            return -libc::EIO;
        }
        done += n as u64;
        if done < total {
            local = advance(iovecs, done);
            current = &local;
        }
    }
    let _ = local;
    result_from_len(total)
}

/// The iovec list with its first `skip` bytes removed.
pub(crate) fn advance(iovecs: &[libc::iovec], mut skip: u64) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(iovecs.len());
    for v in iovecs {
        let len = v.iov_len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        out.push(libc::iovec {
            // Pointer arithmetic stays inside the buffer because skip < len.
            iov_base: v.iov_base.cast::<u8>().wrapping_add(skip as usize).cast(),
            iov_len: (len - skip) as usize,
        });
        skip = 0;
    }
    out
}

/// Runs a discard or write-zeroes with `fallocate`, falling back when the file system lacks the
/// mode: ZERO_RANGE -> PUNCH_HOLE -> writing zeroes; an unsupported discard is a successful no-op
/// (discard is a hint, virtio 1.2 §5.2.6.2).
pub fn fallocate_with_fallback(fd: RawFd, op: &Op<'_>) -> i32 {
    let Some((offset, len, mode)) = fallocate_mode(op) else {
        return -libc::EINVAL;
    };
    if len == 0 {
        return 0;
    }
    let is_discard = matches!(op, Op::Discard { .. });
    let mut mode = mode;
    loop {
        match fallocate(fd, mode, offset, len) {
            0 => return 0,
            e if e == -libc::EOPNOTSUPP || e == -libc::EINVAL && mode & libc::FALLOC_FL_ZERO_RANGE != 0 => {
                if is_discard {
                    return 0;
                }
                if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
                    mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    continue;
                }
                return write_zeroes_by_hand(fd, offset, len);
            }
            e => return e,
        }
    }
}

fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> i32 {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return -libc::EINVAL;
    };
    loop {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        if unsafe { libc::fallocate(fd, mode, off, l) } == 0 {
            return 0;
        }
        let e = errno();
        if e != libc::EINTR {
            return -e;
        }
    }
}

fn write_zeroes_by_hand(fd: RawFd, offset: u64, len: u64) -> i32 {
    const CHUNK: usize = 1 << 20;
    let zeroes = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        let iov = [libc::iovec { iov_base: zeroes.as_ptr() as *mut _, iov_len: n }];
        // SAFETY: `zeroes` outlives the call; pwritev only reads from it.
        let r = unsafe { rw_all(fd, offset + done, &iov, true, 0) };
        if r < 0 {
            return r;
        }
        done += n as u64;
    }
    0
}

/// Writes all of `buf` within `deadline` without touching the socket's blocking mode (another thread may
/// share it): poll for room, then a non-blocking send.
pub fn write_within(s: &UnixStream, buf: &[u8], deadline: Duration) -> io::Result<()> {
    let end = Instant::now() + deadline;
    let mut off = 0;
    while off < buf.len() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "write deadline passed"));
        }
        let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd on the stack.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, i32::MAX as u128) as i32) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue;
        }
        let rest = &buf[off..];
        // SAFETY: `rest` is a valid buffer for its length; the flags only make the call
        // non-blocking and suppress SIGPIPE.
        let n = unsafe {
            libc::send(s.as_raw_fd(), rest.as_ptr().cast(), rest.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                continue;
            }
            return Err(e);
        }
        off += n as usize;
    }
    Ok(())
}
