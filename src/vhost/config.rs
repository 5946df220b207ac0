//! What the device offers: virtio feature bits, vhost-user protocol features, and the
//! virtio-blk configuration space (virtio 1.2 §5.2.4).

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// `VHOST_F_LOG_ALL`: the device can log its writes to guest memory (live migration, COLO).
pub const VHOST_F_LOG_ALL: u32 = 26;

/// Largest number of data segments in one request (advertised as `seg_max`). Stays below
/// `IOV_MAX` so a request is always one `preadv`/`pwritev`.
pub const SEG_MAX: u32 = 254;
/// Largest data segment in bytes (advertised as `size_max`). libblkio computes
/// `size_max * seg_max` as an i32 (max transfer), so the product must stay below 2 GiB.
pub const SIZE_MAX: u32 = 8 << 20;
const _: () = assert!((SIZE_MAX as u64) * (SEG_MAX as u64) < i32::MAX as u64);
/// Largest discard / write-zeroes segment, in 512-byte sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Largest number of segments in one discard / write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Size of the virtio-blk configuration space we describe (up to `write_zeroes_may_unmap`
/// and its padding; secure erase and zoned fields are not offered).
pub const CONFIG_LEN: usize = 60;

/// Static properties of the device, fixed for the process lifetime except the capacity,
/// which `block_resize` changes (the live value is [`super::Shared::capacity_sectors`]).
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Capacity in 512-byte sectors at start.
    pub capacity_sectors: u64,
    /// Logical block size (512 or 4096).
    pub block_size: u32,
    /// Read-only device (offers VIRTIO_BLK_F_RO, refuses writes).
    pub read_only: bool,
    /// Number of request queues.
    pub num_queues: u16,
    /// Maximum queue size.
    pub queue_size: u16,
    /// Serial number returned by GET_ID (at most 20 bytes are used).
    pub serial: String,
}

impl DeviceConfig {
    /// The virtio feature bits the device offers.
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VHOST_F_LOG_ALL,
        ]
        .iter()
        .fold(0u64, |acc, b| acc | 1 << b);
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        }
        bits | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// The vhost-user protocol features the device offers. REPLY_ACK is also added by the
    /// vhost crate; it is listed so the intent is explicit. BACKEND_REQ gives the backend its
    /// request channel, on which `block_resize` sends CONFIG_CHANGE_MSG (`vhost::notify`).
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    /// The configuration space bytes, little-endian as virtio 1.x requires, with the
    /// capacity the device had at start.
    pub fn config_space(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        self.config_space_at(self.capacity_sectors, writeback)
    }

    /// The configuration space bytes for a capacity of `capacity_sectors`.
    pub fn config_space_at(&self, capacity_sectors: u64, writeback: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let sectors_per_block = self.block_size / 512;
        put(&mut c, 0, &capacity_sectors.to_le_bytes()); // capacity
        put(&mut c, 8, &SIZE_MAX.to_le_bytes()); // size_max
        put(&mut c, 12, &SEG_MAX.to_le_bytes()); // seg_max
        // 16..20: geometry (not offered)
        put(&mut c, 20, &self.block_size.to_le_bytes()); // blk_size
        c[24] = 0; // physical_block_exp
        c[25] = 0; // alignment_offset
        put(&mut c, 26, &1u16.to_le_bytes()); // min_io_size (in blocks)
        put(&mut c, 28, &0u32.to_le_bytes()); // opt_io_size
        c[32] = u8::from(writeback); // writeback
        put(&mut c, 34, &self.num_queues.to_le_bytes()); // num_queues
        put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(&mut c, 40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        put(&mut c, 44, &sectors_per_block.to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(&mut c, 52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Reads `size` bytes of the configuration space at `offset`; bytes past the fields we
    /// describe read as zero, so the answer always has exactly the requested size (QEMU
    /// insists on that).
    pub fn read_config(&self, writeback: bool, offset: u32, size: u32) -> Vec<u8> {
        self.read_config_at(self.capacity_sectors, writeback, offset, size)
    }

    /// Like [`DeviceConfig::read_config`] for a capacity of `capacity_sectors`.
    pub fn read_config_at(&self, capacity_sectors: u64, writeback: bool, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space_at(capacity_sectors, writeback);
        let size = size.min(vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE) as usize;
        let mut out = vec![0u8; size];
        let start = offset as usize;
        if start < space.len() {
            let n = (space.len() - start).min(size);
            out[..n].copy_from_slice(&space[start..start + n]);
        }
        out
    }
}

/// Offset of the `writeback` byte, the only field a driver may write (CONFIG_WCE).
pub const WRITEBACK_OFFSET: u32 = 32;

fn put(c: &mut [u8], at: usize, bytes: &[u8]) {
    c[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Whether the device runs in writeback mode given the acked features and the driver's
/// `writeback` byte (virtio 1.2 §5.2.6.3): with CONFIG_WCE the byte decides; without it the
/// cache is writeback exactly when FLUSH was negotiated.
pub fn writeback_mode(acked: u64, wce_byte: Option<bool>) -> bool {
    if acked & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0 {
        wce_byte.unwrap_or(true)
    } else {
        acked & (1 << VIRTIO_BLK_F_FLUSH) != 0
    }
}

/// How long `stop_vring` and disconnect wait for in-flight requests.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ro: bool) -> DeviceConfig {
        DeviceConfig {
            capacity_sectors: 2048,
            block_size: 4096,
            read_only: ro,
            num_queues: 4,
            queue_size: 256,
            serial: "s".into(),
        }
    }

    #[test]
    fn features_include_required_bits() {
        let f = cfg(false).features();
        for b in [1, 2, 6, 9, 10, 11, 12, 13, 14, 26, 28, 29, 30, 32] {
            assert!(f & (1 << b) != 0, "bit {b} missing");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert!(cfg(true).features() & (1 << VIRTIO_BLK_F_RO) != 0);
    }

    #[test]
    fn protocol_features_cover_frontends() {
        let p = DeviceConfig::protocol_features();
        for need in [
            VhostUserProtocolFeatures::CONFIG,
            VhostUserProtocolFeatures::MQ,
            VhostUserProtocolFeatures::REPLY_ACK,
            VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            VhostUserProtocolFeatures::LOG_SHMFD,
            VhostUserProtocolFeatures::BACKEND_REQ,
        ] {
            assert!(p.contains(need));
        }
        assert!(!p.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    }

    #[test]
    fn config_space_layout() {
        let c = cfg(false).config_space(true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
        assert_eq!(cfg(false).config_space(false)[32], 0);
    }

    #[test]
    fn read_config_returns_exact_size() {
        let d = cfg(false);
        assert_eq!(d.read_config(true, 0, 60).len(), 60);
        let long = d.read_config(true, 0, 128);
        assert_eq!(long.len(), 128);
        assert!(long[60..].iter().all(|&b| b == 0));
        let tail = d.read_config(true, 32, 4);
        assert_eq!(tail, vec![1, 0, 4, 0]);
        assert_eq!(d.read_config(true, 4000, 8), vec![0; 8]);
    }

    #[test]
    fn writeback_follows_wce_or_flush() {
        let wce = 1 << VIRTIO_BLK_F_CONFIG_WCE;
        let flush = 1 << VIRTIO_BLK_F_FLUSH;
        assert!(writeback_mode(wce | flush, None));
        assert!(!writeback_mode(wce | flush, Some(false)));
        assert!(writeback_mode(flush, Some(false)));
        assert!(!writeback_mode(0, None));
    }
}
