//! One virtqueue's worker: pops chains, parses them, submits them to the block stack, and
//! completes them out of order as the I/O finishes.
//!
//! Each queue has its own worker thread (see `queues_per_thread`), its own [`BlockQueue`] and
//! its own request slots, so queues never share a lock on the data path. Slots are indexed by
//! the chain's head descriptor, which the driver cannot reuse while the request is in flight.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};

use super::inflight::{InflightRegion, read_chain};
use super::request::{self, ID_LEN, Request, RequestKind, Scratch};
use super::shared::Shared;
use crate::block::{BlockQueue, Buffers, Completion, IoRequest, OpKind, WorkerCompletions};
use crate::io::buffers::IovecList;
use crate::logging::limit::LogLimit;
use crate::stats::{OpClass, QueueStats};

/// Guest memory with the dirty-log bitmap vhost-user-backend fills in on SET_LOG_BASE.
pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;
/// The atomically replaceable guest memory shared with the vhost-user handler.
pub type AtomicMem = GuestMemoryAtomic<Mem>;
/// The vring type the backend uses.
pub type Vring = VringRwLock<AtomicMem>;

/// Counts a queue's requests in flight so `stop_vring`, disconnect and shutdown can wait.
#[derive(Debug, Default)]
pub struct Drain {
    inflight: AtomicUsize,
    /// Threads inside `wait_idle`; the worker only takes the lock to wake them when non-zero
    /// (a condvar notify is a syscall, too costly to pay on every idle transition).
    waiters: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Drain {
    fn begin(&self) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
    }

    fn end(&self, n: usize) {
        if n > 0 && self.inflight.fetch_sub(n, Ordering::AcqRel) == n && self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
        }
    }

    /// Requests currently in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Waits until nothing is in flight or `timeout` passes; logs progress every second.
    /// Returns whether the queue drained.
    pub fn wait_idle(&self, what: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _registered = WaiterGuard(&self.waiters);
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.inflight() > 0 {
            let now = Instant::now();
            if now >= deadline {
                log::error!("{what}: {} requests still in flight after {:?}", self.inflight(), timeout);
                return false;
            }
            let step = (deadline - now).min(Duration::from_secs(1));
            let (ng, res) = self.cv.wait_timeout(g, step).unwrap_or_else(|e| e.into_inner());
            g = ng;
            if res.timed_out() && self.inflight() > 0 {
                log::warn!("{what}: waiting for {} requests in flight", self.inflight());
            }
        }
        true
    }
}

struct WaiterGuard<'a>(&'a AtomicUsize);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Slot {
    busy: bool,
    kind: Option<RequestKind>,
    status_addr: GuestAddress,
    status: u8,
    pending: u32,
    used_len: u32,
    bytes: u64,
    started: Option<Instant>,
    /// The worker's request number (see [`QueueWorker::busy_before`]).
    seq: u64,
    mem: Option<Arc<Mem>>,
    scratch: Scratch,
}

