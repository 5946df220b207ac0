//! The primary: every guest write is also sent to the secondary over NBD, and the guest
//! request completes when both the local write and the forwarded one have completed
//! (DRBD's protocol C). A failed, dead or hung secondary never fails the guest: the error is
//! recorded, the range goes into a dirty bitmap, the link is reconnected with backoff and the
//! dirty ranges are copied again (incremental resync). `sync=full` copies the whole disk the
//! same way, in the background, while guest writes keep being mirrored.
//!
//! Ordering rule for the resync: a chunk's dirty bits are cleared when its copy starts. A guest
//! write whose lifetime (from being forwarded to completing locally) overlaps the copy of an
//! overlapping chunk sets its bits again when it completes locally, because the chunk may have
//! read the old data and may reach the secondary after the guest write did. So an older copy is
//! never the last word on the secondary: the range is copied once more.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::progress::JobClock;
use super::role::{Announce, RoleState};
use super::{EventSink, Mode, ReplicationControl, ReplicationError, Stage, StartArgs, SyncMode};
use crate::block::bitmap::SectorBitmap;
use crate::block::image::ImageData;
use crate::block::{
    BlockDevice, BlockError, BlockQueue, Buffers, Completion, IoEngineError, IoRequest, Lane, OpKind, Rejected,
    WorkerCompletions,
};
use crate::nbd::client::{self, NbdUri, Reply};
use crate::nbd::transport::Stream;
use crate::nbd::wire::{
    CMD_COLO_ADOPT, CMD_COLO_BARRIER, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    Request,
};

const SECTOR: u64 = 512;
/// Largest piece the resync copies at once.
const RESYNC_CHUNK: u64 = 2048; // sectors = 1 MiB
/// Largest hole of the local disk the resync clears with one WRITE_ZEROES (a colo-blk
/// secondary that replicates copies the old data of the range before answering, so this
/// bounds one request's work there well within the link timeout).
const ZERO_CHUNK: u64 = 64 * 2048; // sectors = 64 MiB
/// Resync chunks in flight at once (the copy's queue depth).
const RESYNC_DEPTH: usize = 8;
/// At most this many requests, or about this many payload bytes, go out in one `writev`.
const SEND_BATCH: usize = 64;
const SEND_BATCH_BYTES: usize = 4 << 20;
/// The link receiver's read buffer (a 16-byte reply each; a verify's payload passes through).
const REPLY_BUFFER: usize = 64 << 10;

/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Who waits for a forwarded request.
enum Waiter {
    /// A guest request: post its join index on the queue's lane.
    Queue(Arc<Lane<usize>>, usize),
    /// The resync or a barrier: a channel.
    Chan(mpsc::Sender<bool>),
    /// A verify request: the reply's payload, or why there is none.
    Payload(mpsc::Sender<Result<Vec<u8>, String>>),
}

/// What follows a successful reply (only verify requests have a payload; see `verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Nothing: a simple reply header.
    Nothing,
    /// A READ's data, this many bytes.
    Data(u32),
    /// A checksum answer of this many hashes.
    Hashes(u32),
}

struct Pending {
    sectors: (u64, u64),
    sent: Instant,
    expect: Expect,
    waiter: Waiter,
}

/// One NBD connection to the secondary.
struct Link {
    tx: mpsc::Sender<(Request, Payload)>,
    ctl: Stream,
    pending: Mutex<HashMap<u64, Pending>>,
    drained: Condvar,
    broken: AtomicBool,
    /// Why the link broke, set before `broken` (what a verify that finds it broken reports).
    why: std::sync::OnceLock<String>,
    /// The secondary is a colo-blk secondary that takes checkpoint barriers.
    colo: bool,
    /// The secondary takes WRITE_ZEROES (it advertised `NBD_FLAG_SEND_WRITE_ZEROES`): the
    /// resync sends holes and zero blocks that way instead of as data.
    write_zeroes: bool,
    /// The largest range one checksum request may cover; 0 when the secondary does not offer
    /// checksums (the verify then reads and compares).
    checksum_max: u32,
}

/// Settings of the mirror.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// The secondary (from `--secondary`; `replication-start` may give another).
    pub secondary: Option<NbdUri>,
    /// A forwarded request older than this breaks the link.
    pub timeout: Duration,
    /// TLS with a client certificate on the link (`--secondary-tls-creds`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// The primary's replication state, shared by all queues.
pub struct Mirror {
    disk: Arc<dyn ImageData>,
    size: u64,
    cfg: Mutex<MirrorConfig>,
    /// Stage, last error, events (shared with the secondary's way of reporting).
    role: RoleState,
    link: Mutex<Option<Arc<Link>>>,
    /// The manager's timed waits (woken when the link changes): `link_cv` waits on it.
    link_wait: Mutex<()>,
    link_cv: Condvar,
    dirty: SectorBitmap,
    /// Chunks the resync copied or is copying: (start clock, end clock or MAX, sectors).
    resync_log: Mutex<ResyncLog>,
    /// Orders write lifetimes against chunk copies.
    clock: AtomicU64,
    /// Resync chunks whose dirty bits were cleared and whose copy has not finished: counted
    /// before the bits are cleared and released after a failed copy set them again, so
    /// "bitmap empty and nothing in flight" means the secondary has every write.
    resync_inflight: AtomicU64,
    next_handle: AtomicU64,
    /// The last checkpoint barrier number used; raised to the secondary's last one at each
    /// connection, so numbers keep growing across restarts of this process.
    barrier_number: AtomicU64,
    generation: AtomicU64,
    ops: Mutex<()>,
    manager: AtomicBool,
    stats: MirrorStats,
    resync_clock: JobClock,
    /// The disk's data generations (windows.rs).
    gens: Mutex<Option<Arc<crate::replication::generation::Generations>>>,
    windows: Mutex<windows::Windows>,
    /// The split brain last reported (reported again only when it changes or after a link).
    split_reported: Mutex<Option<String>>,
    /// The activity log (activity.rs), for a disk that has one.
    activity: std::sync::OnceLock<activity::ActivityLog>,
    /// The online verify (`replication-verify`) and the write tracking it needs.
    verify: verify::Verify,
}

