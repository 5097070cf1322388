//! The agent: the per-process endpoint that owns backends and registrations, exports its
//! metadata, loads its peers', and creates transfer requests.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::backend::{
    Backend, BackendName, Connection, MetadataHooks, Notification, PeerInfo, Registered, Runs,
    Segment, TargetHandle, XferPlan,
};
use crate::error::{Error, Result};
use crate::mem::{Desc, DescList, MemKind};
use crate::metadata::{AgentMetadata, BackendInfo, RegionInfo, MAX_NAME_BYTES};
use crate::region::{AccessGate, Region};
use crate::xfer::{Choice, Telemetry, Watchdog, XferInfo, XferOp, XferRequest};

#[path = "prepped.rs"]
mod prepped;
pub use prepped::PreppedList;

/// How long deregistration waits for transfers that still hold a region.
pub const DEREGISTER_PATIENCE: Duration = Duration::from_secs(60);

/// Options of a transfer request.
#[derive(Clone, Debug, Default)]
pub struct XferOptions {
    /// Bytes delivered to the target after the data of each post has landed there.
    pub notif: Option<Vec<u8>>,
    /// Use this backend instead of the policy's choice (an error if it cannot carry the request).
    pub backend: Option<BackendName>,
    /// Each post ends `TimedOut` if it has not ended this long after it started.
    pub deadline: Option<Duration>,
}

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
                    Err(e) => Some(format!("start failed: {e}")),
                },
                Err(why) => Some(why.to_string()),
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
                unavailable,
            });
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

type TelemetryCache = Arc<Mutex<HashMap<(BackendName, XferOp), Arc<Telemetry>>>>;

struct PeerState {
    md: AgentMetadata,
    name: Arc<str>,
    telemetry: TelemetryCache,
    /// (kind, dev_id, addr) -> index into md.regions.
    index: BTreeMap<(MemKind, u64, u64), usize>,
    conns: Arc<Mutex<HashMap<BackendName, Arc<dyn Connection>>>>,
}

impl PeerState {
    fn new(
        md: AgentMetadata,
        conns: Arc<Mutex<HashMap<BackendName, Arc<dyn Connection>>>>,
        telemetry: TelemetryCache,
    ) -> Self {
        let index = md
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.kind, r.desc.dev_id, r.desc.addr), i))
            .collect();
        PeerState {
            name: Arc::from(md.name.as_str()),
            md,
            telemetry,
            index,
            conns,
        }
    }

    fn telemetry(&self, backend: BackendName, op: XferOp) -> Arc<Telemetry> {
        Arc::clone(
            self.telemetry
                .lock()
                .entry((backend, op))
                .or_insert_with(|| Arc::new(Telemetry::new(backend, &self.name, op))),
        )
    }

    fn find(&self, kind: MemKind, desc: &Desc) -> Option<(usize, &RegionInfo)> {
        let (_, &i) = self
            .index
            .range(..=(kind, desc.dev_id, desc.addr))
            .next_back()?;
        let r = &self.md.regions[i];
        (r.kind == kind && r.desc.contains(desc)).then_some((i, r))
    }

    fn backend_info(&self, b: BackendName) -> Option<&BackendInfo> {
        self.md.backends.iter().find(|i| i.name == b)
    }
}

pub(crate) struct AgentInner {
    name: Arc<str>,
    instance_id: u128,
    generation: AtomicU64,
    next_region: AtomicU64,
    backends: Vec<Arc<dyn Backend>>,
    states: Vec<BackendState>,
    target: TargetHandle,
    peers: RwLock<HashMap<String, Arc<PeerState>>>,
    own_peer: Mutex<Option<(u64, Arc<PeerState>)>>,
    watchdog: Arc<Watchdog>,
    shut: AtomicBool,
    /// The staging thread, started by the first staged request.
    stage: OnceLock<crate::staging::StageThread>,
}

impl MetadataHooks for AgentInner {
    fn metadata(&self) -> Vec<u8> {
        AgentInner::metadata(self).encode()
    }

    fn load(&self, bytes: &[u8]) -> Result<String> {
        self.load_remote_md(AgentMetadata::decode(bytes)?)
    }

    fn forget(&self, name: &str, instance: u128) -> Result<bool> {
        let mut peers = self.peers.write();
        let Some(p) = peers.get(name) else {
            return Ok(false);
        };
        if p.md.instance_id != instance {
            return Err(Error::Denied {
                peer: self.name.to_string(),
                reason: format!(
                    "the metadata loaded for '{name}' is of instance {:032x}, not the caller's \
                     {instance:032x}: an agent may invalidate only its own",
                    p.md.instance_id
                ),
            });
        }
        let p = peers.remove(name);
        drop(peers);
        if let Some(p) = p {
            tracing::info!(agent = %self.name, peer = %name, "peer invalidated its metadata");
            for c in p.conns.lock().values() {
                c.close();
            }
        }
        Ok(true)
    }
}

impl AgentInner {
    fn build_metadata(&self, regions: Vec<RegionInfo>, partial: bool) -> AgentMetadata {
        AgentMetadata {
            name: self.name.to_string(),
            instance_id: self.instance_id,
            generation: self.generation.load(Ordering::Acquire),
            partial,
            backends: self
                .backends
                .iter()
                .map(|b| BackendInfo {
                    name: b.name(),
                    conn_info: b.conn_info(),
                })
                .collect(),
            regions,
        }
    }

