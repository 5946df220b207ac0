//! Bounce buffers for `O_DIRECT`. A virtio driver may place a request's data at any guest
//! address and split it into segments of any length; `O_DIRECT` wants every segment's
//! address and length to be multiples of the disk's memory alignment, and fails the request
//! with `EINVAL` otherwise. [`BounceQueue`] sits on a `--direct` disk's engine and copies the
//! requests whose buffers are not aligned through one aligned buffer (reads are copied back
//! when they complete), as QEMU's block layer does; aligned requests pass untouched.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};

use super::aligned::AlignedBuf;
use super::{BlockQueue, Completion, IoEngineError, Op};

/// A bounced request in flight.
struct Bounced {
    /// The aligned copy the engine reads into or writes from.
    buf: AlignedBuf,
    /// The single iovec handed to the engine; boxed so its address stays put.
    #[expect(dead_code, reason = "held only so the engine's iovec stays valid until completion")]
    iov: Box<libc::iovec>,
    /// For a read: the caller's iovec array, to copy the data back into on completion.
    read_into: Option<(*const libc::iovec, usize)>,
}

// SAFETY: the raw pointers refer to the caller's iovec array and buffers, which the
// `BlockQueue::push` contract keeps alive until this request's completion is reaped; they
// are only used by the thread that owns the queue.
unsafe impl Send for Bounced {}

/// A queue that bounces unaligned requests (see the module documentation).
pub struct BounceQueue {
    inner: Box<dyn BlockQueue>,
    align: usize,
    /// Bounced requests by token (tokens are unique among requests in flight).
    bounced: HashMap<u64, Bounced>,
    scratch: Vec<Completion>,
}

impl BounceQueue {
    /// Wraps `inner`, bouncing requests whose segments are not `align`-aligned.
    pub fn new(inner: Box<dyn BlockQueue>, align: usize) -> Self {
        BounceQueue { inner, align: align.max(1), bounced: HashMap::new(), scratch: Vec::new() }
    }

    fn aligned(&self, iovecs: &[libc::iovec]) -> bool {
        iovecs.iter().all(|v| (v.iov_base as usize).is_multiple_of(self.align) && v.iov_len.is_multiple_of(self.align))
    }
}

impl BlockQueue for BounceQueue {
    unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
        let (offset, iovecs, write, dsync) = match *op {
            Op::Read { offset, iovecs } if !self.aligned(iovecs) => (offset, iovecs, false, false),
            Op::Write { offset, iovecs, dsync } if !self.aligned(iovecs) => (offset, iovecs, true, dsync),
            // SAFETY: forwarded contract.
            _ => return unsafe { self.inner.push(op, token) },
        };
        let mut buf = if write {
            // SAFETY: the caller keeps the buffers readable for the duration of the request.
            unsafe { AlignedBuf::copy_of(iovecs) }
        } else {
            AlignedBuf::zeroed(crate::io::iovecs_len(iovecs) as usize)
        };
        let iov = Box::new(libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() });
        let read_into = (!write).then_some((iovecs.as_ptr(), iovecs.len()));
        let slice = std::slice::from_ref(&*iov);
        let bounced_op =
            if write { Op::Write { offset, iovecs: slice, dsync } } else { Op::Read { offset, iovecs: slice } };
        // SAFETY: `buf` and `iov` live in `self.bounced` until this token's completion is
        // reaped (moving the entry moves neither the heap buffer nor the boxed iovec).
        unsafe { self.inner.push(&bounced_op, token) }?;
        self.bounced.insert(token, Bounced { buf, iov, read_into });
        Ok(())
    }

    fn submit(&mut self) -> Result<(), IoEngineError> {
        self.inner.submit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        if self.bounced.is_empty() {
            return self.inner.reap(out);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        self.inner.reap(&mut scratch);
        for c in scratch.drain(..) {
            if let Some(b) = self.bounced.remove(&c.token)
                && let (Some((ptr, n)), true) = (b.read_into, c.result >= 0)
            {
                // SAFETY: the caller's iovec array and buffers are alive until this
                // completion is handed back (the `push` contract).
                let iovecs = unsafe { std::slice::from_raw_parts(ptr, n) };
                let mut at = 0;
                for v in iovecs {
                    // SAFETY: as above; each iovec names `iov_len` writable bytes.
                    let dst = unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) };
                    dst.copy_from_slice(&b.buf[at..at + v.iov_len]);
                    at += v.iov_len;
                }
            }
            out.push(c);
        }
        self.scratch = scratch;
    }

    fn notifier(&self) -> Option<RawFd> {
        self.inner.notifier()
    }

    fn clear_notifier(&self) {
        self.inner.clear_notifier()
    }
}

