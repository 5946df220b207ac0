//! qcow2 images, through the `imago` crate.
//!
//! imago owns the format: it parses the header, resolves a guest range through the L1/L2
//! tables and the backing chain, allocates clusters (with copy-on-write from the backing
//! image), keeps the refcounts and orders metadata writes. colo-blk keeps the data path:
//! each worker asks imago where a request's bytes live (`FormatAccess::get_mapping`) and
//! - `Raw` (the bytes sit at a host offset of one file of the chain): reads, and writes to
//!   writable clusters, go straight to that file on the worker's own io_uring, zero-copy
//!   into guest memory ([`queue::Qcow2Queue`]);
//! - `Zero` (unallocated without backing data, or a zero cluster): the worker fills the
//!   guest buffer;
//! - anything else — a write that needs an allocation or copy-on-write, a compressed
//!   cluster, discard, write-zeroes, flush, resize — goes to the image's metadata thread
//!   ([`metadata`]), which runs it through imago.
//!
//! What imago is not used for: its own file driver (colo-blk's [`storage::ImageFile`] lets
//! the rings address chain files by index) and its data I/O on the fast path.

mod data;
mod metadata;
mod queue;
mod storage;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder};

use super::raw::EngineKind;
use super::{BlockDevice, BlockError, BlockQueue, ResizeError, WorkerCompletions};
use crate::logging::limit::LogLimit;
use metadata::{Job, JobOp};
pub use storage::ImageFile;
use storage::{ChainFiles, ChainGate};

/// Threads running imago jobs per image: allocating writes to different L2 tables (512 MiB
/// of guest space each with 64 KiB clusters) proceed in parallel.
const METADATA_THREADS: usize = 4;

/// How to open a qcow2 image.
#[derive(Debug, Clone)]
pub struct Qcow2Options {
    /// The top image.
    pub path: PathBuf,
    /// Open read-only (the whole chain).
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT) on every file of the chain.
    pub direct: bool,
    /// Logical block size the virtual size must be a multiple of.
    pub block_size: u32,
    /// The engine the workers' fast path uses.
    pub engine: EngineKind,
}

/// The state shared by the device, its queues and its metadata thread.
#[derive(Debug)]
pub(crate) struct Image {
    access: RwLock<FormatAccess<ImageFile>>,
    path: PathBuf,
    size: AtomicU64,
    /// Fast-path requests holding a mapping (host offsets in flight).
    mapped: AtomicU64,
    /// Jobs that move or free clusters and are waiting or running: while non-zero, workers
    /// divert new requests to the metadata thread instead of mapping them.
    exclusive: AtomicU32,
    /// Bounds the log lines failing guest requests can cause.
    errors: LogLimit,
    /// imago panicked on this image: nothing is served from it any more.
    broken: AtomicBool,
    /// The qcow2 version (2 has no zero clusters).
    version: u32,
}

/// Held while the metadata thread runs a job that needs the mappings stable.
struct Quiesced<'a>(&'a Image);

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        self.0.exclusive.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Image {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release)
    }

    /// A worker is about to map a request: false when it must go to the metadata thread.
    fn enter(&self) -> bool {
        self.mapped.fetch_add(1, Ordering::SeqCst);
        if self.exclusive.load(Ordering::SeqCst) != 0 {
            self.leave();
            return false;
        }
        true
    }

    /// A request that [`Image::enter`]ed has completed.
    fn leave(&self) {
        self.mapped.fetch_sub(1, Ordering::SeqCst);
    }

    /// Stops new mappings and waits (up to `deadline`) until no request holds one.
    fn quiesce_mappings(&self, deadline: Duration) -> Option<Quiesced<'_>> {
        self.exclusive.fetch_add(1, Ordering::SeqCst);
        let guard = Quiesced(self);
        let end = Instant::now() + deadline;
        let mut pause = Duration::from_micros(20);
        while self.mapped.load(Ordering::SeqCst) != 0 {
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
        Some(guard)
    }

    /// Runs `f` on the image under the shared lock. A panic inside imago (an image damaged
    /// in a way it does not expect) fails this call and every later one with `EIO` — as QEMU
    /// stops using an image it found corrupt — instead of taking the daemon down.
    fn with<T>(&self, f: impl FnOnce(&FormatAccess<ImageFile>) -> io::Result<T>) -> io::Result<T> {
        self.guarded(|| f(&self.access.read().unwrap_or_else(|p| p.into_inner())))
    }

    /// [`Image::with`] under the exclusive lock (for calls that may move clusters).
    fn with_mut<T>(&self, f: impl FnOnce(&mut FormatAccess<ImageFile>) -> io::Result<T>) -> io::Result<T> {
        self.guarded(|| f(&mut self.access.write().unwrap_or_else(|p| p.into_inner())))
    }

    fn guarded<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        if self.broken.load(Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(_) => {
                if !self.broken.swap(true, Ordering::AcqRel) {
                    log::error!(
                        "{}: the qcow2 driver failed on this image (see the panic message above); \
                         every further request fails with an I/O error. Check it with `qemu-img check`",
                        self.path.display()
                    );
                }
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
        }
    }

    fn log_error(&self, what: &str, offset: u64, e: &io::Error) {
        if self.errors.allow() {
            log::error!("{}: qcow2 {what} at {offset} failed: {e}", self.path.display());
        }
    }
}

