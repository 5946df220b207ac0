//! The QMP operations of the primary: start (with sync), checkpoint barrier, get-error, stop,
//! query; and the counters the query reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::{Value, json};

use super::{Mirror, SECTOR, lock};
use crate::replication::{Mode, ReplicationControl, ReplicationError, Stage, StartArgs, SyncMode};

/// The primary's counters, reported by `query-replication`.
#[derive(Default)]
pub(super) struct MirrorStats {
    /// NBD error code of the last refused barrier (0: none yet).
    pub(super) barrier_refusal: std::sync::atomic::AtomicU32,
    /// Guest write-type requests forwarded to the secondary, and their bytes.
    pub(super) forwarded_ops: AtomicU64,
    pub(super) forwarded_bytes: AtomicU64,
    /// Requests the secondary answered with an error (verify requests aside).
    pub(super) failed_ops: AtomicU64,
    /// Bytes the resync brought in sync since `replication-start`.
    pub(super) resync_bytes: AtomicU64,
    /// Of `resync_bytes`: sent as WRITE payload, and sent as WRITE_ZEROES (holes and zero
    /// blocks of the local disk, no payload).
    pub(super) resync_data: AtomicU64,
    pub(super) resync_zero: AtomicU64,
    /// Bytes dirty at `replication-start`, plus what a verify with `resync` marked since.
    pub(super) resync_total: AtomicU64,
    /// Links that came up, and links that broke.
    pub(super) connects: AtomicU64,
    pub(super) link_failures: AtomicU64,
    /// Checkpoint barriers sent, how long the last confirmed one took (µs), and checkpoints
    /// whose barrier failed (not sent, or not confirmed).
    pub(super) barriers: AtomicU64,
    pub(super) last_barrier_us: AtomicU64,
    pub(super) barrier_failures: AtomicU64,
    /// FLUSHes of the VM-stop hook (hook.rs).
    pub(super) hook_flushes: AtomicU64,
    /// The VM device (re)started since the last hook barrier (see `hook_flush`).
    pub(super) started_since_barrier: AtomicBool,
    /// `forwarded_ops` when the last hook barrier was sent.
    pub(super) ops_at_barrier: AtomicU64,
}

/// The control operations of a primary (spec §3, primary rows).
pub struct MirrorControl(pub Arc<Mirror>);

impl ReplicationControl for MirrorControl {
    fn start(&self, args: &StartArgs) -> Result<(), ReplicationError> {
        let m = &self.0;
        let _op = lock(&m.ops);
        match m.stage() {
            Stage::Running | Stage::FailoverFailed => return Err(ReplicationError::AlreadyRunning),
            Stage::None | Stage::Done | Stage::Failover => {}
        }
        if args.mode != Mode::Primary {
            return Err(ReplicationError::ModeMismatch { needs: Mode::Primary, got: args.mode });
        }
        if let Some(uri) = &args.secondary {
            lock(&m.cfg).secondary = Some(uri.clone());
        }
        let Some(uri) = lock(&m.cfg).secondary.clone() else {
            return Err(ReplicationError::NoSecondary);
        };
        m.disconnect();
        m.connect(&uri, args.sync).map_err(|e| ReplicationError::connect(&uri, e))?;
        match args.sync {
            SyncMode::None => {
                m.dirty.clear_all();
                m.activity_in_sync();
            }
            SyncMode::Full => {
                m.dirty.set(0, m.size / SECTOR);
                m.activity_all_dirty();
            }
            SyncMode::Incremental => {}
        }
        m.stats.resync_total.store(m.dirty.count_all() * SECTOR, Ordering::Relaxed);
        m.stats.resync_bytes.store(0, Ordering::Relaxed);
        m.stats.resync_data.store(0, Ordering::Relaxed);
        m.stats.resync_zero.store(0, Ordering::Relaxed);
        m.role.clear_error();
        m.set_stage(Stage::Running);
        m.spawn_manager();
        Ok(())
    }

    fn checkpoint(&self, barrier: Option<u64>) -> Result<(), ReplicationError> {
        if barrier.is_some() {
            return Err(ReplicationError::BarrierOnPrimary);
        }
        match self.0.stage() {
            Stage::Running => self.0.barrier().map(|_| ()),
            // QEMU: a no-op for the primary in every other stage.
            Stage::None | Stage::Failover | Stage::FailoverFailed | Stage::Done => Ok(()),
        }
    }

    fn get_error(&self) -> Result<(), ReplicationError> {
        if self.0.stage() == Stage::None {
            return Err(ReplicationError::NotRunning);
        }
        if self.0.role.has_error() { Err(ReplicationError::Io) } else { Ok(()) }
    }

    fn stop(&self, _failover: bool, _inject: bool) -> Result<(), ReplicationError> {
        let m = &self.0;
        let _op = lock(&m.ops);
        match m.stage() {
            Stage::Done | Stage::Failover => return Ok(()),
            Stage::None | Stage::FailoverFailed => return Err(ReplicationError::NotRunning),
            Stage::Running => {}
        }
        m.set_stage(Stage::Done);
        m.role.clear_error();
        m.resync.progress.stop();
        m.disconnect();
        // Writes from now on are not tracked for the secondary.
        m.diverge("replication stopped");
        m.forget_windows();
        Ok(())
    }

    fn verify(&self, resync: bool) -> Result<(), ReplicationError> {
        let _op = lock(&self.0.ops);
        self.0.start_verify(resync)
    }

    fn query(&self) -> Value {
        let m = &self.0;
        let link = m.current_link();
        let st = &m.stats;
        json!({
            "mode": "primary",
            "stage": m.stage().name(),
            "error": m.role.error(),
            "error-time": m.role.error_time(),
            "generation": m.generation_json(),
            "activity-log": m.activity_json(),
            "secondary": lock(&m.cfg).secondary.as_ref().map(|u| u.to_string()),
            "link": {
                "connected": link.is_some(),
                "inflight": link.as_ref().map_or(0, |l| lock(&l.pending).len()),
                "connects": st.connects.load(Ordering::Relaxed),
                "failures": st.link_failures.load(Ordering::Relaxed),
                "colo-barriers": link.as_ref().is_some_and(|l| l.colo),
            },
            "barriers": {
                "sent": st.barriers.load(Ordering::Relaxed),
                "failed": st.barrier_failures.load(Ordering::Relaxed),
                "last-us": st.last_barrier_us.load(Ordering::Relaxed),
                "hook-flushes": st.hook_flushes.load(Ordering::Relaxed),
            },
            "dirty-bytes": m.dirty.count_all() * SECTOR,
            "forwarded-ops": st.forwarded_ops.load(Ordering::Relaxed),
            "forwarded-bytes": st.forwarded_bytes.load(Ordering::Relaxed),
            "failed-ops": st.failed_ops.load(Ordering::Relaxed),
            "resync": {
                "total-bytes": st.resync_total.load(Ordering::Relaxed),
                "copied-bytes": st.resync_bytes.load(Ordering::Relaxed),
                "data-bytes": st.resync_data.load(Ordering::Relaxed),
                "zero-bytes": st.resync_zero.load(Ordering::Relaxed),
                "remaining-bytes": m.dirty.count_all() * SECTOR,
                "progress": m.resync.progress.json(st.resync_bytes.load(Ordering::Relaxed), m.dirty.count_all() * SECTOR),
            },
            "verify": m.verify.json(),
        })
    }
}
