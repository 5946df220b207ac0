//! Hostile and scripted NBD peers for process-level tests: raw wire requests, idle and
//! non-reading clients, a server that goes silent after STARTTLS, TLS credentials, and the
//! daemon's resident memory.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colo_blk::nbd::transport::Stream;
use colo_blk::nbd::wire::*;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in QEMU's layout:
/// `srv/` (ca-cert, server-cert, server-key) and `cli/` (ca-cert, client-cert, client-key).
/// `rogue/` holds a client certificate from another CA.
pub fn make_creds(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let script = r#"
set -e
ca() { openssl req -x509 -newkey rsa:2048 -nodes -keyout $1-key.pem -out $1-cert.pem -days 2 -subj "/CN=$1" 2>/dev/null; }
leaf() { # NAME CA EXT
  openssl req -newkey rsa:2048 -nodes -keyout $1-key.pem -out $1.csr -subj "/CN=$1" 2>/dev/null
  printf "$3" > $1.ext
  openssl x509 -req -in $1.csr -CA $2-cert.pem -CAkey $2-key.pem -CAcreateserial -out $1-cert.pem -days 2 -extfile $1.ext 2>/dev/null
}
ca ca; ca other
leaf server ca "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
leaf client ca "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
leaf intruder other "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
mkdir srv cli rogue
cp ca-cert.pem server-cert.pem server-key.pem srv/
cp ca-cert.pem client-cert.pem client-key.pem cli/
cp ca-cert.pem rogue/; cp intruder-cert.pem rogue/client-cert.pem; cp intruder-key.pem rogue/client-key.pem
"#;
    let out = Command::new("bash").arg("-c").arg(script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    (dir.join("srv"), dir.join("cli"), dir.join("rogue"))
}

/// Resident memory of process `pid` in bytes (VmRSS).
pub fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Sends one transmission request (and its payload) on a raw stream.
pub fn send_request(s: &mut impl Write, cmd: u16, handle: u64, offset: u64, length: u32, payload: &[u8]) {
    let req = Request { flags: 0, cmd, handle, offset, length };
    s.write_all(&req.encode()).unwrap();
    if !payload.is_empty() {
        s.write_all(payload).unwrap();
    }
}

/// Reads one simple reply header: (error, handle).
pub fn read_reply(s: &mut impl Read) -> (u32, u64) {
    let mut b = [0u8; 16];
    s.read_exact(&mut b).unwrap();
    assert_eq!(u32::from_be_bytes(b[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
    (u32::from_be_bytes(b[4..8].try_into().unwrap()), u64::from_be_bytes(b[8..16].try_into().unwrap()))
}

/// Negotiates with colo-blk's own client code (GO, and the COLO option when offered) and
/// returns the stream in transmission phase.
pub fn nbd_connect(uri: &str) -> (Stream, colo_blk::nbd::client::ExportInfo) {
    let uri: colo_blk::nbd::client::NbdUri = uri.parse().unwrap();
    colo_blk::nbd::client::connect(&uri, Duration::from_secs(10), None).expect("NBD connect")
}

/// Waits until the peer of `s` hung up (without reading anything from it).
pub fn wait_hung_up(s: &Stream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let fd = match s {
        Stream::Tcp(t) => std::os::fd::AsRawFd::as_raw_fd(t),
        Stream::Unix(u) => std::os::fd::AsRawFd::as_raw_fd(u),
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd on an open socket owned by the caller.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return true;
        }
        if left.is_zero() {
            return false;
        }
    }
}

/// A hostile NBD server on 127.0.0.1 for one connection: it greets, acknowledges STARTTLS,
/// completes the TLS handshake with `srv` credentials, then never says anything again (it
/// keeps the session open until dropped). Returns the port.
pub struct SilentTlsServer {
    pub port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl SilentTlsServer {
    pub fn start(srv: &Path) -> SilentTlsServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let cfg = colo_blk::nbd::tls::server_config(srv).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let mut hello = Vec::new();
                hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
                hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
                hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
                if c.write_all(&hello).is_err() {
                    continue;
                }
                let mut flags = [0u8; 4];
                let mut opt = [0u8; 16];
                if c.read_exact(&mut flags).is_err() || c.read_exact(&mut opt).is_err() {
                    continue;
                }
                if c.write_all(&option_reply(OPT_STARTTLS, REP_ACK, &[])).is_err() {
                    continue;
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                if let Ok(plain) = colo_blk::nbd::tls::accept(Stream::Tcp(c), cfg.clone(), deadline) {
                    held.push(plain);
                }
            }
        });
        SilentTlsServer { port, stop }
    }
}

impl Drop for SilentTlsServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// qemu-io against 127.0.0.1:`port`, with QEMU's `tls-creds-x509` when `creds` is given.
pub fn qemu_io_tcp(port: u16, creds: Option<&Path>, cmd: &str) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    let tls = match creds {
        Some(d) => {
            c.arg("--object").arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", d.display()));
            ",tls-creds=tls0"
        }
        None => "",
    };
    c.arg("--image-opts")
        .arg(format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port}{tls}"))
        .args(["-c", cmd]);
    let out = c.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("failed"), text)
}
