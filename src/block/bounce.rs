//! Bounce buffers for `O_DIRECT`. A virtio driver may place a request's data at any guest
//! address and split it into segments of any length; `O_DIRECT` wants every segment's
//! address and length to be multiples of the disk's memory alignment, and fails the request
//! with `EINVAL` otherwise. [`BounceQueue`] sits on a `--direct` disk's engine and copies the
//! requests whose buffers are not aligned through one aligned buffer (reads are copied back
//! when they complete), as QEMU's block layer does; aligned requests pass untouched.

use std::os::fd::AsRawFd;

use super::{BlockQueue, Buffers, Completion, IoEngineError, IoRequest, OpKind, Rejected};
use crate::io::aligned::AlignedBuf;
use crate::io::slab::Slab;

/// A queue that bounces unaligned requests (see the module documentation).
pub struct BounceQueue {
    inner: Box<dyn BlockQueue>,
    align: usize,
    /// Every request pushed down, by the token it carries there: the submitter's token and,
    /// for a bounced one, the submitter's buffers (given back on completion). Re-tagging
    /// keeps this correct when a submitter has several requests with one token in flight.
    pushed: Slab<(u64, Option<Buffers>)>,
    scratch: Vec<Completion>,
}

impl BounceQueue {
    /// Wraps `inner`, bouncing requests whose segments are not `align`-aligned.
    pub fn new(inner: Box<dyn BlockQueue>, align: usize) -> Self {
        BounceQueue { inner, align: align.max(1), pushed: Slab::default(), scratch: Vec::new() }
    }

    fn aligned(&self, iovecs: &[libc::iovec]) -> bool {
        iovecs.iter().all(|v| (v.iov_base as usize).is_multiple_of(self.align) && v.iov_len.is_multiple_of(self.align))
    }
}

impl BlockQueue for BounceQueue {
    fn push(&mut self, mut request: IoRequest) -> Result<(), Box<Rejected>> {
        let bounce = match request.kind {
            OpKind::Read { .. } | OpKind::Write { .. } => !self.aligned(request.bufs.iovecs()),
            _ => false,
        };
        let original = bounce.then(|| {
            let copy = if matches!(request.kind, OpKind::Write { .. }) {
                request.bufs.to_aligned()
            } else {
                AlignedBuf::recycled(request.bufs.len() as usize)
            };
            std::mem::replace(&mut request.bufs, Buffers::from_aligned(copy))
        });
        let token = request.token;
        let idx = self.pushed.insert((token, None));
        request.token = idx as u64;
        match self.inner.push(request) {
            Ok(()) => {
                if let Some(entry) = self.pushed.get_mut(idx) {
                    entry.1 = original;
                }
                Ok(())
            }
            Err(mut rejected) => {
                self.pushed.remove(idx);
                rejected.request.token = token;
                if let Some(original) = original {
                    rejected.request.bufs = original;
                }
                Err(rejected)
            }
        }
    }

    fn submit(&mut self) -> Result<(), IoEngineError> {
        self.inner.submit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        self.inner.reap(&mut scratch);
        for mut c in scratch.drain(..) {
            let Some((token, original)) = self.pushed.remove(c.request.token as usize) else {
                log::error!("bounce: completion for unknown token {}", c.request.token);
                continue;
            };
            c.request.token = token;
            if let Some(mut original) = original {
                if matches!(c.request.kind, OpKind::Read { .. }) && c.result >= 0 {
                    c.request.bufs.copy_to_buffers(&mut original);
                }
                c.request.bufs = original;
            }
            out.push(c);
        }
        self.scratch = scratch;
    }
}

