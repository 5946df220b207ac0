//! The primary's activity log, `DISK.colo-al`: what a primary restarted after kill -9 or a
//! power loss must copy to its secondary (`sync=incremental`) instead of the whole disk.
//!
//! The log holds, in 4 MiB extents:
//! - the *hot* extents: every extent with a mirrored write in flight is in it *before* the
//!   write is submitted (a write to an extent already hot costs no metadata write; a new one
//!   costs one small synced write of the log, evicting the least recently used idle extent
//!   when [`CAPACITY`] are hot);
//! - the *dirty* extents: extents whose ranges the secondary is known to miss. An extent is
//!   added when it leaves the hot set while its dirty bits are set (or a resync copy is in
//!   flight), at `sync=full`, and at start; the set is emptied only when the secondary is in
//!   sync (so it may over-approximate, never under);
//! - the generation the secondary last acknowledged (windows.rs), 0 once replication stopped.
//!
//! Every dirty bit of the in-memory bitmap comes from a request that was in flight (its extent
//! hot), from `sync=full` or from a failed resync copy (covered by the in-flight rule), so
//! after a crash `hot ∪ dirty` covers every range where the two disks may differ.
//!
//! On disk: two slots written alternately (sequence number and checksum in each), so a torn
//! update leaves the previous state readable.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::block::bitmap::SectorBitmap;

/// Sectors per extent (4 MiB).
pub const EXTENT_SECTORS: u64 = 8192;
/// Hot extents kept (4 GiB of disk written recently).
pub const CAPACITY: usize = 1024;
const MAGIC: &[u8; 8] = b"COLOAL01";
const HEADER: usize = 64;

/// Errors opening the log.
#[derive(Debug, thiserror::Error)]
pub enum ActivityError {
    /// I/O on the log failed.
    #[error("{path}: {source}")]
    Io {
        /// The log.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What a previous run left: the extents that may differ and the acknowledged generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Extents (hot or dirty at the end of the previous run).
    pub extents: Vec<u64>,
    /// The generation the secondary last acknowledged (0: none).
    pub acked: u64,
}

#[derive(Debug, Default)]
struct Hot {
    inflight: u32,
    used: u64,
}

#[derive(Debug, Default)]
struct State {
    hot: HashMap<u64, Hot>,
    dirty: Vec<u64>,
    tick: u64,
    seq: u64,
    acked: u64,
    /// Metadata writes so far (for query-replication).
    writes: u64,
    broken: bool,
}

/// The activity log of one disk.
#[derive(Debug)]
pub struct ActivityLog {
    file: File,
    path: PathBuf,
    extents: u64,
    words: usize,
    slot_len: u64,
    state: Mutex<State>,
}

fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

impl ActivityLog {
    /// Opens (creating) the log of `disk` of `size` bytes; returns what the previous run
    /// left, if it left a readable log. The recovered extents stay dirty in the log until
    /// the secondary is in sync again.
    pub fn open(disk: &Path, size: u64) -> Result<(ActivityLog, Option<Recovered>), ActivityError> {
        let mut p = disk.as_os_str().to_owned();
        p.push(".colo-al");
        let path = PathBuf::from(p);
        let err = |source| ActivityError::Io { path: path.display().to_string(), source };
        let extents = (size / 512).div_ceil(EXTENT_SECTORS);
        let words = extents.div_ceil(64) as usize;
        let slot_len = ((HEADER + CAPACITY * 8 + words * 8) as u64).div_ceil(4096) * 4096;
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(err)?;
        let log =
            ActivityLog { file, path: path.clone(), extents, words, slot_len, state: Mutex::new(State::default()) };
        let recovered = log.load();
        {
            let mut s = log.state();
            if let Some((seq, r)) = &recovered {
                s.seq = *seq;
                s.dirty = r.extents.clone();
                s.acked = r.acked;
            }
            log.persist(&mut s).map_err(err)?;
        }
        Ok((log, recovered.map(|(_, r)| r)))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn extent_range(&self, s0: u64, s1: u64) -> std::ops::RangeInclusive<u64> {
        (s0 / EXTENT_SECTORS)..=((s1.max(s0 + 1) - 1) / EXTENT_SECTORS).min(self.extents.saturating_sub(1))
    }

    /// The sectors of extent `e`.
    pub fn sectors_of(e: u64) -> (u64, u64) {
        (e * EXTENT_SECTORS, (e + 1) * EXTENT_SECTORS)
    }

    /// The newest valid slot: (sequence, content).
    fn load(&self) -> Option<(u64, Recovered)> {
        let mut best: Option<(u64, Recovered)> = None;
        for slot in 0..2 {
            let mut b = vec![0u8; self.slot_len as usize];
            if self.file.read_exact_at(&mut b, slot * self.slot_len).is_err() || &b[..8] != MAGIC {
                continue;
            }
            let sum = word(&b, 40);
            b[40..48].fill(0);
            if checksum(&b) != sum || word(&b, 24) != self.extents {
                continue;
            }
            let (seq, acked) = (word(&b, 8), word(&b, 16));
            let n_hot = (word(&b, 32) as usize).min(CAPACITY);
            let mut extents: Vec<u64> =
                (0..n_hot).map(|i| word(&b, HEADER + i * 8)).filter(|&e| e < self.extents).collect();
            let base = HEADER + CAPACITY * 8;
            for w in 0..self.words {
                let bits = word(&b, base + w * 8);
                for bit in 0..64 {
                    let e = (w * 64 + bit) as u64;
                    if bits & (1 << bit) != 0 && e < self.extents {
                        extents.push(e);
                    }
                }
            }
            extents.sort_unstable();
            extents.dedup();
            if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                best = Some((seq, Recovered { extents, acked }));
            }
        }
        best
    }

