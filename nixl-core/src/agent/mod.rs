//! The agent: the per-process endpoint that owns backends and registrations, exports its
//! metadata, loads its peers', and creates transfer requests.
//!
//! Its parts, one job per file, are listed in the crate's map (`lib.rs`).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use crate::backend::{Backend, TargetHandle};
use crate::error::{Error, Result};
use crate::xfer::Watchdog;

mod build;
mod create;
mod notif;
mod peers;
mod prepped;
mod random;
mod register;
#[cfg(test)]
mod tests;

pub use build::{AgentBuilder, BackendState};
pub use create::XferOptions;
use peers::PeerState;
pub use prepped::PreppedList;
pub use random::random_u64;
pub use register::Registration;

pub(crate) struct AgentInner {
    name: Arc<str>,
    instance_id: u128,
    generation: AtomicU64,
    next_region: AtomicU64,
    backends: Vec<Arc<dyn Backend>>,
    states: Vec<BackendState>,
    /// Why each backend in `states` that does not run cannot, as the typed reason (the
    /// source of the `Unavailable` errors naming it).
    unusable: Vec<(crate::BackendName, crate::Unusable)>,
    target: TargetHandle,
    peers: RwLock<HashMap<String, Arc<PeerState>>>,
    own_peer: Mutex<Option<(u64, Arc<PeerState>)>>,
    watchdog: Arc<Watchdog>,
    shut: AtomicBool,
    /// The staging thread, started by the first staged request.
    stage: OnceLock<crate::staging::StageThread>,
}

impl AgentInner {
    fn check_live(&self) -> Result<()> {
        if self.shut.load(Ordering::Acquire) {
            Err(Error::Shutdown(self.name.to_string()))
        } else {
            Ok(())
        }
    }

    fn shutdown(&self) {
        if self.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        self.watchdog.stop();
        // Backends first, so that what is in flight ends `Cancelled` (a closed connection would
        // end it as a remote disconnect, which it is not).
        for b in &self.backends {
            b.shutdown();
        }
        for p in self.peers.write().drain() {
            for c in p.1.conns.lock().values() {
                c.close();
            }
        }
    }
}

/// The per-process endpoint of nixl-rs.
///
/// Dropping the agent shuts its backends down: transfers still in flight end `Cancelled`.
pub struct Agent {
    inner: Arc<AgentInner>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.inner.name)
            .field(
                "instance_id",
                &format_args!("{:032x}", self.inner.instance_id),
            )
            .field("backends", &self.inner.states)
            .finish()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.inner.shutdown();
    }
}

impl Agent {
    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The random id of this incarnation.
    pub fn instance_id(&self) -> u128 {
        self.inner.instance_id
    }

    /// The metadata generation (bumped by every registration change).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Shuts down now (as dropping does): transfers in flight end `Cancelled`.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}
