//! The block stack: what a virtqueue worker submits requests to.
//!
//! A [`BlockDevice`] is shared by all queues; each worker thread opens its own [`BlockQueue`]
//! on it (one I/O engine per thread, no lock between queues). In replication mode `none` the
//! stack is just the disk ([`raw::RawDisk`] or [`raw::NullDisk`]); the replication layers
//! (primary mirror, secondary buffers) are further `BlockDevice`s wrapping a disk, wired in at
//! start-up, so the virtio side never changes.

pub mod aligned;
pub mod bitmap;
pub mod bounce;
pub mod extents;
pub mod fault;
pub mod image;
pub mod lock;
pub mod probe;
pub mod qcow2;
pub mod range_lock;
pub mod raw;

use std::io;

pub use crate::io::{Completion, IoEngineError, Op};

/// A per-queue handle on the block stack. It has the shape of an I/O engine: push operations
/// tagged with a token, submit, reap completions, and an optional eventfd that signals them.
pub trait BlockQueue: Send {
    /// Queue one operation.
    ///
    /// # Safety
    /// The buffers and the iovec array referenced by `op` must stay valid until the completion
    /// carrying `token` has been reaped.
    unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError>;
    /// Hand queued operations to the kernel / the next layer.
    fn submit(&mut self) -> Result<(), IoEngineError>;
    /// Move finished operations into `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);
    /// An fd that becomes readable when completions are ready (None: everything completes
    /// by the time `submit` returns).
    fn notifier(&self) -> Option<std::os::fd::RawFd>;
    /// Acknowledge the notifier.
    fn clear_notifier(&self);
}

impl<E: crate::io::IoEngine + ?Sized> BlockQueue for E {
    unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
        // SAFETY: forwarded contract, identical to the engine's.
        unsafe { crate::io::IoEngine::push(self, op, token) }
    }
    fn submit(&mut self) -> Result<(), IoEngineError> {
        crate::io::IoEngine::submit(self)
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        crate::io::IoEngine::reap(self, out)
    }
    fn notifier(&self) -> Option<std::os::fd::RawFd> {
        crate::io::IoEngine::notifier(self)
    }
    fn clear_notifier(&self) {
        crate::io::IoEngine::clear_notifier(self)
    }
}

/// A device in the block stack, shared by every queue worker.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// True when writes must be refused.
    fn read_only(&self) -> bool;
    /// Opens a per-thread queue with room for about `depth` operations in flight.
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>, BlockError>;
    /// Makes every completed write durable, synchronously (used on shutdown).
    fn flush(&self) -> io::Result<()>;
    /// A one-line description for logs and `query-block`.
    fn describe(&self) -> String;
    /// The frontend is (re)starting the device: it just acknowledged its features, and gets
    /// no answer before this returns. `dirty_logging`: it asked for dirty-page logging (live
    /// migration or COLO). The COLO secondary commits a pending checkpoint here.
    fn frontend_starting(&self, _dirty_logging: bool) {}
    /// The frontend stopped a queue (GET_VRING_BASE, after its requests drained) or went
    /// away: the guest is not running on this device until the next start. The COLO
    /// secondary learns here that its VM is loading a checkpoint.
    fn frontend_stopped(&self) {}
    /// Whether [`BlockDevice::resize`] would be refused, without changing anything (checked
    /// before the guest's capacity changes). Layers that cannot change their size refuse
    /// (the default).
    fn check_resize(&self) -> Result<(), ResizeError> {
        Err(ResizeError::Unsupported(format!("{} cannot be resized", self.describe())))
    }
    /// Changes the size to `new_size` bytes (a positive multiple of the logical block size):
    /// a grown image reads as zeroes beyond the old end, a shrunk one loses what lay beyond
    /// the new end. Callers stop I/O beyond the smaller of both sizes first.
    fn resize(&self, _new_size: u64) -> Result<(), ResizeError> {
        self.check_resize()?;
        Err(ResizeError::Unsupported(format!("{} cannot be resized", self.describe())))
    }
}

/// Why a device could not be resized.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// The device was opened read-only (`--readonly`).
    #[error("the disk is read-only")]
    ReadOnly,
    /// A block device's size is fixed by the device itself.
    #[error("{0} is a block device; colo-blk cannot change its size")]
    BlockDevice(String),
    /// This layer of the stack cannot change its size (the message says which and why).
    #[error("{0}")]
    Unsupported(String),
    /// The image file could not be truncated or extended.
    #[error("cannot resize {path}")]
    Io {
        /// The image.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Errors at the block layer's edge.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk could not be opened or created.
    #[error("cannot open disk {path}")]
    Open {
        /// The path given on the command line.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The disk is missing and no `--size` was given to create it.
    #[error("disk {0} does not exist (give --size to create it)")]
    Missing(String),
    /// The disk's size is zero or not a multiple of the logical block size.
    #[error("disk {path} has size {size}, which is not a positive multiple of {block_size}")]
    BadSize {
        /// The disk path.
        path: String,
        /// Its size in bytes.
        size: u64,
        /// The logical block size it must be a multiple of.
        block_size: u32,
    },
    /// The disk must not be served as it is (the message says why and what to do).
    #[error("{0}")]
    Refused(String),
    /// The I/O engine could not be set up.
    #[error("cannot set up I/O for a queue")]
    Engine(#[source] IoEngineError),
}
