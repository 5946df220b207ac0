//! Socket I/O with an overall deadline, for the NBD negotiation phases: a peer that goes
//! silent, or trickles a byte at a time, cannot hold a negotiating connection (or the
//! primary's `replication-start`) past the deadline. Every read and write system call gets
//! the time left as its socket timeout.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::server::Stream;

/// The error for a peer that closed the connection in the middle of a message (what
/// `read_exact` reports as "failed to fill whole buffer").
pub fn peer_closed() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection")
}

/// Rewrites `read_exact`'s end-of-file error into [`peer_closed`]; other errors pass.
pub fn eof_as_closed(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof { peer_closed() } else { e }
}

/// Reads exactly `buf.len()` bytes, with no deadline (transmission phase).
pub fn read_exact(s: &mut Stream, buf: &mut [u8]) -> io::Result<()> {
    s.read_exact(buf).map_err(eof_as_closed)
}

/// A deadline for a sequence of socket operations; `what` names the phase in the error.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    limit: Duration,
    what: &'static str,
}

impl Deadline {
    /// A deadline `limit` from now.
    pub fn after(limit: Duration, what: &'static str) -> Deadline {
        Deadline { at: Instant::now() + limit, limit, what }
    }

    /// The instant itself.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// The time-out error of this deadline.
    pub fn expired(&self) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, format!("{} did not finish within {:?}", self.what, self.limit))
    }

    /// Sets both socket timeouts of `s` to the time left (an error once it is over).
    fn arm(&self, s: &Stream) -> io::Result<()> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.expired());
        }
        s.set_timeouts(Some(left), Some(left))
    }

    fn map(&self, e: io::Error) -> io::Error {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.expired(),
            _ => eof_as_closed(e),
        }
    }

    /// Reads exactly `buf.len()` bytes by the deadline.
    pub fn read_exact(&self, s: &mut Stream, buf: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            self.arm(s)?;
            match s.read(&mut buf[got..]) {
                Ok(0) => return Err(peer_closed()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.map(e)),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` by the deadline.
    pub fn write_all(&self, s: &mut Stream, buf: &[u8]) -> io::Result<()> {
        let mut put = 0;
        while put < buf.len() {
            self.arm(s)?;
            match s.write(&buf[put..]) {
                Ok(0) => return Err(peer_closed()),
                Ok(n) => put += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.map(e)),
            }
        }
        Ok(())
    }
}