/// The memory alignment `O_DIRECT` needs on `file`: 512 if a 512-byte-aligned (but not
/// 4 KiB-aligned) buffer can be read, else 4096. Probed once at open, like QEMU's
/// `raw_probe_alignment`; any doubt gives 4096.
pub fn probe_memory_alignment(file: &impl AsRawFd) -> usize {
    let mut buf = AlignedBuf::zeroed(2 * crate::io::aligned::ALIGN);
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
        fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
            let (offset, write) = match request.kind {
                OpKind::Read { offset } => (offset, false),
                OpKind::Write { offset, .. } => (offset, true),
                _ => panic!("only reads and writes here"),
            };
            let iovecs = request.bufs.iovecs();
            if iovecs.iter().any(|v| !(v.iov_base as usize).is_multiple_of(512) || !v.iov_len.is_multiple_of(512)) {
                self.done.push(Completion { request, result: -libc::EINVAL });
                return Ok(());
            }
            let result = request.bufs.transfer(self.file.as_raw_fd(), offset, write, false);
            self.done.push(Completion { request, result });
            Ok(())
        }
        fn submit(&mut self) -> Result<(), IoEngineError> {
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            out.append(&mut self.done);
        }
    }

    fn raw(iov: &[libc::iovec]) -> Buffers {
        // SAFETY: each test keeps the memory alive until the completion was reaped.
        unsafe { Buffers::from_raw(iov.to_vec(), None) }
    }

    fn results(out: &[Completion]) -> Vec<(u64, i32)> {
        out.iter().map(|c| (c.token(), c.result)).collect()
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
        q.push(IoRequest::new(1, OpKind::Write { offset: 4096, dsync: false }, raw(&iov))).unwrap();
        let mut out = Vec::new();
        q.reap(&mut out);
        assert_eq!(results(&out), vec![(1, 1024)]);
        assert_eq!(out[0].request.bufs.iovecs()[0].iov_base, iov[0].iov_base, "the caller's buffers came back");
        let mut back = vec![0u8; 1024];
        file.read_exact_at(&mut back, 4096).unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
        // A read into odd segments gets the data copied back.
        let mut dst = vec![0u8; 2048];
        let iov = [
            libc::iovec { iov_base: dst[3..].as_mut_ptr().cast(), iov_len: 24 },
            libc::iovec { iov_base: dst[27..].as_mut_ptr().cast(), iov_len: 1000 },
        ];
        q.push(IoRequest::new(2, OpKind::Read { offset: 4096 }, raw(&iov))).unwrap();
        out.clear();
        q.reap(&mut out);
        assert_eq!(results(&out), vec![(2, 1024)]);
        drop(out);
        assert!(dst[3..1027].iter().all(|&b| b == 0x5a));
        assert!(dst[..3].iter().chain(&dst[1027..]).all(|&b| b == 0), "bytes outside the segments changed");
        assert!(q.pushed.is_empty());
        // An aligned request reaches the engine with the caller's own iovec.
        let mut out = Vec::new();
        let mut page = AlignedBuf::zeroed(4096);
        let iov = [libc::iovec { iov_base: page.as_mut_ptr().cast(), iov_len: 4096 }];
        q.push(IoRequest::new(3, OpKind::Read { offset: 0 }, raw(&iov))).unwrap();
        q.reap(&mut out);
        assert_eq!(results(&out), vec![(3, 4096)]);
        assert!(q.pushed.is_empty());
        // Two unaligned reads in flight with the same token (a layer above splitting one
        // request) each get their own bytes back.
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&[0x77u8; 512], 8192).unwrap();
        let (mut x, mut y) = (vec![0u8; 600], vec![0u8; 600]);
        let ix = [libc::iovec { iov_base: x[1..].as_mut_ptr().cast(), iov_len: 512 }];
        let iy = [libc::iovec { iov_base: y[3..].as_mut_ptr().cast(), iov_len: 512 }];
        q.push(IoRequest::new(9, OpKind::Read { offset: 4096 }, raw(&ix))).unwrap();
        q.push(IoRequest::new(9, OpKind::Read { offset: 8192 }, raw(&iy))).unwrap();
        out.clear();
        q.reap(&mut out);
        assert_eq!(results(&out), vec![(9, 512), (9, 512)]);
        drop(out);
        assert!(x[1..513].iter().all(|&b| b == 0x5a), "the first read got another's bytes");
        assert!(y[3..515].iter().all(|&b| b == 0x77), "the second read got another's bytes");
        assert!(q.pushed.is_empty());
    }
}
