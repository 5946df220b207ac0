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
//!   given to the queue workers through [`InflightSlot`];
//! - SET_BACKEND_REQ_FD, passed on unchanged, but a descriptor of the channel is kept in a
//!   [`ChannelSlot`] (the handler's `Backend` cannot send CONFIG_CHANGE_MSG; see
//!   `vhost::notify`).
//!
//! Only control messages go through here; the data path (rings in shared memory, kick and
//! call eventfds) never does.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::inflight::InflightRegion;
use super::notify::ChannelSlot;
use crate::logging::limit::LogLimit;

// Message numbers and flags as the vhost crate defines them.
const GET_FEATURES: u32 = FrontendReq::GET_FEATURES as u32;
const SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
const SET_LOG_BASE: u32 = FrontendReq::SET_LOG_BASE as u32;
const SET_VRING_KICK: u32 = FrontendReq::SET_VRING_KICK as u32;
const SET_VRING_CALL: u32 = FrontendReq::SET_VRING_CALL as u32;
const SET_VRING_ERR: u32 = FrontendReq::SET_VRING_ERR as u32;
const ADD_MEM_REG: u32 = FrontendReq::ADD_MEM_REG as u32;
const GET_PROTOCOL_FEATURES: u32 = FrontendReq::GET_PROTOCOL_FEATURES as u32;
const SET_PROTOCOL_FEATURES: u32 = FrontendReq::SET_PROTOCOL_FEATURES as u32;
const GET_INFLIGHT_FD: u32 = FrontendReq::GET_INFLIGHT_FD as u32;
const SET_INFLIGHT_FD: u32 = FrontendReq::SET_INFLIGHT_FD as u32;
const SET_BACKEND_REQ_FD: u32 = FrontendReq::SET_BACKEND_REQ_FD as u32;
const F_BACKEND_REQ: u64 = VhostUserProtocolFeatures::BACKEND_REQ.bits();
const F_INFLIGHT_SHMFD: u64 = VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
const F_REPLY_ACK: u64 = VhostUserProtocolFeatures::REPLY_ACK.bits();
/// The protocol version carried in the header's low bits (the crate's `VERSION` is the mask).
const HDR_VERSION: u32 = 0x1;
const HDR_REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
const HDR_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();
/// A frontend that leaves answers unread this long (its socket buffer full) is dropped.
const FRONTEND_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The handler may sit in `stop_vring` for the drain timeout before reading again.
const HANDLER_WRITE_TIMEOUT: Duration = Duration::from_secs(super::config::DRAIN_TIMEOUT.as_secs() + 15);
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

/// What the answer thread does with the next GET_FEATURES answer of the handler.
enum Pending {
    /// The frontend asked: pass the answer on.
    Pass,
    /// The relay's barrier behind an inflight message: drop the handler's answer and send
    /// this one (if any) in its place, so answers keep the order of the requests.
    Answer(Option<Message>),
}

type PendingQueue = Arc<Mutex<VecDeque<Pending>>>;

/// A message the relay refuses to pass on; the connection is closed.
#[derive(Debug, thiserror::Error)]
#[error("vhost-user message {request} refused: {why}")]
struct Refused {
    request: u32,
    why: String,
}

fn refuse(request: u32, why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Refused { request, why })
}

fn shutdown_both(a: &UnixStream, b: &UnixStream) {
    let _ = a.shutdown(std::net::Shutdown::Both);
    let _ = b.shutdown(std::net::Shutdown::Both);
}

/// Relays one connection until either side closes it. `frontend` is the VMM's connection,
/// `backend` the handler's. Whichever side ends first ends the other (both sockets are shut
/// down), and no write waits longer than its timeout, so a frontend that stops reading
/// cannot wedge the relay and the handler against each other.
pub fn relay(frontend: UnixStream, backend: UnixStream, shape: DeviceShape, slot: InflightSlot) -> io::Result<()> {
    relay_with_channel(frontend, backend, shape, slot, Default::default())
}

