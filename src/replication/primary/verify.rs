//! Online verify (`replication-verify`): while the guest runs, compare every block of the
//! local disk with the secondary's, count the bytes that differ, and with `resync` mark them
//! dirty so the resync (the manager's `copy_chunks`) copies them — the same path, and the same
//! ordering rule, as every other copy to the secondary.
//!
//! The disk is walked in chunks of [`VERIFY_CHUNK`] bytes, [`VERIFY_DEPTH`] in flight. For
//! each chunk the secondary's side comes from a [`CMD_COLO_CHECKSUM`] request (one XXH64 per
//! [`CHECKSUM_BLOCK`], see [`crate::nbd::checksum`]) when the link negotiated the checksum
//! extension, else from a plain READ (qemu-nbd and other servers); the local side is read
//! from the disk and hashed (or compared byte by byte). Differences are counted in whole
//! blocks.
//!
//! Ordering rule (guest writes racing a comparison are never reported): a chunk's comparison
//! window opens before the local read and before its request is sent, and closes after both
//! the local data was read and the secondary's answer arrived. A guest write is tracked by
//! [`WriteTracker`] from before its local submission and its forwarding until both halves
//! completed (the secondary answered, so it applied it). A write whose tracked lifetime does
//! not intersect the window either completed on both sides before the window opened (both
//! reads see it) or started after it closed (neither sees it); only a write that intersects
//! it can make the two reads disagree, and such a write is caught: in flight when the window
//! opens (the window starts "hit"), or started while it is open (it marks every open window
//! it overlaps). Resync copies are the other writer of the secondary: a copy that ran during
//! the window (its resync-log interval intersects the window's clock interval) or a range
//! still dirty counts as racing too. A differing block whose window raced is compared again
//! (up to [`RETRY_ROUNDS`] times, a block at a time); one that still races every time is
//! reported as unverified, never as differing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::link::{Expect, Link, Waiter};
use super::{Mirror, Payload, ReplicationError, SECTOR, Stage, lock};
use crate::io::aligned::AlignedBuf;
use crate::nbd::checksum::{self, CHECKSUM_BLOCK, CMD_COLO_CHECKSUM};
use crate::nbd::wire::{CMD_READ, Request};
use crate::replication::progress::JobClock;

/// Bytes compared per request (a multiple of [`CHECKSUM_BLOCK`]).
const VERIFY_CHUNK: u64 = 2 << 20;
/// Requests in flight at once.
const VERIFY_DEPTH: usize = 8;
/// How often a differing block whose comparison raced a write is compared again.
const RETRY_ROUNDS: u32 = 20;
/// Chunks with differences logged per verify (a disk that differs everywhere would otherwise
/// log a line per 2 MiB); the counts in `query-replication` are complete.
const LOGGED_CHUNKS: u64 = 16;

/// What a guest write holds while it is tracked (see [`WriteTracker`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ticket {
    /// Not a data-changing operation (flush).
    None,
    /// Started while no verify watched: only counted.
    Untracked,
    /// Its sectors are in the tracker's table, at this slot.
    Tracked(usize),
}

/// The mirrored guest writes in flight, as the verify needs them (module documentation).
///
/// Cheap when no verify runs: a write only increments and later decrements `untracked`.
/// When a verify starts it sets `watching` and then waits until `untracked` reads 0: a write
/// increments `untracked` before it reads `watching` (both sequentially consistent), so it
/// either saw `watching` set and registered its sectors, or was counted and is waited for.
#[derive(Default)]
pub(super) struct WriteTracker {
    untracked: AtomicU64,
    watching: AtomicBool,
    table: Mutex<Tracked>,
}

#[derive(Default)]
struct Tracked {
    /// Sectors [s0, s1) of tracked writes in flight; `None` slots are free.
    writes: Vec<Option<(u64, u64)>>,
    free: Vec<usize>,
    /// Open comparison windows.
    windows: Vec<Window>,
    next_window: u64,
}

struct Window {
    id: u64,
    s0: u64,
    s1: u64,
    hit: bool,
}

