//! A disk's bytes by guest offset, synchronously, whatever the image format: what the
//! replication paths use beside the workers' queues (copy-before-write, the failover merge,
//! resync and verify reads, the secondary's NBD export). A raw image is its file; a qcow2
//! image goes through its format driver (`block::qcow2`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::io::sync::fallocate_with_fallback;
use crate::io::{Buffers, Op};

/// Synchronous, thread-safe access to a disk's guest-visible bytes.
pub trait ImageData: Send + Sync {
    /// Reads into or writes from the whole of `bufs` at `offset`; bytes or `-errno`. `dsync`
    /// makes a write durable before it returns.
    fn transfer(&self, offset: u64, bufs: &mut Buffers, write: bool, dsync: bool) -> i32;

    /// Runs a discard or write-zeroes (`op` is [`Op::Discard`] or [`Op::WriteZeroes`]);
    /// `0` or `-errno`.
    fn zero(&self, op: &Op<'_>) -> i32;

    /// Makes every completed write durable.
    fn sync_data(&self) -> io::Result<()>;

    /// End of the unallocated (reads-as-zero) range starting at `from`, at most `limit`:
    /// `from` when `from` holds data or the image cannot tell.
    fn hole_end(&self, from: u64, limit: u64) -> u64;

    /// End of the allocated range starting at `from`, at most `limit` (`limit` when the
    /// image cannot tell).
    fn data_end(&self, from: u64, limit: u64) -> u64;

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let iov = vec![libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        // SAFETY: `buf` is live, writable and borrowed only here for the whole call, and the
        // buffers (with any slice of them) are gone when it returns.
        let mut bufs = unsafe { Buffers::from_raw(iov, None) };
        result(self.transfer(offset, &mut bufs, false, false))
    }

    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let iov = vec![libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() }];
        // SAFETY: `buf` is live for the whole call and the buffers are gone when it returns;
        // a write only reads them.
        let mut bufs = unsafe { Buffers::from_raw(iov, None) };
        result(self.transfer(offset, &mut bufs, true, false))
    }
}

/// The extents of `file` (holes: reads as zero, unallocated) in [offset, offset + len): `(length, hole)` in order, adjacent ones
/// of the same kind merged, at most `max` (at least 1) of them. They cover at least the
/// first byte (when `len > 0`) and never go past the range; an extent query that fails
/// reports the rest as data.
pub fn extents(file: &dyn ImageData, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
    let end = offset.saturating_add(len);
    let mut out: Vec<(u64, bool)> = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < max.max(1) {
        let h = file.hole_end(pos, end);
        let (next, hole) = if h > pos { (h, true) } else { (file.data_end(pos, end).max(pos + 1).min(end), false) };
        match out.last_mut() {
            Some(last) if last.1 == hole => last.0 += next - pos,
            _ => out.push((next - pos, hole)),
        }
        pos = next;
    }
    out
}

/// `Ok` for a non-negative engine-style result, the errno otherwise.
pub fn result(r: i32) -> io::Result<()> {
    if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(()) }
}

impl ImageData for File {
    fn transfer(&self, offset: u64, bufs: &mut Buffers, write: bool, dsync: bool) -> i32 {
        bufs.transfer(self.as_raw_fd(), offset, write, dsync)
    }

    fn zero(&self, op: &Op<'_>) -> i32 {
        fallocate_with_fallback(self.as_raw_fd(), op)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn hole_end(&self, from: u64, limit: u64) -> u64 {
        super::extents::hole_end(self, from, limit)
    }

    fn data_end(&self, from: u64, limit: u64) -> u64 {
        super::extents::data_end(self, from, limit)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
}

/// A raw disk opened with `O_DIRECT` for the replication paths (`--direct`): aligned requests
/// go to the file as they are; others — NBD requests at any byte offset, heap buffers — are
/// bounced through an aligned buffer, as QEMU's block layer does, with a read-modify-write
/// of the aligned blocks around an unaligned write.
#[derive(Debug)]
pub struct DirectFile {
    /// Shared with whoever else addresses the same descriptor (a ring, the buffer reclaim).
    file: std::sync::Arc<File>,
    /// Alignment of memory, offsets and lengths `O_DIRECT` needs (probed at open).
    align: usize,
    /// Writes take it shared, read-modify-writes exclusively: an aligned write into a block
    /// that a read-modify-write is rewriting would otherwise be lost.
    rmw: std::sync::RwLock<()>,
}

impl DirectFile {
    /// Opens `path` with `O_DIRECT` (read-only unless `writable`).
    pub fn open(path: &std::path::Path, writable: bool) -> io::Result<DirectFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().read(true).write(writable).custom_flags(libc::O_DIRECT).open(path)?;
        Ok(Self::over(std::sync::Arc::new(file)))
    }

    /// Bounces for `file`, an already open `O_DIRECT` descriptor that others share.
    pub fn over(file: std::sync::Arc<File>) -> DirectFile {
        let align = super::bounce::probe_memory_alignment(&*file).max(512);
        DirectFile { file, align, rmw: std::sync::RwLock::new(()) }
    }

    fn aligned(&self, offset: u64, iovecs: &[libc::iovec]) -> bool {
        let a = self.align;
        offset.is_multiple_of(a as u64)
            && iovecs.iter().all(|v| (v.iov_base as usize).is_multiple_of(a) && v.iov_len.is_multiple_of(a))
    }

    /// The aligned span around `[offset, offset + len)` in an aligned buffer; bytes past the
    /// end of the file read as zero.
    fn read_span(&self, offset: u64, len: u64) -> Result<(u64, crate::io::aligned::AlignedBuf), i32> {
        let a = self.align as u64;
        let start = offset / a * a;
        let end = (offset + len).div_ceil(a) * a;
        let mut buf = crate::io::aligned::AlignedBuf::zeroed((end - start) as usize);
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let Ok(pos) = libc::off_t::try_from(start + done as u64) else { return Err(-libc::EINVAL) };
            // SAFETY: `rest` is a live, writable, aligned buffer; a short read ends the loop,
            // so the offset stays aligned.
            let n = unsafe { libc::pread(self.file.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len(), pos) };
            if n < 0 {
                let e = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
                if e == libc::EINTR {
                    continue;
                }
                return Err(-e);
            }
            let n = n as usize;
            done += n;
            if n < rest.len() {
                break;
            }
        }
        Ok((start, buf))
    }
}

