//! COLO checkpoint barriers on the secondary.
//!
//! A colo-blk primary sends a barrier over the replication link when its VM stops for a
//! checkpoint (see docs/colo.md). The barrier only marks the checkpoint *pending*: the buffers
//! must not be emptied before the secondary VM has really loaded the checkpoint, because if
//! the transfer fails the secondary carries on from its previous state, which matches the
//! buffers as they are. The checkpoint is committed (buffers emptied) at the first of:
//! - the secondary VM's next device start with dirty logging on (QEMU restarts the vhost
//!   device right after loading a checkpoint, and waits for our reply to SET_FEATURES);
//! - a primary write after the barrier (the primary only resumes once the secondary loaded
//!   the checkpoint, so such a write proves it);
//! - the next barrier (no device start and no write in between: nothing to lose);
//! - `replication-checkpoint {"barrier": N}` (an orchestrator relaying the secondary's
//!   RESUME event).
//!
//! A failover while a checkpoint is pending and the secondary VM runs discards the barrier:
//! the VM carries on from the checkpoint it runs on, so the buffers are merged. A failover
//! in the *load window* — the barrier pending and the VM's device stopped, as QEMU stops it
//! to load a checkpoint — cannot know yet which state the VM will resume from: QEMU finishes
//! a load it has started before it honours a lost heartbeat. The decision waits for the
//! device's next start: with dirty logging the checkpoint was loaded and is committed (the
//! buffers' bits are dropped, the merge then has nothing to copy); without, the load did not
//! happen and the barrier is discarded. No start within [`LOAD_DECISION_TIMEOUT`]: discarded.
//!
//! Lost and late barriers. QEMU never fails a checkpoint because colo-blk's hook flush did
//! (the hook cannot fail the flush), so a checkpoint can be loaded whose barrier failed on
//! the primary (link down, not in sync, no answer in time). The secondary sees it as a
//! device start with dirty logging while no barrier is pending and none was committed since
//! the previous start: its disk is then not the loaded checkpoint, and it is marked
//! inconsistent (`disk-consistent` false, failover refused) until the next checkpoint
//! commits. A barrier still running (its flushes outlasting the primary's timeout) when the
//! device restarts is stale: it is refused when it completes instead of becoming pending,
//! where the next primary write would commit it and drop the running VM's writes.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Secondary, lock};
use crate::replication::{ReplicationError, Stage};

/// Barrier bookkeeping, shown by `query-replication`.
#[derive(Debug, Default)]
pub(super) struct ColoState {
    /// The barrier received and not committed yet.
    pending: Option<u64>,
    /// Barriers received.
    barriers: u64,
    /// The highest barrier number received (accepted or not): a barrier must be numbered
    /// above it.
    last_number: u64,
    /// Barriers committed.
    commits: u64,
    /// The last commit: barrier, what triggered it, how long emptying took (µs).
    last: Option<(u64, &'static str, u64)>,
    /// Device starts with dirty logging so far (a barrier that saw one start while it ran
    /// is stale).
    device_starts: u64,
    /// A checkpoint was committed since the last device start with dirty logging.
    committed_since_start: bool,
    /// `primary_writes` at the last device start with dirty logging.
    writes_at_start: u64,
    /// The secondary VM's device is stopped (a queue stopped since the last start): QEMU
    /// stops it while it loads a checkpoint.
    device_stopped: bool,
    /// A failover came in the load window: the next device start decides the pending
    /// barrier (see the module comment).
    failover_deferred: bool,
}

/// The secondary's COLO checkpoint barriers: the bookkeeping, how the write path learns that
/// one is pending, and what a failover waits for.
#[derive(Debug, Default)]
pub(super) struct ColoBarriers {
    /// Barrier bookkeeping (shown by `query-replication`).
    pub(super) state: Mutex<ColoState>,
    /// Signalled when a failover's deferred checkpoint decision is made.
    pub(super) decided: Condvar,
    /// Fast check for the write path: a barrier waits for its commit.
    pub(super) barrier_pending: AtomicBool,
    /// Primary writes applied while running (a device start after some, with no barrier in
    /// between, loaded a checkpoint whose barrier was lost; see `colo_device_started`).
    pub(super) primary_writes: AtomicU64,
    /// `--x-fault-injection`: barrier rules (see `colo_barrier`).
    pub(super) faults: Mutex<Option<Arc<crate::block::fault::FaultPlan>>>,
}

impl ColoBarriers {
    /// The highest barrier number received so far (0: none).
    pub(super) fn last_barrier(&self) -> u64 {
        lock(&self.state).last_number
    }

