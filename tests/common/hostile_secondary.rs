//! Hostile NBD peers for replication tests: a scripted NBD server that completes a real
//! fixed-newstyle handshake (so a colo-blk primary connects to it like to qemu-nbd) and then
//! misbehaves in transmission as the test asks — reads requests and never answers, or answers
//! writes late with an error. Every request it reads is reported to the test, so tests wait
//! for "the request arrived" instead of sleeping.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use colo_blk::nbd::wire::*;

/// What the server does with requests once the handshake is done.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Reads every request (and its payload) and never answers.
    Silent,
    /// Answers writes with NBD error `error` after `delay`; everything else at once with 0.
    WriteError { error: u32, delay: Duration },
}

/// One request the server read: (command, offset, length).
pub type Seen = (u16, u64, u32);

/// A scripted NBD server on a UNIX socket (export name ignored); stops on drop.
pub struct NbdPeer {
    pub path: PathBuf,
    seen: Mutex<mpsc::Receiver<Seen>>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
}

impl NbdPeer {
    /// Listens at `path`, serving an export of `size` bytes with `behaviour`.
    pub fn start(path: &Path, size: u64, behaviour: Behaviour) -> NbdPeer {
        let l = UnixListener::bind(path).unwrap();
        let (tx, rx) = mpsc::channel();
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let c2 = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                c2.lock().unwrap().push(s.try_clone().unwrap());
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ = serve(s, size, behaviour, tx);
                });
            }
        });
        NbdPeer { path: path.to_path_buf(), seen: Mutex::new(rx), conns }
    }

    /// The URI a primary uses for it.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///exp?socket={}", self.path.display())
    }

    /// Waits (bounded by `within`) for a request with command `cmd`; returns it.
    pub fn wait_request(&self, cmd: u16, within: Duration) -> Seen {
        let deadline = Instant::now() + within;
        let rx = self.seen.lock().unwrap();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(r) if r.0 == cmd => return r,
                Ok(_) => continue,
                Err(e) => panic!("the scripted NBD server got no command {cmd} within {within:?} ({e})"),
            }
        }
    }
}

impl Drop for NbdPeer {
    fn drop(&mut self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn u32_at(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn opt_reply(s: &mut UnixStream, opt: u32, rtype: u32, payload: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::new();
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&rtype.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b)
}

fn serve(mut s: UnixStream, size: u64, behaviour: Behaviour, tx: mpsc::Sender<Seen>) -> std::io::Result<()> {
    let tflags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags)?;
    let no_zeroes = u32_at(&cflags) & CLIENT_NO_ZEROES != 0;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let (opt, len) = (u32_at(&h[8..]), u32_at(&h[12..]));
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_GO => {
                let mut info = Vec::new();
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                opt_reply(&mut s, opt, REP_INFO, &info)?;
                opt_reply(&mut s, opt, REP_ACK, &[])?;
                break;
            }
            OPT_EXPORT_NAME => {
                s.write_all(&size.to_be_bytes())?;
                s.write_all(&tflags.to_be_bytes())?;
                if !no_zeroes {
                    s.write_all(&[0u8; 124])?;
                }
                break;
            }
            _ => opt_reply(&mut s, opt, REP_ERR_UNSUP, &[])?,
        }
    }
    let writer = Arc::new(Mutex::new(s.try_clone()?));
    loop {
        let mut r = [0u8; REQUEST_LEN];
        s.read_exact(&mut r)?;
        let cmd = u16::from_be_bytes([r[6], r[7]]);
        let handle = u64::from_be_bytes(r[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
        let len = u32_at(&r[24..]);
        if cmd == CMD_WRITE {
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload)?;
        }
        let _ = tx.send((cmd, offset, len));
        if cmd == CMD_DISC {
            return Ok(());
        }
        let (error, delay) = match behaviour {
            Behaviour::Silent => continue,
            Behaviour::WriteError { error, delay } if cmd == CMD_WRITE => (error, delay),
            Behaviour::WriteError { .. } => (0, Duration::ZERO),
        };
        let w = writer.clone();
        std::thread::spawn(move || {
            std::thread::sleep(delay); // the scripted peer's own lateness, not a test wait
            let mut b = Vec::new();
            b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            b.extend_from_slice(&error.to_be_bytes());
            b.extend_from_slice(&handle.to_be_bytes());
            let _ = w.lock().unwrap().write_all(&b);
        });
    }
}
