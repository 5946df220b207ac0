//! The block stack: what a virtqueue worker submits requests to.
//!
//! A [`BlockDevice`] is shared by all queues; each worker thread opens its own [`BlockQueue`]
//! on it (one I/O engine per thread, no lock between queues). In replication mode `none` the
//! stack is just the disk ([`raw::RawDisk`] or [`raw::NullDisk`]); the replication layers
//! (primary mirror, secondary buffers) are further `BlockDevice`s wrapping a disk, wired in at
//! start-up, so the virtio side never changes.

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

use std::sync::Arc;

pub use crate::io::{
    Buffers, Completion, IoEngine as BlockQueue, IoEngineError, IoRequest, Lane, Op, OpKind, Rejected,
    WorkerCompletions,
};

/// A device in the block stack, shared by every queue worker.
///
/// A layer that wraps another names it in [`BlockDevice::below`]; every method except
/// `open_queue` then passes through to it unless the layer overrides it, so a layer writes
/// only what it changes. A device at the bottom of the stack implements `size`, `flush`,
/// `describe` (and resizing, if it can) itself.
pub trait BlockDevice: Send + Sync {
    /// The device this one wraps, if any.
    fn below(&self) -> Option<&dyn BlockDevice> {
        None
    }
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64 {
        self.below().map_or(0, |b| b.size())
    }
    /// True when writes must be refused.
    fn read_only(&self) -> bool {
        self.below().is_some_and(|b| b.read_only())
    }
    /// Opens a per-worker queue with room for about `depth` operations in flight; its
    /// completions wake the worker through `completions` (rings register its eventfd, other
    /// threads post on a lane of it).
    fn open_queue(&self, depth: u32, completions: &Arc<WorkerCompletions>) -> Result<Box<dyn BlockQueue>, BlockError>;
    /// The file a layer above may address on an io_uring of its own for plain reads and
    /// writes at guest offsets (a raw image on the io_uring engine): lets such a layer put
    /// this device's file and its own in one ring per worker. With `--direct` the file is
    /// `O_DIRECT`, so a request whose buffers are not aligned fails there with `EINVAL` and
    /// must be redone on [`BlockDevice::open_queue`]'s queue, which bounces.
    fn ring_file(&self) -> Option<Arc<std::fs::File>> {
        None
    }
    /// Makes every completed write durable, synchronously (used on shutdown).
    fn flush(&self) -> io::Result<()> {
        self.below().map_or(Ok(()), |b| b.flush())
    }
    /// A one-line description for logs and `query-block`.
    fn describe(&self) -> String {
        self.below().map_or_else(String::new, |b| b.describe())
    }
    /// The frontend is (re)starting the device: it just acknowledged its features, and gets
    /// no answer before this returns. `dirty_logging`: it asked for dirty-page logging (live
    /// migration or COLO). The COLO secondary commits a pending checkpoint here.
    fn frontend_starting(&self, dirty_logging: bool) {
        if let Some(b) = self.below() {
            b.frontend_starting(dirty_logging)
        }
    }
    /// The frontend stopped a queue (GET_VRING_BASE, after its requests drained) or went
    /// away: the guest is not running on this device until the next start. The COLO
    /// secondary learns here that its VM is loading a checkpoint.
    fn frontend_stopped(&self) {
        if let Some(b) = self.below() {
            b.frontend_stopped()
        }
    }
    /// Whether [`BlockDevice::resize`] would be refused, without changing anything (checked
    /// before the guest's capacity changes). A device that cannot change its size refuses
    /// (the default at the bottom of the stack).
    fn check_resize(&self) -> Result<(), ResizeError> {
        match self.below() {
            Some(b) => b.check_resize(),
            None => Err(ResizeError::Unsupported(format!("{} cannot be resized", self.describe()))),
        }
    }
    /// Changes the size to `new_size` bytes (a positive multiple of the logical block size):
    /// a grown image reads as zeroes beyond the old end, a shrunk one loses what lay beyond
    /// the new end. Callers stop I/O beyond the smaller of both sizes first.
    fn resize(&self, new_size: u64) -> Result<(), ResizeError> {
        self.check_resize()?;
        match self.below() {
            Some(b) => b.resize(new_size),
            None => Err(ResizeError::Unsupported(format!("{} cannot be resized", self.describe()))),
        }
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