/// A qcow2 image (with its backing chain) as a block device.
#[derive(Debug)]
pub struct Qcow2Disk {
    image: Arc<Image>,
    /// The chain's files, in the rings' registered-file order (0 = the top image).
    files: Vec<Arc<File>>,
    chain: Vec<(PathBuf, bool)>,
    /// One channel per metadata thread.
    jobs: Mutex<Vec<Sender<Job>>>,
    read_only: bool,
    direct: bool,
    mem_align: usize,
    engine: EngineKind,
    cluster_size: u64,
}

impl Qcow2Disk {
    /// Opens the image and its backing chain (read-only below the top, as QEMU does) and
    /// starts its metadata thread.
    pub fn open(opts: &Qcow2Options) -> Result<Self, BlockError> {
        let path_str = opts.path.display().to_string();
        let open_err = |source| BlockError::Open { path: path_str.clone(), source };
        if !opts.path.exists() {
            return Err(BlockError::Refused(format!(
                "{path_str} does not exist; create a qcow2 image with `qemu-img create -f qcow2 {path_str} SIZE`"
            )));
        }
        let header = Header::read(&opts.path).map_err(open_err)?;
        if header.crypt_method != 0 {
            return Err(BlockError::Refused(format!(
                "{path_str} is an encrypted qcow2 image (crypt method {}); colo-blk cannot decrypt it: \
                 serve it with qemu-storage-daemon or convert it with `qemu-img convert`",
                header.crypt_method
            )));
        }
        let files = ChainFiles::default();
        let mut gate = ChainGate { files: files.clone(), direct: opts.direct };
        let top = files.open(&opts.path, !opts.read_only, opts.direct).map_err(open_err)?;
        let qcow2 = Qcow2::<ImageFile>::builder(top)
            .write(!opts.read_only)
            .open(gate.clone())
            .map_err(|e| BlockError::Refused(format!("{path_str} cannot be opened as qcow2: {e}")))?;
        // Implicit opens above went through `gate` by value; make sure nothing is left open
        // that the chain did not take (none today, but the gate is the only opener).
        let _ = &mut gate;
        let cluster_size = header.cluster_size;
        let access = FormatAccess::new(qcow2);
        let size = access.size();
        if size == 0 || size % u64::from(opts.block_size) != 0 {
            return Err(BlockError::BadSize { path: path_str, size, block_size: opts.block_size });
        }
        let mem_align = access.mem_align();
        let image = Arc::new(Image {
            access: RwLock::new(access),
            path: opts.path.clone(),
            size: AtomicU64::new(size),
            mapped: AtomicU64::new(0),
            exclusive: AtomicU32::new(0),
            errors: LogLimit::new(),
            broken: AtomicBool::new(false),
            version: header.version,
        });
        let mut senders = Vec::with_capacity(METADATA_THREADS);
        for i in 0..METADATA_THREADS {
            let (tx, rx) = channel();
            let thread_image = image.clone();
            std::thread::Builder::new()
                .name(format!("qcow2-meta-{i}"))
                .spawn(move || metadata::run(thread_image, rx))
                .map_err(open_err)?;
            senders.push(tx);
        }
        Ok(Qcow2Disk {
            image,
            files: files.files(),
            chain: files.paths(),
            jobs: Mutex::new(senders),
            read_only: opts.read_only,
            direct: opts.direct,
            mem_align,
            engine: opts.engine,
            cluster_size,
        })
    }

    /// The files below the top image (backing chain, external data file): what must be
    /// locked for reading while the image is served.
    pub fn dependencies(&self) -> Vec<PathBuf> {
        self.chain.iter().skip(1).map(|(p, _)| p.clone()).collect()
    }