    /// At a failover (callers hold `ops`, the stage is still running): whether the pending
    /// barrier's fate must wait for the device's next start (the load window). If so, it
    /// is marked deferred and stays pending.
    pub(super) fn defer_for_load(&self) -> Option<u64> {
        let mut c = lock(&self.state);
        match c.pending {
            Some(seq) if c.device_stopped => {
                c.failover_deferred = true;
                Some(seq)
            }
            _ => None,
        }
    }

    /// The barrier part of `query-replication`.
    pub(super) fn query(&self) -> Value {
        let c = lock(&self.state);
        json!({
            "barriers": c.barriers,
            "last-barrier-number": c.last_number,
            "pending-barrier": c.pending,
            "commits": c.commits,
            "last-commit": c.last.map(|(b, t, us)| json!({"barrier": b, "trigger": t, "duration-us": us})),
            "failover-awaits-load": c.failover_deferred,
        })
    }
}

/// How long a failover in the load window waits for the secondary VM's device to restart
/// before it decides that the checkpoint was not loaded. QEMU loads a checkpoint from
/// memory (it received all of it before it stopped the VM): seconds at most.
pub(super) const LOAD_DECISION_TIMEOUT: Duration = Duration::from_secs(30);

impl ColoState {
    /// A failover waits for the device's restart to decide the pending barrier.
    pub(super) fn failover_deferred(&self) -> bool {
        self.failover_deferred
    }
}

/// What made a pending checkpoint commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitTrigger {
    /// The secondary VM's device restarted with dirty logging on.
    DeviceStart,
    /// A primary write arrived after the barrier.
    PrimaryWrite,
    /// Another barrier arrived.
    NextBarrier,
    /// `replication-checkpoint {"barrier": N}`.
    Command,
}

impl CommitTrigger {
    fn name(self) -> &'static str {
        match self {
            CommitTrigger::DeviceStart => "device-start",
            CommitTrigger::PrimaryWrite => "primary-write",
            CommitTrigger::NextBarrier => "next-barrier",
            CommitTrigger::Command => "command",
        }
    }
}

