//! The vhost-user-blk device: the `&self` [`VhostUserBackend`] implementation.
//!
//! Every queue has its own worker thread (`queues_per_thread` = one bit per thread) and its
//! own [`QueueWorker`] behind a mutex that only that thread and `stop_vring` ever take, so
//! queues run in parallel. Device-wide negotiated state lives in [`Shared`] as atomics.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

use super::config::DRAIN_TIMEOUT;
use super::config::{DeviceConfig, WRITEBACK_OFFSET};
pub use super::shared::Shared;
use super::worker::{AtomicMem, Drain, QueueWorker, Vring};
use crate::block::{BlockDevice, BlockError, IoEngineError, WorkerCompletions};
use crate::logging::limit::LogLimit;
use crate::stats::QueueStats;

struct QueueSlot {
    worker: Mutex<QueueWorker>,
    drain: Arc<Drain>,
}

/// One exit eventfd per worker thread, created once and lent to every connection's
/// handler. vhost-user-backend turns the consumer into a raw descriptor for its epoll and
/// never closes it, so a fresh pair per connection would leak one descriptor per queue at
/// every reconnect.
#[derive(Debug)]
pub struct ExitEvents(Vec<(EventConsumer, EventNotifier)>);

impl ExitEvents {
    /// `threads` pairs.
    pub fn new(threads: usize) -> io::Result<Arc<Self>> {
        let v = (0..threads)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Arc::new(ExitEvents(v)))
    }

    fn lend(&self, thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.0.get(thread)?;
        // The previous connection's exit notification may still be pending.
        let _ = consumer.consume();
        let notifier = notifier.try_clone().ok()?;
        // SAFETY: an alias of a descriptor this value keeps open for the daemon's lifetime.
        // The handler immediately converts it back with `into_raw_fd` (it never closes it),
        // so the alias is never dropped as an owner.
        let alias = unsafe { EventConsumer::from_raw_fd(consumer.as_raw_fd()) };
        Some((alias, notifier))
    }
}

/// The backend of one frontend connection.
pub struct BlkBackend {
    shared: Arc<Shared>,
    queues: Vec<QueueSlot>,
    device: Arc<dyn BlockDevice>,
    exit_events: Arc<ExitEvents>,
}

/// Event id of a worker's block-queue completion notifier (ids up to `num_queues` are taken
/// by vhost-user-backend).
pub fn completion_event_id(num_queues: usize) -> u16 {
    u16::try_from(num_queues + 1).unwrap_or(u16::MAX)
}

impl BlkBackend {
    /// Builds the backend for a new connection: one worker (and one block queue) per queue.
    pub fn new(
        shared: Arc<Shared>,
        device: &Arc<dyn BlockDevice>,
        mem: AtomicMem,
        stats: &[Arc<QueueStats>],
        exit_events: Arc<ExitEvents>,
    ) -> Result<Self, BlockError> {
        let n = usize::from(shared.cfg.num_queues);
        let mut queues = Vec::with_capacity(n);
        for (i, stats) in stats.iter().enumerate().take(n) {
            let completions = WorkerCompletions::new().map_err(|e| BlockError::Engine(IoEngineError::Setup(e)))?;
            let io = device.open_queue(u32::from(shared.cfg.queue_size), &completions)?;
            let drain = Arc::new(Drain::default());
            let worker =
                QueueWorker::new(i, io, completions, shared.clone(), mem.clone(), stats.clone(), drain.clone());
            queues.push(QueueSlot { worker: Mutex::new(worker), drain });
        }
        Ok(BlkBackend { shared, queues, device: device.clone(), exit_events })
    }

    /// The completion notifier of each queue (index = worker thread), for epoll registration.
    pub fn notifiers(&self) -> Vec<std::os::fd::RawFd> {
        self.queues.iter().map(|q| lock(&q.worker).notifier()).collect()
    }

