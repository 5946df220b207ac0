//! The files under a qcow2 image as imago sees them.
//!
//! imago reads and writes metadata (and, on its slow paths, data) through its `Storage` trait.
//! colo-blk implements that trait itself instead of using imago's own file driver so that each
//! file of the chain carries its index in the worker rings' registered-file table: when imago
//! maps a guest range to `Mapping::Raw { storage, offset }`, the queue knows at once which ring
//! file to read or write, without a lookup.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::PreallocateMode;
use imago::storage::drivers::CommonStorageHelper;
use imago::{Storage, StorageOpenOptions};

use crate::block::bounce::probe_memory_alignment;
use crate::io::aligned::AlignedBuf;
use crate::io::sync::fallocate_with_fallback;
use crate::io::{Buffers, Op};

/// One file of an image chain (the qcow2 file itself, a backing image, an external data file).
#[derive(Debug)]
pub struct ImageFile {
    file: Arc<File>,
    path: PathBuf,
    /// Index in the chain, in opening order (0 = the top image); also the file's index in every
    /// worker ring's registered-file table.
    index: u32,
    writable: bool,
    /// `O_DIRECT` alignment of memory and of offsets/lengths (1 without `O_DIRECT`).
    align: usize,
    size: AtomicU64,
    helper: CommonStorageHelper,
    /// Serialises the read-modify-write of unaligned writes under `O_DIRECT`.
    rmw: Mutex<()>,
}

/// One opened file of a chain: the descriptor, its path, whether it is writable.
type Opened = (Arc<File>, PathBuf, bool);

/// The files opened for one chain, in index order; shared by the opener and the image.
#[derive(Debug, Default, Clone)]
pub struct ChainFiles(Arc<Mutex<Vec<Opened>>>);

impl ChainFiles {
    /// Opens `path` as the next file of the chain.
    pub fn open(&self, path: &Path, writable: bool, direct: bool) -> io::Result<ImageFile> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(writable);
        if direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path)?;
        let size = file.metadata()?.len();
        let align = if direct { probe_memory_alignment(&file).max(512) } else { 1 };
        let file = Arc::new(file);
        let mut files = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let index = u32::try_from(files.len()).map_err(|_| io::Error::other("image chain too long"))?;
        files.push((file.clone(), path.to_path_buf(), writable));
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            index,
            writable,
            align,
            size: AtomicU64::new(size),
            helper: CommonStorageHelper::default(),
            rmw: Mutex::new(()),
        })
    }

    /// The open files, in index order.
    pub fn files(&self) -> Vec<Arc<File>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(f, _, _)| f.clone()).collect()
    }

    /// The paths and whether each was opened writable, in index order.
    pub fn paths(&self) -> Vec<(PathBuf, bool)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(_, p, w)| (p.clone(), *w)).collect()
    }
}

impl ImageFile {
    /// The index of this file in the chain and in the rings' file tables.
    pub fn index(&self) -> u32 {
        self.index
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Makes the file at least `end` bytes long without ever shortening it; `[offset, end)`
    /// reads as zeroes afterwards where it lies past the old end.
    fn extend_to(&self, offset: u64, end: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(end - offset)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            // SAFETY: plain syscall on our descriptor; mode 0 allocates and grows, never shrinks.
            if unsafe { libc::fallocate(self.fd(), 0, off, len) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) => break,
                _ => return Err(e),
            }
        }
        // No fallocate: write the last aligned block past the old end (zeroes), which grows
        // the file without truncating anything another thread wrote.
        let a = self.align.max(512) as u64;
        let last = (end - 1) / a * a;
        let current = self.file.metadata()?.len();
        if current >= end {
            return Ok(());
        }
        let start = last.max(current.div_ceil(a) * a);
        let zeroes = Buffers::from_aligned(AlignedBuf::zeroed((end.div_ceil(a) * a - start) as usize));
        from_result(zeroes.transfer(self.fd(), start, true, false))
    }

    /// Whether `O_DIRECT` takes the request as it is.
    fn aligned(&self, offset: u64, iovecs: &[libc::iovec]) -> bool {
        let a = self.align;
        a <= 1
            || offset.is_multiple_of(a as u64)
                && iovecs.iter().all(|v| (v.iov_base as usize).is_multiple_of(a) && v.iov_len.is_multiple_of(a))
    }

    /// The aligned span around `[offset, offset + len)`, read into an aligned buffer (bytes
    /// past the end of the file read as zero).
    fn read_span(&self, offset: u64, len: u64) -> io::Result<(u64, AlignedBuf)> {
        let a = self.align as u64;
        let start = offset / a * a;
        let end = (offset + len).div_ceil(a) * a;
        let mut buf = AlignedBuf::zeroed((end - start) as usize);
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // The offset stays aligned because a short read ends the loop.
            let n = match self.file.read_at(rest, start + done as u64) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            done += n;
            if n < rest.len() {
                // End of file: the rest stays zero.
                break;
            }
        }
        Ok((start, buf))
    }

    /// Reads an unaligned request through an aligned bounce buffer (imago's small header and
    /// metadata reads under `O_DIRECT`).
    fn read_bounced(&self, offset: u64, bufs: &mut Buffers) -> io::Result<()> {
        let (start, buf) = self.read_span(offset, bufs.len())?;
        bufs.copy_from(&buf[(offset - start) as usize..]);
        Ok(())
    }

    /// Writes an unaligned request by read-modify-write of the aligned span around it.
    fn write_bounced(&self, offset: u64, bufs: &Buffers) -> io::Result<()> {
        let _serial = self.rmw.lock().unwrap_or_else(|p| p.into_inner());
        let (start, mut buf) = self.read_span(offset, bufs.len())?;
        bufs.copy_to(&mut buf[(offset - start) as usize..]);
        let end = start + buf.len() as u64;
        from_result(Buffers::from_aligned(buf).transfer(self.fd(), start, true, false))?;
        self.size.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    /// Reads `bufs` at `offset`; bytes past the end of the file read as zero (imago's contract
    /// for storage reads).
    fn read_filling(&self, offset: u64, bufs: &mut Buffers) -> io::Result<()> {
        let total = bufs.len();
        let inside = self.size.load(Ordering::Acquire).saturating_sub(offset).min(total);
        if inside > 0 {
            from_result(bufs.slice(0, inside).transfer(self.fd(), offset, false, false))?;
        }
        bufs.zero(inside, total - inside);
        Ok(())
    }
}

