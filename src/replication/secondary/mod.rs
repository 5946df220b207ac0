//! The secondary: the primary's writes arrive over NBD onto the secondary disk, with the old
//! data saved into the hidden buffer first (copy-before-write, once per checkpoint epoch);
//! the secondary VM writes into the active buffer and reads active -> hidden -> disk per sector.
//!
//! Buffers are sparse files the size of the disk where sector N lives at offset N, plus an
//! in-memory sector bitmap each (`active`: the VM wrote it; `saved`: its pre-epoch data is in
//! hidden). Sector granularity means no copy amplification and no read-modify-write: a 4 KiB
//! primary write copies exactly 4 KiB. A checkpoint clears both bitmaps and punches the
//! buffers empty. Failover merges hidden then active into the disk in the background.
//!
//! Concurrency: NBD writes take their sector range exclusively in a [`RangeLock`] while they
//! copy-before-write and write the disk; VM requests take theirs shared, so a VM read that
//! falls through to the disk never sees a half-done primary write, and the failover merge
//! (exclusive per chunk) never interleaves with VM I/O on the same sectors. The [`Gate`]
//! quiesces both paths for checkpoint, start, stop and the end of failover.
//!
//! [`Secondary`] holds the disk, the locks and the stage here, and one part per concern, each
//! with the file that owns it: `overlay.rs` (the buffers and their maps; `reclaim.rs` empties
//! them), `colo.rs` (checkpoint barriers), `commit.rs` + `journal.rs` (the failover commit),
//! `state.rs` (crash marker, consistency, data generations), `control.rs` (the QMP operations
//! and the counters they report). The three faces: `device.rs` (the VM's queues), `export.rs`
//! (the primary's NBD export), `control.rs`.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::gate::Gate;
use super::generation::Generations;
use super::pool::Pool;
use super::role::{Announce, RoleState};
use super::{EventSink, ReplicationError, Stage};
use crate::block::image::ImageData;
use crate::block::range_lock::RangeLock;
use crate::block::{BlockDevice, BlockError, Buffers, IoEngineError, IoRequest, Op, OpKind};
use crate::nbd::NbdServer;
use colo::ColoBarriers;
use commit::FailoverCommit;
use control::SecondaryStats;
use overlay::{Overlay, Pieces, Source};
use state::Consistency;

const SECTOR: u64 = 512;
/// Sectors the failover merge copies under one exclusive lock (1 MiB).
const MERGE_CHUNK: u64 = 2048;
/// Threads running the VM's requests while replicating (the in-flight depth across queues).
const POOL_THREADS: usize = 16;
/// How long an operation waits for in-flight requests before giving up.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Paths of the secondary's files.
#[derive(Debug, Clone)]
pub struct SecondaryFiles {
    /// The active buffer (secondary VM writes).
    pub active: PathBuf,
    /// The hidden buffer (copy-before-write of the disk).
    pub hidden: PathBuf,
    /// Open buffers with O_DIRECT.
    pub direct: bool,
}

/// The secondary's shared state: the disk, the overlay in front of it, the locks and stage
/// every request goes through, and one part per concern (COLO barriers, the failover commit,
/// the disk's consistency, the counters), each in the file that owns it.
pub struct Secondary {
    /// The disk as a block device: the done stage's queues and direct VM reads use it.
    disk: Arc<dyn BlockDevice>,
    /// The disk's bytes for every replication path (for a raw image its file, or with
    /// `--direct` an `O_DIRECT` descriptor that bounces unaligned requests: see
    /// `RawDisk::data`; for qcow2, the format driver).
    file: Arc<dyn ImageData>,
    /// The disk's size in bytes (the buffers have the same).
    size: u64,
    /// The active and hidden buffers and their sector maps (overlay.rs).
    overlay: Overlay,
    /// Sector ranges in use: NBD writes and merge chunks take theirs exclusively, VM requests
    /// shared (see the module comment).
    locks: RangeLock,
    /// Quiesces the NBD and VM paths for checkpoint, start, stop and the end of failover.
    gate: Gate,
    /// Stage, last error, events (shared with the primary's way of reporting).
    role: RoleState,
    /// Serialises start / checkpoint / stop.
    ops: Mutex<()>,
    /// The NBD server whose clients are closed at failover.
    nbd: Mutex<Option<NbdServer>>,
    /// Threads running the VM's requests on the buffer path.
    pool: Pool,
    /// COLO checkpoint barriers: pending, committed, decided at a failover (colo.rs).
    colo: ColoBarriers,
    /// The failover commit: its journal and progress (commit.rs).
    commit: FailoverCommit,
    /// The crash marker and data generations: whether a failover may use the disk (state.rs).
    consistency: Consistency,
    /// Counters reported by `query-replication` (control.rs).
    stats: SecondaryStats,
}