impl WriteTracker {
    /// A guest write of sectors [s0, s1) is about to be submitted and forwarded.
    pub(super) fn started(&self, s0: u64, s1: u64) -> Ticket {
        self.untracked.fetch_add(1, Ordering::SeqCst);
        if !self.watching.load(Ordering::SeqCst) {
            return Ticket::Untracked;
        }
        let slot = {
            let mut t = lock(&self.table);
            for w in t.windows.iter_mut().filter(|w| w.s0 < s1 && s0 < w.s1) {
                w.hit = true;
            }
            match t.free.pop() {
                Some(i) => {
                    t.writes[i] = Some((s0, s1));
                    i
                }
                None => {
                    t.writes.push(Some((s0, s1)));
                    t.writes.len() - 1
                }
            }
        };
        self.untracked.fetch_sub(1, Ordering::SeqCst);
        Ticket::Tracked(slot)
    }

    /// The write holding `ticket` completed on both sides (or failed).
    pub(super) fn finished(&self, ticket: Ticket) {
        match ticket {
            Ticket::None => {}
            Ticket::Untracked => {
                self.untracked.fetch_sub(1, Ordering::SeqCst);
            }
            Ticket::Tracked(i) => {
                let mut t = lock(&self.table);
                if let Some(slot) = t.writes.get_mut(i) {
                    *slot = None;
                    t.free.push(i);
                }
            }
        }
    }

