//! TLS on the replication link (NBD `STARTTLS`), with client certificates: only a primary
//! holding a certificate signed by the configured CA can write into a secondary.
//!
//! Credentials are read from a directory laid out as QEMU's `tls-creds-x509` object expects,
//! so one directory serves QEMU and colo-blk alike: `ca-cert.pem` plus `server-cert.pem` /
//! `server-key.pem` (secondary) or `client-cert.pem` / `client-key.pem` (primary).
//!
//! The NBD code reads and writes its connection from several threads through cloned
//! descriptors, which a TLS session cannot offer. So after the handshake a pump thread owns
//! the TLS session and the TCP socket, and the NBD code gets the other end of a local socket
//! pair carrying the plaintext.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};

use super::timed;
use super::transport::Stream;

/// Errors loading credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credential file is missing or unreadable.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A credential file holds nothing usable.
    #[error("{0}")]
    Invalid(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |e: rustls::pki_types::pem::Error| TlsError::Invalid(format!("{}: {e}", path.display()));
    let f = File::open(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })?;
    let v = CertificateDer::pem_reader_iter(BufReader::new(f)).collect::<Result<Vec<_>, _>>().map_err(read)?;
    if v.is_empty() {
        return Err(TlsError::Invalid(format!("{}: no certificate", path.display())));
    }
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    std::fs::metadata(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))
}

fn roots(dir: &Path) -> Result<RootCertStore, TlsError> {
    let mut r = RootCertStore::empty();
    for c in certs(&dir.join("ca-cert.pem"))? {
        r.add(c).map_err(|e| TlsError::Invalid(format!("ca-cert.pem: {e}")))?;
    }
    Ok(r)
}

/// Server side (the secondary's NBD server): requires a client certificate from the CA.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider())
        .build()
        .map_err(|e| TlsError::Invalid(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&dir.join("server-cert.pem"))?, key(&dir.join("server-key.pem"))?)
        .map_err(|e| TlsError::Invalid(format!("server certificate: {e}")))?;
    // No session tickets: nothing to resume, and no post-handshake messages on the link.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Client side (the primary's link): verifies the server against the CA, presents the
/// client certificate.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(certs(&dir.join("client-cert.pem"))?, key(&dir.join("client-key.pem"))?)
        .map_err(|e| TlsError::Invalid(format!("client certificate: {e}")))?;
    Ok(Arc::new(cfg))
}

/// Runs the server handshake on `tcp`, finishing by `deadline`, and returns the plaintext
/// stream.
pub fn accept(tcp: Stream, cfg: Arc<ServerConfig>, deadline: Instant) -> io::Result<Stream> {
    let conn = ServerConnection::new(cfg).map_err(io::Error::other)?;
    start(tcp, Connection::Server(conn), deadline)
}

/// Runs the client handshake on `tcp` (verifying the server as `host`), finishing by
/// `deadline`, and returns the plaintext stream.
pub fn connect(tcp: Stream, cfg: Arc<ClientConfig>, host: &str, deadline: Instant) -> io::Result<Stream> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let conn = ClientConnection::new(cfg, name).map_err(io::Error::other)?;
    start(tcp, Connection::Client(conn), deadline)
}

fn start(tcp: Stream, mut conn: Connection, deadline: Instant) -> io::Result<Stream> {
    let Stream::Tcp(mut sock) = tcp else {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "TLS is only used over TCP"));
    };
    // A peer that stalls the handshake must not hold the connection (or the caller) past the
    // deadline: every socket operation of the handshake gets the time that is left.
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(handshake_timeout());
        }
        sock.set_read_timeout(Some(left))?;
        sock.set_write_timeout(Some(left))?;
        match conn.complete_io(&mut sock) {
            Ok((0, 0)) => return Err(timed::peer_closed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(handshake_timeout());
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(timed::peer_closed()),
            Err(e) => return Err(e),
        }
    }
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    if let Some(peer) = conn.peer_certificates().and_then(|c| c.first()) {
        log::info!("TLS session up ({} bytes peer certificate)", peer.len());
    }
    let (inner, outer) = UnixStream::pair()?;
    std::thread::Builder::new().name("nbd-tls".into()).spawn(move || {
        if let Err(e) = pump(conn, sock, inner) {
            log::info!("TLS session ended: {e}");
        }
    })?;
    Ok(Stream::Unix(outer))
}

fn handshake_timeout() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the TLS handshake did not finish in time")
}

/// Plaintext the pump holds for the NBD side before it stops reading the TLS socket.
const TO_PLAIN_MAX: usize = 1 << 20;
/// How long the pump keeps flushing what it holds for the peer once the NBD side closed.
const LINGER: Duration = Duration::from_secs(10);