/// Marks the guest pages behind `data` dirty in the memory's log bitmap. Needed for every
/// buffer the kernel (io_uring, preadv) filled directly, because only writes made through
/// vm-memory are logged automatically.
pub fn mark_written<B: Bitmap>(mem: &GuestMemoryMmap<B>, data: &[(GuestAddress, u32, bool)]) {
    for &(addr, len, _) in data {
        for s in mem.get_slices(addr, len as usize).flatten() {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
}

/// The smallest nonzero poll window (QEMU's adaptive polling starts there too).
const POLL_MIN: Duration = Duration::from_micros(4);

/// The state of one queue's worker.
pub struct QueueWorker {
    index: usize,
    /// Handed to the orphan reaper if anything is still in flight at teardown (see `Drop`).
    io: ManuallyDrop<Box<dyn BlockQueue>>,
    /// The eventfd every layer of `io` signals when something completes.
    done: Arc<WorkerCompletions>,
    shared: Arc<Shared>,
    mem: AtomicMem,
    stats: Arc<QueueStats>,
    drain: Arc<Drain>,
    /// One per descriptor head: the state of the request that head started. The I/O itself
    /// points only into memory its [`IoRequest`] owns.
    slots: Vec<Slot>,
    completions: Vec<Completion>,
    pending_used: Vec<(u16, u32)>,
    /// Requests finished whose used entries are in `pending_used`, not yet published.
    finished: usize,
    /// The inflight-tracking region, once the frontend set one up (INFLIGHT_SHMFD).
    inflight: Option<Arc<InflightRegion>>,
    /// Orders pops in the inflight region.
    inflight_counter: u64,
    /// The number the next validated request gets.
    next_seq: u64,
    /// Set when the ring itself is unusable (virtio 1.2 §2.1.2: the device stops using a
    /// queue it found in an inconsistent state); cleared when the frontend stops the ring
    /// (GET_VRING_BASE) or resets the device, and a new connection starts afresh.
    broken: bool,
    /// The adaptive poll window (at most [`Shared::poll`]; see [`QueueWorker::adapt_poll`]).
    poll_window: Duration,
    /// When this worker last went to sleep with nothing in flight, having polled in vain.
    idle_since: Option<Instant>,
    bad_input: LogLimit,
    io_errors: LogLimit,
    /// Errors of the ring or the frontend's descriptors (memory gone, call fd refused).
    ring_errors: LogLimit,
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        let busy = self.slots.iter().filter(|s| s.busy).count();
        // SAFETY: `io` is not used again: this is the worker's drop.
        let io = unsafe { ManuallyDrop::take(&mut self.io) };
        if busy > 0 {
            // The block stack still holds these requests (a drain that timed out): the kernel
            // may still write into their memory, and a layer may hold resources for them.
            // The queue is kept, and reaped elsewhere until they came back (orphans.rs).
            let owed = self.slots.iter().filter(|s| s.busy).map(|s| s.pending as usize).sum();
            log::error!(
                "queue {}: {busy} requests still in flight at teardown; their queue is kept until they complete",
                self.index
            );
            super::orphans::adopt(super::orphans::Orphan::new(self.index, io, self.done.clone(), owed));
        }
    }
}

/// What one pop from the avail ring gave.
enum Pop<'a> {
    Chain(virtio_queue::DescriptorChain<&'a Mem>),
    Empty,
    /// The ring is inconsistent (avail index too far ahead, ring not readable).
    Broken(String),
}

/// Pops one chain. Unlike `pop_descriptor_chain` (which logs and returns nothing on an
/// error, so a caller retrying on "there is more" spins), a ring error is reported.
fn pop<'a>(q: &mut virtio_queue::Queue, mem: &'a Mem) -> Pop<'a> {
    // Read first: a driver only moves the index forward, so if this read already shows
    // work, an empty iterator below means a failure, not a race with the driver.
    let idx = match q.avail_idx(mem, Ordering::Acquire) {
        Ok(i) => i.0,
        Err(e) => return Pop::Broken(format!("avail index unreadable: {e}")),
    };
    if idx == q.next_avail() {
        return Pop::Empty;
    }
    let chain = match q.iter(mem) {
        Ok(mut it) => it.next(),
        Err(e) => {
            return Pop::Broken(format!("{e} (avail index {idx}, next {}, size {})", q.next_avail(), q.size()));
        }
    };
    match chain {
        Some(c) => Pop::Chain(c),
        None => Pop::Broken(format!("avail entry {} unreadable", q.next_avail())),
    }
}

impl QueueWorker {
    /// A worker for queue `index` submitting to `io`, which was opened with `completions`.
    pub fn new(
        index: usize,
        io: Box<dyn BlockQueue>,
        completions: Arc<WorkerCompletions>,
        shared: Arc<Shared>,
        mem: AtomicMem,
        stats: Arc<QueueStats>,
        drain: Arc<Drain>,
    ) -> Self {
        let slots = (0..shared.cfg.queue_size).map(|_| Slot::default()).collect();
        QueueWorker {
            index,
            io: ManuallyDrop::new(io),
            done: completions,
            shared,
            mem,
            stats,
            drain,
            slots,
            completions: Vec::with_capacity(256),
            pending_used: Vec::with_capacity(256),
            finished: 0,
            inflight: None,
            inflight_counter: 1,
            next_seq: 0,
            broken: false,
            poll_window: Duration::ZERO,
            idle_since: None,
            bad_input: LogLimit::new(),
            io_errors: LogLimit::new(),
            ring_errors: LogLimit::new(),
        }
    }

