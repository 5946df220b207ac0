//! The failover commit: merging the hidden and active buffers into the disk while the
//! secondary VM keeps running, journaled so that it survives colo-blk being killed.
//!
//! Order of a commit:
//! 1. with every request quiesced: sync the buffers and the disk, write the journal's base
//!    (the buffers' maps), then the crash marker `merging` (journal.rs);
//! 2. merge chunk by chunk under the range lock, hidden-only sectors first, then active ones;
//!    every [`RECORD_EVERY`] or [`RECORD_SECTORS`] the disk is synced and the merged span
//!    journaled as `Clear`;
//! 3. a last pass with everything quiesced, sync, marker `clean`, journal deleted, stage done.
//!
//! VM writes during the commit go to the disk (stage failover) and leave the buffers; one that
//! lands on sectors the journal would still merge is journaled (`Clear`, after a disk sync)
//! before it is acknowledged, so a resumed merge never copies stale buffer data over it. In
//! stage failover-failed, VM writes to buffered sectors go to the active buffer and are
//! journaled as `Active` (after an active-buffer sync). A colo-blk started on a disk whose
//! marker says `merging` replays the journal and resumes the commit (`resume_commit`).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::journal::{CommitJournal, Record};
use super::state::DiskState;
use super::{MERGE_CHUNK, QUIESCE_TIMEOUT, SECTOR, Secondary, copy_sectors, lock};
use crate::block::bitmap::SectorBitmap;
use crate::replication::progress::JobClock;
use crate::replication::{ReplicationError, Stage};

/// Merged spans are journaled at least this often (a resumed merge redoes at most this much
/// work) ...
const RECORD_EVERY: Duration = Duration::from_millis(250);
/// ... or every this many merged sectors (64 MiB).
const RECORD_SECTORS: u64 = 64 << 11;

fn journal_err(e: super::journal::JournalError) -> io::Error {
    io::Error::other(e.to_string())
}

/// The failover commit: its journal, and its progress for `query-replication`.
#[derive(Debug)]
pub(super) struct FailoverCommit {
    /// The failover commit's journal (see journal.rs).
    pub(super) journal: CommitJournal,
    /// The sectors a replay of the journal would still merge: a VM write to one of them on
    /// the disk must be journaled (`Clear`) before it is acknowledged.
    pub(super) journaled: SectorBitmap,
    /// A commit found in the journal at start, to resume (see `resume_commit`).
    pub(super) resume: AtomicBool,
    /// `--x-commit-delay-ms`.
    pub(super) delay: Mutex<Option<Duration>>,
    /// Bytes the merge copies in all (set by `measure_merge`).
    pub(super) total_bytes: AtomicU64,
    /// Bytes merged so far.
    pub(super) done_bytes: AtomicU64,
    /// A merge thread is running.
    pub(super) merging: AtomicBool,
    /// The merge's rate and ETA.
    pub(super) clock: JobClock,
}

impl FailoverCommit {
    /// No commit running; `journal` is the disk's, of a disk of `sectors`.
    pub(super) fn new(journal: CommitJournal, sectors: u64) -> FailoverCommit {
        FailoverCommit {
            journal,
            journaled: SectorBitmap::new(sectors),
            resume: AtomicBool::new(false),
            delay: Mutex::new(None),
            total_bytes: AtomicU64::new(0),
            done_bytes: AtomicU64::new(0),
            merging: AtomicBool::new(false),
            clock: JobClock::default(),
        }
    }

    /// A merge starts (or restarts with `done` bytes already merged).
    pub(super) fn start(&self, done: u64) {
        self.merging.store(true, Ordering::Release);
        self.clock.start(done);
    }

    /// The merge thread ends (done or failed).
    pub(super) fn finish(&self) {
        self.merging.store(false, Ordering::Release);
        self.clock.stop();
    }

    /// The `commit` part of `query-replication`.
    pub(super) fn query(&self) -> Value {
        json!({
            "active": self.merging.load(Ordering::Acquire),
            "total-bytes": self.total_bytes.load(Ordering::Relaxed),
            "done-bytes": self.done_bytes.load(Ordering::Relaxed),
            "progress": self.clock.json(
                self.done_bytes.load(Ordering::Relaxed),
                self.total_bytes.load(Ordering::Relaxed).saturating_sub(self.done_bytes.load(Ordering::Relaxed)),
            ),
        })
    }
}

impl Secondary {
    /// `--x-commit-delay-ms`: pause after each merged chunk (crash tests).
    pub fn set_commit_delay(&self, delay: Option<Duration>) {
        *lock(&self.commit.delay) = delay;
    }

