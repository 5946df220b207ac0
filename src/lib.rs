//! colo-blk: a vhost-user-blk backend that carries COLO block replication out of QEMU.
//!
//! Layers, from the wire down (dependencies only point downwards):
//! - [`daemon`]: wiring, the serve loop, shutdown;
//! - [`qmp`]: the control socket;
//! - [`vhost`]: the vhost-user-blk device, request parsing, per-queue workers;
//! - [`block`]: the block stack the workers submit to (disk now, replication layers later);
//! - [`io`]: the I/O engines (io_uring, sync, null).

pub mod block;
pub mod daemon;
pub mod io;
pub mod nbd;
pub mod qmp;
pub mod replication;
pub mod size;
pub mod stats;
pub mod vhost;
