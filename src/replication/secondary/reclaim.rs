//! Emptying the buffers in constant time.
//!
//! A checkpoint drops everything the buffers hold, and it sits on the COLO pair's critical
//! path: the secondary answers the VM's device restart only after it, and the primary VM stays
//! paused until then. Truncating a file whose pages are dirty costs time in proportion to what
//! it held (seconds for a few hundred MB on ext4), so a regular-file buffer is instead
//! *replaced*: a fresh sparse file is renamed over the buffer's path and put behind the same
//! descriptor number (`dup3`), and the old file, now unlinked, is closed by a background
//! thread, which is where the kernel frees its blocks and pages. The next epoch writes into
//! the fresh file, so the reclaim never races with it. The backlog is bounded by what the
//! old files still hold on the disk: a checkpoint waits for the reclaimer only when more
//! than [`BACKLOG_BYTES`] (or [`BACKLOG_FILES`] files) are still to be freed. (A bound of a
//! few files made a checkpoint wait behind the slow close of an earlier large buffer: an
//! 8.3 s commit in a soak on ext4.) Cleared maps are memory only and never wait.
//!
//! A block device cannot be replaced and needs nothing: what the buffer maps say is clean is
//! never read, so clearing the maps is emptying it.
//!
//! Each buffer also carries its image lock (see [`crate::block::lock`]), re-taken on the fresh
//! file at every swap: a lock left on the old descriptor would keep the unlinked file alive.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::block::bitmap::ClearedBits;
use crate::block::lock::{ImageLock, LockError};

/// Disk space old buffer files may hold while they wait to be closed.
const BACKLOG_BYTES: u64 = 1 << 30;

/// Old buffer files the background thread may be behind by.
const BACKLOG_FILES: u64 = 64;

/// Files and allocated bytes handed to the reclaimer and not freed yet.
#[derive(Debug, Default)]
struct Pending {
    counts: Mutex<(u64, u64)>,
    freed: Condvar,
}

impl Pending {
    /// One old file of `bytes` is freed: wakes a checkpoint waiting for room.
    fn release(&self, bytes: u64) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.0 -= 1;
        c.1 -= bytes;
        drop(c);
        self.freed.notify_all();
    }
}

/// One buffer file: where it lives and the lock that announces it is in use.
#[derive(Debug)]
pub struct Buffer {
    /// The real path (links resolved), so the fresh file replaces the file, not a link.
    path: PathBuf,
    lock: Mutex<Option<ImageLock>>,
    block_device: bool,
}

impl Buffer {
    /// Describes the buffer open as `file` at `path`, and locks it for writing.
    pub fn new(file: &File, path: &Path) -> Result<Buffer, LockError> {
        let io_err = |source| LockError::Io { path: path.display().to_string(), source };
        let path = path.canonicalize().map_err(io_err)?;
        let block_device = file.metadata().map_err(io_err)?.file_type().is_block_device();
        let lock = ImageLock::acquire(&path, true)?;
        Ok(Buffer { path, lock: Mutex::new(Some(lock)), block_device })
    }
}

/// What the background thread frees.
#[derive(Debug)]
#[expect(dead_code, reason = "the values are held only to be dropped on the reclaim thread")]
enum Garbage {
    /// The last descriptor of an unlinked buffer file.
    File(File),
    /// The extents of cleared buffer maps.
    Bits(ClearedBits),
}

/// Empties buffers and frees the old files' space (and the maps' memory) in the background.
#[derive(Debug)]
pub struct Reclaimer {
    tx: Mutex<Sender<(Garbage, u64)>>,
    pending: Arc<Pending>,
    warned: std::sync::atomic::AtomicBool,
}

impl Reclaimer {
    /// Starts the background thread.
    pub fn new() -> io::Result<Reclaimer> {
        let (tx, rx) = channel::<(Garbage, u64)>();
        let pending = Arc::new(Pending::default());
        let p2 = pending.clone();
        std::thread::Builder::new().name("buffer-reclaim".into()).spawn(move || {
            for (garbage, bytes) in rx {
                let t = std::time::Instant::now();
                // For a file: the last reference to an unlinked file, closing it frees its blocks.
                let file = matches!(garbage, Garbage::File(_));
                drop(garbage);
                if file {
                    p2.release(bytes);
                }
                log::debug!(
                    "reclaimed {} in {} ms",
                    if file { "an old buffer file" } else { "cleared maps" },
                    t.elapsed().as_millis()
                );
            }
        })?;
        Ok(Reclaimer { tx: Mutex::new(tx), pending, warned: Default::default() })
    }

    /// Frees the memory of cleared maps in the background.
    pub fn free_bits(&self, bits: ClearedBits) {
        self.dispose(Garbage::Bits(bits));
    }

