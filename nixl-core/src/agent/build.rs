//! Building an agent: starting its backends; which backends run, and why the others do not.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::{Mutex, RwLock};

use super::random::random_u128;
use super::{Agent, AgentInner};
use crate::backend::{Backend, BackendName, MetadataHooks, TargetHandle};
use crate::error::{Error, Result, Unusable};
use crate::metadata::MAX_NAME_BYTES;
use crate::xfer::Watchdog;

/// A backend as the agent holds it: running, or unavailable with the reason.
#[derive(Clone, Debug)]
pub struct BackendState {
    /// Name.
    pub name: BackendName,
    /// `None` when running, `Some(reason)` when unavailable.
    pub unavailable: Option<String>,
}

/// Builds an [`Agent`] from a name and a set of backends.
pub struct AgentBuilder {
    name: String,
    backends: Vec<Arc<dyn Backend>>,
    notif_queue_bytes: usize,
}

impl fmt::Debug for AgentBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("name", &self.name)
            .field("backends", &self.backends.len())
            .finish()
    }
}

impl AgentBuilder {
    /// Adds a backend. A backend whose probe fails is kept, reported as unavailable, and never
    /// used.
    pub fn backend(mut self, backend: Arc<dyn Backend>) -> AgentBuilder {
        self.backends.push(backend);
        self
    }

    /// Adds several backends.
    pub fn backends(mut self, backends: impl IntoIterator<Item = Arc<dyn Backend>>) -> Self {
        self.backends.extend(backends);
        self
    }

    /// The byte budget of the queue of received notifications not yet taken (default
    /// [`crate::backend::DEFAULT_NOTIF_QUEUE_BYTES`]): past it, notifications are refused and
    /// their senders told so (see [`crate::TargetHandle::deliver`]).
    pub fn notif_queue_bytes(mut self, bytes: usize) -> AgentBuilder {
        self.notif_queue_bytes = bytes;
        self
    }

    /// Starts the backends and returns the agent.
    pub fn build(self) -> Result<Agent> {
        let name = self.name;
        if name.is_empty() || name.len() > MAX_NAME_BYTES || name.contains('\0') {
            return Err(Error::InvalidArgument(format!(
                "agent name must be 1..={MAX_NAME_BYTES} bytes without NUL, got {name:?}"
            )));
        }
        let name: Arc<str> = Arc::from(name.as_str());
        let instance_id = random_u128()?;
        let target = TargetHandle::new(Arc::clone(&name), instance_id, self.notif_queue_bytes);
        let mut running: Vec<Arc<dyn Backend>> = Vec::new();
        let mut states = Vec::new();
        let mut unusable = Vec::new();
        for b in self.backends {
            if states.iter().any(|s: &BackendState| s.name == b.name()) {
                return Err(Error::InvalidArgument(format!(
                    "backend {} given twice",
                    b.name()
                )));
            }
            let unavailable = match b.probe() {
                Ok(()) => match b.start(target.clone()) {
                    Ok(()) => None,
                    Err(e) => Some(Unusable::failed("start failed", e)),
                },
                Err(why) => Some(why),
            };
            match &unavailable {
                None => {
                    tracing::debug!(agent = %name, backend = %b.name(), "backend running");
                    running.push(b.clone());
                }
                Some(reason) => {
                    tracing::info!(agent = %name, backend = %b.name(), "backend unavailable: {reason}");
                }
            }
            states.push(BackendState {
                name: b.name(),
                unavailable: unavailable.as_ref().map(ToString::to_string),
            });
            unusable.extend(unavailable.map(|why| (b.name(), why)));
        }
        running.sort_by_key(|b| {
            let caps = b.caps();
            (caps.locality, caps.preference)
        });
        let inner = Arc::new(AgentInner {
            watchdog: Watchdog::new(Arc::clone(&name)),
            name,
            instance_id,
            generation: AtomicU64::new(1),
            next_region: AtomicU64::new(1),
            backends: running,
            states,
            unusable,
            target,
            peers: RwLock::new(HashMap::new()),
            own_peer: Mutex::new(None),
            shut: AtomicBool::new(false),
            stage: OnceLock::new(),
        });
        let hooks: Weak<dyn MetadataHooks> = Arc::downgrade(&inner) as Weak<AgentInner>;
        let _ = inner.target.0.hooks.set(hooks);
        Ok(Agent { inner })
    }
}

impl Agent {
    /// Starts building an agent named `name` (unique among the agents that will talk).
    pub fn builder(name: impl Into<String>) -> AgentBuilder {
        AgentBuilder {
            name: name.into(),
            notif_queue_bytes: crate::backend::DEFAULT_NOTIF_QUEUE_BYTES,
            backends: Vec::new(),
        }
    }

    /// Every backend given to the agent, running or unavailable with the reason.
    pub fn backends(&self) -> &[BackendState] {
        &self.inner.states
    }

    pub(super) fn backend(&self, name: BackendName) -> Option<&Arc<dyn Backend>> {
        self.inner.backends.iter().find(|b| b.name() == name)
    }

    /// `Ok` if `name` runs on this agent; otherwise `Error::Unavailable` with the reason (the
    /// host lacks it, or the agent was not given it).
    pub fn check_backend(&self, name: BackendName) -> Result<()> {
        match self.backend(name) {
            Some(_) => Ok(()),
            None => Err(self.missing_backend(name)),
        }
    }

    pub(super) fn missing_backend(&self, name: BackendName) -> Error {
        let reason = match self.unusable(name) {
            Some(why) => why.clone(),
            // A name the library knows, but not among the agent's backends: it cannot run here
            // (not built, or left out of the configuration), which is what callers act on.
            None => Unusable::Reason(format!(
                "not run by agent '{}' (not built in this version, or left out of its \
                 configured backends)",
                self.name()
            )),
        };
        Error::Unavailable {
            backend: name,
            reason,
        }
    }

    /// Why backend `name` does not run on this agent, if it was given and does not.
    pub(super) fn unusable(&self, name: BackendName) -> Option<&Unusable> {
        self.inner
            .unusable
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, why)| why)
    }
}