impl Secondary {
    /// A barrier from the primary: earlier writes are on the disk; make them durable and mark
    /// checkpoint `seq` pending.
    pub(super) fn colo_barrier(&self, seq: u64) -> io::Result<()> {
        if self.stage() != Stage::Running {
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        }
        {
            // Numbers only grow (a restarted primary learns the last one when it connects):
            // an older or repeated number is a replayed or stale barrier, and a relayed
            // `replication-checkpoint {"barrier": N}` must never name two checkpoints.
            let mut c = lock(&self.colo.state);
            if seq <= c.last_number {
                let last = c.last_number;
                drop(c);
                log::error!("checkpoint barrier {seq} is not newer than barrier {last}: refused");
                self.emit("COLO_BARRIER_DISCARDED", json!({"barrier": seq}));
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            c.last_number = seq;
        }
        self.commit_pending(CommitTrigger::NextBarrier, None).map_err(io::Error::other)?;
        let starts = lock(&self.colo.state).device_starts;
        // The ticket is held until the barrier is pending: a stop or failover quiesces the
        // gate first, so it either sees this barrier pending (and discards it) or the barrier
        // runs after it and finds the new stage.
        let _t = self.gate.enter();
        self.overlay.hidden.file.sync_data()?;
        self.file.sync_data()?;
        let plan = lock(&self.colo.faults).clone();
        match plan.and_then(|p| p.check_barrier()) {
            // Test hooks (`--x-fault-injection`): a failing or a slow disk under the flushes.
            Some(crate::block::fault::FaultAction::Fail(errno)) => return Err(io::Error::from_raw_os_error(errno)),
            Some(crate::block::fault::FaultAction::Delay(d)) => std::thread::sleep(d),
            None => {}
        }
        let mut c = lock(&self.colo.state);
        if c.device_starts != starts {
            drop(c);
            // The secondary VM already restarted (it loaded a checkpoint the primary sent
            // without waiting for this barrier): committing it now would drop its writes.
            log::error!("checkpoint barrier {seq} completed after the secondary VM restarted: refused");
            self.emit("COLO_BARRIER_DISCARDED", json!({"barrier": seq}));
            self.consistency
                .mark_inconsistent(format!("checkpoint barrier {seq} arrived after the secondary VM restarted"));
            return Err(io::Error::other("stale checkpoint barrier"));
        }
        if self.stage() != Stage::Running {
            // A failover or stop began while the barrier flushed: it must not become pending
            // (nor be announced) in a stage where nothing will ever commit it.
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        }
        c.pending = Some(seq);
        c.barriers += 1;
        self.colo.barrier_pending.store(true, Ordering::Release);
        drop(c);
        log::info!("checkpoint barrier {seq} from the primary: pending until the secondary VM resumes");
        self.emit("COLO_BARRIER", json!({"barrier": seq}));
        Ok(())
    }

    /// Commits the pending checkpoint (empties the buffers) if there is one and, when `only`
    /// is given, if it is that barrier. Returns the committed barrier; on failure the barrier
    /// stays pending and the error is returned (and recorded for get-error).
    pub fn commit_pending(&self, trigger: CommitTrigger, only: Option<u64>) -> Result<Option<u64>, ReplicationError> {
        if !self.colo.barrier_pending.load(Ordering::Acquire) {
            return Ok(None);
        }
        let _op = lock(&self.ops);
        let seq = match (lock(&self.colo.state).pending, only) {
            (Some(p), Some(o)) if p != o => return Ok(None),
            (None, _) => return Ok(None),
            (Some(p), _) => p,
        };
        if self.stage() != Stage::Running {
            return Ok(None);
        }
        self.commit_barrier(seq, trigger)
    }

    /// Empties the buffers for barrier `seq` and records the commit. Callers hold `ops`.
    fn commit_barrier(&self, seq: u64, trigger: CommitTrigger) -> Result<Option<u64>, ReplicationError> {
        match self.checkpoint_locked() {
            Ok(us) => {
                let mut c = lock(&self.colo.state);
                c.commits += 1;
                c.committed_since_start = true;
                c.last = Some((seq, trigger.name(), us));
                c.pending = None;
                self.colo.barrier_pending.store(false, Ordering::Release);
                drop(c);
                log::info!("checkpoint {seq} committed ({}, {:.1} ms)", trigger.name(), us as f64 / 1000.0);
                self.emit("COLO_CHECKPOINT", json!({"barrier": seq, "trigger": trigger.name(), "duration-us": us}));
                Ok(Some(seq))
            }
            Err(e) => {
                // Emptying failed half way (the maps may already be cleared): the buffers are
                // no checkpoint any more. Forget the barrier — committing it again later would
                // drop the writes the VM makes meanwhile — and refuse failover until the next
                // checkpoint commits.
                log::error!("checkpoint {seq} could not be committed: {e}");
                lock(&self.colo.state).pending = None;
                self.colo.barrier_pending.store(false, Ordering::Release);
                self.consistency.mark_inconsistent(format!("checkpoint {seq} could not be committed ({e})"));
                Err(e)
            }
        }
    }

    /// The secondary VM's device stopped (a queue's GET_VRING_BASE, or the frontend left).
    pub fn colo_device_stopped(&self) {
        lock(&self.colo.state).device_stopped = true;
    }

    /// The secondary VM's device is (re)starting; `logging`: with dirty logging on. Settles a
    /// failover's deferred checkpoint decision first.
    pub fn colo_frontend_starting(&self, logging: bool) {
        let deferred = {
            let mut c = lock(&self.colo.state);
            c.device_stopped = false;
            std::mem::take(&mut c.failover_deferred)
        };
        if deferred {
            self.settle_deferred(logging);
        } else if logging {
            self.colo_device_started();
        }
    }

    /// The failover commit thread: waits until a deferred decision is made, at most
    /// [`LOAD_DECISION_TIMEOUT`]; then (or at once if nothing was deferred) returns.
    pub(super) fn await_load_decision(&self) {
        let c = lock(&self.colo.state);
        if !c.failover_deferred {
            return;
        }
        let (mut c, _) = self
            .colo
            .decided
            .wait_timeout_while(c, LOAD_DECISION_TIMEOUT, |c| c.failover_deferred)
            .unwrap_or_else(|e| e.into_inner());
        if std::mem::take(&mut c.failover_deferred) {
            drop(c);
            log::warn!(
                "failover: the secondary VM's device did not restart within {LOAD_DECISION_TIMEOUT:?}; taking the \
                 checkpoint as not loaded"
            );
            self.settle_deferred(false);
        }
    }

    /// Decides a deferred barrier: `loaded` commits it (drops the buffers' bits, so the merge
    /// keeps the disk as the primary left it), otherwise it is discarded (the merge brings
    /// back the previous checkpoint plus the VM's writes).
    fn settle_deferred(&self, loaded: bool) {
        let _op = lock(&self.ops);
        let seq = lock(&self.colo.state).pending;
        match seq {
            Some(seq) if loaded => {
                // The NBD server is closed and the device stopped: nothing writes. The disk
                // holds every primary write up to the barrier, which is checkpoint `seq`.
                let t0 = Instant::now();
                self.overlay.clear_maps();
                let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                let mut c = lock(&self.colo.state);
                c.commits += 1;
                c.last = Some((seq, CommitTrigger::DeviceStart.name(), us));
                c.pending = None;
                self.colo.barrier_pending.store(false, Ordering::Release);
                drop(c);
                log::info!("checkpoint {seq} committed at the failover's device start: the VM loaded it");
                self.emit(
                    "COLO_CHECKPOINT",
                    json!({"barrier": seq, "trigger": CommitTrigger::DeviceStart.name(), "duration-us": us}),
                );
            }
            _ => self.discard_pending(true),
        }
        self.colo.decided.notify_all();
    }

    /// The secondary VM's device (re)started with dirty logging on: QEMU loaded a checkpoint
    /// (it announces the restart with two SET_FEATURES; both land here). Commits the pending
    /// barrier. With none pending, none committed since the previous start, barriers in use
    /// and primary writes applied since the previous start, the checkpoint's barrier was lost:
    /// the disk holds primary writes the loaded checkpoint's buffers were never settled for,
    /// so the secondary is marked inconsistent. (A lost barrier in an epoch where only the
    /// secondary VM wrote is not detected: its writes stay in active.)
    pub fn colo_device_started(&self) {
        let writes = self.colo.primary_writes.load(Ordering::Acquire);
        let (pending, committed, seen, wrote) = {
            let mut c = lock(&self.colo.state);
            c.device_starts += 1;
            let wrote = writes != std::mem::replace(&mut c.writes_at_start, writes);
            (c.pending.is_some(), std::mem::take(&mut c.committed_since_start), c.barriers > 0, wrote)
        };
        if pending {
            // A failure is logged and recorded; the VM restarts on the uncommitted buffers.
            let _ = self.commit_pending(CommitTrigger::DeviceStart, None);
            let mut c = lock(&self.colo.state);
            c.committed_since_start = false;
            c.writes_at_start = self.colo.primary_writes.load(Ordering::Acquire);
        } else if seen && !committed && wrote && self.stage() == Stage::Running {
            self.consistency.mark_inconsistent(
                "the secondary VM loaded a checkpoint whose barrier never arrived (failed or lost on the \
                 primary)"
                    .into(),
            );
        }
    }

    /// Forgets a pending barrier without committing it. Callers hold `ops`. `kept`: the
    /// buffers stay as they are (failover, stop), which is worth an event; otherwise they
    /// are about to be emptied anyway (an explicit checkpoint).
    pub(super) fn discard_pending(&self, kept: bool) {
        let seq = lock(&self.colo.state).pending.take();
        self.colo.barrier_pending.store(false, Ordering::Release);
        if let (Some(seq), true) = (seq, kept) {
            log::warn!("checkpoint barrier {seq} was never committed: the buffers are kept");
            self.emit("COLO_BARRIER_DISCARDED", json!({"barrier": seq}));
        }
    }
}