    /// Applies journal records to the (empty) maps at start.
    pub(super) fn replay(&self, records: &[Record]) {
        for r in records {
            match *r {
                Record::Saved(a, b) => {
                    self.overlay.saved_map.set(a, b);
                    self.commit.journaled.set(a, b);
                }
                Record::Active(a, b) => {
                    self.overlay.active_map.set(a, b);
                    self.commit.journaled.set(a, b);
                }
                Record::Clear(a, b) => {
                    self.overlay.saved_map.clear(a, b);
                    self.overlay.active_map.clear(a, b);
                    self.commit.journaled.clear(a, b);
                }
            }
        }
        log::warn!(
            "{} says colo-blk stopped during a failover commit: {} active and {} hidden bytes left \
             to merge (journal {}, {} records); the commit resumes",
            self.consistency.state.path().display(),
            self.overlay.active_map.count_all() * SECTOR,
            self.overlay.saved_map.count_all() * SECTOR,
            self.commit.journal.path().display(),
            records.len()
        );
    }

    /// Resumes the commit found in the journal at start, if any (the daemon calls this once
    /// its event sink is set).
    pub fn resume_commit(self: &Arc<Self>) {
        if !self.commit.resume.swap(false, Ordering::AcqRel) {
            return;
        }
        let _op = lock(&self.ops);
        self.measure_merge();
        self.commit.start(0);
        self.emit("REPLICATION_STAGE", json!({"mode": "secondary", "stage": Stage::Failover.name()}));
        if let Err(e) = self.spawn_failover(false) {
            self.set_error(e.to_string());
        }
    }

    /// Step 1: writes the journal's base and the `merging` marker. Callers hold the gate
    /// closed, so the maps do not change underneath.
    pub(super) fn begin_commit_journal(&self) -> io::Result<()> {
        // What the base says is in the buffers must be on stable storage before it.
        self.overlay.sync_data()?;
        self.file.sync_data()?;
        let sectors = self.size / SECTOR;
        let mut base = Vec::new();
        for (map, rec) in [
            (&self.overlay.saved_map, Record::Saved as fn(u64, u64) -> Record),
            (&self.overlay.active_map, Record::Active),
        ] {
            let mut s = 0;
            while let Some((a, b)) = map.next_set_run(s, sectors) {
                base.push(rec(a, b));
                s = b;
            }
        }
        self.commit.journal.create(sectors, base.iter().copied()).map_err(journal_err)?;
        self.commit.journaled.clear_all();
        for r in &base {
            if let Record::Saved(a, b) | Record::Active(a, b) = *r {
                self.commit.journaled.set(a, b);
            }
        }
        self.consistency.state.write(DiskState::Merging).map_err(io::Error::other)
    }

    /// A VM write or zeroing put sectors [s0, s1) on the disk during the commit: if the
    /// journal would still merge some of them, make the disk durable and journal them clear
    /// (before the request is acknowledged).
    pub(super) fn journal_disk_write(&self, s0: u64, s1: u64) -> io::Result<()> {
        if !self.commit.journaled.any(s0, s1) || !self.commit.journal.is_open() {
            return Ok(());
        }
        self.file.sync_data()?;
        self.commit.journal.append(Record::Clear(s0, s1)).map_err(journal_err)?;
        self.commit.journaled.clear(s0, s1);
        Ok(())
    }

    /// A VM write put sectors [s0, s1) into the active buffer in stage failover-failed:
    /// make it durable and journal it (before the request is acknowledged).
    pub(super) fn journal_active_write(&self, s0: u64, s1: u64) -> io::Result<()> {
        if !self.commit.journal.is_open() {
            return Ok(());
        }
        self.overlay.active.file.sync_data()?;
        self.commit.journal.append(Record::Active(s0, s1)).map_err(journal_err)?;
        self.commit.journaled.set(s0, s1);
        Ok(())
    }

    /// Journals the merged part of [s0, s1), after a disk sync: the sectors the journal still
    /// holds and neither map does any more. (A sector whose bits are set again — a VM write
    /// into the active buffer that started in stage failover-failed and finished after a
    /// retried merge passed it — is not merged yet and keeps its `Active` record.)
    fn record_merged(&self, s0: u64, s1: u64) -> io::Result<()> {
        if s0 >= s1 || !self.commit.journal.is_open() || !self.commit.journaled.any(s0, s1) {
            return Ok(());
        }
        // The spans of [s0, s1) with no bit set in either map (journal-clear sectors inside
        // them are cleared again, harmlessly): normally one.
        let mut merged = Vec::new();
        let mut s = s0;
        while s < s1 {
            let next_a = self.overlay.active_map.next_set_run(s, s1).map_or(s1, |r| r.0);
            let next_s = self.overlay.saved_map.next_set_run(s, s1).map_or(s1, |r| r.0);
            let stop = next_a.min(next_s);
            if stop > s {
                merged.push((s, stop));
            }
            if stop >= s1 {
                break;
            }
            // Skip the sectors still held by a map.
            let mut t = stop;
            loop {
                let run_end = |m: &SectorBitmap| m.next_set_run(t, s1).filter(|r| r.0 == t).map(|r| r.1);
                match run_end(&self.overlay.active_map).max(run_end(&self.overlay.saved_map)) {
                    Some(end) => t = end,
                    None => break,
                }
            }
            s = t;
        }
        if merged.is_empty() {
            return Ok(());
        }
        self.file.sync_data()?;
        let records: Vec<Record> = merged.iter().map(|&(a, b)| Record::Clear(a, b)).collect();
        self.commit.journal.append_all(&records).map_err(journal_err)?;
        for (a, b) in merged {
            self.commit.journaled.clear(a, b);
        }
        Ok(())
    }

