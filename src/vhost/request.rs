//! Turning a descriptor chain into a validated virtio-blk request (virtio 1.2 §5.2.6).
//!
//! Layout assumed (what Linux, SeaBIOS, OVMF and libblkio send): the first descriptor is the
//! 16-byte device-readable header, the last one the 1-byte device-writable status, and the
//! descriptors in between are the data. Every guest-controlled value is checked here, so the
//! layers below can trust a [`Request`]: directions, sizes against the advertised limits,
//! ranges against the capacity (with checked arithmetic), and that every buffer lies inside
//! guest memory. Nothing here touches files.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SEG_MAX, SIZE_MAX};

/// Size of the request header (`type`, `reserved`, `sector`).
pub const HEADER_LEN: u32 = 16;
/// Size of one discard / write-zeroes segment.
pub const SEGMENT_LEN: u32 = 16;
/// Bytes of the GET_ID answer.
pub const ID_LEN: usize = 20;
const SECTOR: u64 = 512;

/// The request types the device executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// VIRTIO_BLK_T_IN: read into the data buffers.
    Read,
    /// VIRTIO_BLK_T_OUT: write from the data buffers.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the serial number.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
}

/// One range of a discard / write-zeroes request, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The UNMAP flag (write-zeroes only).
    pub unmap: bool,
}

/// What the parser knows about the device and the negotiated features.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size; offsets and lengths must be multiples of it.
    pub block_size: u32,
    /// Refuse writes, discards and write-zeroes.
    pub read_only: bool,
    /// DISCARD was negotiated.
    pub discard: bool,
    /// WRITE_ZEROES was negotiated.
    pub write_zeroes: bool,
}

/// Reusable buffers a parsed request points into (no allocation per request once warm).
#[derive(Debug, Default)]
pub struct Scratch {
    /// Data descriptors: guest address, length, device-writable.
    pub data: Vec<(GuestAddress, u32, bool)>,
    /// Discard / write-zeroes ranges.
    pub segments: Vec<Segment>,
    /// Host addresses of the data buffers, ready for `preadv`/`pwritev` (a descriptor that
    /// spans two memory regions yields two entries).
    pub iovecs: crate::io::buffers::IovecList,
}

/// A validated request. Its data descriptors / segments are in the [`Scratch`] it was parsed
/// with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// Byte offset on the disk (reads and writes).
    pub offset: u64,
    /// Total data length in bytes.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain was refused. [`RequestError::status`] decides what the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestErrorKind {
    /// The chain has fewer than two descriptors (no room for header and status).
    #[error("descriptor chain too short")]
    ChainTooShort,
    /// The last descriptor is not a device-writable single byte in guest memory.
    #[error("status descriptor missing, read-only, wrong size or outside guest memory")]
    BadStatus,
    /// The first descriptor is device-writable or not exactly 16 bytes.
    #[error("header descriptor is writable or not 16 bytes")]
    BadHeader,
    /// The header could not be read from guest memory.
    #[error("header outside guest memory")]
    HeaderUnreadable,
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor direction does not match the request type")]
    WrongDirection,
    /// More data descriptors than `seg_max`.
    #[error("more than {SEG_MAX} data segments")]
    TooManySegments,
    /// A data descriptor is larger than `size_max`.
    #[error("data segment larger than {SIZE_MAX} bytes")]
    SegmentTooLarge,
    /// A data buffer lies (partly) outside guest memory.
    #[error("data buffer outside guest memory")]
    BufferOutsideMemory,
    /// Length or offset not a multiple of the logical block size.
    #[error("length or offset not aligned to the logical block size")]
    Unaligned,
    /// The range ends beyond the capacity (or overflows).
    #[error("range beyond the end of the disk")]
    OutOfRange,
    /// A write-type request on a read-only device.
    #[error("write to a read-only device")]
    ReadOnly,
    /// Discard / write-zeroes payload malformed (length, count, sizes).
    #[error("malformed discard/write-zeroes payload")]
    BadSegments,
    /// Discard / write-zeroes with flags the device does not support.
    #[error("unsupported discard/write-zeroes flags")]
    UnsupportedFlags,
    /// Request type unknown or not negotiated.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