    /// The completion notifier of the worker's block stack, to register on its epoll.
    pub fn notifier(&self) -> std::os::fd::RawFd {
        self.done.fd()
    }

    /// The number the next request started will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// True while a request numbered below `mark` still has I/O in flight.
    pub fn busy_before(&self, mark: u64) -> bool {
        self.slots.iter().any(|s| s.busy && s.seq < mark)
    }

    /// True once the ring was found inconsistent and the worker stopped using it.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// The frontend stopped the ring (GET_VRING_BASE) or reset the device: the ring it
    /// starts next is a new one, so a broken queue may be used again.
    pub fn reset_broken(&mut self) {
        if std::mem::take(&mut self.broken) {
            log::info!("queue {}: reset by the frontend; usable again", self.index);
        }
    }

    fn mark_broken(&mut self, why: &str) {
        if self.broken {
            return;
        }
        self.broken = true;
        self.stats.record_dropped();
        if self.ring_errors.allow() {
            log::error!(
                "queue {}: {why}; the queue is broken and stays stopped until the frontend resets it",
                self.index
            );
        }
    }

    /// Handles a kick: pops every available chain, submits, and completes what is done.
    pub fn process_queue(&mut self, vring: &Vring) {
        self.adapt_poll();
        self.run_queue(vring);
        self.poll_for_work(vring);
    }

    /// Handles the block queue's completion notification.
    pub fn process_completions(&mut self, vring: &Vring) {
        self.done.clear();
        self.complete(vring);
        self.poll_for_work(vring);
    }

    /// Adapts the poll window to how long the worker just slept, as QEMU's adaptive polling
    /// does: a kick that came within the maximum window ([`Shared::poll`], `--poll-us`)
    /// would have been caught by polling, so the window grows (doubling from 4 µs); a kick
    /// that came later means polling only burnt CPU, so the window drops to 0. A driver with
    /// a steady stream of requests keeps the window open; an idle or slow one costs no CPU.
    fn adapt_poll(&mut self) {
        let Some(since) = self.idle_since.take() else { return };
        let max = self.shared.poll();
        let slept = since.elapsed();
        self.poll_window = if slept > max {
            Duration::ZERO
        } else if self.poll_window.is_zero() {
            POLL_MIN.min(max)
        } else {
            (self.poll_window * 2).min(max)
        };
    }

    /// Busy-polls the avail ring for up to the adaptive poll window ([`adapt_poll`]) while
    /// nothing is in flight, with driver notifications off, so a busy driver need not kick
    /// and this thread need not sleep and wake between its requests. While requests are in
    /// flight the worker sleeps instead: the completion eventfd wakes it, and the CPU stays
    /// free for the I/O itself (spinning then measured slower on a 2-core host).
    fn poll_for_work(&mut self, vring: &Vring) {
        if self.shared.poll().is_zero() {
            return;
        }
        if self.drain.inflight() == 0 {
            self.idle_since = Some(Instant::now());
        }
        let window = self.poll_window;
        if window.is_zero() {
            return;
        }
        let mem = self.mem.memory();
        while self.drain.inflight() == 0 && !self.shared.quiescing() && !self.broken {
            let start = Instant::now();
            let _ = vring.disable_notification();
            let found = loop {
                let work = {
                    let state = vring.get_ref();
                    let q = state.get_queue();
                    q.ready() && q.avail_idx(&*mem, Ordering::Acquire).is_ok_and(|i| i.0 != q.next_avail())
                };
                if work {
                    break true;
                }
                if self.shared.quiescing() || start.elapsed() >= window {
                    break false;
                }
                std::hint::spin_loop();
            };
            // Handles what arrived and re-arms notifications (EVENT_IDX), so the ring is
            // consistent whenever this thread goes back to sleep.
            self.run_queue(vring);
            if !found {
                break;
            }
            // Polling paid off: the next sleep is measured from the end of this round.
            self.idle_since = Some(Instant::now());
        }
        if self.drain.inflight() > 0 {
            // Requests went in flight: the worker sleeps until they complete, not idle.
            self.idle_since = None;
        }
    }

