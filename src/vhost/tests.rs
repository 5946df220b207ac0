//! Request parsing over hand-built descriptor chains: one test per rejection path, each
//! asserting the exact error and the status the guest gets.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::config::{MAX_DISCARD_SEG, SEG_MAX, SIZE_MAX};
use super::request::{Limits, Request, RequestError, RequestErrorKind, RequestKind, Scratch, Segment, parse};
use super::worker::mark_written;

const MEM_SIZE: usize = 64 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn limits() -> Limits {
    Limits { capacity_sectors: 2048, block_size: 512, read_only: false, discard: true, write_zeroes: true }
}

/// A descriptor: (address, length, device-writable).
type D = (u64, u32, bool);

fn header(mem: &GuestMemoryMmap, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn run(mem: &GuestMemoryMmap, descs: &[D], limits: &Limits) -> (Result<Request, RequestError>, Scratch) {
    let q = MockSplitQueue::new(mem, 1024);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(a, l, w)| {
            RawDescriptor::from(SplitDescriptor::new(a, l, if w { VRING_DESC_F_WRITE as u16 } else { 0 }, 0))
        })
        .collect();
    let chain = q.build_desc_chain(&raw).unwrap();
    let mut scratch = Scratch::default();
    let r = parse(chain, mem, limits, &mut scratch);
    (r, scratch)
}

fn rw(data: &[D]) -> Vec<D> {
    let mut v = vec![(HDR, 16, false)];
    v.extend_from_slice(data);
    v.push((STATUS, 1, true));
    v
}

fn err(mem: &GuestMemoryMmap, descs: &[D], l: &Limits) -> RequestError {
    run(mem, descs, l).0.unwrap_err()
}

fn assert_ioerr(e: RequestError, kind: RequestErrorKind) {
    assert_eq!(e.kind, kind);
    assert_eq!(e.status, Some(GuestAddress(STATUS)));
    assert_eq!(e.kind.status_byte(), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn valid_read_and_write() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 2);
    let (r, s) = run(&m, &rw(&[(DATA, 4096, true), (DATA + 8192, 512, true)]), &limits());
    assert_eq!(
        r.unwrap(),
        Request { kind: RequestKind::Read, offset: 1024, data_len: 4608, status: GuestAddress(STATUS) }
    );
    assert_eq!(s.data.len(), 2);
    header(&m, VIRTIO_BLK_T_OUT, 2047);
    let r = run(&m, &rw(&[(DATA, 512, false)]), &limits()).0.unwrap();
    assert_eq!((r.kind, r.offset, r.data_len), (RequestKind::Write, 2047 * 512, 512));
}

#[test]
fn flush_without_data_and_get_id() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&m, &rw(&[]), &limits()).0.unwrap().kind, RequestKind::Flush);
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(run(&m, &rw(&[(DATA, 20, true)]), &limits()).0.unwrap().kind, RequestKind::GetId);
}

#[test]
fn chain_too_short_or_bad_status_is_dropped() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let e = err(&m, &[(HDR, 16, false)], &limits());
    assert_eq!(e, RequestError { kind: RequestErrorKind::ChainTooShort, status: None });
    // Status read-only, wrong size, outside memory: no status byte can be written.
    for st in [(STATUS, 1, false), (STATUS, 2, true), (MEM_SIZE as u64 + 4096, 1, true)] {
        let e = err(&m, &[(HDR, 16, false), (DATA, 512, true), st], &limits());
        assert_eq!(e, RequestError { kind: RequestErrorKind::BadStatus, status: None }, "{st:?}");
    }
}

#[test]
fn bad_header() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    for h in [(HDR, 8, false), (HDR, 24, false), (HDR, 16, true)] {
        let e = err(&m, &[h, (DATA, 512, true), (STATUS, 1, true)], &limits());
        assert_ioerr(e, RequestErrorKind::BadHeader);
    }
    let e = err(&m, &[(MEM_SIZE as u64 - 8, 16, false), (STATUS, 1, true)], &limits());
    assert_ioerr(e, RequestErrorKind::HeaderUnreadable);
}

#[test]
fn wrong_data_direction() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_ioerr(err(&m, &rw(&[(DATA, 512, false)]), &limits()), RequestErrorKind::WrongDirection);
    header(&m, VIRTIO_BLK_T_OUT, 0);
    assert_ioerr(err(&m, &rw(&[(DATA, 512, false), (DATA, 512, true)]), &limits()), RequestErrorKind::WrongDirection);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_ioerr(err(&m, &rw(&[(DATA, 512, true)]), &limits()), RequestErrorKind::WrongDirection);
}

