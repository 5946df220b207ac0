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
        Ok(Box::new(SecondaryQueue { sec: self.0.clone(), inner, done }))
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

/// A worker's queue: while replicating, requests run synchronously through the buffer logic;
/// once the stage is done they go to the disk's own (io_uring) queue.
struct SecondaryQueue {
    sec: Arc<Secondary>,
    inner: Box<dyn BlockQueue>,
    done: Arc<DoneQueue>,
}

impl BlockQueue for SecondaryQueue {
    unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
        if self.sec.stage() == Stage::Done {
            // SAFETY: forwarded contract.
            return unsafe { self.inner.push(op, token) };
        }
        let op = SendOp::new(op);
        let sec = self.sec.clone();
        let task = Box::new(move || {
            // SAFETY: the worker keeps the iovecs and buffers alive until it reaps this
            // token's completion, which the pool queues only after the task returned.
            unsafe { op.with(|op| sec.vm_execute(op)) }
        });
        if self.sec.pool.spawn(task, token, &self.done) { Ok(()) } else { Err(IoEngineError::QueueFull) }
    }
    fn submit(&mut self) -> Result<(), IoEngineError> {
        self.inner.submit()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.done.drain_into(out);
        self.inner.reap(out);
    }
    fn notifier(&self) -> Option<RawFd> {
        Some(self.done.notifier())
    }
    fn clear_notifier(&self) {
        self.done.clear();
        self.inner.clear_notifier()
    }
}