/// A refused chain and where (if anywhere) its status byte can be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct RequestError {
    /// What was wrong.
    pub kind: RequestErrorKind,
    /// The status byte's address, when the chain has a valid one.
    pub status: Option<GuestAddress>,
}

impl RequestErrorKind {
    /// The virtio status the guest gets for this error (virtio 1.2 §5.2.6.1: unsupported
    /// types and flags are UNSUPP, everything else IOERR).
    pub fn status_byte(&self) -> u8 {
        match self {
            RequestErrorKind::Unsupported(_) | RequestErrorKind::UnsupportedFlags => VIRTIO_BLK_S_UNSUPP as u8,
            RequestErrorKind::ChainTooShort
            | RequestErrorKind::BadStatus
            | RequestErrorKind::BadHeader
            | RequestErrorKind::HeaderUnreadable
            | RequestErrorKind::WrongDirection
            | RequestErrorKind::TooManySegments
            | RequestErrorKind::SegmentTooLarge
            | RequestErrorKind::BufferOutsideMemory
            | RequestErrorKind::Unaligned
            | RequestErrorKind::OutOfRange
            | RequestErrorKind::ReadOnly
            | RequestErrorKind::BadSegments => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Parses one chain. `descs` yields the chain's descriptors (the virtio-queue iterator already
/// follows indirect tables and stops descriptor loops after queue-size steps).
pub fn parse<M: GuestMemoryBackend + ?Sized>(
    descs: impl Iterator<Item = Descriptor>,
    mem: &M,
    limits: &Limits,
    scratch: &mut Scratch,
) -> Result<Request, RequestError> {
    scratch.data.clear();
    scratch.segments.clear();
    scratch.iovecs.clear();
    let mut header: Option<Descriptor> = None;
    let mut last: Option<Descriptor> = None;
    let mut count: u32 = 0;
    let mut overflow = false;
    for d in descs {
        count = count.saturating_add(1);
        match header {
            None => header = Some(d),
            Some(_) => {
                if let Some(prev) = last.replace(d) {
                    // `prev` is a data descriptor (not the last of the chain).
                    if scratch.data.len() < SEG_MAX as usize {
                        scratch.data.push((prev.addr(), prev.len(), prev.is_write_only()));
                    } else {
                        overflow = true;
                    }
                }
            }
        }
    }
    let (Some(header), Some(status)) = (header, last) else {
        return Err(RequestError { kind: RequestErrorKind::ChainTooShort, status: None });
    };
    if !status.is_write_only() || status.len() != 1 || !mem.check_range(status.addr(), 1) {
        return Err(RequestError { kind: RequestErrorKind::BadStatus, status: None });
    }
    let fail = |kind| Err(RequestError { kind, status: Some(status.addr()) });
    if header.is_write_only() || header.len() != HEADER_LEN {
        return fail(RequestErrorKind::BadHeader);
    }
    let Ok(raw) = mem.read_obj::<[u8; 16]>(header.addr()) else {
        return fail(RequestErrorKind::HeaderUnreadable);
    };
    let req_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap_or([0; 8]));

    let kind = match req_type {
        VIRTIO_BLK_T_IN => RequestKind::Read,
        VIRTIO_BLK_T_OUT => RequestKind::Write,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        VIRTIO_BLK_T_DISCARD if limits.discard => RequestKind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES if limits.write_zeroes => RequestKind::WriteZeroes,
        other => return fail(RequestErrorKind::Unsupported(other)),
    };
    if overflow {
        return fail(RequestErrorKind::TooManySegments);
    }
    // Device-writable data for reads and GET_ID, device-readable for everything else.
    let want_writable = matches!(kind, RequestKind::Read | RequestKind::GetId);
    let mut data_len: u64 = 0;
    for &(addr, len, writable) in &scratch.data {
        if writable != want_writable {
            return fail(RequestErrorKind::WrongDirection);
        }
        if len > SIZE_MAX {
            return fail(RequestErrorKind::SegmentTooLarge);
        }
        // Resolving the buffer to host memory is also the bounds check: every byte of
        // [addr, addr + len) must lie in some guest memory region.
        for slice in mem.get_slices(addr, len as usize) {
            let Ok(slice) = slice else {
                return fail(RequestErrorKind::BufferOutsideMemory);
            };
            scratch.iovecs.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() });
        }
        data_len += u64::from(len); // at most SEG_MAX * SIZE_MAX: cannot overflow
    }
    let req = Request { kind, offset: 0, data_len, status: status.addr() };
    match kind {
        RequestKind::Read | RequestKind::Write => {
            if kind == RequestKind::Write && limits.read_only {
                return fail(RequestErrorKind::ReadOnly);
            }
            let bs = u64::from(limits.block_size);
            let Some(offset) = sector.checked_mul(SECTOR) else {
                return fail(RequestErrorKind::OutOfRange);
            };
            if !offset.is_multiple_of(bs) || !data_len.is_multiple_of(bs) {
                return fail(RequestErrorKind::Unaligned);
            }
            let end = offset.checked_add(data_len);
            if end.is_none_or(|e| e > limits.capacity_sectors * SECTOR) {
                return fail(RequestErrorKind::OutOfRange);
            }
            Ok(Request { offset, ..req })
        }
        RequestKind::Flush => Ok(req),
        RequestKind::GetId => Ok(req),
        RequestKind::Discard | RequestKind::WriteZeroes => {
            if limits.read_only {
                return fail(RequestErrorKind::ReadOnly);
            }
            parse_segments(kind, mem, limits, scratch)
                .map_err(|kind| RequestError { kind, status: Some(status.addr()) })?;
            Ok(req)
        }
    }
}

