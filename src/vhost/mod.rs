//! The vhost-user-blk device: features and config space, request parsing, per-queue workers
//! and the `VhostUserBackend` implementation that ties them to the rust-vmm stack.

pub mod backend;
pub mod config;
pub mod inflight;
pub mod notify;
pub mod orphans;
pub mod proxy;
pub mod request;
pub mod shared;
pub mod worker;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod worker_model_tests;

pub use backend::{BlkBackend, completion_event_id};
pub use config::{DRAIN_TIMEOUT, DeviceConfig};
pub use shared::Shared;
