//! Negotiated, device-wide state of one vhost-user connection, read by every queue worker
//! (atomics: the workers never lock it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES};

use super::config::{DeviceConfig, writeback_mode};
use super::request::Limits;

/// Negotiated, device-wide state read by every worker.
#[derive(Debug)]
pub struct Shared {
    /// Static device properties.
    pub cfg: DeviceConfig,
    pub(super) acked: AtomicU64,
    /// 0 = driver never wrote `writeback`, 1 = writethrough, 2 = writeback.
    pub(super) wce: AtomicU8,
    writeback: AtomicBool,
    pub(super) event_idx: AtomicBool,
    quiescing: Arc<AtomicBool>,
    poll: Duration,
    inflight: super::proxy::InflightSlot,
    /// The live capacity in sectors: process-wide, changed by `block_resize`.
    capacity: Arc<AtomicU64>,
    /// The frontend's backend request channel, once it handed one over.
    channel: super::notify::ChannelSlot,
}

impl Shared {
    /// State for a fresh connection. `quiescing` is process-wide (set on shutdown).
    pub fn new(cfg: DeviceConfig, quiescing: Arc<AtomicBool>, poll: Duration) -> Self {
        Shared {
            acked: AtomicU64::new(0),
            wce: AtomicU8::new(0),
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            quiescing,
            poll,
            inflight: Default::default(),
            capacity: Arc::new(AtomicU64::new(cfg.capacity_sectors)),
            channel: Default::default(),
            cfg,
        }
    }

    /// Shares the process-wide capacity (`block_resize` changes it for every connection).
    pub fn with_capacity(mut self, capacity: Arc<AtomicU64>) -> Self {
        self.capacity = capacity;
        self
    }

    /// The capacity in 512-byte sectors the guest sees now.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// The connection's backend request channel (set by the relay on SET_BACKEND_REQ_FD).
    pub fn channel(&self) -> &super::notify::ChannelSlot {
        &self.channel
    }

    /// Where the connection's inflight-tracking region is put once the frontend set it up.
    pub fn inflight_slot(&self) -> super::proxy::InflightSlot {
        self.inflight.clone()
    }

    /// The features the driver acked.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// True when writes may complete before they are durable.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Acquire)
    }

    /// True when VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.event_idx.load(Ordering::Acquire)
    }

    /// True while the frontend asked for dirty logging (VHOST_F_LOG_ALL acked).
    pub fn logging(&self) -> bool {
        self.acked() & (1 << super::config::VHOST_F_LOG_ALL) != 0
    }

    /// How long a worker keeps polling its ring after the last work before sleeping.
    pub fn poll(&self) -> Duration {
        self.poll
    }

    /// True once shutdown started: workers stop taking new requests.
    pub fn quiescing(&self) -> bool {
        self.quiescing.load(Ordering::Acquire)
    }

    /// The parser's view of the device.
    pub fn limits(&self) -> Limits {
        let acked = self.acked();
        Limits {
            capacity_sectors: self.capacity_sectors(),
            block_size: self.cfg.block_size,
            read_only: self.cfg.read_only,
            discard: acked & (1 << VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: acked & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0,
        }
    }

    pub(super) fn update_writeback(&self) {
        let wce = match self.wce.load(Ordering::Acquire) {
            0 => None,
            1 => Some(false),
            _ => Some(true),
        };
        let wb = writeback_mode(self.acked(), wce);
        if self.writeback.swap(wb, Ordering::AcqRel) != wb {
            log::info!("cache mode: {}", if wb { "writeback" } else { "writethrough" });
        }
    }
}
