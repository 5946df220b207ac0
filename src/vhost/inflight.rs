//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split virtqueues.
//!
//! The frontend keeps a shared memory region for us across our restarts. Per queue it holds
//! a small header and one entry per descriptor head: whether that request is in flight and
//! when it was popped. If colo-blk dies, the frontend reconnects and hands the region back;
//! every request still marked in flight is then resubmitted (in the order it was popped) and
//! completed exactly once — which a rewind to the used index cannot do when completions were
//! out of order, as ours are.
//!
//! Layout of one queue region (all little-endian, as libvhost-user and QEMU lay it out):
//! `u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx`, then
//! `desc_num` entries of `u8 inflight, u8 padding[5], u16 next, u64 counter`.
//! Every queue region is rounded up to 64 bytes.
//!
//! Update protocol (vhost-user specification, "Inflight I/O tracking"):
//! - pop: `counter` = a per-queue sequence number, then `inflight` = 1;
//! - complete (batches of one here): `next` = `last_batch_head`, `last_batch_head` = head,
//!   publish the used entry and index, `inflight` = 0, `used_idx` = the ring's used index;
//! - reconnect: if `used_idx` lags the ring's used index, the last batch was published but
//!   not cleared: clear it; then resubmit the entries still in flight by `counter`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{Ordering, fence};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const HEADER: usize = 16;
const ENTRY: usize = 16;
const ALIGN: usize = 64;
const VERSION: u16 = 1;
/// virtq descriptor flags.
const F_NEXT: u16 = 1;
const F_INDIRECT: u16 = 4;

/// Bytes of one queue's region.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + ENTRY * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// The shared region, mapped.
#[derive(Debug)]
pub struct InflightRegion {
    ptr: *mut u8,
    len: usize,
    num_queues: u16,
    queue_size: u16,
    /// Keeps the descriptor the frontend shares (a reconnect hands it back).
    file: File,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access goes through
// volatile reads/writes of single fields, each queue's part is touched only by its worker.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// A fresh zeroed region in a new memfd (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<InflightRegion> {
        let len = usize::from(num_queues) * queue_region_size(queue_size);
        // SAFETY: plain syscall; the returned fd is owned by `file` below.
        let fd =
            unsafe { libc::memfd_create(c"colo-blk-inflight".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // The frontend gets this descriptor: sealed, it cannot shrink the file under our
        // mapping (a SIGBUS at the next pop) nor change the seals.
        // SAFETY: plain fcntl on a descriptor `file` owns.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = Self::map(file, len, 0, num_queues, queue_size)?;
        for q in 0..num_queues {
            let base = usize::from(q) * queue_region_size(queue_size);
            r.write_u16(base + 8, VERSION);
            r.write_u16(base + 10, queue_size);
        }
        Ok(r)
    }

    /// Maps a region the frontend handed back (SET_INFLIGHT_FD). Refused if it is too small
    /// for the device or was laid out for another queue size.
    pub fn open(file: File, size: u64, offset: u64, num_queues: u16, queue_size: u16) -> io::Result<InflightRegion> {
        let need = usize::from(num_queues) * queue_region_size(queue_size);
        let len = usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        if len < need || file.metadata()?.len() < offset.saturating_add(size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inflight region of {len} bytes, need {need}"),
            ));
        }
        // A region we created is sealed already; one the frontend made is sealed against
        // shrinking where it allows it (best effort: QEMU seals its own).
        // SAFETY: plain fcntl calls on a descriptor `file` owns.
        unsafe {
            let seals = libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS);
            if seals >= 0 && seals & libc::F_SEAL_SHRINK == 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK);
            }
        }
        let r = Self::map(file, len, offset, num_queues, queue_size)?;
        for q in 0..num_queues {
            let base = usize::from(q) * queue_region_size(queue_size);
            let desc_num = r.read_u16(base + 10);
            if desc_num != queue_size && desc_num != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("inflight region of queue {q} has {desc_num} entries, the queue {queue_size}"),
                ));
            }
            r.write_u16(base + 8, VERSION);
            r.write_u16(base + 10, queue_size);
        }
        Ok(r)
    }

    fn map(file: File, len: usize, offset: u64, num_queues: u16, queue_size: u16) -> io::Result<InflightRegion> {
        // SAFETY: maps `len` bytes of a file we hold; the mapping is released in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(InflightRegion { ptr: ptr as *mut u8, len, num_queues, queue_size, file })
    }

    /// The memfd to hand to the frontend.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Mapped size.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a region has at least one queue).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues and entries per queue the region was laid out for.
    pub fn shape(&self) -> (u16, u16) {
        (self.num_queues, self.queue_size)
    }

    fn read_u16(&self, off: usize) -> u16 {
        assert!(off + 2 <= self.len);
        // SAFETY: in bounds (checked), 2-aligned by layout.
        u16::from_le(unsafe { std::ptr::read_volatile(self.ptr.add(off) as *const u16) })
    }
    fn write_u16(&self, off: usize, v: u16) {
        assert!(off + 2 <= self.len);
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(self.ptr.add(off) as *mut u16, v.to_le()) }
    }
    fn read_u8(&self, off: usize) -> u8 {
        assert!(off < self.len);
        // SAFETY: in bounds.
        unsafe { std::ptr::read_volatile(self.ptr.add(off)) }
    }
    fn write_u8(&self, off: usize, v: u8) {
        assert!(off < self.len);
        // SAFETY: in bounds.
        unsafe { std::ptr::write_volatile(self.ptr.add(off), v) }
    }
    fn read_u64(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len);
        // SAFETY: in bounds, 8-aligned by layout.
        u64::from_le(unsafe { std::ptr::read_volatile(self.ptr.add(off) as *const u64) })
    }
    fn write_u64(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len);
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(self.ptr.add(off) as *mut u64, v.to_le()) }
    }

    /// The tracker of queue `q` (None if the region has no such queue).
    pub fn queue(&self, q: u16) -> Option<QueueInflight<'_>> {
        (q < self.num_queues).then(|| QueueInflight {
            region: self,
            base: usize::from(q) * queue_region_size(self.queue_size),
            size: self.queue_size,
        })
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// One queue's part of the region.
#[derive(Debug, Clone, Copy)]
pub struct QueueInflight<'a> {
    region: &'a InflightRegion,
    base: usize,
    size: u16,
}

