//! The agent (`nixlAgent`) and what its handle shares with its requests.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{Agent, BackendName, DescList, Error, MemKind, XferOp};
use nixl_discovery::{Publication, Registry};
use nixl_transports::config::Config;
use nixl_transports::tcp::{
    fetch_metadata, invalidate_metadata, listen_addrs_in, push_metadata, Auth, PeerIdentity,
};
use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::cost::CostFit;
use crate::descs::{list_of, RegDList, XferDList};
use crate::errors::{err, invalid, nixlBackendError, nixlNotFoundError};
use crate::etcd::{etcd_env, etcd_err, etcd_state};
use crate::prepped::PreppedDlist;
use crate::xfer::{How, Lists, XferReq};

/// What an agent handle and its requests share; the agent shuts down when the last goes.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) agent: Arc<Agent>,
    auth: Auth,
    /// The central metadata store (etcd), connected on first use; this agent's publication.
    etcd: Mutex<Option<(Registry, Option<Publication>)>>,
    pub(crate) telemetry: bool,
    /// Per backend: what its transfers have taken in this agent (for `estimate_xfer_cost`).
    pub(crate) costs: Mutex<HashMap<BackendName, CostFit>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Unpublished first (the lease is revoked, the key deleted), then shut down.
        drop(self.etcd.lock().take());
        self.agent.shutdown();
    }
}

pub(crate) fn op_of(op: &str) -> PyResult<XferOp> {
    match op {
        "READ" => Ok(XferOp::Read),
        "WRITE" => Ok(XferOp::Write),
        o => Err(invalid(format!(
            "operation {o:?} is not \"READ\" or \"WRITE\""
        ))),
    }
}

pub(crate) fn backend_of(name: Option<&str>) -> PyResult<Option<BackendName>> {
    name.map(|n| {
        BackendName::parse(n).ok_or_else(|| {
            let known: Vec<&str> = BackendName::ALL.iter().map(|b| b.as_str()).collect();
            nixlNotFoundError::new_err(format!(
                "unknown backend '{n}' (known: {})",
                known.join(", ")
            ))
        })
    })
    .transpose()
}

pub(crate) fn port_addr(ip: &str, port: u16) -> String {
    if ip.contains(':') && !ip.starts_with('[') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Whether an error means the peer's listener is not up (yet): worth another try. A refusal
/// by a listener that is up (a wrong secret, say) is not.
pub(crate) fn not_listening(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => source.kind() == std::io::ErrorKind::ConnectionRefused,
        Error::RemoteDisconnect { reason, .. } => reason.contains("os error 111"),
        _ => false,
    }
}