/// The memory alignment `O_DIRECT` needs on `file`: 512 if a 512-byte-aligned (but not
/// 4 KiB-aligned) buffer can be read, else 4096. Probed once at open, like QEMU's
/// `raw_probe_alignment`; any doubt gives 4096.
pub fn probe_memory_alignment(file: &impl AsRawFd) -> usize {
    let mut buf = AlignedBuf::zeroed(2 * super::aligned::ALIGN);
    // 512 bytes at a 512-aligned address that is not 4 KiB-aligned; the disk's first sector.
    let at = buf[512..].as_mut_ptr();
    for len in [512usize, 4096] {
        // SAFETY: `at` points to at least 4096 writable bytes inside `buf`.
        let r = unsafe { libc::pread(file.as_raw_fd(), at.cast(), len, 0) };
        if r >= 0 {
            return 512;
        }
    }
    4096
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// An engine that runs each operation at once on a file through the page cache, and
    /// insists on aligned segments as `O_DIRECT` does.
    struct Recording {
        file: std::fs::File,
        done: Vec<Completion>,
    }

    impl BlockQueue for Recording {
        unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
            let (offset, iovecs, write) = match *op {
                Op::Read { offset, iovecs } => (offset, iovecs, false),
                Op::Write { offset, iovecs, .. } => (offset, iovecs, true),
                _ => panic!("only reads and writes here"),
            };
            if iovecs.iter().any(|v| !(v.iov_base as usize).is_multiple_of(512) || !v.iov_len.is_multiple_of(512)) {
                self.done.push(Completion { token, result: -libc::EINVAL });
                return Ok(());
            }
            // SAFETY: forwarded contract.
            let result = unsafe { crate::io::transfer(self.file.as_raw_fd(), offset, iovecs, write, false) };
            self.done.push(Completion { token, result });
            Ok(())
        }
        fn submit(&mut self) -> Result<(), IoEngineError> {
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            out.append(&mut self.done);
        }
        fn notifier(&self) -> Option<RawFd> {
            None
        }
        fn clear_notifier(&self) {}
    }

    #[test]
    fn unaligned_requests_are_bounced_and_aligned_ones_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        std::fs::write(&path, vec![0u8; 65536]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let inner = Recording { file: file.try_clone().unwrap(), done: Vec::new() };
        let mut q = BounceQueue::new(Box::new(inner), 512);
        // A write from two odd segments: 100 bytes at an odd address, then 924 bytes.
        let src = vec![0x5au8; 2048];
        let iov = [
            libc::iovec { iov_base: src[1..].as_ptr() as *mut _, iov_len: 100 },
            libc::iovec { iov_base: src[101..].as_ptr() as *mut _, iov_len: 924 },
        ];
        // SAFETY: `src` and `iov` outlive the completion, reaped below.
        unsafe { q.push(&Op::Write { offset: 4096, iovecs: &iov, dsync: false }, 1) }.unwrap();
        let mut out = Vec::new();
        q.reap(&mut out);
        assert_eq!(out, vec![Completion { token: 1, result: 1024 }]);
        let mut back = vec![0u8; 1024];
        file.read_exact_at(&mut back, 4096).unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
        // A read into odd segments gets the data copied back.
        let mut dst = vec![0u8; 2048];
        let iov = [
            libc::iovec { iov_base: dst[3..].as_mut_ptr().cast(), iov_len: 24 },
            libc::iovec { iov_base: dst[27..].as_mut_ptr().cast(), iov_len: 1000 },
        ];
        // SAFETY: as above.
        unsafe { q.push(&Op::Read { offset: 4096, iovecs: &iov }, 2) }.unwrap();
        out.clear();
        q.reap(&mut out);
        assert_eq!(out, vec![Completion { token: 2, result: 1024 }]);
        assert!(dst[3..1027].iter().all(|&b| b == 0x5a));
        assert!(dst[..3].iter().chain(&dst[1027..]).all(|&b| b == 0), "bytes outside the segments changed");
        assert!(q.bounced.is_empty());
        // An aligned request reaches the engine with the caller's own iovec.
        let mut page = AlignedBuf::zeroed(4096);
        let iov = [libc::iovec { iov_base: page.as_mut_ptr().cast(), iov_len: 4096 }];
        // SAFETY: as above.
        unsafe { q.push(&Op::Read { offset: 0, iovecs: &iov }, 3) }.unwrap();
        out.clear();
        q.reap(&mut out);
        assert_eq!(out.len(), 1);
        assert!(q.bounced.is_empty());
    }
}
