//! The primary: every guest write is also sent to the secondary over NBD, and the guest
//! request completes when both the local write and the forwarded one have completed
//! (DRBD's protocol C). A failed, dead or hung secondary never fails the guest: the error is
//! recorded, the range goes into a dirty bitmap, the link is reconnected with backoff and the
//! dirty ranges are copied again (incremental resync). `sync=full` copies the whole disk the
//! same way, in the background, while guest writes keep being mirrored.
//!
//! [`Mirror`] holds the local disk, the settings, the stage and the dirty bitmap here, with
//! forwarding, the manager thread (reconnect, then resync) and the checkpoint barrier; and one
//! part per concern, each with the file that owns it: `link.rs` (the NBD connection to the
//! secondary: `LinkSlot`, its sender, receiver and watchdog threads), `resync.rs` (the copy of
//! dirty ranges and its ordering rule: `Resync`), `windows.rs` (data generations and change
//! windows), `activity.rs` (the activity log), `verify.rs` (`replication-verify`), `control.rs`
//! (the counters `query-replication` reports). The faces: `device.rs` (the guest's queues),
//! `control.rs` (the QMP operations), `hook.rs` (the VM-stop hook export).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::role::{Announce, RoleState};
use super::{EventSink, ReplicationError, Stage, SyncMode};
use crate::block::bitmap::SectorBitmap;
use crate::block::image::ImageData;
use crate::block::{Lane, OpKind};
use crate::io::aligned::AlignedBuf;
use crate::nbd::client::NbdUri;
use crate::nbd::wire::{
    CMD_COLO_BARRIER, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
};
use control::MirrorStats;
use link::{LinkSlot, Waiter, nbd_error_text};
use resync::Resync;

const SECTOR: u64 = 512;

/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

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

/// The primary's replication state, shared by all queues: the local disk, the settings, the
/// stage and the dirty bitmap, and one part per concern (the link, the resync, data
/// generations, the activity log, the verify, the counters), each in the file that owns it.
pub struct Mirror {
    /// The local disk's bytes (the resync and the verify read them).
    disk: Arc<dyn ImageData>,
    /// The disk's size in bytes (the secondary's export must have the same).
    size: u64,
    /// Settings (`replication-start` may give another secondary).
    cfg: Mutex<MirrorConfig>,
    /// Stage, last error, events (shared with the secondary's way of reporting).
    role: RoleState,
    /// The NBD connection to the secondary and what outlives one connection: the manager's
    /// wake-up, request handles and barrier numbers, the split brain last reported (link.rs).
    link: LinkSlot,
    /// Sectors the secondary may lack: shared by the link (a request that failed, or was
    /// pending when the link broke, marks its range) and the resync (which clears a chunk's
    /// bits when its copy starts).
    dirty: SectorBitmap,
    /// The resync's clock, its log of chunk copies, the chunks in flight and its progress
    /// (resync.rs).
    resync: Resync,
    /// Serialises start, stop and the start of a verify.
    ops: Mutex<()>,
    /// The manager thread (reconnect, then resync) is running.
    manager: AtomicBool,
    /// Counters reported by `query-replication` (control.rs).
    stats: MirrorStats,
    /// The disk's data generations (windows.rs).
    gens: Mutex<Option<Arc<crate::replication::generation::Generations>>>,
    /// The change windows and the last generation the secondary acknowledged (windows.rs).
    windows: Mutex<windows::Windows>,
    /// The activity log (activity.rs), for a disk that has one.
    activity: std::sync::OnceLock<activity::ActivityLog>,
    /// The online verify (`replication-verify`) and the write tracking it needs.
    verify: verify::Verify,
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
            link: LinkSlot::new(),
            dirty: SectorBitmap::new(size / SECTOR),
            resync: Resync::new(),
            ops: Mutex::new(()),
            manager: AtomicBool::new(false),
            stats: MirrorStats::default(),
            gens: Mutex::new(None),
            windows: Mutex::new(windows::Windows::default()),
            activity: std::sync::OnceLock::new(),
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

    // ---- background: reconnect, then resync ----------------------------------------------------

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
                        let g = lock(&self.link.wait);
                        let _ = self.link.changed.wait_timeout(g, BACKOFF_MAX);
                        continue;
                    }
                    Err(e) => {
                        log::warn!("replication link: reconnect to {uri} failed: {e}; retrying in {backoff:?}");
                        let g = lock(&self.link.wait);
                        let _ = self.link.changed.wait_timeout(g, backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
            self.maybe_rotate_window();
            // Link up: copy what the secondary missed.
            if let Some(run) = self.dirty.next_set_run(0, self.size / SECTOR) {
                if in_sync_reported || !self.resync.progress.running() {
                    self.resync.progress.start(self.stats.resync_bytes.load(Ordering::Relaxed));
                }
                in_sync_reported = false;
                if !self.copy_chunks(run) {
                    // A failed copy (local read error, NBD error) must not spin: back off
                    // like a reconnect does before trying again.
                    let g = lock(&self.link.wait);
                    let _ = self.link.changed.wait_timeout(g, backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                backoff = BACKOFF_MIN;
            } else if !in_sync_reported {
                in_sync_reported = true;
                if let Some(al) = self.activity.get() {
                    al.in_sync();
                }
                self.resync.progress.stop();
                log::info!(
                    "secondary in sync ({} bytes copied so far)",
                    self.stats.resync_bytes.load(Ordering::Relaxed)
                );
                self.emit(
                    "REPLICATION_IN_SYNC",
                    json!({"resync-bytes": self.stats.resync_bytes.load(Ordering::Relaxed)}),
                );
            } else {
                let g = lock(&self.link.wait);
                let _ = self.link.changed.wait_timeout(g, Duration::from_millis(100));
            }
        }
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
        let upto = self.link.next_handle.load(Ordering::Acquire);
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
            if self.resync.inflight.load(Ordering::SeqCst) == 0 {
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
        let seq = self.link.barrier_number.fetch_add(1, Ordering::AcqRel) + 1;
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
}

mod activity;
mod control;
mod device;
mod hook;
mod link;
#[cfg(test)]
mod model_tests;
mod resync;
mod sparse;
mod verify;
mod windows;

pub use activity::{ActivityError, ActivityLog, Recovered};
pub use control::MirrorControl;
pub use device::MirrorDevice;
pub use hook::{ColoHook, HOOK_EXPORT};
pub use windows::ConnectError;