/// [`relay`], keeping the backend request channel the frontend sets up in `channel`.
pub fn relay_with_channel(
    frontend: UnixStream,
    backend: UnixStream,
    shape: DeviceShape,
    slot: InflightSlot,
    channel: ChannelSlot,
) -> io::Result<()> {
    frontend.set_write_timeout(Some(FRONTEND_WRITE_TIMEOUT))?;
    backend.set_write_timeout(Some(HANDLER_WRITE_TIMEOUT))?;
    let pending: PendingQueue = Arc::default();
    let (b_read, f_write, b_shut) = (backend.try_clone()?, frontend.try_clone()?, backend.try_clone()?);
    let pending2 = pending.clone();
    // Backend -> frontend: answers (and the handler's own messages), patched where needed.
    // The only writer to the frontend, so answers leave in the order the handler sent them.
    let answers = std::thread::Builder::new().name("vhost-relay".into()).spawn(move || -> io::Result<()> {
        let r = (|| {
            while let Some(mut m) = read_message(&b_read)? {
                if m.request == GET_PROTOCOL_FEATURES && m.flags & HDR_REPLY != 0 && m.payload.len() == 8 {
                    let v = u64::from_le_bytes(m.payload[..8].try_into().unwrap_or_default()) | F_INFLIGHT_SHMFD;
                    m.payload = v.to_le_bytes().to_vec();
                }
                if m.request == GET_FEATURES && m.flags & HDR_REPLY != 0 {
                    let next = pending2.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                    match next {
                        Some(Pending::Answer(None)) => continue,
                        Some(Pending::Answer(Some(ours))) => m = ours,
                        Some(Pending::Pass) | None => {}
                    }
                }
                write_message(&f_write, &m)?;
            }
            Ok(())
        })();
        // The handler ended the connection, or the frontend stopped taking answers: end
        // both sides, which wakes the forwarding loop and the handler.
        shutdown_both(&f_write, &b_shut);
        r
    })?;
    let mut reply_ack = false;
    let mut backend_req = false;
    let inflight_log = LogLimit::new();
    let result = (|| -> io::Result<()> {
        while let Some(mut m) = read_message(&frontend)? {
            match m.request {
                GET_INFLIGHT_FD | SET_INFLIGHT_FD => {
                    let answer = inflight_message(&mut m, shape, &slot, &inflight_log);
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
                    // The answer goes out behind the answers to every earlier message: a
                    // GET_FEATURES barrier through the handler, whose answer it replaces.
                    pending.lock().unwrap_or_else(|e| e.into_inner()).push_back(Pending::Answer(out));
                    let barrier =
                        Message { request: GET_FEATURES, flags: HDR_VERSION, payload: Vec::new(), fds: Vec::new() };
                    write_message(&backend, &barrier)?;
                    continue;
                }
                SET_PROTOCOL_FEATURES if m.payload.len() == 8 => {
                    let v = u64::from_le_bytes(m.payload[..8].try_into().unwrap_or_default());
                    reply_ack = v & F_REPLY_ACK != 0;
                    backend_req = v & F_BACKEND_REQ != 0;
                    m.payload = (v & !F_INFLIGHT_SHMFD).to_le_bytes().to_vec();
                }
                GET_FEATURES => pending.lock().unwrap_or_else(|e| e.into_inner()).push_back(Pending::Pass),
                SET_BACKEND_REQ_FD => {
                    // The handler refuses it without BACKEND_REQ, or without exactly one
                    // stream socket; only a channel it accepts is kept.
                    if backend_req
                        && let [fd] = &m.fds[..]
                        && let Some(sock) = unix_stream(fd)
                    {
                        channel.set(sock);
                    }
                }
                _ => check_message(&m)?,
            }
            write_message(&backend, &m)?;
        }
        Ok(())
    })();
    // Either side ended: end the other, so both threads and the handler return.
    shutdown_both(&frontend, &backend);
    let _ = answers.join();
    if let Err(e) = &result
        && e.get_ref().is_some_and(|i| i.is::<Refused>())
    {
        static REFUSED: LogLimit = LogLimit::new();
        if REFUSED.allow() {
            log::error!("{e}; connection closed");
        }
    }
    result
}

