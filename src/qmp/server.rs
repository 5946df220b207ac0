//! QMP transport: the accept loop, one reader thread and one writer thread per client, and
//! event broadcast.
//!
//! Nothing here ever writes to a client socket while holding a lock another client or the
//! daemon needs: events and replies go into the client's bounded outbox, which its own
//! writer thread drains with a deadline per message. A client that cannot keep up (outbox
//! full, or one message not taken within [`WRITE_DEADLINE`]) is dropped. Input is bounded
//! too: one message may not exceed [`MAX_MESSAGE`] bytes, and when every client slot is
//! taken the client idle longest (at least [`EVICT_IDLE`]) makes room for a new one.

use std::collections::VecDeque;
use std::io::{BufReader, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use super::{Command, QmpError, QmpHandler};
use crate::logging::limit::LogLimit;

/// Most clients served at once; when full, the longest-idle one may be evicted.
pub const MAX_CLIENTS: usize = 16;
/// The longest one message (or one unterminated JSON value) may be.
pub const MAX_MESSAGE: usize = 1 << 20;
/// A client whose next message is not taken off the socket within this is dropped.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Messages waiting for a client at most (events and replies); one more drops it.
const MAX_QUEUED: usize = 1024;
/// Bytes waiting for a client at most (a single larger message is still accepted).
const MAX_QUEUED_BYTES: usize = 4 << 20;
/// When all slots are taken, a client idle at least this long is evicted for a new one.
pub const EVICT_IDLE: Duration = Duration::from_secs(10);

/// How long the `SHUTDOWN` event waits for slow clients.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);

static DROPPED_LOG: LogLimit = LogLimit::new();
static REFUSED_LOG: LogLimit = LogLimit::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct OutState {
    queue: VecDeque<Vec<u8>>,
    bytes: usize,
    /// No more messages: the writer stops (at once when `drop_now`, else once drained).
    closed: bool,
    drop_now: bool,
    /// A message is being written.
    busy: bool,
}

/// One client's outgoing messages and the writer thread's side of its socket.
struct Outbox {
    id: usize,
    state: Mutex<OutState>,
    cv: Condvar,
    stream: UnixStream,
}

impl Outbox {
    /// Starts the writer thread for `stream`.
    fn start(id: usize, stream: UnixStream) -> std::io::Result<Arc<Outbox>> {
        let out = Arc::new(Outbox { id, state: Mutex::default(), cv: Condvar::new(), stream });
        let w = out.clone();
        std::thread::Builder::new().name("qmp-writer".into()).spawn(move || w.run())?;
        Ok(out)
    }

    /// Queues one message; false (and the client is dropped) when it cannot keep up.
    fn push(&self, msg: &Value) -> bool {
        let Ok(mut line) = serde_json::to_vec(msg) else { return false };
        line.extend_from_slice(b"\r\n");
        let mut st = lock(&self.state);
        if st.closed {
            return false;
        }
        if st.queue.len() >= MAX_QUEUED || (!st.queue.is_empty() && st.bytes + line.len() > MAX_QUEUED_BYTES) {
            drop(st);
            self.kill("does not read its socket (outbox full)");
            return false;
        }
        st.bytes += line.len();
        st.queue.push_back(line);
        self.cv.notify_all();
        true
    }

    /// Drops the client at once: pending messages are discarded and the socket shut down
    /// (its reader thread then sees the end of input).
    fn kill(&self, why: &str) {
        {
            let mut st = lock(&self.state);
            if st.drop_now {
                return;
            }
            st.closed = true;
            st.drop_now = true;
            st.queue.clear();
            self.cv.notify_all();
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if DROPPED_LOG.allow() {
            log::warn!("qmp: client {} dropped: {why}", self.id);
        }
    }

    /// No more messages: the writer sends what is queued (each within its deadline) and
    /// stops. Waits at most `wait` for that.
    fn finish(&self, wait: Duration) {
        {
            let mut st = lock(&self.state);
            st.closed = true;
            self.cv.notify_all();
        }
        self.drained_by(Instant::now() + wait);
    }

    /// Waits until the outbox is empty, at most until `deadline`.
    fn drained_by(&self, deadline: Instant) {
        let mut st = lock(&self.state);
        while !st.drop_now && (st.busy || !st.queue.is_empty()) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn run(&self) {
        loop {
            let line = {
                let mut st = lock(&self.state);
                loop {
                    if st.drop_now {
                        return;
                    }
                    if let Some(l) = st.queue.pop_front() {
                        st.busy = true;
                        break l;
                    }
                    if st.closed {
                        return;
                    }
                    st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            let ok = crate::io::sync::write_within(&self.stream, &line, WRITE_DEADLINE);
            {
                let mut st = lock(&self.state);
                st.busy = false;
                st.bytes = st.bytes.saturating_sub(line.len());
                self.cv.notify_all();
            }
            if let Err(e) = ok {
                self.kill(&format!("cannot send to it: {e}"));
                return;
            }
        }
    }
}

/// Sends events to every client that finished capabilities negotiation. `emit` only queues:
/// it never waits for a client.
#[derive(Clone, Default)]
pub struct EventBus {
    clients: Arc<Mutex<Vec<Arc<Outbox>>>>,
}

impl EventBus {
    /// Broadcasts `{"event": name, "data": data, "timestamp": ...}`. Only `SHUTDOWN`, the
    /// last event before the process exits, waits (at most [`SHUTDOWN_FLUSH`]) until every
    /// client took what was queued for it.
    pub fn emit(&self, name: &str, data: Value) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let msg = json!({
            "event": name,
            "data": data,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        let clients = lock(&self.clients).clone();
        let dead: Vec<usize> = clients.iter().filter(|c| !c.push(&msg)).map(|c| c.id).collect();
        if !dead.is_empty() {
            lock(&self.clients).retain(|c| !dead.contains(&c.id));
        }
        if name == "SHUTDOWN" {
            let deadline = Instant::now() + SHUTDOWN_FLUSH;
            for c in &clients {
                c.drained_by(deadline);
            }
        }
    }

    fn add(&self, out: Arc<Outbox>) {
        lock(&self.clients).push(out);
    }

    fn remove(&self, id: usize) {
        lock(&self.clients).retain(|c| c.id != id);
    }
}

/// A client slot: when it last sent something, and how to end it.
struct Slot {
    id: usize,
    /// Milliseconds since the server started.
    last_active: Arc<AtomicU64>,
    out: Arc<Outbox>,
}

/// The control socket server.
pub struct QmpServer;

impl QmpServer {
    /// Serves `listener` on a background thread until the process exits.
    pub fn spawn(listener: UnixListener, handler: Arc<dyn QmpHandler>, events: EventBus) -> std::io::Result<()> {
        let slots: Arc<Mutex<Vec<Slot>>> = Arc::default();
        let epoch = Instant::now();
        std::thread::Builder::new().name("qmp-accept".into()).spawn(move || {
            let mut next_id = 0usize;
            let now_ms = move || epoch.elapsed().as_millis() as u64;
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        if REFUSED_LOG.allow() {
                            log::warn!("qmp: accept failed: {e}");
                        }
                        continue;
                    }
                };
                next_id += 1;
                if !make_room(&slots, now_ms()) {
                    if REFUSED_LOG.allow() {
                        log::warn!("qmp: too many clients, refusing one");
                    }
                    let line =
                        serde_json::to_vec(&error_reply(&QmpError::Generic("too many QMP clients".into()), None))
                            .unwrap_or_default();
                    let _ = crate::io::sync::write_within(
                        &stream,
                        &[&line[..], b"\r\n"].concat(),
                        Duration::from_millis(100),
                    );
                    continue;
                }
                let Ok(out) = stream.try_clone().and_then(|w| Outbox::start(next_id, w)) else {
                    log::error!("qmp: cannot start a client's writer");
                    continue;
                };
                let last_active = Arc::new(AtomicU64::new(now_ms()));
                lock(&slots).push(Slot { id: next_id, last_active: last_active.clone(), out: out.clone() });
                let (handler, events, slots2, id) = (handler.clone(), events.clone(), slots.clone(), next_id);
                let spawned = std::thread::Builder::new().name("qmp-client".into()).spawn(move || {
                    let touch = || last_active.store(now_ms(), Ordering::Relaxed);
                    if let Err(e) = serve_client(stream, &out, &*handler, &events, &touch) {
                        log::debug!("qmp: client {id} ended: {e}");
                    }
                    events.remove(id);
                    out.finish(WRITE_DEADLINE);
                    out.kill_quietly();
                    lock(&slots2).retain(|s| s.id != id);
                });
                if let Err(e) = spawned {
                    log::error!("qmp: cannot start client thread: {e}");
                    lock(&slots).retain(|s| s.id != next_id);
                }
            }
        })?;
        Ok(())
    }
}

/// Makes sure a slot is free: when all are taken, evicts the client idle longest if it has
/// been idle at least [`EVICT_IDLE`]. False when no slot can be freed.
fn make_room(slots: &Mutex<Vec<Slot>>, now_ms: u64) -> bool {
    let mut s = lock(slots);
    if s.len() < MAX_CLIENTS {
        return true;
    }
    let Some((i, idle)) = s
        .iter()
        .enumerate()
        .map(|(i, c)| (i, now_ms.saturating_sub(c.last_active.load(Ordering::Relaxed))))
        .max_by_key(|&(_, idle)| idle)
    else {
        return false;
    };
    if idle < EVICT_IDLE.as_millis() as u64 {
        return false;
    }
    let victim = s.remove(i);
    drop(s);
    victim.out.kill(&format!("idle for {} s while all {MAX_CLIENTS} client slots are taken", idle / 1000));
    true
}

impl Outbox {
    /// Ends the writer without logging (the client went away by itself).
    fn kill_quietly(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        st.drop_now = true;
        st.queue.clear();
        self.cv.notify_all();
        drop(st);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Counts the bytes of the message being parsed and fails the read past [`MAX_MESSAGE`].
struct Limited<R> {
    inner: R,
    used: Arc<AtomicUsize>,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let used = self.used.load(Ordering::Relaxed);
        if used >= MAX_MESSAGE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("message longer than {MAX_MESSAGE} bytes"),
            ));
        }
        let room = MAX_MESSAGE - used;
        let n = buf.len().min(room);
        let got = self.inner.read(&mut buf[..n])?;
        self.used.fetch_add(got, Ordering::Relaxed);
        Ok(got)
    }
}

fn error_reply(e: &QmpError, id: Option<&Value>) -> Value {
    let mut v = json!({"error": {"class": e.class(), "desc": e.to_string()}});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

fn ok_reply(ret: Value, id: Option<&Value>) -> Value {
    let mut v = json!({ "return": ret });
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// Decodes one QMP message into a command and its `id` (echoed in the answer), or the error
/// answer to send. Never panics, whatever the input (fuzzed: fuzz/fuzz_targets/qmp.rs).
pub fn decode(msg: &Value) -> Result<(Command, Option<Value>), (QmpError, Option<Value>)> {
    let Some(obj) = msg.as_object() else {
        return Err((QmpError::Generic("QMP input must be a JSON object".into()), None));
    };
    let req_id = obj.get("id").cloned();
    let name = match obj.get("execute") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err((QmpError::Generic("QMP input member 'execute' must be a string".into()), req_id)),
        None => return Err((QmpError::Generic("QMP input lacks member 'execute'".into()), req_id)),
    };
    let empty = Map::new();
    let args = match obj.get("arguments") {
        None => &empty,
        Some(Value::Object(a)) => a,
        Some(_) => {
            return Err((QmpError::Generic("QMP input member 'arguments' must be an object".into()), req_id));
        }
    };
    match Command::parse(name, args) {
        Ok(c) => Ok((c, req_id)),
        Err(e) => Err((e, req_id)),
    }
}

fn serve_client(
    stream: UnixStream,
    out: &Arc<Outbox>,
    handler: &dyn QmpHandler,
    events: &EventBus,
    touch: &dyn Fn(),
) -> std::io::Result<()> {
    let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client dropped");
    let send = |v: &Value| if out.push(v) { Ok(()) } else { Err(gone()) };
    send(&json!({"QMP": {"version": super::command::version(), "capabilities": []}}))?;
    let mut negotiated = false;
    let used = Arc::new(AtomicUsize::new(0));
    // serde_json reads one byte at a time through this: the buffer keeps that cheap, the
    // limit sits above it so it counts what the parser really consumed.
    let reader = Limited { inner: BufReader::new(stream), used: used.clone() };
    for msg in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
        used.store(0, Ordering::Relaxed);
        touch();
        let msg = match msg {
            Ok(m) => m,
            Err(e) if e.is_eof() => return Ok(()),
            Err(e) => {
                // The stream cannot be resynchronised after malformed JSON: answer and close.
                send(&error_reply(&QmpError::Generic(format!("JSON parse error, {e}")), None))?;
                return Ok(());
            }
        };
        let (cmd, req_id) = match decode(&msg) {
            Ok(ok) => ok,
            Err((e, id)) => {
                send(&error_reply(&e, id.as_ref()))?;
                continue;
            }
        };
        let req_id = req_id.as_ref();
        let reply = match (&cmd, negotiated) {
            (Command::QmpCapabilities, false) => {
                negotiated = true;
                events.add(out.clone());
                ok_reply(json!({}), req_id)
            }
            (Command::QmpCapabilities, true) => error_reply(
                &QmpError::CommandNotFound("Capabilities negotiation is already complete, command ignored".into()),
                req_id,
            ),
            (_, false) => error_reply(
                &QmpError::CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'".into()),
                req_id,
            ),
            (Command::Quit, true) => {
                send(&ok_reply(json!({}), req_id))?;
                out.finish(WRITE_DEADLINE);
                handler.quit();
                return Ok(());
            }
            (_, true) => match handler.execute(&cmd) {
                Ok(v) => ok_reply(v, req_id),
                Err(e) => error_reply(&e, req_id),
            },
        };
        send(&reply)?;
    }
    Ok(())
}
