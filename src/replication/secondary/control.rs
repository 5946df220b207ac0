//! The QMP operations of the secondary: start, checkpoint, get-error, stop (failover), query.

use super::*;

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
        s.empty_buffers().map_err(ReplicationError::EmptyBuffers)?;
        // The marker last: a start that fails before this point leaves the disk as it was
        // (stage none, no primary write applied under copy-before-write), so it must not be
        // flagged as stopped while replicating.
        s.state.write(DiskState::Replicating).map_err(ReplicationError::RecordState)?;
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
        if failover && s.unclean.load(Ordering::Acquire) {
            return Err(ReplicationError::Inconsistent(lock(&s.unclean_why).clone()));
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
            s.adopted.store(0, Ordering::Release);
            s.gens
                .rotate("failover: the secondary VM's writes go to the disk")
                .map_err(ReplicationError::RecordFailover)?;
        }
        let deferred = match failover.then(|| s.defer_for_load()).flatten() {
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
            s.empty_buffers().map_err(ReplicationError::EmptyBuffers)?;
            s.state.write(DiskState::Clean).map_err(ReplicationError::RecordState)?;
            s.set_stage(Stage::Done);
            return Ok(());
        }
        s.measure_merge();
        if !deferred {
            // The maps are settled: journal them before the VM can write to the disk. A
            // deferred failover journals once the load decision settled them (commit.rs).
            s.begin_commit_journal().map_err(ReplicationError::RecordCommit)?;
        }
        s.merging.store(true, Ordering::Release);
        s.merge_clock.start(0);
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
            "active-dirty-bytes": s.active_map.count_all() * SECTOR,
            "hidden-dirty-bytes": s.saved_map.count_all() * SECTOR,
            "cow-bytes": s.cow_bytes.load(Ordering::Relaxed),
            "vm-direct-reads": s.direct_reads.load(Ordering::Relaxed),
            "vm-direct-retries": s.direct_retries.load(Ordering::Relaxed),
            "vm-ring-writes": s.vm_ring_writes.load(Ordering::Relaxed),
            "checkpoints": s.checkpoints.load(Ordering::Relaxed),
            "last-checkpoint-us": s.last_checkpoint_us.load(Ordering::Relaxed),
            "colo": s.colo_query(),
            "disk-consistent": !s.unclean.load(Ordering::Acquire),
            "generation": s.gens.json(),
            "state-file": s.state.path().display().to_string(),
            "commit": {
                "active": s.merging.load(Ordering::Acquire),
                "total-bytes": s.merge_total.load(Ordering::Relaxed),
                "done-bytes": s.merge_done.load(Ordering::Relaxed),
                "progress": s.merge_clock.json(
                    s.merge_done.load(Ordering::Relaxed),
                    s.merge_total.load(Ordering::Relaxed).saturating_sub(s.merge_done.load(Ordering::Relaxed)),
                ),
            },
            "nbd": nbd.map(|n| json!({
                "clients": n.clients.load(Ordering::Relaxed),
                "writes": n.writes.load(Ordering::Relaxed),
                "bytes-written": n.bytes_written.load(Ordering::Relaxed),
                "errors": n.errors.load(Ordering::Relaxed),
                "bad-clients": n.bad_clients.load(Ordering::Relaxed),
                "refused": n.refused.load(Ordering::Relaxed),
            })),
            "active": s.files.active.display().to_string(),
            "hidden": s.files.hidden.display().to_string(),
        })
    }
}

impl Secondary {
    /// Empties both buffers now (a checkpoint); returns how long it took in µs. Callers hold
    /// `ops` and checked that the stage is running.
    pub(super) fn checkpoint_locked(&self) -> Result<u64, ReplicationError> {
        let t0 = Instant::now();
        let closed = self.quiesce()?;
        let dirty = (self.active_map.count_all(), self.saved_map.count_all());
        let r = self.empty_buffers();
        drop(closed);
        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_checkpoint_us.store(us, Ordering::Relaxed);
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        if r.is_ok() && self.unclean.swap(false, Ordering::AcqRel) {
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
