//! The byte transports under the NBD client and server: where a server listens
//! ([`NbdAddress`], [`NbdListener`]), the connected socket both sides speak over
//! ([`Stream`]: TCP or UNIX; a TLS session is carried as the plaintext end of a local socket
//! pair, see [`super::tls`]) and TCP keepalive. Nothing here knows the NBD protocol.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// TCP keepalive: first probe after this much silence, then every [`KEEPALIVE_INTERVAL`], and
/// the connection fails after [`KEEPALIVE_PROBES`] unanswered probes (about 60 s in all).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE_IDLE`].
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// See [`KEEPALIVE_IDLE`].
pub const KEEPALIVE_PROBES: i32 = 3;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// TCP `host:port`.
    Tcp(String),
    /// A UNIX socket path.
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for NbdAddress {
    /// The address as given on the command line: `HOST:PORT` or `unix:PATH`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Tcp(a) => f.write_str(a),
            NbdAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for NbdAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("empty UNIX socket path".into());
            }
            return Ok(NbdAddress::Unix(p.into()));
        }
        match s.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(NbdAddress::Tcp(s.to_string())),
            _ => Err(format!("'{s}' is not HOST:PORT or unix:PATH")),
        }
    }
}

/// A connected byte stream (TCP or UNIX).
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// UNIX.
    Unix(UnixStream),
}

impl Stream {
    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Sets the read timeout only (`None`: block forever).
    pub fn set_read_timeout(&self, read: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(read),
            Stream::Unix(s) => s.set_read_timeout(read),
        }
    }

    /// Sets the read and write timeouts (`None`: block forever).
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }

    /// Whether the peer hung up: it closed or shut down its sending side, or the connection
    /// failed. Data still queued does not count; this looks at the socket's state only.
    pub fn hung_up(&self) -> bool {
        let fd = match self {
            Stream::Tcp(s) => std::os::fd::AsRawFd::as_raw_fd(s),
            Stream::Unix(s) => std::os::fd::AsRawFd::as_raw_fd(s),
        };
        let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd owned by this frame; a zero timeout never blocks.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Shuts both directions down (wakes a thread blocked reading it).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket (TCP or UNIX) the server accepts from.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// The next connection and, for TCP, the peer's address. TCP connections get
    /// `TCP_NODELAY` and keepalive ([`set_keepalive`]).
    pub(crate) fn accept(&self) -> io::Result<(Stream, Option<std::net::IpAddr>)> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nodelay(true)?;
                set_keepalive(&s);
                (Stream::Tcp(s), Some(peer.ip()))
            }
            Listener::Unix(l) => (Stream::Unix(l.accept()?.0), None),
        })
    }
}

/// A bound NBD listening socket that no thread serves yet: binding is apart from serving so
/// that the daemon can bind every socket before it starts any thread (`daemon::build`).
pub struct NbdListener(Listener);

impl NbdListener {
    /// Binds `addr` (a UNIX socket is replaced if present, then given mode 0600).
    pub fn bind(addr: &NbdAddress) -> io::Result<NbdListener> {
        Ok(NbdListener(match addr {
            NbdAddress::Tcp(a) => Listener::Tcp(TcpListener::bind(a)?),
            NbdAddress::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p)?;
                std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                Listener::Unix(l)
            }
        }))
    }

    /// The socket, for the server's accept loop.
    pub(crate) fn into_listener(self) -> Listener {
        self.0
    }
}

impl From<UnixListener> for NbdListener {
    fn from(l: UnixListener) -> Self {
        NbdListener(Listener::Unix(l))
    }
}

impl From<TcpListener> for NbdListener {
    fn from(l: TcpListener) -> Self {
        NbdListener(Listener::Tcp(l))
    }
}

/// Sets TCP keepalive on `s` (see [`KEEPALIVE_IDLE`]); failures are only logged.
pub fn set_keepalive(s: &TcpStream) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(s);
    let secs = |d: Duration| i32::try_from(d.as_secs()).unwrap_or(i32::MAX);
    for (level, opt, val) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(KEEPALIVE_IDLE)),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(KEEPALIVE_INTERVAL)),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES),
    ] {
        // SAFETY: `val` is a live c_int and its size is passed; `fd` is an open socket.
        let r = unsafe {
            libc::setsockopt(fd, level, opt, (&val as *const i32).cast(), std::mem::size_of::<i32>() as libc::socklen_t)
        };
        if r != 0 {
            log::warn!("nbd: cannot set TCP keepalive: {}", io::Error::last_os_error());
            return;
        }
    }
}
