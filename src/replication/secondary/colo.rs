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
//! A failover while a checkpoint is pending discards the barrier: the buffers are merged.

use super::*;

/// Barrier bookkeeping, shown by `query-replication`.
#[derive(Debug, Default)]
pub(super) struct ColoState {
    /// The barrier received and not committed yet.
    pending: Option<u64>,
    /// Barriers received.
    barriers: u64,
    /// Barriers committed.
    commits: u64,
    /// The last commit: barrier, what triggered it, how long emptying took (µs).
    last: Option<(u64, &'static str, u64)>,
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
        self.commit_pending(CommitTrigger::NextBarrier, None).map_err(io::Error::other)?;
        {
            let _t = self.gate.enter();
            self.hidden.sync_data()?;
            self.file.sync_data()?;
        }
        let mut c = lock(&self.colo);
        c.pending = Some(seq);
        c.barriers += 1;
        self.barrier_pending.store(true, Ordering::Release);
        drop(c);
        log::info!("checkpoint barrier {seq} from the primary: pending until the secondary VM resumes");
        self.emit("COLO_BARRIER", json!({"barrier": seq}));
        Ok(())
    }

    /// Commits the pending checkpoint (empties the buffers) if there is one and, when `only`
    /// is given, if it is that barrier. Returns the committed barrier; on failure the barrier
    /// stays pending and the error is returned (and recorded for get-error).
    pub fn commit_pending(&self, trigger: CommitTrigger, only: Option<u64>) -> Result<Option<u64>, ReplicationError> {
        if !self.barrier_pending.load(Ordering::Acquire) {
            return Ok(None);
        }
        let _op = lock(&self.ops);
        let seq = match (lock(&self.colo).pending, only) {
            (Some(p), Some(o)) if p != o => return Ok(None),
            (None, _) => return Ok(None),
            (Some(p), _) => p,
        };
        if self.stage() != Stage::Running {
            return Ok(None);
        }
        match self.checkpoint_locked() {
            Ok(us) => {
                let mut c = lock(&self.colo);
                c.commits += 1;
                c.last = Some((seq, trigger.name(), us));
                c.pending = None;
                self.barrier_pending.store(false, Ordering::Release);
                drop(c);
                log::info!("checkpoint {seq} committed ({}, {:.1} ms)", trigger.name(), us as f64 / 1000.0);
                self.emit("COLO_CHECKPOINT", json!({"barrier": seq, "trigger": trigger.name(), "duration-us": us}));
                Ok(Some(seq))
            }
            Err(e) => {
                log::error!("checkpoint {seq} could not be committed: {e}");
                Err(e)
            }
        }
    }

    /// Forgets a pending barrier without committing it. Callers hold `ops`. `kept`: the
    /// buffers stay as they are (failover, stop), which is worth an event; otherwise they
    /// are about to be emptied anyway (an explicit checkpoint).
    pub(super) fn discard_pending(&self, kept: bool) {
        let seq = lock(&self.colo).pending.take();
        self.barrier_pending.store(false, Ordering::Release);
        if let (Some(seq), true) = (seq, kept) {
            log::warn!("checkpoint barrier {seq} was never committed: the buffers are kept");
            self.emit("COLO_BARRIER_DISCARDED", json!({"barrier": seq}));
        }
    }

    /// The barrier part of `query-replication`.
    pub(super) fn colo_query(&self) -> Value {
        let c = lock(&self.colo);
        json!({
            "barriers": c.barriers,
            "pending-barrier": c.pending,
            "commits": c.commits,
            "last-commit": c.last.map(|(b, t, us)| json!({"barrier": b, "trigger": t, "duration-us": us})),
        })
    }
}
