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

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::gate::Gate;
use super::pool::{DoneQueue, Pool, SendOp};
use super::{EventSink, Mode, ReplicationControl, ReplicationError, Stage, StartArgs};
use crate::block::bitmap::SectorBitmap;
use crate::block::range_lock::RangeLock;
use crate::block::raw::{RawDisk, create_sparse};
use crate::block::{BlockDevice, BlockError, BlockQueue, Completion, IoEngineError, Op};
use crate::io::sync::fallocate_with_fallback;
use crate::io::{slice_iovecs, transfer};
use crate::nbd::{NbdExport, NbdServer};

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

/// The secondary's shared state.
pub struct Secondary {
    disk: RawDisk,
    active: Arc<File>,
    hidden: Arc<File>,
    files: SecondaryFiles,
    size: u64,
    active_map: SectorBitmap,
    saved_map: SectorBitmap,
    locks: RangeLock,
    gate: Gate,
    stage: Mutex<Stage>,
    error: Mutex<Option<String>>,
    /// Serialises start / checkpoint / stop.
    ops: Mutex<()>,
    nbd: Mutex<Option<NbdServer>>,
    events: Mutex<Option<EventSink>>,
    cow_bytes: AtomicU64,
    checkpoints: AtomicU64,
    last_checkpoint_us: AtomicU64,
    merge_total: AtomicU64,
    merge_done: AtomicU64,
    merging: AtomicBool,
    pool: Pool,
}

impl std::fmt::Debug for Secondary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secondary").field("size", &self.size).field("stage", &self.stage()).finish()
    }
}

fn open_buffer(path: &Path, size: u64, direct: bool) -> Result<File, BlockError> {
    let err = |source| BlockError::Open { path: path.display().to_string(), source };
    if !path.exists() {
        create_sparse(path, size).map_err(err)?;
        log::info!("created sparse buffer {} of {size} bytes", path.display());
    }
    let mut oo = OpenOptions::new();
    oo.read(true).write(true);
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    oo.open(path).map_err(err)
}

fn file_len(f: &File) -> io::Result<u64> {
    let m = f.metadata()?;
    if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) {
        let mut f2 = f.try_clone()?;
        io::Seek::seek(&mut f2, io::SeekFrom::End(0))
    } else {
        Ok(m.len())
    }
}

fn punch(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let r = fallocate_with_fallback(f.as_raw_fd(), &Op::Discard { offset, len });
    if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(()) }
}

fn result(r: i32) -> io::Result<()> {
    if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(()) }
}

