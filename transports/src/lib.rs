//! nixl-rs backends.
//!
//! - [`local`]: copies inside one process (one agent to itself, or two agents in one process).
//! - [`shm`]: between processes on one node: cross-memory attach for memory allocated any way,
//!   and direct copies through memfd mappings for memory from [`shm::ShmBuffer`].

pub mod copy;
pub mod local;
#[path = "node/mod.rs"]
pub mod shm;

use std::sync::Arc;

use nixl_core::Backend;

/// Every backend this crate builds, with default settings: what an agent that wants "whatever
/// works here" is built with. Backends that cannot run on this host report why through
/// [`nixl_core::Agent::backends`] and are never chosen.
pub fn default_backends() -> Vec<Arc<dyn Backend>> {
    vec![
        Arc::new(local::LocalBackend::new()),
        Arc::new(shm::ShmBackend::new(shm::ShmConfig::default())),
    ]
}