    /// Starts tracking every new write; waits (until `deadline`) for the writes started
    /// before to complete. `false` if they did not.
    fn watch(&self, deadline: Instant) -> bool {
        self.watching.store(true, Ordering::SeqCst);
        while self.untracked.load(Ordering::SeqCst) != 0 {
            if Instant::now() >= deadline {
                return false;
            }
            // Writes complete within the link timeout (the watchdog cuts a slower link);
            // their completion has no wake-up of its own, so poll briefly.
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Stops tracking new writes (tracked ones still leave the table as they complete).
    fn unwatch(&self) {
        self.watching.store(false, Ordering::SeqCst);
    }

    /// Opens a comparison window over sectors [s0, s1); it starts hit if a tracked write of
    /// those sectors is in flight.
    fn open(&self, s0: u64, s1: u64) -> u64 {
        let mut t = lock(&self.table);
        let hit = t.writes.iter().flatten().any(|&(a, b)| a < s1 && s0 < b);
        t.next_window += 1;
        let id = t.next_window;
        t.windows.push(Window { id, s0, s1, hit });
        id
    }

    /// Closes window `id`: whether a write raced it.
    fn close(&self, id: u64) -> bool {
        let mut t = lock(&self.table);
        match t.windows.iter().position(|w| w.id == id) {
            Some(i) => t.windows.swap_remove(i).hit,
            None => true,
        }
    }
}

/// State of the verify job, as `query-replication` reports it.
#[derive(Default)]
pub(super) struct Verify {
    pub(super) tracker: WriteTracker,
    active: AtomicBool,
    resync: AtomicBool,
    checksums: AtomicBool,
    total: AtomicU64,
    done: AtomicU64,
    differing: AtomicU64,
    retried: AtomicU64,
    unverified: AtomicU64,
    /// Chunks with differences logged so far (see [`LOGGED_CHUNKS`]).
    logged: AtomicU64,
    error: Mutex<Option<String>>,
    clock: JobClock,
}

impl Verify {
    /// The `verify` object of `query-replication`.
    pub(super) fn json(&self) -> Value {
        let (total, done) = (self.total.load(Ordering::Relaxed), self.done.load(Ordering::Relaxed));
        json!({
            "active": self.active.load(Ordering::Acquire),
            "total-bytes": total,
            "done-bytes": done,
            "differing-bytes": self.differing.load(Ordering::Relaxed),
            "retried-bytes": self.retried.load(Ordering::Relaxed),
            "unverified-bytes": self.unverified.load(Ordering::Relaxed),
            "resync": self.resync.load(Ordering::Relaxed),
            "method": if self.checksums.load(Ordering::Relaxed) { "checksum" } else { "read" },
            "error": lock(&self.error).clone(),
            "progress": self.clock.json(done, total.saturating_sub(done)),
        })
    }
}

/// One comparison in flight.
struct Chunk {
    offset: u64,
    len: u64,
    /// Clock when the window opened (for the resync log).
    t0: u64,
    window: u64,
    /// The secondary's answer; `None` when the request could not be sent.
    rx: Option<mpsc::Receiver<Result<Vec<u8>, String>>>,
    /// When to give up waiting for it: the link's watchdog answers every request within
    /// about the timeout (a cut wakes them all); this is only a backstop.
    deadline: Instant,
}

impl Mirror {
    /// Starts a verify (`replication-verify`); refuses when replication is not running, the
    /// link is down or a verify is already running.
    pub(super) fn start_verify(self: &Arc<Self>, resync: bool) -> Result<(), ReplicationError> {
        let stage = self.stage();
        if stage != Stage::Running {
            return Err(ReplicationError::VerifyNotRunning(stage));
        }
        let Some(link) = self.current_link() else {
            return Err(ReplicationError::VerifyLinkDown { behind: self.dirty.count_all() * SECTOR });
        };
        let v = &self.verify;
        if v.active.swap(true, Ordering::AcqRel) {
            return Err(ReplicationError::VerifyRunning {
                done: v.done.load(Ordering::Relaxed),
                total: v.total.load(Ordering::Relaxed),
            });
        }
        v.resync.store(resync, Ordering::Relaxed);
        v.checksums.store(link.checksum_max > 0, Ordering::Relaxed);
        v.total.store(self.size, Ordering::Relaxed);
        for c in [&v.done, &v.differing, &v.retried, &v.unverified, &v.logged] {
            c.store(0, Ordering::Relaxed);
        }
        *lock(&v.error) = None;
        v.clock.start(0);
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("replication-verify".into()).spawn(move || me.run_verify(&link));
        if let Err(e) = spawned {
            v.clock.stop();
            v.active.store(false, Ordering::Release);
            return Err(ReplicationError::SpawnVerify(e));
        }
        log::info!(
            "verify started ({} bytes, {}{})",
            self.size,
            if v.checksums.load(Ordering::Relaxed) { "checksums" } else { "read and compare" },
            if resync { ", resync of differences" } else { "" }
        );
        Ok(())
    }

    /// The verify thread: runs the pass, records how it ended, emits the event.
    fn run_verify(self: Arc<Self>, link: &Arc<Link>) {
        let r = self.verify_pass(link);
        let v = &self.verify;
        v.tracker.unwatch();
        let (differing, unverified) = (v.differing.load(Ordering::Relaxed), v.unverified.load(Ordering::Relaxed));
        let error = r.err();
        match &error {
            None => log::info!(
                "verify done: {differing} bytes differ, {unverified} bytes unverified (always written to), {} bytes \
                 compared again after racing a write",
                v.retried.load(Ordering::Relaxed)
            ),
            Some(e) => log::warn!("verify failed: {e} ({differing} differing bytes found before)"),
        }
        *lock(&v.error) = error.clone();
        v.clock.stop();
        v.active.store(false, Ordering::Release);
        self.emit(
            "REPLICATION_VERIFY_DONE",
            json!({"differing-bytes": differing, "unverified-bytes": unverified, "error": error}),
        );
    }

    /// Compares the whole disk, then the blocks that raced a write again.
    fn verify_pass(&self, link: &Arc<Link>) -> Result<(), String> {
        let timeout = lock(&self.cfg).timeout;
        if !self.verify.tracker.watch(Instant::now() + timeout) {
            return Err(format!("guest writes issued before the verify did not complete within {timeout:?}"));
        }
        let chunk = match link.checksum_max {
            0 => VERIFY_CHUNK,
            max => VERIFY_CHUNK.min(u64::from(max) / u64::from(CHECKSUM_BLOCK) * u64::from(CHECKSUM_BLOCK)),
        };
        let size = self.size;
        let whole = (0..size.div_ceil(chunk)).map(|i| (i * chunk, chunk.min(size - i * chunk)));
        let mut suspects = self.verify_ranges(link, whole, true)?;
        for round in 1..=RETRY_ROUNDS {
            if suspects.is_empty() {
                break;
            }
            // Give the racing writes a moment to finish before looking again.
            std::thread::sleep(Duration::from_millis(u64::from(round) * 5).min(Duration::from_millis(100)));
            let bytes: u64 = suspects.iter().map(|s| s.1).sum();
            self.verify.retried.fetch_add(bytes, Ordering::Relaxed);
            suspects = self.verify_ranges(link, suspects.into_iter(), false)?;
        }
        let left: u64 = suspects.iter().map(|s| s.1).sum();
        if left > 0 {
            log::warn!("verify: {left} bytes were written to during every comparison: not verified");
        }
        self.verify.unverified.fetch_add(left, Ordering::Relaxed);
        Ok(())
    }

    /// The link the verify started on is still the link, and replication still runs.
    fn verify_alive(&self, link: &Arc<Link>) -> Result<(), String> {
        if self.stage() != Stage::Running {
            return Err(format!("replication stopped during the verify (stage {})", self.stage().name()));
        }
        let same = lock(&self.link.current).as_ref().is_some_and(|l| Arc::ptr_eq(l, link));
        if !same || link.broken.load(Ordering::Acquire) {
            let why = link.why.get().cloned().or_else(|| self.role.error()).unwrap_or_else(|| "disconnected".into());
            return Err(format!("the replication link went down during the verify: {why}"));
        }
        Ok(())
    }

    /// Compares `ranges` (offset, length) in order, [`VERIFY_DEPTH`] in flight (a new one
    /// is sent as soon as the oldest is compared); returns the blocks that differ but raced a
    /// write. `progress`: count the ranges as done (the first pass).
    fn verify_ranges(
        &self,
        link: &Arc<Link>,
        mut ranges: impl Iterator<Item = (u64, u64)>,
        progress: bool,
    ) -> Result<Vec<(u64, u64)>, String> {
        let timeout = lock(&self.cfg).timeout;
        let mut inflight: std::collections::VecDeque<Chunk> = std::collections::VecDeque::with_capacity(VERIFY_DEPTH);
        let mut suspects = Vec::new();
        let mut scratch = AlignedBuf::default();
        let mut result = Ok(());
        loop {
            while result.is_ok() && inflight.len() < VERIFY_DEPTH {
                let Some((offset, len)) = ranges.next() else { break };
                result = self.verify_alive(link);
                if result.is_ok() {
                    inflight.push_back(self.verify_send(link, offset, len, timeout));
                }
            }
            let Some(c) = inflight.pop_front() else { break };
            if result.is_err() {
                // Failed already: close the windows of what is still in flight.
                self.verify.tracker.close(c.window);
                continue;
            }
            let len = c.len;
            match self.verify_finish(link, c, &mut scratch) {
                Ok(s) => {
                    suspects.extend(s);
                    if progress {
                        self.verify.done.fetch_add(len, Ordering::Relaxed);
                    }
                }
                Err(e) => result = Err(e),
            }
        }
        result.map(|()| suspects)
    }

    /// Opens the window of [offset, offset + len) and asks the secondary for its side.
    fn verify_send(&self, link: &Arc<Link>, offset: u64, len: u64, timeout: Duration) -> Chunk {
        let (s0, s1) = (offset / SECTOR, (offset + len).div_ceil(SECTOR));
        let t0 = self.now();
        let window = self.verify.tracker.open(s0, s1);
        // `len` is at most VERIFY_CHUNK (2 MiB): it fits the 32-bit NBD length.
        let length = len as u32;
        let (cmd, expect) = if link.checksum_max > 0 {
            (CMD_COLO_CHECKSUM, Expect::Hashes(checksum::hash_count(length)))
        } else {
            (CMD_READ, Expect::Data(length))
        };
        let (tx, rx) = mpsc::channel();
        let req = Request { flags: 0, cmd, handle: 0, offset, length };
        let rx = self.send_req(link, req, Payload::default(), expect, Waiter::Payload(tx)).ok().map(|()| rx);
        Chunk { offset, len, t0, window, rx, deadline: Instant::now() + timeout + Duration::from_secs(1) }
    }

    /// Reads the local side, waits for the secondary's, closes the window and compares.
    fn verify_finish(&self, link: &Arc<Link>, c: Chunk, scratch: &mut AlignedBuf) -> Result<Vec<(u64, u64)>, String> {
        let (s0, s1) = (c.offset / SECTOR, (c.offset + c.len).div_ceil(SECTOR));
        // One chunk is compared at a time: one buffer serves them all (a fresh 2 MiB
        // allocation per chunk costs more than hashing it).
        if scratch.len() < c.len as usize {
            *scratch = AlignedBuf::zeroed(VERIFY_CHUNK as usize);
        }
        let local = &mut scratch[..c.len as usize];
        let read = self.disk.read_exact_at(local, c.offset);
        let local = &*local;
        let remote = match c.rx {
            None => Err("the request could not be sent".to_string()),
            Some(rx) => rx
                .recv_timeout(c.deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| Err("no answer in time".to_string())),
        };
        let hit = self.verify.tracker.close(c.window);
        let t1 = self.now();
        if let Err(e) = read {
            return Err(format!("verify read of the local disk at {}+{} failed: {e}", c.offset, c.len));
        }
        let remote = match remote {
            Ok(r) => r,
            Err(e) => {
                self.verify_alive(link)?;
                return Err(format!("the secondary did not answer the verify of {}+{}: {e}", c.offset, c.len));
            }
        };
        let block = CHECKSUM_BLOCK as usize;
        let differing: Vec<usize> = if link.checksum_max > 0 {
            let mut mine = Vec::with_capacity(local.len().div_ceil(block));
            checksum::block_hashes(local, &mut mine);
            let theirs = checksum::decode_hashes(&remote);
            (0..mine.len()).filter(|&i| theirs.get(i) != Some(&mine[i])).collect()
        } else {
            let blocks = local.len().div_ceil(block);
            (0..blocks)
                .filter(|&i| {
                    let r = i * block..((i + 1) * block).min(local.len());
                    remote.get(r.clone()) != Some(&local[r])
                })
                .collect()
        };
        if differing.is_empty() {
            return Ok(Vec::new());
        }
        // Byte ranges of the differing blocks, adjacent ones merged.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for i in differing {
            let at = c.offset + (i * block) as u64;
            let len = (block as u64).min(c.offset + c.len - at);
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 == at => last.1 += len,
                _ => ranges.push((at, len)),
            }
        }
        let raced = hit || self.dirty.any(s0, s1) || lock(&self.resync.log).overlaps(s0, s1, c.t0, t1).0;
        if raced {
            // One block at a time, so a retry stays small and a write elsewhere in the chunk
            // does not keep racing it.
            return Ok(ranges
                .into_iter()
                .flat_map(|(at, len)| {
                    (0..len.div_ceil(block as u64)).map(move |k| (at + k * block as u64, block as u64))
                })
                .map(|(at, len)| (at, len.min(c.offset + c.len - at)))
                .collect());
        }
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        self.verify.differing.fetch_add(bytes, Ordering::Relaxed);
        match self.verify.logged.fetch_add(1, Ordering::Relaxed) {
            n if n < LOGGED_CHUNKS => log::warn!(
                "verify: {bytes} bytes differ in {}+{} ({} ranges, the first {}+{})",
                c.offset,
                c.len,
                ranges.len(),
                ranges[0].0,
                ranges[0].1
            ),
            LOGGED_CHUNKS => log::warn!("verify: more differences; not logged (query-replication counts them)"),
            _ => {}
        }
        if self.verify.resync.load(Ordering::Relaxed) {
            for (at, len) in ranges {
                self.dirty.set(at / SECTOR, (at + len).div_ceil(SECTOR));
            }
            self.stats.resync_total.fetch_add(bytes, Ordering::Relaxed);
            self.link.changed.notify_all();
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::super::MirrorConfig;
    use super::*;
    use crate::nbd::client::Reply;
    use crate::nbd::transport::Stream;
    use std::collections::HashMap;
    use std::os::unix::fs::FileExt;
    use std::sync::Condvar;
    use std::sync::atomic::AtomicBool;

    /// A mirror of a 4 MiB disk whose link is answered by a thread playing a colo-blk
    /// secondary with the disk image `secondary` (checksum requests only).
    fn mirror_with_secondary(disk: &[u8], secondary: Vec<u8>) -> (Arc<Mirror>, Arc<Link>) {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(disk, 0).unwrap();
        let cfg = MirrorConfig { secondary: None, timeout: Duration::from_secs(5), tls: None };
        let m = Mirror::new(Arc::new(f), disk.len() as u64, cfg);
        m.set_stage(Stage::Running);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel::<(Request, Payload)>();
        let link = Arc::new(Link {
            tx,
            ctl: Stream::Unix(a),
            pending: Mutex::new(HashMap::new()),
            drained: Condvar::new(),
            broken: AtomicBool::new(false),
            why: Default::default(),
            colo: true,
            write_zeroes: true,
            checksum_max: checksum::MAX_CHECKSUM_LEN,
        });
        let (weak, m2) = (Arc::downgrade(&link), m.clone());
        std::thread::spawn(move || {
            while let Ok((req, _)) = rx.recv() {
                let Some(l) = weak.upgrade() else { return };
                assert_eq!(req.cmd, CMD_COLO_CHECKSUM);
                let mut h = Vec::new();
                let (a, b) = (req.offset as usize, req.offset as usize + req.length as usize);
                checksum::block_hashes(&secondary[a..b], &mut h);
                let payload = checksum::encode_hashes(&h)[4..].to_vec();
                m2.on_reply(&l, Reply { error: 0, handle: req.handle }, Some(payload));
            }
        });
        *lock(&m.link.current) = Some(link.clone());
        (m, link)
    }

    /// The retry rule end to end in one process: a block that differs while a write to it
    /// stays in flight is compared again every round and ends unverified, never differing;
    /// a block that differs with no write around is reported (and, with resync, dirtied);
    /// once the write completed, the first block's real difference is reported too.
    #[test]
    fn racing_blocks_are_retried_and_never_reported() {
        const M: usize = 1 << 20;
        let disk: Vec<u8> = (0..4 * M).map(|i| (i % 251) as u8).collect();
        let mut sec = disk.clone();
        sec[M + 10] ^= 1; // block 256: a real difference
        sec[3 * M + 4096] ^= 1; // block 769: differs, and a write to it stays in flight
        let (m, link) = mirror_with_secondary(&disk, sec);
        m.verify.tracker.watching.store(true, Ordering::SeqCst);
        let s0 = (3 * M as u64 + 4096) / SECTOR;
        let hot = m.verify.tracker.started(s0, s0 + 8);
        assert!(matches!(hot, Ticket::Tracked(_)));
        m.verify.resync.store(true, Ordering::Relaxed);
        m.verify_pass(&link).unwrap();
        let v = m.verify.json();
        assert_eq!(v["differing-bytes"], 4096, "{v}");
        assert_eq!(v["unverified-bytes"], 4096, "{v}");
        assert_eq!(v["retried-bytes"], u64::from(RETRY_ROUNDS) * 4096, "{v}");
        assert_eq!(v["done-bytes"], 4 * M as u64, "{v}");
        assert_eq!(m.dirty.count_all(), 8, "resync dirtied the differing block only");
        assert_eq!(m.dirty.next_set_run(0, u64::MAX), Some((M as u64 / SECTOR, M as u64 / SECTOR + 8)));
        // The write completes: the block's difference is real and now reported.
        m.verify.tracker.finished(hot);
        m.dirty.clear_all();
        m.verify.resync.store(false, Ordering::Relaxed);
        for c in [&m.verify.differing, &m.verify.unverified, &m.verify.retried] {
            c.store(0, Ordering::Relaxed);
        }
        m.verify_pass(&link).unwrap();
        let v = m.verify.json();
        assert_eq!((v["differing-bytes"].as_u64(), v["unverified-bytes"].as_u64()), (Some(8192), Some(0)), "{v}");
        assert_eq!(m.dirty.count_all(), 0, "no resync asked for");
        // A range still dirty (the resync has not copied it) counts as racing, not differing.
        m.dirty.set(M as u64 / SECTOR, M as u64 / SECTOR + 1);
        m.verify.differing.store(0, Ordering::Relaxed);
        m.verify.unverified.store(0, Ordering::Relaxed);
        m.verify_pass(&link).unwrap();
        let v = m.verify.json();
        assert_eq!((v["differing-bytes"].as_u64(), v["unverified-bytes"].as_u64()), (Some(4096), Some(4096)), "{v}");
    }

    /// The ordering rule's bookkeeping: a window is hit by a write in flight when it opens
    /// and by one started while it is open, not by one that finished before or by one of
    /// other sectors; writes started before the watch are waited for.
    #[test]
    fn windows_see_exactly_the_writes_that_overlap_them() {
        let t = WriteTracker::default();
        let early = t.started(0, 8);
        assert_eq!(early, Ticket::Untracked);
        assert!(!t.watch(Instant::now() + Duration::from_millis(20)), "an untracked write is in flight");
        t.finished(early);
        assert!(t.watch(Instant::now() + Duration::from_secs(1)));
        let done_before = t.started(0, 8);
        t.finished(done_before);
        let inflight = t.started(100, 108);
        assert!(matches!(inflight, Ticket::Tracked(_)));
        let w1 = t.open(0, 64);
        let w2 = t.open(96, 104);
        let w3 = t.open(200, 300);
        let w4 = t.open(0, 16);
        let during = t.started(10, 12);
        t.finished(during);
        t.finished(inflight);
        assert!(t.close(w1), "a write started while the window was open");
        assert!(t.close(w2), "a write in flight when the window opened");
        assert!(!t.close(w3), "writes elsewhere");
        assert!(t.close(w4));
        let w5 = t.open(0, 1000);
        assert!(!t.close(w5), "every write finished before it opened");
        t.unwatch();
        assert_eq!(t.started(0, 8), Ticket::Untracked);
    }
}