    /// Writes the state into the next slot and syncs it.
    fn persist(&self, s: &mut State) -> io::Result<()> {
        s.seq += 1;
        let mut b = vec![0u8; self.slot_len as usize];
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&s.seq.to_le_bytes());
        b[16..24].copy_from_slice(&s.acked.to_le_bytes());
        b[24..32].copy_from_slice(&self.extents.to_le_bytes());
        let hot: Vec<u64> = s.hot.keys().copied().collect();
        // More hot extents than slots (all with writes in flight): the rest are written as
        // dirty, which a restart treats the same way.
        let (listed, overflow) = hot.split_at(hot.len().min(CAPACITY));
        b[32..40].copy_from_slice(&(listed.len() as u64).to_le_bytes());
        for (i, e) in listed.iter().enumerate() {
            b[HEADER + i * 8..HEADER + i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        let base = HEADER + CAPACITY * 8;
        for &e in s.dirty.iter().chain(overflow) {
            let at = base + (e / 64) as usize * 8;
            let w = word(&b, at) | 1 << (e % 64);
            b[at..at + 8].copy_from_slice(&w.to_le_bytes());
        }
        let sum = checksum(&b);
        b[40..48].copy_from_slice(&sum.to_le_bytes());
        self.file.write_all_at(&b, (s.seq % 2) * self.slot_len)?;
        self.file.sync_data()?;
        s.writes += 1;
        Ok(())
    }

    fn persist_or_break(&self, s: &mut State) {
        if s.broken {
            return;
        }
        if let Err(e) = self.persist(s) {
            // The log can no longer promise anything: make it unreadable so that a restart
            // falls back to a full copy, and stop writing it.
            log::error!(
                "{}: cannot write the activity log ({e}); a restarted primary needs sync=full",
                self.path.display()
            );
            s.broken = true;
            let _ = self.file.set_len(0);
        }
    }

    /// A mirrored write of sectors [s0, s1) is about to be submitted: its extents become hot
    /// (written down first when one was not). `dirty`/`copying`: the mirror's state, to keep
    /// an evicted extent that the secondary may miss.
    pub fn begin(&self, s0: u64, s1: u64, dirty: &SectorBitmap, copying: bool) {
        let mut s = self.state();
        s.tick += 1;
        let tick = s.tick;
        let mut missing = false;
        for e in self.extent_range(s0, s1) {
            match s.hot.get_mut(&e) {
                Some(h) => {
                    h.inflight += 1;
                    h.used = tick;
                }
                None => {
                    missing = true;
                    s.hot.insert(e, Hot { inflight: 1, used: tick });
                }
            }
        }
        if !missing {
            return;
        }
        while s.hot.len() > CAPACITY {
            let idle = s.hot.iter().filter(|(_, h)| h.inflight == 0).min_by_key(|(_, h)| h.used).map(|(&e, _)| e);
            let Some(e) = idle else { break };
            s.hot.remove(&e);
            let (a, b) = Self::sectors_of(e);
            if (copying || dirty.any(a, b)) && !s.dirty.contains(&e) {
                s.dirty.push(e);
            }
        }
        self.persist_or_break(&mut s);
    }

    /// The write of [s0, s1) begun with [`ActivityLog::begin`] completed.
    pub fn end(&self, s0: u64, s1: u64) {
        let mut s = self.state();
        for e in self.extent_range(s0, s1) {
            if let Some(h) = s.hot.get_mut(&e) {
                h.inflight = h.inflight.saturating_sub(1);
            }
        }
    }

    /// Every extent is dirty (`sync=full`).
    pub fn all_dirty(&self) {
        let mut s = self.state();
        s.dirty = (0..self.extents).collect();
        self.persist_or_break(&mut s);
    }

    /// The secondary is in sync: nothing is dirty any more.
    pub fn in_sync(&self) {
        let mut s = self.state();
        if !s.dirty.is_empty() {
            s.dirty.clear();
            self.persist_or_break(&mut s);
        }
    }

    /// The secondary acknowledged generation `g` (0: replication stopped, nothing to trust).
    pub fn set_acked(&self, g: u64) {
        let mut s = self.state();
        if s.acked != g {
            s.acked = g;
            self.persist_or_break(&mut s);
        }
    }

    /// For `query-replication`: hot extents, dirty extents, metadata writes.
    pub fn json(&self) -> serde_json::Value {
        let s = self.state();
        serde_json::json!({
            "hot-extents": s.hot.len(),
            "dirty-extents": s.dirty.len(),
            "writes": s.writes,
            "broken": s.broken,
        })
    }
}

impl super::Mirror {
    /// Gives the mirror its disk's activity log; what a previous run left becomes dirty (a
    /// `sync=incremental` start copies it) and its acknowledged generation is trusted again.
    pub fn set_activity_log(&self, log: ActivityLog, recovered: Option<Recovered>) {
        if let Some(r) = recovered {
            let sectors = self.size / super::SECTOR;
            for &e in &r.extents {
                let (a, b) = ActivityLog::sectors_of(e);
                self.dirty.set(a, b.min(sectors));
            }
            if !r.extents.is_empty() {
                log::warn!(
                    "activity log: {} extents of 4 MiB may differ from the secondary (a previous run \
                     ended without them in sync); sync=incremental copies them",
                    r.extents.len()
                );
            }
            self.window_acked(r.acked);
        }
        let _ = self.activity.set(log);
    }

