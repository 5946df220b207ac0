//! The secondary's copy-before-write overlay: the active and hidden buffers (how each is
//! opened, reached and emptied) and the two sector maps that say what they hold.
//!
//! A VM read resolves each sector active -> hidden -> disk: the active map says the VM wrote
//! it this epoch (its data is in active), the saved map that its pre-epoch data is in hidden.
//! Emptying (a checkpoint) clears both maps and replaces both files (see reclaim.rs).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{SECTOR, SecondaryFiles, reclaim};
use crate::block::bitmap::SectorBitmap;
use crate::block::image::{DirectFile, ImageData};
use crate::block::raw::create_sparse;
use crate::block::{BlockError, IoEngineError};

/// The active and hidden buffers with their sector maps.
pub(super) struct Overlay {
    /// The buffers' paths as given (query-replication, the device's description).
    pub(super) files: SecondaryFiles,
    /// The active buffer: the secondary VM's writes this epoch.
    pub(super) active: BufferFile,
    /// The hidden buffer: the disk's data saved before a primary write overwrote it.
    pub(super) hidden: BufferFile,
    /// Sectors the VM wrote this epoch (their data is in `active`).
    pub(super) active_map: SectorBitmap,
    /// Sectors whose pre-epoch data is in `hidden` (copy-before-write done this epoch).
    pub(super) saved_map: SectorBitmap,
    /// Frees the old files and cleared maps in the background.
    pub(super) reclaimer: reclaim::Reclaimer,
    /// Bumped whenever emptying may have pointed `active`'s descriptor at a fresh file.
    pub(super) active_swaps: AtomicU64,
}

/// One buffer: its descriptor, the way every other path reaches its bytes, and what emptying
/// it needs.
pub(super) struct BufferFile {
    /// The buffer's descriptor (the worker rings register it; a checkpoint may point it at a
    /// fresh file, see `reclaim.rs`).
    pub(super) file: Arc<File>,
    /// The buffer's bytes for every other path (bouncing when it is O_DIRECT).
    pub(super) data: Arc<dyn ImageData>,
    /// The buffer's file system has no non-blocking buffered I/O (tmpfs): io_uring would hand
    /// every request on it to a kernel worker thread, so the worker does its direct reads and
    /// writes of this buffer inline instead (memory copies): the VM's direct active reads and
    /// writes, split VM reads of saved sectors from hidden.
    pub(super) inline: bool,
    /// The buffer's real path and lock, for emptying it by replacement.
    pub(super) reclaim: reclaim::Buffer,
}

/// Where a piece of a VM read is read from while replicating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::replication) enum Source {
    /// The active buffer: the VM wrote these sectors.
    Active,
    /// The hidden buffer: the primary overwrote them this epoch; their old data is here.
    Hidden,
    /// The disk.
    Disk,
}

/// Runs of sectors `[start, end)` of a VM read and where each is read from.
pub(in crate::replication) type Pieces = Vec<(u64, u64, Source)>;

/// Whether `file` serves a non-blocking buffered read (`RWF_NOWAIT`), which io_uring needs to
/// complete a cached read without a kernel worker thread.
fn supports_nowait(file: &File) -> bool {
    let mut byte = [0u8; 1];
    let iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: one iovec naming a live local byte; reads at most that byte.
    let r = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
    r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EOPNOTSUPP)
}

/// Opens (creating it sparse when missing) a buffer; with `direct`, `O_DIRECT` where the
/// file system has it. Returns whether it is `O_DIRECT`.
fn open_buffer(path: &Path, size: u64, direct: bool) -> Result<(File, bool), BlockError> {
    let err = |source| BlockError::Open { path: path.display().to_string(), source };
    if !path.exists() {
        create_sparse(path, size).map_err(err)?;
        log::info!("created sparse buffer {} of {size} bytes", path.display());
    }
    if direct {
        match OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, true)),
            // tmpfs has no O_DIRECT; the buffer then uses the page cache, as QEMU's
            // `cache.direct=on` cannot even open it there.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => log::warn!(
                "{}: the file system does not support O_DIRECT; this buffer uses the page cache",
                path.display()
            ),
            Err(e) => return Err(err(e)),
        }
    }
    Ok((OpenOptions::new().read(true).write(true).open(path).map_err(err)?, false))
}

fn file_len(f: &File) -> io::Result<u64> {
    let m = f.metadata()?;
    if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) {
        let mut f2 = f.try_clone()?;
        io::Seek::seek(&mut f2, io::SeekFrom::End(0))
    } else {
        Ok(m.len())
    }
}