impl QueueInflight<'_> {
    fn entry(&self, head: u16) -> Option<usize> {
        (head < self.size).then(|| self.base + HEADER + ENTRY * usize::from(head))
    }

    /// A request with this head was popped; `counter` orders it among the others.
    pub fn begin(&self, head: u16, counter: u64) {
        if let Some(e) = self.entry(head) {
            self.region.write_u64(e + 8, counter);
            fence(Ordering::Release);
            self.region.write_u8(e, 1);
        }
    }

    /// Before publishing `head`'s used entry: chain it into the last batch.
    pub fn before_used(&self, head: u16) {
        if let Some(e) = self.entry(head) {
            let last = self.region.read_u16(self.base + 12);
            self.region.write_u16(e + 6, last);
            self.region.write_u16(self.base + 12, head);
            fence(Ordering::Release);
        }
    }

    /// After publishing `head`'s used entry; `used_idx` is the ring's used index now.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        if let Some(e) = self.entry(head) {
            fence(Ordering::Release);
            self.region.write_u8(e, 0);
            fence(Ordering::Release);
            self.region.write_u16(self.base + 14, used_idx);
        }
    }

    /// After a reconnect: reconciles the last batch against the ring's `ring_used` index and
    /// returns the heads still in flight, oldest first, plus the highest counter seen.
    pub fn recover(&self, ring_used: u16) -> (Vec<u16>, u64) {
        let recorded = self.region.read_u16(self.base + 14);
        if recorded != ring_used {
            // The last batch reached the ring but was not cleared here: clear it.
            let batch = ring_used.wrapping_sub(recorded);
            let mut head = self.region.read_u16(self.base + 12);
            for _ in 0..batch.min(self.size) {
                let Some(e) = self.entry(head) else { break };
                self.region.write_u8(e, 0);
                head = self.region.read_u16(e + 6);
            }
            self.region.write_u16(self.base + 14, ring_used);
        }
        let mut inflight: Vec<(u64, u16)> = (0..self.size)
            .filter_map(|h| {
                let e = self.entry(h)?;
                (self.region.read_u8(e) == 1).then(|| (self.region.read_u64(e + 8), h))
            })
            .collect();
        inflight.sort_unstable();
        let max = inflight.last().map_or(0, |&(c, _)| c);
        (inflight.into_iter().map(|(_, h)| h).collect(), max)
    }
}

