//! nixl-rs backends.
//!
//! - [`local`]: copies inside one process (one agent to itself, or two agents in one process).
//! - [`shm`]: between processes on one node: cross-memory attach for memory allocated any way,
//!   and direct copies through memfd mappings for memory from [`shm::ShmBuffer`].

pub mod local;
pub mod shm;
