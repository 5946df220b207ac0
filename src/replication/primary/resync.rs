//! The resync: copies the dirty ranges of the local disk to the secondary, up to
//! [`RESYNC_DEPTH`] chunks in flight, holes and zero blocks as WRITE_ZEROES (sparse.rs) when
//! the secondary takes them. The manager runs it whenever the link is up and the bitmap is
//! not empty.
//!
//! Ordering rule for the resync: a chunk's dirty bits are cleared when its copy starts. A guest
//! write whose lifetime (from being forwarded to completing locally) overlaps the copy of an
//! overlapping chunk sets its bits again when it completes locally, because the chunk may have
//! read the old data and may reach the secondary after the guest write did. So an older copy is
//! never the last word on the secondary: the range is copied once more.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::link::Waiter;
use super::{Mirror, Payload, SECTOR, lock, sparse};
use crate::io::aligned::AlignedBuf;
use crate::nbd::wire::{CMD_WRITE, CMD_WRITE_ZEROES};
use crate::replication::progress::JobClock;

/// Largest piece the resync copies at once.
const RESYNC_CHUNK: u64 = 2048; // sectors = 1 MiB
/// Largest hole of the local disk the resync clears with one WRITE_ZEROES (a colo-blk
/// secondary that replicates copies the old data of the range before answering, so this
/// bounds one request's work there well within the link timeout).
const ZERO_CHUNK: u64 = 64 * 2048; // sectors = 64 MiB
/// Resync chunks in flight at once (the copy's queue depth).
pub(super) const RESYNC_DEPTH: usize = 8;

/// The resync's state besides the dirty bitmap: what the ordering rule needs (the clock and
/// the log of chunk copies), the chunks in flight, and the progress of the current round.
pub(super) struct Resync {
    /// Chunks the resync copied or is copying: (start clock, end clock or MAX, sectors).
    pub(super) log: Mutex<ResyncLog>,
    /// Orders write lifetimes against chunk copies.
    pub(super) clock: AtomicU64,
    /// Resync chunks whose dirty bits were cleared and whose copy has not finished: counted
    /// before the bits are cleared and released after a failed copy set them again, so
    /// "bitmap empty and nothing in flight" means the secondary has every write.
    pub(super) inflight: AtomicU64,
    /// Rate and ETA of the copy since the secondary was last in sync (`query-replication`).
    pub(super) progress: JobClock,
}

impl Resync {
    pub(super) fn new() -> Self {
        Resync {
            log: Mutex::new(ResyncLog::default()),
            clock: AtomicU64::new(1),
            inflight: AtomicU64::new(0),
            progress: JobClock::default(),
        }
    }
}

/// Recent resync chunk copies, for the ordering rule.
#[derive(Default)]
pub(super) struct ResyncLog {
    /// The copies in start order: (start clock, end clock or `u64::MAX` while copying, first
    /// sector, end sector).
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
    pub(super) fn overlaps(&self, s0: u64, s1: u64, since: u64, now: u64) -> (bool, usize) {
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

impl Mirror {
    /// The clock value a forwarded write records when it starts.
    pub(super) fn now(&self) -> u64 {
        self.resync.clock.fetch_add(1, Ordering::AcqRel)
    }

    /// A forwarded guest write that started at `since` finished locally: if an overlapping
    /// resync chunk was being copied at any time since, mark the range dirty again (see the
    /// module documentation).
    pub(super) fn local_write_done(&self, offset: u64, len: u64, since: u64, failed: bool) {
        let (s0, s1) = (offset / SECTOR, (offset + len).div_ceil(SECTOR));
        if failed {
            // The guest gets the error, but the secondary may have taken the write: the
            // range is dirty, so a resync gives the secondary what the local disk holds.
            self.dirty.set(s0, s1);
            return;
        }
        let now = self.now();
        let (overlapped, _) = lock(&self.resync.log).overlaps(s0, s1, since, now);
        if overlapped {
            self.dirty.set(s0, s1);
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
    pub(super) fn copy_chunks(&self, first: (u64, u64)) -> bool {
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
                let mut log = lock(&self.resync.log);
                let start = self.now();
                if log.entries.len() >= RESYNC_LOG_LEN
                    && let Some((_, end, _, _)) = log.entries.pop_front()
                {
                    log.floor = log.floor.max(end);
                }
                log.entries.push_back((start, u64::MAX, a, b));
                start
            };
            self.resync.inflight.fetch_add(1, Ordering::SeqCst);
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
            if let Some(e) = lock(&self.resync.log).entries.iter_mut().rev().find(|e| e.0 == c.start) {
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
            self.resync.inflight.fetch_sub(1, Ordering::SeqCst);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    use crate::nbd::client::Reply;
    use crate::nbd::wire::Request;
    use crate::replication::primary::MirrorConfig;
    use crate::replication::primary::link::Link;
    use crate::replication::primary::link::tests::test_link;

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
        *lock(&m.link.current) = Some(link.clone());
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
}
