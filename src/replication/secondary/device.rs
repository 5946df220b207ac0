//! The secondary VM's view: the block device behind vhost-user, its requests run on the pool.

use super::*;

/// The block device the secondary VM's queues submit to.
pub struct SecondaryDevice(pub Arc<Secondary>);

impl BlockDevice for SecondaryDevice {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>, BlockError> {
        let inner = self.0.disk.open_queue(depth)?;
        let done = DoneQueue::new(inner.notifier()).map_err(|e| BlockError::Engine(IoEngineError::Setup(e)))?;
        // A ring on the active buffer for direct reads of sectors the VM wrote, signalling the
        // disk queue's eventfd (the worker watches that one). Without an io_uring disk queue
        // those reads take the buffer path.
        let active_ring = inner.notifier().and_then(|fd| {
            // SAFETY: dup of a live eventfd; the new descriptor is owned by the EventFd.
            let dup = unsafe { libc::dup(fd) };
            if dup < 0 {
                return None;
            }
            // SAFETY: `dup` is a fresh descriptor nobody else owns.
            let eventfd = unsafe { <vmm_sys_util::eventfd::EventFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
            crate::io::uring::UringEngine::with_files(vec![self.0.active.clone()], depth, eventfd).ok()
        });
        Ok(Box::new(SecondaryQueue {
            sec: self.0.clone(),
            inner,
            done,
            active_ring,
            active_swaps: self.0.active_swaps(),
            direct: Vec::new(),
            free: Vec::new(),
            scratch: Vec::new(),
        }))
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush_all()
    }
    fn frontend_starting(&self, dirty_logging: bool) {
        // QEMU restarts the secondary's device with logging on right after loading a COLO
        // checkpoint; at failover it restarts it with logging off, and then nothing commits.
        self.0.colo_frontend_starting(dirty_logging);
    }
    fn frontend_stopped(&self) {
        self.0.colo_device_stopped();
    }
    fn describe(&self) -> String {
        format!(
            "{} (secondary; active {}, hidden {})",
            self.0.disk.describe(),
            self.0.files.active.display(),
            self.0.files.hidden.display()
        )
    }
}

/// A worker's queue: while replicating, a VM read none of whose sectors is in a buffer goes
/// to the disk's own (io_uring) queue, one all of whose sectors are in the active buffer to
/// a ring on the active file, and either is checked when it completes; every other request
/// runs synchronously through the buffer logic on the pool. Once the stage is done every
/// request goes to the disk's queue.
struct SecondaryQueue {
    sec: Arc<Secondary>,
    inner: Box<dyn BlockQueue>,
    done: Arc<DoneQueue>,
    /// io_uring on the active buffer (file 0), or None (buffer path only).
    active_ring: Option<crate::io::uring::UringEngine>,
    /// [`Secondary::active_swaps`] when the ring last registered the active descriptor.
    active_swaps: u64,
    /// Direct reads in flight, by slab index (their inner token is `DIRECT | index`).
    direct: Vec<Option<DirectRead>>,
    free: Vec<usize>,
    scratch: Vec<Completion>,
}

/// A VM read sent straight to the disk's queue or the active buffer's ring.
struct DirectRead {
    token: u64,
    sectors: (u64, u64),
    generation: u64,
    /// Read from the active buffer (else from the disk).
    active: bool,
    /// To redo it on the buffer path; the worker keeps its iovecs alive until `token`
    /// completes.
    op: SendOp,
}

/// Marks the inner tokens of direct reads. The worker's own tokens are slot numbers and the
/// mirror above sets only bit 63, so bit 62 is free.
const DIRECT: u64 = 1 << 62;

impl SecondaryQueue {
    /// Makes the active ring's file entry name the active buffer's current file (a
    /// checkpoint may have swapped it for a fresh one); false if that failed.
    fn active_ring_current(&mut self) -> bool {
        let swaps = self.sec.active_swaps();
        let Some(ring) = &mut self.active_ring else { return false };
        if swaps == self.active_swaps {
            return true;
        }
        match ring.replace_file(0, self.sec.active.clone()) {
            Ok(()) => {
                self.active_swaps = swaps;
                true
            }
            Err(e) => {
                log::warn!("cannot register the fresh active buffer with a worker's ring: {e}");
                self.active_ring = None;
                false
            }
        }
    }

