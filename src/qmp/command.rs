//! QMP commands: parsing `{"execute": NAME, "arguments": {...}}` into [`Command`].

use serde_json::{Map, Value};

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Leave capabilities negotiation mode.
    QmpCapabilities,
    /// Disk, size, queues, negotiated features, connection state.
    QueryBlock,
    /// I/O counters and latency.
    QueryBlockstats,
    /// Drain, flush and exit.
    Quit,
    /// colo-blk's version in QEMU's `query-version` shape.
    QueryVersion,
    /// The names of every command.
    QueryCommands,
    /// The export, in qemu-storage-daemon's `query-block-exports` shape.
    QueryBlockExports,
    /// Stage, error and statistics of replication.
    QueryReplication,
    /// `replication-start {"mode": ..., "secondary": URI, "sync": "none|full|incremental"}`.
    ReplicationStart(crate::replication::StartArgs),
    /// `replication-checkpoint {"barrier": N}` (barrier optional, secondary only).
    ReplicationCheckpoint {
        /// Commit only this pending COLO barrier (a relayed RESUME), instead of emptying now.
        barrier: Option<u64>,
    },
    /// `replication-get-error`.
    ReplicationGetError,
    /// `replication-verify {"resync": bool}` (primary): online comparison with the secondary.
    ReplicationVerify {
        /// Copy the differing blocks to the secondary.
        resync: bool,
    },
    /// `x-inject-fault {"op", "offset", "length", "errno", "count"}` (needs
    /// `--x-fault-injection`).
    InjectFault(crate::block::fault::FaultRule),
    /// `x-clear-faults`.
    ClearFaults,
    /// `replication-stop {"failover": bool}`.
    ReplicationStop {
        /// Commit the buffers (secondary) instead of dropping them.
        failover: bool,
        /// Test hook: make the failover commit fail (`x-inject-commit-error`).
        inject_commit_error: bool,
    },
    /// `block_resize {"size": BYTES}` (QEMU's optional `device` / `node-name` name the one
    /// node colo-blk serves).
    BlockResize {
        /// The new size in bytes: positive, a multiple of 512, at most [`MAX_RESIZE`].
        size: u64,
        /// QEMU's `device` argument, if given.
        device: Option<String>,
        /// QEMU's `node-name` argument, if given.
        node_name: Option<String>,
    },
}

/// The largest size `block_resize` accepts (1 EiB): far beyond any real disk, and small
/// enough that no sector or byte arithmetic on the capacity can overflow.
pub const MAX_RESIZE: u64 = 1 << 60;

/// A QMP error answer: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QmpError {
    /// The usual error class.
    #[error("{0}")]
    Generic(String),
    /// The command does not exist (or is not allowed yet).
    #[error("{0}")]
    CommandNotFound(String),
}

impl QmpError {
    /// The QMP error class name.
    pub fn class(&self) -> &'static str {
        match self {
            QmpError::Generic(_) => "GenericError",
            QmpError::CommandNotFound(_) => "CommandNotFound",
        }
    }
}

