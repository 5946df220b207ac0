//! The QMP operations of the secondary: start, checkpoint, get-error, stop (failover), query.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::{Value, json};

use super::colo::CommitTrigger;
use super::state::DiskState;
use super::{SECTOR, Secondary, lock};
use crate::replication::{Mode, ReplicationControl, ReplicationError, Stage, StartArgs};

/// The secondary's counters, reported by `query-replication`.
#[derive(Debug, Default)]
pub(super) struct SecondaryStats {
    /// Bytes the primary's writes saved from the disk into the hidden buffer.
    pub(super) cow_bytes: AtomicU64,
    /// VM reads sent straight to the disk's queue, and those redone on the buffer path
    /// because a primary write or a checkpoint overlapped them (see `direct_read_start`).
    pub(super) direct_reads: AtomicU64,
    pub(super) direct_retries: AtomicU64,
    /// VM writes done on a worker's ring on the active buffer.
    pub(super) vm_ring_writes: AtomicU64,
    /// Checkpoints taken (buffers emptied, successfully or not).
    pub(super) checkpoints: AtomicU64,
    /// How long the last checkpoint took (µs).
    pub(super) last_checkpoint_us: AtomicU64,
}

impl SecondaryStats {
    /// Counts a direct (or split) VM read at completion: answered as read, or redone.
    pub(super) fn count_direct(&self, valid: bool) {
        if valid {
            self.direct_reads.fetch_add(1, Ordering::Relaxed);
        } else {
            self.direct_retries.fetch_add(1, Ordering::Relaxed);
        }
    }
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
                return Err(ReplicationError::AlreadyRunning);
            }
            Stage::None => {}
        }
        if args.mode != Mode::Secondary {
            return Err(ReplicationError::ModeMismatch { needs: Mode::Secondary, got: args.mode });
        }
        s.check_lengths()?;
        let closed = s.quiesce()?;
        s.overlay.empty(s.size).map_err(ReplicationError::EmptyBuffers)?;
        // The marker last: a start that fails before this point leaves the disk as it was
        // (stage none, no primary write applied under copy-before-write), so it must not be
        // flagged as stopped while replicating.
        s.consistency.state.write(DiskState::Replicating).map_err(ReplicationError::RecordState)?;
        s.role.clear_error();
        s.set_stage(Stage::Running);
        drop(closed);
        Ok(())
    }

    fn checkpoint(&self, barrier: Option<u64>) -> Result<(), ReplicationError> {
        let s = &self.0;
        if let Some(seq) = barrier {
            // An orchestrator relaying the secondary VM's RESUME: commit exactly that barrier
            // if it is still pending; anything else is already settled.
            return match s.stage() {
                Stage::None | Stage::FailoverFailed => Err(ReplicationError::BackupCancelled),
                _ => s.commit_pending(CommitTrigger::Command, Some(seq)).map(|_| ()),
            };
        }
        let _op = lock(&s.ops);
        match s.stage() {
            Stage::Done | Stage::Failover => return Ok(()),
            Stage::None | Stage::FailoverFailed => return Err(ReplicationError::BackupCancelled),
            Stage::Running => {}
        }
        // An explicit checkpoint supersedes a pending barrier: the buffers are emptied anyway.
        s.discard_pending(false);
        s.checkpoint_locked().map(|_| ())
    }

    fn get_error(&self) -> Result<(), ReplicationError> {
        let s = &self.0;
        if s.stage() == Stage::None {
            return Err(ReplicationError::NotRunning);
        }
        if s.role.has_error() {
            return Err(ReplicationError::Io);
        }
        Ok(())
    }

    fn stop(&self, failover: bool, inject_commit_error: bool) -> Result<(), ReplicationError> {
        let s = &self.0;
        let _op = lock(&s.ops);
        match s.stage() {
            Stage::Done | Stage::Failover => return Ok(()),
            // A failed failover commit is retried: the maps still say what is left to merge.
            Stage::FailoverFailed if failover => return s.retry_failover(inject_commit_error),
            Stage::None | Stage::FailoverFailed => return Err(ReplicationError::NotRunning),
            Stage::Running => {}
        }
        if failover && s.consistency.unclean.load(Ordering::Acquire) {
            return Err(ReplicationError::Inconsistent(lock(&s.consistency.unclean_why).clone()));
        }
        // Quiesce first: if it times out nothing has changed (stage running, the NBD server
        // still serving the primary) and the stop can simply be retried. Once it succeeded no
        // request runs; closing the server then makes sure no primary write lands once the
        // buffers are being dropped or merged (requests queued at the gate find the new stage
        // and are refused).
        let closed = s.quiesce()?;
        s.close_nbd();
        if failover {
            // From here the VM's writes reach the disk: its data leaves the primary's history.
            s.consistency.adopted.store(0, Ordering::Release);
            s.consistency
                .gens
                .rotate("failover: the secondary VM's writes go to the disk")
                .map_err(ReplicationError::RecordFailover)?;
        }
        let deferred = match failover.then(|| s.colo.defer_for_load()).flatten() {
            Some(seq) => {
                log::warn!(
                    "failover while the secondary VM loads checkpoint {seq}: its barrier is decided at the device's restart"
                );
                true
            }
            None => {
                s.discard_pending(true);
                false
            }
        };
        if !failover {
            // QEMU's version of this path fails and keeps the buffers (spec §3.5); the
            // documented intent is to drop them and stop, which is what happens here.
            s.overlay.empty(s.size).map_err(ReplicationError::EmptyBuffers)?;
            s.consistency.state.write(DiskState::Clean).map_err(ReplicationError::RecordState)?;
            s.set_stage(Stage::Done);
            return Ok(());
        }
        s.measure_merge();
        if !deferred {
            // The maps are settled: journal them before the VM can write to the disk. A
            // deferred failover journals once the load decision settled them (commit.rs).
            s.begin_commit_journal().map_err(ReplicationError::RecordCommit)?;
        }
        s.commit.start(0);
        s.set_stage(Stage::Failover);
        drop(closed);
        s.spawn_failover(inject_commit_error)
    }

    fn query(&self) -> Value {
        let s = &self.0;
        let nbd = lock(&s.nbd).as_ref().map(|n| n.stats());
        json!({
            "mode": "secondary",
            "stage": s.stage().name(),
            "error": s.role.error(),
            "error-time": s.role.error_time(),
            "active-dirty-bytes": s.overlay.active_map.count_all() * SECTOR,
            "hidden-dirty-bytes": s.overlay.saved_map.count_all() * SECTOR,
            "cow-bytes": s.stats.cow_bytes.load(Ordering::Relaxed),
            "vm-direct-reads": s.stats.direct_reads.load(Ordering::Relaxed),
            "vm-direct-retries": s.stats.direct_retries.load(Ordering::Relaxed),
            "vm-ring-writes": s.stats.vm_ring_writes.load(Ordering::Relaxed),
            "checkpoints": s.stats.checkpoints.load(Ordering::Relaxed),
            "last-checkpoint-us": s.stats.last_checkpoint_us.load(Ordering::Relaxed),
            "colo": s.colo.query(),
            "disk-consistent": !s.consistency.unclean.load(Ordering::Acquire),
            "generation": s.consistency.gens.json(),
            "state-file": s.consistency.state.path().display().to_string(),
            "commit": s.commit.query(),
            "nbd": nbd.map(|n| json!({
                "clients": n.clients.load(Ordering::Relaxed),
                "writes": n.writes.load(Ordering::Relaxed),
                "bytes-written": n.bytes_written.load(Ordering::Relaxed),
                "errors": n.errors.load(Ordering::Relaxed),
                "bad-clients": n.bad_clients.load(Ordering::Relaxed),
                "refused": n.refused.load(Ordering::Relaxed),
            })),
            "active": s.overlay.files.active.display().to_string(),
            "hidden": s.overlay.files.hidden.display().to_string(),
        })
    }
}

impl Secondary {
    /// Empties both buffers now (a checkpoint); returns how long it took in µs. Callers hold
    /// `ops` and checked that the stage is running.
    pub(super) fn checkpoint_locked(&self) -> Result<u64, ReplicationError> {
        let t0 = Instant::now();
        let closed = self.quiesce()?;
        let dirty = (self.overlay.active_map.count_all(), self.overlay.saved_map.count_all());
        let r = self.overlay.empty(self.size);
        drop(closed);
        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats.last_checkpoint_us.store(us, Ordering::Relaxed);
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        if r.is_ok() && self.consistency.unclean.swap(false, Ordering::AcqRel) {
            log::info!("checkpoint passed: the secondary disk is consistent again");
        }
        match r {
            Ok(()) => {
                log::info!(
                    "checkpoint took {:.1} ms ({} active + {} hidden sectors dropped)",
                    us as f64 / 1000.0,
                    dirty.0,
                    dirty.1
                );
                Ok(us)
            }
            Err(e) => {
                let e = ReplicationError::EmptyBuffers(e);
                self.set_error(e.to_string());
                Err(e)
            }
        }
    }
}