    /// A mirrored write of [s0, s1) is about to be submitted.
    pub(super) fn activity_begin(&self, s0: u64, s1: u64) {
        if let Some(al) = self.activity.get() {
            let copying = self.resync.inflight.load(std::sync::atomic::Ordering::Acquire) > 0;
            al.begin(s0, s1, &self.dirty, copying);
        }
    }

    /// The mirrored write of [s0, s1) completed.
    pub(super) fn activity_end(&self, s0: u64, s1: u64) {
        if let Some(al) = self.activity.get() {
            al.end(s0, s1);
        }
    }

    pub(super) fn activity_all_dirty(&self) {
        if let Some(al) = self.activity.get() {
            al.all_dirty();
        }
    }

    pub(super) fn activity_in_sync(&self) {
        if let Some(al) = self.activity.get() {
            al.in_sync();
        }
    }

    pub(super) fn activity_acked(&self, g: u64) {
        if let Some(al) = self.activity.get() {
            al.set_acked(g);
        }
    }

    pub(super) fn activity_json(&self) -> serde_json::Value {
        self.activity.get().map_or(serde_json::Value::Null, |al| al.json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_and_dirty_extents_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        let size = 64 << 20; // 16 extents
        let (log, rec) = ActivityLog::open(&disk, size).unwrap();
        assert_eq!(rec, None, "a fresh log has nothing to recover");
        let dirty = SectorBitmap::new(size / 512);
        log.begin(0, 8, &dirty, false);
        log.begin(EXTENT_SECTORS * 3 - 1, EXTENT_SECTORS * 3 + 1, &dirty, false);
        let writes = log.json()["writes"].as_u64().unwrap();
        log.begin(8, 16, &dirty, false);
        assert_eq!(log.json()["writes"].as_u64().unwrap(), writes, "a hot extent costs no metadata write");
        log.set_acked(42);
        drop(log);
        let (log, rec) = ActivityLog::open(&disk, size).unwrap();
        let rec = rec.unwrap();
        assert_eq!(rec.extents, vec![0, 2, 3]);
        assert_eq!(rec.acked, 42);
        // Recovered extents stay dirty until in sync, across another restart.
        drop(log);
        let (log, rec) = ActivityLog::open(&disk, size).unwrap();
        assert_eq!(rec.unwrap().extents, vec![0, 2, 3]);
        log.in_sync();
        drop(log);
        assert!(ActivityLog::open(&disk, size).unwrap().1.unwrap().extents.is_empty());
    }

    #[test]
    fn an_evicted_extent_that_is_dirty_stays_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        let size = (CAPACITY as u64 + 8) * EXTENT_SECTORS * 512;
        let (log, _) = ActivityLog::open(&disk, size).unwrap();
        let dirty = SectorBitmap::new(size / 512);
        dirty.set(10, 11); // extent 0 misses a write
        for e in 0..CAPACITY as u64 + 4 {
            let (a, _) = ActivityLog::sectors_of(e);
            log.begin(a, a + 8, &dirty, false);
            log.end(a, a + 8);
        }
        assert_eq!(log.json()["hot-extents"], CAPACITY);
        drop(log);
        let rec = ActivityLog::open(&disk, size).unwrap().1.unwrap();
        assert!(rec.extents.contains(&0), "the dirty evicted extent was forgotten");
        assert!(!rec.extents.contains(&1), "a clean evicted extent was kept");
        assert!(rec.extents.contains(&(CAPACITY as u64 + 3)));
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        let (log, _) = ActivityLog::open(&disk, 64 << 20).unwrap();
        let dirty = SectorBitmap::new(1 << 17);
        log.begin(0, 8, &dirty, false);
        let seq = log.state().seq;
        log.begin(EXTENT_SECTORS * 5, EXTENT_SECTORS * 5 + 8, &dirty, false);
        // Tear the newest slot.
        log.file.write_all_at(&[0xff; 16], ((seq + 1) % 2) * log.slot_len + 100).unwrap();
        drop(log);
        let rec = ActivityLog::open(&disk, 64 << 20).unwrap().1.unwrap();
        assert_eq!(rec.extents, vec![0], "the previous slot");
    }
}
