//! Replication: stages and operations as QEMU's `replication` filter defines them
//! (replication-spec.md §2–§3), and the two roles: [`secondary`] (NBD target with
//! copy-before-write into the hidden buffer, the VM on the active buffer) and [`primary`]
//! (every guest write mirrored over NBD, dirty bitmap, reconnect and resync, checkpoint
//! barriers, the COLO VM-stop hook). [`continuous`] lets a failed-over secondary become the
//! primary of a new secondary.

pub mod continuous;
mod error;
pub mod gate;
pub mod generation;
pub mod pool;
pub mod primary;
pub mod progress;
pub mod role;
pub mod secondary;

use serde_json::Value;

pub use error::ReplicationError;

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content, never a
/// mix: write a temporary file next to it, sync it, rename it over `path`, sync the folder.
pub(crate) fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Replication stage (spec §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not started.
    None,
    /// Replicating.
    Running,
    /// Failover commit in progress.
    Failover,
    /// The failover commit failed.
    FailoverFailed,
    /// Stopped; I/O goes straight to the disk.
    Done,
}

impl Stage {
    /// The name used on the control socket.
    pub fn name(self) -> &'static str {
        match self {
            Stage::None => "none",
            Stage::Running => "running",
            Stage::Failover => "failover",
            Stage::FailoverFailed => "failover-failed",
            Stage::Done => "done",
        }
    }
}

/// Replication mode of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain backend.
    None,
    /// Mirrors writes to a secondary.
    Primary,
    /// Receives the primary's writes.
    Secondary,
}

impl Mode {
    /// The name used on the control socket.
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Primary => "primary",
            Mode::Secondary => "secondary",
        }
    }

    /// QEMU's numeric value in its mode-mismatch message (PRIMARY=0, SECONDARY=1).
    fn qemu_value(self) -> u8 {
        match self {
            Mode::Primary => 0,
            Mode::Secondary => 1,
            Mode::None => 2,
        }
    }
}

/// How a primary brings the secondary up to date when replication starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// The disks are already identical (QEMU's assumption).
    None,
    /// Copy the whole disk in the background.
    Full,
    /// Copy the ranges in the dirty bitmap (writes the secondary missed).
    Incremental,
}

/// Arguments of `replication-start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartArgs {
    /// Requested mode.
    pub mode: Mode,
    /// Primary: the secondary's NBD URI (overrides `--secondary`).
    pub secondary: Option<crate::nbd::client::NbdUri>,
    /// Primary: initial synchronisation.
    pub sync: SyncMode,
}

impl StartArgs {
    /// Just a mode, no primary options.
    pub fn mode(mode: Mode) -> Self {
        StartArgs { mode, secondary: None, sync: SyncMode::None }
    }
}

/// The control operations, as the QMP commands call them.
pub trait ReplicationControl: Send + Sync {
    /// `replication-start`.
    fn start(&self, args: &StartArgs) -> Result<(), ReplicationError>;
    /// `replication-checkpoint`; `barrier` (secondary): commit that pending COLO barrier only.
    fn checkpoint(&self, barrier: Option<u64>) -> Result<(), ReplicationError>;
    /// `replication-get-error`.
    fn get_error(&self) -> Result<(), ReplicationError>;
    /// `replication-stop`; `inject_commit_error` makes the failover commit fail (tests).
    fn stop(&self, failover: bool, inject_commit_error: bool) -> Result<(), ReplicationError>;
    /// `query-replication`.
    fn query(&self) -> Value;
    /// `replication-verify`: compare every block with the secondary while the guest runs;
    /// `resync`: copy the differing blocks. Only a primary whose replication runs does it.
    fn verify(&self, _resync: bool) -> Result<(), ReplicationError> {
        let q = self.query();
        let name = |k: &str| q[k].as_str().unwrap_or("none").to_string();
        Err(ReplicationError::VerifyNeedsPrimary { mode: name("mode"), stage: name("stage") })
    }
}

/// Where stage changes and errors are reported (QMP events).
pub type EventSink = std::sync::Arc<dyn Fn(&str, Value) + Send + Sync>;

/// The control surface of a process in mode `none`.
#[derive(Debug)]
pub struct NoReplication;

impl ReplicationControl for NoReplication {
    fn start(&self, args: &StartArgs) -> Result<(), ReplicationError> {
        Err(ReplicationError::ModeUnavailable(args.mode))
    }
    fn checkpoint(&self, _barrier: Option<u64>) -> Result<(), ReplicationError> {
        Err(ReplicationError::NotRunning)
    }
    fn get_error(&self) -> Result<(), ReplicationError> {
        Err(ReplicationError::NotRunning)
    }
    fn stop(&self, _: bool, _: bool) -> Result<(), ReplicationError> {
        Err(ReplicationError::NotRunning)
    }
    fn query(&self) -> Value {
        serde_json::json!({"mode": "none", "stage": "none", "error": null})
    }
}
