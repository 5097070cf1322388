//! The `tcp` backend itself: the agent-facing [`Backend`] (start the listener, connect to peers,
//! answer `peer_idle`, shut down).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use nixl_core::{
    Backend, BackendName, Caps, Connection, Desc, Error, Locality, MemKind, PeerInfo, Registered,
    Result, TargetHandle, Unusable,
};
use parking_lot::Mutex;

use super::client::Conn;
use super::config::TcpConfig;
use super::conn_info::{decode_conn_info, encode_conn_info};
use super::control::{Ping, TcpControl};
use super::identity::PeerIdentity;
use super::server::Server;
use crate::control::{ControlService, Services};

/// The `tcp` backend.
#[derive(Debug)]
pub struct TcpBackend {
    cfg: Arc<TcpConfig>,
    /// The listener, once started (the tests in `limits_tests` read its frame budget).
    pub(super) server: Mutex<Option<Server>>,
    conns: Arc<Mutex<Vec<Weak<Conn>>>>,
    shut: Arc<AtomicBool>,
    me: Mutex<Option<(Arc<str>, u128)>>,
    control: Arc<TcpControl>,
    /// The backend's own control service (held here; the channel holds it weakly).
    _ping: Arc<Ping>,
}

impl TcpBackend {
    /// A backend with these settings (it listens once its agent starts it).
    pub fn new(cfg: TcpConfig) -> TcpBackend {
        let cfg = Arc::new(cfg);
        let ping = Arc::new(Ping);
        let services = Arc::<Services>::default();
        services.insert(
            BackendName::Tcp,
            Arc::downgrade(&ping) as Weak<dyn ControlService>,
        );
        TcpBackend {
            cfg: Arc::clone(&cfg),
            server: Mutex::new(None),
            conns: Arc::default(),
            shut: Arc::new(AtomicBool::new(false)),
            me: Mutex::new(None),
            _ping: ping,
            control: Arc::new(TcpControl::new(Arc::clone(&cfg), services)),
        }
    }

    /// The agent's control channel through this listener, for backends that must talk to a
    /// peer before moving bytes (`rdma` queue pairs).
    pub fn control(&self) -> Arc<TcpControl> {
        Arc::clone(&self.control)
    }

    /// The addresses peers reach this agent at (empty before the agent starts it).
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.server
            .lock()
            .as_ref()
            .map(|s| s.published.clone())
            .unwrap_or_default()
    }
}

const DRAM: &[MemKind] = &[MemKind::Dram];

impl Backend for TcpBackend {
    fn name(&self) -> BackendName {
        BackendName::Tcp
    }

    fn caps(&self) -> Caps {
        Caps::new(DRAM, Locality::AnyNode, 8)
    }

    fn probe(&self) -> std::result::Result<(), Unusable> {
        self.cfg.check().map_err(Unusable::from_error)?;
        // Reads (or creates) the per-user secret file now: a missing or unsafe one makes the
        // backend unavailable with the reason, rather than failing every connection.
        self.cfg
            .auth
            .ready()
            .map_err(|e| Unusable::Reason(format!("tcp auth: {e}")))
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        self.cfg.check()?;
        self.cfg
            .auth
            .ready()
            .map_err(|e| Error::InvalidArgument(format!("tcp auth: {e}")))?;
        *self.me.lock() = Some((target.name_arc(), target.instance_id()));
        *self.control.me.lock() = Some(PeerIdentity::new(target.name(), target.instance_id()));
        let server = Server::start(
            Arc::clone(&self.cfg),
            target,
            Arc::clone(&self.control.services),
        )?;
        self.control.published.lock().clone_from(&server.published);
        *self.server.lock() = Some(server);
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        encode_conn_info(&self.listen_addrs())
    }

    fn register(&self, _kind: MemKind, _desc: &Desc) -> Result<Vec<u8>> {
        // The target checks ranges and keys itself; peers need nothing more than the key.
        Ok(Vec::new())
    }

    fn deregister(&self, _region: Registered<'_>) {}

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), Unusable> {
        decode_conn_info(conn_info)
            .map(|_| ())
            .map_err(Unusable::Reason)
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        if self.shut.load(Ordering::Acquire) {
            return Err(Error::Cancelled);
        }
        let addrs = decode_conn_info(peer.conn_info).map_err(|reason| Error::Backend {
            backend: BackendName::Tcp,
            op: "connect",
            reason,
        })?;
        let (me, my_instance) = self
            .me
            .lock()
            .clone()
            .ok_or_else(|| Error::InvalidArgument("tcp backend not started".into()))?;
        let conn = Conn::new(
            Arc::clone(&self.cfg),
            me,
            my_instance,
            peer.name.to_owned(),
            peer.instance_id,
            addrs,
            Arc::clone(&self.shut),
        );
        conn.warm_up()?;
        let mut conns = self.conns.lock();
        conns.retain(|c| c.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
        Ok(conn)
    }

    fn peer_idle(&self, peer: &str) -> bool {
        self.server
            .lock()
            .as_ref()
            .is_none_or(|s| s.peer_idle(peer))
    }

    fn fence_peer(&self, peer: &str, wait: std::time::Duration) -> bool {
        // Shut down under the lock, wait without it (a shutdown of the backend may come).
        let fence = self.server.lock().as_ref().map(|s| s.fence_peer(peer));
        fence.is_none_or(|f| f.wait(wait))
    }

    fn shutdown(&self) {
        if self.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        for c in self.conns.lock().drain(..) {
            if let Some(c) = c.upgrade() {
                c.fail(Error::Cancelled);
            }
        }
        if let Some(s) = self.server.lock().take() {
            s.stop();
        }
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}