/// Checks what the dependencies would map or read without checking: memory regions and the
/// dirty log must lie inside their files (a shorter file means SIGBUS on first touch), and
/// kick/call/err descriptors must be eventfds (a pipe would block the vring thread in an
/// 8-byte read).
pub fn check_message_parts(request: u32, payload: &[u8], fds: &[File]) -> Result<(), String> {
    let u64_at = |off: usize| payload.get(off..off + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    let fits = |fd: &File, offset: u64, size: u64| -> Result<(), String> {
        let len = fd.metadata().map_err(|e| format!("fstat: {e}"))?.len();
        match offset.checked_add(size) {
            Some(end) if end <= len => Ok(()),
            _ => Err(format!("{size} bytes at offset {offset} of a {len}-byte file")),
        }
    };
    match request {
        SET_MEM_TABLE => {
            let n = payload.get(0..4).map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap_or_default())) as usize;
            for (i, fd) in fds.iter().enumerate().take(n) {
                let base = 8 + i * 32;
                let (Some(size), Some(offset)) = (u64_at(base + 8), u64_at(base + 24)) else {
                    return Err("memory table shorter than its region count".into());
                };
                fits(fd, offset, size).map_err(|e| format!("memory region {i}: {e}"))?;
            }
            Ok(())
        }
        ADD_MEM_REG => {
            let (Some(size), Some(offset), Some(fd)) = (u64_at(16), u64_at(32), fds.first()) else {
                return Ok(());
            };
            fits(fd, offset, size).map_err(|e| format!("memory region: {e}"))
        }
        SET_LOG_BASE => {
            let (Some(size), Some(offset), Some(fd)) = (u64_at(0), u64_at(8), fds.first()) else {
                return Ok(());
            };
            fits(fd, offset, size).map_err(|e| format!("dirty log: {e}"))
        }
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => match fds.first() {
            Some(fd) if !is_eventfd(fd) => Err("ring notifier is not an eventfd".into()),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

fn check_message(m: &Message) -> io::Result<()> {
    check_message_parts(m.request, &m.payload, &m.fds).map_err(|why| refuse(m.request, why))
}

/// A second descriptor of `fd` as a stream, when it is a UNIX stream socket.
fn unix_stream(fd: &File) -> Option<UnixStream> {
    let opt = |name: libc::c_int| -> Option<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for the call and describe an int-sized buffer.
        let r = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    if opt(libc::SO_DOMAIN)? != libc::AF_UNIX || opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return None;
    }
    let dup = fd.try_clone().ok()?;
    Some(UnixStream::from(std::os::fd::OwnedFd::from(dup)))
}

/// True when `fd` is an eventfd (an anonymous inode named so).
fn is_eventfd(fd: &File) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd)))
        .is_ok_and(|p| p.as_os_str() == "anon_inode:[eventfd]")
}

/// Handles GET/SET_INFLIGHT_FD; returns the answer for GET.
/// `log` limits the lines of one connection (a frontend may send as many as it likes).
fn inflight_message(
    m: &mut Message,
    shape: DeviceShape,
    slot: &InflightSlot,
    log: &LogLimit,
) -> io::Result<Option<Message>> {
    if m.payload.len() < INFLIGHT_MIN {
        if log.allow() {
            log::warn!("vhost-user: inflight message of {} bytes refused", m.payload.len());
        }
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let p = &m.payload;
    let size = u64::from_le_bytes(p[0..8].try_into().unwrap_or_default());
    let offset = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
    let num_queues = u16::from_le_bytes([p[16], p[17]]);
    let queue_size = u16::from_le_bytes([p[18], p[19]]);
    if num_queues == 0 || num_queues > shape.num_queues || queue_size == 0 || queue_size > shape.queue_size {
        if log.allow() {
            log::warn!("vhost-user: inflight region for {num_queues} queues of {queue_size} refused");
        }
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let region = if m.request == GET_INFLIGHT_FD {
        InflightRegion::create(num_queues, queue_size)
    } else {
        let Some(file) = m.fds.pop() else {
            if log.allow() {
                log::warn!("vhost-user: SET_INFLIGHT_FD without a descriptor");
            }
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        InflightRegion::open(file, size, offset, num_queues, queue_size)
    };
    let region = match region {
        Ok(r) => Arc::new(r),
        Err(e) => {
            if log.allow() {
                log::warn!("vhost-user: inflight region unusable: {e}");
            }
            return Err(e);
        }
    };
    if log.allow() {
        log::info!(
            "inflight tracking: {} region for {num_queues} queues of {queue_size} ({} bytes)",
            if m.request == GET_INFLIGHT_FD { "new" } else { "restored" },
            region.len()
        );
    }
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