impl Command {
    /// Parses a command name and its arguments object. Unknown arguments are refused, as QEMU
    /// does, so a typo never goes unnoticed.
    pub fn parse(name: &str, args: &Map<String, Value>) -> Result<Command, QmpError> {
        let no_args = |cmd: Command| {
            if let Some(k) = args.keys().next() {
                Err(QmpError::Generic(format!("Parameter '{k}' is unexpected")))
            } else {
                Ok(cmd)
            }
        };
        match name {
            "qmp_capabilities" => {
                // QEMU accepts an optional "enable" list; no capabilities are offered.
                match args.get("enable") {
                    Some(Value::Array(a)) if !a.is_empty() => {
                        Err(QmpError::Generic("Capability negotiation not supported".into()))
                    }
                    _ if args.keys().any(|k| k != "enable") => {
                        Err(QmpError::Generic("Parameter unexpected in qmp_capabilities".into()))
                    }
                    _ => Ok(Command::QmpCapabilities),
                }
            }
            "query-block" => no_args(Command::QueryBlock),
            "query-blockstats" => no_args(Command::QueryBlockstats),
            "quit" => no_args(Command::Quit),
            "query-version" => no_args(Command::QueryVersion),
            "query-commands" => no_args(Command::QueryCommands),
            "query-block-exports" => no_args(Command::QueryBlockExports),
            "query-replication" => no_args(Command::QueryReplication),
            "replication-checkpoint" => {
                only(args, &["barrier"])?;
                let barrier = match args.get("barrier") {
                    None => None,
                    Some(v) => Some(v.as_u64().ok_or_else(|| {
                        QmpError::Generic("Invalid parameter type for 'barrier', expected: integer".into())
                    })?),
                };
                Ok(Command::ReplicationCheckpoint { barrier })
            }
            "replication-get-error" => no_args(Command::ReplicationGetError),
            "replication-verify" => {
                only(args, &["resync"])?;
                let resync = match args.get("resync") {
                    None => false,
                    Some(_) => required_bool(args, "resync")?,
                };
                Ok(Command::ReplicationVerify { resync })
            }
            "replication-start" => {
                use crate::replication::{Mode, StartArgs, SyncMode};
                only(args, &["mode", "secondary", "sync"])?;
                let mode = match required_str(args, "mode")? {
                    "primary" => Mode::Primary,
                    "secondary" => Mode::Secondary,
                    other => {
                        return Err(QmpError::Generic(format!("Parameter 'mode' does not accept value '{other}'")));
                    }
                };
                let secondary = match args.get("secondary") {
                    None => None,
                    Some(_) => Some(
                        required_str(args, "secondary")?
                            .parse()
                            .map_err(|e| QmpError::Generic(format!("Parameter 'secondary': {e}")))?,
                    ),
                };
                let sync = match args.get("sync") {
                    None => SyncMode::None,
                    Some(_) => match required_str(args, "sync")? {
                        "none" => SyncMode::None,
                        "full" => SyncMode::Full,
                        "incremental" => SyncMode::Incremental,
                        other => {
                            return Err(QmpError::Generic(format!("Parameter 'sync' does not accept value '{other}'")));
                        }
                    },
                };
                if mode == Mode::Secondary && (secondary.is_some() || sync != SyncMode::None) {
                    return Err(QmpError::Generic(
                        "Parameters 'secondary' and 'sync' are only for mode primary".into(),
                    ));
                }
                Ok(Command::ReplicationStart(StartArgs { mode, secondary, sync }))
            }
            "replication-stop" => {
                only(args, &["failover", "x-inject-commit-error"])?;
                let failover = required_bool(args, "failover")?;
                let inject_commit_error = match args.get("x-inject-commit-error") {
                    None => false,
                    Some(_) => required_bool(args, "x-inject-commit-error")?,
                };
                Ok(Command::ReplicationStop { failover, inject_commit_error })
            }
            "x-inject-fault" => {
                use crate::block::fault::{FaultRule, parse_errno};
                only(args, &["op", "offset", "length", "errno", "count", "delay-ms"])?;
                let op =
                    required_str(args, "op")?.parse().map_err(|e| QmpError::Generic(format!("Parameter 'op': {e}")))?;
                let errno = match args.get("errno") {
                    None => libc::EIO,
                    Some(_) => parse_errno(required_str(args, "errno")?)
                        .map_err(|e| QmpError::Generic(format!("Parameter 'errno': {e}")))?,
                };
                let start = optional_u64(args, "offset")?.unwrap_or(0);
                let end = match optional_u64(args, "length")? {
                    None => u64::MAX,
                    Some(0) => return Err(QmpError::Generic("Parameter 'length' must be positive".into())),
                    Some(l) => start.saturating_add(l),
                };
                let count = match optional_u64(args, "count")? {
                    Some(0) => return Err(QmpError::Generic("Parameter 'count' must be positive".into())),
                    c => c,
                };
                let delay = match optional_u64(args, "delay-ms")? {
                    None => None,
                    Some(_) if args.get("errno").is_some() => {
                        return Err(QmpError::Generic("Parameters 'delay-ms' and 'errno' are exclusive".into()));
                    }
                    Some(ms) if ms > 600_000 => {
                        return Err(QmpError::Generic("Parameter 'delay-ms' must be at most 600000".into()));
                    }
                    Some(ms) => Some(std::time::Duration::from_millis(ms)),
                };
                Ok(Command::InjectFault(FaultRule { op, start, end, errno, count, delay }))
            }
            "x-clear-faults" => no_args(Command::ClearFaults),
            "block_resize" => parse_block_resize(args),
            other => Err(QmpError::CommandNotFound(format!("The command {other} has not been found"))),
        }
    }
}

/// Every command name [`Command::parse`] accepts (the answer of `query-commands`).
pub const COMMAND_NAMES: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-block",
    "query-blockstats",
    "query-block-exports",
    "query-replication",
    "replication-start",
    "replication-checkpoint",
    "replication-get-error",
    "replication-stop",
    "replication-verify",
    "x-inject-fault",
    "x-clear-faults",
    "block_resize",
    "quit",
];

/// colo-blk's version in QEMU's `query-version` shape (also carried by the greeting).
pub fn version() -> Value {
    let num = |s: &str| s.parse::<u64>().unwrap_or(0);
    serde_json::json!({
        "qemu": {
            "major": num(env!("CARGO_PKG_VERSION_MAJOR")),
            "minor": num(env!("CARGO_PKG_VERSION_MINOR")),
            "micro": num(env!("CARGO_PKG_VERSION_PATCH")),
        },
        "package": concat!("colo-blk ", env!("CARGO_PKG_VERSION")),
    })
}

