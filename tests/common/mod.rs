//! Test support: run `colo-blk serve` as a process and drive it through libblkio.
#![allow(dead_code)]

pub mod frontend;
pub mod hostile;
pub mod hostile_frontend;
pub mod hostile_secondary;
pub mod pair;

use std::io::{BufRead, BufReader};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

/// How long any single wait in the tests may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// A running `colo-blk serve` process.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub qmp: PathBuf,
    pub dir: tempfile::TempDir,
    lines: mpsc::Receiver<String>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts the daemon with `args` (socket and qmp paths are added) and waits until it
    /// logs that it is serving.
    pub fn start(dir: tempfile::TempDir, args: &[&str]) -> Server {
        let socket = dir.path().join("vhost.sock");
        Self::start_at(dir, &socket, args)
    }

    /// Like [`Server::start`] with a given vhost-user socket path (a restart on the same
    /// socket, as a frontend reconnecting expects).
    pub fn start_at(dir: tempfile::TempDir, socket: &Path, args: &[&str]) -> Server {
        let socket = socket.to_path_buf();
        let qmp = dir.path().join("qmp.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blk"))
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--qmp")
            .arg(&qmp)
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn colo-blk");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[colo-blk] {line}");
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut s = Server { child, socket, qmp, dir, lines: rx, log };
        s.wait_log("serving");
        s
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => continue,
                Err(e) => panic!("no log line with '{needle}' ({e}); log: {:?}", self.log.lock().unwrap()),
            }
        }
    }

    /// Waits for a log line containing any of `needles`.
    pub fn wait_log_any(&mut self, needles: &[&str]) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if needles.iter().any(|n| l.contains(n)) => return l,
                Ok(_) => continue,
                Err(e) => panic!("no log line with any of {needles:?} ({e}); log: {:?}", self.log.lock().unwrap()),
            }
        }
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(std::time::Instant::now() < deadline, "daemon did not exit");
            // Child exit has no pollable event without pidfd plumbing; a short poll is the
            // process-exit wait here.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A QMP session.
    pub fn qmp(&self) -> colo_blk::qmp::client::QmpClient {
        colo_blk::qmp::client::QmpClient::connect(&self.qmp).expect("qmp connect")
    }

    /// Runs a QMP command that must succeed.
    pub fn qmp_ok(&self, cmd: &str) -> serde_json::Value {
        self.qmp().execute(cmd, Default::default()).expect("qmp io").expect("qmp ok")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A libblkio `virtio-blk-vhost-user` connection with one mapped buffer region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub capacity: u64,
}

/// Size of the buffer region every client maps.
pub const REGION: usize = 32 << 20;

