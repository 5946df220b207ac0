//! The guest's view: each write-type request goes to the local disk and to the secondary; it
//! completes when both halves did.
//!
//! A guest may change a buffer while its write is in flight (Linux and Windows both do, e.g.
//! for pages under writeback). A write is therefore copied out of guest memory once, before
//! anything is submitted, and both halves are written from that copy: the local disk and the
//! secondary always get the same bytes, whatever the guest does to its buffer meanwhile.

use super::*;

/// A block device whose writes are mirrored while the mirror runs.
pub struct MirrorDevice {
    /// The local device.
    pub inner: Arc<dyn BlockDevice>,
    /// The mirror.
    pub mirror: Arc<Mirror>,
}

impl BlockDevice for MirrorDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn check_resize(&self) -> Result<(), crate::block::ResizeError> {
        // The dirty bitmap, the recent-write log, the secondary's buffers and the peer's
        // disk are all sized to this disk once, at start; none of them can follow a resize.
        Err(crate::block::ResizeError::Unsupported(
            "not available with --replication primary or secondary: the replication \
             bitmaps and buffers and the peer's disk keep the size the disk had at start (restart with \
             --replication none to resize)"
                .into(),
        ))
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>, BlockError> {
        let inner = self.inner.open_queue(depth)?;
        let done = DoneQueue::new(inner.notifier()).map_err(|e| BlockError::Engine(IoEngineError::Setup(e)))?;
        Ok(Box::new(MirrorQueue {
            inner,
            mirror: self.mirror.clone(),
            done,
            joins: Vec::new(),
            free: Vec::new(),
            scratch: Vec::new(),
        }))
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn describe(&self) -> String {
        match self.mirror.stage() {
            // A secondary's idle mirror (continuous replication) is not worth mentioning.
            Stage::None => self.inner.describe(),
            s => format!("{} (mirror {})", self.inner.describe(), s.name()),
        }
    }
    fn frontend_starting(&self, dirty_logging: bool) {
        self.mirror.device_started();
        self.inner.frontend_starting(dirty_logging)
    }
    fn frontend_stopped(&self) {
        self.inner.frontend_stopped()
    }
}

struct Join {
    token: u64,
    remaining: u8,
    result: i32,
    /// A forwarded write's range, to check against the resync when it completes locally.
    range: Option<(u64, u64)>,
    /// Clock when it was forwarded.
    since: u64,
    /// Its entry in the verify's write tracker, released when both halves completed.
    ticket: verify::Ticket,
    /// A write's copy of the guest data and the iovec the local write was submitted with
    /// (boxed: it must not move while the local write is in flight).
    copy: Option<(Payload, LocalIov)>,
}

/// The iovec a copied write is submitted with locally; it points into the join's [`Payload`].
struct LocalIov(Box<libc::iovec>);

// SAFETY: the iovec points into an `Arc<Vec<u8>>` owned by the same join, which is only
// touched by the queue's worker; moving both to another thread keeps the pointer valid.
unsafe impl Send for LocalIov {}

struct MirrorQueue {
    inner: Box<dyn BlockQueue>,
    mirror: Arc<Mirror>,
    done: Arc<DoneQueue>,
    joins: Vec<Option<Join>>,
    free: Vec<usize>,
    scratch: Vec<Completion>,
}

/// Internal tokens are slab indexes with this bit, to tell them from pass-through tokens.
const JOINED: u64 = 1 << 63;

impl MirrorQueue {
    fn finish_part(&mut self, idx: usize, result: Option<i32>, out: &mut Vec<Completion>) {
        let Some(Some(j)) = self.joins.get_mut(idx) else { return };
        if let Some(r) = result {
            j.result = r;
            if let Some((off, len)) = j.range {
                self.mirror.local_write_done(off, len, j.since, r < 0);
            }
        }
        j.remaining -= 1;
        if j.remaining == 0 {
            if let Some(j) = self.joins[idx].take() {
                if let Some((off, len)) = j.range {
                    self.mirror.activity_end(off / SECTOR, (off + len).div_ceil(SECTOR));
                }
                self.mirror.verify.tracker.finished(j.ticket);
                out.push(Completion { token: j.token, result: j.result });
            }
            self.free.push(idx);
        }
    }
}

impl Drop for MirrorQueue {
    /// A queue closed with writes still joined (a frontend that vanished) releases their
    /// tracker entries, so a later verify neither waits for them nor treats their sectors
    /// as written forever.
    fn drop(&mut self) {
        for j in self.joins.iter_mut().flatten() {
            self.mirror.verify.tracker.finished(std::mem::replace(&mut j.ticket, verify::Ticket::None));
        }
    }
}

impl BlockQueue for MirrorQueue {
    unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
        let mirrored = self.mirror.running() && !matches!(op, Op::Read { .. });
        if !mirrored {
            // SAFETY: forwarded contract.
            return unsafe { self.inner.push(op, token) };
        }
        let range = match *op {
            Op::Write { offset, iovecs, .. } => Some((offset, iovecs_len(iovecs))),
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => Some((offset, len)),
            Op::Flush | Op::Read { .. } => None,
        };
        // A forwarded write is copied out of guest memory now, once; the local write below
        // and the forwarded one are both written from this copy.
        let copy = match *op {
            Op::Write { iovecs, .. } if Mirror::forwardable(CMD_WRITE, iovecs_len(iovecs)) => {
                // SAFETY: the caller keeps the guest buffers alive until this request's
                // completion is reaped; they are read here, during the call.
                let data = Payload::new(unsafe { AlignedBuf::copy_of(iovecs) });
                let iov = Box::new(libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() });
                Some((data, LocalIov(iov)))
            }
            _ => None,
        };
        let data = copy.as_ref().map(|(d, _)| d.clone());
        // The extents are in the activity log before anything is written (a restart after a
        // crash copies them).
        if let Some((off, len)) = range {
            self.mirror.activity_begin(off / SECTOR, (off + len).div_ceil(SECTOR));
        }
        // Tracked before the local write is submitted and the write forwarded (the verify's
        // ordering rule, see `verify`).
        let ticket = match range {
            Some((off, len)) => self.mirror.verify.tracker.started(off / SECTOR, (off + len).div_ceil(SECTOR)),
            None => verify::Ticket::None,
        };
        let join = Join { token, remaining: 2, result: 0, range, since: self.mirror.now(), copy, ticket };
        let idx = match self.free.pop() {
            Some(i) => {
                self.joins[i] = Some(join);
                i
            }
            None => {
                self.joins.push(Some(join));
                self.joins.len() - 1
            }
        };
        let itoken = JOINED | idx as u64;
        let local = match (self.joins[idx].as_ref().and_then(|j| j.copy.as_ref()), *op) {
            (Some((_, iov)), Op::Write { offset, dsync, .. }) => {
                Op::Write { offset, iovecs: std::slice::from_ref(&*iov.0), dsync }
            }
            _ => *op,
        };
        // SAFETY: a write's iovec and data live in the join, which is dropped only once this
        // token's local completion was reaped (or the push failed); other operations are
        // forwarded under the caller's contract.
        if let Err(e) = unsafe { self.inner.push(&local, itoken) } {
            self.mirror.verify.tracker.finished(ticket);
            self.joins[idx] = None;
            self.free.push(idx);
            if let Some((off, len)) = range {
                self.mirror.activity_end(off / SECTOR, (off + len).div_ceil(SECTOR));
            }
            return Err(e);
        }
        self.mirror.forward(op, data, itoken, &self.done);
        Ok(())
    }
    fn submit(&mut self) -> Result<(), IoEngineError> {
        self.inner.submit()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut local = std::mem::take(&mut self.scratch);
        self.inner.reap(&mut local);
        for c in local.drain(..) {
            if c.token & JOINED != 0 {
                self.finish_part((c.token & !JOINED) as usize, Some(c.result), out);
            } else {
                out.push(c);
            }
        }
        self.done.drain_into(&mut local);
        for c in local.drain(..) {
            self.finish_part((c.token & !JOINED) as usize, None, out);
        }
        self.scratch = local;
    }
    fn notifier(&self) -> Option<std::os::fd::RawFd> {
        Some(self.done.notifier())
    }
    fn clear_notifier(&self) {
        self.done.clear();
        self.inner.clear_notifier();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local queue that, like the kernel, reads a write's buffers only when it performs
    /// it — here at reap time, after the guest changed its buffer.
    #[derive(Default)]
    struct LateQueue {
        queued: Vec<(u64, Vec<libc::iovec>)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    // SAFETY: test-only; the iovecs point into buffers the test keeps alive and only this
    // queue's owner touches them.
    unsafe impl Send for LateQueue {}

    impl BlockQueue for LateQueue {
        unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
            if let Op::Write { iovecs, .. } = *op {
                self.queued.push((token, iovecs.to_vec()));
            }
            Ok(())
        }
        fn submit(&mut self) -> Result<(), IoEngineError> {
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            for (token, iovecs) in self.queued.drain(..) {
                for v in &iovecs {
                    // SAFETY: the push contract keeps them valid until this completion is reaped.
                    let b = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                    lock(&self.written).extend_from_slice(b);
                }
                out.push(Completion { token, result: 0 });
            }
        }
        fn notifier(&self) -> Option<std::os::fd::RawFd> {
            None
        }
        fn clear_notifier(&self) {}
    }

    /// Issue 10 item 8: the local half of a mirrored write is written from the copy taken
    /// at submission, not from guest memory the guest may change while the write is in flight.
    #[test]
    fn local_write_uses_the_copy_taken_at_submission() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let cfg = MirrorConfig { secondary: None, timeout: Duration::from_secs(1), tls: None };
        let mirror = Mirror::new(Arc::new(f), 1 << 20, cfg);
        mirror.set_stage(Stage::Running);
        let written = Arc::new(Mutex::new(Vec::new()));
        let inner = LateQueue { queued: Vec::new(), written: written.clone() };
        let mut q = MirrorQueue {
            inner: Box::new(inner),
            mirror: mirror.clone(),
            done: DoneQueue::new(None).unwrap(),
            joins: Vec::new(),
            free: Vec::new(),
            scratch: Vec::new(),
        };
        let mut guest = vec![0xAAu8; 8192];
        let iov = [
            libc::iovec { iov_base: guest.as_mut_ptr().cast(), iov_len: 4096 },
            libc::iovec { iov_base: guest[4096..].as_mut_ptr().cast(), iov_len: 4096 },
        ];
        // SAFETY: `guest` and `iov` outlive the reap below.
        unsafe { q.push(&Op::Write { offset: 0, iovecs: &iov, dsync: false }, 7) }.unwrap();
        // The guest rewrites its buffer while the write is in flight.
        guest.fill(0x55);
        let mut out = Vec::new();
        q.reap(&mut out);
        assert_eq!(out.len(), 1, "both halves completed (no link: the range went dirty)");
        assert_eq!(out[0].token, 7);
        let w = lock(&written);
        assert_eq!(w.len(), 8192);
        assert!(
            w.iter().all(|&b| b == 0xAA),
            "the local write used guest memory changed after submission, not the copy"
        );
        drop(w);
        // No link: the range is remembered for the resync, which reads the local disk.
        assert_eq!(mirror.dirty.count_all(), 16);
    }
}