    /// Waits for every queue's in-flight requests; returns whether all drained in time.
    pub fn drain_all(&self, timeout: Duration) -> bool {
        self.queues.iter().enumerate().all(|(i, q)| q.drain.wait_idle(&format!("queue {i}"), timeout))
    }

    /// Waits until every request started before this call has finished its I/O, so that
    /// after a capacity change nothing validated against the old capacity still runs.
    /// Returns false when `timeout` passed first.
    ///
    /// A worker parses and submits under its lock, so once each lock has been taken here,
    /// requests numbered from the mark on were validated against the capacity stored before
    /// this call. Completion has no event of its own per request, so the wait polls each
    /// worker briefly (an administrative operation, not the data path).
    pub fn wait_started_before(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let marks: Vec<u64> = self.queues.iter().map(|q| lock(&q.worker).next_seq()).collect();
        for (q, mark) in self.queues.iter().zip(marks) {
            while lock(&q.worker).busy_before(mark) {
                if std::time::Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        true
    }

    /// Requests in flight over all queues.
    pub fn inflight(&self) -> usize {
        self.queues.iter().map(|q| q.drain.inflight()).sum()
    }

    /// The negotiated state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.shared.cfg.features()
    }

    fn acked_features(&self, features: u64) {
        // QEMU re-sends the same features at every VM stop/start (COLO: every checkpoint).
        if self.shared.acked.swap(features, Ordering::AcqRel) != features {
            log::info!("features negotiated: {features:#x}");
        } else {
            log::debug!("features acknowledged again: {features:#x}");
        }
        self.shared.update_writeback();
        self.device.frontend_starting(self.shared.logging());
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        DeviceConfig::protocol_features()
    }

    fn reset_device(&self) {
        for q in &self.queues {
            lock(&q.worker).reset_broken();
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.shared.cfg.read_config_at(self.shared.capacity_sectors(), self.shared.writeback(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the `writeback` byte is writable (virtio 1.2 §5.2.5).
        if offset != WRITEBACK_OFFSET || buf.len() != 1 {
            static REFUSED: LogLimit = LogLimit::new();
            if REFUSED.allow() {
                log::warn!("refused config write of {} bytes at offset {offset}", buf.len());
            }
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.shared.wce.store(if buf[0] != 0 { 2 } else { 1 }, Ordering::Release);
        self.shared.update_writeback();
        Ok(())
    }

    fn update_memory(&self, _mem: AtomicMem) -> io::Result<()> {
        // The workers hold a clone of the same GuestMemoryAtomic, which the handler updates in
        // place; each request pins the snapshot it started with.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.lend(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(q) = self.queues.get(queue_index as usize) else {
            return Ok(());
        };
        // The handler marked the queue not ready before calling us; taking the worker lock
        // once makes sure a pop that raced with that has registered its request. The ring
        // the frontend starts next is a new one: a broken queue may run again.
        lock(&q.worker).reset_broken();
        if !q.drain.wait_idle(&format!("stop queue {queue_index}"), DRAIN_TIMEOUT) {
            // Answering would hand the frontend a ring index covering requests that have not
            // completed; failing ends the connection instead (the frontend reconnects, and
            // with inflight tracking resubmits them). The memory they use stays alive.
            return Err(io::Error::new(io::ErrorKind::TimedOut, "requests still in flight after the drain timeout"));
        }
        self.device.frontend_stopped();
        Ok(())
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[Vring], thread_id: usize) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let (Some(q), Some(vring)) = (self.queues.get(thread_id), vrings.first()) else {
            return Ok(());
        };
        let mut worker = lock(&q.worker);
        if device_event == completion_event_id(self.queues.len()) {
            worker.process_completions(vring);
        } else if device_event == 0 {
            worker.process_queue(vring);
        } else {
            static UNEXPECTED: LogLimit = LogLimit::new();
            if UNEXPECTED.allow() {
                log::warn!("queue {thread_id}: unexpected event {device_event}");
            }
        }
        Ok(())
    }
}
