//! The COLO "stop hook": a tiny NBD export that the primary QEMU opens as a block node
//! attached to no device (`-blockdev driver=nbd,...,export=hook`). QEMU flushes every block
//! node whenever it stops the VM — for a COLO checkpoint that is after the vhost device was
//! stopped (so every guest write completed here, mirrored included) and before any VM state
//! is sent. Its FLUSH is therefore the exact moment to send the checkpoint barrier to the
//! secondary. The export holds no data: reads return zeroes, writes are dropped.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Mirror;
use crate::nbd::NbdExport;
use crate::replication::Stage;

/// The export name QEMU must ask for.
pub const HOOK_EXPORT: &str = "hook";
/// Size of the hook export (QEMU needs a non-empty device; nothing is stored).
const HOOK_SIZE: u64 = 1 << 20;

/// The hook export of a primary.
pub struct ColoHook(pub Arc<Mirror>);

impl NbdExport for ColoHook {
    fn size(&self) -> u64 {
        HOOK_SIZE
    }

    fn read(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> io::Result<()> {
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.0.hook_flush();
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_trim: bool) -> io::Result<()> {
        Ok(())
    }
}

impl Mirror {
    /// QEMU stopped the VM: send a checkpoint barrier if mirroring. Never fails QEMU's flush:
    /// the barrier is bounded by the link timeout (QEMU holds its global lock meanwhile), and
    /// a failed barrier is an error of the link, which `query-replication` reports.
    ///
    /// One VM stop may flush the hook more than once (QEMU flushes again when a node is
    /// closed, and a stop from an already stopped state flushes too). A flush is a new
    /// checkpoint only if the VM ran in between: its device restarted or it wrote something.
    /// Otherwise the secondary would take a repeated flush for a second checkpoint and
    /// commit the first one before it was loaded.
    fn hook_flush(&self) {
        self.stats.hook_flushes.fetch_add(1, Ordering::Relaxed);
        if self.stage() != Stage::Running {
            log::info!("VM stop hook: replication not running, no barrier");
            return;
        }
        let ops = self.stats.forwarded_ops.load(Ordering::Acquire);
        let started = self.stats.started_since_barrier.load(Ordering::Acquire);
        let first = self.stats.barriers.load(Ordering::Acquire) == 0;
        if !first && !started && ops == self.stats.ops_at_barrier.load(Ordering::Acquire) {
            log::info!("VM stop hook: the VM did not run since the last barrier, no new barrier");
            return;
        }
        match self.barrier() {
            Ok(_) => {
                self.stats.started_since_barrier.store(false, Ordering::Release);
                self.stats.ops_at_barrier.store(ops, Ordering::Release);
            }
            Err(e) => self.record_error(format!("checkpoint barrier at VM stop failed: {e}")),
        }
    }

    /// The VM's device (re)started: the VM resumed.
    pub fn device_started(&self) {
        self.stats.started_since_barrier.store(true, Ordering::Release);
    }
}
