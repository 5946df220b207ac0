//! The secondary's crash marker: a small file next to the disk that says whether the disk is
//! in the middle of something. The buffers' bitmaps live in memory only, so after colo-blk
//! stops unexpectedly the buffers cannot be interpreted and the disk alone is:
//! - while replicating: the primary's disk at some point inside an epoch — not a checkpoint.
//!   It becomes consistent again once the primary resynchronised it and a checkpoint was
//!   taken; until then a failover is refused.
//! - during a failover commit: half merged, and the merge cannot be resumed. colo-blk refuses
//!   to start on it and says what to do.
//!
//! [`Consistency`] keeps the marker with the rest of what decides whether a failover may use
//! the disk: whether it is a checkpoint now, and which data generation it follows.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::lock;
use crate::replication::generation::Generations;

/// What the marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskState {
    /// Nothing in progress (or no marker).
    Clean,
    /// Replicating: primary writes land on the disk, the buffers hold the rest.
    Replicating,
    /// The failover commit is merging the buffers into the disk.
    Merging,
}

impl DiskState {
    fn name(self) -> &'static str {
        match self {
            DiskState::Clean => "clean",
            DiskState::Replicating => "replicating",
            DiskState::Merging => "merging",
        }
    }
}

/// The marker file.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

/// Errors reading or writing the marker.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists but says something else.
    #[error("{path}: unknown state '{found}'")]
    Unknown {
        /// The marker.
        path: String,
        /// Its content.
        found: String,
    },
    /// I/O on the marker failed.
    #[error("{path}")]
    Io {
        /// The marker.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl StateFile {
    /// The marker of `disk`: `DISK.colo-state`.
    pub fn for_disk(disk: &Path) -> StateFile {
        let mut p = disk.as_os_str().to_owned();
        p.push(".colo-state");
        StateFile { path: PathBuf::from(p) }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the marker (missing = clean).
    pub fn read(&self) -> Result<DiskState, StateError> {
        let s = match std::fs::read_to_string(&self.path) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DiskState::Clean),
            Err(source) => return Err(StateError::Io { path: self.path.display().to_string(), source }),
        };
        match s.trim() {
            "clean" | "" => Ok(DiskState::Clean),
            "replicating" => Ok(DiskState::Replicating),
            "merging" => Ok(DiskState::Merging),
            other => Err(StateError::Unknown { path: self.path.display().to_string(), found: other.into() }),
        }
    }

    /// Records `state` durably (write to a temporary file, fsync, rename, fsync the folder).
    pub fn write(&self, state: DiskState) -> Result<(), StateError> {
        let err = |source| StateError::Io { path: self.path.display().to_string(), source };
        crate::replication::write_durably(&self.path, state.name().as_bytes()).map_err(err)
    }
}

/// Whether the secondary's disk can be trusted: across a crash (the marker), as the secondary
/// VM's checkpoint (unclean and why), and as a primary's history (the data generation).
#[derive(Debug)]
pub(super) struct Consistency {
    /// The crash marker next to the disk.
    pub(super) state: StateFile,
    /// colo-blk stopped while replicating and no checkpoint passed since: no failover.
    pub(super) unclean: AtomicBool,
    /// Why the disk is not consistent, when `unclean` (for the failover refusal).
    pub(super) unclean_why: Mutex<String>,
    /// The disk's data generation (shared with the mirror of a failed-over secondary).
    pub(super) gens: Arc<Generations>,
    /// The generation this process adopted from a primary (0: none since it started, or
    /// changed since by a failover): while it is the current one, every write since is here.
    pub(super) adopted: AtomicU64,
}

impl Consistency {
    /// The disk no longer matches the secondary VM's checkpoint: refuse failover until a
    /// checkpoint commits (`checkpoint_locked` clears it).
    pub(super) fn mark_inconsistent(&self, why: String) {
        log::error!("secondary disk not consistent: {why}; failover is refused until the next checkpoint");
        *lock(&self.unclean_why) = why;
        self.unclean.store(true, Ordering::Release);
    }

    /// The disk now follows generation `g` (`CMD_COLO_ADOPT`; the caller checked the stage).
    pub(super) fn adopt(&self, g: u64) -> io::Result<()> {
        self.gens.adopt(g).map_err(io::Error::other)?;
        self.adopted.store(g, Ordering::Release);
        Ok(())
    }

    /// The generation told to a connecting primary, and whether this process has followed
    /// it without a restart.
    pub(super) fn generation(&self) -> (u64, bool) {
        let current = self.gens.current();
        (current, current != 0 && self.adopted.load(Ordering::Acquire) == current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_is_clean() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateFile::for_disk(&dir.path().join("disk.img"));
        assert!(s.path().ends_with("disk.img.colo-state"));
        assert_eq!(s.read().unwrap(), DiskState::Clean);
        for st in [DiskState::Replicating, DiskState::Merging, DiskState::Clean] {
            s.write(st).unwrap();
            assert_eq!(s.read().unwrap(), st);
        }
        std::fs::write(s.path(), "bogus").unwrap();
        assert!(s.read().is_err());
    }
}