#[test]
fn range_and_alignment() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 2048);
    assert_ioerr(err(&m, &rw(&[(DATA, 512, true)]), &limits()), RequestErrorKind::OutOfRange);
    header(&m, VIRTIO_BLK_T_IN, 2047);
    assert_ioerr(err(&m, &rw(&[(DATA, 1024, true)]), &limits()), RequestErrorKind::OutOfRange);
    header(&m, VIRTIO_BLK_T_IN, u64::MAX);
    assert_ioerr(err(&m, &rw(&[(DATA, 512, true)]), &limits()), RequestErrorKind::OutOfRange);
    header(&m, VIRTIO_BLK_T_IN, u64::MAX / 512);
    assert_ioerr(err(&m, &rw(&[(DATA, 512, true)]), &limits()), RequestErrorKind::OutOfRange);
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_ioerr(err(&m, &rw(&[(DATA, 100, true)]), &limits()), RequestErrorKind::Unaligned);
    let l4k = Limits { block_size: 4096, ..limits() };
    header(&m, VIRTIO_BLK_T_IN, 1);
    assert_ioerr(err(&m, &rw(&[(DATA, 4096, true)]), &l4k), RequestErrorKind::Unaligned);
    header(&m, VIRTIO_BLK_T_IN, 8);
    assert_ioerr(err(&m, &rw(&[(DATA, 512, true)]), &l4k), RequestErrorKind::Unaligned);
    assert!(run(&m, &rw(&[(DATA, 4096, true)]), &l4k).0.is_ok());
}

#[test]
fn segment_limits_and_memory_bounds() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let many: Vec<D> = (0..=SEG_MAX).map(|i| (DATA + u64::from(i) * 512, 512, true)).collect();
    assert_ioerr(err(&m, &rw(&many), &limits()), RequestErrorKind::TooManySegments);
    let exact: Vec<D> = (0..SEG_MAX).map(|i| (DATA + u64::from(i) * 512, 512, true)).collect();
    let big = Limits { capacity_sectors: 1 << 20, ..limits() };
    assert!(run(&m, &rw(&exact), &big).0.is_ok());
    assert_ioerr(err(&m, &rw(&[(DATA, SIZE_MAX + 512, true)]), &big), RequestErrorKind::SegmentTooLarge);
    assert_ioerr(
        err(&m, &rw(&[(MEM_SIZE as u64 - 512, 1024, true)]), &limits()),
        RequestErrorKind::BufferOutsideMemory,
    );
    assert_ioerr(err(&m, &rw(&[(u64::MAX - 511, 512, true)]), &limits()), RequestErrorKind::BufferOutsideMemory);
}

#[test]
fn read_only_refuses_writes() {
    let m = mem();
    let ro = Limits { read_only: true, ..limits() };
    header(&m, VIRTIO_BLK_T_OUT, 0);
    assert_ioerr(err(&m, &rw(&[(DATA, 512, false)]), &ro), RequestErrorKind::ReadOnly);
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_ioerr(err(&m, &rw(&[(DATA, 16, false)]), &ro), RequestErrorKind::ReadOnly);
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert!(run(&m, &rw(&[(DATA, 512, true)]), &ro).0.is_ok());
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert!(run(&m, &rw(&[]), &ro).0.is_ok());
}

#[test]
fn unsupported_types_get_unsupp() {
    let m = mem();
    for t in [2u32, 99, VIRTIO_BLK_T_SECURE_ERASE] {
        header(&m, t, 0);
        let e = err(&m, &rw(&[(DATA, 512, false)]), &limits());
        assert_eq!(e.kind, RequestErrorKind::Unsupported(t));
        assert_eq!(e.kind.status_byte(), VIRTIO_BLK_S_UNSUPP as u8);
    }
    // Discard without the feature negotiated.
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    let no = Limits { discard: false, ..limits() };
    assert_eq!(err(&m, &rw(&[(DATA, 16, false)]), &no).kind, RequestErrorKind::Unsupported(VIRTIO_BLK_T_DISCARD));
}

fn segments(m: &GuestMemoryMmap, segs: &[(u64, u32, u32)]) -> u32 {
    let mut b = Vec::new();
    for &(s, n, f) in segs {
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&f.to_le_bytes());
    }
    m.write_slice(&b, GuestAddress(DATA)).unwrap();
    b.len() as u32
}

