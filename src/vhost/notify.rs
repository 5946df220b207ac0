//! The backend request channel (vhost-user `VHOST_USER_PROTOCOL_F_BACKEND_REQ`): the socket
//! the frontend hands over with `SET_BACKEND_REQ_FD`, on which the backend sends its own
//! requests. colo-blk sends one: `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` after `block_resize`,
//! so the frontend re-reads the configuration space (GET_CONFIG) and the guest sees the new
//! capacity.
//!
//! vhost 0.18's `Backend` cannot send that message (its `VhostUserFrontendReqHandler` impl
//! leaves `handle_config_change` at the default, ENOSYS) and keeps its socket private, so the
//! relay ([`super::proxy`]) keeps its own descriptor of the channel here. Messages go out
//! without NEED_REPLY, so nothing ever waits for an answer, and a send that cannot complete
//! within [`SEND_DEADLINE`] (a frontend that stopped reading) fails instead of blocking.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (vhost-user spec, backend message types).
pub const CONFIG_CHANGE_MSG: u32 = vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG as u32;
/// Header flags: protocol version 1, no NEED_REPLY.
const HDR_VERSION: u32 = 0x1;
/// The longest a notification may wait for room in the frontend's socket buffer.
pub const SEND_DEADLINE: Duration = Duration::from_secs(2);

/// One connection's backend request channel, once the frontend set it up.
#[derive(Debug, Default)]
pub struct BackendChannel {
    sock: Mutex<Option<UnixStream>>,
}

/// Shared between the relay (which sets it) and the daemon (which sends on it).
pub type ChannelSlot = Arc<BackendChannel>;

impl BackendChannel {
    /// Keeps `sock` as the channel (a frontend may send SET_BACKEND_REQ_FD again; the last
    /// one wins, as in the handler).
    pub fn set(&self, sock: UnixStream) {
        *self.sock.lock().unwrap_or_else(|e| e.into_inner()) = Some(sock);
    }

    /// True once the frontend handed over a channel.
    pub fn is_set(&self) -> bool {
        self.sock.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Sends CONFIG_CHANGE_MSG. `Ok(false)`: no channel (the frontend did not negotiate
    /// BACKEND_REQ); it reads the new configuration at its next GET_CONFIG. A channel that
    /// failed is dropped, so later notifications do not wait on it again.
    pub fn config_changed(&self) -> io::Result<bool> {
        let mut g = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sock) = g.as_ref() else { return Ok(false) };
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&HDR_VERSION.to_le_bytes());
        // Bytes 8..12: payload size 0 (the message has none).
        match send_within(sock, &msg, SEND_DEADLINE) {
            Ok(()) => Ok(true),
            Err(e) => {
                *g = None;
                Err(e)
            }
        }
    }
}

/// Writes all of `buf` within `deadline` ([`crate::io::sync::write_within`]), naming a
/// frontend that lets the channel fill up.
fn send_within(s: &UnixStream, buf: &[u8], deadline: Duration) -> io::Result<()> {
    crate::io::sync::write_within(s, buf, deadline).map_err(|e| {
        if e.kind() == io::ErrorKind::TimedOut {
            io::Error::new(io::ErrorKind::TimedOut, "the frontend does not read its backend channel")
        } else {
            e
        }
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn without_a_channel_nothing_is_sent() {
        assert!(!BackendChannel::default().config_changed().unwrap());
    }

    #[test]
    fn sends_a_config_change_header_without_payload() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let ch = BackendChannel::default();
        ch.set(ours);
        assert!(ch.config_changed().unwrap());
        let mut hdr = [0u8; 12];
        theirs.read_exact(&mut hdr).unwrap();
        assert_eq!(u32::from_le_bytes(hdr[0..4].try_into().unwrap()), CONFIG_CHANGE_MSG);
        assert_eq!(u32::from_le_bytes(hdr[4..8].try_into().unwrap()), HDR_VERSION);
        assert_eq!(u32::from_le_bytes(hdr[8..12].try_into().unwrap()), 0);
    }

    #[test]
    fn a_frontend_that_never_reads_fails_the_send_within_the_deadline() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let ch = BackendChannel::default();
        ch.set(ours);
        let start = std::time::Instant::now();
        let err = loop {
            match ch.config_changed() {
                Ok(true) => continue,
                Ok(false) => panic!("channel dropped without an error"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() < SEND_DEADLINE + Duration::from_secs(5));
        // The channel is dropped: the next notification does not wait again.
        assert!(!ch.config_changed().unwrap());
        assert!(!ch.is_set());
    }

    #[test]
    fn a_closed_channel_is_an_error_not_a_signal() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let ch = BackendChannel::default();
        ch.set(ours);
        assert!(ch.config_changed().is_err());
    }
}