impl fmt::Display for ImageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())
    }
}

fn from_result(r: i32) -> io::Result<()> {
    if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(()) }
}

impl Storage for ImageFile {
    fn mem_align(&self) -> usize {
        self.align
    }

    fn req_align(&self) -> usize {
        self.align
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size.load(Ordering::Acquire))
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        let relative = relative.as_ref();
        if relative.is_absolute() {
            return Ok(relative.to_path_buf());
        }
        // As QEMU: a relative backing file name is relative to the directory of the image
        // that names it.
        let dir = self.path.parent().unwrap_or(Path::new("."));
        Ok(dir.join(relative))
    }

    fn get_filename(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        // SAFETY: imago lends us its live, writable buffers for the duration of this call (the
        // trait's contract); the `Buffers` made of them is dropped before it returns, and
        // imago touches them only after that.
        let mut bufs = unsafe { Buffers::from_raw(bufv.as_iovec().to_vec(), None) };
        let past_end = offset + bufs.len() > self.size.load(Ordering::Acquire);
        if !self.aligned(offset, bufs.iovecs()) || (self.align > 1 && past_end) {
            return self.read_bounced(offset, &mut bufs);
        }
        self.read_filling(offset, &mut bufs)
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{} is read-only", self)));
        }
        let len = bufv.len();
        // SAFETY: imago lends us its live buffers for the duration of this call (the trait's
        // contract), and the `Buffers` made of them is dropped before it returns. They are
        // the source of a write: only ever read through it (`transfer` with write, `copy_to`).
        let bufs = unsafe { Buffers::from_raw(bufv.as_iovec().to_vec(), None) };
        if !self.aligned(offset, bufs.iovecs()) {
            return self.write_bounced(offset, &bufs);
        }
        from_result(bufs.transfer(self.fd(), offset, true, false))?;
        self.size.fetch_max(offset + len, Ordering::AcqRel);
        Ok(())
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let end = offset + length;
        from_result(fallocate_with_fallback(self.fd(), &Op::WriteZeroes { offset, len: length, unmap: false }))?;
        // ZERO_RANGE keeps the size; a range past the end must still extend the file. Never
        // with ftruncate: another thread may have written past `end` meanwhile, and a
        // truncate from a stale size would cut its data off. fallocate only ever grows.
        if end > self.size.load(Ordering::Acquire) {
            self.extend_to(offset, end)?;
            self.size.fetch_max(end, Ordering::AcqRel);
        }
        Ok(())
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: same contract.
        unsafe { self.pure_write_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        from_result(fallocate_with_fallback(self.fd(), &Op::Discard { offset, len: length }))
    }

    fn flush(&self) -> io::Result<()> {
        // Nothing is buffered here: writes go straight to the file.
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        if self.writable { self.file.sync_data() } else { Ok(()) }
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }

    fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        match prealloc_mode {
            PreallocateMode::None | PreallocateMode::Zero => {}
            _ => return Err(io::ErrorKind::Unsupported.into()),
        }
        self.file.set_len(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}

/// Opens the files an image names (its backing chain, an external data file) through
/// [`ChainFiles`], read-only below the top, as QEMU does.
#[derive(Debug, Clone)]
pub struct ChainGate {
    pub(super) files: ChainFiles,
    pub(super) direct: bool,
}

impl imago::format::gate::ImplicitOpenGate<ImageFile> for ChainGate {
    fn open_format<F: imago::FormatDriverBuilder<ImageFile>>(
        &mut self,
        builder: F,
    ) -> io::Result<imago::FormatAccess<ImageFile>> {
        let driver = builder.open(self.clone())?;
        Ok(imago::FormatAccess::new(driver))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<ImageFile> {
        let path = opts
            .get_filename()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "an image names a file without a path"))?
            .to_path_buf();
        self.files
            .open(&path, opts.get_writable(), self.direct)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))
    }
}
