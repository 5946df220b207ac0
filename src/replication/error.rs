//! [`ReplicationError`]: why a replication operation failed. It is what the QMP commands
//! answer with (the daemon turns it into a `GenericError` whose `desc` is its `Display`), so
//! every message is part of the contract: QEMU's own string where the situation is the same
//! (replication-spec.md §2.4: tools and people search for them), a precise colo-blk one
//! elsewhere.
//!
//! A variant that wraps an underlying error shows it in its message, as QMP clients have
//! always seen it, and therefore does not also expose it as `source()`: a chain printer
//! (`logging::error_chain`) would print it twice (style.md §6: `#[source]` or the cause in the
//! message, not both).

use super::generation::GenerationError;
use super::primary::ConnectError;
use super::secondary::StateError;
use super::{Mode, Stage};
use crate::nbd::client::NbdUri;
use std::io;

/// A replication operation's error.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    // ---- QEMU's strings (spec §2.4) ------------------------------------------------------
    /// `replication-start` while replicating, or after a failed failover commit.
    #[error("Block replication is running or done")]
    AlreadyRunning,
    /// get-error, stop or checkpoint when there is nothing to operate on (stage none, or
    /// stop after a failed failover commit).
    #[error("Block replication is not running")]
    NotRunning,
    /// get-error: an I/O error was recorded since replication started (`query-replication`
    /// says which).
    #[error("I/O error occurred")]
    Io,
    /// Secondary checkpoint while not replicating (QEMU: no backup job).
    #[error("Backup job was cancelled unexpectedly")]
    BackupCancelled,
    /// The active and hidden buffers do not have the secondary disk's length.
    #[error("Active disk, hidden disk, secondary disk's length are not the same")]
    LengthMismatch,
    /// `replication-start` with the other role's mode; QEMU prints the modes as numbers.
    #[error("The parameter mode's value is invalid, needs {}, but got {}", .needs.qemu_value(), .got.qemu_value())]
    ModeMismatch {
        /// The process's mode.
        needs: Mode,
        /// The mode asked for.
        got: Mode,
    },

    // ---- start, checkpoint and stop (colo-blk) -------------------------------------------
    /// `replication-start` in a process started with `--replication none`.
    #[error("replication mode {} is not available: colo-blk was started with --replication none", .0.name())]
    ModeUnavailable(Mode),
    /// Primary `replication-start` without a secondary URI (neither option nor argument).
    #[error("no secondary given (--secondary or \"secondary\": URI)")]
    NoSecondary,
    /// The secondary's data cannot be brought up to date incrementally (the message says why
    /// and what the operator can do).
    #[error("{0}")]
    SplitBrain(String),
    /// The primary could not connect to (or negotiate with) the secondary.
    #[error("cannot connect to the secondary {uri}: {cause}")]
    Connect {
        /// The secondary's URI.
        uri: NbdUri,
        /// Why.
        cause: ConnectError,
    },
    /// `replication-checkpoint {"barrier": N}` on a primary.
    #[error("Parameter 'barrier' is only for mode secondary")]
    BarrierOnPrimary,
    /// Primary checkpoint with the link down.
    #[error("replication link is down; {behind} bytes wait for resync")]
    LinkDown {
        /// Bytes the secondary misses.
        behind: u64,
    },
    /// Primary checkpoint while the secondary still misses writes.
    #[error("the secondary is not in sync yet: {behind} bytes to copy")]
    NotInSync {
        /// Bytes the secondary misses.
        behind: u64,
    },
    /// Primary checkpoint: the writes before the barrier were not answered in time (the link
    /// is cut).
    #[error("checkpoint barrier timed out")]
    BarrierTimeout,
    /// Primary checkpoint: a resync chunk in flight did not finish in time.
    #[error("checkpoint barrier timed out waiting for the resync")]
    BarrierResyncTimeout,
    /// The secondary answered the barrier with ESHUTDOWN: it is not replicating.
    #[error(
        "the secondary refused the checkpoint barrier: it is not replicating (stage none: run replication-start \
         mode=secondary there; or it failed over)"
    )]
    SecondaryNotReplicating,
    /// The barrier got no answer (the link broke).
    #[error("the secondary did not confirm the checkpoint barrier")]
    BarrierUnconfirmed,
    /// The secondary answered the barrier with another NBD error.
    #[error("the secondary refused the checkpoint barrier: {reason}")]
    BarrierRefused {
        /// The NBD error code.
        code: u32,
        /// The code, spelt out.
        reason: String,
    },
    /// Emptying the secondary's buffers failed (start, checkpoint, stop without failover).
    #[error("Failed to empty buffers: {0}")]
    EmptyBuffers(io::Error),
    /// The secondary's state marker could not be written.
    #[error("cannot record the state: {0}")]
    RecordState(StateError),
    /// Failover: the new data generation could not be recorded.
    #[error("cannot record the failover: {0}")]
    RecordFailover(GenerationError),
    /// Failover: the commit journal could not be started.
    #[error("cannot record the commit: {0}")]
    RecordCommit(io::Error),
    /// Failover: the commit thread could not be started.
    #[error("cannot start the failover commit: {0}")]
    SpawnFailover(io::Error),
    /// Failover refused: the secondary disk is not a consistent image.
    #[error(
        "The secondary disk is not consistent: {0} and no checkpoint has passed since. Let the primary \
         resynchronise it and take a checkpoint, or restore the disk, before failing over"
    )]
    Inconsistent(String),
    /// The secondary's in-flight requests did not finish in time; nothing changed.
    #[error("timed out waiting for in-flight requests")]
    QuiesceTimeout,

    // ---- replication-verify (colo-blk) ---------------------------------------------------
    /// `replication-verify` anywhere but on a primary (`mode`, `stage`: as `query-replication`
    /// names them).
    #[error(
        "replication-verify runs on a primary whose replication is running; this process is in mode {mode} \
         (stage {stage})"
    )]
    VerifyNeedsPrimary {
        /// The process's mode.
        mode: String,
        /// Its stage.
        stage: String,
    },
    /// `replication-verify` on a primary that is not replicating.
    #[error("replication-verify needs replication running on this primary (stage is {})", .0.name())]
    VerifyNotRunning(Stage),
    /// `replication-verify` with the link down.
    #[error("the replication link is down: nothing to compare with ({behind} bytes wait for resync)")]
    VerifyLinkDown {
        /// Bytes the secondary misses.
        behind: u64,
    },
    /// `replication-verify` while one runs.
    #[error("a verify is already running ({done} of {total} bytes compared)")]
    VerifyRunning {
        /// Bytes compared so far.
        done: u64,
        /// Bytes to compare.
        total: u64,
    },
    /// The verify thread could not be started.
    #[error("cannot start the verify: {0}")]
    SpawnVerify(io::Error),
}