/// Moves bytes between the TLS session on `tcp` and the plaintext socket until either side
/// closes, then shuts both down.
fn pump(mut conn: Connection, tcp: std::net::TcpStream, plain: UnixStream) -> io::Result<()> {
    let result = pump_loop(&mut conn, &tcp, &plain);
    let _ = plain.shutdown(std::net::Shutdown::Both);
    let _ = tcp.shutdown(std::net::Shutdown::Both);
    result
}

/// The pump's loop. Flow control in both directions comes from rustls' own buffer limits:
/// - towards the peer, plaintext read from the NBD side waits in `to_tls` until the rustls
///   writer accepts it (it takes only what fits under its limit and answers 0 when full, which
///   means "flush first", not an error), and the NBD side is read again only once `to_tls` is
///   empty; so a slow or paused peer slows the NBD side down instead of breaking the session;
/// - towards the NBD side, decrypted bytes wait in `to_plain` and the TLS socket is read only
///   while `to_plain` holds less than [`TO_PLAIN_MAX`].
fn pump_loop(conn: &mut Connection, mut tcp: &std::net::TcpStream, mut plain: &UnixStream) -> io::Result<()> {
    tcp.set_nonblocking(true)?;
    plain.set_nonblocking(true)?;
    let mut to_plain: Vec<u8> = Vec::new();
    let mut to_tls: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let (mut plain_open, mut tcp_open, mut close_sent) = (true, true, false);
    let mut linger_until: Option<Instant> = None;
    loop {
        // Decrypt every complete record rustls holds (possibly read during the handshake, or
        // several from one read) before waiting for more.
        let state = conn.process_new_packets().map_err(io::Error::other)?;
        let n = state.plaintext_bytes_to_read();
        if n > 0 {
            let start = to_plain.len();
            to_plain.resize(start + n, 0);
            conn.reader().read_exact(&mut to_plain[start..])?;
        }
        if state.peer_has_closed() {
            tcp_open = false;
        }
        // Plaintext into rustls and records onto the socket, for as long as either moves.
        loop {
            let mut moved = false;
            while !to_tls.is_empty() {
                let n = conn.writer().write(&to_tls)?;
                if n == 0 {
                    break;
                }
                to_tls.drain(..n);
                moved = true;
            }
            if !plain_open && to_tls.is_empty() && !close_sent {
                conn.send_close_notify();
                close_sent = true;
            }
            if !conn.wants_write() {
                break;
            }
            match conn.write_tls(&mut tcp) {
                Ok(n) if n > 0 => moved = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return ended(e, plain_open),
            }
            if !moved {
                break;
            }
        }
        // Decrypted data waiting for the plaintext side.
        while !to_plain.is_empty() {
            match plain.write(&to_plain) {
                Ok(n) => {
                    to_plain.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if !tcp_open && to_plain.is_empty() {
            return Ok(());
        }
        if !plain_open && close_sent && !conn.wants_write() {
            return Ok(());
        }
        let timeout_ms = match linger_until {
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer did not take the rest of the session in time",
                    ));
                }
                i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)
            }
            None => -1,
        };
        let tcp_events = (if tcp_open && to_plain.len() < TO_PLAIN_MAX { libc::POLLIN } else { 0 })
            | if conn.wants_write() { libc::POLLOUT } else { 0 };
        let plain_events = (if plain_open && to_tls.is_empty() { libc::POLLIN } else { 0 })
            | if to_plain.is_empty() { 0 } else { libc::POLLOUT };
        // A socket nothing is wanted from is left out (a negative fd), so a hung-up one does
        // not wake the loop over and over while the other side catches up.
        let entry = |fd: i32, events: i16| libc::pollfd { fd: if events == 0 { -1 } else { fd }, events, revents: 0 };
        let mut fds = [entry(tcp.as_raw_fd(), tcp_events), entry(plain.as_raw_fd(), plain_events)];
        // SAFETY: two valid pollfd entries owned by this frame.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let ready = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
        if fds[0].revents & ready != 0 && tcp_open && to_plain.len() < TO_PLAIN_MAX {
            match conn.read_tls(&mut tcp) {
                Ok(0) => tcp_open = false,
                // Decrypted at the top of the loop.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return ended(e, plain_open),
            }
        }
        if fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 && conn.wants_write() {
            // The peer is gone: writing would fail; let write_tls report why.
            if let Err(e) = conn.write_tls(&mut tcp)
                && e.kind() != io::ErrorKind::WouldBlock
            {
                return ended(e, plain_open);
            }
        }
        if fds[1].revents & ready != 0 && plain_open && to_tls.is_empty() {
            match plain.read(&mut buf) {
                Ok(0) => {
                    plain_open = false;
                    linger_until = Some(Instant::now() + LINGER);
                }
                Ok(n) => to_tls.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A TLS socket error: the session's end when the NBD side had closed already (the peer
/// hanging up before our close_notify reached it is the normal end after NBD_CMD_DISC),
/// else an error.
fn ended(e: io::Error, plain_open: bool) -> io::Result<()> {
    let gone =
        matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected);
    if gone && !plain_open { Ok(()) } else { Err(e) }
}
