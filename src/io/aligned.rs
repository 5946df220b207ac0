//! Heap buffers aligned for `O_DIRECT`: the primary's owned copy of a mirrored write (its
//! local half is submitted from the copy, so it must satisfy the alignment the guest's own
//! buffers did) and the bounce buffers of `block::bounce`.
//!
//! Copies made for every request ([`AlignedBuf::recycled`]) come from a process-wide pool of
//! power-of-two buffers (4 KiB to 4 MiB, at most 32 MiB kept per size): a fresh 1 MiB
//! allocation is a fresh mapping whose 256 pages fault in and are zeroed on every write,
//! which cost a mirroring primary a third of its CPU.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of every buffer: the largest logical block size `O_DIRECT` asks for in practice.
pub const ALIGN: usize = 4096;

/// Smallest and largest pooled size (powers of two).
const POOL_MIN_SHIFT: u32 = 12;
const POOL_MAX_SHIFT: u32 = 22;
/// Bytes the pool keeps per size at most.
const POOL_BYTES_PER_CLASS: usize = 32 << 20;

/// A free pooled allocation (its size is its class's).
struct Free(NonNull<u8>);

// SAFETY: a free allocation belongs to the pool alone; whoever takes it owns it exclusively.
unsafe impl Send for Free {}

/// Free buffers by size class (`1 << (POOL_MIN_SHIFT + i)` bytes).
static POOL: [Mutex<Vec<Free>>; (POOL_MAX_SHIFT - POOL_MIN_SHIFT + 1) as usize] =
    [const { Mutex::new(Vec::new()) }; (POOL_MAX_SHIFT - POOL_MIN_SHIFT + 1) as usize];

/// The pool class for `len` bytes, if pooled.
fn class_of(len: usize) -> Option<usize> {
    let cap = len.max(1 << POOL_MIN_SHIFT).checked_next_power_of_two()?;
    let shift = cap.trailing_zeros();
    (shift <= POOL_MAX_SHIFT).then(|| (shift - POOL_MIN_SHIFT) as usize)
}

/// A zero-initialised heap buffer whose start is [`ALIGN`]-aligned (a recycled one holds
/// earlier bytes instead of zeroes, see [`AlignedBuf::recycled`]).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// The allocation's size (`len`, or its pool class's size).
    cap: usize,
    /// Goes back to the pool's class `cap` on drop.
    pooled: bool,
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
        AlignedBuf { ptr: Self::allocate(len), len, cap: len, pooled: false }
    }

    /// `len` bytes (no allocation when `len` is 0) from the pool of recycled buffers, or
    /// fresh and zeroed when the pool has none of that size; the bytes are whatever the
    /// buffer last held, so the caller overwrites all of them. Goes back to the pool on drop.
    pub fn recycled(len: usize) -> Self {
        let Some(class) = class_of(len).filter(|_| len > 0) else { return Self::zeroed(len) };
        let cap = 1usize << (POOL_MIN_SHIFT as usize + class);
        let reused = POOL[class].lock().unwrap_or_else(|e| e.into_inner()).pop();
        let ptr = match reused {
            Some(Free(p)) => p,
            None => Self::allocate(cap),
        };
        AlignedBuf { ptr, len, cap, pooled: true }
    }

    /// The start of the buffer as a pointer with the allocation's own provenance (for iovecs
    /// the kernel or a copy may write through; `Deref` gives a shared slice).
    pub fn as_raw_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// A zeroed allocation of `cap` (non-zero) bytes.
    fn allocate(cap: usize) -> NonNull<u8> {
        let layout = Self::layout(cap);
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p) else { std::alloc::handle_alloc_error(layout) };
        ptr
    }

    /// A copy of the bytes `iovecs` point to, in order.
    ///
    /// # Safety
    /// Every iovec must point to `iov_len` readable bytes for the duration of the call.
    pub unsafe fn copy_of(iovecs: &[libc::iovec]) -> Self {
        let mut b = Self::recycled(crate::io::iovecs_len(iovecs) as usize);
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
        AlignedBuf { ptr: NonNull::dangling(), len: 0, cap: 0, pooled: false }
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
        if self.cap == 0 {
            return;
        }
        if self.pooled
            && let Some(class) = class_of(self.cap)
        {
            let mut free = POOL[class].lock().unwrap_or_else(|e| e.into_inner());
            if (free.len() + 1) * self.cap <= POOL_BYTES_PER_CLASS {
                free.push(Free(self.ptr));
                return;
            }
        }
        // SAFETY: allocated in `allocate` with a layout of `cap` bytes.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) };
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

    #[test]
    fn recycled_buffers_come_back_aligned_and_sized() {
        let mut a = AlignedBuf::recycled(1 << 20);
        a.fill(7);
        drop(a);
        // Another thread of the test binary may take it first; any buffer must fit.
        let b = AlignedBuf::recycled((1 << 20) - 512);
        assert_eq!(b.len(), (1 << 20) - 512);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        let big = AlignedBuf::recycled(16 << 20);
        assert!(!big.pooled, "sizes beyond the largest class are not pooled");
        assert_eq!(class_of(1), Some(0));
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_of(4 << 20), Some(10));
        assert_eq!(class_of((4 << 20) + 1), None);
    }
}
