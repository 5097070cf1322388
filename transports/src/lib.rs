//! nixl-rs backends.
//!
//! - [`local`]: copies inside one process (one agent to itself, or two agents in one process).
//! - [`shm`]: between processes on one node: cross-memory attach for memory allocated any way,
//!   and direct copies through memfd mappings for memory from [`shm::ShmBuffer`].
//! - [`tcp`]: between hosts: authenticated connections, the target checks every access.
//! - [`posix`]: DRAM ↔ FILE with `preadv`/`pwritev` on a thread pool.
//! - [`uring`]: DRAM ↔ FILE through io_uring, the ring kept full.
//! - [`object`]: DRAM ↔ OBJECT in S3-compatible object stores (ranged GETs, PUT and multipart).
//! - [`cuda`]: VRAM (CUDA driver loaded at run time): registration of cudaMalloc and VMM memory,
//!   CUDA IPC and VMM fd handles between processes of one node, batched device copies, staging.
//! - [`gds`]: VRAM ↔ FILE with GPUDirect Storage (cuFile loaded at run time).
//! - [`rdma`]: between hosts over RDMA verbs (libibverbs loaded at run time): one-sided READ/WRITE
//!   striped over the NICs nearest the memory and several queue pairs each, with failover.
//! - [`control`]: the control channel between agents (served by the `tcp` listener) that `rdma`
//!   and cross-node `cuda` use to set up queue pairs, announce imports and revoke them.
//!
//! [`config::Config`] reads the agent's TOML configuration and builds the backends it names.

pub mod config;
pub mod control;
pub mod copy;
pub mod cuda;
pub mod files;
pub mod gds;
pub mod limits;
pub mod local;
pub mod object;
pub mod posix;
pub mod rdma;
pub mod shm;
pub mod tcp;
mod unix;
pub mod uring;

use std::sync::Arc;

use nixl_core::Backend;

/// Every backend this crate builds, with default settings: what an agent that wants "whatever
/// works here" is built with. Backends that cannot run on this host report why through
/// [`nixl_core::Agent::backends`] and are never chosen.
///
/// `object` runs only when an object store is configured (`AWS_*` environment variables here);
/// otherwise it reports itself unavailable and costs nothing. `cuda`, `gds` and `rdma` load
/// their libraries at run time and report `unavailable: <reason>` on a host without a GPU,
/// cuFile or an RDMA device.
///
/// `tcp` listens on the host's first non-loopback address with a free port and, without
/// `NIXL_SECRET` in the environment, accepts only agents of this user on this host (proved by the
/// user's secret file, see [`tcp::Auth`]).
pub fn default_backends() -> Vec<Arc<dyn Backend>> {
    config::Config::default()
        .backends()
        .expect("the default configuration is valid")
}