    /// Runs `op` on the pool (the buffer path); its completion comes through `done`.
    fn spawn(&self, op: SendOp, token: u64) -> Result<(), IoEngineError> {
        let sec = self.sec.clone();
        let task = Box::new(move || {
            // SAFETY: the worker keeps the iovecs and buffers alive until it reaps this
            // token's completion, which the pool queues only after the task returned.
            unsafe { op.with(|op| sec.vm_execute(op)) }
        });
        if self.sec.pool.spawn(task, token, &self.done) { Ok(()) } else { Err(IoEngineError::QueueFull) }
    }
}

impl BlockQueue for SecondaryQueue {
    unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
        if self.sec.stage() == Stage::Done {
            // SAFETY: forwarded contract.
            return unsafe { self.inner.push(op, token) };
        }
        if let Op::Read { offset, iovecs } = *op {
            let (s0, s1) = Secondary::sectors(offset, crate::io::iovecs_len(iovecs));
            let route = match self.sec.direct_read_start(s0, s1) {
                Some(g) => Some((g, false)),
                None if self.active_ring.is_some() => self.sec.direct_active_read_start(s0, s1).map(|g| (g, true)),
                None => None,
            };
            if let Some((generation, active)) = route {
                if active && !self.active_ring_current() {
                    return self.spawn(SendOp::new(op), token);
                }
                let read = DirectRead { token, sectors: (s0, s1), generation, active, op: SendOp::new(op) };
                let index = match self.free.pop() {
                    Some(i) => {
                        self.direct[i] = Some(read);
                        i
                    }
                    None => {
                        self.direct.push(Some(read));
                        self.direct.len() - 1
                    }
                };
                let pushed = match (&mut self.active_ring, active) {
                    // SAFETY: forwarded contract (the same op, buffers alive until completion).
                    (Some(ring), true) => unsafe { ring.push_to(0, op, DIRECT | index as u64) },
                    // SAFETY: as above.
                    _ => unsafe { self.inner.push(op, DIRECT | index as u64) },
                };
                match pushed {
                    Ok(()) => return Ok(()),
                    Err(_) => {
                        // The ring is full: the buffer path takes it.
                        self.direct[index] = None;
                        self.free.push(index);
                    }
                }
            }
        }
        self.spawn(SendOp::new(op), token)
    }
    fn submit(&mut self) -> Result<(), IoEngineError> {
        if let Some(ring) = &mut self.active_ring {
            crate::io::IoEngine::submit(ring)?;
        }
        self.inner.submit()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.done.drain_into(out);
        let mut scratch = std::mem::take(&mut self.scratch);
        if let Some(ring) = &mut self.active_ring {
            crate::io::IoEngine::reap(ring, &mut scratch);
        }
        self.inner.reap(&mut scratch);
        for c in scratch.drain(..) {
            if c.token & DIRECT == 0 {
                out.push(c);
                continue;
            }
            let index = (c.token & !DIRECT) as usize;
            let Some(read) = self.direct.get_mut(index).and_then(Option::take) else { continue };
            self.free.push(index);
            let (s0, s1) = read.sectors;
            // A failed direct read is redone too: an O_DIRECT read of a guest buffer that is
            // not aligned fails where the buffer path (page cache) succeeds; a real disk
            // error fails again there and is answered then.
            let valid = if read.active {
                self.sec.direct_active_read_valid(s0, s1, read.generation)
            } else {
                self.sec.direct_read_valid(s0, s1, read.generation)
            };
            if c.result >= 0 && valid {
                out.push(Completion { token: read.token, result: c.result });
            } else if self.spawn(read.op, read.token).is_err() {
                out.push(Completion { token: read.token, result: -libc::EIO });
            }
        }
        self.scratch = scratch;
    }
    fn notifier(&self) -> Option<RawFd> {
        Some(self.done.notifier())
    }
    fn clear_notifier(&self) {
        self.done.clear();
        self.inner.clear_notifier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::server::NbdExport;
    use crate::replication::ReplicationControl;

    /// A disk queue whose reads happen late: the bytes are read from the file only when the
    /// completion is reaped, as a slow device would, so a test can let a primary write land
    /// in between.
    struct LateReads {
        disk: Arc<dyn crate::block::image::ImageData>,
        held: Vec<(u64, u64, libc::iovec)>,
    }

    // SAFETY: the iovec points into the test's buffer, alive for the whole test.
    unsafe impl Send for LateReads {}

    impl BlockQueue for LateReads {
        unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
            let Op::Read { offset, iovecs } = *op else { panic!("only reads reach the disk here") };
            self.held.push((token, offset, iovecs[0]));
            Ok(())
        }
        fn submit(&mut self) -> Result<(), IoEngineError> {
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            for (token, offset, iov) in self.held.drain(..) {
                // SAFETY: the test's buffer is alive.
                let result = unsafe { self.disk.transfer(offset, &[iov], false, false) };
                out.push(Completion { token, result });
            }
        }
        fn notifier(&self) -> Option<RawFd> {
            None
        }
        fn clear_notifier(&self) {}
    }

