//! A disk's bytes by guest offset, synchronously, whatever the image format: what the
//! replication paths use beside the workers' queues (copy-before-write, the failover merge,
//! resync and verify reads, the secondary's NBD export). A raw image is its file; a qcow2
//! image goes through its format driver (`block::qcow2`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::io::Op;
use crate::io::sync::fallocate_with_fallback;

/// Synchronous, thread-safe access to a disk's guest-visible bytes.
pub trait ImageData: Send + Sync {
    /// Reads or writes the whole iovec list at `offset`; bytes or `-errno`. `dsync` makes a
    /// write durable before it returns.
    ///
    /// # Safety
    /// The iovecs must describe live buffers (writable ones for reads) for the whole call.
    unsafe fn transfer(&self, offset: u64, iovecs: &[libc::iovec], write: bool, dsync: bool) -> i32;

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
        let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        // SAFETY: `buf` is a live, writable buffer for the whole call.
        result(unsafe { self.transfer(offset, &iov, false, false) })
    }

    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let iov = [libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() }];
        // SAFETY: `buf` is live for the whole call; a write only reads it.
        result(unsafe { self.transfer(offset, &iov, true, false) })
    }
}

/// `Ok` for a non-negative engine-style result, the errno otherwise.
pub fn result(r: i32) -> io::Result<()> {
    if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(()) }
}

impl ImageData for File {
    unsafe fn transfer(&self, offset: u64, iovecs: &[libc::iovec], write: bool, dsync: bool) -> i32 {
        // SAFETY: forwarded contract.
        unsafe { crate::io::transfer(self.as_raw_fd(), offset, iovecs, write, dsync) }
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
