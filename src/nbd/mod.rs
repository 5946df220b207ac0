//! NBD: the wire format and the server the secondary exports its disk with. QEMU's COLO
//! uses NBD between primary and secondary, so QEMU, qemu-nbd, qemu-io and libnbd's tools are
//! all peers.

pub mod allow;
pub mod checksum;
pub mod client;
pub mod server;
pub mod structured;
pub mod timed;
pub mod tls;
pub mod wire;

pub use server::{NbdAddress, NbdExport, NbdListener, NbdServer, NbdServerConfig, NbdStats};