/// Copies [start, end) sectors from `src` to `dst` at the same offsets.
fn copy_sectors(src: &File, dst: &File, start: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<u64> {
    let mut s = start;
    while s < end {
        let n = (end - s).min(MERGE_CHUNK);
        let len = (n * SECTOR) as usize;
        buf.resize(len, 0);
        src.read_exact_at(&mut buf[..len], s * SECTOR)?;
        dst.write_all_at(&buf[..len], s * SECTOR)?;
        s += n;
    }
    Ok((end - start) * SECTOR)
}

impl Secondary {
    /// Opens the buffers (creating them sparse with the disk's size when missing).
    pub fn open(disk: RawDisk, files: SecondaryFiles) -> Result<Arc<Self>, BlockError> {
        let size = disk.size();
        let active = open_buffer(&files.active, size, files.direct)?;
        let hidden = open_buffer(&files.hidden, size, files.direct)?;
        let sectors = size / SECTOR;
        Ok(Arc::new(Secondary {
            disk,
            active: Arc::new(active),
            hidden: Arc::new(hidden),
            files,
            size,
            active_map: SectorBitmap::new(sectors),
            saved_map: SectorBitmap::new(sectors),
            locks: RangeLock::default(),
            gate: Gate::default(),
            stage: Mutex::new(Stage::None),
            error: Mutex::new(None),
            ops: Mutex::new(()),
            nbd: Mutex::new(None),
            events: Mutex::new(None),
            cow_bytes: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            last_checkpoint_us: AtomicU64::new(0),
            merge_total: AtomicU64::new(0),
            merge_done: AtomicU64::new(0),
            merging: AtomicBool::new(false),
            pool: Pool::new(POOL_THREADS).map_err(|e| BlockError::Engine(IoEngineError::Setup(e)))?,
        }))
    }

    /// Checks that both buffers have the disk's length (QEMU's start-time check).
    pub fn check_lengths(&self) -> Result<(), ReplicationError> {
        let ok = |f: &File| file_len(f).is_ok_and(|l| l == self.size);
        if ok(&self.active) && ok(&self.hidden) { Ok(()) } else { Err(ReplicationError::lengths()) }
    }

    /// The NBD server whose clients are closed at failover.
    pub fn set_nbd_server(&self, server: NbdServer) {
        *lock(&self.nbd) = Some(server);
    }

    /// Where stage changes are reported.
    pub fn set_events(&self, sink: EventSink) {
        *lock(&self.events) = Some(sink);
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        *lock(&self.stage)
    }

    fn set_stage(&self, s: Stage) {
        let old = std::mem::replace(&mut *lock(&self.stage), s);
        if old != s {
            log::info!("replication stage {} -> {}", old.name(), s.name());
            self.emit("REPLICATION_STAGE", json!({"mode": "secondary", "stage": s.name()}));
        }
    }

    fn emit(&self, name: &str, data: Value) {
        let sink = lock(&self.events).clone();
        if let Some(sink) = sink {
            sink(name, data);
        }
    }

    fn set_error(&self, msg: String) {
        log::error!("replication error: {msg}");
        *lock(&self.error) = Some(msg.clone());
        self.emit("REPLICATION_ERROR", json!({"mode": "secondary", "error": msg}));
    }

    fn sectors(offset: u64, len: u64) -> (u64, u64) {
        (offset / SECTOR, (offset + len).div_ceil(SECTOR))
    }

    /// Empties both buffers and clears their bitmaps. Callers hold the gate closed.
    fn empty_buffers(&self) -> io::Result<()> {
        // Re-arm copy-before-write first, as QEMU does, then drop active, then hidden.
        self.saved_map.clear_all();
        self.active_map.clear_all();
        punch(&self.active, 0, self.size)?;
        punch(&self.hidden, 0, self.size)
    }

    // ---- copy-before-write (NBD side) --------------------------------------------------

    /// Saves the disk's data of every sector in [s0, s1) not saved yet this epoch into hidden.
    /// The caller holds [s0, s1) exclusively.
    fn copy_before_write(&self, s0: u64, s1: u64) -> io::Result<()> {
        let mut buf = Vec::new();
        for (a, b, saved) in self.saved_map.runs(s0, s1) {
            if saved {
                continue;
            }
            let n = copy_sectors(self.disk.file(), &self.hidden, a, b, &mut buf)?;
            self.saved_map.set(a, b);
            self.cow_bytes.fetch_add(n, Ordering::Relaxed);
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
    fn nbd_modify(&self, offset: u64, len: u64, f: impl FnOnce(&File) -> io::Result<()>) -> io::Result<()> {
        let _t = self.gate.enter();
        let stage = self.nbd_stage_check()?;
        let (s0, s1) = Self::sectors(offset, len);
        if stage == Stage::Running {
            let _g = self.locks.exclusive(s0, s1);
            self.copy_before_write(s0, s1)?;
            f(self.disk.file())
        } else {
            // Stage none: the initial synchronisation writes straight to the disk.
            f(self.disk.file())
        }
    }

    // ---- secondary VM side ---------------------------------------------------------------

    /// Executes one VM request synchronously; returns bytes or -errno.
    fn vm_execute(&self, op: &Op<'_>) -> i32 {
        let _t = self.gate.enter();
        let stage = self.stage();
        match (stage, op) {
            (Stage::None, Op::Flush) => 0,
            (Stage::None, _) => -libc::EIO,
            (Stage::Done, _) => self.disk_execute(op),
            (_, Op::Read { offset, iovecs }) => self.vm_read(*offset, iovecs),
            (_, Op::Write { offset, iovecs, dsync }) => self.vm_write(stage, *offset, iovecs, *dsync),
            (_, Op::Flush) => self.flush_all().map_or_else(|e| -e.raw_os_error().unwrap_or(libc::EIO), |()| 0),
            (_, Op::Discard { offset, len }) | (_, Op::WriteZeroes { offset, len, .. }) => {
                self.vm_zero(stage, *offset, *len)
            }
        }
    }

    fn disk_execute(&self, op: &Op<'_>) -> i32 {
        let fd = self.disk.file().as_raw_fd();
        match *op {
            // SAFETY: the worker keeps the buffers alive until the request completes, which
            // happens after this call returns.
            Op::Read { offset, iovecs } => unsafe { transfer(fd, offset, iovecs, false, false) },
            Op::Write { offset, iovecs, dsync } => {
                // SAFETY: as above.
                unsafe { transfer(fd, offset, iovecs, true, dsync) }
            }
            Op::Flush => self.disk.file().sync_data().map_or(-libc::EIO, |()| 0),
            Op::Discard { .. } | Op::WriteZeroes { .. } => fallocate_with_fallback(fd, op),
        }
    }

    fn vm_read(&self, offset: u64, iovecs: &[libc::iovec]) -> i32 {
        let len = crate::io::iovecs_len(iovecs);
        let (s0, s1) = Self::sectors(offset, len);
        let _g = self.locks.shared(s0, s1);
        let mut sub = Vec::new();
        for (a, b, in_active) in self.active_map.runs(s0, s1) {
            let pieces: Vec<(u64, u64, RawFd)> = if in_active {
                vec![(a, b, self.active.as_raw_fd())]
            } else {
                self.saved_map
                    .runs(a, b)
                    .into_iter()
                    .map(|(c, d, saved)| {
                        (c, d, if saved { self.hidden.as_raw_fd() } else { self.disk.file().as_raw_fd() })
                    })
                    .collect()
            };
            for (c, d, fd) in pieces {
                let byte_off = c * SECTOR - offset;
                slice_iovecs(iovecs, byte_off, (d - c) * SECTOR, &mut sub);
                // SAFETY: `sub` points into the caller's live buffers.
                let r = unsafe { transfer(fd, c * SECTOR, &sub, false, false) };
                if r < 0 {
                    return r;
                }
            }
        }
        crate::io::result_from_len(len)
    }

    fn vm_write(&self, stage: Stage, offset: u64, iovecs: &[libc::iovec], dsync: bool) -> i32 {
        let len = crate::io::iovecs_len(iovecs);
        let (s0, s1) = Self::sectors(offset, len);
        let _g = self.locks.shared(s0, s1);
        match stage {
            Stage::Running => {
                // SAFETY: the caller's buffers are live for the duration of the call.
                let r = unsafe { transfer(self.active.as_raw_fd(), offset, iovecs, true, dsync) };
                if r >= 0 {
                    self.active_map.set(s0, s1);
                }
                r
            }
            Stage::Failover => {
                // The merge is copying the buffers into the disk: newer data goes straight to
                // the disk and the sectors leave the buffers, so the merge cannot overwrite it.
                // SAFETY: as above.
                let r = unsafe { transfer(self.disk.file().as_raw_fd(), offset, iovecs, true, dsync) };
                if r >= 0 {
                    self.active_map.clear(s0, s1);
                    self.saved_map.clear(s0, s1);
                }
                r
            }
            Stage::FailoverFailed => {
                // Spec §2.2: sectors allocated in the buffers go to active, the rest to the disk.
                let mut sub = Vec::new();
                for (a, b, in_active) in self.active_map.runs(s0, s1) {
                    for (c, d, saved) in self.saved_map.runs(a, b) {
                        let fd =
                            if in_active || saved { self.active.as_raw_fd() } else { self.disk.file().as_raw_fd() };
                        slice_iovecs(iovecs, c * SECTOR - offset, (d - c) * SECTOR, &mut sub);
                        // SAFETY: as above.
                        let r = unsafe { transfer(fd, c * SECTOR, &sub, true, dsync) };
                        if r < 0 {
                            return r;
                        }
                        if in_active || saved {
                            self.active_map.set(c, d);
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
                let r = fallocate_with_fallback(self.active.as_raw_fd(), &Op::WriteZeroes { offset, len, unmap: true });
                if r >= 0 {
                    self.active_map.set(s0, s1);
                }
                r
            }
            Stage::Failover => {
                let r = fallocate_with_fallback(
                    self.disk.file().as_raw_fd(),
                    &Op::WriteZeroes { offset, len, unmap: true },
                );
                if r >= 0 {
                    self.active_map.clear(s0, s1);
                    self.saved_map.clear(s0, s1);
                }
                r
            }
            Stage::None | Stage::Done => -libc::EIO,
        }
    }

    fn flush_all(&self) -> io::Result<()> {
        self.active.sync_data()?;
        self.hidden.sync_data()?;
        self.disk.file().sync_data()
    }

    // ---- failover merge -------------------------------------------------------------------

    /// Copies hidden-only sectors, then active sectors, of [s0, s1) into the disk and clears
    /// their bits. The caller holds [s0, s1) exclusively (or the gate closed).
    fn merge_range(&self, s0: u64, s1: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        for (a, b, in_active) in self.active_map.runs(s0, s1) {
            if in_active {
                continue;
            }
            for (c, d, saved) in self.saved_map.runs(a, b) {
                if saved {
                    let n = copy_sectors(&self.hidden, self.disk.file(), c, d, buf)?;
                    self.merge_done.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        for (a, b, in_active) in self.active_map.runs(s0, s1) {
            if in_active {
                let n = copy_sectors(&self.active, self.disk.file(), a, b, buf)?;
                self.merge_done.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.saved_map.clear(s0, s1);
        self.active_map.clear(s0, s1);
        Ok(())
    }

    fn merge_pass(&self, locked: bool, fail: bool) -> io::Result<()> {
        if fail {
            return Err(io::Error::other("commit failure injected"));
        }
        let sectors = self.size / SECTOR;
        let mut buf = Vec::new();
        let mut c = 0;
        while c < sectors {
            let end = (c + MERGE_CHUNK).min(sectors);
            let dirty = self.active_map.next_set_run(c, end).is_some() || self.saved_map.next_set_run(c, end).is_some();
            if dirty {
                let _g = locked.then(|| self.locks.exclusive(c, end));
                self.merge_range(c, end, &mut buf)?;
            }
            c = end;
        }
        Ok(())
    }

    fn run_failover(self: &Arc<Self>, fail: bool) {
        let started = Instant::now();
        let outcome = self.merge_pass(true, fail).and_then(|()| {
            // Final pass with everything quiet, then switch the VM to the disk.
            let closed = self.gate.close(QUIESCE_TIMEOUT).ok_or_else(|| io::Error::other("quiesce timed out"))?;
            self.merge_pass(false, false)?;
            self.disk.file().sync_data()?;
            self.set_stage(Stage::Done);
            *lock(&self.error) = None;
            drop(closed);
            Ok(())
        });
        self.merging.store(false, Ordering::Release);
        match outcome {
            Ok(()) => {
                log::info!(
                    "failover commit done: {} bytes merged in {} ms",
                    self.merge_done.load(Ordering::Relaxed),
                    started.elapsed().as_millis()
                );
                self.emit("REPLICATION_FAILOVER_DONE", json!({"mode": "secondary"}));
                // Reclaim the buffers' space; their content is in the disk now.
                let _ = punch(&self.active, 0, self.size);
                let _ = punch(&self.hidden, 0, self.size);
            }
            Err(e) => {
                self.set_stage(Stage::FailoverFailed);
                self.set_error(format!("failover commit failed: {e}"));
            }
        }
    }

    fn close_nbd(&self) {
        if let Some(s) = lock(&self.nbd).as_ref() {
            s.close();
        }
    }

    fn quiesce(&self) -> Result<super::gate::Closed<'_>, ReplicationError> {
        self.gate
            .close(QUIESCE_TIMEOUT)
            .ok_or_else(|| ReplicationError("timed out waiting for in-flight requests".into()))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a control operation on the secondary (held by the daemon as `Arc<Secondary>`).
pub struct SecondaryControl(pub Arc<Secondary>);

impl ReplicationControl for SecondaryControl {
    fn start(&self, args: &StartArgs) -> Result<(), ReplicationError> {
        let s = &self.0;
        let _op = lock(&s.ops);
        match s.stage() {
            Stage::Done | Stage::Failover => return Ok(()),
            Stage::Running | Stage::FailoverFailed => {
                return Err(ReplicationError::running_or_done());
            }
            Stage::None => {}
        }
        if args.mode != Mode::Secondary {
            return Err(ReplicationError::mode_mismatch(Mode::Secondary, args.mode));
        }
        s.check_lengths()?;
        let closed = s.quiesce()?;
        s.empty_buffers().map_err(|e| ReplicationError(format!("Failed to empty buffers: {e}")))?;
        *lock(&s.error) = None;
        s.set_stage(Stage::Running);
        drop(closed);
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), ReplicationError> {
        let s = &self.0;
        let _op = lock(&s.ops);
        match s.stage() {
            Stage::Done | Stage::Failover => return Ok(()),
            Stage::None | Stage::FailoverFailed => return Err(ReplicationError::backup_cancelled()),
            Stage::Running => {}
        }
        let t0 = Instant::now();
        let closed = s.quiesce()?;
        let dirty = (s.active_map.count_all(), s.saved_map.count_all());
        let r = s.empty_buffers();
        drop(closed);
        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        s.last_checkpoint_us.store(us, Ordering::Relaxed);
        s.checkpoints.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(()) => {
                log::info!(
                    "checkpoint took {:.1} ms ({} active + {} hidden sectors dropped)",
                    us as f64 / 1000.0,
                    dirty.0,
                    dirty.1
                );
                Ok(())
            }
            Err(e) => {
                let msg = format!("Failed to empty buffers: {e}");
                s.set_error(msg.clone());
                Err(ReplicationError(msg))
            }
        }
    }

    fn get_error(&self) -> Result<(), ReplicationError> {
        let s = &self.0;
        if s.stage() == Stage::None {
            return Err(ReplicationError::not_running());
        }
        if lock(&s.error).is_some() {
            return Err(ReplicationError::io_error());
        }
        Ok(())
    }

    fn stop(&self, failover: bool, inject_commit_error: bool) -> Result<(), ReplicationError> {
        let s = &self.0;
        let _op = lock(&s.ops);
        match s.stage() {
            Stage::Done | Stage::Failover => return Ok(()),
            Stage::None | Stage::FailoverFailed => return Err(ReplicationError::not_running()),
            Stage::Running => {}
        }
        // No primary write may land once the buffers are being dropped or merged.
        s.close_nbd();
        let closed = s.quiesce()?;
        if !failover {
            // QEMU's version of this path fails and keeps the buffers (spec §3.5); the
            // documented intent is to drop them and stop, which is what happens here.
            s.empty_buffers().map_err(|e| ReplicationError(format!("Failed to empty buffers: {e}")))?;
            s.set_stage(Stage::Done);
            return Ok(());
        }
        let total = (s.active_map.count_all() + s.saved_map.count_all()) * SECTOR;
        s.merge_total.store(total, Ordering::Relaxed);
        s.merge_done.store(0, Ordering::Relaxed);
        s.merging.store(true, Ordering::Release);
        s.set_stage(Stage::Failover);
        drop(closed);
        let me = s.clone();
        std::thread::Builder::new()
            .name("failover-commit".into())
            .spawn(move || me.run_failover(inject_commit_error))
            .map_err(|e| ReplicationError(format!("cannot start the failover commit: {e}")))?;
        Ok(())
    }

    fn query(&self) -> Value {
        let s = &self.0;
        let nbd = lock(&s.nbd).as_ref().map(|n| n.stats());
        json!({
            "mode": "secondary",
            "stage": s.stage().name(),
            "error": lock(&s.error).clone(),
            "active-dirty-bytes": s.active_map.count_all() * SECTOR,
            "hidden-dirty-bytes": s.saved_map.count_all() * SECTOR,
            "cow-bytes": s.cow_bytes.load(Ordering::Relaxed),
            "checkpoints": s.checkpoints.load(Ordering::Relaxed),
            "last-checkpoint-us": s.last_checkpoint_us.load(Ordering::Relaxed),
            "commit": {
                "active": s.merging.load(Ordering::Acquire),
                "total-bytes": s.merge_total.load(Ordering::Relaxed),
                "done-bytes": s.merge_done.load(Ordering::Relaxed),
            },
            "nbd": nbd.map(|n| json!({
                "clients": n.clients.load(Ordering::Relaxed),
                "writes": n.writes.load(Ordering::Relaxed),
                "bytes-written": n.bytes_written.load(Ordering::Relaxed),
                "errors": n.errors.load(Ordering::Relaxed),
                "bad-clients": n.bad_clients.load(Ordering::Relaxed),
            })),
            "active": s.files.active.display().to_string(),
            "hidden": s.files.hidden.display().to_string(),
        })
    }
}

// ---- the primary's view: NBD export of the secondary disk ----------------------------------

/// The NBD export (wraps the shared state).
pub struct SecondaryExport(pub Arc<Secondary>);

impl NbdExport for SecondaryExport {
    fn size(&self) -> u64 {
        self.0.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let _t = self.0.gate.enter();
        self.0.disk.file().read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.0.nbd_modify(offset, data.len() as u64, |f| {
            f.write_all_at(data, offset)?;
            if fua { f.sync_data() } else { Ok(()) }
        })
    }

    fn flush(&self) -> io::Result<()> {
        let _t = self.0.gate.enter();
        self.0.hidden.sync_data()?;
        self.0.disk.file().sync_data()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.nbd_modify(offset, len, |f| result(fallocate_with_fallback(f.as_raw_fd(), &Op::Discard { offset, len })))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.0.nbd_modify(offset, len, |f| {
            result(fallocate_with_fallback(f.as_raw_fd(), &Op::WriteZeroes { offset, len, unmap: may_trim }))
        })
    }

    fn admit(&self) -> Result<(), String> {
        match self.0.stage() {
            Stage::None | Stage::Running => Ok(()),
            s => Err(format!("replication stage is {}", s.name())),
        }
    }
}

// ---- the secondary VM's view: the block device behind vhost-user ----------------------------

/// The block device the secondary VM's queues submit to.
pub struct SecondaryDevice(pub Arc<Secondary>);

impl BlockDevice for SecondaryDevice {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>, BlockError> {
        let inner = self.0.disk.open_queue(depth)?;
        let done = DoneQueue::new(inner.notifier()).map_err(|e| BlockError::Engine(IoEngineError::Setup(e)))?;
        Ok(Box::new(SecondaryQueue { sec: self.0.clone(), inner, done }))
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush_all()
    }
    fn describe(&self) -> String {
        format!(
            "{} (secondary; active {}, hidden {})",
            self.0.disk.describe(),
            self.0.files.active.display(),
            self.0.files.hidden.display()
        )
    }
}

/// A worker's queue: while replicating, requests run synchronously through the buffer logic;
/// once the stage is done they go to the disk's own (io_uring) queue.
struct SecondaryQueue {
    sec: Arc<Secondary>,
    inner: Box<dyn BlockQueue>,
    done: Arc<DoneQueue>,
}

impl BlockQueue for SecondaryQueue {
    unsafe fn push(&mut self, op: &Op<'_>, token: u64) -> Result<(), IoEngineError> {
        if self.sec.stage() == Stage::Done {
            // SAFETY: forwarded contract.
            return unsafe { self.inner.push(op, token) };
        }
        let op = SendOp::new(op);
        let sec = self.sec.clone();
        let task = Box::new(move || {
            // SAFETY: the worker keeps the iovecs and buffers alive until it reaps this
            // token's completion, which the pool queues only after the task returned.
            unsafe { op.with(|op| sec.vm_execute(op)) }
        });
        if self.sec.pool.spawn(task, token, &self.done) { Ok(()) } else { Err(IoEngineError::QueueFull) }
    }
    fn submit(&mut self) -> Result<(), IoEngineError> {
        self.inner.submit()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.done.drain_into(out);
        self.inner.reap(out);
    }
    fn notifier(&self) -> Option<RawFd> {
        Some(self.done.notifier())
    }
    fn clear_notifier(&self) {
        self.done.clear();
        self.inner.clear_notifier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::raw::{EngineKind, RawOptions};
    use std::sync::mpsc;

    fn secondary(dir: &Path, size: u64) -> Arc<Secondary> {
        let disk = RawDisk::open(&RawOptions {
            path: dir.join("d.img"),
            create_size: Some(size),
            read_only: false,
            direct: false,
            block_size: 512,
            engine: EngineKind::Sync,
        })
        .unwrap();
        disk.file().write_all_at(&vec![0x11u8; size as usize], 0).unwrap();
        let files = SecondaryFiles { active: dir.join("a.img"), hidden: dir.join("h.img"), direct: false };
        let s = Secondary::open(disk, files).unwrap();
        SecondaryControl(s.clone()).start(&StartArgs::mode(Mode::Secondary)).unwrap();
        s
    }

    /// A VM read that falls through to the disk waits while a primary write holds its range:
    /// the deterministic version of the race the integration stress test provokes.
    #[test]
    fn vm_read_waits_for_a_primary_write_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let s = secondary(dir.path(), 1 << 20);
        // Play the NBD writer by hand, stopping halfway: range held, old data saved, new data
        // already on the disk.
        let guard = s.locks.exclusive(0, 8);
        s.copy_before_write(0, 8).unwrap();
        s.disk.file().write_all_at(&[0x22u8; 4096], 0).unwrap();
        let (tx, rx) = mpsc::channel();
        let s2 = s.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: 4096 }];
            let r = s2.vm_execute(&Op::Read { offset: 0, iovecs: &iov });
            tx.send(()).unwrap();
            (r, buf)
        });
        // The reader must not finish while the range is held.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "VM read did not wait for the range lock");
        drop(guard);
        let (r, buf) = reader.join().unwrap();
        assert_eq!(r, 4096);
        assert!(buf.iter().all(|&b| b == 0x11), "VM read saw the primary's new data");
    }

    #[test]
    fn checkpoint_reports_and_empties() {
        let dir = tempfile::tempdir().unwrap();
        let s = secondary(dir.path(), 1 << 20);
        let mut data = vec![0x33u8; 8192];
        let iov = [libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: 8192 }];
        assert_eq!(s.vm_execute(&Op::Write { offset: 4096, iovecs: &iov, dsync: false }), 8192);
        SecondaryExport(s.clone()).write(65536, &[0x22u8; 512], false).unwrap();
        assert_eq!(s.active_map.count_all(), 16);
        assert_eq!(s.saved_map.count_all(), 1);
        SecondaryControl(s.clone()).checkpoint().unwrap();
        assert_eq!(s.active_map.count_all() + s.saved_map.count_all(), 0);
        let q = SecondaryControl(s.clone()).query();
        assert_eq!(q["checkpoints"], 1);
    }
}
