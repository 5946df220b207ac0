//! Image locks that QEMU's tools understand: open-file-description (OFD) byte-range locks in
//! the layout QEMU's `file-posix` driver uses, so that colo-blk, `qemu-io`, `qemu-img`,
//! `qemu-nbd`, `qemu-storage-daemon` and QEMU itself see each other's claims on an image.
//!
//! The scheme: permission *n* (0 = consistent read, 1 = write, 2 = write-unchanged,
//! 3 = resize) is announced by a shared lock on byte `100 + n` ("I use n") and by a shared
//! lock on byte `200 + n` ("nobody else may use n"). Opening an image checks both directions
//! with `F_OFD_GETLK`: a permission we take must not be unshared by anyone, and a permission we
//! unshare must not be in use. All locks are shared (read) locks; only the test asks for a
//! write lock, so two holders never block each other, they only see each other.
//!
//! The locks live on a descriptor of their own that stays open as long as the [`ImageLock`]:
//! OFD locks of one open file description never conflict with each other, but they do with
//! the same process's other descriptors, which is why the data descriptors take none.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Byte announcing that a permission is in use.
const PERM_BASE: i64 = 100;
/// Byte announcing that a permission is not shared with others.
const SHARED_BASE: i64 = 200;

/// The permissions of QEMU's block layer, by bit number.
const PERMISSIONS: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const RESIZE: u32 = 1 << 3;

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The image could not be opened or the lock calls failed.
    #[error("cannot lock {path}")]
    Io {
        /// The image.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process holds a conflicting lock.
    #[error(
        "{path} is in use: another process (QEMU, a QEMU tool or colo-blk) {what} \
         (its \"{permission}\" lock conflicts); stop it or serve another image"
    )]
    InUse {
        /// The image.
        path: String,
        /// The permission both sides want to control.
        permission: &'static str,
        /// What the other process does.
        what: &'static str,
    },
}

/// The locks held on one image for as long as this value lives.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
}

impl ImageLock {
    /// Locks `path` for a writer (uses read, write and resize; lets others only read) or,
    /// with `writable == false`, for a reader (uses read; still refuses writers, so the
    /// content the guest sees cannot change underneath it, but shares with other readers).
    pub fn acquire(path: &Path, writable: bool) -> Result<ImageLock, LockError> {
        let (used, unshared) = if writable { (READ | WRITE | RESIZE, WRITE | RESIZE) } else { (READ, WRITE | RESIZE) };
        let io_err = |source| LockError::Io { path: path.display().to_string(), source };
        let file = File::open(path).map_err(io_err)?;
        let lock = ImageLock { file, path: path.to_path_buf() };
        for bit in 0..PERMISSIONS.len() {
            let mask = 1u32 << bit;
            if used & mask != 0 {
                lock.set(PERM_BASE + bit as i64).map_err(io_err)?;
            }
            if unshared & mask != 0 {
                lock.set(SHARED_BASE + bit as i64).map_err(io_err)?;
            }
        }
        // Checked after our own locks are in place: two processes racing both see each other
        // and both give up, rather than both going ahead.
        for (bit, &permission) in PERMISSIONS.iter().enumerate() {
            let mask = 1u32 << bit;
            if used & mask != 0 && lock.held_by_other(SHARED_BASE + bit as i64).map_err(io_err)? {
                return Err(LockError::InUse {
                    path: path.display().to_string(),
                    permission,
                    what: "does not let others use it this way",
                });
            }
            if unshared & mask != 0 && lock.held_by_other(PERM_BASE + bit as i64).map_err(io_err)? {
                return Err(LockError::InUse {
                    path: path.display().to_string(),
                    permission,
                    what: "has it open for writing or resizing",
                });
            }
        }
        Ok(lock)
    }

    /// The locked image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
        // SAFETY: `flock` is plain data; every field is set or meant to be zero (l_pid must
        // be 0 for OFD locks).
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte;
        fl.l_len = 1;
        fl
    }

    /// Takes a shared lock on one byte.
    fn set(&self, byte: i64) -> io::Result<()> {
        let fl = Self::flock(libc::F_RDLCK, byte);
        // SAFETY: the descriptor is open for the lifetime of `self`; `fl` is a valid flock.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// Whether another open file description holds any lock on `byte`.
    fn held_by_other(&self, byte: i64) -> io::Result<bool> {
        let mut fl = Self::flock(libc::F_WRLCK, byte);
        // SAFETY: as in `set`; the kernel writes the conflicting lock (if any) into `fl`.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        (dir, p)
    }

    #[test]
    fn a_second_writer_is_refused_and_readers_share() {
        let (_d, p) = image();
        let w = ImageLock::acquire(&p, true).unwrap();
        let e = ImageLock::acquire(&p, true).unwrap_err();
        assert!(matches!(e, LockError::InUse { permission: "write", .. }), "{e}");
        // A reader refuses to share writing, and a writer holds it: refused as well.
        assert!(matches!(ImageLock::acquire(&p, false), Err(LockError::InUse { .. })));
        drop(w);
        let r1 = ImageLock::acquire(&p, false).unwrap();
        let _r2 = ImageLock::acquire(&p, false).unwrap();
        assert!(matches!(ImageLock::acquire(&p, true), Err(LockError::InUse { .. })));
        drop(r1);
    }

    #[test]
    fn locks_go_away_with_the_value() {
        let (_d, p) = image();
        drop(ImageLock::acquire(&p, true).unwrap());
        ImageLock::acquire(&p, true).unwrap();
    }
}
