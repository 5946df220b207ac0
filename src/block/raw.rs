//! The bottom of the stack: a raw image file or block device, or the null device.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BlockDevice, BlockError, BlockQueue, ResizeError, WorkerCompletions};
use crate::io::null::NullEngine;
use crate::io::sync::SyncEngine;
use crate::io::uring::UringEngine;

/// Which engine queues use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring, falling back to sync with a warning if the kernel refuses it.
    Uring,
    /// Blocking syscalls in the worker thread.
    Sync,
}

/// How to open a raw disk.
#[derive(Debug, Clone)]
pub struct RawOptions {
    /// Path of the image file or block device.
    pub path: PathBuf,
    /// Create a sparse image of this size when the path does not exist.
    pub create_size: Option<u64>,
    /// Open read-only.
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// Logical block size the size must be a multiple of.
    pub block_size: u32,
    /// The engine to use.
    pub engine: EngineKind,
}

/// A raw image file or block device.
#[derive(Debug)]
pub struct RawDisk {
    file: Arc<File>,
    path: PathBuf,
    /// Changes only through `block_resize` ([`BlockDevice::resize`]).
    size: AtomicU64,
    /// A block device (its size cannot be changed here).
    block_device: bool,
    read_only: bool,
    direct: bool,
    /// With `direct`: the memory alignment `O_DIRECT` needs (probed at open); requests whose
    /// buffers miss it are bounced (`block::bounce`).
    mem_align: usize,
    engine: EngineKind,
}

impl RawDisk {
    /// Opens (or creates, sparse, when `create_size` is set and the path is missing) the disk.
    pub fn open(opts: &RawOptions) -> Result<Self, BlockError> {
        let path_str = opts.path.display().to_string();
        let open_err = |source| BlockError::Open { path: path_str.clone(), source };
        let exists = opts.path.exists();
        if !exists && opts.create_size.is_none() {
            return Err(BlockError::Missing(path_str));
        }
        if !exists && opts.read_only {
            return Err(open_err(io::Error::new(io::ErrorKind::NotFound, "a read-only disk must exist")));
        }
        if let (false, Some(size)) = (exists, opts.create_size) {
            create_sparse(&opts.path, size).map_err(open_err)?;
            log::info!("created sparse image {} of {} bytes", path_str, size);
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let mut file = oo.open(&opts.path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device { file.seek(SeekFrom::End(0)).map_err(open_err)? } else { meta.len() };
        if size == 0 || size % u64::from(opts.block_size) != 0 {
            return Err(BlockError::BadSize { path: path_str, size, block_size: opts.block_size });
        }
        let mem_align = if opts.direct { super::bounce::probe_memory_alignment(&file) } else { 1 };
        Ok(RawDisk {
            mem_align,
            file: Arc::new(file),
            path: opts.path.clone(),
            size: AtomicU64::new(size),
            block_device,
            read_only: opts.read_only,
            direct: opts.direct,
            engine: opts.engine,
        })
    }
}

impl RawDisk {
    /// The open file (shared with the I/O engines).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disk's bytes for the replication paths: with `--direct` an `O_DIRECT` descriptor
    /// that bounces unaligned requests ([`super::image::DirectFile`]), so the cache mode holds
    /// there too; otherwise the disk's own file.
    pub fn data(&self) -> io::Result<Arc<dyn super::image::ImageData>> {
        if self.direct {
            Ok(Arc::new(super::image::DirectFile::open(&self.path, !self.read_only)?))
        } else {
            Ok(self.file.clone())
        }
    }
}

/// Creates a sparse file of `size` bytes; fails if the path exists.
pub fn create_sparse(path: &Path, size: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.set_len(size)
}

impl BlockDevice for RawDisk {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn check_resize(&self) -> Result<(), ResizeError> {
        if self.read_only {
            return Err(ResizeError::ReadOnly);
        }
        if self.block_device {
            return Err(ResizeError::BlockDevice(self.path.display().to_string()));
        }
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<(), ResizeError> {
        self.check_resize()?;
        // Growing leaves a hole (sparse, reads as zeroes); shrinking drops the tail. The
        // O_DIRECT descriptor is fine for ftruncate.
        self.file
            .set_len(new_size)
            .map_err(|source| ResizeError::Io { path: self.path.display().to_string(), source })?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn open_queue(&self, depth: u32, completions: &Arc<WorkerCompletions>) -> Result<Box<dyn BlockQueue>, BlockError> {
        let engine: Box<dyn BlockQueue> = match self.engine {
            EngineKind::Uring => match UringEngine::new(self.file.clone(), depth, completions) {
                Ok(e) => Box::new(e),
                Err(e) => {
                    log::warn!("io_uring unavailable ({e}), using the sync engine");
                    Box::new(SyncEngine::new(self.file.clone()))
                }
            },
            EngineKind::Sync => Box::new(SyncEngine::new(self.file.clone())),
        };
        if self.direct { Ok(Box::new(super::bounce::BounceQueue::new(engine, self.mem_align))) } else { Ok(engine) }
    }

    fn ring_file(&self) -> Option<Arc<File>> {
        (self.engine == EngineKind::Uring).then(|| self.file.clone())
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only { Ok(()) } else { self.file.sync_data() }
    }

    fn describe(&self) -> String {
        format!(
            "{} (raw, {} bytes{}{})",
            self.path.display(),
            self.size(),
            if self.read_only { ", read-only" } else { "" },
            if self.direct { ", O_DIRECT" } else { "" }
        )
    }
}

/// A device that stores nothing: reads leave buffers untouched, writes vanish.
#[derive(Debug)]
pub struct NullDisk {
    size: AtomicU64,
    read_only: bool,
}

impl NullDisk {
    /// A null device of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> Self {
        NullDisk { size: AtomicU64::new(size), read_only }
    }
}

impl BlockDevice for NullDisk {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn check_resize(&self) -> Result<(), ResizeError> {
        if self.read_only { Err(ResizeError::ReadOnly) } else { Ok(()) }
    }
    fn resize(&self, new_size: u64) -> Result<(), ResizeError> {
        self.check_resize()?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn open_queue(
        &self,
        _depth: u32,
        _completions: &Arc<WorkerCompletions>,
    ) -> Result<Box<dyn BlockQueue>, BlockError> {
        Ok(Box::new(NullEngine::default()))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        format!("null ({} bytes)", self.size())
    }
}
