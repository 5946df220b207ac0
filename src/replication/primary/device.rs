//! The guest's view: each write-type request goes to the local disk and to the secondary; it
//! completes when both halves did.

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
}

struct Join {
    token: u64,
    remaining: u8,
    result: i32,
    /// A forwarded write's range, to check against the resync when it completes locally.
    range: Option<(u64, u64)>,
    /// Clock when it was forwarded.
    since: u64,
}

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
                self.mirror.local_write_done(off, len, j.since);
            }
        }
        j.remaining -= 1;
        if j.remaining == 0 {
            if let Some(j) = self.joins[idx].take() {
                out.push(Completion { token: j.token, result: j.result });
            }
            self.free.push(idx);
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
        let join = Join { token, remaining: 2, result: 0, range, since: self.mirror.now() };
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
        // SAFETY: forwarded contract.
        if let Err(e) = unsafe { self.inner.push(op, itoken) } {
            self.joins[idx] = None;
            self.free.push(idx);
            return Err(e);
        }
        self.mirror.forward(op, itoken, &self.done);
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
