//! Socket I/O with an overall deadline, for the NBD negotiation phases: a peer that goes
//! silent, or trickles a byte at a time, cannot hold a negotiating connection (or the
//! primary's `replication-start`) past the deadline. Every read and write system call gets
//! the time left as its socket timeout.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::transport::Stream;

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
pub fn read_exact(s: &mut impl Read, buf: &mut [u8]) -> io::Result<()> {
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

    /// Reads exactly `buf.len()` bytes by the deadline, arming only the read timeout (in the
    /// transmission phase other threads write replies on the same socket under their own
    /// send timeout); the socket reads without a timeout again afterwards.
    pub fn read_exact_reading_only(&self, s: &mut Stream, buf: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        let r = loop {
            if got == buf.len() {
                break Ok(());
            }
            let left = self.at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(self.expired());
            }
            if let Err(e) = s.set_read_timeout(Some(left)) {
                break Err(e);
            }
            match s.read(&mut buf[got..]) {
                Ok(0) => break Err(peer_closed()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(self.map(e)),
            }
        };
        s.set_read_timeout(None)?;
        r
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_trickling_peer_cannot_stretch_the_deadline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Stream::Unix(a);
        let t = std::thread::spawn(move || {
            // One byte every 50 ms: each read makes progress, the whole never arrives in time.
            for _ in 0..40 {
                if b.write_all(&[0]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let d = Deadline::after(Duration::from_millis(300), "the test");
        let t0 = Instant::now();
        let mut buf = [0u8; 16];
        let e = d.read_exact(&mut s, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("the test did not finish within 300ms"), "{e}");
        assert!(t0.elapsed() < Duration::from_millis(600), "{:?}", t0.elapsed());
        s.shutdown();
        t.join().unwrap();
    }

    #[test]
    fn a_closed_peer_is_named() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut s = Stream::Unix(a);
        let d = Deadline::after(Duration::from_secs(5), "the test");
        let e = d.read_exact(&mut s, &mut [0u8; 4]).unwrap_err();
        assert_eq!(e.to_string(), "the peer closed the connection");
        let e = read_exact(&mut s, &mut [0u8; 4]).unwrap_err();
        assert_eq!(e.to_string(), "the peer closed the connection");
    }
}