impl Overlay {
    /// Opens the buffers (creating them sparse with the disk's `size` when missing), locks
    /// them, and starts the reclaimer; both maps start empty.
    pub(super) fn open(files: SecondaryFiles, size: u64) -> Result<Overlay, BlockError> {
        let direct = files.direct;
        // With `--direct` the buffers are O_DIRECT too; every path but the worker's ring
        // reaches them through a bouncing `DirectFile` (NBD requests, copies and guest buffers
        // may be unaligned), and the ring's unaligned requests are redone on that path.
        let (active, active_direct) = open_buffer(&files.active, size, direct)?;
        let (hidden, hidden_direct) = open_buffer(&files.hidden, size, direct)?;
        let (active, hidden) = (Arc::new(active), Arc::new(hidden));
        let data = |f: &Arc<File>, direct: bool| -> Arc<dyn ImageData> {
            if direct { Arc::new(DirectFile::over(f.clone())) } else { f.clone() }
        };
        let (active_data, hidden_data) = (data(&active, active_direct), data(&hidden, hidden_direct));
        let active_inline = !supports_nowait(&active);
        let hidden_inline = !supports_nowait(&hidden);
        if active_inline {
            log::info!(
                "{}: the file system cannot serve io_uring without a thread hop (no RWF_NOWAIT, e.g. tmpfs); \
                 the VM's direct I/O on the active buffer runs inline on its queue's thread",
                files.active.display()
            );
        }
        let active_buf =
            reclaim::Buffer::new(&active, &files.active).map_err(|e| BlockError::Refused(format!("--active: {e}")))?;
        let hidden_buf =
            reclaim::Buffer::new(&hidden, &files.hidden).map_err(|e| BlockError::Refused(format!("--hidden: {e}")))?;
        let reclaimer = reclaim::Reclaimer::new().map_err(|e| BlockError::Engine(IoEngineError::Setup(e)))?;
        let sectors = size / SECTOR;
        Ok(Overlay {
            files,
            active: BufferFile { file: active, data: active_data, inline: active_inline, reclaim: active_buf },
            hidden: BufferFile { file: hidden, data: hidden_data, inline: hidden_inline, reclaim: hidden_buf },
            active_map: SectorBitmap::new(sectors),
            saved_map: SectorBitmap::new(sectors),
            reclaimer,
            active_swaps: AtomicU64::new(0),
        })
    }

    /// Whether both buffers are `size` bytes long.
    pub(super) fn lengths_are(&self, size: u64) -> bool {
        let ok = |f: &File| file_len(f).is_ok_and(|l| l == size);
        ok(&self.active.file) && ok(&self.hidden.file)
    }

    /// Clears both maps (saved first: that re-arms copy-before-write), their memory freed in
    /// the background.
    pub(super) fn clear_maps(&self) {
        self.reclaimer.free_bits(self.saved_map.take_all());
        self.reclaimer.free_bits(self.active_map.take_all());
    }

    /// Empties both buffers of `size` bytes and clears their bitmaps. Callers hold the gate
    /// closed.
    pub(super) fn empty(&self, size: u64) -> io::Result<()> {
        // Re-arm copy-before-write first, as QEMU does, then drop active, then hidden.
        self.clear_maps();
        let emptied = self
            .reclaimer
            .empty(&self.active.file, &self.active.reclaim, size)
            .and_then(|()| self.reclaimer.empty(&self.hidden.file, &self.hidden.reclaim, size));
        // Either descriptor may name a fresh file now: rings that registered them re-register
        // (bumped once both are done; rings use them only while the gate is open again).
        self.active_swaps.fetch_add(1, Ordering::AcqRel);
        emptied
    }

    /// After a failover commit merged them into the disk: reclaims both buffers' space (their
    /// maps are clear already); a failure leaves the space used, nothing else.
    pub(super) fn reclaim_merged(&self, size: u64) {
        let _ = self.reclaimer.empty(&self.active.file, &self.active.reclaim, size);
        self.active_swaps.fetch_add(1, Ordering::AcqRel);
        let _ = self.reclaimer.empty(&self.hidden.file, &self.hidden.reclaim, size);
    }

    /// How many times the active buffer's descriptor may have been pointed at a fresh file.
    pub(super) fn active_swaps(&self) -> u64 {
        self.active_swaps.load(Ordering::Acquire)
    }

    /// Syncs both buffers (active, then hidden).
    pub(super) fn sync_data(&self) -> io::Result<()> {
        self.active.file.sync_data()?;
        self.hidden.file.sync_data()
    }

    /// Where each run of sectors of [s0, s1) is read from: active if the VM wrote it, else
    /// hidden if it was saved, else the disk.
    pub(super) fn pieces(&self, s0: u64, s1: u64) -> Pieces {
        let mut pieces = Vec::new();
        for (a, b, in_active) in self.active_map.runs(s0, s1) {
            if in_active {
                pieces.push((a, b, Source::Active));
            } else {
                for (c, d, saved) in self.saved_map.runs(a, b) {
                    pieces.push((c, d, if saved { Source::Hidden } else { Source::Disk }));
                }
            }
        }
        pieces
    }

    /// Whether every piece still lies where [`Overlay::pieces`] said it did.
    pub(super) fn pieces_unmoved(&self, pieces: &[(u64, u64, Source)]) -> bool {
        pieces.iter().all(|&(a, b, source)| match source {
            Source::Active => self.active_map.all(a, b),
            Source::Hidden => self.saved_map.all(a, b) && !self.active_map.any(a, b),
            Source::Disk => !self.saved_map.any(a, b) && !self.active_map.any(a, b),
        })
    }
}
