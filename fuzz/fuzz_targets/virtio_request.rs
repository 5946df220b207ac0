//! virtio-blk request parsing over arbitrary descriptor chains and guest memory: whatever the
//! guest puts there, the parser answers Ok or an error, never panics, and a request it
//! accepts stays inside the disk and inside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use colo_blk::vhost::request::{Limits, Scratch, parse};

/// Guest memory: two regions with a hole between them, so translations can cross edges.
const R0: (u64, usize) = (0x0, 0x4000);
const R1: (u64, usize) = (0x8000, 0x4000);

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (ctl, rest) = data.split_at(8);
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(R0.0), R0.1), (GuestAddress(R1.0), R1.1)])
        .expect("guest memory");
    let limits = Limits {
        capacity_sectors: u64::from(u16::from_le_bytes([ctl[0], ctl[1]])) + if ctl[2] & 1 != 0 { u64::MAX / 1024 } else { 0 },
        block_size: if ctl[2] & 2 != 0 { 4096 } else { 512 },
        read_only: ctl[2] & 4 != 0,
        discard: ctl[2] & 8 != 0,
        write_zeroes: ctl[2] & 16 != 0,
    };
    // Descriptors first (14 bytes each, up to 300), then guest memory content.
    let n = (usize::from(u16::from_le_bytes([ctl[4], ctl[5]])) % 301).min(rest.len() / 14);
    let (desc_bytes, content) = rest.split_at(n * 14);
    let descs: Vec<Descriptor> = desc_bytes
        .chunks_exact(14)
        .map(|c| {
            let addr = u64::from_le_bytes(c[0..8].try_into().unwrap());
            // Mostly addresses near the regions, so the interesting paths are reached.
            let addr = if ctl[3] & 1 != 0 { addr } else { addr % 0x10000 };
            let len = u32::from_le_bytes(c[8..12].try_into().unwrap());
            let len = if ctl[3] & 2 != 0 { len } else { len % 0x2000 };
            let flags = u16::from_le_bytes([c[12], c[13]]) & 0x7;
            Descriptor::new(addr, len, flags, 0)
        })
        .collect();
    // Guest memory content (headers, segments live here); repeated to fill the first region.
    if !content.is_empty() {
        let mut fill = Vec::with_capacity(R0.1);
        while fill.len() < R0.1 {
            fill.extend_from_slice(content);
        }
        fill.truncate(R0.1);
        mem.write_slice(&fill, GuestAddress(0)).expect("fill");
        mem.write_slice(&fill, GuestAddress(R1.0)).expect("fill");
    }
    let mut scratch = Scratch::default();
    if let Ok(req) = parse(descs.into_iter(), &mem, &limits, &mut scratch) {
        let end = req.offset.checked_add(req.data_len).expect("offset + length overflows");
        // Reads and writes stay inside the disk (a flush may carry ignored data, as QEMU
        // accepts it too; GET_ID's buffer is not disk data).
        use colo_blk::vhost::request::RequestKind;
        if matches!(req.kind, RequestKind::Read | RequestKind::Write) {
            assert!(end <= limits.capacity_sectors.saturating_mul(512), "{req:?} {limits:?}");
            assert!(req.data_len % u64::from(limits.block_size) == 0, "{req:?} {limits:?}");
        }
        for seg in &scratch.segments {
            assert!(seg.offset.checked_add(seg.len).is_some_and(|e| e <= limits.capacity_sectors.saturating_mul(512)));
        }
        // Every iovec points into one of the two regions.
        let host = |a: u64| -> (u64, u64) {
            let base = |g: u64| mem.get_host_address(GuestAddress(g)).unwrap() as u64;
            (base(a), base(a))
        };
        let regions = [(host(R0.0).0, R0.1 as u64), (host(R1.0).0, R1.1 as u64)];
        for v in &scratch.iovecs {
            let (b, l) = (v.iov_base as u64, v.iov_len as u64);
            assert!(regions.iter().any(|&(s, n)| b >= s && b + l <= s + n), "iovec outside guest memory");
        }
    }
});