    fn setup(dir: &std::path::Path) -> (Arc<Secondary>, SecondaryQueue) {
        let s = super::super::tests::secondary(dir, 1 << 20);
        let inner = Box::new(LateReads { disk: s.file.clone(), held: Vec::new() });
        let q = SecondaryQueue {
            sec: s.clone(),
            active_ring: None,
            active_swaps: 0,
            inner,
            done: DoneQueue::new(None).unwrap(),
            direct: Vec::new(),
            free: Vec::new(),
            scratch: Vec::new(),
        };
        (s, q)
    }

    /// Reaps until `token` completes (the redo runs on a pool thread).
    fn wait_for(q: &mut SecondaryQueue, token: u64) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        loop {
            q.reap(&mut out);
            if let Some(c) = out.iter().find(|c| c.token == token) {
                return c.result;
            }
            assert!(Instant::now() < deadline, "token {token} never completed");
            std::thread::yield_now();
        }
    }

    /// A direct read overtaken by a primary write to its sectors (copy-before-write, then the
    /// new data on the disk) must not answer with the new data: it is redone on the buffer
    /// path, which reads the saved old data from hidden.
    #[test]
    fn a_direct_read_overtaken_by_a_primary_write_is_redone_from_the_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let (s, mut q) = setup(dir.path());
        let mut buf = vec![0u8; 4096];
        let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: 4096 }];
        // SAFETY: `buf` and `iov` outlive the completion, reaped below.
        unsafe { q.push(&Op::Read { offset: 0, iovecs: &iov }, 7) }.unwrap();
        assert_eq!(q.direct.iter().flatten().count(), 1, "the read did not go to the disk's queue");
        SecondaryExport(s.clone()).write(0, &[0x22u8; 4096], false).unwrap();
        assert_eq!(wait_for(&mut q, 7), 4096);
        assert!(buf.iter().all(|&b| b == 0x11), "the VM read saw the primary's next-epoch data");
        assert_eq!(s.direct_retries.load(Ordering::Relaxed), 1);

        // A read of untouched sectors completes directly.
        // SAFETY: as above.
        unsafe { q.push(&Op::Read { offset: 65536, iovecs: &iov }, 8) }.unwrap();
        assert_eq!(wait_for(&mut q, 8), 4096);
        assert_eq!(s.direct_reads.load(Ordering::Relaxed), 1);
        // Sectors in a buffer never go direct.
        // SAFETY: as above.
        unsafe { q.push(&Op::Read { offset: 0, iovecs: &iov }, 9) }.unwrap();
        assert_eq!(q.direct.iter().flatten().count(), 0);
        assert_eq!(wait_for(&mut q, 9), 4096);
        assert!(buf.iter().all(|&b| b == 0x11));
    }

    /// A checkpoint overlapping a direct read makes it redo (the generation changed).
    #[test]
    fn a_direct_read_overlapping_a_checkpoint_is_redone() {
        let dir = tempfile::tempdir().unwrap();
        let (s, mut q) = setup(dir.path());
        let mut buf = vec![0u8; 4096];
        let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: 4096 }];
        // SAFETY: `buf` and `iov` outlive the completion, reaped below.
        unsafe { q.push(&Op::Read { offset: 8192, iovecs: &iov }, 1) }.unwrap();
        SecondaryControl(s.clone()).checkpoint(None).unwrap();
        assert_eq!(wait_for(&mut q, 1), 4096);
        assert_eq!(s.direct_retries.load(Ordering::Relaxed), 1);
        assert!(buf.iter().all(|&b| b == 0x11));
    }
}
