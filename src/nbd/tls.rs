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

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};

use super::server::Stream;

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

/// Runs the server handshake on `tcp` and returns the plaintext stream.
pub fn accept(tcp: Stream, cfg: Arc<ServerConfig>) -> io::Result<Stream> {
    let conn = ServerConnection::new(cfg).map_err(io::Error::other)?;
    start(tcp, Connection::Server(conn))
}

/// Runs the client handshake on `tcp` (verifying the server as `host`) and returns the
/// plaintext stream.
pub fn connect(tcp: Stream, cfg: Arc<ClientConfig>, host: &str) -> io::Result<Stream> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let conn = ClientConnection::new(cfg, name).map_err(io::Error::other)?;
    start(tcp, Connection::Client(conn))
}

fn start(tcp: Stream, mut conn: Connection) -> io::Result<Stream> {
    let Stream::Tcp(mut sock) = tcp else {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "TLS is only used over TCP"));
    };
    // A peer that stalls the handshake must not hold the connection forever.
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    sock.set_read_timeout(None)?;
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

/// Moves bytes between the TLS session on `tcp` and the plaintext socket until either side
/// closes.
fn pump(mut conn: Connection, mut tcp: std::net::TcpStream, mut plain: UnixStream) -> io::Result<()> {
    tcp.set_nonblocking(true)?;
    plain.set_nonblocking(true)?;
    let mut to_plain: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let (mut plain_open, mut tcp_open) = (true, true);
    let result = loop {
        // Plaintext rustls already holds (possibly read during the handshake, or several
        // records from one read) goes to the plaintext side before waiting for more.
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
        // Everything TLS wants to send goes out first.
        while conn.wants_write() {
            match conn.write_tls(&mut tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
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
            break Ok(());
        }
        if !plain_open && !conn.wants_write() {
            break Ok(());
        }
        let mut fds = [
            libc::pollfd {
                fd: tcp.as_raw_fd(),
                events: (if tcp_open && to_plain.len() < (1 << 20) { libc::POLLIN } else { 0 })
                    | if conn.wants_write() { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: plain.as_raw_fd(),
                events: (if plain_open { libc::POLLIN } else { 0 })
                    | if to_plain.is_empty() { 0 } else { libc::POLLOUT },
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd entries owned by this frame.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && tcp_open {
            match conn.read_tls(&mut tcp) {
                Ok(0) => tcp_open = false,
                // Decrypted at the top of the loop.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => break Err(e),
            }
        }
        if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && plain_open {
            match plain.read(&mut buf) {
                Ok(0) => {
                    plain_open = false;
                    conn.send_close_notify();
                }
                Ok(n) => conn.writer().write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => break Err(e),
            }
        }
    };
    let _ = plain.shutdown(std::net::Shutdown::Both);
    let _ = tcp.shutdown(std::net::Shutdown::Both);
    result
}
