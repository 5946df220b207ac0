//! A minimal QMP client (for `colo-blk ctl` and the tests).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{Map, Value, json};

/// How long a server may take to greet and accept `qmp_capabilities`.
pub const GREETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A connected, negotiated QMP session.
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let writer = UnixStream::connect(path)?;
        // A peer that is not a QMP server (the vhost-user socket, say) never greets: give up
        // rather than wait (and hold its connection) for ever.
        writer.set_read_timeout(Some(GREETING_TIMEOUT))?;
        let mut c = QmpClient { reader: BufReader::new(writer.try_clone()?), writer };
        let not_qmp = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "{} did not greet within {} s: not a QMP control socket?",
                    path.display(),
                    GREETING_TIMEOUT.as_secs()
                ),
            ),
            std::io::ErrorKind::UnexpectedEof => std::io::Error::new(
                e.kind(),
                format!("{} closed the connection without a QMP greeting", path.display()),
            ),
            _ => e,
        };
        let greeting = c.read_message().map_err(not_qmp)?;
        if greeting.get("QMP").is_none() {
            return Err(std::io::Error::other(format!("unexpected greeting {greeting}")));
        }
        c.execute("qmp_capabilities", Map::new())
            .map_err(not_qmp)?
            .map_err(|e| std::io::Error::other(format!("qmp_capabilities: {e}")))?;
        // Commands such as a failover may take long; they are awaited without a deadline.
        c.writer.set_read_timeout(None)?;
        Ok(c)
    }

    /// Reads the next JSON message (answer or event).
    pub fn read_message(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if !line.trim().is_empty() {
                return serde_json::from_str(&line).map_err(std::io::Error::other);
            }
        }
    }

    /// Sends a command and waits for its answer (events before it are skipped): `Ok(return)`
    /// or `Err(error description)`.
    pub fn execute(&mut self, name: &str, args: Map<String, Value>) -> std::io::Result<Result<Value, String>> {
        let msg = json!({"execute": name, "arguments": args});
        let mut bytes = serde_json::to_vec(&msg).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        loop {
            let v = self.read_message()?;
            if let Some(r) = v.get("return") {
                return Ok(Ok(r.clone()));
            }
            if let Some(e) = v.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("unknown error");
                return Ok(Err(desc.to_string()));
            }
        }
    }
}

impl QmpClient {
    /// Waits (up to `timeout`) for an event called `name` and returns it; answers and other
    /// events are skipped.
    pub fn wait_event(&mut self, name: &str, timeout: std::time::Duration) -> std::io::Result<Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            self.writer.set_read_timeout(Some(left))?;
            let v = self.read_message();
            self.writer.set_read_timeout(None)?;
            let v = v?;
            if v.get("event").and_then(Value::as_str) == Some(name) {
                return Ok(v);
            }
        }
    }
}

/// One-shot: connect, negotiate, run `name`, return the answer.
pub fn execute(path: &Path, name: &str, args: Map<String, Value>) -> std::io::Result<Result<Value, String>> {
    QmpClient::connect(path)?.execute(name, args)
}
