//! A raw vhost-user frontend for hostile-frontend tests: it sends any message (header
//! fields, payload and descriptors as given), reads answers with a deadline, and never
//! checks what it sends.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user header flag: version 1.
pub const VERSION: u32 = 0x1;
/// vhost-user header flag: the sender wants an acknowledgement (REPLY_ACK).
pub const NEED_REPLY: u32 = 0x8;

/// Request codes used by the tests.
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_VRING_KICK: u32 = 12;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
}

/// One raw connection.
pub struct RawFrontend {
    pub sock: UnixStream,
}

impl RawFrontend {
    /// Connects to the vhost-user socket.
    pub fn connect(path: &Path) -> RawFrontend {
        RawFrontend { sock: UnixStream::connect(path).expect("connect") }
    }

    /// Sends one message with `fds` attached.
    pub fn send(&self, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(12 + payload.len());
        buf.extend_from_slice(&request.to_le_bytes());
        buf.extend_from_slice(&flags.to_le_bytes());
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(payload);
        let sent = self.sock.send_with_fds(&[&buf[..]], fds).map_err(io::Error::from)?;
        if sent < buf.len() {
            (&self.sock).write_all(&buf[sent..])?;
        }
        Ok(())
    }

    /// Reads one message (request, flags, payload) within `timeout`.
    pub fn recv(&self, timeout: Duration) -> io::Result<(u32, u32, Vec<u8>)> {
        self.sock.set_read_timeout(Some(timeout))?;
        let mut hdr = [0u8; 12];
        (&self.sock).read_exact(&mut hdr)?;
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        let mut payload = vec![0u8; word(8) as usize];
        (&self.sock).read_exact(&mut payload)?;
        Ok((word(0), word(4), payload))
    }

    /// Sends `request` without payload and returns the u64 answer.
    pub fn get_u64(&self, request: u32) -> u64 {
        self.send(request, VERSION, &[], &[]).expect("send");
        let (code, _, p) = self.recv(Duration::from_secs(10)).expect("answer");
        assert_eq!(code, request);
        u64::from_le_bytes(p[..8].try_into().unwrap())
    }

    /// Sends `request` with a u64 payload.
    pub fn set_u64(&self, request: u32, flags: u32, v: u64) -> io::Result<()> {
        self.send(request, flags, &v.to_le_bytes(), &[])
    }

    /// True once the daemon closed the connection (an EOF within `timeout`).
    pub fn closed_within(&self, timeout: Duration) -> bool {
        let _ = self.sock.set_read_timeout(Some(timeout));
        let mut b = [0u8; 256];
        loop {
            match (&self.sock).read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}
