//! A request's data as an owned value: host iovecs together with whatever keeps their memory
//! mapped (guest memory, an aligned heap copy). Layers pass [`Buffers`] down the stack and get
//! them back on completion; they can copy, slice and inspect them without `unsafe`, because
//! the only way to make one from raw addresses is the unsafe [`Buffers::from_raw`], whose
//! caller vouches for the memory once.

use std::any::Any;
use std::sync::Arc;

use super::aligned::AlignedBuf;
use super::iovecs_len;

/// What keeps the memory behind a [`Buffers`] mapped: guest memory, an aligned heap buffer.
pub type Owner = Arc<dyn Any + Send + Sync>;

/// An iovec array that is only addresses (request parsing fills it; [`Buffers::from_raw`]
/// turns it into buffers): nothing is read or written through it.
#[derive(Debug, Default)]
pub struct IovecList(pub Vec<libc::iovec>);

// SAFETY: plain addresses and lengths; dereferencing them needs a `Buffers`.
unsafe impl Send for IovecList {}

impl std::ops::Deref for IovecList {
    type Target = Vec<libc::iovec>;
    fn deref(&self) -> &Vec<libc::iovec> {
        &self.0
    }
}

impl std::ops::DerefMut for IovecList {
    fn deref_mut(&mut self) -> &mut Vec<libc::iovec> {
        &mut self.0
    }
}

/// Host iovecs and the owner of the memory they point into.
pub struct Buffers {
    iovecs: Vec<libc::iovec>,
    /// Dropped only with the buffers (and each slice holds its own reference).
    owner: Option<Owner>,
}

// SAFETY: the iovecs are plain addresses into memory that `owner` keeps mapped (or that the
// caller of `from_raw` vouched for); nothing in them belongs to one thread. The memory
// itself is only read or written through the copy methods below and by the I/O engines.
unsafe impl Send for Buffers {}
// SAFETY: as above; shared access never writes.
unsafe impl Sync for Buffers {}

impl std::fmt::Debug for Buffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffers").field("segments", &self.iovecs.len()).field("len", &self.len()).finish()
    }
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers::none()
    }
}

impl Buffers {
    /// No data (flush, discard, write-zeroes).
    pub const fn none() -> Self {
        Buffers { iovecs: Vec::new(), owner: None }
    }

    /// Buffers made of raw host addresses.
    ///
    /// # Safety
    /// Every iovec must name `iov_len` bytes that stay mapped, readable and writable, for as
    /// long as the returned value or any slice or clone of it lives — kept so by `owner` when
    /// given. Nothing else may hold a Rust reference to those bytes meanwhile.
    pub unsafe fn from_raw(iovecs: Vec<libc::iovec>, owner: Option<Owner>) -> Self {
        Buffers { iovecs, owner }
    }

    /// The whole of `buf`, which the buffers own from now on.
    pub fn from_aligned(buf: AlignedBuf) -> Self {
        Self::shared(Arc::new(buf))
    }

    /// The whole of a buffer that others may hold too. Only for the source of writes: a read
    /// into these buffers would change bytes other holders see as immutable.
    pub fn shared(buf: Arc<AlignedBuf>) -> Self {
        let iovecs = if buf.is_empty() {
            Vec::new()
        } else {
            vec![libc::iovec { iov_base: buf.as_raw_ptr().cast(), iov_len: buf.len() }]
        };
        Buffers { iovecs, owner: Some(buf) }
    }