/// `block_resize`: the size is checked here (a positive multiple of 512 up to
/// [`MAX_RESIZE`]); the daemon checks it against the logical block size and the device.
fn parse_block_resize(args: &Map<String, Value>) -> Result<Command, QmpError> {
    only(args, &["size", "device", "node-name"])?;
    let size = match args.get("size") {
        None => return Err(QmpError::Generic("Parameter 'size' is missing".into())),
        Some(v) if v.as_i64().is_some_and(|n| n <= 0) => {
            return Err(QmpError::Generic("Parameter 'size' expects a positive size".into()));
        }
        Some(v) => v
            .as_u64()
            .ok_or_else(|| QmpError::Generic("Invalid parameter type for 'size', expected: integer".into()))?,
    };
    if !size.is_multiple_of(512) {
        return Err(QmpError::Generic(format!("Parameter 'size' must be a multiple of 512 bytes, not {size}")));
    }
    if size > MAX_RESIZE {
        return Err(QmpError::Generic(format!("Parameter 'size' must be at most {MAX_RESIZE} bytes, not {size}")));
    }
    let name = |key: &str| match args.get(key) {
        None => Ok(None),
        Some(_) => required_str(args, key).map(|s| Some(s.to_string())),
    };
    Ok(Command::BlockResize { size, device: name("device")?, node_name: name("node-name")? })
}

/// Refuses arguments not in `allowed`.
fn only(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), QmpError> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(QmpError::Generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

fn required_str<'a>(args: &'a Map<String, Value>, name: &str) -> Result<&'a str, QmpError> {
    match args.get(name) {
        None => Err(QmpError::Generic(format!("Parameter '{name}' is missing"))),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(QmpError::Generic(format!("Invalid parameter type for '{name}', expected: string"))),
    }
}

fn optional_u64(args: &Map<String, Value>, name: &str) -> Result<Option<u64>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| QmpError::Generic(format!("Invalid parameter type for '{name}', expected: integer"))),
    }
}

fn required_bool(args: &Map<String, Value>, name: &str) -> Result<bool, QmpError> {
    match args.get(name) {
        None => Err(QmpError::Generic(format!("Parameter '{name}' is missing"))),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(QmpError::Generic(format!("Invalid parameter type for '{name}', expected: boolean"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn parses_known_commands() {
        assert_eq!(Command::parse("quit", &Map::new()), Ok(Command::Quit));
        assert_eq!(Command::parse("query-block", &Map::new()), Ok(Command::QueryBlock));
        assert_eq!(Command::parse("qmp_capabilities", &obj(json!({"enable": []}))), Ok(Command::QmpCapabilities));
        assert_eq!(
            Command::parse("replication-checkpoint", &obj(json!({"barrier": 7}))),
            Ok(Command::ReplicationCheckpoint { barrier: Some(7) })
        );
        assert_eq!(Command::parse("replication-verify", &Map::new()), Ok(Command::ReplicationVerify { resync: false }));
        assert_eq!(
            Command::parse("replication-verify", &obj(json!({"resync": true}))),
            Ok(Command::ReplicationVerify { resync: true })
        );
        assert_eq!(
            Command::parse("replication-verify", &obj(json!({"resync": 1}))),
            Err(QmpError::Generic("Invalid parameter type for 'resync', expected: boolean".into()))
        );
        assert_eq!(
            Command::parse("replication-checkpoint", &obj(json!({"barrier": "7"}))),
            Err(QmpError::Generic("Invalid parameter type for 'barrier', expected: integer".into()))
        );
    }

    #[test]
    fn every_listed_command_parses() {
        for name in COMMAND_NAMES {
            let e = Command::parse(name, &Map::new()).err();
            assert!(!matches!(e, Some(QmpError::CommandNotFound(_))), "{name} is listed but unknown");
        }
    }

    #[test]
    fn block_resize_arguments() {
        let parse = |v: Value| Command::parse("block_resize", &obj(v));
        assert_eq!(
            parse(json!({"size": 1 << 30})),
            Ok(Command::BlockResize { size: 1 << 30, device: None, node_name: None })
        );
        assert_eq!(
            parse(json!({"size": 4096, "node-name": "disk0", "device": "d"})),
            Ok(Command::BlockResize { size: 4096, device: Some("d".into()), node_name: Some("disk0".into()) })
        );
        let err = |v: Value| parse(v).unwrap_err().to_string();
        assert_eq!(err(json!({})), "Parameter 'size' is missing");
        assert_eq!(err(json!({"size": 0})), "Parameter 'size' expects a positive size");
        assert_eq!(err(json!({"size": -512})), "Parameter 'size' expects a positive size");
        assert_eq!(err(json!({"size": "1G"})), "Invalid parameter type for 'size', expected: integer");
        assert_eq!(err(json!({"size": 1.5})), "Invalid parameter type for 'size', expected: integer");
        assert_eq!(err(json!({"size": 1000})), "Parameter 'size' must be a multiple of 512 bytes, not 1000");
        assert!(err(json!({"size": MAX_RESIZE + 512})).contains("must be at most"));
        assert_eq!(
            err(json!({"size": 512, "node-name": 3})),
            "Invalid parameter type for 'node-name', expected: string"
        );
        assert_eq!(err(json!({"size": 512, "force": true})), "Parameter 'force' is unexpected");
    }

    #[test]
    fn refuses_unknown_commands_and_arguments() {
        let e = Command::parse("nope", &Map::new()).unwrap_err();
        assert_eq!(e.class(), "CommandNotFound");
        let e = Command::parse("quit", &obj(json!({"force": true}))).unwrap_err();
        assert_eq!(e, QmpError::Generic("Parameter 'force' is unexpected".into()));
    }
}
