//! The agent's control channel ([`crate::control`]) through the `tcp` listener: calls to a peer
//! on connections of their own, and the `ping` service the backend answers itself.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use nixl_core::{BackendName, Error, Result};
use parking_lot::Mutex;

use super::client_setup;
use super::config::TcpConfig;
use super::conn_info::{decode_conn_info, encode_conn_info};
use super::identity::PeerIdentity;
use crate::control::{ControlChannel, ControlService, Services};

/// The request the `tcp` backend answers itself on the control channel, with [`PONG`]: a health
/// check of a peer (the daemon's canary) that proves the peer's listener is up, holds the secret
/// and answers, without touching its memory. See [`TcpControl::ping`].
pub const PING: &[u8] = b"ping";
/// The answer to [`PING`].
pub const PONG: &[u8] = b"pong";

/// Answers [`PING`] with [`PONG`]; refuses anything else.
#[derive(Debug)]
pub(super) struct Ping;

impl ControlService for Ping {
    fn handle(&self, _peer: &str, req: &[u8]) -> std::result::Result<Vec<u8>, String> {
        if req == PING {
            Ok(PONG.to_vec())
        } else {
            Err(format!(
                "unknown tcp control request of {} bytes (the tcp backend answers only \"ping\")",
                req.len()
            ))
        }
    }
}

/// The agent's control channel ([`crate::control`]) over its `tcp` listener: requests travel on
/// their own authenticated connections, so a slow service never stalls data.
#[derive(Debug)]
pub struct TcpControl {
    cfg: Arc<TcpConfig>,
    /// The services this agent answers (the listener serves them).
    pub(super) services: Arc<Services>,
    /// The listener's addresses (set when the backend starts).
    pub(super) published: Mutex<Vec<SocketAddr>>,
    /// This agent, as its calls name it (set when the backend starts).
    pub(super) me: Mutex<Option<PeerIdentity>>,
}

impl TcpControl {
    /// A channel that serves `services` once the backend starts its listener.
    pub(super) fn new(cfg: Arc<TcpConfig>, services: Arc<Services>) -> TcpControl {
        TcpControl {
            cfg,
            services,
            published: Mutex::new(Vec::new()),
            me: Mutex::new(None),
        }
    }

    /// One authenticated round trip to the listener at `endpoint` (a peer's `tcp` connection
    /// info), as this agent `from`, within `timeout`: `Ok` once it answered [`PONG`]. It opens a
    /// connection of its own (handshake included), so it also checks that the peer accepts new
    /// connections.
    pub fn ping(&self, endpoint: &[u8], from: &str, timeout: Duration) -> Result<()> {
        let reply = self.call(endpoint, from, BackendName::Tcp, PING, timeout)?;
        if reply == PONG {
            Ok(())
        } else {
            Err(Error::Backend {
                backend: BackendName::Tcp,
                op: "ping",
                reason: format!("answered {} bytes, not \"pong\"", reply.len()),
            })
        }
    }
}

impl ControlChannel for TcpControl {
    fn endpoint(&self) -> Vec<u8> {
        let p = self.published.lock();
        if p.is_empty() {
            Vec::new()
        } else {
            encode_conn_info(&p)
        }
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
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        crate::control::check_request(req)?;
        let addrs = decode_conn_info(endpoint).map_err(|reason| Error::Backend {
            backend,
            op: "control endpoint",
            reason,
        })?;
        // Calls go out as this agent, under the name its connections prove.
        let me = self
            .me
            .lock()
            .clone()
            .ok_or_else(|| Error::InvalidArgument("tcp backend not started".into()))?;
        if from != me.name {
            return Err(Error::InvalidArgument(format!(
                "a control call from '{from}' through the tcp listener of agent '{}'",
                me.name
            )));
        }
        let mut last = None;
        for a in addrs {
            match client_setup::control_call(a, &self.cfg.auth, timeout, &me, backend, req) {
                Ok(r) => return Ok(r),
                // A refusal or a bad answer came from the agent itself: another address of it
                // would answer the same.
                Err(e @ (Error::Denied { .. } | Error::Backend { .. })) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::InvalidArgument("empty control endpoint".into())))
    }
}