/// `call(time left)` again every 50 ms while nothing listens at the peer's address yet, until
/// `timeout_ms` has passed (each try gets at least 100 ms); its first other answer otherwise.
fn until_listening<T>(
    timeout_ms: u64,
    mut call: impl FnMut(Duration) -> Result<T, Error>,
) -> Result<T, Error> {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match call(left.max(Duration::from_millis(100))) {
            Err(e)
                if not_listening(&e) && Instant::now() + Duration::from_millis(50) < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// An agent: NIXL's `nixlAgent`, with the calls `_api.py` needs.
#[pyclass(module = "nixl._bindings", name = "nixlAgent", frozen)]
#[derive(Debug)]
pub(crate) struct PyAgent {
    shared: Arc<Shared>,
}

#[pymethods]
impl PyAgent {
    /// Builds an agent from a nixl-rs configuration (TOML, as `nixl-agent` reads it). With
    /// `listen_port` set, the `tcp` backend listens there (0: any free port) and loads the
    /// metadata peers push (`send_local_metadata`): NIXL's listen thread.
    #[new]
    #[pyo3(signature = (name, config_toml = "", listen_port = None, telemetry = false))]
    fn new(
        py: Python<'_>,
        name: &str,
        config_toml: &str,
        listen_port: Option<u16>,
        telemetry: bool,
    ) -> PyResult<Self> {
        nixl_core::init_logging_from_env();
        if name.is_empty() {
            return Err(PyValueError::new_err("agent name must not be empty"));
        }
        let mut config = Config::from_toml(config_toml).map_err(err)?;
        if let Some(port) = listen_port {
            config
                .tcp
                .listen_unless_set(std::net::SocketAddr::from(([0, 0, 0, 0], port)));
            config.accept_pushes_unless_set(true);
            if let Some(list) = &mut config.backends {
                if !list.iter().any(|b| b == "tcp") {
                    list.push("tcp".into());
                }
            }
        }
        let name = name.to_owned();
        let agent = py
            .allow_threads(|| {
                config
                    .backends()
                    .and_then(|b| config.agent_builder(name).backends(b).build())
            })
            .map_err(err)?;
        if listen_port.is_some() {
            // NIXL's listen thread is the tcp listener here: without it, peers could neither
            // fetch this agent's metadata nor send theirs, so say why instead of going on.
            if let Some(s) = agent.backends().iter().find(|s| s.name == BackendName::Tcp) {
                if let Some(why) = &s.unavailable {
                    agent.shutdown();
                    return Err(nixlBackendError::new_err(format!(
                        "the listen thread (tcp listener on {}) cannot run: {why}",
                        config.tcp.listen.map_or("?".into(), |a| a.to_string())
                    )));
                }
            }
        }
        Ok(PyAgent {
            shared: Arc::new(Shared {
                agent: Arc::new(agent),
                etcd: Mutex::new(None),
                auth: config.auth(),
                telemetry,
                costs: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn name(&self) -> String {
        self.shared.agent.name().to_owned()
    }

    /// Every backend given to the agent: `(name, None)` when running, `(name, reason)` when not.
    fn backends(&self) -> Vec<(String, Option<String>)> {
        self.shared
            .agent
            .backends()
            .iter()
            .map(|s| (s.name.as_str().to_owned(), s.unavailable.clone()))
            .collect()
    }

    /// The port of the `tcp` listener (None when it runs none).
    fn listen_port(&self) -> Option<u16> {
        listen_addrs_in(&self.shared.agent.metadata())
            .first()
            .map(|a| a.port())
    }

    /// Registers the descriptors (with the named backends only, when given).
    #[pyo3(signature = (descs, backends = Vec::new()))]
    fn register(&self, py: Python<'_>, descs: &RegDList, backends: Vec<String>) -> PyResult<()> {
        let list = list_of(descs.kind, &descs.descs)?;
        let names = backends
            .iter()
            .map(|b| backend_of(Some(b)).map(|n| n.expect("some")))
            .collect::<PyResult<Vec<_>>>()?;
        let a = &self.shared.agent;
        let reg = py.allow_threads(|| {
            // SAFETY: NIXL's contract, which `register_memory` documents and this package's
            // README repeats: the memory described stays allocated, readable and writable
            // until it is deregistered (or the agent goes), and peers may read and write it
            // at any time meanwhile. File, block and object descriptors carry no such contract.
            unsafe {
                if names.is_empty() {
                    a.register(&list)
                } else {
                    a.register_with(&list, &names)
                }
            }
        });
        // Registrations live until deregistered by descriptor, as in NIXL and the C ABI.
        reg.map_err(err)?.forget();
        Ok(())
    }

    /// Deregisters by the exact descriptors registered, waiting for transfers that use them.
    fn deregister(&self, py: Python<'_>, descs: &RegDList) -> PyResult<()> {
        let a = &self.shared.agent;
        py.allow_threads(|| a.deregister(descs.kind, &descs.descs))
            .map_err(err)
    }

    fn local_md<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.shared.agent.metadata_bytes())
    }

    /// Metadata of the regions holding `descs` (and the connection info).
    fn partial_md<'py>(&self, py: Python<'py>, descs: &RegDList) -> PyResult<Bound<'py, PyBytes>> {
        let list = list_of(descs.kind, &descs.descs)?;
        let md = self.shared.agent.partial_metadata(&list).map_err(err)?;
        Ok(PyBytes::new(py, &md.encode()))
    }

    fn load_remote_md(&self, md: &[u8]) -> PyResult<String> {
        self.shared.agent.load_remote(md).map_err(err)
    }

    fn invalidate_remote(&self, name: &str) -> PyResult<()> {
        self.shared.agent.invalidate_remote(name).map_err(err)
    }

    /// Whether peer `name` is loaded and describes every descriptor of `descs`.
    #[pyo3(signature = (name, descs = None))]
    fn check_remote(&self, name: &str, descs: Option<&XferDList>) -> bool {
        let list = match descs {
            Some(d) => match DescList::from_descs(d.kind, d.descs.clone()) {
                Ok(l) => l,
                Err(_) => return false,
            },
            None => DescList::new(MemKind::Dram),
        };
        self.shared.agent.check_remote(name, &list).is_ok()
    }

    /// The etcd endpoints this agent would use (`NIXL_ETCD_ENDPOINTS`), or None.
    #[staticmethod]
    fn etcd_endpoints() -> Option<String> {
        etcd_env().map(|c| c.endpoints.join(","))
    }

    /// Publishes this agent's metadata in etcd (NIXL's `send_local_metadata()` with no
    /// address), kept up to date until `etcd_unpublish` or the agent's end; again: at once.
    fn etcd_publish(&self, py: Python<'_>) -> PyResult<()> {
        let s = &self.shared;
        py.allow_threads(|| {
            let mut guard = s.etcd.lock();
            let (reg, publication) = etcd_state(&mut guard)?;
            match publication {
                Some(p) => p.refresh().map_err(etcd_err),
                None => {
                    *publication = Some(reg.publish(&s.agent).map_err(etcd_err)?);
                    Ok(())
                }
            }
        })
    }

    /// Deletes this agent's metadata from etcd (NIXL's `invalidate_local_metadata()` with no
    /// address): peers watching it drop it; peers that loaded it keep it until they are told
    /// otherwise. Not published is no error.
    fn etcd_unpublish(&self, py: Python<'_>) -> PyResult<()> {
        let s = &self.shared;
        py.allow_threads(|| {
            let p = s.etcd.lock().as_mut().and_then(|(_, p)| p.take());
            drop(p); // revokes the lease: the key goes
        });
        Ok(())
    }

    /// Loads `name`'s metadata from etcd (NIXL's `fetch_remote_metadata(name)` with no
    /// address): `True` when it was there and is loaded. When it is not there yet, a
    /// background thread keeps looking for `wait_ms` and loads it when it appears, so that
    /// `check_remote_metadata` turns true then (NIXL's fetch is asynchronous too).
    fn etcd_fetch(&self, py: Python<'_>, name: &str, wait_ms: u64) -> PyResult<bool> {
        let s = &self.shared;
        let reg = py.allow_threads(|| {
            let mut guard = s.etcd.lock();
            etcd_state(&mut guard).map(|(r, _)| r.clone())
        })?;
        if py
            .allow_threads(|| reg.load_peer(&s.agent, name))
            .map_err(etcd_err)?
        {
            return Ok(true);
        }
        let weak = Arc::downgrade(&s.agent);
        let name = name.to_owned();
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        std::thread::Builder::new()
            .name("nixl-etcd-fetch".into())
            .spawn(move || {
                while Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                    let Some(agent) = weak.upgrade() else { return };
                    match reg.load_peer(&agent, &name) {
                        Ok(true) => return,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(peer = %name, error = %e, "etcd: fetching a peer failed");
                            return;
                        }
                    }
                }
                tracing::warn!(peer = %name, "etcd: the peer did not appear in time");
            })
            .map_err(|e| nixlBackendError::new_err(format!("etcd: cannot start a thread: {e}")))?;
        Ok(false)
    }

    /// Fetches the metadata of the agent listening at `ip:port` (retrying while nothing
    /// listens there yet, until `timeout_ms`), loads it, and returns its name.
    fn fetch_remote_md(
        &self,
        py: Python<'_>,
        ip: &str,
        port: u16,
        timeout_ms: u64,
    ) -> PyResult<String> {
        let addr = port_addr(ip, port);
        let s = &self.shared;
        py.allow_threads(|| {
            let md = until_listening(timeout_ms, |left| fetch_metadata(&addr, &s.auth, left))?;
            s.agent.load_remote(&md)
        })
        .map_err(err)
    }

    /// Pushes this agent's metadata (or the part describing `descs`) to the listener at
    /// `ip:port`, which loads it; returns the name it loaded it as.
    #[pyo3(signature = (ip, port, timeout_ms, descs = None))]
    fn send_md(
        &self,
        py: Python<'_>,
        ip: &str,
        port: u16,
        timeout_ms: u64,
        descs: Option<&RegDList>,
    ) -> PyResult<String> {
        let md = match descs {
            Some(d) => {
                let list = list_of(d.kind, &d.descs)?;
                self.shared
                    .agent
                    .partial_metadata(&list)
                    .map_err(err)?
                    .encode()
            }
            None => self.shared.agent.metadata_bytes(),
        };
        let addr = port_addr(ip, port);
        let auth = &self.shared.auth;
        py.allow_threads(|| {
            until_listening(timeout_ms, |left| push_metadata(&addr, auth, &md, left))
        })
        .map_err(err)
    }

    /// Asks the listener at `ip:port` to drop this agent's metadata (which it does only for the
    /// agent its connection proved, and only if it accepts pushes); returns whether it had it
    /// loaded. Nothing listening there is `False`: a gone peer holds nothing of this agent.
    fn invalidate_md(
        &self,
        py: Python<'_>,
        ip: &str,
        port: u16,
        timeout_ms: u64,
    ) -> PyResult<bool> {
        let addr = port_addr(ip, port);
        let s = &self.shared;
        let me = PeerIdentity::new(s.agent.name(), s.agent.instance_id());
        py.allow_threads(|| {
            match invalidate_metadata(&addr, &s.auth, &me, Duration::from_millis(timeout_ms)) {
                Err(e) if not_listening(&e) => Ok(false),
                r => r,
            }
        })
        .map_err(err)
    }

    /// Creates a request from two descriptor lists.
    #[pyo3(signature = (op, local, remote, peer, notif = None, backend = None))]
    #[allow(clippy::too_many_arguments)]
    fn create_xfer(
        &self,
        py: Python<'_>,
        op: &str,
        local: &XferDList,
        remote: &XferDList,
        peer: &str,
        notif: Option<Vec<u8>>,
        backend: Option<&str>,
    ) -> PyResult<XferReq> {
        let op = op_of(op)?;
        let local = list_of(local.kind, &local.descs)?;
        let remote = list_of(remote.kind, &remote.descs)?;
        let how = How::new(op, peer.to_owned(), notif, backend_of(backend)?);
        XferReq::create(py, &self.shared, how, local, remote)
    }

    /// Prepares a descriptor list for `make_prepped`: `agent_name` empty means local.
    fn prep_dlist(&self, py: Python<'_>, agent_name: &str, descs: &XferDList) -> PreppedDlist {
        let peer = if agent_name.is_empty() || agent_name == "NIXL_INIT_AGENT" {
            None
        } else {
            Some(agent_name.to_owned())
        };
        let a = &self.shared.agent;
        let core = py.allow_threads(|| {
            let list = DescList::from_descs(descs.kind, descs.descs.clone()).ok()?;
            let prepped = match &peer {
                None => a.prep_local(&list),
                Some(p) => a.prep_remote(p, &list),
            };
            prepped.ok().map(Arc::new)
        });
        PreppedDlist {
            peer,
            kind: descs.kind,
            descs: Arc::new(descs.descs.clone()),
            released: AtomicBool::new(false),
            core,
        }
    }

    /// Creates a request from entries of two prepared lists, picked by index.
    #[pyo3(signature = (op, local, local_idx, remote, remote_idx, notif = None, backend = None))]
    #[allow(clippy::too_many_arguments)]
    fn make_prepped(
        &self,
        py: Python<'_>,
        op: &str,
        local: &PreppedDlist,
        local_idx: &Bound<'_, PyAny>,
        remote: &PreppedDlist,
        remote_idx: &Bound<'_, PyAny>,
        notif: Option<Vec<u8>>,
        backend: Option<&str>,
    ) -> PyResult<XferReq> {
        let op = op_of(op)?;
        if local.peer.is_some() {
            return Err(invalid(
                "the local side was prepared for a remote agent (prepare it with \"NIXL_INIT_AGENT\")",
            ));
        }
        let peer = remote
            .peer
            .clone()
            .ok_or_else(|| invalid("the remote side was prepared as local (name its agent)"))?;
        let l = local.pick(local_idx, "local")?;
        let r = remote.pick(remote_idx, "remote")?;
        let how = How::new(op, peer, notif, backend_of(backend)?);
        if let (Some(lp), Some(rp)) = (&local.core, &remote.core) {
            // From the core's prepared lists: one pass over the indices. Should that fail (a
            // region deregistered and registered again since the list was prepared, the peer's
            // metadata reloaded), the request is made from the descriptors below, whose answer
            // (request or error) is the one given.
            let opts = how.opts();
            let a = &self.shared.agent;
            let (li, ri) = (l.idx.as_slice(py), r.idx.as_slice(py));
            if let Ok(req) = py.allow_threads(|| a.create_xfer_prepped(op, lp, li, rp, ri, opts)) {
                return Ok(XferReq::new(&self.shared, req, how, Lists::Picked(l, r)));
            }
        }
        let (l, r) = (l.list(py)?, r.list(py)?);
        XferReq::create(py, &self.shared, how, l, r)
    }

    /// The notifications received since the last call: `{agent name: [bytes, ...]}`.
    fn get_notifs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for n in self.shared.agent.take_notifs() {
            let key = n.from.as_str();
            let msg = PyBytes::new(py, &n.msg);
            match out.get_item(key)? {
                Some(l) => l.downcast::<PyList>()?.append(msg)?,
                None => out.set_item(key, PyList::new(py, [msg])?)?,
            }
        }
        Ok(out)
    }

    /// Sends a notification of its own to `peer`.
    fn gen_notif(&self, py: Python<'_>, peer: &str, msg: &[u8]) -> PyResult<()> {
        let a = &self.shared.agent;
        py.allow_threads(|| a.send_notif(peer, msg)).map_err(err)
    }

    /// Names of the loaded peers.
    fn peers(&self) -> Vec<String> {
        self.shared.agent.peers()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_ports() {
        assert_eq!(port_addr("10.0.0.1", 5), "10.0.0.1:5");
        assert_eq!(port_addr("::1", 5), "[::1]:5");
        assert_eq!(port_addr("[::1]", 5), "[::1]:5");
    }
}
