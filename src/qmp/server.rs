//! QMP transport: the accept loop, one thread per client, and event broadcast.

use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use super::{Command, QmpError, QmpHandler};

/// Most clients served at once; more are greeted with an error and closed.
const MAX_CLIENTS: usize = 16;
/// A client that does not read its socket for this long loses events, not the server.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

type Writer = Arc<Mutex<UnixStream>>;

/// Sends events to every client that finished capabilities negotiation.
#[derive(Clone, Default)]
pub struct EventBus {
    clients: Arc<Mutex<Vec<(usize, Writer)>>>,
}

impl EventBus {
    /// Broadcasts `{"event": name, "data": data, "timestamp": ...}`.
    pub fn emit(&self, name: &str, data: Value) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let msg = json!({
            "event": name,
            "data": data,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.retain(|(_, w)| send(w, &msg).is_ok());
    }

    fn add(&self, id: usize, w: Writer) {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).push((id, w));
    }

    fn remove(&self, id: usize) {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).retain(|(i, _)| *i != id);
    }
}

fn send(w: &Writer, msg: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.extend_from_slice(b"\r\n");
    let mut s = w.lock().unwrap_or_else(|e| e.into_inner());
    s.write_all(&line)
}

/// The control socket server.
pub struct QmpServer;

impl QmpServer {
    /// Serves `listener` on a background thread until the process exits.
    pub fn spawn(listener: UnixListener, handler: Arc<dyn QmpHandler>, events: EventBus) -> std::io::Result<()> {
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new().name("qmp-accept".into()).spawn(move || {
            let mut next_id = 0usize;
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("qmp: accept failed: {e}");
                        continue;
                    }
                };
                next_id += 1;
                if active.load(Ordering::Acquire) >= MAX_CLIENTS {
                    log::warn!("qmp: too many clients, refusing one");
                    let w = Arc::new(Mutex::new(stream));
                    let _ = send(&w, &error_reply(&QmpError::Generic("too many QMP clients".into()), None));
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (handler, events, active, id) = (handler.clone(), events.clone(), active.clone(), next_id);
                let spawned = std::thread::Builder::new().name("qmp-client".into()).spawn(move || {
                    if let Err(e) = serve_client(stream, id, &*handler, &events) {
                        log::debug!("qmp: client {id} ended: {e}");
                    }
                    events.remove(id);
                    active.fetch_sub(1, Ordering::AcqRel);
                });
                if let Err(e) = spawned {
                    log::error!("qmp: cannot start client thread: {e}");
                }
            }
        })?;
        Ok(())
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

fn serve_client(stream: UnixStream, id: usize, handler: &dyn QmpHandler, events: &EventBus) -> std::io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let writer: Writer = Arc::new(Mutex::new(stream.try_clone()?));
    send(&writer, &json!({"QMP": {"version": super::command::version(), "capabilities": []}}))?;
    let mut negotiated = false;
    let reader = BufReader::new(stream);
    for msg in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
        let msg = match msg {
            Ok(m) => m,
            Err(e) if e.is_eof() => return Ok(()),
            Err(e) => {
                // The stream cannot be resynchronised after malformed JSON: answer and close.
                send(&writer, &error_reply(&QmpError::Generic(format!("JSON parse error, {e}")), None))?;
                return Ok(());
            }
        };
        let (cmd, req_id) = match decode(&msg) {
            Ok(ok) => ok,
            Err((e, id)) => {
                send(&writer, &error_reply(&e, id.as_ref()))?;
                continue;
            }
        };
        let req_id = req_id.as_ref();
        let reply = match (&cmd, negotiated) {
            (Command::QmpCapabilities, false) => {
                negotiated = true;
                events.add(id, writer.clone());
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
                send(&writer, &ok_reply(json!({}), req_id))?;
                handler.quit();
                return Ok(());
            }
            (_, true) => match handler.execute(&cmd) {
                Ok(v) => ok_reply(v, req_id),
                Err(e) => error_reply(&e, req_id),
            },
        };
        send(&writer, &reply)?;
    }
    Ok(())
}