    fn metadata(&self) -> AgentMetadata {
        let regions = self
            .target
            .0
            .regions
            .snapshot()
            .iter()
            .map(|r| region_info(r))
            .collect();
        self.build_metadata(regions, false)
    }

    fn check_live(&self) -> Result<()> {
        if self.shut.load(Ordering::Acquire) {
            Err(Error::Shutdown(self.name.to_string()))
        } else {
            Ok(())
        }
    }

    /// Loads decoded metadata (see [`Agent::load_remote`]).
    fn load_remote_md(&self, md: AgentMetadata) -> Result<String> {
        self.check_live()?;
        if md.name == *self.name {
            return Err(Error::InvalidArgument(format!(
                "metadata of '{}' is this agent's own name",
                md.name
            )));
        }
        let name = md.name.clone();
        let mut peers = self.peers.write();
        let next = match peers.get(&name) {
            Some(old) if old.md.instance_id == md.instance_id => {
                if md.generation < old.md.generation {
                    return Err(Error::StaleMetadata {
                        peer: name,
                        have: old.md.generation,
                        got: md.generation,
                    });
                }
                // Connections whose info changed are closed and made again on next use.
                {
                    let mut conns = old.conns.lock();
                    conns.retain(|b, c| {
                        let same = md.backends.iter().any(|i| i.name == *b)
                            && old.backend_info(*b).map(|i| &i.conn_info)
                                == md
                                    .backends
                                    .iter()
                                    .find(|i| i.name == *b)
                                    .map(|i| &i.conn_info);
                        if !same {
                            c.close();
                        }
                        same
                    });
                }
                let merged = if md.partial {
                    let mut merged = old.md.clone();
                    merged.generation = md.generation;
                    merged.backends = md.backends;
                    for r in md.regions {
                        merged
                            .regions
                            .retain(|x| !(x.kind == r.kind && x.desc.overlaps(&r.desc)));
                        merged.regions.push(r);
                    }
                    merged
                } else {
                    md
                };
                PeerState::new(merged, Arc::clone(&old.conns), Arc::clone(&old.telemetry))
            }
            old => {
                if let Some(old) = old {
                    // A restart, or someone loading other metadata under the peer's name: either
                    // way worth a line and a count.
                    metrics::counter!("nixl_peer_instance_replaced_total").increment(1);
                    tracing::warn!(agent = %self.name, peer = %name,
                        old_instance = %format_args!("{:032x}", old.md.instance_id),
                        new_instance = %format_args!("{:032x}", md.instance_id),
                        "peer metadata of a new instance replaces the loaded one; reconnecting");
                    for c in old.conns.lock().values() {
                        c.close();
                    }
                }
                PeerState::new(md, Arc::default(), Arc::default())
            }
        };
        tracing::debug!(agent = %self.name, peer = %name, generation = next.md.generation,
            regions = next.md.regions.len(), "loaded peer metadata");
        peers.insert(name.clone(), Arc::new(next));
        Ok(name)
    }

    fn deregister_region(&self, region: &Arc<Region>) -> Result<()> {
        if self.target.0.regions.remove_id(region).is_none() {
            return Err(Error::NotRegistered {
                kind: region.kind,
                desc: region.desc,
            });
        }
        self.finish_deregister(region)
    }