#[derive(Default)]
struct MirrorStats {
    /// NBD error code of the last refused barrier (0: none yet).
    barrier_refusal: std::sync::atomic::AtomicU32,
    forwarded_ops: AtomicU64,
    forwarded_bytes: AtomicU64,
    failed_ops: AtomicU64,
    resync_bytes: AtomicU64,
    /// Of `resync_bytes`: sent as WRITE payload, and sent as WRITE_ZEROES (holes and zero
    /// blocks of the local disk, no payload).
    resync_data: AtomicU64,
    resync_zero: AtomicU64,
    resync_total: AtomicU64,
    connects: AtomicU64,
    link_failures: AtomicU64,
    barriers: AtomicU64,
    last_barrier_us: AtomicU64,
    barrier_failures: AtomicU64,
    hook_flushes: AtomicU64,
    /// The VM device (re)started since the last hook barrier (see `hook_flush`).
    started_since_barrier: AtomicBool,
    /// `forwarded_ops` when the last hook barrier was sent.
    ops_at_barrier: AtomicU64,
}

/// Recent resync chunk copies, for the ordering rule.
#[derive(Default)]
struct ResyncLog {
    entries: std::collections::VecDeque<(u64, u64, u64, u64)>,
    /// Clock up to which entries were dropped: a write older than this re-dirties its range.
    floor: u64,
}

const RESYNC_LOG_LEN: usize = 4096;

/// One resync chunk being copied (see `Mirror::copy_chunks`).
struct ChunkCopy {
    /// Clock at the start of the copy (its resync-log entry).
    start: u64,
    /// Sectors [a, b).
    a: u64,
    b: u64,
    /// One receiver per request sent for the chunk; `None` when reading or sending failed.
    replies: Option<Vec<mpsc::Receiver<bool>>>,
    /// Bytes sent as data and as WRITE_ZEROES.
    data: u64,
    zero: u64,
    /// Nothing was sent: the range was dirtied again for the next round.
    requeued: bool,
}

impl ResyncLog {
    /// Whether a chunk copy of sectors overlapping [s0, s1) ran at any time in the clock
    /// interval (since, now); also returns how many entries it looked at.
    ///
    /// Entries are in start order and their end clocks never decrease: only the manager
    /// copies, one batch at a time, and a batch's copies end in order (`copy_chunks`); the
    /// copies still running are the last ones, with end `u64::MAX`. So the scan walks back
    /// from the newest and stops at the first entry that ended before `since`: it looks at
    /// the copies that overlap the write's lifetime, not at the whole log (up to 4,096
    /// entries after a large resync) on every mirrored write.
    fn overlaps(&self, s0: u64, s1: u64, since: u64, now: u64) -> (bool, usize) {
        if since < self.floor {
            return (true, 0);
        }
        let mut seen = 0;
        for &(start, end, a, b) in self.entries.iter().rev() {
            seen += 1;
            if end <= since {
                break;
            }
            if start < now && s0 < b && a < s1 {
                return (true, seen);
            }
        }
        (false, seen)
    }
}