impl ReplicationError {
    /// The primary's connection failure at `replication-start`: a split brain is reported as
    /// it is (its message names the cause and the remedy), anything else with the URI.
    pub fn connect(uri: &NbdUri, cause: ConnectError) -> Self {
        match cause {
            ConnectError::SplitBrain(msg) => ReplicationError::SplitBrain(msg),
            cause => ReplicationError::Connect { uri: uri.clone(), cause },
        }
    }

    /// Whether the same command may succeed when simply repeated later, without the operator
    /// doing anything else: the link comes back, the resync catches up, in-flight requests
    /// finish, a running verify ends, a thread can be started again (a failed failover
    /// commit start is retried by `replication-stop` failover). A connection failure counts
    /// as the primary's own reconnect loop treats it: every one but a split brain. `false`
    /// when it needs another command first, another configuration, or a repair.
    pub fn is_transient(&self) -> bool {
        use ReplicationError as E;
        match self {
            E::LinkDown { .. }
            | E::NotInSync { .. }
            | E::BarrierTimeout
            | E::BarrierResyncTimeout
            | E::BarrierUnconfirmed
            | E::QuiesceTimeout
            | E::VerifyLinkDown { .. }
            | E::VerifyRunning { .. }
            | E::SpawnVerify(_)
            | E::SpawnFailover(_) => true,
            E::Connect { cause, .. } => !cause.is_split_brain(),
            E::AlreadyRunning
            | E::NotRunning
            | E::Io
            | E::BackupCancelled
            | E::LengthMismatch
            | E::ModeMismatch { .. }
            | E::ModeUnavailable(_)
            | E::NoSecondary
            | E::SplitBrain(_)
            | E::BarrierOnPrimary
            | E::SecondaryNotReplicating
            | E::BarrierRefused { .. }
            | E::EmptyBuffers(_)
            | E::RecordState(_)
            | E::RecordFailover(_)
            | E::RecordCommit(_)
            | E::Inconsistent(_)
            | E::VerifyNeedsPrimary { .. }
            | E::VerifyNotRunning(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ReplicationError as E;
    use super::*;
    use crate::nbd::client::ClientError;
    use crate::replication::{NoReplication, ReplicationControl, StartArgs};

    fn uri() -> NbdUri {
        "nbd://127.0.0.1:10809/parent0".parse().unwrap()
    }

    /// Every variant with the exact text a QMP client receives.
    fn every_variant() -> Vec<(E, &'static str)> {
        let io = || io::Error::other("disk full");
        vec![
            (E::AlreadyRunning, "Block replication is running or done"),
            (E::NotRunning, "Block replication is not running"),
            (E::Io, "I/O error occurred"),
            (E::BackupCancelled, "Backup job was cancelled unexpectedly"),
            (E::LengthMismatch, "Active disk, hidden disk, secondary disk's length are not the same"),
            (
                E::ModeMismatch { needs: Mode::Secondary, got: Mode::Primary },
                "The parameter mode's value is invalid, needs 1, but got 0",
            ),
            (
                E::ModeMismatch { needs: Mode::Primary, got: Mode::Secondary },
                "The parameter mode's value is invalid, needs 0, but got 1",
            ),
            (
                E::ModeUnavailable(Mode::Secondary),
                "replication mode secondary is not available: colo-blk was started with --replication none",
            ),
            (E::NoSecondary, "no secondary given (--secondary or \"secondary\": URI)"),
            (
                E::SplitBrain("split brain: the secondary has an older state".into()),
                "split brain: the secondary has an older state",
            ),
            (
                E::Connect { uri: uri(), cause: ConnectError::Nbd(ClientError::NotFixedNewstyle) },
                "cannot connect to the secondary nbd://127.0.0.1:10809/parent0: server does not speak fixed newstyle",
            ),
            (
                E::Connect {
                    uri: uri(),
                    cause: ConnectError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "secondary export size 1 differs",
                    )),
                },
                "cannot connect to the secondary nbd://127.0.0.1:10809/parent0: secondary export size 1 differs",
            ),
            (E::BarrierOnPrimary, "Parameter 'barrier' is only for mode secondary"),
            (E::LinkDown { behind: 4096 }, "replication link is down; 4096 bytes wait for resync"),
            (E::NotInSync { behind: 512 }, "the secondary is not in sync yet: 512 bytes to copy"),
            (E::BarrierTimeout, "checkpoint barrier timed out"),
            (E::BarrierResyncTimeout, "checkpoint barrier timed out waiting for the resync"),
            (
                E::SecondaryNotReplicating,
                "the secondary refused the checkpoint barrier: it is not replicating (stage none: run \
                 replication-start mode=secondary there; or it failed over)",
            ),
            (E::BarrierUnconfirmed, "the secondary did not confirm the checkpoint barrier"),
            (
                E::BarrierRefused { code: 5, reason: "EIO (an I/O error on the secondary)".into() },
                "the secondary refused the checkpoint barrier: EIO (an I/O error on the secondary)",
            ),
            (E::EmptyBuffers(io()), "Failed to empty buffers: disk full"),
            (
                E::RecordState(StateError::Io { path: "/d/disk.state".into(), source: io() }),
                "cannot record the state: /d/disk.state",
            ),
            (
                E::RecordFailover(GenerationError::Io { path: "/d/disk.gen".into(), source: io() }),
                "cannot record the failover: /d/disk.gen: disk full",
            ),
            (E::RecordCommit(io()), "cannot record the commit: disk full"),
            (E::SpawnFailover(io()), "cannot start the failover commit: disk full"),
            (
                E::Inconsistent("checkpoint 7 could not be committed (x)".into()),
                "The secondary disk is not consistent: checkpoint 7 could not be committed (x) and no checkpoint \
                 has passed since. Let the primary resynchronise it and take a checkpoint, or restore the disk, \
                 before failing over",
            ),
            (E::QuiesceTimeout, "timed out waiting for in-flight requests"),
            (
                E::VerifyNeedsPrimary { mode: "secondary".into(), stage: "running".into() },
                "replication-verify runs on a primary whose replication is running; this process is in mode \
                 secondary (stage running)",
            ),
            (
                E::VerifyNotRunning(Stage::FailoverFailed),
                "replication-verify needs replication running on this primary (stage is failover-failed)",
            ),
            (
                E::VerifyLinkDown { behind: 1024 },
                "the replication link is down: nothing to compare with (1024 bytes wait for resync)",
            ),
            (E::VerifyRunning { done: 10, total: 20 }, "a verify is already running (10 of 20 bytes compared)"),
            (E::SpawnVerify(io()), "cannot start the verify: disk full"),
        ]
    }

    #[test]
    fn every_message_is_the_one_qmp_clients_know() {
        for (e, text) in every_variant() {
            assert_eq!(e.to_string(), text, "{e:?}");
        }
    }

    #[test]
    fn a_cause_shown_in_the_message_is_not_also_a_source() {
        // A chain printer would otherwise print it twice.
        for (e, _) in every_variant() {
            assert!(std::error::Error::source(&e).is_none(), "{e:?}");
            assert_eq!(crate::logging::error_chain(&e), e.to_string());
        }
    }

    #[test]
    fn the_process_without_replication_refuses_with_its_mode() {
        let r = NoReplication;
        let e = r.start(&StartArgs::mode(Mode::Primary)).unwrap_err();
        assert!(matches!(e, E::ModeUnavailable(Mode::Primary)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "replication mode primary is not available: colo-blk was started with --replication none"
        );
        assert!(matches!(r.checkpoint(None), Err(E::NotRunning)));
        assert!(matches!(r.get_error(), Err(E::NotRunning)));
        assert!(matches!(r.stop(true, false), Err(E::NotRunning)));
        // The default verify names the mode and stage query-replication reports.
        let e = r.verify(false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "replication-verify runs on a primary whose replication is running; this process is in mode none \
             (stage none)"
        );
    }

    #[test]
    fn a_split_brain_at_connect_is_reported_as_it_is() {
        let msg = "split brain: the secondary's disk went its own way (generation 3)";
        let e = E::connect(&uri(), ConnectError::SplitBrain(msg.into()));
        assert!(matches!(&e, E::SplitBrain(m) if m == msg), "{e:?}");
        assert_eq!(e.to_string(), msg);
        assert!(!e.is_transient());
        let e = E::connect(&uri(), ConnectError::Io(io::Error::from_raw_os_error(libc::ECONNREFUSED)));
        assert!(matches!(&e, E::Connect { uri: u, cause: ConnectError::Io(_) } if *u == uri()), "{e:?}");
        assert!(e.to_string().starts_with("cannot connect to the secondary nbd://127.0.0.1:10809/parent0: "), "{e}");
        assert!(e.is_transient());
        let e = E::connect(&uri(), ConnectError::Nbd(ClientError::NotNewstyle));
        assert!(matches!(&e, E::Connect { cause: ConnectError::Nbd(ClientError::NotNewstyle), .. }), "{e:?}");
    }

    #[test]
    fn transient_errors_are_those_that_a_later_retry_can_clear() {
        let transient: Vec<String> = every_variant()
            .into_iter()
            .filter(|(e, _)| e.is_transient())
            .map(|(e, _)| format!("{e:?}").split([' ', '(', '{']).next().unwrap().to_string())
            .collect();
        assert_eq!(
            transient,
            [
                "Connect",
                "Connect",
                "LinkDown",
                "NotInSync",
                "BarrierTimeout",
                "BarrierResyncTimeout",
                "BarrierUnconfirmed",
                "SpawnFailover",
                "QuiesceTimeout",
                "VerifyLinkDown",
                "VerifyRunning",
                "SpawnVerify",
            ]
        );
        // QEMU's refusals and anything that needs the operator are not.
        for e in [E::AlreadyRunning, E::NotRunning, E::Io, E::BackupCancelled, E::LengthMismatch, E::NoSecondary] {
            assert!(!e.is_transient(), "{e:?}");
        }
        assert!(!E::SecondaryNotReplicating.is_transient());
        assert!(!E::Inconsistent("x".into()).is_transient());
    }
}