    fn dispose(&self, garbage: Garbage) {
        let bytes = match &garbage {
            Garbage::File(f) => {
                let bytes = f.metadata().map_or(0, |m| m.blocks() * 512);
                // Waits only while the old files not freed yet hold more than the bounds.
                let mut c = self.pending.counts.lock().unwrap_or_else(|e| e.into_inner());
                while c.0 > 0 && (c.0 >= BACKLOG_FILES || c.1 + bytes > BACKLOG_BYTES) {
                    let (g, t) =
                        self.pending.freed.wait_timeout(c, Duration::from_secs(1)).unwrap_or_else(|e| e.into_inner());
                    c = g;
                    if t.timed_out() {
                        log::warn!("checkpoint waits for old buffer files to be freed ({} MiB)", c.1 >> 20);
                    }
                }
                c.0 += 1;
                c.1 += bytes;
                bytes
            }
            Garbage::Bits(_) => 0,
        };
        // If the reclaimer's thread is gone the item is freed right here.
        let sent = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send((garbage, bytes));
        if let Err(e) = sent {
            let (garbage, bytes) = e.0;
            let file = matches!(garbage, Garbage::File(_));
            drop(garbage);
            if file {
                self.pending.release(bytes);
            }
        }
    }

    /// Empties `file`, the buffer `buf` of `size` bytes. Callers hold every I/O on it stopped.
    pub fn empty(&self, file: &File, buf: &Buffer, size: u64) -> io::Result<()> {
        if buf.block_device {
            return Ok(());
        }
        match swap_fresh(file, buf, size) {
            Ok(old) => {
                self.dispose(Garbage::File(old));
                Ok(())
            }
            Err(e) => {
                if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    log::warn!(
                        "cannot replace buffer {} by a fresh file ({e}); emptying it in place, which \
                         takes time in proportion to its content",
                        buf.path.display()
                    );
                }
                file.set_len(0)?;
                file.set_len(size)
            }
        }
    }
}

/// Renames a fresh sparse file of `size` bytes over the buffer and makes `file`'s descriptor
/// refer to it; returns a descriptor of the old file, for the reclaimer to close.
fn swap_fresh(file: &File, buf: &Buffer, size: u64) -> io::Result<File> {
    let current = std::fs::metadata(&buf.path)?;
    let ours = file.metadata()?;
    if (current.dev(), current.ino()) != (ours.dev(), ours.ino()) {
        // Someone moved or replaced the file: renaming over the path would destroy theirs.
        return Err(io::Error::other("the path no longer names the open buffer"));
    }
    let name = buf.path.file_name().unwrap_or_default().to_string_lossy();
    let next = buf.path.with_file_name(format!(".{name}.next"));
    // A leftover of a crash between create and rename.
    let _ = std::fs::remove_file(&next);
    // The fresh file keeps the cache mode of the descriptor it replaces (O_DIRECT with
    // `--direct`): dup3 carries the fresh file's flags onto the buffer's descriptor.
    // SAFETY: F_GETFL on a descriptor `file` keeps open; no memory is involved.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    let direct = if flags >= 0 { flags & libc::O_DIRECT } else { 0 };
    let fresh = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(ours.mode() & 0o777)
        .custom_flags(direct)
        .open(&next)?;
    if let Err(e) = fresh.set_len(size) {
        let _ = std::fs::remove_file(&next);
        return Err(e);
    }
    // Take the lock on the fresh file before it becomes the buffer, and let the old lock go
    // (it would keep the old file alive).
    let mut lock = buf.lock.lock().unwrap_or_else(|e| e.into_inner());
    let new_lock = match ImageLock::acquire(&next, true) {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&next);
            return Err(io::Error::other(e.to_string()));
        }
    };
    let old = file.try_clone()?;
    if let Err(e) = std::fs::rename(&next, &buf.path) {
        let _ = std::fs::remove_file(&next);
        return Err(e);
    }
    // SAFETY: both descriptors are open and owned by live `File`s for the whole call; dup3
    // atomically makes `file`'s descriptor number refer to the fresh file's description, so
    // `file` stays a valid owner of its descriptor. No I/O uses it meanwhile (callers hold the
    // buffer quiesced).
    let rc = unsafe { libc::dup3(fresh.as_raw_fd(), file.as_raw_fd(), libc::O_CLOEXEC) };
    if rc < 0 {
        // The path names the fresh (empty) file, the descriptor still the old one: empty the
        // old one in place (the caller's fallback) and keep going.
        return Err(io::Error::last_os_error());
    }
    *lock = Some(new_lock);
    Ok(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_swap_empties_the_buffer_behind_the_same_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("active.img");
        std::fs::write(&p, vec![0xabu8; 1 << 20]).unwrap();
        let file = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let fd = file.as_raw_fd();
        let buf = Buffer::new(&file, &p).unwrap();
        let r = Reclaimer::new().unwrap();
        r.empty(&file, &buf, 1 << 20).unwrap();
        assert_eq!(file.as_raw_fd(), fd);
        let mut b = vec![1u8; 4096];
        file.read_exact_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 0), "old content visible");
        assert_eq!(std::fs::metadata(&p).unwrap().ino(), file.metadata().unwrap().ino());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        file.write_all_at(b"new", 0).unwrap();
        assert_eq!(&std::fs::read(&p).unwrap()[..3], b"new");
        // The lock moved to the fresh file: another writer is still refused.
        assert!(ImageLock::acquire(&p, true).is_err());
        // No temporary file is left next to it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