    /// Copies hidden-only sectors, then active sectors, of [s0, s1) into the disk and clears
    /// their bits. The caller holds [s0, s1) exclusively (or the gate closed).
    fn merge_range(&self, s0: u64, s1: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        for (a, b, in_active) in self.overlay.active_map.runs(s0, s1) {
            if in_active {
                continue;
            }
            for (c, d, saved) in self.overlay.saved_map.runs(a, b) {
                if saved {
                    let n = copy_sectors(&*self.overlay.hidden.data, &*self.file, c, d, buf)?;
                    self.commit.done_bytes.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        for (a, b, in_active) in self.overlay.active_map.runs(s0, s1) {
            if in_active {
                let n = copy_sectors(&*self.overlay.active.data, &*self.file, a, b, buf)?;
                self.commit.done_bytes.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.overlay.saved_map.clear(s0, s1);
        self.overlay.active_map.clear(s0, s1);
        Ok(())
    }

    /// One pass over the disk. `locked`: the VM runs, take each chunk's range lock and
    /// journal the progress; otherwise the gate is closed.
    fn merge_pass(&self, locked: bool, fail: bool) -> io::Result<()> {
        if fail {
            return Err(io::Error::other("commit failure injected"));
        }
        let delay = *lock(&self.commit.delay);
        let sectors = self.size / SECTOR;
        let mut buf = Vec::new();
        let mut c = 0;
        let (mut unrecorded, mut recorded_at) = (0, Instant::now());
        while c < sectors {
            let end = (c + MERGE_CHUNK).min(sectors);
            let dirty = self.overlay.active_map.next_set_run(c, end).is_some()
                || self.overlay.saved_map.next_set_run(c, end).is_some();
            if dirty {
                let _g = locked.then(|| self.locks.exclusive(c, end));
                self.merge_range(c, end, &mut buf)?;
                if let Some(d) = delay {
                    std::thread::sleep(d);
                }
            }
            c = end;
            if locked && (c - unrecorded >= RECORD_SECTORS || recorded_at.elapsed() >= RECORD_EVERY) {
                self.record_merged(unrecorded, c)?;
                (unrecorded, recorded_at) = (c, Instant::now());
            }
        }
        if locked { self.record_merged(unrecorded, sectors) } else { Ok(()) }
    }

    pub(super) fn run_failover(self: &Arc<Self>, fail: bool) {
        // A failover in the load window first learns whether the VM loaded the pending
        // checkpoint (colo.rs); the merge then copies what is left to copy.
        if lock(&self.colo.state).failover_deferred() {
            self.await_load_decision();
            self.measure_merge();
        }
        let started = Instant::now();
        let journaled = if self.commit.journal.is_open() {
            Ok(())
        } else {
            // A deferred failover (the maps were only settled now) or a retry after the
            // journal could not be written.
            self.gate
                .close(QUIESCE_TIMEOUT)
                .ok_or_else(|| io::Error::other("quiesce timed out"))
                .and_then(|_closed| self.begin_commit_journal())
        };
        let outcome = journaled.and_then(|()| self.merge_pass(true, fail)).and_then(|()| {
            // Final pass with everything quiet, then switch the VM to the disk.
            let closed = self.gate.close(QUIESCE_TIMEOUT).ok_or_else(|| io::Error::other("quiesce timed out"))?;
            self.merge_pass(false, false)?;
            self.file.sync_data()?;
            self.consistency.state.write(DiskState::Clean).map_err(io::Error::other)?;
            if let Err(e) = self.commit.journal.remove() {
                // The marker says clean: a stale journal is removed at the next start.
                log::warn!("cannot remove the commit journal: {e}");
            }
            self.commit.journaled.clear_all();
            self.set_stage(Stage::Done);
            self.role.clear_error();
            drop(closed);
            Ok(())
        });
        self.commit.finish();
        match outcome {
            Ok(()) => {
                log::info!(
                    "failover commit done: {} bytes merged in {} ms",
                    self.commit.done_bytes.load(Ordering::Relaxed),
                    started.elapsed().as_millis()
                );
                self.emit("REPLICATION_FAILOVER_DONE", json!({"mode": "secondary"}));
                // Reclaim the buffers' space; their content is in the disk now.
                self.overlay.reclaim_merged(self.size);
            }
            Err(e) => {
                self.set_stage(Stage::FailoverFailed);
                self.set_error(format!("failover commit failed: {e}"));
            }
        }
    }

    pub(super) fn spawn_failover(self: &Arc<Self>, inject_commit_error: bool) -> Result<(), ReplicationError> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("failover-commit".into())
            .spawn(move || me.run_failover(inject_commit_error))
            .map(|_| ())
            .map_err(|e| {
                self.commit.merging.store(false, Ordering::Release);
                self.set_stage(Stage::FailoverFailed);
                ReplicationError::SpawnFailover(e)
            })
    }

    /// Sets the merge's progress total: active sectors, plus saved ones not overwritten in
    /// active.
    pub(super) fn measure_merge(&self) {
        let sectors = self.size / SECTOR;
        let hidden_only: u64 = self
            .overlay
            .active_map
            .runs(0, sectors)
            .into_iter()
            .filter(|&(_, _, in_active)| !in_active)
            .map(|(a, b, _)| self.overlay.saved_map.count(a, b))
            .sum();
        let total = (self.overlay.active_map.count_all() + hidden_only) * SECTOR;
        self.commit.total_bytes.store(total, Ordering::Relaxed);
        self.commit.done_bytes.store(0, Ordering::Relaxed);
    }

    /// `replication-stop {"failover": true}` in stage failover-failed: run the merge again.
    /// The maps are exact (the merge clears a range's bits only after copying it, and writes
    /// in failover-failed keep buffered sectors in the active buffer), so a second pass
    /// finishes what the first one left. Callers hold `ops`.
    pub(super) fn retry_failover(self: &Arc<Self>, inject_commit_error: bool) -> Result<(), ReplicationError> {
        log::warn!("retrying the failover commit");
        self.commit.start(self.commit.done_bytes.load(Ordering::Relaxed));
        self.set_stage(Stage::Failover);
        self.spawn_failover(inject_commit_error)
    }
}

#[cfg(test)]
mod tests {
    use super::super::journal::CommitJournal;
    use super::*;

    /// Set runs of the active and the saved map.
    type Maps = (Vec<(u64, u64, bool)>, Vec<(u64, u64, bool)>);

    /// What a restart would replay from the journal of `s`'s disk.
    fn replayed(s: &Secondary) -> Maps {
        let j = CommitJournal::for_disk(&s.commit.journal.path().with_extension(""));
        let records = j.load(s.size / SECTOR).unwrap();
        let (active, saved) = (SectorBitmap::new(s.size / SECTOR), SectorBitmap::new(s.size / SECTOR));
        for r in records {
            match r {
                Record::Saved(a, b) => saved.set(a, b),
                Record::Active(a, b) => active.set(a, b),
                Record::Clear(a, b) => {
                    active.clear(a, b);
                    saved.clear(a, b);
                }
            }
        }
        let set = |m: &SectorBitmap| m.runs(0, s.size / SECTOR).into_iter().filter(|r| r.2).collect();
        (set(&active), set(&saved))
    }

    /// A merged span is journaled clear, except sectors a map holds again: a VM write into
    /// the active buffer begun in stage failover-failed that lands after a retried merge
    /// passed its sectors must survive a restart.
    #[test]
    fn merged_spans_are_journaled_clear_but_not_sectors_held_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = tests_fixture(dir.path());
        s.overlay.active_map.set(0, 16);
        s.overlay.saved_map.set(100, 200);
        s.begin_commit_journal().unwrap();
        assert_eq!(replayed(&s), (vec![(0, 16, true)], vec![(100, 200, true)]));
        // The merge passes [0, 300); then the late write sets [50, 60) in active.
        let mut buf = Vec::new();
        s.merge_range(0, 300, &mut buf).unwrap();
        s.journal_active_write(50, 60).unwrap();
        s.overlay.active_map.set(50, 60);
        s.record_merged(0, 300).unwrap();
        assert_eq!(replayed(&s), (vec![(50, 60, true)], vec![]), "the late write was journaled away");
        // A VM write to the disk over a journaled sector is recorded before it returns.
        s.commit.journaled.set(400, 408);
        s.journal_disk_write(400, 408).unwrap();
        assert!(!s.commit.journaled.any(400, 408));
    }

    fn tests_fixture(dir: &std::path::Path) -> Arc<Secondary> {
        super::super::tests::secondary(dir, 1 << 20)
    }
}
