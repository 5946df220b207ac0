//! The NBD connection to the secondary: connecting (after the data generation check of
//! windows.rs), the sender thread (requests from a channel, batched into one `writev`), the
//! receiver thread (replies matched to handles, out of order, through a read buffer), the
//! watchdog (a request older than the timeout breaks the link) and what breaking a link does:
//! every pending request goes into the dirty bitmap and completes for the guest.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{ConnectError, Mirror, Payload, SECTOR, lock};
use crate::block::Lane;
use crate::nbd::client::{self, NbdUri, Reply};
use crate::nbd::transport::Stream;
use crate::nbd::wire::{CMD_COLO_ADOPT, CMD_COLO_BARRIER, CMD_FLUSH, Request};
use crate::replication::SyncMode;
use crate::replication::role::Announce;

/// At most this many requests, or about this many payload bytes, go out in one `writev`.
const SEND_BATCH: usize = 64;
const SEND_BATCH_BYTES: usize = 4 << 20;
/// The link receiver's read buffer (a 16-byte reply each; a verify's payload passes through).
const REPLY_BUFFER: usize = 64 << 10;

/// Who waits for a forwarded request.
pub(super) enum Waiter {
    /// A guest request: post its join index on the queue's lane.
    Queue(Arc<Lane<usize>>, usize),
    /// The resync or a barrier: a channel.
    Chan(mpsc::Sender<bool>),
    /// A verify request: the reply's payload, or why there is none.
    Payload(mpsc::Sender<Result<Vec<u8>, String>>),
}

/// What follows a successful reply (only verify requests have a payload; see `verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expect {
    /// Nothing: a simple reply header.
    Nothing,
    /// A READ's data, this many bytes.
    Data(u32),
    /// A checksum answer of this many hashes.
    Hashes(u32),
}

/// A forwarded request waiting for its reply.
pub(super) struct Pending {
    /// The sectors it writes, [a, b), marked dirty if it fails or the link breaks; (0, 0) for
    /// none (a flush, a barrier, an adopt, a verify request).
    sectors: (u64, u64),
    /// When it was handed to the sender (the watchdog's measure).
    sent: Instant,
    /// What follows a successful reply.
    expect: Expect,
    /// Who learns the outcome.
    waiter: Waiter,
}

/// One NBD connection to the secondary.
pub(super) struct Link {
    /// Requests for the sender thread, which writes them to the socket (the link holds the
    /// channel's only sending half: the thread ends once the link is dropped).
    pub(super) tx: mpsc::Sender<(Request, Payload)>,
    /// The socket, to shut it down when the link breaks (the receiver's read then fails).
    pub(super) ctl: Stream,
    /// Requests sent and not answered yet, by handle.
    pub(super) pending: Mutex<HashMap<u64, Pending>>,
    /// Notified when `pending` empties or the link breaks (barriers and the watchdog wait
    /// on it).
    pub(super) drained: Condvar,
    /// The link broke: set once, under the `pending` lock (see [`Mirror::fail_link`]).
    pub(super) broken: AtomicBool,
    /// Why the link broke, set before `broken` (what a verify that finds it broken reports).
    pub(super) why: std::sync::OnceLock<String>,
    /// The secondary is a colo-blk secondary that takes checkpoint barriers.
    pub(super) colo: bool,
    /// The secondary takes WRITE_ZEROES (it advertised `NBD_FLAG_SEND_WRITE_ZEROES`): the
    /// resync sends holes and zero blocks that way instead of as data.
    pub(super) write_zeroes: bool,
    /// The largest range one checksum request may cover; 0 when the secondary does not offer
    /// checksums (the verify then reads and compares).
    pub(super) checksum_max: u32,
}