    fn finish_deregister(&self, region: &Arc<Region>) -> Result<()> {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let drained = region.gate.close_and_drain(DEREGISTER_PATIENCE);
        for b in &self.backends {
            if region.has_backend(b.name()) {
                b.deregister(region.registered(b.name()));
            }
        }
        if drained {
            Ok(())
        } else {
            Err(Error::Backend {
                backend: region.backends.first().map_or(BackendName::Local, |b| b.0),
                op: "deregister",
                reason: format!(
                    "transfers still held {} {:?} after {:?}",
                    region.kind, region.desc, DEREGISTER_PATIENCE
                ),
            })
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

/// Refuses a notification over [`crate::backend::MAX_NOTIF_BYTES`] at the sender, with the limit.
fn check_notif_len(msg: Option<&[u8]>) -> Result<()> {
    match msg {
        Some(m) if m.len() > crate::backend::MAX_NOTIF_BYTES => {
            Err(Error::InvalidArgument(format!(
                "notification of {} bytes is over the limit of {} bytes (MAX_NOTIF_BYTES)",
                m.len(),
                crate::backend::MAX_NOTIF_BYTES
            )))
        }
        _ => Ok(()),
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

/// An RAII registration: the regions are deregistered when it is dropped (errors are logged), or
/// explicitly by [`Registration::deregister`], which reports them.
pub struct Registration {
    agent: Weak<AgentInner>,
    regions: Vec<Arc<Region>>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.regions.iter().map(|r| (r.kind, r.desc)))
            .finish()
    }
}

impl Registration {
    /// The descriptors registered.
    pub fn descs(&self) -> Vec<Desc> {
        self.regions.iter().map(|r| r.desc).collect()
    }

    /// The registered regions.
    pub fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }

    /// Gives up the handle without deregistering: the regions stay registered until
    /// deregistered by descriptor ([`Agent::deregister`]) or until the agent is dropped.
    pub fn forget(mut self) {
        self.regions.clear();
    }

    /// Deregisters now, waiting for transfers that hold the regions; reports the first error.
    pub fn deregister(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        let Some(agent) = self.agent.upgrade() else {
            self.regions.clear();
            return Ok(());
        };
        let mut first = Ok(());
        for r in self.regions.drain(..) {
            // Regions deregistered by descriptor meanwhile are not an error here.
            if agent.target.0.regions.remove_id(&r).is_some() {
                if let Err(e) = agent.finish_deregister(&r) {
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
            }
        }
        first
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::error!(error = %e, "deregistration on drop failed");
        }
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

    /// Every backend given to the agent, running or unavailable with the reason.
    pub fn backends(&self) -> &[BackendState] {
        &self.inner.states
    }

    /// Registers every descriptor of `list` as a region, with every running backend that
    /// registers that kind of memory.
    ///
    /// # Safety
    /// For DRAM (and VRAM) descriptors, the memory must stay allocated, valid for reads and
    /// writes, until the region is deregistered (deregistration waits for transfers that still
    /// use it). While registered, the memory is read and written by transfers at any time, from
    /// other threads and processes: don't hold Rust references into it across a transfer that
    /// writes it, and describe memory a transfer writes with a pointer that may write
    /// ([`Desc::from_mut_slice`]). File, block and object descriptors carry no such contract.
    pub unsafe fn register(&self, list: &DescList) -> Result<Registration> {
        self.register_inner(list, None)
    }

    /// Registers with the named backends only.
    ///
    /// # Safety
    /// As [`Agent::register`].
    pub unsafe fn register_with(
        &self,
        list: &DescList,
        backends: &[BackendName],
    ) -> Result<Registration> {
        self.register_inner(list, Some(backends))
    }

    fn register_inner(
        &self,
        list: &DescList,
        only: Option<&[BackendName]>,
    ) -> Result<Registration> {
        let kind = list.kind();
        if list.is_empty() {
            return Err(Error::InvalidArgument("empty descriptor list".into()));
        }
        let chosen: Vec<&Arc<dyn Backend>> = match only {
            Some(names) => {
                let mut v = Vec::new();
                for n in names {
                    if let Some(b) = self.inner.backends.iter().find(|b| b.name() == *n) {
                        if !b.caps().local_kinds.contains(&kind) {
                            return Err(Error::InvalidArgument(format!(
                                "backend {n} does not register {kind} memory"
                            )));
                        }
                        v.push(b);
                    } else {
                        return Err(self.missing_backend(*n));
                    }
                }
                v
            }
            None => self
                .inner
                .backends
                .iter()
                .filter(|b| b.caps().local_kinds.contains(&kind))
                .collect(),
        };
        if chosen.is_empty() {
            let mut reason = format!("no running backend registers {kind} memory");
            for s in &self.inner.states {
                if let Some(r) = &s.unavailable {
                    let _ = write!(reason, "; {} unavailable: {r}", s.name);
                }
            }
            return Err(Error::Unavailable {
                backend: match kind {
                    MemKind::Vram => BackendName::Cuda,
                    MemKind::Object => BackendName::Object,
                    MemKind::File | MemKind::Block => BackendName::Posix,
                    MemKind::Dram => BackendName::Local,
                },
                reason,
            });
        }
        let mut done: Vec<Arc<Region>> = Vec::with_capacity(list.len());
        let result = (|| {
            for desc in list.descs() {
                // Before any backend registers it: nothing to undo if there is no key.
                let key = random_u64()?;
                let mut publics = Vec::with_capacity(chosen.len());
                let mut skipped: Option<Error> = None;
                for b in &chosen {
                    match b.register(kind, desc) {
                        Ok(p) => publics.push((b.name(), p)),
                        // Not named by the caller, and unable to take this memory (RDMA with
                        // neither dmabuf nor peer memory for VRAM, say): the region goes
                        // without it, and requests that would need it say so.
                        Err(e @ Error::Unavailable { .. }) if only.is_none() => {
                            tracing::info!(agent = %self.inner.name, backend = %b.name(), %kind,
                                desc = ?desc, "registered without this backend: {e}");
                            skipped.get_or_insert(e);
                        }
                        Err(e) => {
                            for (name, public) in &publics {
                                if let Some(b) = self.backend(*name) {
                                    b.deregister(Registered {
                                        kind,
                                        desc: *desc,
                                        key,
                                        public,
                                    });
                                }
                            }
                            return Err(e);
                        }
                    }
                }
                if publics.is_empty() {
                    if let Some(e) = skipped {
                        return Err(e);
                    }
                }
                let region = Region {
                    id: self.inner.next_region.fetch_add(1, Ordering::Relaxed),
                    kind,
                    desc: *desc,
                    key,
                    backends: publics,
                    gate: AccessGate::default(),
                };
                let registered: Vec<(BackendName, Vec<u8>)> = region.backends.clone();
                match self.inner.target.0.regions.insert(region) {
                    Ok(r) => done.push(r),
                    Err(e) => {
                        for (name, public) in &registered {
                            if let Some(b) = chosen.iter().find(|b| b.name() == *name) {
                                b.deregister(Registered {
                                    kind,
                                    desc: *desc,
                                    key,
                                    public,
                                });
                            }
                        }
                        return Err(e);
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for r in &done {
                let _ = self.inner.deregister_region(r);
            }
            return Err(e);
        }
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(agent = %self.inner.name, %kind, count = done.len(), "registered");
        Ok(Registration {
            agent: Arc::downgrade(&self.inner),
            regions: done,
        })
    }

    /// Deregisters regions by the exact descriptors they were registered with. A descriptor that
    /// is not registered (never, or already deregistered) is an error; the ones before it in the
    /// list are deregistered.
    pub fn deregister(&self, kind: MemKind, descs: &[Desc]) -> Result<()> {
        for d in descs {
            let r = self.inner.target.0.regions.remove(kind, d)?;
            self.inner.finish_deregister(&r)?;
        }
        Ok(())
    }

    fn backend(&self, name: BackendName) -> Option<&Arc<dyn Backend>> {
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

    fn missing_backend(&self, name: BackendName) -> Error {
        match self.inner.states.iter().find(|s| s.name == name) {
            Some(BackendState {
                unavailable: Some(reason),
                ..
            }) => Error::Unavailable {
                backend: name,
                reason: reason.clone(),
            },
            // A name the library knows, but not among the agent's backends: it cannot run here
            // (not built, or left out of the configuration), which is what callers act on.
            _ => Error::Unavailable {
                backend: name,
                reason: format!(
                    "not run by agent '{}' (not built in this version, or left out of its \
                     configured backends)",
                    self.name()
                ),
            },
        }
    }

    /// The agent's full metadata.
    pub fn metadata(&self) -> AgentMetadata {
        self.inner.metadata()
    }

    /// The full metadata, encoded.
    pub fn metadata_bytes(&self) -> Vec<u8> {
        self.metadata().encode()
    }

    /// Metadata that describes only the regions containing `list`'s descriptors (a peer merges it
    /// into what it has). An empty list gives the connection info alone.
    pub fn partial_metadata(&self, list: &DescList) -> Result<AgentMetadata> {
        let mut regions: Vec<RegionInfo> = Vec::new();
        for (index, d) in list.descs().iter().enumerate() {
            let r = self.inner.target.0.regions.find(list.kind(), d).ok_or(
                Error::LocalNotRegistered {
                    index,
                    kind: list.kind(),
                    desc: *d,
                },
            )?;
            if !regions.iter().any(|x| x.desc == r.desc && x.kind == r.kind) {
                regions.push(region_info(&r));
            }
        }
        Ok(self.inner.build_metadata(regions, true))
    }

    /// Loads decoded metadata (see [`Agent::load_remote`]).
    pub fn load_remote_md(&self, md: AgentMetadata) -> Result<String> {
        self.inner.load_remote_md(md)
    }

    /// Loads a peer's metadata; returns the peer's name. A newer instance or generation replaces
    /// what was loaded, partial metadata of the current instance is merged, older generations are
    /// refused.
    pub fn load_remote(&self, bytes: &[u8]) -> Result<String> {
        let md = AgentMetadata::decode(bytes)?;
        self.load_remote_md(md)
    }

    /// Forgets a peer: its connections close and its transfers fail from then on.
    pub fn invalidate_remote(&self, name: &str) -> Result<()> {
        let removed = self.inner.peers.write().remove(name);
        match removed {
            Some(p) => {
                for c in p.conns.lock().values() {
                    c.close();
                }
                Ok(())
            }
            None => Err(Error::UnknownPeer(name.to_owned())),
        }
    }

    /// Names of the loaded peers.
    pub fn peers(&self) -> Vec<String> {
        self.inner.peers.read().keys().cloned().collect()
    }

    /// The metadata loaded for the peer `name` (what [`Agent::load_remote`] accepted, merged),
    /// or `None` when no such peer is loaded: for services that reach a peer by other means than
    /// a transfer (a health check through its listener's control channel, say).
    pub fn peer_metadata(&self, name: &str) -> Option<AgentMetadata> {
        self.inner.peers.read().get(name).map(|p| p.md.clone())
    }

    /// `Ok` if peer `name` is loaded and every descriptor of `list` lies inside a region that
    /// its metadata describes (what a transfer to it would be checked against); otherwise the
    /// error a transfer would get (`UnknownPeer`, `RemoteNotRegistered`). Bindings that poll
    /// for a peer's (partial) metadata use it.
    pub fn check_remote(&self, name: &str, list: &DescList) -> Result<()> {
        let p = self
            .inner
            .peers
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownPeer(name.to_owned()))?;
        for (index, d) in list.descs().iter().enumerate() {
            if p.find(list.kind(), d).is_none() {
                return Err(Error::RemoteNotRegistered {
                    peer: name.to_owned(),
                    index,
                    kind: list.kind(),
                    desc: *d,
                });
            }
        }
        Ok(())
    }

    fn peer(&self, name: &str) -> Result<Arc<PeerState>> {
        if name == &*self.inner.name {
            // Transfers to ourselves (storage, or local copies) use our own metadata.
            let gen = self.generation();
            let mut own = self.inner.own_peer.lock();
            if let Some((g, p)) = &*own {
                if *g == gen {
                    return Ok(Arc::clone(p));
                }
            }
            let (conns, telemetry) = own
                .as_ref()
                .map(|(_, p)| (Arc::clone(&p.conns), Arc::clone(&p.telemetry)))
                .unwrap_or_default();
            let p = Arc::new(PeerState::new(self.metadata(), conns, telemetry));
            *own = Some((gen, Arc::clone(&p)));
            return Ok(p);
        }
        self.inner
            .peers
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownPeer(name.to_owned()))
    }

    fn connection(&self, peer: &PeerState, b: &Arc<dyn Backend>) -> Result<Arc<dyn Connection>> {
        let mut conns = peer.conns.lock();
        if let Some(c) = conns.get(&b.name()) {
            return Ok(Arc::clone(c));
        }
        let info = peer
            .backend_info(b.name())
            .ok_or_else(|| Error::UnknownBackend(format!("{} not offered by peer", b.name())))?;
        let c = b.connect(&PeerInfo {
            name: &peer.md.name,
            instance_id: peer.md.instance_id,
            conn_info: &info.conn_info,
        })?;
        conns.insert(b.name(), Arc::clone(&c));
        Ok(c)
    }

    /// Creates a transfer request: validates both lists against the registrations on both sides
    /// once, chooses the backend, and prepares it. Post it with [`XferRequest::post`].
    pub fn create_xfer(
        &self,
        op: XferOp,
        local: &DescList,
        remote: &DescList,
        peer: &str,
        opts: XferOptions,
    ) -> Result<XferRequest> {
        self.inner.check_live()?;
        check_notif_len(opts.notif.as_deref())?;
        if local.len() != remote.len() {
            return Err(Error::Mismatch(format!(
                "{} local descriptors, {} remote",
                local.len(),
                remote.len()
            )));
        }
        if local.is_empty() {
            return Err(Error::InvalidArgument("empty transfer".into()));
        }
        let p = self.peer(peer)?;
        let regions = &self.inner.target.0.regions;
        let mut local_regions: Vec<Arc<Region>> = Vec::new();
        let mut remote_idx: Vec<usize> = Vec::new();
        let mut segments = Vec::with_capacity(local.len());
        for (index, (l, r)) in local.descs().iter().zip(remote.descs()).enumerate() {
            if l.len != r.len {
                return Err(Error::Mismatch(format!(
                    "descriptor {index}: local length {} != remote length {}",
                    l.len, r.len
                )));
            }
            // Consecutive descriptors usually share a region: check the last one first.
            let li = match local_regions
                .iter()
                .rposition(|x| x.kind == local.kind() && x.desc.contains(l))
            {
                Some(i) => i,
                None => {
                    let reg = regions
                        .find(local.kind(), l)
                        .ok_or(Error::LocalNotRegistered {
                            index,
                            kind: local.kind(),
                            desc: *l,
                        })?;
                    local_regions.push(reg);
                    local_regions.len() - 1
                }
            };
            let ri = match remote_idx
                .iter()
                .rposition(|&i| p.md.regions[i].desc.contains(r))
            {
                Some(i) => i,
                None => {
                    let (i, _) =
                        p.find(remote.kind(), r)
                            .ok_or_else(|| Error::RemoteNotRegistered {
                                peer: peer.to_owned(),
                                index,
                                kind: remote.kind(),
                                desc: *r,
                            })?;
                    remote_idx.push(i);
                    remote_idx.len() - 1
                }
            };
            segments.push(Segment {
                local: *l,
                remote: *r,
                local_region: li as u32,
                remote_region: ri as u32,
            });
        }
        let remote_regions: Vec<RegionInfo> = remote_idx
            .iter()
            .map(|&i| p.md.regions[i].clone())
            .collect();
        self.finish_xfer(
            &p,
            op,
            (local.kind(), remote.kind()),
            Pieces::Segments(segments),
            local_regions,
            remote_regions,
            opts,
        )
    }

    /// The second half of creating a request, once its segments are resolved: chooses the
    /// backend (or the staged path) and prepares the plan.
    #[allow(clippy::too_many_arguments)]
    fn finish_xfer(
        &self,
        p: &Arc<PeerState>,
        op: XferOp,
        (local_kind, remote_kind): (MemKind, MemKind),
        pieces: Pieces,
        local_regions: Vec<Arc<Region>>,
        remote_regions: Vec<RegionInfo>,
        opts: XferOptions,
    ) -> Result<XferRequest> {
        let peer = &*p.name;
        let descs = pieces.len();
        let (backend, reason) = match self.select(
            p,
            op,
            local_kind,
            remote_kind,
            &local_regions,
            &remote_regions,
            &opts,
        ) {
            Ok(x) => x,
            Err(Error::NoBackend {
                peer: pn,
                local_kind,
                remote_kind,
                reason,
            }) => {
                return match self.create_staged(
                    p,
                    op,
                    remote_kind,
                    pieces.into_segments(),
                    local_regions,
                    remote_regions,
                    &opts,
                    &reason,
                ) {
                    Some(Ok(x)) => Ok(x),
                    Some(Err(why)) => Err(Error::NoBackend {
                        peer: pn,
                        local_kind,
                        remote_kind,
                        reason: format!("{reason} staged through host memory: {why}"),
                    }),
                    None => Err(Error::NoBackend {
                        peer: pn,
                        local_kind,
                        remote_kind,
                        reason,
                    }),
                };
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(agent = %self.inner.name, peer, backend = %backend.name(), op = op.as_str(),
            descs, "backend {}: {reason}", backend.name());
        let conn = self.connection(p, backend)?;
        let bytes = pieces.total_bytes();
        let mut plan = XferPlan {
            op,
            local_kind,
            remote_kind,
            segments: Vec::new(),
            local_regions: local_regions.clone(),
            remote_regions,
            notif: opts.notif,
            initiator: Arc::clone(&self.inner.name),
        };
        let prepared = match pieces {
            Pieces::Segments(segments) => {
                plan.segments = segments;
                conn.prepare(plan)?
            }
            Pieces::Runs(runs) => conn.prepare_runs(plan, runs)?,
        };
        Ok(XferRequest::new(
            prepared,
            local_regions,
            XferInfo {
                op,
                backend: backend.name(),
                peer: Arc::clone(&p.name),
                bytes,
                descs,
                reason,
                staged: None,
            },
            opts.deadline,
            Arc::clone(&self.inner.watchdog),
            p.telemetry(backend.name(), op),
        ))
    }

    /// The staged path (see [`crate::staging`]): `None` when no backend stages the local kind;
    /// `Some(Err(why))` when one does but the request cannot go that way.
    #[allow(clippy::too_many_arguments)]
    fn create_staged(
        &self,
        p: &Arc<PeerState>,
        op: XferOp,
        remote_kind: MemKind,
        segments: Vec<Segment>,
        local_regions: Vec<Arc<Region>>,
        remote_regions: Vec<RegionInfo>,
        opts: &XferOptions,
        direct: &str,
    ) -> Option<std::result::Result<XferRequest, String>> {
        let kind = local_regions.first()?.kind;
        let stager = self
            .inner
            .backends
            .iter()
            .filter_map(|b| b.stager())
            .find(|s| s.kind() == kind)?;
        Some(self.create_staged_with(
            stager,
            p,
            op,
            remote_kind,
            segments,
            local_regions,
            remote_regions,
            opts,
            direct,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn create_staged_with(
        &self,
        stager: Arc<dyn crate::staging::Stager>,
        p: &Arc<PeerState>,
        op: XferOp,
        remote_kind: MemKind,
        segments: Vec<Segment>,
        mut local_regions: Vec<Arc<Region>>,
        remote_regions: Vec<RegionInfo>,
        opts: &XferOptions,
        direct: &str,
    ) -> std::result::Result<XferRequest, String> {
        let total = segments
            .iter()
            .try_fold(0u64, |a, s| a.checked_add(s.local.len))
            .ok_or("request length overflows")?;
        let layout = crate::staging::ChunkLayout::new(total, stager.chunk_bytes(), stager.slots());
        let (slot_len, slots) = (layout.slot_len, layout.slots);
        let dev_id = segments.first().map_or(0, |s| s.local.dev_id);
        let host = stager.alloc(slot_len * slots, dev_id).map_err(|e| {
            format!(
                "{} could not allocate {} host bytes: {e}",
                stager.backend(),
                slot_len * slots
            )
        })?;
        let dram: Vec<Arc<dyn Backend>> = self
            .inner
            .backends
            .iter()
            .filter(|b| b.caps().local_kinds.contains(&MemKind::Dram))
            .cloned()
            .collect();
        let id = self.inner.next_region.fetch_add(1, Ordering::Relaxed);
        let bounce = crate::staging::Bounce::register(id, host, dram).map_err(|e| e.to_string())?;
        let base = bounce.region.desc.addr;
        let cut = layout.cut(&segments, base);
        let bounce_regions = [Arc::clone(&bounce.region)];
        let (backend, _) = self
            .select(
                p,
                op,
                MemKind::Dram,
                remote_kind,
                &bounce_regions,
                &remote_regions,
                opts,
            )
            .map_err(|e| match e {
                Error::NoBackend { reason, .. } => {
                    format!("no backend carries host memory: {reason}")
                }
                e => e.to_string(),
            })?;
        let conn = self.connection(p, backend).map_err(|e| e.to_string())?;
        let telemetry = p.telemetry(backend.name(), op);
        let silent = Arc::new(crate::xfer::Telemetry::silent());
        let last = cut.len() - 1;
        let mut chunks = Vec::with_capacity(cut.len());
        for (k, pieces) in cut.into_iter().enumerate() {
            let plan = XferPlan {
                op,
                local_kind: MemKind::Dram,
                remote_kind,
                segments: pieces
                    .iter()
                    .map(|(s, h)| Segment {
                        local: *h,
                        remote: s.remote,
                        local_region: 0,
                        remote_region: s.remote_region,
                    })
                    .collect(),
                local_regions: vec![Arc::clone(&bounce.region)],
                remote_regions: remote_regions.clone(),
                notif: if k == last { opts.notif.clone() } else { None },
                initiator: Arc::clone(&self.inner.name),
            };
            let bytes = plan.total_bytes();
            let descs = plan.segments.len();
            let prepared = conn.prepare(plan).map_err(|e| e.to_string())?;
            let req = XferRequest::new(
                prepared,
                vec![Arc::clone(&bounce.region)],
                XferInfo {
                    op,
                    backend: backend.name(),
                    peer: Arc::clone(&p.name),
                    bytes,
                    descs,
                    reason: Choice::Best,
                    staged: None,
                },
                None,
                Arc::clone(&self.inner.watchdog),
                // Counted once, as the staged request.
                Arc::clone(&silent),
            );
            chunks.push(crate::staging::Chunk {
                req,
                pieces: pieces.iter().map(|(s, h)| (s.local, h.addr)).collect(),
            });
        }
        let jobs = match self.inner.stage.get() {
            Some(t) => t.sender(),
            None => {
                let t = crate::staging::StageThread::start(&self.inner.name)
                    .map_err(|e| e.to_string())?;
                self.inner.stage.get_or_init(|| t).sender()
            }
        };
        let descs = segments.len();
        local_regions.push(Arc::clone(&bounce.region));
        let staged_by = stager.backend();
        tracing::debug!(agent = %self.inner.name, peer = %p.name, backend = %backend.name(),
            stager = %staged_by, op = op.as_str(), descs, chunks = chunks.len(),
            "staged through host memory");
        let notif = opts.notif.is_some();
        let staged = crate::staging::StagedXfer::new(op, stager, chunks, notif, bounce, jobs);
        Ok(XferRequest::new(
            Box::new(staged),
            local_regions,
            XferInfo {
                op,
                backend: backend.name(),
                peer: Arc::clone(&p.name),
                bytes: total,
                descs,
                reason: Choice::PassedOver(format!(" {}", direct.trim())),
                staged: Some(staged_by),
            },
            opts.deadline,
            Arc::clone(&self.inner.watchdog),
            telemetry,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn select<'a>(
        &'a self,
        p: &PeerState,
        _op: XferOp,
        local_kind: MemKind,
        remote_kind: MemKind,
        local_regions: &[Arc<Region>],
        remote_regions: &[RegionInfo],
        opts: &XferOptions,
    ) -> Result<(&'a Arc<dyn Backend>, Choice)> {
        let mut why_not = String::new();
        let candidates: Vec<&Arc<dyn Backend>> = match opts.backend {
            Some(n) => vec![self.backend(n).ok_or_else(|| self.missing_backend(n))?],
            None => self.inner.backends.iter().collect(),
        };
        for b in candidates {
            let n = b.name();
            let caps = b.caps();
            let reject = if !caps.local_kinds.contains(&local_kind) {
                Some(format!("does not move local {}", local_kind))
            } else if !caps.remote_kinds.contains(&remote_kind) {
                Some(format!("does not move remote {}", remote_kind))
            } else if opts.notif.is_some() && !caps.notifications {
                Some("carries no notifications".into())
            } else if let Some(r) = local_regions.iter().find(|r| !r.has_backend(n)) {
                Some(format!("local region {:?} not registered with it", r.desc))
            } else if let Some(r) = remote_regions
                .iter()
                .find(|r| !r.backends.iter().any(|x| x.0 == n))
            {
                Some(format!("remote region {:?} not registered with it", r.desc))
            } else {
                match p.backend_info(n) {
                    None => Some("peer does not run it".into()),
                    Some(info) => b.can_reach(&info.conn_info).err().map(|e| e.to_string()),
                }
            };
            match reject {
                None => {
                    let reason = if opts.backend.is_some() {
                        Choice::Named
                    } else if why_not.is_empty() {
                        Choice::Best
                    } else {
                        Choice::PassedOver(why_not)
                    };
                    return Ok((b, reason));
                }
                Some(r) => {
                    let _ = write!(why_not, " {n}: {r};");
                }
            }
        }
        for s in &self.inner.states {
            if let Some(r) = &s.unavailable {
                let _ = write!(why_not, " {}: unavailable: {r};", s.name);
            }
        }
        Err(Error::NoBackend {
            peer: p.md.name.clone(),
            local_kind,
            remote_kind,
            reason: why_not.trim().to_owned(),
        })
    }

    /// Sends a standalone notification to a peer, over the best backend that carries them.
    pub fn send_notif(&self, peer: &str, msg: &[u8]) -> Result<()> {
        self.notif_via(peer, msg, false)
    }

    /// As [`Agent::send_notif`], but returns once the message is on its way instead of when the
    /// peer took it: for messages whose sender would otherwise wait behind data queued to the
    /// same peer (a `tcp` acknowledgement travels behind the DATA of READs the peer serves). A
    /// refusal by the peer is logged, not returned.
    pub fn post_notif(&self, peer: &str, msg: &[u8]) -> Result<()> {
        self.notif_via(peer, msg, true)
    }

    /// Whether nothing that `peer` asked of this agent's memory is being carried out, or was
    /// received and waits to be, by any backend right now (see [`Backend::peer_idle`]): once a
    /// peer said it stopped, memory it read may be reused when this holds.
    pub fn peer_idle(&self, peer: &str) -> bool {
        self.inner.backends.iter().all(|b| b.peer_idle(peer))
    }

    fn notif_via(&self, peer: &str, msg: &[u8], post: bool) -> Result<()> {
        self.inner.check_live()?;
        check_notif_len(Some(msg))?;
        let p = self.peer(peer)?;
        let mut why_not = String::new();
        for b in &self.inner.backends {
            if !b.caps().notifications {
                continue;
            }
            let Some(info) = p.backend_info(b.name()) else {
                continue;
            };
            if let Err(r) = b.can_reach(&info.conn_info) {
                let _ = write!(why_not, " {}: {r};", b.name());
                continue;
            }
            let conn = self.connection(&p, b)?;
            return if post {
                conn.post_notif(&self.inner.name, msg)
            } else {
                conn.send_notif(&self.inner.name, msg)
            };
        }
        Err(Error::NoBackend {
            peer: peer.to_owned(),
            local_kind: MemKind::Dram,
            remote_kind: MemKind::Dram,
            reason: format!("no backend carries notifications to it;{why_not}"),
        })
    }

    /// Takes every notification received so far.
    pub fn take_notifs(&self) -> Vec<Notification> {
        self.inner.target.take_notifs()
    }

    /// Waits up to `timeout` for at least one notification, then takes all of them.
    pub fn wait_notifs(&self, timeout: Duration) -> Vec<Notification> {
        self.inner.target.wait_notifs(timeout)
    }

    /// Shuts down now (as dropping does): transfers in flight end `Cancelled`.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

fn region_info(r: &Region) -> RegionInfo {
    RegionInfo {
        kind: r.kind,
        desc: r.desc,
        key: r.key,
        backends: r.backends.clone(),
    }
}

/// A random u64 from the OS generator (`getrandom`), or an error when it fails: region keys,
/// instance ids and nonces are never made of guessable bytes instead.
pub fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    fill_random(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn random_u128() -> Result<u128> {
    let mut b = [0u8; 16];
    fill_random(&mut b)?;
    Ok(u128::from_le_bytes(b))
}

fn fill_random(buf: &mut [u8]) -> Result<()> {
    #[cfg(test)]
    if tests::RANDOM_FAILS.with(std::cell::Cell::get) {
        return Err(random_failed(std::io::Error::other("injected failure")));
    }
    getrandom::fill(buf).map_err(|e| random_failed(std::io::Error::other(e.to_string())))
}

fn random_failed(e: std::io::Error) -> Error {
    Error::io(
        "the OS random generator (getrandom) failed, so no unguessable key or id can be made",
        e,
    )
}

/// A request's pieces as the core resolved them: segments, or compact runs (one region and
/// device per side) for the backends that take them ([`Connection::prepare_runs`]).
pub(crate) enum Pieces {
    Segments(Vec<Segment>),
    Runs(Runs),
}

impl Pieces {
    fn len(&self) -> usize {
        match self {
            Pieces::Segments(s) => s.len(),
            Pieces::Runs(r) => r.runs.len(),
        }
    }

    fn total_bytes(&self) -> u64 {
        match self {
            Pieces::Segments(s) => s
                .iter()
                .fold(0u64, |acc, s| acc.saturating_add(s.local.len)),
            Pieces::Runs(r) => r.total_bytes(),
        }
    }

    fn into_segments(self) -> Vec<Segment> {
        match self {
            Pieces::Segments(s) => s,
            Pieces::Runs(r) => r.to_segments(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;

    thread_local! {
        /// Makes this thread's OS random generator fail.
        pub(crate) static RANDOM_FAILS: Cell<bool> = const { Cell::new(false) };
    }

    #[derive(Debug, Default)]
    struct Counting {
        registered: AtomicUsize,
    }

    impl Backend for Counting {
        fn name(&self) -> BackendName {
            BackendName::Local
        }
        fn caps(&self) -> crate::Caps {
            crate::Caps::new(&[MemKind::Dram], crate::Locality::SameProcess, 0)
                .without_notifications()
        }
        fn probe(&self) -> std::result::Result<(), crate::Unusable> {
            Ok(())
        }
        fn start(&self, _target: TargetHandle) -> Result<()> {
            Ok(())
        }
        fn conn_info(&self) -> Vec<u8> {
            Vec::new()
        }
        fn register(&self, _kind: MemKind, _desc: &Desc) -> Result<Vec<u8>> {
            self.registered.fetch_add(1, Ordering::Relaxed);
            Ok(Vec::new())
        }
        fn deregister(&self, _region: crate::backend::Registered<'_>) {
            self.registered.fetch_sub(1, Ordering::Relaxed);
        }
        fn can_reach(&self, _conn_info: &[u8]) -> std::result::Result<(), crate::Unusable> {
            Err("nowhere".into())
        }
        fn connect(&self, _peer: &crate::PeerInfo<'_>) -> Result<Arc<dyn crate::Connection>> {
            Err(Error::InvalidArgument("no peers".into()))
        }
        fn shutdown(&self) {}
    }

    #[test]
    fn no_key_or_id_without_the_os_random_generator() {
        RANDOM_FAILS.with(|f| f.set(true));
        let e = Agent::builder("no-random").build().unwrap_err();
        assert!(e.to_string().contains("getrandom"), "{e}");
        assert!(random_u64().is_err());

        RANDOM_FAILS.with(|f| f.set(false));
        let be = Arc::new(Counting::default());
        let agent = Agent::builder("random")
            .backend(be.clone())
            .build()
            .unwrap();
        let buf = vec![0u8; 4096];
        let list = DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&buf)]).unwrap();
        RANDOM_FAILS.with(|f| f.set(true));
        // SAFETY: `buf` outlives the agent, and the registration is refused anyway.
        let e = unsafe { agent.register(&list) }.unwrap_err();
        assert!(e.to_string().contains("getrandom"), "{e}");
        assert_eq!(be.registered.load(Ordering::Relaxed), 0, "left registered");
        assert!(agent.metadata().regions.is_empty());
        RANDOM_FAILS.with(|f| f.set(false));
        // SAFETY: as above; `buf` outlives the registration.
        let r = unsafe { agent.register(&list) }.unwrap();
        assert_ne!(agent.metadata().regions[0].key, 0);
        drop(r);
    }

    #[test]
    fn check_remote_says_whether_a_peer_describes_the_descriptors() {
        let a = Agent::builder("a")
            .backend(Arc::new(Counting::default()))
            .build()
            .unwrap();
        let b = Agent::builder("b")
            .backend(Arc::new(Counting::default()))
            .build()
            .unwrap();
        let buf = vec![0u8; 4096];
        let whole = DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(&buf)]).unwrap();
        let inside = DescList::from_descs(
            MemKind::Dram,
            vec![Desc::new(buf.as_ptr() as u64 + 100, 200, 0)],
        )
        .unwrap();
        let outside =
            DescList::from_descs(MemKind::Dram, vec![Desc::new(buf.as_ptr() as u64, 4097, 0)])
                .unwrap();
        assert!(matches!(
            a.check_remote("b", &inside),
            Err(Error::UnknownPeer(_))
        ));
        // SAFETY: `buf` outlives the registration (dropped at the end of the test).
        let r = unsafe { b.register(&whole) }.unwrap();
        a.load_remote(&b.metadata_bytes()).unwrap();
        a.check_remote("b", &inside).unwrap();
        a.check_remote("b", &DescList::new(MemKind::Dram)).unwrap();
        assert!(matches!(
            a.check_remote("b", &outside),
            Err(Error::RemoteNotRegistered { index: 0, .. })
        ));
        drop(r);
    }
}