/// Reads the descriptor chain of `head` from the descriptor table (what virtio-queue does
/// when popping, for requests resubmitted after a reconnect): follows `next` and one level
/// of indirect table, at most `queue_size` steps in either; an indirect table longer than
/// the queue (or not a whole number of descriptors) gives an empty chain; stops at anything
/// out of bounds (the request parser then refuses the short chain).
pub fn read_chain<M: GuestMemory + ?Sized>(mem: &M, table: u64, queue_size: u16, head: u16) -> Vec<Descriptor> {
    let read = |addr: u64| -> Option<Descriptor> {
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(addr)).ok()?;
        Some(Descriptor::new(
            u64::from_le_bytes(b[0..8].try_into().ok()?),
            u32::from_le_bytes(b[8..12].try_into().ok()?),
            u16::from_le_bytes([b[12], b[13]]),
            u16::from_le_bytes([b[14], b[15]]),
        ))
    };
    let mut out = Vec::new();
    let mut idx = head;
    for _ in 0..queue_size {
        if idx >= queue_size {
            break;
        }
        let Some(d) = read(table + 16 * u64::from(idx)) else { break };
        if d.flags() & F_INDIRECT != 0 {
            // As virtio-queue pops: a table of whole descriptors, and (virtio 1.2 §2.7.5.3.1)
            // no chain longer than the queue. Anything else is refused here, not walked.
            if d.len() % 16 != 0 || d.len() / 16 > u32::from(queue_size) || d.len() == 0 {
                return Vec::new();
            }
            let n = d.len() / 16;
            let mut i = 0u32;
            for _ in 0..n {
                let Some(x) = read(d.addr().0 + 16 * u64::from(i)) else { break };
                out.push(x);
                if x.flags() & F_NEXT == 0 || u32::from(x.next()) >= n {
                    break;
                }
                i = u32::from(x.next());
            }
            break;
        }
        out.push(d);
        if d.flags() & F_NEXT == 0 {
            break;
        }
        idx = d.next();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_pops_and_completions_and_recovers_after_a_crash() {
        let r = InflightRegion::create(2, 8).unwrap();
        let q = r.queue(1).unwrap();
        // Pop heads 3, 5, 0; head 5 completes (out of order), used index 1.
        q.begin(3, 1);
        q.begin(5, 2);
        q.begin(0, 3);
        q.before_used(5);
        q.after_used(5, 1);
        // Head 0 is published (used index 2) but the process dies before clearing it.
        q.before_used(0);
        // Reconnect: hand the same memory back.
        let f = r.file().try_clone().unwrap();
        let len = r.len() as u64;
        let again = InflightRegion::open(f, len, 0, 2, 8).unwrap();
        let (heads, max) = again.queue(1).unwrap().recover(2);
        assert_eq!(heads, vec![3], "only head 3 is still in flight");
        assert_eq!(max, 1);
        assert_eq!(again.queue(0).unwrap().recover(0).0, Vec::<u16>::new());
        assert!(InflightRegion::open(again.file().try_clone().unwrap(), len, 0, 2, 16).is_err());
        assert!(again.queue(2).is_none());
    }

    /// Writes one split-ring descriptor (16 bytes, little endian) at guest address `at`.
    fn put_desc(mem: &vm_memory::GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        mem.write_slice(&b, GuestAddress(at)).unwrap();
    }

    #[test]
    fn reads_direct_and_indirect_chains() {
        use vm_memory::GuestMemoryMmap;
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let put = |at: u64, addr: u64, len: u32, flags: u16, next: u16| put_desc(&mem, at, addr, len, flags, next);
        // head 2 -> 4 -> end; head 6 indirect with 2 entries.
        put(0x1000 + 32, 0x8000, 16, F_NEXT, 4);
        put(0x1000 + 64, 0x9000, 512, 0, 0);
        put(0x1000 + 96, 0x3000, 32, F_INDIRECT, 0);
        put(0x3000, 0xa000, 16, F_NEXT, 1);
        put(0x3010, 0xb000, 1, 2, 0);
        let c = read_chain(&mem, 0x1000, 8, 2);
        assert_eq!(c.iter().map(|d| d.addr().0).collect::<Vec<_>>(), vec![0x8000, 0x9000]);
        let c = read_chain(&mem, 0x1000, 8, 6);
        assert_eq!(c.iter().map(|d| d.addr().0).collect::<Vec<_>>(), vec![0xa000, 0xb000]);
        // A loop stops after queue-size steps.
        put(0x1000, 0x8000, 16, F_NEXT, 0);
        assert_eq!(read_chain(&mem, 0x1000, 8, 0).len(), 8);
    }

    #[test]
    fn an_indirect_table_longer_than_the_queue_is_not_walked() {
        use vm_memory::GuestMemoryMmap;
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let put = |at: u64, addr: u64, len: u32, flags: u16, next: u16| put_desc(&mem, at, addr, len, flags, next);
        // A looping one-entry table claiming 2^28 - 1 entries, then 9 entries, then a
        // table that is not a whole number of descriptors.
        put(0x3000, 0xa000, 16, F_NEXT, 0);
        for len in [0xFFFF_FFF0, 9 * 16, 20, 0] {
            put(0x1000, 0x3000, len, F_INDIRECT, 0);
            assert!(read_chain(&mem, 0x1000, 8, 0).is_empty(), "len {len}");
        }
        // A table of the queue's size that loops is walked at most that far.
        put(0x1000, 0x3000, 8 * 16, F_INDIRECT, 0);
        assert_eq!(read_chain(&mem, 0x1000, 8, 0).len(), 8);
    }
}
