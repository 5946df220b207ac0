//! Helpers for tests that run a replication pair: QMP shorthands, qemu-nbd, disks.
#![allow(dead_code)]

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::*;

pub const MIB: u64 = 1 << 20;

pub fn qmp(s: &Server, cmd: &str, args: Value) -> Result<Value, String> {
    let args: Map<String, Value> = args.as_object().cloned().unwrap_or_default();
    s.qmp().execute(cmd, args).expect("qmp io")
}

/// qemu-nbd serving `disk` on a UNIX socket (export "exp"); killed on drop.
pub struct QemuNbd {
    pub child: Child,
    pub socket: PathBuf,
}

impl QemuNbd {
    pub fn start(disk: &Path, socket: &Path) -> QemuNbd {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-x", "exp", "-t", "-e", "8", "--cache=writeback", "-k"])
            .arg(socket)
            .arg(disk)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-nbd");
        // qemu-nbd has no readiness signal but its socket; wait for it to accept.
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, socket: socket.to_path_buf() }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///exp?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_primary(dir: tempfile::TempDir, disk: &Path, size: u64, extra: &[&str]) -> Server {
    let d = disk.display().to_string();
    let size = size.to_string();
    let mut args = vec!["--replication", "primary", "--disk", &d, "--size", &size, "--num-queues", "2"];
    args.extend_from_slice(extra);
    Server::start(dir, &args)
}

pub fn make_disk(path: &Path, size: u64, fill: Option<u8>) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    if let Some(b) = fill {
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![b; size as usize], 0).unwrap();
    }
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // Polling query-replication: the state has no event for "nothing in flight".
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn synced(s: &Server) -> bool {
    let q = qmp(s, "query-replication", json!({})).unwrap();
    q["dirty-bytes"] == 0 && q["link"]["connected"] == true && q["link"]["inflight"] == 0
}

pub fn same(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("disks differ first at byte {i}");
    }
}

/// A colo-blk secondary in `dir` (stage none), its disk and its NBD socket.
pub fn colo_secondary(dir: &Path, size: &str, export: Option<&str>) -> (Server, PathBuf, PathBuf) {
    colo_secondary_with(dir, size, export, &[])
}

/// [`colo_secondary`] with extra options.
pub fn colo_secondary_with(dir: &Path, size: &str, export: Option<&str>, extra: &[&str]) -> (Server, PathBuf, PathBuf) {
    let (sdisk, nbd) = (dir.join("sec.img"), dir.join("nbd.sock"));
    let (a, h) = (dir.join("a.img"), dir.join("h.img"));
    let listen = format!("unix:{}", nbd.display());
    let (sd, ad, hd) = (sdisk.display().to_string(), a.display().to_string(), h.display().to_string());
    let mut args = vec![
        "--replication",
        "secondary",
        "--disk",
        &sd,
        "--size",
        size,
        "--active",
        &ad,
        "--hidden",
        &hd,
        "--nbd-listen",
        &listen,
    ];
    if let Some(e) = export {
        args.extend_from_slice(&["--nbd-export", e]);
    }
    args.extend_from_slice(extra);
    (Server::start(tempfile::tempdir().unwrap(), &args), sdisk, nbd)
}

/// What QEMU does at every VM stop: flush the hook node.
pub fn hook_flush(hook: &Path) {
    let uri = format!("nbd+unix:///hook?socket={}", hook.display());
    let out = std::process::Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "flush"]).output().expect("qemu-io");
    assert!(out.status.success(), "qemu-io flush: {}", String::from_utf8_lossy(&out.stderr));
}

/// A UNIX-socket proxy between the primary and the secondary's NBD server; `cut` severs
/// every connection through it (the primary then reconnects through it again); `hang`
/// stops every byte in both directions and closes nothing, as a network partition does
/// (no FIN, no RST), until `heal`.
pub struct Proxy {
    pub path: PathBuf,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    hung: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

/// Blocks while the proxy is hung.
fn pass(hung: &(Mutex<bool>, std::sync::Condvar)) {
    let mut h = hung.0.lock().unwrap();
    while *h {
        h = hung.1.wait(h).unwrap();
    }
}

impl Proxy {
    pub fn start(path: &Path, target: PathBuf) -> Proxy {
        let l = UnixListener::bind(path).unwrap();
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let hung: Arc<(Mutex<bool>, std::sync::Condvar)> = Arc::default();
        let (c2, h2) = (conns.clone(), hung.clone());
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(client) = client else { return };
                // A partitioned network lets nobody through, new connections included.
                pass(&h2);
                let Ok(server) = UnixStream::connect(&target) else { continue };
                c2.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let h = h2.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            pass(&h);
                            if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { path: path.to_path_buf(), conns, hung }
    }

    /// Stops forwarding anything, closing nothing.
    pub fn hang(&self) {
        *self.hung.0.lock().unwrap() = true;
    }

    /// Forwards again (connections the primary gave up on meanwhile end as it closes them).
    pub fn heal(&self) {
        *self.hung.0.lock().unwrap() = false;
        self.hung.1.notify_all();
    }

    /// Cuts every connection through the proxy; returns how many there were.
    pub fn cut(&self) -> usize {
        let conns: Vec<_> = self.conns.lock().unwrap().drain(..).collect();
        for c in &conns {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        conns.len()
    }
}