impl Client {
    pub fn connect(socket: &Path, num_queues: i32, read_only: bool) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio new");
        b.set_str("path", socket.to_str().unwrap()).unwrap();
        b.set_bool("read-only", read_only).unwrap();
        b.connect().expect("blkio connect");
        b.set_i32("num-queues", num_queues).unwrap();
        let out = b.start().expect("blkio start");
        let region = b.alloc_mem_region(REGION).expect("alloc region");
        b.map_mem_region(&region).expect("map region");
        let capacity = b.get_u64("capacity").unwrap();
        Client { blkio: b, queues: out.queues, region, capacity }
    }

    /// The buffer region as a byte slice (offset, len).
    pub fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.region.len);
        // SAFETY: the region is mapped for the client's lifetime and only used by this test.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    fn wait_one(q: &mut Blkioq) -> i32 {
        let mut c = [MaybeUninit::uninit()];
        let mut t = WAIT;
        let n = q.do_io(&mut c, 1, Some(&mut t), None).expect("do_io");
        assert_eq!(n, 1, "no completion within {WAIT:?}");
        // SAFETY: do_io initialised one completion.
        unsafe { c[0].assume_init_ref() }.ret
    }

    /// Writes `data` at `offset` through queue `qi`; returns libblkio's result (0 or -errno).
    pub fn write(&mut self, qi: usize, offset: u64, data: &[u8]) -> i32 {
        self.buf(0, data.len()).copy_from_slice(data);
        let ptr = self.region.addr as *const u8;
        let q = &mut self.queues[qi];
        q.write(offset, ptr, data.len(), 0, ReqFlags::empty());
        Self::wait_one(q)
    }

    /// Reads `len` bytes at `offset`; returns (result, data).
    pub fn read(&mut self, qi: usize, offset: u64, len: usize) -> (i32, Vec<u8>) {
        self.buf(0, len).fill(0xEE);
        let ptr = self.region.addr as *mut u8;
        let q = &mut self.queues[qi];
        q.read(offset, ptr, len, 0, ReqFlags::empty());
        let r = Self::wait_one(q);
        (r, self.buf(0, len).to_vec())
    }

    pub fn flush(&mut self, qi: usize) -> i32 {
        let q = &mut self.queues[qi];
        q.flush(0, ReqFlags::empty());
        Self::wait_one(q)
    }

    pub fn discard(&mut self, qi: usize, offset: u64, len: u64) -> i32 {
        let q = &mut self.queues[qi];
        q.discard(offset, len, 0, ReqFlags::empty());
        Self::wait_one(q)
    }

    pub fn write_zeroes(&mut self, qi: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        let q = &mut self.queues[qi];
        let flags = if unmap { ReqFlags::empty() } else { ReqFlags::NO_UNMAP };
        q.write_zeroes(offset, len, 0, flags);
        Self::wait_one(q)
    }

    /// Vectored write from `segs` (each segment placed at its own place in the region).
    pub fn writev(&mut self, qi: usize, offset: u64, segs: &[Vec<u8>]) -> i32 {
        let iov = self.place(segs);
        let q = &mut self.queues[qi];
        q.writev(offset, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::empty());
        Self::wait_one(q)
    }

    /// Vectored read into segments of the given lengths.
    pub fn readv(&mut self, qi: usize, offset: u64, lens: &[usize]) -> (i32, Vec<Vec<u8>>) {
        let segs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0xEEu8; l]).collect();
        let iov = self.place(&segs);
        let q = &mut self.queues[qi];
        q.readv(offset, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::empty());
        let r = Self::wait_one(q);
        let out = iov
            .iter()
            .map(|v| {
                // SAFETY: every iovec points into the mapped region.
                unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) }.to_vec()
            })
            .collect();
        (r, out)
    }

    /// Copies segments into the region, 1 MiB apart, returning their iovecs.
    fn place(&mut self, segs: &[Vec<u8>]) -> Vec<libc::iovec> {
        let mut iov = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let off = i * (1 << 20);
            self.buf(off, s.len()).copy_from_slice(s);
            iov.push(libc::iovec { iov_base: (self.region.addr + off) as *mut _, iov_len: s.len() });
        }
        iov
    }
}

/// A pattern that encodes the absolute byte offset and a sequence number in every 8 bytes,
/// so a misplaced or stale block is detected.
pub fn pattern(offset: u64, len: usize, seq: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut pos = offset;
    while v.len() < len {
        let word = (pos / 8) ^ (u64::from(seq) << 48);
        v.extend_from_slice(&word.to_le_bytes());
        pos += 8;
    }
    v.truncate(len);
    v
}

/// Reads a byte range of a file directly (to check what reached the disk).
pub fn file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset).unwrap();
    v
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Runs `colo-blk serve` on a fresh disk path with `args` added; it must refuse them with exit
/// code 2, a message naming `needle`, and without creating the disk.
pub fn expect_usage_error(args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("never.img");
    let out = Command::new(env!("CARGO_BIN_EXE_colo-blk"))
        .args(["serve", "--size", "8M", "--disk"])
        .arg(&disk)
        .arg("--socket")
        .arg(dir.path().join("x.sock"))
        .args(args)
        .output()
        .expect("run colo-blk");
    assert_eq!(out.status.code(), Some(2), "{args:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(needle),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!disk.exists(), "{args:?} created the disk");
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Stops `child` with SIGSTOP and returns once every one of its threads has stopped.
///
/// kill(2) only queues the signal: a multithreaded process keeps running on its other threads
/// until the thread that took the signal is scheduled and stops the group, which on a loaded
/// machine can take long enough for it to answer requests sent after the kill.
/// waitpid(WUNTRACED) reports the completed group stop.
pub fn freeze(child: &Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: signalling and waiting for a child process we own.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut status = 0;
        // SAFETY: as above; WNOHANG keeps the wait bounded by our deadline.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED | libc::WNOHANG) };
        if r == pid && libc::WIFSTOPPED(status) {
            return;
        }
        assert!(r == 0, "waitpid on a freezing child: {r} (status {status:#x})");
        assert!(std::time::Instant::now() < deadline, "the child did not stop");
        // No event other than the wait status exists for a group stop.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Resumes a child stopped by [`freeze`].
pub fn thaw(child: &Child) {
    // SAFETY: signalling a child process we own.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGCONT) }, 0);
}