impl ImageData for DirectFile {
    fn transfer(&self, offset: u64, bufs: &mut Buffers, write: bool, dsync: bool) -> i32 {
        let fd = self.file.as_raw_fd();
        let len = bufs.len();
        if self.aligned(offset, bufs.iovecs()) {
            let _shared = write.then(|| self.rmw.read().unwrap_or_else(|p| p.into_inner()));
            return bufs.transfer(fd, offset, write, dsync);
        }
        let _exclusive = write.then(|| self.rmw.write().unwrap_or_else(|p| p.into_inner()));
        let (start, mut buf) = match self.read_span(offset, len) {
            Ok(x) => x,
            Err(e) => return e,
        };
        let at = (offset - start) as usize;
        if !write {
            bufs.copy_from(&buf[at..at + len as usize]);
            return crate::io::result_from_len(len);
        }
        bufs.copy_to(&mut buf[at..at + len as usize]);
        let r = Buffers::from_aligned(buf).transfer(fd, start, true, dsync);
        if r < 0 {
            return r;
        }
        crate::io::result_from_len(len)
    }

    fn zero(&self, op: &Op<'_>) -> i32 {
        // fallocate needs no alignment; only its last fallback writes zeroes by hand, with a
        // plain buffer that O_DIRECT refuses: then zeroes go through `transfer`.
        let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
        let r = fallocate_with_fallback(self.file.as_raw_fd(), op);
        if r != -libc::EINVAL {
            return r;
        }
        drop(_shared);
        let (offset, len) = match *op {
            Op::Discard { .. } => return 0,
            Op::WriteZeroes { offset, len, .. } => (offset, len),
            Op::Read { .. } | Op::Write { .. } | Op::Flush => return -libc::EINVAL,
        };
        const CHUNK: u64 = 1 << 20;
        let zeroes = Buffers::from_aligned(crate::io::aligned::AlignedBuf::zeroed(CHUNK.min(len) as usize));
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let r = self.transfer(offset + done, &mut zeroes.slice(0, n), true, false);
            if r < 0 {
                return r;
            }
            done += n;
        }
        0
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn hole_end(&self, from: u64, limit: u64) -> u64 {
        super::extents::hole_end(&self.file, from, limit)
    }

    fn data_end(&self, from: u64, limit: u64) -> u64 {
        super::extents::data_end(&self.file, from, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unaligned reads and writes through `O_DIRECT` land exactly where a buffered file
    /// would put them (tmpfs has no O_DIRECT: the test is skipped there).
    #[test]
    fn direct_file_bounces_unaligned_requests() {
        let dir = tempfile::tempdir_in(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into()))
            .unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let path = dir.path().join("d.img");
        let pattern: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &pattern).unwrap();
        let Ok(d) = DirectFile::open(&path, true) else { return };
        let mut model = pattern.clone();
        for (off, len, byte) in [(100u64, 1000usize, 1u8), (4095, 2, 2), (8192, 4096, 3), (60000, 5536, 4), (1, 1, 5)] {
            let data = vec![byte; len];
            d.write_all_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        let mut back = vec![0u8; model.len()];
        d.read_exact_at(&mut back, 0).unwrap();
        assert!(back == model);
        let mut odd = vec![0u8; 3001];
        d.read_exact_at(&mut odd, 777).unwrap();
        assert_eq!(&odd[..], &model[777..3778]);
        assert_eq!(d.zero(&Op::WriteZeroes { offset: 10, len: 20, unmap: false }), 0);
        model[10..30].fill(0);
        d.read_exact_at(&mut back, 0).unwrap();
        assert!(back == model);
        assert_eq!(std::fs::read(&path).unwrap(), model);
    }
}
