//! NBD server: fixed newstyle negotiation (EXPORT_NAME, GO, INFO, LIST, ABORT), then
//! transmission with pipelined requests served by a few threads per connection, so replies
//! can go out of order. Every length and offset is checked against the export before any
//! buffer is allocated; a client that breaks the framing is disconnected.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::wire::*;

/// What the server exports. Called from the server's threads, concurrently.
pub trait NbdExport: Send + Sync + 'static {
    /// Export size in bytes.
    fn size(&self) -> u64;
    /// Refuse writes.
    fn read_only(&self) -> bool {
        false
    }
    /// Reads `buf.len()` bytes at `offset` (in range).
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset` (in range); `fua`: durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards a range (reads may return anything afterwards).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes a range; `may_trim` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()>;
    /// Whether a new client may connect now (`Err(reason)` refuses it).
    fn admit(&self) -> Result<(), String> {
        Ok(())
    }
    /// Whether the export takes COLO checkpoint barriers ([`OPT_COLO`] is acknowledged).
    fn colo_barriers(&self) -> bool {
        false
    }
    /// A checkpoint barrier with sequence number `seq` (see [`CMD_COLO_BARRIER`]). Runs after
    /// every earlier request of the connection completed and before any later one starts.
    fn barrier(&self, _seq: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// TCP `host:port`.
    Tcp(String),
    /// A UNIX socket path.
    Unix(std::path::PathBuf),
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
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// The next connection and, for TCP, the peer's address.
    fn accept(&self) -> io::Result<(Stream, Option<std::net::IpAddr>)> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nodelay(true)?;
                (Stream::Tcp(s), Some(peer.ip()))
            }
            Listener::Unix(l) => (Stream::Unix(l.accept()?.0), None),
        })
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct NbdServerConfig {
    /// The export name clients must ask for.
    pub export_name: String,
    /// Most clients connected at once.
    pub max_clients: usize,
    /// Threads serving one connection's requests (the pipelining depth served in parallel).
    pub threads_per_client: usize,
    /// TCP peers allowed to connect (empty: all).
    pub allow: super::allow::AllowList,
    /// Require TLS (STARTTLS first) with these credentials.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Counters shown by `query-replication`.
#[derive(Debug, Default)]
pub struct NbdStats {
    /// Connected clients.
    pub clients: AtomicUsize,
    /// Write-type requests served.
    pub writes: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Clients disconnected for protocol violations.
    pub bad_clients: AtomicU64,
    /// Connections refused (allow-list, client limit, server closed).
    pub refused: AtomicU64,
}

struct Shared {
    cfg: NbdServerConfig,
    export: Arc<dyn NbdExport>,
    conns: Mutex<Vec<(u64, Stream)>>,
    stats: Arc<NbdStats>,
    closed: AtomicBool,
}

/// A running server; dropping it does not stop it (see [`NbdServer::disconnect_all`]).
#[derive(Clone)]
pub struct NbdServer {
    shared: Arc<Shared>,
}

impl NbdServer {
    /// Binds `addr` (UNIX sockets are created mode 0600) and serves on background threads.
    pub fn start(addr: &NbdAddress, cfg: NbdServerConfig, export: Arc<dyn NbdExport>) -> io::Result<NbdServer> {
        let listener = match addr {
            NbdAddress::Tcp(a) => Listener::Tcp(TcpListener::bind(a)?),
            NbdAddress::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p)?;
                std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                Listener::Unix(l)
            }
        };
        let shared = Shared::new(cfg, export);
        let s2 = shared.clone();
        std::thread::Builder::new().name("nbd-accept".into()).spawn(move || accept_loop(listener, s2))?;
        Ok(NbdServer { shared })
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<NbdStats> {
        self.shared.stats.clone()
    }

    /// Disconnects every client (their in-flight requests finish first on their threads).
    pub fn disconnect_all(&self) {
        for (_, s) in lock(&self.shared.conns).iter() {
            s.shutdown();
        }
    }

    /// Serves one already-connected client on the calling thread until it leaves (used by
    /// the fuzz target `fuzz/fuzz_targets/nbd_server.rs` over a socket pair).
    pub fn serve_stream(stream: Stream, cfg: NbdServerConfig, export: Arc<dyn NbdExport>) -> io::Result<()> {
        let shared = Shared::new(cfg, export);
        serve_client(stream, &shared)
    }

    /// Stops accepting for good and disconnects everyone.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.disconnect_all();
    }
}

impl Shared {
    fn new(cfg: NbdServerConfig, export: Arc<dyn NbdExport>) -> Arc<Shared> {
        Arc::new(Shared {
            cfg,
            export,
            conns: Mutex::new(Vec::new()),
            stats: Arc::new(NbdStats::default()),
            closed: AtomicBool::new(false),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("nbd: accept failed: {e}");
                continue;
            }
        };
        if shared.closed.load(Ordering::Acquire) {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            stream.shutdown();
            continue;
        }
        if let Some(ip) = peer
            && !shared.cfg.allow.permits(&ip)
        {
            log::warn!("nbd: refusing a connection from {ip}: not in the allow-list");
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            stream.shutdown();
            continue;
        }
        if shared.stats.clients.load(Ordering::Acquire) >= shared.cfg.max_clients {
            log::warn!("nbd: client limit {} reached, refusing a connection", shared.cfg.max_clients);
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            stream.shutdown();
            continue;
        }
        next_id += 1;
        let id = next_id;
        let Ok(ctl) = stream.try_clone() else {
            continue;
        };
        lock(&shared.conns).push((id, ctl));
        shared.stats.clients.fetch_add(1, Ordering::AcqRel);
        let s2 = shared.clone();
        let spawned = std::thread::Builder::new().name("nbd-client".into()).spawn(move || {
            match serve_client(stream, &s2) {
                Ok(()) => log::info!("nbd: client {id} disconnected"),
                Err(e) => log::info!("nbd: client {id} ended: {e}"),
            }
            lock(&s2.conns).retain(|(i, _)| *i != id);
            s2.stats.clients.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = spawned {
            log::error!("nbd: cannot start client thread: {e}");
        }
    }
}

fn read_exact<const N: usize>(s: &mut Stream) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn protocol_error(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// What negotiation ended with.
enum Negotiated {
    /// The client left (ABORT).
    Aborted,
    /// Transmission phase; `colo`: the client enabled the barrier extension.
    Transmission { colo: bool },
}

/// Negotiation up to the transmission phase (or an abort).
fn negotiate(s: &mut Stream, shared: &Shared) -> io::Result<Negotiated> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client_flags = u32::from_be_bytes(read_exact::<4>(s)?);
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(protocol_error(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let export = &shared.export;
    let tflags = transmission_flags(&**export);
    let mut colo = false;
    let mut tls_up = false;
    loop {
        let hdr = read_exact::<16>(s)?;
        if u64::from_be_bytes(hdr[0..8].try_into().unwrap_or_default()) != IHAVEOPT {
            return Err(protocol_error("bad option magic".into()));
        }
        let opt = u32::from_be_bytes(hdr[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(hdr[12..16].try_into().unwrap_or_default());
        if len > MAX_OPTION {
            return Err(protocol_error(format!("option {opt} too long ({len} bytes)")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        if let Some(cfg) = &shared.cfg.tls
            && !tls_up
        {
            match opt {
                OPT_STARTTLS if data.is_empty() => {
                    s.write_all(&option_reply(opt, REP_ACK, &[]))?;
                    let tcp = std::mem::replace(s, s.try_clone()?);
                    *s = super::tls::accept(tcp, cfg.clone())?;
                    tls_up = true;
                }
                OPT_EXPORT_NAME => return Err(protocol_error("EXPORT_NAME without TLS".into())),
                OPT_ABORT => {
                    let _ = s.write_all(&option_reply(opt, REP_ACK, &[]));
                    return Ok(Negotiated::Aborted);
                }
                _ => s.write_all(&option_reply(opt, REP_ERR_TLS_REQD, b"TLS is required"))?,
            }
            continue;
        }
        match opt {
            OPT_EXPORT_NAME => {
                if data != shared.cfg.export_name.as_bytes() {
                    return Err(protocol_error(format!("unknown export '{}'", String::from_utf8_lossy(&data))));
                }
                if let Err(why) = export.admit() {
                    return Err(protocol_error(format!("client refused: {why}")));
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size().to_be_bytes());
                b.extend_from_slice(&tflags.to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                return Ok(Negotiated::Transmission { colo });
            }
            OPT_ABORT => {
                let _ = s.write_all(&option_reply(opt, REP_ACK, &[]));
                return Ok(Negotiated::Aborted);
            }
            OPT_COLO if export.colo_barriers() && data.is_empty() => {
                colo = true;
                s.write_all(&option_reply(opt, REP_ACK, &[]))?;
            }
            OPT_LIST => {
                if !data.is_empty() {
                    s.write_all(&option_reply(opt, REP_ERR_INVALID, &[]))?;
                    continue;
                }
                let name = shared.cfg.export_name.as_bytes();
                let mut d = Vec::with_capacity(4 + name.len());
                d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                d.extend_from_slice(name);
                s.write_all(&option_reply(opt, REP_SERVER, &d))?;
                s.write_all(&option_reply(opt, REP_ACK, &[]))?;
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = parse_info_request(&data) else {
                    s.write_all(&option_reply(opt, REP_ERR_INVALID, &[]))?;
                    continue;
                };
                if name != shared.cfg.export_name.as_bytes() {
                    s.write_all(&option_reply(opt, REP_ERR_UNKNOWN, b"unknown export"))?;
                    continue;
                }
                if opt == OPT_GO
                    && let Err(why) = export.admit()
                {
                    s.write_all(&option_reply(opt, REP_ERR_SHUTDOWN, why.as_bytes()))?;
                    continue;
                }
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.size().to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                s.write_all(&option_reply(opt, REP_INFO, &info))?;
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&512u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                s.write_all(&option_reply(opt, REP_INFO, &bs))?;
                s.write_all(&option_reply(opt, REP_ACK, &[]))?;
                if opt == OPT_GO {
                    return Ok(Negotiated::Transmission { colo });
                }
            }
            OPT_STARTTLS if tls_up => s.write_all(&option_reply(opt, REP_ERR_INVALID, b"TLS is already up"))?,
            OPT_STARTTLS => s.write_all(&option_reply(opt, REP_ERR_POLICY, b"TLS is not configured"))?,
            _ => s.write_all(&option_reply(opt, REP_ERR_UNSUP, &[]))?,
        }
    }
}

/// Export name of an INFO/GO payload: u32 length, name, u16 count, count * u16.
fn parse_info_request(d: &[u8]) -> Option<&[u8]> {
    let n = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4usize.checked_add(n)?)?;
    let rest = d.get(4 + n..)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    (rest.len() == 2 + 2 * count).then_some(name)
}

fn transmission_flags(e: &dyn NbdExport) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN;
    if e.read_only() {
        f |= TF_READ_ONLY;
    }
    f
}

enum Job {
    Read(Request),
    Write(Request, Vec<u8>),
    Other(Request),
}

/// Requests of one connection handed to its workers and not yet answered. Counting is two
/// atomic operations per request; the lock and the wake-up are only paid while a barrier
/// waits for the count to reach zero.
#[derive(Default)]
struct Inflight {
    count: AtomicUsize,
    waiting: AtomicBool,
    lock: Mutex<()>,
    idle: std::sync::Condvar,
}

impl Inflight {
    fn add(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }
    fn done(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 && self.waiting.load(Ordering::SeqCst) {
            let _g = lock(&self.lock);
            self.idle.notify_all();
        }
    }
    fn wait_idle(&self) {
        self.waiting.store(true, Ordering::SeqCst);
        let mut g = lock(&self.lock);
        while self.count.load(Ordering::SeqCst) > 0 {
            g = self.idle.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        drop(g);
        self.waiting.store(false, Ordering::SeqCst);
    }
}

fn serve_client(mut s: Stream, shared: &Arc<Shared>) -> io::Result<()> {
    let colo = match negotiate(&mut s, shared)? {
        Negotiated::Aborted => return Ok(()),
        Negotiated::Transmission { colo } => colo,
    };
    let writer = Arc::new(Mutex::new(s.try_clone()?));
    let inflight = Arc::new(Inflight::default());
    let (tx, rx) = mpsc::sync_channel::<Job>(shared.cfg.threads_per_client * 2);
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..shared.cfg.threads_per_client.max(1) {
        let (rx, writer, shared, inflight) = (rx.clone(), writer.clone(), shared.clone(), inflight.clone());
        workers.push(std::thread::spawn(move || {
            loop {
                let job = lock(&rx).recv();
                let Ok(job) = job else { break };
                // A failed reply (the client went away) does not stop this worker: it keeps
                // taking jobs until the reader ends, so the channel never fills up behind a
                // dead worker and a barrier never waits for a job nobody runs.
                let _ = execute(job, &writer, &shared);
                inflight.done();
            }
        }));
    }
    let barriers =
        colo.then(|| Barriers { writer: writer.clone(), inflight: inflight.clone(), shared: shared.clone() });
    let result = read_requests(&mut s, &tx, &inflight, barriers.as_ref());
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    if let Err(e) = &result
        && e.kind() == io::ErrorKind::InvalidData
    {
        shared.stats.bad_clients.fetch_add(1, Ordering::Relaxed);
        log::warn!("nbd: disconnecting client: {e}");
    }
    s.shutdown();
    result
}

/// What the reader needs to run COLO barriers in order (only when the client enabled them).
struct Barriers {
    writer: Arc<Mutex<Stream>>,
    inflight: Arc<Inflight>,
    shared: Arc<Shared>,
}

impl Barriers {
    /// Runs a barrier in the reader's thread: every earlier request is answered first, and no
    /// later one is read before it is done, so the barrier splits the stream into epochs.
    fn run(&self, req: &Request) -> io::Result<()> {
        self.inflight.wait_idle();
        let code = match self.shared.export.barrier(req.offset) {
            Ok(()) => 0,
            Err(e) => {
                log::warn!("nbd: checkpoint barrier {} failed: {e}", req.offset);
                self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                errno_to_nbd(&e)
            }
        };
        reply(&self.writer, code, req.handle, None)
    }
}

/// Reads requests and hands them to the workers; returns on DISC, EOF or a protocol error.
fn read_requests(
    s: &mut Stream,
    tx: &mpsc::SyncSender<Job>,
    inflight: &Inflight,
    barriers: Option<&Barriers>,
) -> io::Result<()> {
    let send = |job: Job| {
        inflight.add();
        let sent = tx.send(job).is_ok();
        if !sent {
            inflight.done();
        }
        sent
    };
    loop {
        let raw = match read_exact::<REQUEST_LEN>(s) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(req) = Request::decode(&raw) else {
            return Err(protocol_error("bad request magic".into()));
        };
        match req.cmd {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if req.length > MAX_PAYLOAD {
                    // The payload cannot be skipped safely: the framing is lost.
                    return Err(protocol_error(format!("write of {} bytes exceeds the limit", req.length)));
                }
                let mut data = vec![0u8; req.length as usize];
                s.read_exact(&mut data)?;
                if !send(Job::Write(req, data)) {
                    return Ok(());
                }
            }
            CMD_READ => {
                if !send(Job::Read(req)) {
                    return Ok(());
                }
            }
            CMD_COLO_BARRIER if barriers.is_some() && req.length == 0 && req.flags == 0 => {
                if let Some(b) = barriers {
                    b.run(&req)?;
                }
            }
            _ => {
                if !send(Job::Other(req)) {
                    return Ok(());
                }
            }
        }
    }
}

fn in_range(req: &Request, size: u64) -> bool {
    req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= size)
}

fn reply(writer: &Mutex<Stream>, error: u32, handle: u64, data: Option<&[u8]>) -> io::Result<()> {
    let mut w = lock(writer);
    w.write_all(&simple_reply(error, handle))?;
    if let Some(d) = data {
        w.write_all(d)?;
    }
    Ok(())
}

/// Runs one request and sends its reply.
fn execute(job: Job, writer: &Mutex<Stream>, shared: &Shared) -> io::Result<()> {
    let e = &shared.export;
    let size = e.size();
    let stats = &shared.stats;
    let req = match &job {
        Job::Read(r) | Job::Write(r, _) | Job::Other(r) => *r,
    };
    let fail = |code: u32| {
        stats.errors.fetch_add(1, Ordering::Relaxed);
        reply(writer, code, req.handle, None)
    };
    let known_flags = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE;
    if req.flags & !known_flags != 0 {
        return fail(EINVAL);
    }
    let writes = matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && e.read_only() {
        return fail(EPERM);
    }
    if matches!(req.cmd, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) && !in_range(&req, size) {
        return fail(EINVAL);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let done = |r: io::Result<()>| match r {
        Ok(()) => {
            if writes {
                stats.writes.fetch_add(1, Ordering::Relaxed);
                stats.bytes_written.fetch_add(u64::from(req.length), Ordering::Relaxed);
            }
            reply(writer, 0, req.handle, None)
        }
        Err(err) => {
            log::warn!("nbd: command {} at {}+{} failed: {err}", req.cmd, req.offset, req.length);
            fail(errno_to_nbd(&err))
        }
    };
    match job {
        Job::Read(r) => {
            if r.length > MAX_PAYLOAD {
                return fail(EINVAL);
            }
            let mut buf = vec![0u8; r.length as usize];
            match e.read(r.offset, &mut buf) {
                Ok(()) => reply(writer, 0, r.handle, Some(&buf)),
                Err(err) => {
                    log::warn!("nbd: read at {}+{} failed: {err}", r.offset, r.length);
                    fail(errno_to_nbd(&err))
                }
            }
        }
        Job::Write(r, data) => done(e.write(r.offset, &data, fua)),
        Job::Other(r) => match r.cmd {
            CMD_FLUSH => done(e.flush()),
            CMD_TRIM => done(e.trim(r.offset, u64::from(r.length)).and_then(|()| if fua { e.flush() } else { Ok(()) })),
            CMD_WRITE_ZEROES => done(
                e.write_zeroes(r.offset, u64::from(r.length), r.flags & CMD_FLAG_NO_HOLE == 0)
                    .and_then(|()| if fua { e.flush() } else { Ok(()) }),
            ),
            _ => fail(EINVAL),
        },
    }
}
