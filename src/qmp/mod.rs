//! The control socket: QMP framing (greeting, `qmp_capabilities`, commands, events) over a
//! UNIX stream socket, so socat, qmp-shell and existing orchestration code work.
//!
//! One thread accepts; every client gets its own thread, so a stuck client never stalls
//! another. Commands are parsed into [`Command`] and handed to a [`QmpHandler`] that the
//! daemon implements; replication commands slot in as new `Command` variants.

pub mod client;
pub mod command;
pub mod server;

pub use command::{Command, QmpError};
pub use server::{EventBus, QmpServer};

use serde_json::Value;

/// What the daemon provides to the control socket.
pub trait QmpHandler: Send + Sync + 'static {
    /// Runs a command (other than `qmp_capabilities` and `quit`) and returns its answer.
    fn execute(&self, cmd: &Command) -> Result<Value, QmpError>;
    /// Called after the `quit` answer has been sent: drain, flush, exit.
    fn quit(&self);
}
