//! A thin vhost-user message relay between the frontend and vhost-user-backend's handler,
//! adding what that handler cannot do: inflight I/O tracking.
//!
//! vhost-user-backend 0.24 answers GET_INFLIGHT_FD / SET_INFLIGHT_FD with an error and its
//! request handler is private, so colo-blk keeps the whole rust-vmm stack and relays the
//! control connection through this module instead: every message passes unchanged (with its
//! file descriptors) except
//! - the GET_PROTOCOL_FEATURES answer, which gains INFLIGHT_SHMFD;
//! - SET_PROTOCOL_FEATURES, which loses it again (the handler does not know it);
//! - GET_INFLIGHT_FD / SET_INFLIGHT_FD, answered here: the region is created or mapped and
//!   given to the queue workers through [`InflightSlot`].
//!
//! Only control messages go through here; the data path (rings in shared memory, kick and
//! call eventfds) never does.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::inflight::InflightRegion;

const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const F_INFLIGHT_SHMFD: u64 = 1 << 12;
const F_REPLY_ACK: u64 = 1 << 3;
const HDR_VERSION: u32 = 0x1;
const HDR_REPLY: u32 = 0x4;
const HDR_NEED_REPLY: u32 = 0x8;
/// Largest message accepted (the biggest real one, a full memory table, is ~ 300 bytes).
const MAX_PAYLOAD: usize = 64 << 10;
const MAX_FDS: usize = 32;
/// Payload of the inflight messages: u64 mmap_size, u64 mmap_offset, u16 num_queues,
/// u16 queue_size (QEMU pads the struct to 24 bytes).
const INFLIGHT_MIN: usize = 20;

/// The region the workers of one connection use (set by the relay before the rings start).
pub type InflightSlot = Arc<Mutex<Option<Arc<InflightRegion>>>>;

/// Shape of the device, to validate the frontend's requests against.
#[derive(Debug, Clone, Copy)]
pub struct DeviceShape {
    /// Queues the device offers.
    pub num_queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
}

/// One message: header fields, payload, attached descriptors (owned).
struct Message {
    request: u32,
    flags: u32,
    payload: Vec<u8>,
    fds: Vec<File>,
}

fn read_message(s: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; 12];
    let mut got = 0;
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut fds = Vec::new();
    while got < hdr.len() {
        let mut iov =
            [libc::iovec { iov_base: hdr[got..].as_mut_ptr() as *mut libc::c_void, iov_len: hdr.len() - got }];
        // SAFETY: the iovec points into `hdr`, alive for the call; received descriptors are
        // taken over by `File`s right below.
        let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw_fds) }.map_err(io::Error::from)?;
        for &fd in raw_fds.iter().take(nfds) {
            // SAFETY: a fresh descriptor the kernel just gave us.
            fds.push(unsafe { File::from_raw_fd(fd) });
        }
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
        got += n;
    }
    let request = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let flags = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("vhost-user message of {size} bytes")));
    }
    let mut payload = vec![0u8; size];
    (&*s).read_exact(&mut payload)?;
    Ok(Some(Message { request, flags, payload, fds }))
}

