//! The `shm` backend's settings (`[shm]` in the agent's configuration).

use std::path::PathBuf;
use std::time::Duration;

use crate::config::de;

/// Settings of the `shm` backend (`[shm]` in the agent's configuration).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShmConfig {
    /// Where the agent's Unix socket lives: created with mode 0700; an existing directory must
    /// be ours and writable by nobody else (see `unix::secure_socket_dir`).
    pub socket_dir: PathBuf,
    /// How long an initiator waits for a stuck (alive) target, plus 1 s per 500 MB moved.
    #[serde(rename = "op_timeout_ms", deserialize_with = "de::millis")]
    pub op_timeout: Duration,
    /// Threads a target uses for one big cross-memory copy.
    #[serde(skip)]
    pub copy_threads: usize,
    /// Whether this agent maps peers' memfd buffers when they allow it.
    pub allow_map: bool,
    /// How long deregistration waits for peers to give up a mapping or a grant.
    #[serde(skip)]
    pub revoke_timeout: Duration,
    /// Cross-memory grants: as initiator, ask targets for a grant per region and copy with
    /// `process_vm_*` ourselves; as target, give grants. Off: every cross-memory transfer is a
    /// round trip on the socket (the target copies).
    pub cma_grants: bool,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            socket_dir: crate::unix::default_socket_dir(),
            op_timeout: Duration::from_secs(5),
            copy_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .min(8),
            allow_map: true,
            revoke_timeout: Duration::from_secs(2),
            cma_grants: true,
        }
    }
}