/// Reads and validates the 16-byte segments of a discard / write-zeroes payload.
fn parse_segments<M: GuestMemoryBackend + ?Sized>(
    kind: RequestKind,
    mem: &M,
    limits: &Limits,
    scratch: &mut Scratch,
) -> Result<(), RequestErrorKind> {
    let total: u64 = scratch.data.iter().map(|&(_, l, _)| u64::from(l)).sum();
    if total == 0 || !total.is_multiple_of(u64::from(SEGMENT_LEN)) {
        return Err(RequestErrorKind::BadSegments);
    }
    if total / u64::from(SEGMENT_LEN) > u64::from(MAX_DISCARD_SEG) {
        // QEMU answers UNSUPP here too; Linux never exceeds the advertised count.
        return Err(RequestErrorKind::UnsupportedFlags);
    }
    let bs = u64::from(limits.block_size);
    let capacity = limits.capacity_sectors * SECTOR;
    let mut raw = [0u8; 16];
    let mut filled = 0usize;
    for &(addr, len, _) in &scratch.data {
        let mut at = 0u32;
        while at < len {
            let take = (len - at).min(16 - filled as u32) as usize;
            let a = addr.checked_add(u64::from(at)).ok_or(RequestErrorKind::BufferOutsideMemory)?;
            mem.read_slice(&mut raw[filled..filled + take], a).map_err(|_| RequestErrorKind::BufferOutsideMemory)?;
            filled += take;
            at += take as u32;
            if filled == 16 {
                filled = 0;
                let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or([0; 8]));
                let num = u32::from_le_bytes(raw[8..12].try_into().unwrap_or([0; 4]));
                let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or([0; 4]));
                let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (kind == RequestKind::Discard && unmap) {
                    return Err(RequestErrorKind::UnsupportedFlags);
                }
                if num > MAX_DISCARD_SECTORS {
                    return Err(RequestErrorKind::BadSegments);
                }
                let offset = sector.checked_mul(SECTOR).ok_or(RequestErrorKind::OutOfRange)?;
                let len = u64::from(num) * SECTOR;
                if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
                    return Err(RequestErrorKind::Unaligned);
                }
                if offset.checked_add(len).is_none_or(|e| e > capacity) {
                    return Err(RequestErrorKind::OutOfRange);
                }
                scratch.segments.push(Segment { offset, len, unmap });
            }
        }
    }
    Ok(())
}
