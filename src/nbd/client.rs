//! NBD client for the primary's replication link: URI parsing, fixed newstyle negotiation
//! with OPT_GO (falling back to EXPORT_NAME), then a transmission phase where any thread may
//! send requests and one reader thread matches replies to handles (out of order).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

pub use super::timed::Deadline;
use super::transport::{Stream, set_keepalive};
use super::wire::*;

/// Where the secondary's NBD server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// TCP `host:port` or a UNIX socket.
    pub target: NbdTarget,
    /// Export name.
    pub export: String,
}

/// Transport of an [`NbdUri`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdTarget {
    /// `host:port`.
    Tcp(String),
    /// Socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for NbdUri {
    type Err = String;
    /// `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path_part, query) = rest.split_once('?').ok_or("nbd+unix URI needs ?socket=PATH")?;
            let export = path_part.strip_prefix('/').unwrap_or(path_part).to_string();
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or("nbd+unix URI needs ?socket=PATH")?;
            return Ok(NbdUri { target: NbdTarget::Unix(socket.into()), export });
        }
        if let Some(rest) = s.strip_prefix("nbd://") {
            let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
            if hostport.is_empty() {
                return Err("nbd URI needs a host".into());
            }
            let hostport = if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
                hostport.to_string()
            } else {
                format!("{hostport}:10809")
            };
            return Ok(NbdUri { target: NbdTarget::Tcp(hostport), export: export.to_string() });
        }
        Err(format!("'{s}' is not nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH"))
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.target {
            NbdTarget::Tcp(hp) => write!(f, "nbd://{hp}/{}", self.export),
            NbdTarget::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

/// What negotiation learned.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// The server acknowledged [`OPT_COLO`]: checkpoint barriers can be sent.
    pub colo: bool,
    /// The highest barrier number the server received so far (from its [`OPT_COLO`]
    /// acknowledgement; 0 when none or not said): later barriers must be numbered above it.
    pub colo_last_barrier: u64,
    /// The server disk's data generation (0: unknown or not said) and whether the serving
    /// process applied every write since it adopted it (see `replication/generation.rs`).
    pub colo_generation: (u64, bool),
    /// The largest range one [`super::checksum::CMD_COLO_CHECKSUM`] may cover; 0 when the
    /// server does not offer checksums (asked only when [`ExportInfo::colo`]).
    pub checksum_max: u32,
}

