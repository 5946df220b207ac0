//! Heap buffers aligned for `O_DIRECT`: the primary's owned copy of a mirrored write (its
//! local half is submitted from the copy, so it must satisfy the alignment the guest's own
//! buffers did) and the bounce buffers of [`super::bounce`].

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every buffer: the largest logical block size `O_DIRECT` asks for in practice.
pub const ALIGN: usize = 4096;

/// A zero-initialised heap buffer whose start is [`ALIGN`]-aligned.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a `Vec<u8>`; shared access is
// read-only through `Deref`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes (no allocation when `len` is 0).
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self::default();
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p) else { std::alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, len }
    }

    /// A copy of the bytes `iovecs` point to, in order.
    ///
    /// # Safety
    /// Every iovec must point to `iov_len` readable bytes for the duration of the call.
    pub unsafe fn copy_of(iovecs: &[libc::iovec]) -> Self {
        let mut b = Self::zeroed(crate::io::iovecs_len(iovecs) as usize);
        let mut at = 0;
        for v in iovecs {
            // SAFETY: guaranteed by the caller.
            let src = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            b[at..at + v.iov_len].copy_from_slice(src);
            at += v.iov_len;
        }
        b
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, ALIGN).unwrap_or_else(|_| std::alloc::handle_alloc_error(Layout::new::<u8>()))
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf { ptr: NonNull::dangling(), len: 0 }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes (dangling only when `len` is 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with this very layout.
            unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_copy_of_iovecs() {
        let (a, b) = (vec![1u8; 3], vec![2u8; 5000]);
        let iov = [
            libc::iovec { iov_base: a.as_ptr() as *mut _, iov_len: a.len() },
            libc::iovec { iov_base: b.as_ptr() as *mut _, iov_len: b.len() },
        ];
        // SAFETY: both vectors outlive the call.
        let c = unsafe { AlignedBuf::copy_of(&iov) };
        assert_eq!(c.as_ptr() as usize % ALIGN, 0);
        assert_eq!(c.len(), 5003);
        assert_eq!(&c[..3], &[1, 1, 1]);
        assert!(c[3..].iter().all(|&x| x == 2));
        assert!(AlignedBuf::zeroed(0).is_empty());
    }
}