    /// The iovecs, for an engine's system calls or for splitting.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        iovecs_len(&self.iovecs)
    }

    /// True when there is no data.
    pub fn is_empty(&self) -> bool {
        self.iovecs.iter().all(|v| v.iov_len == 0)
    }

    /// Bytes `[offset, offset + len)` as buffers of their own (sharing the owner).
    pub fn slice(&self, offset: u64, len: u64) -> Buffers {
        let mut iovecs = Vec::new();
        super::slice_iovecs(&self.iovecs, offset, len, &mut iovecs);
        Buffers { iovecs, owner: self.owner.clone() }
    }

    /// Gives the iovec array back for reuse (the owner is released).
    pub fn into_iovecs(self) -> Vec<libc::iovec> {
        self.iovecs
    }

    /// Copies the bytes, in order, into the start of `dst` (as many as fit); returns how many.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        let mut at = 0;
        for v in &self.iovecs {
            let n = v.iov_len.min(dst.len() - at);
            // SAFETY: the iovec names `iov_len` readable bytes kept mapped by `self` (the type's
            // invariant); `dst` is a distinct Rust buffer.
            unsafe { std::ptr::copy_nonoverlapping(v.iov_base as *const u8, dst[at..].as_mut_ptr(), n) };
            at += n;
            if at == dst.len() {
                break;
            }
        }
        at
    }

    /// Copies the start of `src` into the buffers, in order (as much as fits); returns how many.
    pub fn copy_from(&mut self, src: &[u8]) -> usize {
        let mut at = 0;
        for v in &self.iovecs {
            let n = v.iov_len.min(src.len() - at);
            // SAFETY: the iovec names `iov_len` writable bytes kept mapped by `self` (the type's
            // invariant); `src` is a distinct Rust buffer.
            unsafe { std::ptr::copy_nonoverlapping(src[at..].as_ptr(), v.iov_base.cast::<u8>(), n) };
            at += n;
            if at == src.len() {
                break;
            }
        }
        at
    }

    /// Copies these bytes, in order, into `dst` (as many as fit); returns how many.
    pub fn copy_to_buffers(&self, dst: &mut Buffers) -> u64 {
        let mut done = 0u64;
        let total = self.len().min(dst.len());
        let mut part = Vec::new();
        for v in &self.iovecs {
            if done == total {
                break;
            }
            let n = (v.iov_len as u64).min(total - done);
            super::slice_iovecs(&dst.iovecs, done, n, &mut part);
            let mut src = v.iov_base as *const u8;
            for d in &part {
                // SAFETY: both ranges lie inside iovecs of live `Buffers` (the type's
                // invariant); `src` advances within `v`, whose length bounds the parts.
                unsafe {
                    std::ptr::copy(src, d.iov_base.cast::<u8>(), d.iov_len);
                    src = src.add(d.iov_len);
                }
            }
            done += n;
        }
        done
    }

    /// Fills bytes `[offset, offset + len)` with zeroes.
    pub fn zero(&mut self, offset: u64, len: u64) {
        let mut part = Vec::new();
        super::slice_iovecs(&self.iovecs, offset, len, &mut part);
        for v in part {
            // SAFETY: a sub-range of an iovec of `self` (the type's invariant: writable).
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
    }

    /// The buffers as slices for vectored reads (imago, `readv`-style APIs).
    pub fn io_slices_mut(&mut self) -> Vec<std::io::IoSliceMut<'_>> {
        let mut out = Vec::with_capacity(self.iovecs.len());
        for v in &self.iovecs {
            // SAFETY: the iovec names `iov_len` writable bytes kept mapped by `self` (the type's
            // invariant); the slices borrow `self` mutably, so no other access through it overlaps.
            let bytes = unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) };
            out.push(std::io::IoSliceMut::new(bytes));
        }
        out
    }

    /// The buffers as slices for vectored writes.
    pub fn io_slices(&self) -> Vec<std::io::IoSlice<'_>> {
        let mut out = Vec::with_capacity(self.iovecs.len());
        for v in &self.iovecs {
            // SAFETY: the iovec names `iov_len` readable bytes kept mapped by `self`.
            let bytes = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            out.push(std::io::IoSlice::new(bytes));
        }
        out
    }

    /// An aligned copy of the bytes (the primary's snapshot of a mirrored write, a bounce).
    pub fn to_aligned(&self) -> AlignedBuf {
        let mut b = AlignedBuf::recycled(self.len() as usize);
        self.copy_to(&mut b);
        b
    }

    /// Reads or writes the buffers at `offset` of `fd` with blocking system calls; returns the
    /// byte count or `-errno`.
    pub fn transfer(&self, fd: std::os::fd::RawFd, offset: u64, write: bool, dsync: bool) -> i32 {
        // SAFETY: the iovecs name live memory (the type's invariant), writable for reads.
        unsafe { super::transfer(fd, offset, &self.iovecs, write, dsync) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_slices_and_zeroes_keep_to_their_bytes() {
        let mut b = Buffers::from_aligned(AlignedBuf::zeroed(8192));
        let src: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(b.copy_from(&src), 8192);
        let s = b.slice(4000, 200);
        assert_eq!(s.len(), 200);
        let mut out = vec![0u8; 300];
        assert_eq!(s.copy_to(&mut out), 200);
        assert_eq!(&out[..200], &src[4000..4200]);
        b.zero(100, 50);
        let mut all = vec![0u8; 8192];
        b.copy_to(&mut all);
        assert!(all[100..150].iter().all(|&x| x == 0));
        assert_eq!(&all[..100], &src[..100]);
        assert_eq!(&all[150..], &src[150..]);
        assert_eq!(b.to_aligned()[..], all[..]);
        assert!(Buffers::none().is_empty());
    }

    #[test]
    fn a_slice_keeps_the_memory_alive_after_the_whole_is_gone() {
        let whole = Buffers::from_aligned(AlignedBuf::zeroed(4096));
        let mut part = whole.slice(512, 512);
        drop(whole);
        part.copy_from(&[7u8; 512]);
        let mut back = [0u8; 512];
        part.copy_to(&mut back);
        assert!(back.iter().all(|&x| x == 7));
    }
}