    /// The image's bytes by guest offset, for the replication paths.
    pub fn data(&self) -> Arc<dyn super::image::ImageData> {
        Arc::new(data::Qcow2Data(self.image.clone()))
    }

    fn send(&self, job: Job) -> Result<(), ()> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.first().ok_or(())?.send(job).map_err(|_| ())
    }
}

/// The files below the top image `path` names (backing chain, external data file), found by
/// opening the chain read-only; for start-up checks before anything is locked or created.
pub fn chain_of(path: &Path) -> Result<Vec<PathBuf>, String> {
    let files = ChainFiles::default();
    let gate = ChainGate { files: files.clone(), direct: false };
    let top = files.open(path, false, false).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let _read_only_image = Qcow2::<ImageFile>::builder(top)
        .write(false)
        .open(gate)
        .map_err(|e| format!("{} cannot be opened as qcow2: {e}", path.display()))?;
    Ok(files.paths().into_iter().skip(1).map(|(p, _)| p).collect())
}

/// The header fields colo-blk looks at itself (imago keeps its parsed header private).
struct Header {
    version: u32,
    cluster_size: u64,
    /// 0: none; 1: AES (legacy); 2: LUKS.
    crypt_method: u32,
}

impl Header {
    fn read(path: &Path) -> io::Result<Header> {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 36];
        File::open(path)?.read_exact_at(&mut b, 0)?;
        let be32 = |at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let bits = be32(20);
        if !(9..=21).contains(&bits) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("cluster_bits {bits} out of range")));
        }
        Ok(Header { version: be32(4), cluster_size: 1 << bits, crypt_method: be32(32) })
    }
}

impl BlockDevice for Qcow2Disk {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn open_queue(&self, depth: u32, completions: &Arc<WorkerCompletions>) -> Result<Box<dyn BlockQueue>, BlockError> {
        let q = queue::Qcow2Queue::new(
            completions,
            self.image.clone(),
            self.files.clone(),
            self.jobs.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            self.engine,
            depth,
        )?;
        if self.direct {
            Ok(Box::new(super::bounce::BounceQueue::new(Box::new(q), self.mem_align.max(512))))
        } else {
            Ok(Box::new(q))
        }
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.image.with(|a| {
            a.flush()?;
            a.sync()
        })
    }

    fn describe(&self) -> String {
        let backing: Vec<String> = self.chain.iter().skip(1).map(|(p, _)| p.display().to_string()).collect();
        format!(
            "{} (qcow2, {} bytes, cluster {} KiB{}{}{})",
            self.image.path.display(),
            self.size(),
            self.cluster_size / 1024,
            if backing.is_empty() { String::new() } else { format!(", backing {}", backing.join(" <- ")) },
            if self.read_only { ", read-only" } else { "" },
            if self.direct { ", O_DIRECT" } else { "" }
        )
    }

    fn check_resize(&self) -> Result<(), ResizeError> {
        if self.read_only { Err(ResizeError::ReadOnly) } else { Ok(()) }
    }

    fn resize(&self, new_size: u64) -> Result<(), ResizeError> {
        self.check_resize()?;
        let failed = |source| ResizeError::Io { path: self.image.path.display().to_string(), source };
        let (tx, rx) = channel();
        self.send(Job { op: JobOp::Resize { size: new_size, reply: tx }, index: 0, done: None })
            .map_err(|()| failed(io::Error::other("the metadata thread is gone")))?;
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(r) => r.map_err(failed),
            Err(_) => Err(failed(io::Error::new(io::ErrorKind::TimedOut, "resize did not finish within 120 s"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path) -> Qcow2Disk {
        let path = dir.join("t.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg("1M")
            .status()
            .expect("qemu-img");
        assert!(st.success());
        Qcow2Disk::open(&Qcow2Options {
            path,
            read_only: false,
            direct: false,
            block_size: 512,
            engine: EngineKind::Sync,
        })
        .unwrap()
    }

    #[test]
    fn a_panic_in_the_driver_fails_requests_instead_of_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let disk = image(dir.path());
        assert_eq!(disk.image.with(|a| Ok(a.size())).unwrap(), 1 << 20);
        let r: io::Result<()> = disk.image.with(|_| panic!("a driver bug on a damaged image"));
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
        // From then on the image is not used any more.
        assert_eq!(disk.image.with(|a| Ok(a.size())).unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(disk.data().sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
    }
}