    /// Picks up the inflight region the frontend set up; the first time, resubmits what the
    /// previous process left in flight (a reconnect after a crash).
    fn sync_inflight(&mut self, vring: &Vring, mem: &Arc<Mem>) {
        if self.inflight.is_some() {
            return;
        }
        let Some(region) = self.shared.inflight_slot().lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        let Some(q) = u16::try_from(self.index).ok().and_then(|i| region.queue(i)) else { return };
        let (ring_used, table, size) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (queue.used_idx(&**mem, Ordering::Acquire).map_or(0, |w| w.0), queue.desc_table(), queue.size())
        };
        let (heads, max) = q.recover(ring_used);
        self.inflight_counter = max + 1;
        self.inflight = Some(region.clone());
        if heads.is_empty() {
            return;
        }
        log::warn!(
            "queue {}: resubmitting {} requests left in flight by the previous process",
            self.index,
            heads.len()
        );
        vring.get_mut().get_queue_mut().set_next_avail(ring_used.wrapping_add(heads.len() as u16));
        for head in heads {
            let chain = read_chain(&**mem, table, size, head);
            self.start(head, chain.into_iter(), mem);
        }
    }

    fn run_queue(&mut self, vring: &Vring) {
        let mem = self.mem.memory().into_inner();
        self.sync_inflight(vring, &mem);
        let event_idx = self.shared.event_idx();
        loop {
            if event_idx
                && let Err(e) = vring.disable_notification()
                && self.ring_errors.allow()
            {
                log::error!("queue {}: cannot disable notifications: {e}", self.index);
            }
            loop {
                if self.shared.quiescing() || self.broken {
                    break;
                }
                let popped = {
                    let mut state = vring.get_mut();
                    let q = state.get_queue_mut();
                    if !q.ready() { Pop::Empty } else { pop(q, &mem) }
                };
                match popped {
                    Pop::Chain(chain) => {
                        let head = chain.head_index();
                        self.start(head, chain, &mem);
                    }
                    Pop::Empty => break,
                    Pop::Broken(why) => self.mark_broken(&why),
                }
            }
            if let Err(e) = self.io.submit()
                && self.io_errors.allow()
            {
                log::error!("queue {}: submit failed: {e}", self.index);
            }
            if !event_idx || self.shared.quiescing() || self.broken {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    if self.ring_errors.allow() {
                        log::error!("queue {}: cannot enable notifications: {e}", self.index);
                    }
                    break;
                }
            }
        }
        self.complete(vring);
    }

    fn start<I>(&mut self, head: u16, chain: I, mem: &Arc<Mem>)
    where
        I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let Some(slot) = self.slots.get_mut(usize::from(head)) else {
            if self.bad_input.allow() {
                log::error!("queue {}: head {head} beyond queue size; dropped", self.index);
            }
            self.stats.record_dropped();
            return;
        };
        if slot.busy {
            // A driver bug or a hostile guest: the head is already in flight. Answering it would
            // complete the in-flight request twice, so the chain is dropped.
            if self.bad_input.allow() {
                log::warn!("queue {}: head {head} reused while in flight; dropped", self.index);
            }
            self.stats.record_dropped();
            return;
        }
        if let Some(q) = self.inflight.as_ref().and_then(|r| r.queue(self.index as u16)) {
            q.begin(head, self.inflight_counter);
            self.inflight_counter += 1;
        }
        let limits = self.shared.limits();
        let req = match request::parse(chain, &**mem, &limits, &mut slot.scratch) {
            Ok(req) => req,
            Err(e) => {
                if self.bad_input.allow() {
                    log::warn!("queue {}: bad request (head {head}): {e}", self.index);
                }
                match e.status {
                    Some(addr) => {
                        self.stats.record_invalid();
                        if mem.write_obj(e.kind.status_byte(), addr).is_ok() {
                            self.used(head, 1);
                        } else {
                            self.stats.record_dropped();
                        }
                    }
                    None => {
                        // Nowhere to put a status: the head still goes back to the driver
                        // (used length 0), which also clears it from the inflight region, so
                        // a reconnect does not resubmit it.
                        self.stats.record_dropped();
                        self.used(head, 0);
                    }
                }
                return;
            }
        };
        slot.busy = true;
        slot.kind = Some(req.kind);
        slot.status_addr = req.status;
        slot.status = VIRTIO_BLK_S_OK as u8;
        slot.pending = 0;
        slot.used_len = 1;
        slot.bytes = req.data_len;
        slot.started = Some(Instant::now());
        slot.seq = self.next_seq;
        self.next_seq += 1;
        slot.mem = Some(mem.clone());
        self.drain.begin();
        self.submit_request(head, &req, mem);
        if self.slots[usize::from(head)].pending == 0 {
            self.finish(head);
        }
    }

    /// Pushes the block operations of a validated request; `pending` counts them.
    fn submit_request(&mut self, head: u16, req: &Request, mem: &Arc<Mem>) {
        let writeback = self.shared.writeback();
        let slot = &mut self.slots[usize::from(head)];
        let index = self.index;
        let io_errors = &self.io_errors;
        let push = |io: &mut Box<dyn BlockQueue>, slot: &mut Slot, request: IoRequest| match io.push(request) {
            Ok(()) => slot.pending += 1,
            Err(rejected) => {
                if io_errors.allow() {
                    log::error!("queue {index}: cannot queue I/O: {}", rejected.error);
                }
                slot.scratch.iovecs = IovecList(rejected.request.bufs.into_iovecs());
                slot.status = VIRTIO_BLK_S_IOERR as u8;
            }
        };
        let token = u64::from(head);
        match req.kind {
            RequestKind::Read | RequestKind::Write => {
                if req.data_len == 0 {
                    return;
                }
                if req.kind == RequestKind::Read {
                    slot.used_len = slot.used_len.saturating_add(u32::try_from(req.data_len).unwrap_or(u32::MAX));
                }
                let iovecs = std::mem::take(&mut slot.scratch.iovecs).0;
                let owner: crate::io::buffers::Owner = mem.clone();
                // SAFETY: `request::parse` resolved every iovec inside one region of `mem`
                // (vm-memory's `get_slices`, bounds-checked), and the buffers hold `mem`, so the
                // regions stay mapped as long as the request lives, whatever memory table the
                // frontend sets meanwhile.
                let bufs = unsafe { Buffers::from_raw(iovecs, Some(owner)) };
                let kind = if req.kind == RequestKind::Read {
                    OpKind::Read { offset: req.offset }
                } else {
                    OpKind::Write { offset: req.offset, dsync: !writeback }
                };
                push(&mut self.io, slot, IoRequest::new(token, kind, bufs));
            }
            RequestKind::Flush => push(&mut self.io, slot, IoRequest::new(token, OpKind::Flush, Buffers::none())),
            RequestKind::GetId => {
                let mut id = [0u8; ID_LEN];
                let serial = self.shared.cfg.serial.as_bytes();
                let n = serial.len().min(ID_LEN);
                id[..n].copy_from_slice(&serial[..n]);
                let mut written = 0usize;
                for &(addr, len, _) in &slot.scratch.data {
                    let take = (len as usize).min(ID_LEN - written);
                    if take == 0 {
                        break;
                    }
                    if mem.write_slice(&id[written..written + take], addr).is_err() {
                        slot.status = VIRTIO_BLK_S_IOERR as u8;
                        return;
                    }
                    written += take;
                }
                slot.used_len += written as u32;
                slot.bytes = written as u64;
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                let segments = std::mem::take(&mut slot.scratch.segments);
                for s in &segments {
                    let kind = if req.kind == RequestKind::Discard {
                        OpKind::Discard { offset: s.offset, len: s.len }
                    } else {
                        OpKind::WriteZeroes { offset: s.offset, len: s.len, unmap: s.unmap }
                    };
                    push(&mut self.io, slot, IoRequest::new(token, kind, Buffers::none()));
                }
                slot.bytes = segments.iter().map(|s| s.len).sum();
                slot.scratch.segments = segments;
            }
        }
    }

    /// Reaps the block queue and completes every request whose operations all finished.
    fn complete(&mut self, vring: &Vring) -> bool {
        self.io.reap(&mut self.completions);
        let any = !self.completions.is_empty();
        let mut completions = std::mem::take(&mut self.completions);
        for c in completions.drain(..) {
            let Ok(head) = u16::try_from(c.token()) else {
                continue;
            };
            let Some(slot) = self.slots.get_mut(usize::from(head)) else {
                continue;
            };
            if !slot.busy || slot.pending == 0 {
                if self.io_errors.allow() {
                    log::error!("queue {}: completion for idle slot {head}", self.index);
                }
                continue;
            }
            if c.result < 0 {
                slot.status = VIRTIO_BLK_S_IOERR as u8;
                if self.io_errors.allow() {
                    log::error!(
                        "queue {}: {:?} failed: {}",
                        self.index,
                        slot.kind,
                        std::io::Error::from_raw_os_error(-c.result)
                    );
                }
            }
            if matches!(c.request.kind, OpKind::Read { .. } | OpKind::Write { .. }) {
                // The iovec array comes home for the slot's next request.
                slot.scratch.iovecs = IovecList(c.request.bufs.into_iovecs());
            }
            slot.pending -= 1;
            if slot.pending == 0 {
                self.finish(head);
            }
        }
        self.completions = completions;
        self.flush_used(vring);
        any
    }

    /// Writes the status byte, marks read data dirty, and queues the used-ring entry.
    fn finish(&mut self, head: u16) {
        let slot = &mut self.slots[usize::from(head)];
        let Some(mem) = slot.mem.take() else { return };
        let ok = slot.status == VIRTIO_BLK_S_OK as u8;
        let kind = slot.kind.take();
        if ok && kind == Some(RequestKind::Read) && self.shared.logging() {
            // The kernel wrote these pages behind vm-memory's back: log them for migration /
            // COLO. Marked at completion, once the data is really there.
            mark_written(&*mem, &slot.scratch.data);
        }
        if mem.write_obj(slot.status, slot.status_addr).is_err() && self.ring_errors.allow() {
            log::error!("queue {}: status byte of head {head} no longer in guest memory", self.index);
        }
        let class = match kind {
            Some(RequestKind::Read) => OpClass::Read,
            Some(RequestKind::Write) => OpClass::Write,
            Some(RequestKind::Flush) => OpClass::Flush,
            Some(RequestKind::Discard | RequestKind::WriteZeroes) => OpClass::Discard,
            Some(RequestKind::GetId) | None => OpClass::Other,
        };
        let elapsed = slot.started.take().map(|t| t.elapsed()).unwrap_or_default();
        self.stats.record(class, slot.bytes, ok, elapsed);
        let used_len = if ok { slot.used_len } else { 1 };
        slot.busy = false;
        self.pending_used.push((head, used_len));
        // The drain counter drops only once the used entry is published (`flush_used`):
        // GET_VRING_BASE must not be answered while a completion is not in the ring yet.
        self.finished += 1;
    }

    fn used(&mut self, head: u16, len: u32) {
        self.pending_used.push((head, len));
    }

    /// Publishes queued used entries and notifies the driver once per batch (EVENT_IDX aware).
    fn flush_used(&mut self, vring: &Vring) {
        if self.pending_used.is_empty() {
            return;
        }
        let mut state = vring.get_mut();
        let inflight = self.inflight.as_ref().and_then(|r| r.queue(self.index as u16));
        for &(head, len) in &self.pending_used {
            if let Some(q) = inflight {
                q.before_used(head);
            }
            if let Err(e) = state.add_used(head, len)
                && self.ring_errors.allow()
            {
                log::error!("queue {}: cannot add used entry {head}: {e}", self.index);
            }
            if let Some(q) = inflight {
                q.after_used(head, state.get_queue().next_used());
            }
        }
        self.pending_used.clear();
        self.drain.end(std::mem::take(&mut self.finished));
        let notify = if self.shared.event_idx() { state.needs_notification().unwrap_or(true) } else { true };
        if notify
            && let Err(e) = state.signal_used_queue()
            && self.ring_errors.allow()
        {
            log::error!("queue {}: cannot signal the driver: {e}", self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::block::{IoEngineError, Rejected};
    use crate::vhost::DeviceConfig;

    /// A block queue that records being dropped.
    struct Tracked(Arc<AtomicBool>);

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl BlockQueue for Tracked {
        fn push(&mut self, _request: IoRequest) -> Result<(), Box<Rejected>> {
            Ok(())
        }
        fn submit(&mut self) -> Result<(), IoEngineError> {
            Ok(())
        }
        fn reap(&mut self, _out: &mut Vec<Completion>) {}
    }

    fn worker(dropped: &Arc<AtomicBool>) -> QueueWorker {
        let shared = Arc::new(Shared::new(cfg(), Arc::new(AtomicBool::new(false)), Duration::ZERO));
        QueueWorker::new(
            0,
            Box::new(Tracked(dropped.clone())),
            WorkerCompletions::new().unwrap(),
            shared,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            Arc::new(QueueStats::default()),
            Arc::new(Drain::default()),
        )
    }

    /// A block queue whose operations complete only when the test releases them.
    #[derive(Default, Clone)]
    struct Held(Arc<Mutex<(Vec<IoRequest>, Vec<IoRequest>)>>);

    impl Held {
        fn release(&self, token: u64) {
            let mut g = self.0.lock().unwrap();
            let (held, released) = &mut *g;
            if let Some(i) = held.iter().position(|r| r.token == token) {
                released.push(held.remove(i));
            }
        }
    }

    impl BlockQueue for Held {
        fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
            self.0.lock().unwrap().0.push(request);
            Ok(())
        }
        fn submit(&mut self) -> Result<(), IoEngineError> {
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            out.extend(self.0.lock().unwrap().1.drain(..).map(|request| Completion { request, result: 0 }));
        }
    }

    fn cfg() -> DeviceConfig {
        DeviceConfig {
            capacity_sectors: 2048,
            block_size: 512,
            read_only: false,
            num_queues: 1,
            queue_size: 4,
            serial: "s".into(),
        }
    }

    /// Writes a one-sector write request for `sector` whose buffers start at `base`, and
    /// returns its chain and status address.
    fn write_chain(mem: &Mem, base: u64, sector: u64) -> (Vec<virtio_queue::desc::split::Descriptor>, GuestAddress) {
        use virtio_queue::desc::split::Descriptor;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(base)).unwrap();
        let write = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        let chain = vec![
            Descriptor::new(base, 16, 0, 0),
            Descriptor::new(base + 0x100, 512, 0, 0),
            Descriptor::new(base + 0x400, 1, write, 0),
        ];
        (chain, GuestAddress(base + 0x400))
    }

    /// The shrink fence of `block_resize` (BlkBackend::wait_started_before): requests started
    /// before a mark stay visible until their I/O completed, later ones do not count, and a
    /// request parsed after the shared capacity dropped is refused without any I/O.
    #[test]
    fn busy_before_covers_exactly_the_requests_started_before_the_mark() {
        let held = Held::default();
        let capacity = Arc::new(std::sync::atomic::AtomicU64::new(2048));
        let shared = Arc::new(
            Shared::new(cfg(), Arc::new(AtomicBool::new(false)), Duration::ZERO).with_capacity(capacity.clone()),
        );
        let mem: Arc<Mem> = Arc::new(Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let atomic = GuestMemoryAtomic::new((*mem).clone());
        let mut w = QueueWorker::new(
            0,
            Box::new(held.clone()),
            WorkerCompletions::new().unwrap(),
            shared,
            atomic.clone(),
            Arc::new(QueueStats::default()),
            Arc::new(Drain::default()),
        );
        let vring = <Vring as VringT<AtomicMem>>::new(atomic, 4).unwrap();

        let (c0, _) = write_chain(&mem, 0x10000, 2040);
        w.start(0, c0.into_iter(), &mem);
        let mark = w.next_seq();
        assert!(w.busy_before(mark), "the request in flight is not covered");
        let (c1, _) = write_chain(&mem, 0x20000, 8);
        w.start(1, c1.into_iter(), &mem);
        assert!(!w.busy_before(0));
        held.release(1);
        w.complete(&vring);
        assert!(w.busy_before(mark), "a later request's completion ended the wait");
        let (c3, _) = write_chain(&mem, 0x28000, 16);
        w.start(3, c3.into_iter(), &mem);
        held.release(0);
        w.complete(&vring);
        assert!(!w.busy_before(mark), "a request started after the mark holds the wait");
        assert!(w.busy_before(w.next_seq()), "the later request is still in flight");
        held.release(3);
        w.complete(&vring);

        // The capacity shrinks below sector 2040: the same request is now refused at parse,
        // with IOERR, and nothing reaches the block queue.
        capacity.store(1024, Ordering::SeqCst);
        let (c2, status) = write_chain(&mem, 0x30000, 2040);
        w.start(2, c2.into_iter(), &mem);
        assert!(!w.busy_before(w.next_seq()));
        assert!(held.0.lock().unwrap().0.is_empty(), "a request past the new end was submitted");
        let st: u8 = mem.read_obj(status).unwrap();
        assert_eq!(st, virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8);
    }

    /// A block queue that reports its drop on a channel, around a [`Held`].
    struct HeldTracked(Held, std::sync::mpsc::Sender<()>);

    impl Drop for HeldTracked {
        fn drop(&mut self) {
            let _ = self.1.send(());
        }
    }

    impl BlockQueue for HeldTracked {
        fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
            self.0.push(request)
        }
        fn submit(&mut self) -> Result<(), IoEngineError> {
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            self.0.reap(out)
        }
    }

    /// A worker torn down with a request in flight (a drain that timed out) neither frees the
    /// block queue under the I/O nor keeps it forever: the queue lives until the request
    /// completes, then goes, with the guest memory the request held.
    #[test]
    fn teardown_keeps_a_busy_queue_until_its_requests_complete() {
        let held = Held::default();
        let (tx, dropped) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared::new(cfg(), Arc::new(AtomicBool::new(false)), Duration::ZERO));
        let mem: Arc<Mem> = Arc::new(Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let atomic = GuestMemoryAtomic::new((*mem).clone());
        let done = WorkerCompletions::new().unwrap();
        let mut w = QueueWorker::new(
            0,
            Box::new(HeldTracked(held.clone(), tx)),
            done.clone(),
            shared,
            atomic,
            Arc::new(QueueStats::default()),
            Arc::new(Drain::default()),
        );
        let (chain, _) = write_chain(&mem, 0x10000, 8);
        w.start(0, chain.into_iter(), &mem);
        drop(w);
        done.wake();
        assert!(dropped.recv_timeout(Duration::from_millis(300)).is_err(), "block queue freed under I/O in flight");
        assert_eq!(Arc::strong_count(&mem), 2, "guest memory released under I/O in flight");

        held.release(0);
        done.wake();
        dropped.recv_timeout(Duration::from_secs(10)).expect("the queue outlived its last request");
        assert_eq!(Arc::strong_count(&mem), 1, "the finished request's guest memory is still held");

        let idle = Arc::new(AtomicBool::new(false));
        drop(worker(&idle));
        assert!(idle.load(Ordering::SeqCst), "an idle worker must free its queue");
    }
}
