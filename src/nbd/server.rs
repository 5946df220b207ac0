//! NBD server: fixed newstyle negotiation (EXPORT_NAME, GO, INFO, LIST, ABORT, structured
//! replies and the `base:allocation` metadata context, see [`super::structured`]), then
//! transmission with pipelined requests served by a few threads per connection, so replies
//! can go out of order. Every length and offset is checked against the export before any
//! buffer is allocated; a client that breaks the framing is disconnected.
//!
//! What a peer can hold is bounded (docs/security.md, "Peer denial of service"):
//! - negotiation must finish within [`HANDSHAKE_TIMEOUT`] (TLS handshake included), and at most
//!   [`NEGOTIATING_MAX`] connections negotiate at once: a new one evicts the oldest, so idle
//!   connections cannot keep the primary out; `max_clients` counts established connections;
//! - TCP keepalive ends connections whose peer vanished (a partition, a power cut);
//! - a connection's payload buffers (queued writes, reads being answered) stay within
//!   [`CONN_BUDGET`] bytes, taken before a buffer is allocated, and a reply that cannot be sent
//!   within [`REPLY_TIMEOUT`] disconnects the client (one that stops reading); a write's
//!   payload must arrive within [`PAYLOAD_GRACE`] plus its length at [`MIN_PAYLOAD_RATE`]
//!   (a client trickling it is disconnected);
//! - ordering across connections: when a connection ends, its requests not started yet are
//!   dropped, and a connection entering transmission after another one ended waits until that
//!   one's started requests finished, so a dead connection's write never lands after a newer
//!   connection's acknowledged one, and a dead connection's barrier never runs.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::checksum::{self, CHECKSUM_BLOCK, CHECKSUM_PIECE, CMD_COLO_CHECKSUM, MAX_CHECKSUM_LEN, OPT_COLO_CHECKSUM};
use super::structured::{self, ReplyMode};
use super::timed::{self, Deadline};
use super::transport::{Listener, NbdAddress, NbdListener, Stream};
use super::wire::*;

/// How long a connection may take from accept to the transmission phase.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections negotiating at once; one more evicts the oldest.
pub const NEGOTIATING_MAX: usize = 16;
/// Payload bytes one connection may hold in memory (queued write payloads and read buffers).
/// At least [`MAX_PAYLOAD`], so any valid request fits.
pub const CONN_BUDGET: usize = 2 * MAX_PAYLOAD as usize;
/// How long a reply may wait for the client to make room before the client is disconnected.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a connection entering transmission waits for an ended connection's started
/// requests, and a barrier for the requests before it.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A write's payload must arrive within this plus its length at [`MIN_PAYLOAD_RATE`].
pub const PAYLOAD_GRACE: Duration = Duration::from_secs(15);

/// The slowest payload transfer a client may keep a write open with, in bytes per second.
pub const MIN_PAYLOAD_RATE: u64 = 1 << 20;