fn read_u16(d: &Deadline, s: &mut Stream) -> io::Result<u16> {
    let mut b = [0u8; 2];
    d.read_exact(s, &mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(d: &Deadline, s: &mut Stream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    d.read_exact(s, &mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(d: &Deadline, s: &mut Stream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    d.read_exact(s, &mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Why the client could not reach transmission with the server, or why a reply broke the
/// framing. Handshake failures are returned as they are ([`connect`], [`negotiate`]);
/// transmission readers return `io::Result` (their callers chain them with socket I/O) and
/// carry it inside an `io::Error` of [`ClientError::kind`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed (including a negotiation that missed its deadline).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The host name did not resolve to any address.
    #[error("cannot resolve {0}")]
    Unresolved(String),
    /// TLS was asked for with a UNIX socket target.
    #[error("TLS needs a TCP secondary (nbd://HOST:PORT)")]
    TlsNeedsTcp,
    /// The greeting is not the newstyle one.
    #[error("not a newstyle NBD server")]
    NotNewstyle,
    /// The server does not set the fixed-newstyle flag.
    #[error("server does not speak fixed newstyle")]
    NotFixedNewstyle,
    /// STARTTLS was answered with something else than an acknowledgement.
    #[error("server refused TLS (reply {reply:#x}: {message})")]
    TlsRefused {
        /// The option reply type.
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// The reply is for another option than the one asked (`expected` names it).
    #[error("reply to option {got:#x} instead of the {expected} option")]
    WrongOption {
        /// The option the reply names.
        got: u32,
        /// The option asked for.
        expected: &'static str,
    },
    /// An option reply without the option reply magic.
    #[error("bad option reply magic")]
    BadOptionReplyMagic,
    /// An option reply longer than this client accepts.
    #[error("option reply of {0} bytes")]
    OptionReplyTooLong(u32),
    /// OPT_GO was answered with an error.
    #[error("server refused export '{export}' (reply {reply:#x}: {message})")]
    ExportRefused {
        /// The export asked for.
        export: String,
        /// The option reply type.
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// OPT_GO was acknowledged without the export's size and flags.
    #[error("server sent no export information")]
    NoExportInfo,
    /// A transmission reply without the simple reply magic.
    #[error("bad reply magic {0:#x}")]
    BadReplyMagic(u32),
    /// A checksum reply whose count is not the one asked for.
    #[error("malformed checksum reply: {got} hashes where {expected} were asked for")]
    ChecksumCount {
        /// The count the server sent.
        got: u32,
        /// The count asked for.
        expected: u32,
    },
}

impl ClientError {
    /// The `io::ErrorKind` this failure has where an `io::Error` carries it: a refusal by
    /// the server is `ConnectionRefused`, a server that breaks the protocol `InvalidData`.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            ClientError::Io(e) => e.kind(),
            ClientError::Unresolved(_) => io::ErrorKind::NotFound,
            ClientError::TlsNeedsTcp => io::ErrorKind::InvalidInput,
            ClientError::TlsRefused { .. } | ClientError::ExportRefused { .. } => io::ErrorKind::ConnectionRefused,
            ClientError::NotNewstyle
            | ClientError::NotFixedNewstyle
            | ClientError::WrongOption { .. }
            | ClientError::BadOptionReplyMagic
            | ClientError::OptionReplyTooLong(_)
            | ClientError::NoExportInfo
            | ClientError::BadReplyMagic(_)
            | ClientError::ChecksumCount { .. } => io::ErrorKind::InvalidData,
        }
    }
}

impl From<ClientError> for io::Error {
    fn from(e: ClientError) -> io::Error {
        match e {
            ClientError::Io(e) => e,
            e => io::Error::new(e.kind(), e),
        }
    }
}

/// Connects and negotiates (STARTTLS first when `tls` is given); returns the stream in
/// transmission phase. The whole negotiation, TCP connect and TLS handshake included, must
/// finish within `timeout`: a secondary that stalls at any step fails it instead of hanging.
pub fn connect(
    uri: &NbdUri,
    timeout: Duration,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> Result<(Stream, ExportInfo), ClientError> {
    let deadline = Deadline::after(timeout, "the NBD negotiation with the secondary");
    let s = match &uri.target {
        NbdTarget::Tcp(hp) => {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(hp)?
                .next()
                .ok_or_else(|| ClientError::Unresolved(hp.clone()))?;
            let t = TcpStream::connect_timeout(&addr, timeout)?;
            t.set_nodelay(true)?;
            set_keepalive(&t);
            Stream::Tcp(t)
        }
        NbdTarget::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
    };
    let tls = match (tls, &uri.target) {
        (None, _) => None,
        (Some(cfg), NbdTarget::Tcp(hp)) => {
            let host =
                hp.rsplit_once(':').map_or(hp.as_str(), |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
            Some((cfg.clone(), host.to_string()))
        }
        (Some(_), NbdTarget::Unix(_)) => {
            return Err(ClientError::TlsNeedsTcp);
        }
    };
    let (s, info) = negotiate(s, &uri.export, &deadline, tls)?;
    // Transmission: replies may take long (a slow secondary is the link timeout's business);
    // a send that cannot progress for `timeout` fails.
    s.set_timeouts(None, Some(timeout))?;
    Ok((s, info))
}

/// Fixed newstyle negotiation on a connected stream, by `deadline`: STARTTLS first when `tls`
/// (credentials, server name) is given, then the COLO option, then GO for `export` (or
/// EXPORT_NAME with an old server). Public for the fuzz target
/// `fuzz/fuzz_targets/nbd_client_reply.rs`, which plays the server.
pub fn negotiate(
    mut s: Stream,
    export: &str,
    deadline: &Deadline,
    tls: Option<(std::sync::Arc<rustls::ClientConfig>, String)>,
) -> Result<(Stream, ExportInfo), ClientError> {
    let d = deadline;
    if read_u64(d, &mut s)? != NBD_MAGIC || read_u64(d, &mut s)? != IHAVEOPT {
        return Err(ClientError::NotNewstyle);
    }
    let server_flags = read_u16(d, &mut s)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotFixedNewstyle);
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let cflags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
    d.write_all(&mut s, &cflags.to_be_bytes())?;
    if let Some((cfg, host)) = tls {
        send_option(d, &mut s, OPT_STARTTLS, &[])?;
        let (_, rtype, payload) = read_option_reply(d, &mut s)?;
        if rtype != REP_ACK {
            return Err(ClientError::TlsRefused {
                reply: rtype,
                message: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        s = super::tls::connect(s, cfg, &host, d.at())?;
    }
    let (colo, colo_last_barrier, colo_generation) = ask_colo(d, &mut s)?;
    let checksum_max = if colo { ask_checksums(d, &mut s)? } else { 0 };
    // OPT_GO: u32 name length, name, u16 number of info requests (none).
    let name = export.as_bytes();
    let mut data = Vec::with_capacity(6 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(d, &mut s, OPT_GO, &data)?;
    let mut info: Option<ExportInfo> = None;
    loop {
        let (_, rtype, payload) = read_option_reply(d, &mut s)?;
        match rtype {
            REP_ACK => break,
            REP_INFO if payload.len() >= 12 && u16::from_be_bytes([payload[0], payload[1]]) == INFO_EXPORT => {
                let size = u64::from_be_bytes(payload[2..10].try_into().unwrap_or_default());
                let flags = u16::from_be_bytes([payload[10], payload[11]]);
                info = Some(ExportInfo { size, flags, colo, colo_last_barrier, colo_generation, checksum_max });
            }
            REP_ERR_UNSUP => {
                // An old server: fall back to EXPORT_NAME, which answers with size + flags.
                send_option(d, &mut s, OPT_EXPORT_NAME, name)?;
                let size = read_u64(d, &mut s)?;
                let flags = read_u16(d, &mut s)?;
                if !no_zeroes {
                    let mut z = [0u8; 124];
                    d.read_exact(&mut s, &mut z)?;
                }
                info = Some(ExportInfo { size, flags, colo, colo_last_barrier, colo_generation, checksum_max });
                break;
            }
            t if t & (1 << 31) != 0 => {
                return Err(ClientError::ExportRefused {
                    export: export.to_string(),
                    reply: t,
                    message: String::from_utf8_lossy(&payload).into_owned(),
                });
            }
            _ => {}
        }
    }
    let info = info.ok_or(ClientError::NoExportInfo)?;
    Ok((s, info))
}

/// Asks for the colo-blk barrier extension; any error reply means a plain NBD server.
/// Returns whether it was acknowledged, the last barrier number the acknowledgement carries
/// (8 bytes, big-endian; absent: 0) and the data generation with its flags (8 bytes + 1;
/// absent: unknown).
fn ask_colo(d: &Deadline, s: &mut Stream) -> Result<(bool, u64, (u64, bool)), ClientError> {
    send_option(d, s, OPT_COLO, &[])?;
    let (opt, rtype, payload) = read_option_reply(d, s)?;
    if opt != OPT_COLO {
        return Err(ClientError::WrongOption { got: opt, expected: "COLO" });
    }
    if rtype != REP_ACK {
        return Ok((false, 0, (0, false)));
    }
    let word = |at: usize| payload.get(at..at + 8).map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
    let continuous = payload.get(16).is_some_and(|f| f & 1 != 0);
    Ok((true, word(0), (word(8), continuous)))
}

/// Asks for the colo-blk checksum extension: the largest request length it allows, 0 when
/// not offered (any error reply, or an acknowledgement this client cannot use).
fn ask_checksums(d: &Deadline, s: &mut Stream) -> Result<u32, ClientError> {
    use super::checksum::{OPT_COLO_CHECKSUM, parse_ack};
    send_option(d, s, OPT_COLO_CHECKSUM, &[])?;
    let (opt, rtype, payload) = read_option_reply(d, s)?;
    if opt != OPT_COLO_CHECKSUM {
        return Err(ClientError::WrongOption { got: opt, expected: "checksum" });
    }
    Ok(if rtype == REP_ACK { parse_ack(&payload).unwrap_or(0) } else { 0 })
}

/// Reads one option reply: (option, reply type, payload). A payload longer than
/// [`MAX_OPTION`] breaks the negotiation (it could not be skipped safely).
fn read_option_reply(d: &Deadline, s: &mut Stream) -> Result<(u32, u32, Vec<u8>), ClientError> {
    if read_u64(d, s)? != OPT_REPLY_MAGIC {
        return Err(ClientError::BadOptionReplyMagic);
    }
    let (opt, rtype, len) = (read_u32(d, s)?, read_u32(d, s)?, read_u32(d, s)?);
    if len > MAX_OPTION {
        return Err(ClientError::OptionReplyTooLong(len));
    }
    let mut payload = vec![0u8; len as usize];
    d.read_exact(s, &mut payload)?;
    Ok((opt, rtype, payload))
}

fn send_option(d: &Deadline, s: &mut Stream, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    d.write_all(s, &b)
}

/// A decoded simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// NBD error (0 = success).
    pub error: u32,
    /// The request's handle.
    pub handle: u64,
}

/// Reads one simple reply header (a payload, which only verify requests have, is read by
/// the caller, who knows what it asked for). `s` is the connection, usually buffered: the
/// primary's receiver parses every reply one read brought in without further system calls.
pub fn read_reply(s: &mut impl Read) -> io::Result<Reply> {
    let mut b = [0u8; 16];
    super::timed::read_exact(s, &mut b)?;
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ClientError::BadReplyMagic(magic).into());
    }
    Ok(Reply {
        error: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        handle: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
    })
}

/// Reads the payload of a successful [`super::checksum::CMD_COLO_CHECKSUM`] reply: the
/// count, which must be `expected` (a server that says otherwise broke the framing: nothing
/// after it can be trusted), then the hashes, as raw big-endian bytes.
pub fn read_checksum_payload(s: &mut impl Read, expected: u32) -> io::Result<Vec<u8>> {
    let mut c = [0u8; 4];
    super::timed::read_exact(s, &mut c)?;
    let count = u32::from_be_bytes(c);
    if count != expected {
        return Err(ClientError::ChecksumCount { got: count, expected }.into());
    }
    let mut b = vec![0u8; 8 * expected as usize];
    super::timed::read_exact(s, &mut b)?;
    Ok(b)
}

/// Reads the `len` data bytes of a successful READ reply.
pub fn read_data_payload(s: &mut impl Read, len: u32) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    super::timed::read_exact(s, &mut b)?;
    Ok(b)
}

/// Writes one request (and its payload).
pub fn send_request(s: &mut Stream, req: &Request, payload: &[u8]) -> io::Result<()> {
    // Header and data leave in one `writev` (one segment for small payloads).
    send_requests(s, &[(*req, payload)])
}

/// Sends several requests (each header followed by its payload, if any) with as few system
/// calls as the socket takes: one `writev` for a batch of small writes.
pub fn send_requests<P>(s: &mut impl Write, batch: &[(Request, P)]) -> io::Result<()>
where
    P: std::ops::Deref,
    P::Target: AsRef<[u8]>,
{
    let headers: Vec<_> = batch.iter().map(|(r, _)| r.encode()).collect();
    let mut slices = Vec::with_capacity(batch.len() * 2);
    for (h, (_, p)) in headers.iter().zip(batch) {
        slices.push(io::IoSlice::new(h));
        let p: &[u8] = (**p).as_ref();
        if !p.is_empty() {
            slices.push(io::IoSlice::new(p));
        }
    }
    write_all_vectored(s, &mut slices)
}

/// `write_all` for a list of slices (a short write resumes where the socket stopped).
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the socket took no bytes")),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `limit` bytes per call, like a full socket buffer.
    struct Trickle {
        out: Vec<u8>,
        limit: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = b.len().min(self.limit);
            self.out.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.limit - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.limit {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_batch_goes_out_whole_and_in_order_through_short_writes() {
        let reqs = [
            (Request { flags: 0, cmd: crate::nbd::wire::CMD_WRITE, handle: 1, offset: 0, length: 3 }, vec![1u8, 2, 3]),
            (Request { flags: 0, cmd: crate::nbd::wire::CMD_FLUSH, handle: 2, offset: 0, length: 0 }, vec![]),
            (Request { flags: 0, cmd: crate::nbd::wire::CMD_WRITE, handle: 3, offset: 512, length: 2 }, vec![9u8, 9]),
        ];
        let mut want = Vec::new();
        for (r, p) in &reqs {
            want.extend_from_slice(&r.encode());
            want.extend_from_slice(p);
        }
        for limit in [1, 5, 28, 29, 1000] {
            let mut w = Trickle { out: Vec::new(), limit };
            send_requests(&mut w, &reqs).unwrap();
            assert_eq!(w.out, want, "limit {limit}");
        }
    }

    #[test]
    fn parses_uris() {
        let u: NbdUri = "nbd://127.0.0.1:9999/parent0".parse().unwrap();
        assert_eq!(u, NbdUri { target: NbdTarget::Tcp("127.0.0.1:9999".into()), export: "parent0".into() });
        let u: NbdUri = "nbd://host".parse().unwrap();
        assert_eq!(u.target, NbdTarget::Tcp("host:10809".into()));
        assert_eq!(u.export, "");
        let u: NbdUri = "nbd+unix:///disk?socket=/run/x.sock".parse().unwrap();
        assert_eq!(u, NbdUri { target: NbdTarget::Unix("/run/x.sock".into()), export: "disk".into() });
        assert!("nbd+unix:///disk".parse::<NbdUri>().is_err());
        assert!("http://x".parse::<NbdUri>().is_err());
        assert!("nbd:///x".parse::<NbdUri>().is_err());
    }

    /// Runs the negotiation against a server that says `script` (whatever the client sends is
    /// left unread in the socket buffer).
    fn negotiate_with(script: &[u8]) -> Result<ExportInfo, ClientError> {
        let (client, mut server) = UnixStream::pair().unwrap();
        server.write_all(script).unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        let d = Deadline::after(Duration::from_secs(10), "the test");
        negotiate(Stream::Unix(client), "disk0", &d, None).map(|(_, info)| info)
    }

    fn greeting(flags: u16) -> Vec<u8> {
        [&NBD_MAGIC.to_be_bytes()[..], &IHAVEOPT.to_be_bytes(), &flags.to_be_bytes()].concat()
    }

    fn option_reply(opt: u32, rtype: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap();
        [&OPT_REPLY_MAGIC.to_be_bytes()[..], &opt.to_be_bytes(), &rtype.to_be_bytes(), &len.to_be_bytes(), payload]
            .concat()
    }

    #[test]
    fn handshake_failures_are_typed() {
        let e = negotiate_with(b"NBDMAGIC-but-oldstyle").unwrap_err();
        assert!(matches!(e, ClientError::NotNewstyle), "{e:?}");
        let e = negotiate_with(&greeting(0)).unwrap_err();
        assert!(matches!(e, ClientError::NotFixedNewstyle), "{e:?}");

        let flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
        let script = [greeting(flags), option_reply(OPT_GO, REP_ACK, &[])].concat();
        let e = negotiate_with(&script).unwrap_err();
        assert!(matches!(e, ClientError::WrongOption { got: OPT_GO, expected: "COLO" }), "{e:?}");
        assert_eq!(e.to_string(), "reply to option 0x7 instead of the COLO option");

        let script = [
            greeting(flags),
            option_reply(OPT_COLO, REP_ERR_UNSUP, &[]),
            option_reply(OPT_GO, REP_ERR_POLICY, b"not for you"),
        ]
        .concat();
        let e = negotiate_with(&script).unwrap_err();
        assert!(matches!(&e, ClientError::ExportRefused { export, reply: REP_ERR_POLICY, .. } if export == "disk0"));
        assert_eq!(e.to_string(), "server refused export 'disk0' (reply 0x80000002: not for you)");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);

        let script =
            [greeting(flags), option_reply(OPT_COLO, REP_ERR_UNSUP, &[]), option_reply(OPT_GO, REP_ACK, &[])].concat();
        let e = negotiate_with(&script).unwrap_err();
        assert!(matches!(e, ClientError::NoExportInfo), "{e:?}");

        let mut bad_magic = option_reply(OPT_COLO, REP_ACK, &[]);
        bad_magic[0] ^= 1;
        let e = negotiate_with(&[greeting(flags), bad_magic].concat()).unwrap_err();
        assert!(matches!(e, ClientError::BadOptionReplyMagic), "{e:?}");

        let mut too_long = option_reply(OPT_COLO, REP_ACK, &[]);
        too_long[16..20].copy_from_slice(&(MAX_OPTION + 1).to_be_bytes());
        let e = negotiate_with(&[greeting(flags), too_long].concat()).unwrap_err();
        assert!(matches!(e, ClientError::OptionReplyTooLong(n) if n == MAX_OPTION + 1), "{e:?}");

        // A server that hangs up mid-greeting is a socket error, kept as it is.
        let e = negotiate_with(&NBD_MAGIC.to_be_bytes()).unwrap_err();
        assert!(matches!(&e, ClientError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof), "{e:?}");
    }

    #[test]
    fn a_negotiation_that_completes_reports_the_export() {
        let flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 20).to_be_bytes());
        info.extend_from_slice(&TF_HAS_FLAGS.to_be_bytes());
        let script = [
            greeting(flags),
            option_reply(OPT_COLO, REP_ERR_UNSUP, &[]),
            option_reply(OPT_GO, REP_INFO, &info),
            option_reply(OPT_GO, REP_ACK, &[]),
        ]
        .concat();
        let info = negotiate_with(&script).unwrap();
        assert_eq!((info.size, info.flags, info.colo), (1 << 20, TF_HAS_FLAGS, false));
    }

    #[test]
    fn messages_and_kinds_of_every_client_error() {
        let cases: [(ClientError, &str, io::ErrorKind); 12] = [
            (ClientError::Unresolved("nowhere:10809".into()), "cannot resolve nowhere:10809", io::ErrorKind::NotFound),
            (ClientError::TlsNeedsTcp, "TLS needs a TCP secondary (nbd://HOST:PORT)", io::ErrorKind::InvalidInput),
            (ClientError::NotNewstyle, "not a newstyle NBD server", io::ErrorKind::InvalidData),
            (ClientError::NotFixedNewstyle, "server does not speak fixed newstyle", io::ErrorKind::InvalidData),
            (
                ClientError::TlsRefused { reply: REP_ERR_UNSUP, message: "no TLS here".into() },
                "server refused TLS (reply 0x80000001: no TLS here)",
                io::ErrorKind::ConnectionRefused,
            ),
            (
                ClientError::WrongOption { got: 9, expected: "checksum" },
                "reply to option 0x9 instead of the checksum option",
                io::ErrorKind::InvalidData,
            ),
            (ClientError::BadOptionReplyMagic, "bad option reply magic", io::ErrorKind::InvalidData),
            (ClientError::OptionReplyTooLong(70000), "option reply of 70000 bytes", io::ErrorKind::InvalidData),
            (
                ClientError::ExportRefused { export: "x".into(), reply: REP_ERR_UNKNOWN, message: String::new() },
                "server refused export 'x' (reply 0x80000006: )",
                io::ErrorKind::ConnectionRefused,
            ),
            (ClientError::NoExportInfo, "server sent no export information", io::ErrorKind::InvalidData),
            (ClientError::BadReplyMagic(0x1234), "bad reply magic 0x1234", io::ErrorKind::InvalidData),
            (
                ClientError::ChecksumCount { got: 3, expected: 4 },
                "malformed checksum reply: 3 hashes where 4 were asked for",
                io::ErrorKind::InvalidData,
            ),
        ];
        for (e, text, kind) in cases {
            assert_eq!(e.to_string(), text);
            assert_eq!(e.kind(), kind, "{e:?}");
            // Where an io::Error carries it: same kind, same text, the typed error inside.
            let io: io::Error = e.into();
            assert_eq!((io.kind(), io.to_string()), (kind, text.to_string()));
            assert!(io.get_ref().and_then(|i| i.downcast_ref::<ClientError>()).is_some(), "{io:?}");
        }
        // A socket error comes back as it was, OS error code included.
        let io: io::Error = ClientError::Io(io::Error::from_raw_os_error(libc::ECONNRESET)).into();
        assert_eq!(io.raw_os_error(), Some(libc::ECONNRESET));
    }

    #[test]
    fn a_reply_with_a_bad_magic_breaks_the_link_as_invalid_data() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let mut reply = [0u8; 16];
        reply[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        server.write_all(&reply).unwrap();
        let e = read_reply(&mut Stream::Unix(client)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(e.to_string(), "bad reply magic 0xdeadbeef");
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<ClientError>());
        assert!(matches!(inner, Some(ClientError::BadReplyMagic(0xdead_beef))), "{e:?}");
    }
}