/// The link's place in the mirror: the current connection, and what outlives one connection.
pub(super) struct LinkSlot {
    /// The current connection: replaced by each connect, taken by `Mirror::disconnect` (start,
    /// stop); a broken one stays until then (`Mirror::current_link` skips it).
    pub(super) current: Mutex<Option<Arc<Link>>>,
    /// The manager's timed waits (woken when the link changes): `changed` waits on it.
    pub(super) wait: Mutex<()>,
    pub(super) changed: Condvar,
    /// The next request handle; handles keep growing across connections (a barrier waits for
    /// every request with a smaller one).
    pub(super) next_handle: AtomicU64,
    /// The last checkpoint barrier number used; raised to the secondary's last one at each
    /// connection, so numbers keep growing across restarts of this process.
    pub(super) barrier_number: AtomicU64,
    /// Numbers the connections (the log line of a link that comes up shows it).
    pub(super) generation: AtomicU64,
    /// The split brain last reported (reported again only when it changes or after a link).
    pub(super) split_reported: Mutex<Option<String>>,
}

impl LinkSlot {
    pub(super) fn new() -> Self {
        LinkSlot {
            current: Mutex::new(None),
            wait: Mutex::new(()),
            changed: Condvar::new(),
            next_handle: AtomicU64::new(1),
            barrier_number: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            split_reported: Mutex::new(None),
        }
    }
}

impl Mirror {
    /// The current link, unless it broke.
    pub(super) fn current_link(&self) -> Option<Arc<Link>> {
        lock(&self.link.current).clone().filter(|l| !l.broken.load(Ordering::Acquire))
    }

    /// Connects to the secondary for `purpose` (`Incremental` for a reconnect): a colo-blk
    /// secondary is first judged by its data generation (windows.rs).
    pub(super) fn connect(self: &Arc<Self>, uri: &NbdUri, purpose: SyncMode) -> Result<Arc<Link>, ConnectError> {
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
        *lock(&self.link.split_reported) = None;
        let generation = self.link.generation.fetch_add(1, Ordering::AcqRel) + 1;
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
        self.link.barrier_number.fetch_max(info.colo_last_barrier, Ordering::AcqRel);
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
        *lock(&self.link.current) = Some(link.clone());
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
        let mut last = lock(&self.link.split_reported);
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

    /// One reply from the secondary: its request leaves `pending`; a failure marks the
    /// request's range dirty and is recorded; the waiter learns the outcome.
    pub(super) fn on_reply(&self, link: &Link, r: Reply, payload: Option<Vec<u8>>) {
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

    /// Tells a request's waiter it is done (`ok`: the secondary applied it); a verify request
    /// learns that the link went down.
    pub(super) fn wake(w: Waiter, ok: bool) {
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
    pub(super) fn fail_link(&self, link: &Link, why: &str) {
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
        self.link.changed.notify_all();
    }

    /// Sends one request on the current link; `false` if there is no usable link.
    pub(super) fn send(
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
    pub(super) fn send_req(
        &self,
        link: &Arc<Link>,
        mut req: Request,
        payload: Payload,
        expect: Expect,
        waiter: Waiter,
    ) -> Result<(), Waiter> {
        let handle = self.link.next_handle.fetch_add(1, Ordering::Relaxed);
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

    /// Sends one request and waits for its answer (resync, barrier).
    pub(super) fn send_and_wait(&self, cmd: u16, offset: u64, length: u32, payload: Payload) -> bool {
        let (tx, rx) = mpsc::channel();
        if self.send(cmd, 0, offset, length, payload, Waiter::Chan(tx)).is_err() {
            return false;
        }
        let timeout = lock(&self.cfg).timeout;
        rx.recv_timeout(timeout + Duration::from_secs(1)).unwrap_or(false)
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

    /// Drops the current link (start, stop): its pending requests go into the dirty bitmap
    /// and their waiters are woken, with no error recorded and no event.
    pub(super) fn disconnect(&self) {
        if let Some(l) = lock(&self.link.current).take() {
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
        self.link.changed.notify_all();
    }
}

/// An NBD error code as an operator reads it.
pub(super) fn nbd_error_text(code: u32) -> String {
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
pub(super) mod tests {
    use super::*;
    use crate::io::aligned::AlignedBuf;
    use crate::nbd::wire::CMD_WRITE;
    use crate::replication::primary::MirrorConfig;

    /// A plain (no COLO) link sending on `tx`, its control side `ctl`.
    pub(in crate::replication::primary) fn test_link(
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
            *lock(&m.link.current) = Some(link.clone());
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