fn write_message(s: &UnixStream, m: &Message) -> io::Result<()> {
    let mut buf = Vec::with_capacity(12 + m.payload.len());
    buf.extend_from_slice(&m.request.to_le_bytes());
    buf.extend_from_slice(&m.flags.to_le_bytes());
    buf.extend_from_slice(&(m.payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&m.payload);
    let fds: Vec<RawFd> = m.fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    let sent = s.send_with_fds(&[&buf[..]], &fds).map_err(io::Error::from)?;
    if sent < buf.len() {
        // The descriptors went with the first part; the rest is plain bytes.
        (&*s).write_all(&buf[sent..])?;
    }
    Ok(())
}

fn reply(request: u32, payload: Vec<u8>, fds: Vec<File>) -> Message {
    Message { request, flags: HDR_VERSION | HDR_REPLY, payload, fds }
}

/// Relays one connection until either side closes it. `frontend` is the VMM's connection,
/// `backend` the handler's.
pub fn relay(frontend: UnixStream, backend: UnixStream, shape: DeviceShape, slot: InflightSlot) -> io::Result<()> {
    let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
    let (b_read, f_write) = (backend.try_clone()?, to_frontend.clone());
    // Backend -> frontend: answers (and the handler's own messages), patched where needed.
    let answers = std::thread::Builder::new().name("vhost-relay".into()).spawn(move || -> io::Result<()> {
        let r = (|| {
            while let Some(mut m) = read_message(&b_read)? {
                if m.request == GET_PROTOCOL_FEATURES && m.flags & HDR_REPLY != 0 && m.payload.len() == 8 {
                    let v = u64::from_le_bytes(m.payload[..8].try_into().unwrap_or_default()) | F_INFLIGHT_SHMFD;
                    m.payload = v.to_le_bytes().to_vec();
                }
                write_message(&f_write.lock().unwrap_or_else(|e| e.into_inner()), &m)?;
            }
            Ok(())
        })();
        // The handler ended the connection: end the frontend's side too.
        let _ = f_write.lock().unwrap_or_else(|e| e.into_inner()).shutdown(std::net::Shutdown::Both);
        r
    })?;
    let mut reply_ack = false;
    let result = (|| -> io::Result<()> {
        while let Some(mut m) = read_message(&frontend)? {
            match m.request {
                GET_INFLIGHT_FD | SET_INFLIGHT_FD => {
                    let answer = inflight_message(&mut m, shape, &slot);
                    let needs_ack = m.request == SET_INFLIGHT_FD && reply_ack && m.flags & HDR_NEED_REPLY != 0;
                    let out = match (m.request, answer) {
                        (GET_INFLIGHT_FD, Ok(Some(r))) => Some(r),
                        (GET_INFLIGHT_FD, Ok(None) | Err(_)) => {
                            // No region: a zero-sized answer without a descriptor tells the
                            // frontend inflight tracking is unavailable.
                            Some(reply(GET_INFLIGHT_FD, vec![0u8; m.payload.len().max(24)], Vec::new()))
                        }
                        (_, r) if needs_ack => {
                            let code: u64 = if r.is_ok() { 0 } else { 1 };
                            Some(reply(SET_INFLIGHT_FD, code.to_le_bytes().to_vec(), Vec::new()))
                        }
                        _ => None,
                    };
                    if let Some(out) = out {
                        write_message(&to_frontend.lock().unwrap_or_else(|e| e.into_inner()), &out)?;
                    }
                    continue;
                }
                SET_PROTOCOL_FEATURES if m.payload.len() == 8 => {
                    let v = u64::from_le_bytes(m.payload[..8].try_into().unwrap_or_default());
                    reply_ack = v & F_REPLY_ACK != 0;
                    m.payload = (v & !F_INFLIGHT_SHMFD).to_le_bytes().to_vec();
                }
                _ => {}
            }
            write_message(&backend, &m)?;
        }
        Ok(())
    })();
    // Either side ended: end the other, so both threads and the handler return.
    let _ = backend.shutdown(std::net::Shutdown::Both);
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = answers.join();
    result
}

/// Handles GET/SET_INFLIGHT_FD; returns the answer for GET.
fn inflight_message(m: &mut Message, shape: DeviceShape, slot: &InflightSlot) -> io::Result<Option<Message>> {
    if m.payload.len() < INFLIGHT_MIN {
        log::warn!("vhost-user: inflight message of {} bytes refused", m.payload.len());
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let p = &m.payload;
    let size = u64::from_le_bytes(p[0..8].try_into().unwrap_or_default());
    let offset = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
    let num_queues = u16::from_le_bytes([p[16], p[17]]);
    let queue_size = u16::from_le_bytes([p[18], p[19]]);
    if num_queues == 0 || num_queues > shape.num_queues || queue_size == 0 || queue_size > shape.queue_size {
        log::warn!("vhost-user: inflight region for {num_queues} queues of {queue_size} refused");
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let region = if m.request == GET_INFLIGHT_FD {
        InflightRegion::create(num_queues, queue_size)
    } else {
        let Some(file) = m.fds.pop() else {
            log::warn!("vhost-user: SET_INFLIGHT_FD without a descriptor");
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        InflightRegion::open(file, size, offset, num_queues, queue_size)
    };
    let region = match region {
        Ok(r) => Arc::new(r),
        Err(e) => {
            log::warn!("vhost-user: inflight region unusable: {e}");
            return Err(e);
        }
    };
    log::info!(
        "inflight tracking: {} region for {num_queues} queues of {queue_size} ({} bytes)",
        if m.request == GET_INFLIGHT_FD { "new" } else { "restored" },
        region.len()
    );
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(region.clone());
    if m.request != GET_INFLIGHT_FD {
        return Ok(None);
    }
    let mut payload = vec![0u8; m.payload.len()];
    payload[0..8].copy_from_slice(&(region.len() as u64).to_le_bytes());
    payload[16..18].copy_from_slice(&num_queues.to_le_bytes());
    payload[18..20].copy_from_slice(&queue_size.to_le_bytes());
    Ok(Some(reply(GET_INFLIGHT_FD, payload, vec![region.file().try_clone()?])))
}
