//! A control channel between agents, for backends that must talk to a peer before they can move
//! bytes (RDMA queue pairs are connected pairwise; CUDA IPC handles are granted per region).
//!
//! A backend registers a [`ControlService`] under its name; a peer reaches it with
//! [`ControlChannel::call`] at the endpoint this agent publishes (inside the backend's own
//! connection info). The agent's channel is the `tcp` backend's authenticated listener
//! ([`crate::tcp::TcpBackend::control`]): the same handshake (TLS 1.3 and the channel-bound
//! proof of the shared secret when one is set), the same instance check, bounded frames. [`Loopback`] is an in-process channel for tests of the logic above it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use nixl_core::{BackendName, Error, Result};
use parking_lot::Mutex;

/// Largest request or reply on the control channel: room for a notification of the largest size
/// ([`nixl_core::MAX_NOTIF_BYTES`]) and its header.
pub const MAX_CONTROL: usize = nixl_core::MAX_NOTIF_BYTES + 4096;

/// Refuses a request over [`MAX_CONTROL`] before it is sent (every channel's `call`).
pub(crate) fn check_request(req: &[u8]) -> Result<()> {
    if req.len() > MAX_CONTROL {
        return Err(Error::InvalidArgument(format!(
            "control request of {} bytes exceeds {MAX_CONTROL}",
            req.len()
        )));
    }
    Ok(())
}

/// A backend's handler of control requests from peers.
pub trait ControlService: Send + Sync + fmt::Debug {
    /// Answers one request from the authenticated peer agent `peer`. `Err` is sent back as the
    /// reason, and the caller gets it as [`Error::Denied`].
    fn handle(&self, peer: &str, req: &[u8]) -> std::result::Result<Vec<u8>, String>;
}

/// A way to reach peers' control services and to serve this agent's.
pub trait ControlChannel: Send + Sync + fmt::Debug {
    /// Where peers reach this agent's services (opaque to backends; published in their
    /// connection info). Empty while the channel is not serving.
    fn endpoint(&self) -> Vec<u8>;
    /// Serves `svc` for `backend` (replaces an earlier one). Held weakly: a dropped backend is
    /// answered "not serving".
    fn serve(&self, backend: BackendName, svc: Weak<dyn ControlService>);
    /// Sends `req` to the service of `backend` at `endpoint`, as the agent `from`, and waits at
    /// most `timeout` for the reply.
    fn call(
        &self,
        endpoint: &[u8],
        from: &str,
        backend: BackendName,
        req: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>>;
}

/// The services an agent serves, by backend: what a channel's server side dispatches to.
#[derive(Debug, Default)]
pub(crate) struct Services(Mutex<HashMap<BackendName, Weak<dyn ControlService>>>);

impl Services {
    /// Serves `svc` for `backend`.
    pub(crate) fn insert(&self, backend: BackendName, svc: Weak<dyn ControlService>) {
        self.0.lock().insert(backend, svc);
    }

    /// Answers a request for `backend` from `peer`.
    pub(crate) fn dispatch(
        &self,
        peer: &str,
        backend: BackendName,
        req: &[u8],
    ) -> std::result::Result<Vec<u8>, String> {
        let svc = self.0.lock().get(&backend).and_then(Weak::upgrade);
        match svc {
            Some(s) => {
                let reply = s.handle(peer, req)?;
                if reply.len() > MAX_CONTROL {
                    return Err(format!(
                        "{backend} reply of {} bytes exceeds the control limit of {MAX_CONTROL}",
                        reply.len()
                    ));
                }
                Ok(reply)
            }
            None => Err(format!("this agent serves no {backend} control requests")),
        }
    }
}

/// A channel for an agent that serves none: every call fails with the reason given (the
/// configuration runs no `tcp` listener, say).
#[derive(Debug)]
pub(crate) struct Unserved(pub(crate) String);

impl ControlChannel for Unserved {
    fn endpoint(&self) -> Vec<u8> {
        Vec::new()
    }

    fn serve(&self, _backend: BackendName, _svc: Weak<dyn ControlService>) {}

    fn call(
        &self,
        _endpoint: &[u8],
        _from: &str,
        backend: BackendName,
        _req: &[u8],
        _timeout: Duration,
    ) -> Result<Vec<u8>> {
        Err(Error::Unavailable {
            backend,
            reason: self.0.clone().into(),
        })
    }
}

fn loopback_table() -> &'static Mutex<HashMap<Vec<u8>, Weak<Services>>> {
    static T: OnceLock<Mutex<HashMap<Vec<u8>, Weak<Services>>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

#[doc(hidden)] // for tests, through `crate::fuzzing`
/// An in-process control channel: endpoints are names in a process-wide table. For tests of
/// backends' control logic without sockets.
#[derive(Debug)]
pub struct Loopback {
    endpoint: Vec<u8>,
    services: Arc<Services>,
}

impl Loopback {
    /// A channel serving at `endpoint` (unique in the process).
    pub fn new(endpoint: &str) -> Arc<Loopback> {
        let services = Arc::new(Services::default());
        loopback_table()
            .lock()
            .insert(endpoint.as_bytes().to_vec(), Arc::downgrade(&services));
        Arc::new(Loopback {
            endpoint: endpoint.as_bytes().to_vec(),
            services,
        })
    }
}

impl ControlChannel for Loopback {
    fn endpoint(&self) -> Vec<u8> {
        self.endpoint.clone()
    }

    fn serve(&self, backend: BackendName, svc: Weak<dyn ControlService>) {
        self.services.insert(backend, svc);
    }

    fn call(
        &self,
        endpoint: &[u8],
        from: &str,
        backend: BackendName,
        req: &[u8],
        _timeout: Duration,
    ) -> Result<Vec<u8>> {
        check_request(req)?;
        let peer = String::from_utf8_lossy(endpoint).into_owned();
        let services = loopback_table()
            .lock()
            .get(endpoint)
            .and_then(Weak::upgrade)
            .ok_or_else(|| Error::RemoteDisconnect {
                peer: peer.clone(),
                reason: "no loopback endpoint of that name".into(),
            })?;
        services
            .dispatch(from, backend, req)
            .map_err(|reason| Error::Denied { peer, reason })
    }
}