/// The data of a forwarded write: for a guest write, the one copy of the guest's buffers that
/// both the local write and the forwarded one are written from (see [`MirrorDevice`]).
type Payload = Arc<AlignedBuf>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mirror {
    /// A mirror of `disk` (`size` bytes); idle until `replication-start {"mode":"primary"}`.
    pub fn new(disk: Arc<dyn ImageData>, size: u64, cfg: MirrorConfig) -> Arc<Self> {
        Arc::new(Mirror {
            disk,
            size,
            cfg: Mutex::new(cfg),
            role: RoleState::new("primary"),
            link: Mutex::new(None),
            link_wait: Mutex::new(()),
            link_cv: Condvar::new(),
            dirty: SectorBitmap::new(size / SECTOR),
            resync_log: Mutex::new(ResyncLog::default()),
            clock: AtomicU64::new(1),
            resync_inflight: AtomicU64::new(0),
            next_handle: AtomicU64::new(1),
            barrier_number: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            gens: Mutex::new(None),
            windows: Mutex::new(windows::Windows::default()),
            split_reported: Mutex::new(None),
            activity: std::sync::OnceLock::new(),
            ops: Mutex::new(()),
            manager: AtomicBool::new(false),
            stats: MirrorStats::default(),
            resync_clock: JobClock::default(),
            verify: verify::Verify::default(),
        })
    }

    /// Where stage, link and error events go.
    pub fn set_events(&self, sink: EventSink) {
        self.role.set_events(sink);
    }

    fn emit(&self, name: &str, data: Value) {
        self.role.emit(name, data);
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        self.role.stage()
    }

    fn set_stage(&self, s: Stage) {
        self.role.set_stage(s);
    }

    /// Records an error; a link that keeps failing reports once until the error is cleared.
    fn record_error(&self, msg: String) {
        self.role.record_error(msg, Announce::First);
    }

    fn running(&self) -> bool {
        self.stage() == Stage::Running
    }

    // ---- the link ---------------------------------------------------------------------------

    fn current_link(&self) -> Option<Arc<Link>> {
        lock(&self.link).clone().filter(|l| !l.broken.load(Ordering::Acquire))
    }

    /// Connects to the secondary for `purpose` (`Incremental` for a reconnect): a colo-blk
    /// secondary is first judged by its data generation (windows.rs).
    fn connect(self: &Arc<Self>, uri: &NbdUri, purpose: SyncMode) -> Result<Arc<Link>, ConnectError> {
        let (timeout, tls) = {
            let c = lock(&self.cfg);
            (c.timeout, c.tls.clone())
        };
        let (stream, info) = client::connect(uri, timeout, tls.as_ref())?;
        if info.size != self.size {
            stream.shutdown();
            return Err(ConnectError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("secondary export size {} differs from the local disk size {}", info.size, self.size),
            )));
        }
        let mut window = None;
        if let (true, Some(gens)) = (info.colo, self.generations()) {
            match self.judge(&gens, info.colo_generation, purpose) {
                Ok(windows) => {
                    self.dirty_from(&windows);
                    window = self.open_window()?;
                }
                Err(msg) => {
                    stream.shutdown();
                    self.split_brain(uri, &msg);
                    return Err(ConnectError::SplitBrain(msg));
                }
            }
        }
        *lock(&self.split_reported) = None;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let (tx, rx) = mpsc::channel::<(Request, Payload)>();
        let link = Arc::new(Link {
            tx,
            ctl: stream.try_clone()?,
            pending: Mutex::new(HashMap::new()),
            drained: Condvar::new(),
            broken: AtomicBool::new(false),
            why: Default::default(),
            colo: info.colo,
            write_zeroes: info.flags & crate::nbd::wire::TF_SEND_WRITE_ZEROES != 0,
            checksum_max: info.checksum_max,
        });
        self.barrier_number.fetch_max(info.colo_last_barrier, Ordering::AcqRel);
        let mut writer = stream.try_clone()?;
        // The sender holds the socket, not the link: the link owns the channel's sending
        // half, so the thread ends (rx.recv fails) once the link is dropped.
        let ctl = stream.try_clone()?;
        std::thread::Builder::new().name("nbd-link-send".into()).spawn(move || {
            // Requests queued meanwhile go out together (one writev), bounded in count and
            // bytes so a batch never waits long behind its own tail.
            let mut batch: Vec<(Request, Payload)> = Vec::with_capacity(SEND_BATCH);
            while let Ok(first) = rx.recv() {
                let mut bytes = first.1.len();
                batch.push(first);
                while batch.len() < SEND_BATCH && bytes < SEND_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(next) => {
                            bytes += next.1.len();
                            batch.push(next);
                        }
                        Err(_) => break,
                    }
                }
                let sent = client::send_requests(&mut writer, &batch);
                batch.clear();
                if let Err(e) = sent {
                    let why =
                        if e.kind() == io::ErrorKind::WouldBlock { "timed out".to_string() } else { e.to_string() };
                    log::warn!("replication link: send failed: {why}");
                    ctl.shutdown();
                    break;
                }
            }
        })?;
        // Buffered: one read system call brings in every reply the secondary has sent by
        // then, and they are parsed and answered as a batch.
        let mut reader = std::io::BufReader::with_capacity(REPLY_BUFFER, stream);
        let (l3, me) = (link.clone(), self.clone());
        std::thread::Builder::new().name("nbd-link-recv".into()).spawn(move || {
            loop {
                let reply = client::read_reply(&mut reader).and_then(|r| {
                    let payload = me.reply_payload(&l3, &r, &mut reader)?;
                    Ok((r, payload))
                });
                match reply {
                    Ok((r, payload)) => me.on_reply(&l3, r, payload),
                    Err(e) => {
                        me.fail_link(&l3, &format!("replication link lost: {e}"));
                        break;
                    }
                }
            }
        })?;
        let (l4, me) = (link.clone(), self.clone());
        std::thread::Builder::new().name("nbd-link-watch".into()).spawn(move || me.watch(&l4))?;
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        log::info!("replication link to {uri} up (generation {generation})");
        self.emit("REPLICATION_LINK", json!({"connected": true, "secondary": uri.to_string()}));
        *lock(&self.link) = Some(link.clone());
        // Writes sent from here on are in the new window already; the adopt runs after them.
        if let Some(g) = window
            && !self.send_adopt(g)
        {
            self.fail_link(&link, "the secondary did not record the data generation");
            return Err(ConnectError::Io(io::Error::other("the secondary did not record the data generation")));
        }
        Ok(link)
    }

    /// A connection refused as a split brain: the error, the event (once per distinct cause).
    fn split_brain(&self, uri: &NbdUri, msg: &str) {
        self.role.record_error(msg.to_string(), Announce::Quiet);
        let mut last = lock(&self.split_reported);
        if last.as_deref() != Some(msg) {
            *last = Some(msg.to_string());
            drop(last);
            log::error!("replication link to {uri} refused: {msg}");
            self.emit("REPLICATION_SPLIT_BRAIN", json!({"secondary": uri.to_string(), "error": msg}));
        }
    }

    /// Reads what follows a successful reply to a verify request (its request is still
    /// pending meanwhile, so the watchdog cuts a secondary that stalls in the middle).
    fn reply_payload(&self, link: &Link, r: &Reply, s: &mut impl io::Read) -> io::Result<Option<Vec<u8>>> {
        if r.error != 0 {
            return Ok(None);
        }
        let expect = lock(&link.pending).get(&r.handle).map_or(Expect::Nothing, |p| p.expect);
        match expect {
            Expect::Nothing => Ok(None),
            Expect::Data(len) => client::read_data_payload(s, len).map(Some),
            Expect::Hashes(count) => client::read_checksum_payload(s, count).map(Some),
        }
    }

    fn on_reply(&self, link: &Link, r: Reply, payload: Option<Vec<u8>>) {
        let ok = r.error == 0;
        let mut g = lock(&link.pending);
        let Some(p) = g.remove(&r.handle) else {
            drop(g);
            // Not a handle we sent (or a duplicate): the peer is broken.
            self.fail_link(link, &format!("replication link: reply for unknown handle {:#x}", r.handle));
            return;
        };
        if let Waiter::Payload(tx) = p.waiter {
            // A verify request: its outcome is the verify's business, not the link's.
            drop(g);
            let _ = tx.send(if ok { Ok(payload.unwrap_or_default()) } else { Err(nbd_error_text(r.error)) });
            if lock(&link.pending).is_empty() {
                link.drained.notify_all();
            }
            return;
        }
        if !ok {
            // Dirty before the request leaves `pending`: a barrier waiting for the link to
            // drain then sees the range behind (see `barrier_inner`).
            self.dirty.set(p.sectors.0, p.sectors.1);
        }
        drop(g);
        if !ok {
            self.stats.failed_ops.fetch_add(1, Ordering::Relaxed);
            if p.sectors.0 == p.sectors.1 {
                // A barrier (or flush): it covers no sectors.
                self.stats.barrier_refusal.store(r.error, Ordering::Relaxed);
                self.record_error(format!("secondary refused the checkpoint barrier: {}", nbd_error_text(r.error)));
            } else {
                self.record_error(format!(
                    "secondary answered {} for sectors {}..{}",
                    nbd_error_text(r.error),
                    p.sectors.0,
                    p.sectors.1
                ));
            }
        }
        Self::wake(p.waiter, ok);
        if lock(&link.pending).is_empty() {
            link.drained.notify_all();
        }
    }

    fn wake(w: Waiter, ok: bool) {
        match w {
            Waiter::Queue(lane, join) => lane.post(join),
            Waiter::Chan(tx) => {
                let _ = tx.send(ok);
            }
            Waiter::Payload(tx) => {
                let _ = tx.send(Err("the replication link went down".into()));
            }
        }
    }

    /// Breaks `link`: every forwarded request still pending goes into the dirty bitmap and
    /// completes for the guest (successfully: the local write decides).
    ///
    /// `broken` is set and `pending` drained under the `pending` lock, the lock [`Mirror::send`]
    /// checks `broken` and inserts under: a request is either drained here or refused there,
    /// never inserted into a drained map (where nobody would wake it or mark it dirty).
    fn fail_link(&self, link: &Link, why: &str) {
        let pending: Vec<Pending> = {
            let mut g = lock(&link.pending);
            let _ = link.why.set(why.to_string());
            if link.broken.swap(true, Ordering::AcqRel) {
                return;
            }
            let pending: Vec<Pending> = g.drain().map(|(_, p)| p).collect();
            for p in &pending {
                self.dirty.set(p.sectors.0, p.sectors.1);
            }
            pending
        };
        link.ctl.shutdown();
        self.stats.link_failures.fetch_add(1, Ordering::Relaxed);
        link.drained.notify_all();
        if self.running() {
            self.record_error(format!("{why} ({} requests pending)", pending.len()));
            self.emit("REPLICATION_LINK", json!({"connected": false, "reason": why}));
            self.diverge("the link to the secondary was lost");
        }
        for p in pending {
            Self::wake(p.waiter, false);
        }
        self.link_cv.notify_all();
    }

    /// Sends one request on the current link; `false` if there is no usable link.
    fn send(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Payload,
        waiter: Waiter,
    ) -> Result<(), Waiter> {
        let Some(link) = self.current_link() else { return Err(waiter) };
        let req = Request { flags, cmd, handle: 0, offset, length };
        self.send_req(&link, req, payload, Expect::Nothing, waiter)
    }

    /// Sends `req` (its handle is assigned here) on `link`; `expect`: what follows a
    /// successful reply. A request with a payload to read back covers no sectors: its failure
    /// leaves nothing behind on the secondary.
    fn send_req(
        &self,
        link: &Arc<Link>,
        mut req: Request,
        payload: Payload,
        expect: Expect,
        waiter: Waiter,
    ) -> Result<(), Waiter> {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        req.handle = handle;
        let sectors = match req.cmd {
            _ if expect != Expect::Nothing => (0, 0),
            CMD_FLUSH | CMD_COLO_BARRIER | CMD_COLO_ADOPT => (0, 0),
            _ => (req.offset / SECTOR, (req.offset + u64::from(req.length)).div_ceil(SECTOR)),
        };
        {
            let mut g = lock(&link.pending);
            // Checked under the lock `fail_link` drains under (see there).
            if link.broken.load(Ordering::Acquire) {
                return Err(waiter);
            }
            g.insert(handle, Pending { sectors, sent: Instant::now(), expect, waiter });
        }
        if sectors.0 < sectors.1 {
            self.note_sent(sectors.0, sectors.1);
        }
        if link.tx.send((req, payload)).is_err() {
            let p = lock(&link.pending).remove(&handle);
            self.fail_link(link, "replication link sender stopped");
            return Err(p.map_or(Waiter::Chan(mpsc::channel().0), |p| p.waiter));
        }
        Ok(())
    }

    /// Whether a write-type operation of `len` bytes can be forwarded (NBD lengths are 32-bit
    /// and a write's payload is bounded); one that cannot only marks its range dirty.
    fn forwardable(cmd: u16, len: u64) -> bool {
        len <= u64::from(u32::MAX) && (cmd != CMD_WRITE || len <= u64::from(crate::nbd::wire::MAX_PAYLOAD))
    }

    /// Forwards a guest write-type operation of `len` bytes (the local one is already
    /// submitted). `data` is a write's payload: the copy of the guest buffers the local write was submitted from.
    /// The join index `join` is posted on `lane` when the secondary answered, the link
    /// broke, or at once when there is no link (the range is then dirty).
    fn forward(&self, kind: OpKind, len: u64, data: Option<Payload>, join: usize, lane: &Arc<Lane<usize>>) {
        let waiter = Waiter::Queue(lane.clone(), join);
        let (cmd, flags, offset, len) = match kind {
            OpKind::Write { offset, dsync } => (CMD_WRITE, if dsync { CMD_FLAG_FUA } else { 0 }, offset, len),
            OpKind::WriteZeroes { offset, len, unmap } => {
                (CMD_WRITE_ZEROES, if unmap { 0 } else { CMD_FLAG_NO_HOLE }, offset, len)
            }
            OpKind::Discard { offset, len } => (CMD_TRIM, 0, offset, len),
            OpKind::Flush => (CMD_FLUSH, 0, 0, 0),
            OpKind::Read { .. } => {
                Self::wake(waiter, true);
                return;
            }
        };
        let payload = match (cmd, data) {
            (CMD_WRITE, Some(d)) if d.len() as u64 == len => d,
            (CMD_WRITE, _) => {
                // Too large to forward (no copy was made): the resync copies it.
                self.dirty.set(offset / SECTOR, (offset + len).div_ceil(SECTOR));
                Self::wake(waiter, false);
                return;
            }
            _ => Payload::default(),
        };
        if !Self::forwardable(cmd, len) {
            self.dirty.set(offset / SECTOR, (offset + len).div_ceil(SECTOR));
            Self::wake(waiter, false);
            return;
        }
        self.stats.forwarded_ops.fetch_add(1, Ordering::Relaxed);
        self.stats.forwarded_bytes.fetch_add(len, Ordering::Relaxed);
        if let Err(waiter) = self.send(cmd, flags, offset, len as u32, payload, waiter) {
            if cmd != CMD_FLUSH {
                self.dirty.set(offset / SECTOR, (offset + len).div_ceil(SECTOR));
            }
            Self::wake(waiter, false);
        }
    }

    /// The clock value a forwarded write records when it starts.
    fn now(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::AcqRel)
    }

    /// A forwarded guest write that started at `since` finished locally: if an overlapping
    /// resync chunk was being copied at any time since, mark the range dirty again (see the
    /// module documentation).
    fn local_write_done(&self, offset: u64, len: u64, since: u64, failed: bool) {
        let (s0, s1) = (offset / SECTOR, (offset + len).div_ceil(SECTOR));
        if failed {
            // The guest gets the error, but the secondary may have taken the write: the
            // range is dirty, so a resync gives the secondary what the local disk holds.
            self.dirty.set(s0, s1);
            return;
        }
        let now = self.now();
        let (overlapped, _) = lock(&self.resync_log).overlaps(s0, s1, since, now);
        if overlapped {
            self.dirty.set(s0, s1);
        }
    }

    /// Sends one request and waits for its answer (resync, barrier).
    fn send_and_wait(&self, cmd: u16, offset: u64, length: u32, payload: Payload) -> bool {
        let (tx, rx) = mpsc::channel();
        if self.send(cmd, 0, offset, length, payload, Waiter::Chan(tx)).is_err() {
            return false;
        }
        let timeout = lock(&self.cfg).timeout;
        rx.recv_timeout(timeout + Duration::from_secs(1)).unwrap_or(false)
    }

    // ---- background: reconnect, resync, watchdog ----------------------------------------------

    fn spawn_manager(self: &Arc<Self>) {
        if self.manager.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let _ = std::thread::Builder::new().name("replication-link".into()).spawn(move || me.manage());
    }

    fn manage(self: Arc<Self>) {
        let mut backoff = BACKOFF_MIN;
        let mut in_sync_reported = false;
        loop {
            if self.stage() != Stage::Running {
                self.manager.store(false, Ordering::Release);
                return;
            }
            if self.current_link().is_none() {
                let uri = lock(&self.cfg).secondary.clone();
                let Some(uri) = uri else {
                    self.manager.store(false, Ordering::Release);
                    return;
                };
                match self.connect(&uri, SyncMode::Incremental) {
                    Ok(_) => backoff = BACKOFF_MIN,
                    Err(e) if e.is_split_brain() => {
                        // Needs the operator (sync=full, or the right secondary): keep the
                        // link down and look again now and then.
                        let g = lock(&self.link_wait);
                        let _ = self.link_cv.wait_timeout(g, BACKOFF_MAX);
                        continue;
                    }
                    Err(e) => {
                        log::warn!("replication link: reconnect to {uri} failed: {e}; retrying in {backoff:?}");
                        let g = lock(&self.link_wait);
                        let _ = self.link_cv.wait_timeout(g, backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
            self.maybe_rotate_window();
            // Link up: copy what the secondary missed.
            if let Some(run) = self.dirty.next_set_run(0, self.size / SECTOR) {
                if in_sync_reported || !self.resync_clock.running() {
                    self.resync_clock.start(self.stats.resync_bytes.load(Ordering::Relaxed));
                }
                in_sync_reported = false;
                if !self.copy_chunks(run) {
                    // A failed copy (local read error, NBD error) must not spin: back off
                    // like a reconnect does before trying again.
                    let g = lock(&self.link_wait);
                    let _ = self.link_cv.wait_timeout(g, backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                backoff = BACKOFF_MIN;
            } else if !in_sync_reported {
                in_sync_reported = true;
                if let Some(al) = self.activity.get() {
                    al.in_sync();
                }
                self.resync_clock.stop();
                log::info!(
                    "secondary in sync ({} bytes copied so far)",
                    self.stats.resync_bytes.load(Ordering::Relaxed)
                );
                self.emit(
                    "REPLICATION_IN_SYNC",
                    json!({"resync-bytes": self.stats.resync_bytes.load(Ordering::Relaxed)}),
                );
            } else {
                let g = lock(&self.link_wait);
                let _ = self.link_cv.wait_timeout(g, Duration::from_millis(100));
            }
        }
    }

    /// The link's watchdog, a thread of its own: breaks the link as soon as any forwarded
    /// request — guest write, resync chunk or barrier — waits longer than the timeout. It
    /// checks a few times per timeout, so the cut comes within about 1.25 timeouts whatever
    /// the manager, the resync or a barrier is waiting for. It ends with the link.
    fn watch(&self, link: &Link) {
        let timeout = lock(&self.cfg).timeout;
        let period = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
        let mut g = lock(&link.pending);
        loop {
            if link.broken.load(Ordering::Acquire) {
                return;
            }
            let oldest = g.values().map(|p| p.sent).min();
            if oldest.is_some_and(|t| t.elapsed() > timeout) {
                drop(g);
                self.fail_link(link, &format!("secondary did not answer within {timeout:?}"));
                return;
            }
            g = link.drained.wait_timeout(g, period).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Copies up to [`RESYNC_DEPTH`] dirty chunks starting at `first`, all in flight at once;
    /// returns whether every one was acknowledged.
    ///
    /// Sparse copy (when the secondary takes WRITE_ZEROES): a chunk is either a hole of the
    /// local disk (up to [`ZERO_CHUNK`], sent as one WRITE_ZEROES that may leave the range
    /// unallocated there) or data (up to [`RESYNC_CHUNK`], ending where a hole starts), whose
    /// blocks that read as zeroes go as WRITE_ZEROES too. Chunk bounds come from an extent
    /// query before the chunk is logged; whether it is a hole is asked again after its dirty
    /// bits are cleared, exactly when a data chunk reads the disk, so the ordering rule of the
    /// module documentation covers both. A hole that filled in between is re-dirtied and
    /// copied as data by the next round.
    fn copy_chunks(&self, first: (u64, u64)) -> bool {
        let sectors = self.size / SECTOR;
        let timeout = lock(&self.cfg).timeout;
        let sparse = self.current_link().is_some_and(|l| l.write_zeroes);
        let mut inflight: Vec<ChunkCopy> = Vec::with_capacity(RESYNC_DEPTH);
        let mut next = Some(first);
        while let Some((a, run_end)) = next {
            if inflight.len() == RESYNC_DEPTH {
                break;
            }
            let (pos, limit) = (a * SECTOR, run_end.min(a + ZERO_CHUNK) * SECTOR);
            // Extents are file-system blocks, so sector-aligned; rounding keeps the bounds
            // whole sectors anyway (a partial sector at a hole's edge counts as data).
            let hole = if sparse { self.disk.hole_end(pos, limit) / SECTOR } else { a };
            let b = if hole > a {
                hole
            } else {
                let data_limit = run_end.min(a + RESYNC_CHUNK);
                if sparse {
                    self.disk.data_end(pos, data_limit * SECTOR).div_ceil(SECTOR).clamp(a + 1, data_limit)
                } else {
                    data_limit
                }
            };
            let start = {
                let mut log = lock(&self.resync_log);
                let start = self.now();
                if log.entries.len() >= RESYNC_LOG_LEN
                    && let Some((_, end, _, _)) = log.entries.pop_front()
                {
                    log.floor = log.floor.max(end);
                }
                log.entries.push_back((start, u64::MAX, a, b));
                start
            };
            self.resync_inflight.fetch_add(1, Ordering::SeqCst);
            self.dirty.clear(a, b);
            let mut copy = ChunkCopy { start, a, b, replies: Some(Vec::new()), data: 0, zero: 0, requeued: false };
            if hole > a {
                if self.disk.hole_end(a * SECTOR, b * SECTOR) >= b * SECTOR {
                    copy.zero = (b - a) * SECTOR;
                    copy.replies = self.send_zeroes(a * SECTOR, copy.zero).map(|rx| vec![rx]);
                } else {
                    // A guest write filled part of the hole since the bounds were taken.
                    self.dirty.set(a, b);
                    copy.requeued = true;
                }
            } else {
                self.read_and_send(&mut copy, sparse);
            }
            inflight.push(copy);
            next = self.dirty.next_set_run(b, sectors);
        }
        // The link's watchdog answers every chunk within about the timeout (a cut wakes them
        // all); this deadline is only a backstop, shared by the whole batch.
        let deadline = Instant::now() + timeout + Duration::from_secs(1);
        let mut all_ok = true;
        for c in inflight {
            let ok = c.replies.is_some_and(|rxs| {
                rxs.into_iter().fold(true, |ok, rx| {
                    let left = deadline.saturating_duration_since(Instant::now());
                    rx.recv_timeout(left).unwrap_or(false) && ok
                })
            });
            let end = self.now();
            if let Some(e) = lock(&self.resync_log).entries.iter_mut().rev().find(|e| e.0 == c.start) {
                // Ends are assigned in start order from an increasing clock (see
                // `ResyncLog::overlaps`, which relies on it).
                e.1 = end;
            }
            if c.requeued {
                // Nothing was sent; the range is dirty again and copied by the next round.
            } else if ok {
                self.stats.resync_bytes.fetch_add((c.b - c.a) * SECTOR, Ordering::Relaxed);
                self.stats.resync_data.fetch_add(c.data, Ordering::Relaxed);
                self.stats.resync_zero.fetch_add(c.zero, Ordering::Relaxed);
            } else {
                self.dirty.set(c.a, c.b);
                all_ok = false;
            }
            self.resync_inflight.fetch_sub(1, Ordering::SeqCst);
        }
        all_ok
    }

    /// Sends WRITE_ZEROES for `len` bytes at `offset` (may punch on the secondary); the
    /// receiver gets the outcome, `None` when there is no link.
    fn send_zeroes(&self, offset: u64, len: u64) -> Option<mpsc::Receiver<bool>> {
        let (tx, rx) = mpsc::channel();
        // `len` is at most ZERO_CHUNK sectors (64 MiB): it fits the 32-bit NBD length.
        self.send(CMD_WRITE_ZEROES, 0, offset, len as u32, Payload::default(), Waiter::Chan(tx)).ok().map(|()| rx)
    }

    /// A data chunk: reads it from the local disk and sends it, its zero blocks as
    /// WRITE_ZEROES when `sparse`. Sets `copy.replies` to `None` when the read or a send
    /// failed.
    fn read_and_send(&self, copy: &mut ChunkCopy, sparse: bool) {
        let (a, b) = (copy.a, copy.b);
        let len = ((b - a) * SECTOR) as usize;
        let mut buf = AlignedBuf::zeroed(len);
        if let Err(e) = self.disk.read_exact_at(&mut buf, a * SECTOR) {
            self.record_error(format!("resync read of the local disk failed: {e}"));
            copy.replies = None;
            return;
        }
        let runs = if sparse { sparse::zero_runs(&buf) } else { vec![(0, len, false)] };
        let whole = runs.len() == 1;
        let mut replies = Vec::with_capacity(runs.len());
        for (s, e, zero) in runs {
            let offset = a * SECTOR + s as u64;
            let rx = if zero {
                copy.zero += (e - s) as u64;
                self.send_zeroes(offset, (e - s) as u64)
            } else {
                copy.data += (e - s) as u64;
                let payload = if whole {
                    std::mem::take(&mut buf)
                } else {
                    let mut part = AlignedBuf::zeroed(e - s);
                    part.copy_from_slice(&buf[s..e]);
                    part
                };
                let (tx, rx) = mpsc::channel();
                self.send(CMD_WRITE, 0, offset, (e - s) as u32, Arc::new(payload), Waiter::Chan(tx)).ok().map(|()| rx)
            };
            match rx {
                Some(rx) => replies.push(rx),
                None => {
                    copy.replies = None;
                    return;
                }
            }
        }
        copy.replies = Some(replies);
    }

    /// The checkpoint barrier: waits until every forwarded request issued so far has been
    /// answered, then has the secondary flush — with a COLO barrier (which also marks the
    /// checkpoint pending there) when the secondary is colo-blk, a plain FLUSH otherwise.
    /// Returns the barrier's sequence number. Writes issued while it runs may land on either
    /// side of it: callers stop the VM first (COLO does).
    pub fn barrier(&self) -> Result<u64, ReplicationError> {
        let t0 = Instant::now();
        let r = self.barrier_inner();
        match &r {
            Ok(seq) => {
                let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.stats.last_barrier_us.store(us, Ordering::Relaxed);
                log::info!("checkpoint barrier {seq} confirmed by the secondary in {:.1} ms", us as f64 / 1000.0);
            }
            Err(e) => {
                self.stats.barrier_failures.fetch_add(1, Ordering::Relaxed);
                log::warn!("checkpoint barrier failed: {e}");
            }
        }
        r
    }

    fn barrier_inner(&self) -> Result<u64, ReplicationError> {
        let timeout = lock(&self.cfg).timeout;
        let Some(link) = self.current_link() else {
            return Err(ReplicationError::LinkDown { behind: self.dirty.count_all() * SECTOR });
        };
        // A checkpoint is only consistent on a secondary that has every write.
        let behind = self.dirty.count_all() * SECTOR;
        if behind > 0 {
            return Err(ReplicationError::NotInSync { behind });
        }
        let upto = self.next_handle.load(Ordering::Acquire);
        let deadline = Instant::now() + timeout;
        let mut g = lock(&link.pending);
        while g.keys().any(|&h| h < upto) && !link.broken.load(Ordering::Acquire) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(g);
                self.fail_link(&link, "checkpoint barrier timed out");
                return Err(ReplicationError::BarrierTimeout);
            }
            g = link.drained.wait_timeout(g, left.min(Duration::from_millis(50))).unwrap_or_else(|e| e.into_inner()).0;
        }
        // Again now that every earlier request was answered: one answered with an error
        // re-dirtied its range after the first check, and a checkpoint that lacks it must not
        // be committed by the secondary. A resync chunk in flight (its bits already cleared,
        // perhaps even taken from such a re-dirtied range) must finish first: if it fails,
        // its range is behind too. Bitmap read before the counter: a chunk counts itself
        // before clearing its bits, so one of the two shows it.
        loop {
            let behind = self.dirty.count_all() * SECTOR;
            if behind > 0 {
                return Err(ReplicationError::NotInSync { behind });
            }
            if self.resync_inflight.load(Ordering::SeqCst) == 0 {
                break;
            }
            if link.broken.load(Ordering::Acquire) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReplicationError::BarrierResyncTimeout);
            }
            g = link.drained.wait_timeout(g, left.min(Duration::from_millis(20))).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(g);
        self.stats.barriers.fetch_add(1, Ordering::AcqRel);
        let seq = self.barrier_number.fetch_add(1, Ordering::AcqRel) + 1;
        let cmd = if link.colo { CMD_COLO_BARRIER } else { CMD_FLUSH };
        let offset = if link.colo { seq } else { 0 };
        self.stats.barrier_refusal.store(0, Ordering::Relaxed);
        if link.broken.load(Ordering::Acquire) || !self.send_and_wait(cmd, offset, 0, Payload::default()) {
            return Err(match self.stats.barrier_refusal.load(Ordering::Relaxed) {
                crate::nbd::wire::ESHUTDOWN => ReplicationError::SecondaryNotReplicating,
                0 => ReplicationError::BarrierUnconfirmed,
                code => ReplicationError::BarrierRefused { code, reason: nbd_error_text(code) },
            });
        }
        Ok(seq)
    }

    fn disconnect(&self) {
        if let Some(l) = lock(&self.link).take() {
            let pending: Vec<Pending> = {
                let mut g = lock(&l.pending);
                l.broken.store(true, Ordering::Release);
                g.drain().map(|(_, p)| p).collect()
            };
            l.ctl.shutdown();
            for p in pending {
                self.dirty.set(p.sectors.0, p.sectors.1);
                Self::wake(p.waiter, false);
            }
        }
        self.link_cv.notify_all();
    }
}

mod activity;
mod control;
mod device;
#[cfg(test)]
mod model_tests;
mod sparse;
mod verify;
mod windows;

pub use activity::{ActivityError, ActivityLog, Recovered};

pub use windows::ConnectError;

use crate::io::aligned::AlignedBuf;
mod hook;

pub use control::MirrorControl;
pub use device::MirrorDevice;
pub use hook::{ColoHook, HOOK_EXPORT};

/// An NBD error code as an operator reads it.
fn nbd_error_text(code: u32) -> String {
    use crate::nbd::wire;
    let what = match code {
        wire::ESHUTDOWN => "ESHUTDOWN (the secondary is not replicating: stage none, or it failed over)",
        wire::EIO => "EIO (an I/O error on the secondary)",
        wire::ENOSPC => "ENOSPC (the secondary is out of space)",
        wire::EINVAL => "EINVAL (the secondary refused the request as invalid)",
        wire::EPERM => "EPERM (the secondary refused writing)",
        wire::ENOMEM => "ENOMEM (the secondary is out of memory)",
        wire::ENOTSUP => "ENOTSUP (the secondary does not support the request)",
        _ => return format!("NBD error {code}"),
    };
    what.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain (no COLO) link sending on `tx`, its control side `ctl`.
    fn test_link(
        tx: mpsc::Sender<(Request, Payload)>,
        ctl: std::os::unix::net::UnixStream,
        write_zeroes: bool,
    ) -> Arc<Link> {
        Arc::new(Link {
            tx,
            ctl: Stream::Unix(ctl),
            pending: Mutex::new(HashMap::new()),
            drained: Condvar::new(),
            broken: AtomicBool::new(false),
            why: Default::default(),
            colo: false,
            write_zeroes,
            checksum_max: 0,
        })
    }

    /// A link whose sender side is a socket pair and whose request channel is drained by a
    /// thread that never answers (the test breaks the link itself).
    fn idle_link() -> (Arc<Link>, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel::<(Request, Payload)>();
        std::thread::spawn(move || while rx.recv().is_ok() {});
        (test_link(tx, a, true), b)
    }

    /// Requests a test link saw: (command, offset, length, payload length).
    type Seen = Arc<Mutex<Vec<(u16, u64, u32, usize)>>>;

    /// A link that answers every request at once with success and records each. The
    /// answering thread ends with the link.
    fn answering_link(m: &Arc<Mirror>, write_zeroes: bool) -> (Arc<Link>, Seen) {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel::<(Request, Payload)>();
        let link = test_link(tx, a, write_zeroes);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (weak, m2, s2) = (Arc::downgrade(&link), m.clone(), seen.clone());
        std::thread::spawn(move || {
            while let Ok((req, payload)) = rx.recv() {
                lock(&s2).push((req.cmd, req.offset, req.length, payload.len()));
                let Some(l) = weak.upgrade() else { return };
                m2.on_reply(&l, Reply { error: 0, handle: req.handle }, None);
            }
        });
        *lock(&m.link) = Some(link.clone());
        (link, seen)
    }

    /// Issue 15 item 5: a full resync of a sparse disk sends holes (one request per hole, up
    /// to 64 MiB) and 64 KiB blocks that read as zeroes as WRITE_ZEROES without NO_HOLE, and
    /// only the data as WRITE payload; every byte is covered once. Without WRITE_ZEROES on
    /// the secondary everything goes as data.
    #[test]
    fn resync_sends_holes_and_zero_blocks_as_write_zeroes() {
        const M: u64 = 1 << 20;
        const K64: u64 = 64 << 10;
        let f = tempfile::tempfile().unwrap();
        f.set_len(16 * M).unwrap();
        f.write_all_at(&[7u8; 4096], 5 * M).unwrap();
        f.write_all_at(&vec![0u8; 2 * K64 as usize], 8 * M).unwrap();
        f.write_all_at(&vec![1u8; K64 as usize], 12 * M).unwrap();
        f.write_all_at(&vec![0u8; K64 as usize], 12 * M + K64).unwrap();
        f.write_all_at(&vec![2u8; K64 as usize], 12 * M + 2 * K64).unwrap();
        if crate::block::extents::hole_end(&f, 0, M) == 0 {
            return; // a file system without SEEK_DATA: nothing to check here
        }
        let cfg = MirrorConfig { secondary: None, timeout: Duration::from_secs(5), tls: None };
        let m = Mirror::new(Arc::new(f), 16 * M, cfg);
        for write_zeroes in [true, false] {
            let (_link, seen) = answering_link(&m, write_zeroes);
            m.stats.resync_data.store(0, Ordering::Relaxed);
            m.stats.resync_zero.store(0, Ordering::Relaxed);
            m.dirty.set(0, 16 * M / SECTOR);
            while let Some(run) = m.dirty.next_set_run(0, 16 * M / SECTOR) {
                assert!(m.copy_chunks(run));
            }
            let mut reqs = lock(&seen).clone();
            reqs.sort_by_key(|r| r.1);
            let mut at = 0;
            for &(cmd, offset, len, payload) in &reqs {
                assert_eq!(offset, at, "{reqs:?}");
                assert_eq!(payload, if cmd == CMD_WRITE { len as usize } else { 0 });
                at += u64::from(len);
            }
            assert_eq!(at, 16 * M);
            let data: u64 = reqs.iter().filter(|r| r.0 == CMD_WRITE).map(|r| u64::from(r.2)).sum();
            if !write_zeroes {
                assert!(reqs.iter().all(|r| r.0 == CMD_WRITE && u64::from(r.2) <= M), "{reqs:?}");
                assert_eq!(m.stats.resync_data.load(Ordering::Relaxed), 16 * M);
                continue;
            }
            let (wz, w) = (CMD_WRITE_ZEROES, CMD_WRITE);
            let expect: Vec<(u16, u64, u32)> = vec![
                (wz, 0, 5 * M as u32),
                (w, 5 * M, 4096),
                (wz, 5 * M + 4096, (3 * M - 4096) as u32),
                (wz, 8 * M, 2 * K64 as u32),
                (wz, 8 * M + 2 * K64, (4 * M - 2 * K64) as u32),
                (w, 12 * M, K64 as u32),
                (wz, 12 * M + K64, K64 as u32),
                (w, 12 * M + 2 * K64, K64 as u32),
                (wz, 12 * M + 3 * K64, (4 * M - 3 * K64) as u32),
            ];
            assert_eq!(reqs.iter().map(|r| (r.0, r.1, r.2)).collect::<Vec<_>>(), expect);
            assert_eq!(data, 4096 + 2 * K64);
            assert_eq!(m.stats.resync_data.load(Ordering::Relaxed), data);
            assert_eq!(m.stats.resync_zero.load(Ordering::Relaxed), 16 * M - data);
        }
    }

    /// Issue 10 item F: with the log full after a large resync, a write that started after
    /// every logged copy ended looks at one entry, not 4,096; overlap detection still works.
    #[test]
    fn resync_log_scan_is_bounded_by_the_write_lifetime() {
        let mut log = ResyncLog::default();
        for i in 0..RESYNC_LOG_LEN as u64 {
            log.entries.push_back((2 * i, 2 * i + 1, i * 8, i * 8 + 8));
        }
        let since = 2 * RESYNC_LOG_LEN as u64 + 10;
        assert_eq!(log.overlaps(0, 8, since, since + 5), (false, 1));
        // A copy of sectors 0..8 in flight while the write runs: overlapped.
        log.entries.push_back((since + 1, u64::MAX, 0, 8));
        assert_eq!(log.overlaps(0, 8, since, since + 5), (true, 1));
        // A write that started before the last 3 copies ended looks at 4 entries at most.
        let since = 2 * (RESYNC_LOG_LEN as u64 - 3);
        let (hit, seen) = log.overlaps(1_000_000, 1_000_008, since, 3 * RESYNC_LOG_LEN as u64);
        assert!(!hit && seen <= 5, "{seen}");
        // An overlapping copy that ended during the write's lifetime is found.
        let last = RESYNC_LOG_LEN as u64 - 1;
        assert!(log.overlaps(last * 8, last * 8 + 1, 2 * last, 3 * RESYNC_LOG_LEN as u64).0);
        // A write older than the dropped entries is always treated as overlapped.
        log.floor = 100;
        assert_eq!(log.overlaps(1_000_000, 1_000_008, 50, 60), (true, 0));
    }

    /// Issue 10 item A: requests sent while the link breaks are either refused by `send` or
    /// drained by `fail_link` — never inserted into a drained map, where nobody wakes them
    /// (a hung guest request) or marks their range dirty (a silent gap).
    #[test]
    fn send_racing_fail_link_never_loses_a_request() {
        const THREADS: u64 = 3;
        const PER: u64 = 300;
        let f = tempfile::tempfile().unwrap();
        let size = THREADS * PER * SECTOR;
        f.set_len(size).unwrap();
        let cfg = MirrorConfig { secondary: None, timeout: Duration::from_secs(5), tls: None };
        let m = Mirror::new(Arc::new(f), size, cfg);
        for round in 0..300u64 {
            m.dirty.clear_all();
            let (link, _peer) = idle_link();
            *lock(&m.link) = Some(link.clone());
            let go = Arc::new(std::sync::Barrier::new(THREADS as usize + 1));
            let senders: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (m, go) = (m.clone(), go.clone());
                    std::thread::spawn(move || {
                        go.wait();
                        let mut accepted = Vec::new();
                        for i in 0..PER {
                            let sector = t * PER + i;
                            let (tx, rx) = mpsc::channel();
                            let payload = Payload::new(AlignedBuf::zeroed(SECTOR as usize));
                            if m.send(CMD_WRITE, 0, sector * SECTOR, SECTOR as u32, payload, Waiter::Chan(tx)).is_ok() {
                                accepted.push((sector, rx));
                            }
                        }
                        accepted
                    })
                })
                .collect();
            go.wait();
            // Let the senders get going, then break the link under them.
            for _ in 0..(round % 50) * 20 {
                std::hint::spin_loop();
            }
            m.fail_link(&link, "cut by the test");
            for s in senders {
                for (sector, rx) in s.join().unwrap() {
                    let woken = rx.recv_timeout(Duration::from_secs(5));
                    assert_eq!(woken, Ok(false), "round {round}: request at sector {sector} was never woken");
                    assert_eq!(m.dirty.count(sector, sector + 1), 1, "round {round}: sector {sector} not dirty");
                }
            }
        }
    }
}
