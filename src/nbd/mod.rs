//! NBD: the wire format and the server the secondary exports its disk with. QEMU's COLO
//! uses NBD between primary and secondary, so QEMU, qemu-nbd, qemu-io and libnbd's tools are
//! all peers.
//!
//! Layering, bottom up: [`transport`] (sockets: [`Stream`], listeners, keepalive) and [`wire`]
//! (the protocol's constants and byte layouts) know nothing else of colo-blk's NBD; [`timed`]
//! (deadline-bounded I/O) and [`tls`] (STARTTLS sessions) sit on the transport; [`client`]
//! and [`server`] sit on all of them, and neither imports the other.

pub mod allow;
pub mod checksum;
pub mod client;
pub mod server;
pub mod structured;
pub mod timed;
pub mod tls;
pub mod transport;
pub mod wire;

pub use server::{NbdExport, NbdServer, NbdServerConfig, NbdStats};
pub use transport::{NbdAddress, NbdListener, Stream};