/// The deadline for a write payload of `bytes` that starts arriving now.
fn payload_deadline(bytes: usize) -> Deadline {
    Deadline::after(PAYLOAD_GRACE + Duration::from_secs(bytes as u64 / MIN_PAYLOAD_RATE), "a write's payload")
}
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
    /// The allocation of [offset, offset + len) (in range, `len > 0`) for block status
    /// (`base:allocation`): `(length, hole)` extents in order, at most `max`, covering at
    /// least the first byte and nothing past the range. A hole must read as zeroes. Default:
    /// all data.
    fn extents(&self, _offset: u64, len: u64, _max: usize) -> io::Result<Vec<(u64, bool)>> {
        Ok(vec![(len, false)])
    }
    /// Whether a new client may connect now (`Err(reason)` refuses it).
    fn admit(&self) -> Result<(), String> {
        Ok(())
    }
    /// Whether the export takes COLO checkpoint barriers ([`OPT_COLO`] is acknowledged).
    fn colo_barriers(&self) -> bool {
        false
    }
    /// The highest barrier number received so far (0: none), told to a client in the
    /// [`OPT_COLO`] acknowledgement so a restarted primary numbers its barriers above it.
    fn last_barrier(&self) -> u64 {
        0
    }
    /// A checkpoint barrier with sequence number `seq` (see [`CMD_COLO_BARRIER`]). Runs after
    /// every earlier request of the connection completed and before any later one starts.
    fn barrier(&self, _seq: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// The disk's data generation (0: unknown) and whether this process has applied every
    /// write since it adopted it (no restart in between), told in the [`OPT_COLO`]
    /// acknowledgement.
    fn generation(&self) -> (u64, bool) {
        (0, false)
    }
    /// Adopts data generation `g` (see [`CMD_COLO_ADOPT`]); runs like a barrier.
    fn adopt_generation(&self, _g: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Whether the export offers block checksums ([`OPT_COLO_CHECKSUM`] is acknowledged).
    fn offers_checksums(&self) -> bool {
        false
    }
    /// Appends the hash of each [`CHECKSUM_BLOCK`] of [offset, offset + len) (in range) to
    /// `out`, reading what [`NbdExport::read`] serves in pieces of [`CHECKSUM_PIECE`] bytes.
    fn checksums(&self, offset: u64, len: u64, out: &mut Vec<u64>) -> io::Result<()> {
        thread_local! {
            /// Each server worker thread hashes through one buffer of CHECKSUM_PIECE bytes
            /// (a fresh 1 MiB allocation per request costs more than hashing it).
            static PIECE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        PIECE.with_borrow_mut(|buf| {
            buf.resize(CHECKSUM_PIECE, 0);
            let mut at = 0u64;
            while at < len {
                // CHECKSUM_PIECE is a multiple of CHECKSUM_BLOCK: only the last block is short.
                let n = (len - at).min(CHECKSUM_PIECE as u64) as usize;
                self.read(offset + at, &mut buf[..n])?;
                checksum::block_hashes(&buf[..n], out);
                at += n as u64;
            }
            Ok(())
        })
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct NbdServerConfig {
    /// The export name clients must ask for.
    pub export_name: String,
    /// Most clients in the transmission phase at once (negotiating ones are limited apart,
    /// see [`NEGOTIATING_MAX`]).
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
    /// Clients in the transmission phase.
    pub clients: AtomicUsize,
    /// Connections still negotiating.
    pub negotiating: AtomicUsize,
    /// Requests of ended connections dropped before they started.
    pub dropped: AtomicU64,
    /// Write-type requests served.
    pub writes: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Clients disconnected for protocol violations.
    pub bad_clients: AtomicU64,
    /// Connections refused (allow-list, client limit, server closed, evicted while
    /// negotiating, negotiation deadline).
    pub refused: AtomicU64,
}

/// One connection as the server tracks it.
struct Conn {
    id: u64,
    /// In the transmission phase (counted in `clients`).
    established: bool,
    state: Arc<ConnState>,
}

/// What other connections and the connection's own threads share about it.
struct ConnState {
    /// The transport socket (TCP even under TLS): probed for a hang-up, shut down to end
    /// the connection.
    transport: Stream,
    /// The connection is over: requests not started yet are dropped, none is read anymore.
    dead: AtomicBool,
    /// The reader stopped (DISC, end of file, error): no request is added anymore.
    ended: AtomicBool,
    /// Requests handed to the workers (or a barrier running) and not finished.
    inflight: Inflight,
    /// Payload bytes held by the connection.
    budget: Budget,
    /// Why the connection failed first (a reply that could not be sent).
    failure: Mutex<Option<io::Error>>,
}

impl ConnState {
    fn new(transport: Stream) -> ConnState {
        ConnState {
            transport,
            dead: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            inflight: Inflight::default(),
            budget: Budget::new(CONN_BUDGET),
            failure: Mutex::new(None),
        }
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Marks the connection over and wakes its reader.
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.budget.wake();
    }

    /// Records a failed reply and ends the connection.
    fn fail(&self, e: io::Error) {
        let mut f = lock(&self.failure);
        if f.is_none() {
            *f = Some(e);
        }
        drop(f);
        self.kill();
        self.transport.shutdown();
    }
}

/// A byte budget: payload buffers are only allocated once their bytes are taken.
struct Budget {
    left: Mutex<usize>,
    freed: Condvar,
}

impl Budget {
    fn new(bytes: usize) -> Budget {
        Budget { left: Mutex::new(bytes), freed: Condvar::new() }
    }

    /// Takes `n` bytes, waiting for them; `false` once `dead` says the connection is over.
    fn take(&self, n: usize, dead: &AtomicBool) -> bool {
        let mut left = lock(&self.left);
        loop {
            if dead.load(Ordering::SeqCst) {
                return false;
            }
            if *left >= n {
                *left -= n;
                return true;
            }
            // The wait ends when bytes come back or the connection dies (both notify); the
            // time limit only guards against a missed wake-up.
            left = self.freed.wait_timeout(left, Duration::from_secs(1)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn give(&self, n: usize) {
        if n > 0 {
            *lock(&self.left) += n;
            self.freed.notify_all();
        }
    }

    fn wake(&self) {
        let _g = lock(&self.left);
        self.freed.notify_all();
    }
}

struct Shared {
    cfg: NbdServerConfig,
    export: Arc<dyn NbdExport>,
    conns: Mutex<Vec<Conn>>,
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
        NbdServer::serve(NbdListener::bind(addr)?, cfg, export)
    }

    /// Serves an already bound listener on background threads.
    pub fn serve(listener: NbdListener, cfg: NbdServerConfig, export: Arc<dyn NbdExport>) -> io::Result<NbdServer> {
        let shared = Shared::new(cfg, export);
        let s2 = shared.clone();
        std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listener.into_listener(), s2))?;
        Ok(NbdServer { shared })
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<NbdStats> {
        self.shared.stats.clone()
    }

    /// Disconnects every client (their in-flight requests finish first on their threads).
    pub fn disconnect_all(&self) {
        for c in lock(&self.shared.conns).iter() {
            c.state.transport.shutdown();
        }
    }

    /// Serves one already-connected client on the calling thread until it leaves (used by
    /// the fuzz target `fuzz/fuzz_targets/nbd_server.rs` over a socket pair).
    pub fn serve_stream(stream: Stream, cfg: NbdServerConfig, export: Arc<dyn NbdExport>) -> io::Result<()> {
        let shared = Shared::new(cfg, export);
        let state = Arc::new(ConnState::new(stream.try_clone()?));
        serve_client(stream, &shared, 0, &state)
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

impl Shared {
    /// Moves connection `id` to the transmission phase if the client limit allows it.
    fn establish(&self, id: u64) -> bool {
        let mut conns = lock(&self.conns);
        if conns.iter().filter(|c| c.established).count() >= self.cfg.max_clients {
            return false;
        }
        if let Some(c) = conns.iter_mut().find(|c| c.id == id) {
            c.established = true;
            self.stats.negotiating.fetch_sub(1, Ordering::AcqRel);
        }
        self.stats.clients.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Waits until every connection that ended before `id` entered transmission has finished
    /// its started requests. A connection whose peer hung up counts as ended (its reader may
    /// not have noticed yet, e.g. while it waits for a worker) and is killed first, so its
    /// requests not started yet are dropped.
    fn order_after_ended(&self, id: u64) -> io::Result<()> {
        let earlier: Vec<(u64, Arc<ConnState>)> =
            lock(&self.conns).iter().filter(|c| c.id != id && c.established).map(|c| (c.id, c.state.clone())).collect();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for (other, st) in earlier {
            if !st.ended.load(Ordering::SeqCst) && !st.is_dead() {
                if !st.transport.hung_up() {
                    continue;
                }
                log::info!("nbd: client {other} hung up; client {id} waits for its started requests");
                st.kill();
            }
            if !st.inflight.wait_idle(deadline) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("requests of the ended client {other} did not finish within {DRAIN_TIMEOUT:?}"),
                ));
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    let mut last_eviction_log: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("nbd: accept failed: {e}");
                // A persistent failure (out of descriptors) must not spin.
                std::thread::sleep(Duration::from_millis(100));
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
        let Ok(transport) = stream.try_clone() else {
            continue;
        };
        next_id += 1;
        let id = next_id;
        let state = Arc::new(ConnState::new(transport));
        {
            let mut conns = lock(&shared.conns);
            // Negotiating connections are capped apart from established ones: the oldest
            // gives way, so idle or slow peers cannot keep the primary from getting in.
            let negotiating: Vec<&Conn> = conns.iter().filter(|c| !c.established && !c.state.is_dead()).collect();
            if negotiating.len() >= NEGOTIATING_MAX
                && let Some(oldest) = negotiating.iter().min_by_key(|c| c.id)
            {
                if last_eviction_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    log::warn!(
                        "nbd: {NEGOTIATING_MAX} connections are negotiating; closing the oldest (client {})",
                        oldest.id
                    );
                    last_eviction_log = Some(Instant::now());
                }
                oldest.state.kill();
                oldest.state.transport.shutdown();
                shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            }
            conns.push(Conn { id, established: false, state: state.clone() });
        }
        shared.stats.negotiating.fetch_add(1, Ordering::AcqRel);
        let s2 = shared.clone();
        let spawned = std::thread::Builder::new().name("nbd-client".into()).spawn(move || {
            match serve_client(stream, &s2, id, &state) {
                Ok(()) => log::info!("nbd: client {id} disconnected"),
                Err(e) => log::info!("nbd: client {id} ended: {e}"),
            }
            state.transport.shutdown();
            let mut conns = lock(&s2.conns);
            if let Some(i) = conns.iter().position(|c| c.id == id) {
                let c = conns.swap_remove(i);
                let counter = if c.established { &s2.stats.clients } else { &s2.stats.negotiating };
                counter.fetch_sub(1, Ordering::AcqRel);
            }
        });
        if let Err(e) = spawned {
            log::error!("nbd: cannot start client thread: {e}");
            let mut conns = lock(&shared.conns);
            conns.retain(|c| c.id != id);
            shared.stats.negotiating.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn protocol_error(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// What negotiation ended with.
enum Negotiated {
    /// The client left (ABORT).
    Aborted,
    /// Transmission phase; `colo`: the client enabled the barrier extension; `mode`: how
    /// replies are sent.
    Transmission { colo: bool, mode: ReplyMode },
}

/// Negotiation up to the transmission phase (or an abort).
/// Everything must finish by `d`.
fn negotiate(s: &mut Stream, shared: &Shared, id: u64, d: &Deadline) -> io::Result<Negotiated> {
    d.write_all(s, &server_hello(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))?;
    let client_flags = u32::from_be_bytes(read_exact::<4>(s, d)?);
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(protocol_error(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let export = &shared.export;
    let tflags = transmission_flags(&**export);
    let mut colo = false;
    let mut mode = ReplyMode::default();
    let mut tls_up = false;
    loop {
        let hdr = read_exact::<16>(s, d)?;
        if u64::from_be_bytes(hdr[0..8].try_into().unwrap_or_default()) != IHAVEOPT {
            return Err(protocol_error("bad option magic".into()));
        }
        let opt = u32::from_be_bytes(hdr[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(hdr[12..16].try_into().unwrap_or_default());
        if len > MAX_OPTION {
            return Err(protocol_error(format!("option {opt} too long ({len} bytes)")));
        }
        let mut data = vec![0u8; len as usize];
        d.read_exact(s, &mut data)?;
        if let Some(cfg) = &shared.cfg.tls
            && !tls_up
        {
            match opt {
                OPT_STARTTLS if data.is_empty() => {
                    send(s, d, OptionReply::ack(opt))?;
                    let tcp = std::mem::replace(s, s.try_clone()?);
                    *s = super::tls::accept(tcp, cfg.clone(), d.at())?;
                    tls_up = true;
                }
                OPT_EXPORT_NAME => return Err(protocol_error("EXPORT_NAME without TLS".into())),
                OPT_ABORT => {
                    let _ = send(s, d, OptionReply::ack(opt));
                    return Ok(Negotiated::Aborted);
                }
                _ => send(s, d, OptionReply::error(opt, REP_ERR_TLS_REQD, "TLS is required"))?,
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
                if !shared.establish(id) {
                    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(protocol_error(format!("client limit {} reached", shared.cfg.max_clients)));
                }
                d.write_all(s, &export_name_reply(export.size(), tflags, !no_zeroes))?;
                return Ok(Negotiated::Transmission { colo, mode });
            }
            OPT_ABORT => {
                let _ = send(s, d, OptionReply::ack(opt));
                return Ok(Negotiated::Aborted);
            }
            OPT_COLO if export.colo_barriers() && data.is_empty() => {
                colo = true;
                // Last barrier number, data generation, flags (bit 0: continuous).
                let (generation, continuous) = export.generation();
                send(s, d, OptionReply::colo_ack(export.last_barrier(), generation, continuous))?;
            }
            OPT_COLO_CHECKSUM if export.offers_checksums() && data.is_empty() => {
                mode.checksums = true;
                send(s, d, OptionReply::new(opt, REP_ACK, checksum::ack_payload()))?;
            }
            OPT_STRUCTURED_REPLY if data.is_empty() => {
                mode.structured = true;
                send(s, d, OptionReply::ack(opt))?;
            }
            OPT_STRUCTURED_REPLY => send(s, d, OptionReply::error(opt, REP_ERR_INVALID, "no payload expected"))?,
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let list = opt == OPT_LIST_META_CONTEXT;
                let Some((name, queries)) = structured::parse_meta_request(&data) else {
                    send(s, d, OptionReply::error(opt, REP_ERR_INVALID, "malformed meta context request"))?;
                    continue;
                };
                if !mode.structured {
                    send(s, d, OptionReply::error(opt, REP_ERR_INVALID, "structured replies come first"))?;
                    continue;
                }
                if name != shared.cfg.export_name.as_bytes() {
                    send(s, d, OptionReply::error(opt, REP_ERR_UNKNOWN, "unknown export"))?;
                    continue;
                }
                let selected = structured::selects_allocation(&queries, list);
                if !list {
                    mode.allocation = selected;
                }
                if selected {
                    let id = if list { 0 } else { structured::ALLOCATION_ID };
                    send(s, d, OptionReply::new(opt, REP_META_CONTEXT, structured::meta_context_reply(id)))?;
                }
                send(s, d, OptionReply::ack(opt))?;
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send(s, d, OptionReply::error(opt, REP_ERR_INVALID, ""))?;
                    continue;
                }
                send(s, d, OptionReply::server(opt, shared.cfg.export_name.as_bytes()))?;
                send(s, d, OptionReply::ack(opt))?;
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = parse_info_request(&data) else {
                    send(s, d, OptionReply::error(opt, REP_ERR_INVALID, ""))?;
                    continue;
                };
                if name != shared.cfg.export_name.as_bytes() {
                    send(s, d, OptionReply::error(opt, REP_ERR_UNKNOWN, "unknown export"))?;
                    continue;
                }
                if opt == OPT_GO
                    && let Err(why) = export.admit()
                {
                    send(s, d, OptionReply::error(opt, REP_ERR_SHUTDOWN, &why))?;
                    continue;
                }
                if opt == OPT_GO && !shared.establish(id) {
                    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                    log::warn!("nbd: client limit {} reached, refusing client {id}", shared.cfg.max_clients);
                    send(s, d, OptionReply::error(opt, REP_ERR_POLICY, "too many clients"))?;
                    continue;
                }
                send(s, d, OptionReply::info_export(opt, export.size(), tflags))?;
                send(s, d, OptionReply::info_block_size(opt, 512, 4096, MAX_PAYLOAD))?;
                send(s, d, OptionReply::ack(opt))?;
                if opt == OPT_GO {
                    return Ok(Negotiated::Transmission { colo, mode });
                }
            }
            OPT_STARTTLS if tls_up => send(s, d, OptionReply::error(opt, REP_ERR_INVALID, "TLS is already up"))?,
            OPT_STARTTLS => send(s, d, OptionReply::error(opt, REP_ERR_POLICY, "TLS is not configured"))?,
            _ => send(s, d, OptionReply::error(opt, REP_ERR_UNSUP, ""))?,
        }
    }
}

/// Sends one option reply by the negotiation deadline.
fn send(s: &mut Stream, d: &Deadline, reply: OptionReply) -> io::Result<()> {
    d.write_all(s, &reply.to_bytes())
}

/// Export name of an INFO/GO payload: u32 length, name, u16 count, count * u16.
fn parse_info_request(d: &[u8]) -> Option<&[u8]> {
    let n = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4usize.checked_add(n)?)?;
    let rest = d.get(4 + n..)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    (rest.len() == 2 + 2 * count).then_some(name)
}

fn read_exact<const N: usize>(s: &mut Stream, d: &Deadline) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    d.read_exact(s, &mut b)?;
    Ok(b)
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
/// atomic operations per request; the lock and the wake-up are only paid while someone (a
/// barrier, a newer connection) waits for the count to reach zero.
#[derive(Default)]
struct Inflight {
    count: AtomicUsize,
    waiting: AtomicUsize,
    lock: Mutex<()>,
    idle: Condvar,
}

impl Inflight {
    fn add(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }
    fn done(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 && self.waiting.load(Ordering::SeqCst) > 0 {
            let _g = lock(&self.lock);
            self.idle.notify_all();
        }
    }
    /// Waits until nothing is in flight; `false` if `deadline` passed first.
    fn wait_idle(&self, deadline: Instant) -> bool {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut g = lock(&self.lock);
        let mut idle = true;
        while self.count.load(Ordering::SeqCst) > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                idle = false;
                break;
            }
            g = self.idle.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(g);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        idle
    }
}

/// A request handed to a worker, with the budget bytes it holds.
struct Queued {
    job: Job,
    bytes: usize,
}

fn serve_client(mut s: Stream, shared: &Arc<Shared>, id: u64, state: &Arc<ConnState>) -> io::Result<()> {
    let deadline = Deadline::after(HANDSHAKE_TIMEOUT, "the NBD negotiation");
    let negotiated = negotiate(&mut s, shared, id, &deadline);
    if let Err(e) = &negotiated
        && e.kind() == io::ErrorKind::TimedOut
    {
        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
    }
    let (colo, mode) = match negotiated? {
        Negotiated::Aborted => return Ok(()),
        Negotiated::Transmission { colo, mode } => (colo, mode),
    };
    // Transmission: a client may stay idle (keepalive watches TCP peers), but a reply that
    // cannot be sent within REPLY_TIMEOUT ends the connection.
    s.set_timeouts(None, Some(REPLY_TIMEOUT))?;
    shared.order_after_ended(id)?;
    let writer = Arc::new(Mutex::new(s.try_clone()?));
    let (tx, rx) = mpsc::sync_channel::<Queued>(shared.cfg.threads_per_client * 2);
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..shared.cfg.threads_per_client.max(1) {
        let (rx, writer, shared, state) = (rx.clone(), writer.clone(), shared.clone(), state.clone());
        workers.push(std::thread::spawn(move || {
            loop {
                let q = lock(&rx).recv();
                let Ok(Queued { job, bytes }) = q else { break };
                // A job of a connection that is over is dropped unstarted; the worker keeps
                // taking jobs until the reader ends, so the channel never fills up behind a
                // dead worker and a barrier never waits for a job nobody runs.
                if state.is_dead() {
                    shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                } else if let Err(e) = execute(job, &writer, &shared, mode) {
                    state.fail(e);
                }
                state.budget.give(bytes);
                state.inflight.done();
            }
        }));
    }
    let barriers = colo.then(|| Barriers { writer: writer.clone(), state: state.clone(), shared: shared.clone() });
    let mut result = read_requests(&mut s, &tx, state, barriers.as_ref());
    // End of file without DISC, or an error: the connection is over and what it queued is
    // dropped. After DISC the queued requests still run (the protocol asks so).
    if !matches!(result, Ok(true)) {
        state.kill();
    }
    state.ended.store(true, Ordering::SeqCst);
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    if let Some(e) = lock(&state.failure).take() {
        let why = if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            format!("the client did not take a reply within {REPLY_TIMEOUT:?}")
        } else {
            format!("a reply could not be sent: {e}")
        };
        result = Err(io::Error::new(e.kind(), why));
    }
    if let Err(e) = &result
        && e.kind() == io::ErrorKind::InvalidData
    {
        shared.stats.bad_clients.fetch_add(1, Ordering::Relaxed);
        log::warn!("nbd: disconnecting client {id}: {e}");
    }
    s.shutdown();
    result.map(|_| ())
}

/// What the reader needs to run COLO barriers in order (only when the client enabled them).
struct Barriers {
    writer: Arc<Mutex<Stream>>,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
}

impl Barriers {
    /// Runs a barrier in the reader's thread: every earlier request is answered first, and no
    /// later one is read before it is done, so the barrier splits the stream into epochs. A
    /// barrier of a connection whose peer already hung up never runs: nobody would learn its
    /// outcome, and its commit would wrongly be triggered by what follows.
    fn run(&self, req: &Request) -> io::Result<()> {
        let st = &self.state;
        if !st.inflight.wait_idle(Instant::now() + DRAIN_TIMEOUT) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the requests before barrier {} did not finish within {DRAIN_TIMEOUT:?}", req.offset),
            ));
        }
        // Counted while it runs, so a newer connection waits for it; checked after counting,
        // so either that connection sees it running or it sees the connection dead.
        st.inflight.add();
        if st.is_dead() || st.transport.hung_up() {
            st.kill();
            st.inflight.done();
            log::warn!("nbd: the client hung up before its checkpoint barrier {} ran: barrier dropped", req.offset);
            return Err(timed::peer_closed());
        }
        let outcome = if req.cmd == CMD_COLO_ADOPT {
            self.shared.export.adopt_generation(req.offset)
        } else {
            self.shared.export.barrier(req.offset)
        };
        let code = match outcome {
            Ok(()) => 0,
            Err(e) => {
                log::warn!("nbd: checkpoint barrier or generation {:#x} failed: {e}", req.offset);
                self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                errno_to_nbd(&e)
            }
        };
        st.inflight.done();
        reply(&self.writer, code, req.handle, None)
    }
}

/// Reads requests and hands them to the workers; returns `Ok(true)` on DISC, `Ok(false)` at
/// end of file or when the connection is over, an error on a protocol violation.
fn read_requests(
    s: &mut Stream,
    tx: &mpsc::SyncSender<Queued>,
    state: &ConnState,
    barriers: Option<&Barriers>,
) -> io::Result<bool> {
    let send = |job: Job, bytes: usize| {
        state.inflight.add();
        let sent = tx.send(Queued { job, bytes }).is_ok();
        if !sent {
            state.budget.give(bytes);
            state.inflight.done();
        }
        sent
    };
    loop {
        let mut raw = [0u8; REQUEST_LEN];
        match timed::read_exact(s, &mut raw) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
        let Some(req) = Request::decode(&raw) else {
            return Err(protocol_error("bad request magic".into()));
        };
        if state.is_dead() {
            return Ok(false);
        }
        // Payload bytes are taken from the budget before any buffer exists: a read's reply
        // buffer (allocated by the worker) and a write's payload alike.
        let bytes = match req.cmd {
            CMD_READ | CMD_WRITE if req.length <= MAX_PAYLOAD => req.length as usize,
            // A checksum holds one piece being hashed and its reply.
            CMD_COLO_CHECKSUM if req.length <= MAX_CHECKSUM_LEN => {
                CHECKSUM_PIECE.min(req.length as usize) + 4 + 8 * checksum::hash_count(req.length) as usize
            }
            _ => 0,
        };
        match req.cmd {
            CMD_DISC => return Ok(true),
            CMD_WRITE => {
                if req.length > MAX_PAYLOAD {
                    // The payload cannot be skipped safely: the framing is lost.
                    return Err(protocol_error(format!("write of {} bytes exceeds the limit", req.length)));
                }
                if !state.budget.take(bytes, &state.dead) {
                    return Ok(false);
                }
                let mut data = vec![0u8; bytes];
                // A header promises its payload: a client trickling it (slow-loris) would
                // hold the payload budget and its connection slot for good.
                if let Err(e) = payload_deadline(bytes).read_exact_reading_only(s, &mut data) {
                    state.budget.give(bytes);
                    return Err(e);
                }
                if !send(Job::Write(req, data), bytes) {
                    return Ok(false);
                }
            }
            CMD_READ | CMD_COLO_CHECKSUM => {
                if !state.budget.take(bytes, &state.dead) {
                    return Ok(false);
                }
                if !send(Job::Read(req), bytes) {
                    return Ok(false);
                }
            }
            CMD_COLO_BARRIER | CMD_COLO_ADOPT if barriers.is_some() && req.length == 0 && req.flags == 0 => {
                if let Some(b) = barriers {
                    b.run(&req)?;
                }
            }
            _ => {
                if !send(Job::Other(req), 0) {
                    return Ok(false);
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
    write_all_moving(&mut w, &simple_reply(error, handle))?;
    if let Some(d) = data {
        write_all_moving(&mut w, d)?;
    }
    Ok(())
}

/// Writes all of `buf` as long as the client keeps taking it: the socket's send timeout
/// ([`REPLY_TIMEOUT`]) fails a write that moves nothing, and a write that moved only part
/// after waiting that long counts as stalled too (otherwise each partial write would start
/// the wait anew and a client taking a trickle could hold the reply far longer).
fn write_all_moving(w: &mut Stream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let t0 = Instant::now();
        match w.write(buf) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                buf = &buf[n..];
                if !buf.is_empty() && t0.elapsed() >= REPLY_TIMEOUT {
                    return Err(io::Error::from(io::ErrorKind::TimedOut));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `parts` as one reply (a structured reply's chunk header, offset, data...).
fn reply_parts(writer: &Mutex<Stream>, parts: &[&[u8]]) -> io::Result<()> {
    let mut w = lock(writer);
    for p in parts {
        write_all_moving(&mut w, p)?;
    }
    Ok(())
}

/// Runs one request and sends its reply.
fn execute(job: Job, writer: &Mutex<Stream>, shared: &Shared, mode: ReplyMode) -> io::Result<()> {
    let e = &shared.export;
    let size = e.size();
    let stats = &shared.stats;
    let req = match &job {
        Job::Read(r) | Job::Write(r, _) | Job::Other(r) => *r,
    };
    // With structured replies, a read (even refused) and a block status get structured
    // answers; other commands keep simple replies (NBD spec, "Structured replies").
    let structured_answer = mode.structured && matches!(req.cmd, CMD_READ | CMD_BLOCK_STATUS);
    let fail = |code: u32| {
        stats.errors.fetch_add(1, Ordering::Relaxed);
        if structured_answer {
            reply_parts(writer, &[&structured::error_chunk(req.handle, code)])
        } else {
            reply(writer, code, req.handle, None)
        }
    };
    let known_flags =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | if mode.structured { CMD_FLAG_DF | CMD_FLAG_REQ_ONE } else { 0 };
    if req.flags & !known_flags != 0 {
        return fail(EINVAL);
    }
    let writes = matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && e.read_only() {
        return fail(EPERM);
    }
    if matches!(req.cmd, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS | CMD_COLO_CHECKSUM)
        && !in_range(&req, size)
    {
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
        Job::Read(r) if r.cmd == CMD_COLO_CHECKSUM => {
            // Only after the extension was negotiated; a range of whole blocks (the last may
            // be short at the end of the export) within the bound. Checksum replies are
            // simple replies in every reply mode.
            let whole = u64::from(r.length) % u64::from(CHECKSUM_BLOCK) == 0 || r.offset + u64::from(r.length) == size;
            if !mode.checksums || r.flags != 0 || r.length == 0 || r.length > MAX_CHECKSUM_LEN || !whole {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                return reply(writer, EINVAL, r.handle, None);
            }
            let mut hashes = Vec::with_capacity(checksum::hash_count(r.length) as usize);
            match e.checksums(r.offset, u64::from(r.length), &mut hashes) {
                Ok(()) => reply(writer, 0, r.handle, Some(&checksum::encode_hashes(&hashes))),
                Err(err) => {
                    log::warn!("nbd: checksum at {}+{} failed: {err}", r.offset, r.length);
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    reply(writer, errno_to_nbd(&err), r.handle, None)
                }
            }
        }
        Job::Read(r) => {
            if r.length > MAX_PAYLOAD {
                return fail(EINVAL);
            }
            let mut buf = vec![0u8; r.length as usize];
            match e.read(r.offset, &mut buf) {
                Ok(()) if mode.structured => {
                    reply_parts(writer, &[&structured::read_chunk_header(r.handle, r.offset, r.length), &buf])
                }
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
            CMD_BLOCK_STATUS => {
                // Only for a client that selected base:allocation; an empty range has no
                // first extent to describe.
                if !mode.allocation || r.length == 0 {
                    return fail(EINVAL);
                }
                let max = if r.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { structured::MAX_EXTENTS };
                match e.extents(r.offset, u64::from(r.length), max) {
                    Ok(ext) if !ext.is_empty() && ext.iter().all(|x| x.0 > 0) => {
                        reply_parts(writer, &[&structured::block_status_chunk(r.handle, &ext)])
                    }
                    Ok(_) => fail(EIO),
                    Err(err) => {
                        log::warn!("nbd: block status at {}+{} failed: {err}", r.offset, r.length);
                        fail(errno_to_nbd(&err))
                    }
                }
            }
            _ => fail(EINVAL),
        },
    }
}
