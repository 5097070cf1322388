//! The file backends (`posix`, `uring`, `gds`) and what they share:
//!
//! - `fd`: what they need to know about a caller's fd (open, how, `O_DIRECT` alignment), so a
//!   request a file cannot serve is refused when it is created, naming the descriptor;
//! - `ops`: a request cut into I/O operations (`IoOp`, at most `MAX_IOV` pieces each) and
//!   one post of them (`Post`), completed by the last operation to finish;
//! - `backend`: [`FileBackend`], the agent-facing skeleton, generic over its engine (the
//!   `posix` thread pool, the `uring` ring, the `gds` cuFile workers);
//! - `workers`: the thread pool of the engines that block per operation;
//! - `OwnAgent`: storage is reached by its own agent only (also used by `object`).

mod backend;
mod fd;
mod ops;
mod workers;

pub use backend::FileBackend;
pub(crate) use backend::FileEngine;
pub(crate) use fd::check_storage_region;
pub use fd::{inspect_fd, FileInfo};
pub(crate) use ops::{IoOp, Post};
pub(crate) use workers::Workers;

use nixl_core::{BackendName, Error, PeerInfo, Result, TargetHandle, Unusable};
use parking_lot::Mutex;

/// The agent a storage backend (`uring`, `posix`, `object`) serves: storage is reached only by
/// its own agent, which names itself as the remote. Holds the agent's target handle from
/// `start` to `shutdown` and answers `conn_info`, `can_reach` and the check in `connect`.
#[derive(Debug, Default)]
pub(crate) struct OwnAgent {
    target: Mutex<Option<TargetHandle>>,
}

impl OwnAgent {
    /// Set at start.
    pub(crate) fn set(&self, target: TargetHandle) {
        *self.target.lock() = Some(target);
    }

    /// Cleared at shutdown.
    pub(crate) fn clear(&self) {
        self.target.lock().take();
    }

    /// The connection info: the agent's instance id.
    pub(crate) fn conn_info(&self) -> Vec<u8> {
        let instance = self.target.lock().as_ref().map_or(0, |t| t.instance_id());
        instance.to_le_bytes().to_vec()
    }

    /// Only the agent itself is reachable.
    pub(crate) fn can_reach(
        &self,
        conn_info: &[u8],
        what: &str,
    ) -> std::result::Result<(), Unusable> {
        if conn_info == self.conn_info().as_slice() {
            Ok(())
        } else {
            Err(Unusable::Reason(format!(
                "{what} are reached by their own agent only (name the agent itself as the remote)"
            )))
        }
    }

    /// The target handle for a connection to `peer`, which must be the agent itself.
    pub(crate) fn connect(
        &self,
        backend: BackendName,
        peer: &PeerInfo<'_>,
    ) -> Result<TargetHandle> {
        let target = self
            .target
            .lock()
            .clone()
            .ok_or_else(|| Error::Shutdown(format!("{backend} backend not started")))?;
        if peer.instance_id != target.instance_id() {
            return Err(Error::Backend {
                backend,
                op: "connect",
                reason: format!(
                    "'{}' is another agent: {backend} reaches this agent's storage only",
                    peer.name
                ),
            });
        }
        Ok(target)
    }
}
