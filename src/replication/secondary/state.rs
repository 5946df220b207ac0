//! The secondary's crash marker: a small file next to the disk that says whether the disk is
//! in the middle of something. The buffers' bitmaps live in memory only, so after colo-blk
//! stops unexpectedly the buffers cannot be interpreted and the disk alone is:
//! - while replicating: the primary's disk at some point inside an epoch — not a checkpoint.
//!   It becomes consistent again once the primary resynchronised it and a checkpoint was
//!   taken; until then a failover is refused.
//! - during a failover commit: half merged, and the merge cannot be resumed. colo-blk refuses
//!   to start on it and says what to do.

use std::io;
use std::path::{Path, PathBuf};

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
