//! colo-blk: a vhost-user-blk backend that carries COLO block replication out of QEMU.
//!
//! Layers, from the wire down (dependencies only point downwards):
//! - [`daemon`]: wiring, start-up checks, the serve loop, service-manager conventions,
//!   shutdown;
//! - [`qmp`]: the control socket;
//! - [`vhost`]: the vhost-user-blk device, request parsing, per-queue workers;
//! - [`block`]: the block stack the workers submit to (raw disk, qcow2, null device, fault
//!   injection), image locks and format probing;
//! - [`replication`]: the block devices of the two COLO roles that sit in that stack (the
//!   primary's mirror, the secondary's active/hidden overlay) and their QMP operations;
//! - [`io`]: the I/O engines (io_uring, sync, null).
//!
//! Beside them: [`nbd`] (the replication link: the secondary's server, the primary's client,
//! TLS, the peer allow-list), [`stats`] (per-queue counters) and [`logging`] (log set-up, the
//! rate limit on log lines peers can cause, error chains).

pub mod block;
pub mod daemon;
pub mod io;
pub mod logging;
pub mod nbd;
pub mod qmp;
pub mod replication;
pub mod size;
pub mod stats;
#[cfg(test)]
mod test_rng;
pub mod vhost;