impl std::fmt::Debug for Secondary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secondary").field("size", &self.size).field("stage", &self.stage()).finish()
    }
}

fn result(r: i32) -> io::Result<()> {
    if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(()) }
}

/// Copies [start, end) sectors from `src` to `dst` at the same offsets. Holes of `src`
/// (`SEEK_DATA`) and pieces that read as zeroes are punched in `dst` instead of written
/// (zeroes either way; see `io::sync::fallocate_with_fallback`), so copying a hole — the
/// copy-before-write of a sparse disk under a full sync, a merge of such a saved range —
/// costs no read and keeps the destination sparse.
fn copy_sectors(src: &dyn ImageData, dst: &dyn ImageData, start: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<u64> {
    let punch = |offset: u64, len: u64| result(dst.zero(&Op::WriteZeroes { offset, len, unmap: true }));
    let mut s = start;
    while s < end {
        // Extents are file-system blocks; a partial sector at a hole's edge is copied.
        let hole = src.hole_end(s * SECTOR, end * SECTOR) / SECTOR;
        if hole > s {
            punch(s * SECTOR, (hole - s) * SECTOR)?;
            s = hole;
            continue;
        }
        let n = (end - s).min(MERGE_CHUNK);
        let len = (n * SECTOR) as usize;
        buf.resize(len, 0);
        src.read_exact_at(&mut buf[..len], s * SECTOR)?;
        if crate::block::extents::is_zero(&buf[..len]) {
            punch(s * SECTOR, len as u64)?;
        } else {
            dst.write_all_at(&buf[..len], s * SECTOR)?;
        }
        s += n;
    }
    Ok((end - start) * SECTOR)
}

impl Secondary {
    /// Opens the buffers (creating them sparse with the disk's size when missing).
    pub fn open(
        disk: Arc<dyn BlockDevice>,
        file: Arc<dyn ImageData>,
        disk_path: PathBuf,
        files: SecondaryFiles,
    ) -> Result<Arc<Self>, BlockError> {
        let size = disk.size();
        let overlay = Overlay::open(files, size)?;
        let sectors = size / SECTOR;
        let state = StateFile::for_disk(&disk_path);
        let journal = CommitJournal::for_disk(&disk_path);
        let gens = Arc::new(Generations::for_disk(&disk_path).map_err(|e| BlockError::Refused(e.to_string()))?);
        let mut resume = None;
        let unclean = match state.read().map_err(|e| BlockError::Refused(e.to_string()))? {
            DiskState::Clean => false,
            DiskState::Replicating => {
                log::warn!(
                    "{} says colo-blk stopped while replicating: the disk is not a checkpoint; \
                     failover is refused until the primary resynchronised it and a checkpoint passed",
                    state.path().display()
                );
                true
            }
            DiskState::Merging if journal.exists() => {
                let records = journal.load(sectors).map_err(|e| {
                    BlockError::Refused(format!(
                        "{} says colo-blk stopped during a failover commit, and its journal cannot be \
                         read: {e}. The disk is half merged. Restore it from the primary or a backup \
                         (e.g. serve it as a fresh secondary and let the primary copy it with \
                         sync=full), then remove {} and {} to serve it",
                        disk_path.display(),
                        state.path().display(),
                        journal.path().display()
                    ))
                })?;
                resume = Some(records);
                false
            }
            DiskState::Merging => {
                return Err(BlockError::Refused(format!(
                    "{} says colo-blk stopped during a failover commit, but the commit journal {} is \
                     missing: the disk is half merged and the merge cannot be resumed. Restore the \
                     disk from the primary or a backup (e.g. serve it as a fresh secondary and let \
                     the primary copy it with sync=full), then remove {} to serve it",
                    disk_path.display(),
                    journal.path().display(),
                    state.path().display()
                )));
            }
        };
        if resume.is_none() && journal.exists() {
            // A journal whose commit never started (no marker yet) or finished (the marker
            // was written clean just before the journal was to be deleted).
            log::info!("removing the stale commit journal {}", journal.path().display());
            journal.remove().map_err(|e| BlockError::Refused(e.to_string()))?;
        }
        let unclean_why = if unclean {
            format!("colo-blk stopped while replicating ({})", state.path().display())
        } else {
            String::new()
        };
        let me = Arc::new(Secondary {
            disk,
            file,
            size,
            overlay,
            locks: RangeLock::default(),
            gate: Gate::default(),
            role: RoleState::new("secondary"),
            ops: Mutex::new(()),
            nbd: Mutex::new(None),
            colo: ColoBarriers::default(),
            commit: FailoverCommit::new(journal, sectors),
            consistency: Consistency {
                state,
                unclean: AtomicBool::new(unclean),
                unclean_why: Mutex::new(unclean_why),
                gens,
                adopted: AtomicU64::new(0),
            },
            stats: SecondaryStats::default(),
            pool: Pool::new(POOL_THREADS).map_err(|e| BlockError::Engine(IoEngineError::Setup(e)))?,
        });
        if let Some(records) = resume {
            me.replay(&records);
            me.role.resume_at(Stage::Failover);
            me.commit.resume.store(true, Ordering::Release);
        }
        Ok(me)
    }

    /// Checks that both buffers have the disk's length (QEMU's start-time check).
    pub fn check_lengths(&self) -> Result<(), ReplicationError> {
        if self.overlay.lengths_are(self.size) { Ok(()) } else { Err(ReplicationError::LengthMismatch) }
    }

    /// The NBD server whose clients are closed at failover.
    pub fn set_nbd_server(&self, server: NbdServer) {
        *lock(&self.nbd) = Some(server);
    }

    /// Where stage changes are reported.
    pub fn set_events(&self, sink: EventSink) {
        self.role.set_events(sink);
    }

    /// Lets `x-inject-fault {"op": "barrier"}` rules act on this secondary's barriers.
    pub fn set_fault_plan(&self, plan: Arc<crate::block::fault::FaultPlan>) {
        *lock(&self.colo.faults) = Some(plan);
    }

    /// The disk's data generations (a failed-over secondary's mirror uses the same).
    pub fn generations(&self) -> Arc<Generations> {
        self.consistency.gens.clone()
    }

    /// `CMD_COLO_ADOPT` from the primary: the disk now follows generation `g`.
    pub(super) fn adopt_generation(&self, g: u64) -> io::Result<()> {
        if g == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        match self.stage() {
            Stage::None | Stage::Running => {}
            _ => return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN)),
        }
        self.consistency.adopt(g)
    }

    /// The current stage (an atomic read: every VM request asks).
    pub fn stage(&self) -> Stage {
        self.role.stage()
    }

    fn set_stage(&self, s: Stage) {
        self.role.set_stage(s);
    }

    fn emit(&self, name: &str, data: Value) {
        self.role.emit(name, data);
    }

    fn set_error(&self, msg: String) {
        self.role.record_error(msg, Announce::Every);
    }

    fn sectors(offset: u64, len: u64) -> (u64, u64) {
        (offset / SECTOR, (offset + len).div_ceil(SECTOR))
    }

    // ---- copy-before-write (NBD side) --------------------------------------------------

    /// Saves the disk's data of every sector in [s0, s1) not saved yet this epoch into hidden.
    /// The caller holds [s0, s1) exclusively.
    fn copy_before_write(&self, s0: u64, s1: u64) -> io::Result<()> {
        let mut buf = Vec::new();
        for (a, b, saved) in self.overlay.saved_map.runs(s0, s1) {
            if saved {
                continue;
            }
            let n = copy_sectors(&*self.file, &*self.overlay.hidden.data, a, b, &mut buf)?;
            self.overlay.saved_map.set(a, b);
            self.stats.cow_bytes.fetch_add(n, Ordering::Relaxed);
        }
        Ok(())
    }

    fn nbd_stage_check(&self) -> io::Result<Stage> {
        match self.stage() {
            s @ (Stage::None | Stage::Running) => Ok(s),
            Stage::Failover | Stage::FailoverFailed | Stage::Done => Err(io::Error::from_raw_os_error(libc::ESHUTDOWN)),
        }
    }

    /// A write-type NBD request: copy-before-write while running, then apply `f` to the disk.
    fn nbd_modify(&self, offset: u64, len: u64, f: impl FnOnce(&dyn ImageData) -> io::Result<()>) -> io::Result<()> {
        // A primary write after a barrier proves the secondary loaded that checkpoint.
        self.commit_pending(CommitTrigger::PrimaryWrite, None).map_err(io::Error::other)?;
        let _t = self.gate.enter();
        let stage = self.nbd_stage_check()?;
        let (s0, s1) = Self::sectors(offset, len);
        if stage == Stage::Running {
            let _g = self.locks.exclusive(s0, s1);
            self.copy_before_write(s0, s1)?;
            self.colo.primary_writes.fetch_add(1, Ordering::AcqRel);
            f(&*self.file)
        } else {
            // Stage none: the initial synchronisation writes straight to the disk.
            f(&*self.file)
        }
    }

    // ---- secondary VM side ---------------------------------------------------------------

    /// Whether a VM read of sectors [s0, s1) may go straight to the disk's own queue (the
    /// worker's io_uring, no pool thread, no lock): replicating, the gate open, and no sector
    /// of it in either buffer, so the disk holds exactly what the VM must see. Returns the
    /// gate generation for [`Secondary::direct_read_valid`].
    ///
    /// Why that is safe without the range lock: a primary write marks its sectors saved
    /// (after copying them to hidden) *before* it writes the disk, and every checkpoint or
    /// stage change closes the gate, which bumps the generation. A read that still finds its
    /// sectors unsaved and the generation unchanged once it completed read no byte of a
    /// newer epoch; otherwise it is redone on the buffer path.
    pub(super) fn direct_read_start(&self, s0: u64, s1: u64) -> Option<u64> {
        let generation = self.gate.generation();
        let open = generation.is_multiple_of(2);
        (open
            && self.stage() == Stage::Running
            && !self.overlay.active_map.any(s0, s1)
            && !self.overlay.saved_map.any(s0, s1))
        .then_some(generation)
    }

    /// Like [`Secondary::direct_read_start`] for a VM read every sector of which is in the
    /// active buffer: it may go straight to the active file on the worker's io_uring. The
    /// active buffer changes only by the VM's own writes (ordered by the guest) and by
    /// checkpoints, which bump the gate generation; [`Secondary::direct_active_read_valid`]
    /// checks both at completion.
    pub(super) fn direct_active_read_start(&self, s0: u64, s1: u64) -> Option<u64> {
        let generation = self.gate.generation();
        let open = generation.is_multiple_of(2);
        (open && self.stage() == Stage::Running && self.overlay.active_map.all(s0, s1)).then_some(generation)
    }

    /// Whether a direct read of the active buffer started at `generation` may be answered.
    pub(super) fn direct_active_read_valid(&self, s0: u64, s1: u64, generation: u64) -> bool {
        let valid = self.gate.generation() == generation && self.overlay.active_map.all(s0, s1);
        self.stats.count_direct(valid);
        valid
    }

    /// Starts a VM read whose sectors lie in several places (`pieces`: runs of sectors and
    /// where each is read from), to be read piece by piece on the worker's ring; the gate
    /// generation to check at completion, or None (gate closed, not running).
    pub(super) fn split_read_start(&self, s0: u64, s1: u64) -> Option<(u64, Pieces)> {
        let generation = self.gate.generation();
        if !generation.is_multiple_of(2) || self.stage() != Stage::Running {
            return None;
        }
        Some((generation, self.overlay.pieces(s0, s1)))
    }

    /// Whether a split read started at `generation` may be answered: no checkpoint or stage
    /// change since, and every piece still where it was read from.
    pub(super) fn split_read_valid(&self, pieces: &[(u64, u64, Source)], generation: u64) -> bool {
        let valid = self.gate.generation() == generation && self.overlay.pieces_unmoved(pieces);
        self.stats.count_direct(valid);
        valid
    }

    /// Whether a direct read started at `generation` may be answered (see
    /// [`Secondary::direct_read_start`]).
    pub(super) fn direct_read_valid(&self, s0: u64, s1: u64, generation: u64) -> bool {
        let valid = !self.overlay.saved_map.any(s0, s1) && self.gate.generation() == generation;
        self.stats.count_direct(valid);
        valid
    }

    /// Executes one VM request synchronously; returns bytes or -errno.
    fn vm_execute(&self, request: &mut IoRequest) -> i32 {
        let _t = self.gate.enter();
        let stage = self.stage();
        let bufs = &mut request.bufs;
        match (stage, request.kind) {
            (Stage::None, OpKind::Flush) => 0,
            (Stage::None, _) => -libc::EIO,
            (Stage::Done, OpKind::Read { offset }) => self.file.transfer(offset, bufs, false, false),
            (Stage::Done, OpKind::Write { offset, dsync }) => self.file.transfer(offset, bufs, true, dsync),
            (_, OpKind::Read { offset }) => self.vm_read(offset, bufs),
            (_, OpKind::Write { offset, dsync }) => self.vm_write(stage, offset, bufs, dsync),
            (_, OpKind::Flush) => {
                let r = if stage == Stage::Done { self.file.sync_data() } else { self.flush_all() };
                r.map_or_else(|e| -e.raw_os_error().unwrap_or(libc::EIO), |()| 0)
            }
            (Stage::Done, OpKind::Discard { .. } | OpKind::WriteZeroes { .. }) => self.file.zero(&request.op()),
            (_, OpKind::Discard { offset, len } | OpKind::WriteZeroes { offset, len, .. }) => {
                self.vm_zero(stage, offset, len)
            }
        }
    }

    fn vm_read(&self, offset: u64, bufs: &Buffers) -> i32 {
        let len = bufs.len();
        let (s0, s1) = Self::sectors(offset, len);
        let _g = self.locks.shared(s0, s1);
        for (a, b, in_active) in self.overlay.active_map.runs(s0, s1) {
            let pieces: Vec<(u64, u64, &dyn ImageData)> = if in_active {
                vec![(a, b, &*self.overlay.active.data)]
            } else {
                self.overlay
                    .saved_map
                    .runs(a, b)
                    .into_iter()
                    .map(|(c, d, saved)| (c, d, if saved { &*self.overlay.hidden.data } else { &*self.file }))
                    .collect()
            };
            for (c, d, source) in pieces {
                let mut sub = bufs.slice(c * SECTOR - offset, (d - c) * SECTOR);
                let r = source.transfer(c * SECTOR, &mut sub, false, false);
                if r < 0 {
                    return r;
                }
            }
        }
        crate::io::result_from_len(len)
    }

    fn vm_write(&self, stage: Stage, offset: u64, bufs: &mut Buffers, dsync: bool) -> i32 {
        let len = bufs.len();
        let (s0, s1) = Self::sectors(offset, len);
        let _g = self.locks.shared(s0, s1);
        match stage {
            Stage::Running => {
                let r = self.overlay.active.data.transfer(offset, bufs, true, dsync);
                if r >= 0 {
                    self.overlay.active_map.set(s0, s1);
                }
                r
            }
            Stage::Failover => {
                // The merge is copying the buffers into the disk: newer data goes straight to
                // the disk and the sectors leave the buffers, so the merge cannot overwrite it
                // (nor a resumed one: see commit.rs).
                let r = self.file.transfer(offset, bufs, true, dsync);
                if r >= 0 {
                    if let Err(e) = self.journal_disk_write(s0, s1) {
                        log::error!("cannot journal a VM write during the failover commit: {e}");
                        return -libc::EIO;
                    }
                    self.overlay.active_map.clear(s0, s1);
                    self.overlay.saved_map.clear(s0, s1);
                }
                r
            }
            Stage::FailoverFailed => {
                // Spec §2.2: sectors allocated in the buffers go to active, the rest to the disk.
                for (a, b, in_active) in self.overlay.active_map.runs(s0, s1) {
                    for (c, d, saved) in self.overlay.saved_map.runs(a, b) {
                        let target: &dyn ImageData =
                            if in_active || saved { &*self.overlay.active.data } else { &*self.file };
                        let mut sub = bufs.slice(c * SECTOR - offset, (d - c) * SECTOR);
                        let r = target.transfer(c * SECTOR, &mut sub, true, dsync);
                        if r < 0 {
                            return r;
                        }
                        // A retried or resumed commit must see this write (commit.rs).
                        let journaled = match (in_active, saved) {
                            (true, _) => Ok(()),
                            (false, true) => self.journal_active_write(c, d),
                            (false, false) => self.journal_disk_write(c, d),
                        };
                        if let Err(e) = journaled {
                            log::error!("cannot journal a VM write after a failed failover commit: {e}");
                            return -libc::EIO;
                        }
                        if in_active || saved {
                            self.overlay.active_map.set(c, d);
                        }
                    }
                }
                crate::io::result_from_len(len)
            }
            Stage::None | Stage::Done => -libc::EIO,
        }
    }

    /// Discard / write-zeroes from the VM: zeroes in the active buffer, never the disk while
    /// replicating.
    fn vm_zero(&self, stage: Stage, offset: u64, len: u64) -> i32 {
        let (s0, s1) = Self::sectors(offset, len);
        let _g = self.locks.shared(s0, s1);
        match stage {
            Stage::Running | Stage::FailoverFailed => {
                let r = self.overlay.active.data.zero(&Op::WriteZeroes { offset, len, unmap: true });
                if r >= 0 {
                    if stage == Stage::FailoverFailed
                        && let Err(e) = self.journal_active_write(s0, s1)
                    {
                        log::error!("cannot journal a VM write after a failed failover commit: {e}");
                        return -libc::EIO;
                    }
                    self.overlay.active_map.set(s0, s1);
                }
                r
            }
            Stage::Failover => {
                let r = self.file.zero(&Op::WriteZeroes { offset, len, unmap: true });
                if r >= 0 {
                    if let Err(e) = self.journal_disk_write(s0, s1) {
                        log::error!("cannot journal a VM write during the failover commit: {e}");
                        return -libc::EIO;
                    }
                    self.overlay.active_map.clear(s0, s1);
                    self.overlay.saved_map.clear(s0, s1);
                }
                r
            }
            Stage::None | Stage::Done => -libc::EIO,
        }
    }

    fn flush_all(&self) -> io::Result<()> {
        self.overlay.sync_data()?;
        self.file.sync_data()
    }

    fn close_nbd(&self) {
        if let Some(s) = lock(&self.nbd).as_ref() {
            s.close();
        }
    }

    fn quiesce(&self) -> Result<super::gate::Closed<'_>, ReplicationError> {
        self.gate.close(QUIESCE_TIMEOUT).ok_or(ReplicationError::QuiesceTimeout)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

mod colo;
mod commit;
mod control;
mod device;
mod export;
mod journal;
#[cfg(test)]
mod model_tests;
mod overlay;
mod reclaim;
mod state;
#[cfg(test)]
mod tests;

pub use colo::CommitTrigger;
pub use control::SecondaryControl;
pub use device::SecondaryDevice;
pub use export::SecondaryExport;
pub use journal::{CommitJournal, JournalError};
pub use state::{DiskState, StateError, StateFile};