#[test]
fn discard_and_write_zeroes_segments() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let len = segments(&m, &[(0, 8, 1), (100, 4, 0)]);
    // The payload split across two descriptors at an odd boundary still parses.
    let (r, s) = run(&m, &rw(&[(DATA, 5, false), (DATA + 5, len - 5, false)]), &limits());
    assert_eq!(r.unwrap().kind, RequestKind::WriteZeroes);
    assert_eq!(
        s.segments,
        vec![Segment { offset: 0, len: 4096, unmap: true }, Segment { offset: 51200, len: 2048, unmap: false }]
    );
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    let len = segments(&m, &[(0, 8, 1)]);
    let e = err(&m, &rw(&[(DATA, len, false)]), &limits());
    assert_eq!(e.kind, RequestErrorKind::UnsupportedFlags);
    assert_eq!(e.kind.status_byte(), VIRTIO_BLK_S_UNSUPP as u8);
    let len = segments(&m, &[(0, 8, 4)]);
    assert_eq!(err(&m, &rw(&[(DATA, len, false)]), &limits()).kind, RequestErrorKind::UnsupportedFlags);
    assert_ioerr(err(&m, &rw(&[(DATA, 15, false)]), &limits()), RequestErrorKind::BadSegments);
    assert_ioerr(err(&m, &rw(&[]), &limits()), RequestErrorKind::BadSegments);
    let many: Vec<(u64, u32, u32)> = (0..=MAX_DISCARD_SEG).map(|i| (u64::from(i) * 8, 8, 0)).collect();
    let len = segments(&m, &many);
    assert_eq!(err(&m, &rw(&[(DATA, len, false)]), &limits()).kind, RequestErrorKind::UnsupportedFlags);
    let len = segments(&m, &[(2040, 16, 0)]);
    assert_ioerr(err(&m, &rw(&[(DATA, len, false)]), &limits()), RequestErrorKind::OutOfRange);
    let len = segments(&m, &[(u64::MAX, 1, 0)]);
    assert_ioerr(err(&m, &rw(&[(DATA, len, false)]), &limits()), RequestErrorKind::OutOfRange);
    let len = segments(&m, &[(1, 8, 0)]);
    let l4k = Limits { block_size: 4096, ..limits() };
    assert_ioerr(err(&m, &rw(&[(DATA, len, false)]), &l4k), RequestErrorKind::Unaligned);
}

#[test]
fn descriptor_loop_terminates_without_status() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let q = MockSplitQueue::new(&m, 16);
    // Two descriptors pointing at each other forever.
    let next = (VRING_DESC_F_NEXT) as u16;
    q.desc_table().store(0, RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1))).unwrap();
    q.desc_table().store(1, RawDescriptor::from(SplitDescriptor::new(DATA, 512, next, 0))).unwrap();
    q.avail().ring().ref_at(0).unwrap().store(0u16);
    q.avail().idx().store(1u16);
    let mut queue: Queue = q.create_queue().unwrap();
    let chain = queue.pop_descriptor_chain(&m).unwrap();
    let mut scratch = Scratch::default();
    let e = parse(chain, &m, &limits(), &mut scratch).unwrap_err();
    assert_eq!(e, RequestError { kind: RequestErrorKind::BadStatus, status: None });
}

#[test]
fn kernel_filled_buffers_are_logged_dirty() {
    let m: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 20), 1 << 20)]).unwrap();
    // A buffer crossing the two regions, and one inside the first.
    mark_written(&m, &[(GuestAddress((1 << 20) - 4096), 8192, true), (GuestAddress(0x3000), 100, true)]);
    let dirty = |a: u64| {
        let slice = m.get_slice(GuestAddress(a), 1).unwrap();
        vm_memory::bitmap::Bitmap::dirty_at(slice.bitmap(), 0)
    };
    assert!(dirty((1 << 20) - 4096));
    assert!(dirty(1 << 20));
    assert!(dirty((1 << 20) + 4095));
    assert!(dirty(0x3000));
    assert!(!dirty(0x5000));
    assert!(!dirty((1 << 20) + 8192));
}

/// Regression input from fuzzing (fuzz/fuzz_targets/virtio_request.rs): a FLUSH chain that
/// also carries an odd-sized data buffer is a flush — the data is ignored, never read or
/// written, whatever its length, and the sector field does not matter (QEMU does the same).
#[test]
fn flush_with_data_descriptors_is_a_plain_flush() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_FLUSH, 7);
    let (r, _) = run(&m, &rw(&[(DATA, 8191, false)]), &Limits { capacity_sectors: 12, ..limits() });
    let r = r.unwrap();
    assert_eq!(r.kind, RequestKind::Flush);
    assert_eq!(r.status, GuestAddress(STATUS));
}
