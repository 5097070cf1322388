//! The `cuda` backend: VRAM registration, CUDA IPC between processes of one node, fabric handles
//! between nodes of one NVLink domain, device copies, and VRAM ↔ DRAM staging; the CUDA driver
//! (and NVML, for the NVLink domain) is loaded at run time.
//!
//! # Availability
//!
//! The driver (`libcuda.so.1`) is opened at run time and every entry point is resolved and
//! `cuInit` called once, before any other driver call (`cuda::driver`). Without a driver, without
//! devices, or with a driver older than CUDA 12.0, [`CudaBackend::probe`](nixl_core::Backend)
//! says why (`libcuda.so.1 not found: ...`, `no CUDA devices ...`, `driver too old: ...`), the
//! agent reports `cuda unavailable: <reason>` and runs its other backends, and registering VRAM
//! is refused with that text. No code path reaches a driver call that could panic.
//!
//! # Registration
//!
//! `register(VRAM, desc)` checks that `desc.dev_id` is the pointer's device ordinal and walks the
//! range allocation by allocation (`handles::plan_chunks`):
//! - memory from `cudaMalloc`/`cuMemAlloc` is exported with `cuIpcGetMemHandle` on its
//!   allocation base (the chunk records its offset in the allocation);
//! - memory from the VMM API (`cuMemCreate` + `cuMemMap`: nixl's [`VmmBuffer`], PyTorch's
//!   expandable segments, which map many physical chunks back to back) is exported chunk by
//!   chunk with `cuMemExportToShareableHandle`: as a POSIX fd, kept by the owner and granted
//!   over its Unix socket to a peer that presents the region key, and as a fabric handle
//!   (`CU_MEM_HANDLE_TYPE_FABRIC`, multi-node NVLink) when the allocation was created with it
//!   and [`CudaConfig::allow_fabric`] is set;
//! - a chunk that cannot be exported (a VMM allocation without a shareable handle type, a
//!   stream-ordered pool without IPC) fails the registration with the reason and the fix.
//!
//! The public data ([`handles::RegionPublic`]) carries the device ordinal and UUID and the chunk
//! list; it is versioned and decoded with bounds, never trusted.
//!
//! # Transfers
//!
//! The initiator moves the bytes: at prepare time it maps every remote chunk the request touches
//! once (legacy: `cuIpcOpenMemHandle`; VMM: the fd granted by the owner, or the fabric handle,
//! imported, mapped and made accessible to the local device) and caches the mapping per (peer
//! instance, region, chunk, local device); a peer in the same process needs no mapping. The
//! request's segments are resolved to addresses, coalesced, and spread over a pool of streams
//! per device balanced by bytes (`copy`); each post enqueues `cuMemcpyDtoDAsync` (NVLink/P2P)
//! and events, and a completion thread waits for the events, delivers the notification to the
//! owner over its socket (the owner calls `TargetHandle::deliver`), and completes the request
//! once. Mappings belong to a peer *region* (`ipc::RegionImport`), never to a prepared
//! transfer: a transfer holds the regions it uses (their gate) for each post, from before its
//! copies are enqueued until their events have completed, so a region can be revoked (below)
//! while prepared transfers still exist, and their next post fails cleanly.
//!
//! Access control: VMM fds are granted only to the same uid (`SO_PEERCRED`) with the region's key,
//! checked by the owner's agent (`TargetHandle::check`). Legacy IPC and fabric handles are
//! capabilities carried in the metadata, as in NIXL: CUDA offers no owner-side check for them,
//! so whoever holds an agent's metadata could map those regions with the driver directly; this
//! backend, though, maps one on the same node only after its owner accepted an announcement
//! presenting the region key (below), and never uses a region whose announcement was refused.
//! A peer on another node announces over the control channel where both agents have one (see
//! "Locality and fabric").
//!
//! # Deregistration: revoking peers' mappings
//!
//! CUDA's docs say that if the owner frees legacy (`cudaMalloc`) memory while a peer still has
//! it open through IPC, the behaviour is undefined; VMM memory stays allocated while a peer maps
//! it, so a peer could keep writing memory the owner believes gone. So the owner tracks, and
//! revokes, every import (`ipc` has the protocol):
//! - before a peer maps any chunk of a region it announces the import over the owner's socket
//!   ("opened", with the region key, checked like a VMM fd grant); the owner records which
//!   connection imported which region (VMM fd grants are recorded too), while its check still
//!   holds the region, so a deregistration cannot slip between check and record;
//! - `deregister` of a region that peers imported sends "revoke" to each and waits, at most
//!   [`CudaConfig::op_timeout`], for "revoked"; a peer whose connection has ended is skipped at
//!   once, one that stays silent is logged (`nixl_cuda_revoke_timeouts_total`) and the owner goes
//!   on; `deregister` then closes the exported fds, and the caller may free the memory;
//! - the peer, on "revoke", closes the region's gate (no new copy starts), waits (bounded by its
//!   own `op_timeout`) for the copies in flight on it, closes its mappings
//!   (`cuIpcCloseMemHandle`, or unmap + release for VMM; a legacy mapping shared with another
//!   region of the same allocation stays open for that one), drops the region from its
//!   `ipc::ImportCache` and answers "revoked". A later post of a transfer prepared on it fails
//!   with `Denied: region ... was deregistered by its owner`; a new prepare is refused by the
//!   owner;
//! - when the peer's connection to the owner ends (owner gone, garbage on the socket, a reply
//!   timed out), the owner no longer tracks the peer's imports, so the peer gives up every
//!   mapping of that owner at once (later posts fail with `RemoteDisconnect`); the same happens
//!   when the connection is closed (the peer invalidated), and an import whose region key
//!   changed (re-registered) is replaced.
//!
//! # Locality and fabric: peers on other nodes of an NVLink domain
//!
//! The backend declares `Locality::SameNode` (the core's locality is one value per backend, and
//! NVLink, on one node or across an NVL72 rack, ranks before RDMA); `can_reach` decides per peer
//! from the connection info ([`handles::ConnInfo`], version 2; version 1 is still read), and
//! says why it refuses:
//! - same boot id and uid: the same node, reached as above (IPC handles, VMM fds, the socket);
//! - another node: reachable when fabric is allowed here ([`CudaConfig::allow_fabric`]), the
//!   peer exports fabric handles, and both agents have a device in the same NVLink domain (same
//!   cluster UUID and clique id). The CUDA driver API does not expose the domain; `nvml` asks
//!   NVML (`nvmlDeviceGetGpuFabricInfoV`, or `nvmlDeviceGetGpuFabricInfo` on older drivers) for
//!   each device this process sees, found by UUID without creating a context, and the
//!   connection info lists every device with its domain when NVML reports the fabric
//!   registration COMPLETED with success, plus a note saying why devices have none (`NVML
//!   unavailable: libnvidia-ml.so.1 not found: ...`, `fabric state NOT_STARTED`, ...). The
//!   refusals read `different node (boot id differs) and` ... `fabric is not allowed here`,
//!   `no NVLink domain here: <why>`, `the peer is in no NVLink domain: <why>`, `no common
//!   NVLink domain (ours: ...; the peer's: ...)`, `the peer does not export fabric handles`.
//!
//! A connection to a peer on another node uses fabric handles only, and never a Unix socket:
//! at prepare, every chunk the request touches must carry a fabric handle (a chunk without one,
//! legacy `cudaMalloc` memory or VMM memory allocated without `CU_MEM_HANDLE_TYPE_FABRIC`, is
//! refused with the chunk, its bytes and the fix named), and the peer's device holding the
//! region and our local device must be in the same domain; the chunks are then imported with
//! `cuMemImportFromShareableHandle(FABRIC)`, mapped and cached like same-node imports, and the
//! copies run as above.
//!
//! What the socket carries on one node goes, across nodes, over the agents' control channel
//! ([`crate::control`], the tcp backend's authenticated listener) when the backend has one
//! ([`CudaBackend::with_control`]; its endpoint is in the connection info) and so does the
//! peer (module `handles` has the messages, [`handles::Ctl`]):
//! - before mapping any chunk of a region, the importer announces it ("opened", with the region
//!   key and the importer's own endpoint); the owner checks it like a socket announcement
//!   (`TargetHandle::check`, whole region), records the importer while the check holds the
//!   region, and a refused announcement fails the prepare;
//! - `deregister` sends "revoke" to every importer on another node at once and waits for them,
//!   at most [`CudaConfig::op_timeout`] in all (after the same-node revocations); the importer
//!   (only for revocations from the agent it imported from) closes the region's gate, waits for
//!   its copies (bounded), closes its mappings and answers; later posts fail with
//!   `deregistered by its owner`; an unreachable importer is skipped, a silent or busy one
//!   reported (`nixl_cuda_revoke_timeouts_total`) and the owner goes on;
//! - notifications are sent as control requests after the copies (the owner delivers them
//!   under the name the channel authenticated), at most `handles::MAX_CTL_NOTIF` bytes.
//!
//! Without a control channel on either side (the plain [`CudaBackend::new`], or a peer that
//! publishes no endpoint) a peer on another node is still reached, but:
//! - a request with a notification is refused at prepare (and `send_notif` fails) with the
//!   reason, never silently dropped; send it with another backend;
//! - the owner is not told of the import, so its deregistration cannot revoke it. The peer
//!   drops its mappings when its connection closes (the peer is invalidated or reloaded) and
//!   replaces one whose region key changed; until then a transfer it had prepared still reaches
//!   the physical memory, which stays allocated while mapped (VMM semantics: no use after free,
//!   but no owner-side cut either).
//!
//! Fabric handles are capabilities carried in the metadata in any case (see Access control).
//!
//! [`CudaBackend::with_node_override`] makes two processes of one host take this path (each
//! publishes another node id, optionally with given domains): for tests only.
//!
//! # Staging
//!
//! [`CudaBackend`] offers a [`nixl_core::Stager`] (`staging::CudaStager`: pinned host buffers,
//! batched copies over the device's streams) so the agent can carry VRAM over `tcp`, `shm` or to
//! files when no direct path exists.
//!
//! # Files
//!
//! `config.rs` the settings; this file the backend; `register.rs` registering device memory, the
//! completion thread and what the owner's socket grants; `remote.rs` peers on other nodes
//! (fabric domains, announcements and revocations over the control channel); `conn.rs` a
//! connection and its transfers; `handles/` what is published; `ipc/` the owner's socket;
//! `driver/` the CUDA driver; `tests.rs` the unit tests.

#![warn(unreachable_pub)]

mod alloc;
mod config;
mod conn;
mod copy;
pub(crate) mod dmabuf;
pub(crate) mod driver;
pub(crate) mod handles;
pub(crate) mod ipc;
pub(crate) mod nvml;
mod register;
mod remote;
mod staging;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use alloc::{cu_err, unavailable};
pub use alloc::{device, device_count, LegacyBuffer, VmmBuffer};
use copy::{CopyPlan, Run};
// The few driver-layer pieces that tools outside the backend use (the checkpoint crate's VRAM
// regions, the benches' copy ceiling): a device's context, VMM allocations, a stream for
// device-to-device copies, and synchronous copies between host and device.
pub use driver::{
    download, upload, CtxGuard, CuError, CuRes, DeviceCtx, Stream, VmmAlloc, HANDLE_POSIX_FD,
};
use driver::{Event, LegacyImport, VmmImport, VmmSource};
use handles::{
    AllocInfo, AllocKind, AllocationMap, Chunk, ChunkHandles, ConnInfo, RegionPublic, Route,
};
pub use handles::{DeviceFabric, FabricDomain};
use ipc::{
    FinishRevoke, Grant, GrantSource, Hold, Holds, ImportCache, IpcClient, IpcServer, RegionImport,
    RegionKey, RevokeSink,
};
use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Registered, Result, TargetHandle, Unusable, XferOp, XferPlan,
};
use parking_lot::Mutex;

use crate::control::{ControlChannel, ControlService};
use crate::owner::Clients;
pub use config::{CudaConfig, INLINE_MAX_BYTES};
use conn::*;
use handles::{Ctl, MAX_CTL_NOTIF};
use register::*;
use remote::*;

const VRAM: &[MemKind] = &[MemKind::Vram];

/// For tests on one host: makes a backend act as if it ran on another node (see
/// [`CudaBackend::with_node_override`]).
#[derive(Clone, Debug, Default)]
pub struct NodeOverride {
    /// Published instead of the boot id: peers with another id (the real boot id included) are
    /// on "another node", reached through fabric handles only.
    pub node_id: String,
    /// Where given, the devices and NVLink domains to publish instead of asking NVML (their
    /// UUIDs must be the real devices' for transfers to pass the per-device domain check).
    pub devices: Option<Vec<DeviceFabric>>,
}

/// What the owner keeps per registered region.
#[derive(Debug)]
struct Registration {
    public: RegionPublic,
    /// Exported fd per chunk (VMM chunks; `None` for legacy and fabric-only ones).
    fds: Vec<Option<OwnedFd>>,
}

/// A device's context and stream pool.
#[derive(Debug)]
struct DevState {
    ctx: Arc<DeviceCtx>,
    streams: Vec<Arc<Stream>>,
    next: AtomicUsize,
    /// The gather kernel, loaded on first use (`None`: the driver cannot load it).
    gather: OnceLock<Option<Arc<driver::Gather>>>,
}

impl DevState {
    fn gather(&self) -> Option<Arc<driver::Gather>> {
        self.gather
            .get_or_init(|| match driver::Gather::load(&self.ctx) {
                Ok(g) => Some(Arc::new(g)),
                Err(e) => {
                    tracing::debug!(error = %e, device = self.ctx.ordinal(),
                        "cuda: no gather kernel; many-run requests use batched copies");
                    None
                }
            })
            .clone()
    }
}

/// A peer chunk mapped into our address space.
#[derive(Debug)]
enum Imported {
    Legacy(LegacyImport),
    Vmm(VmmImport),
}

impl Imported {
    fn base(&self) -> u64 {
        match self {
            Imported::Legacy(l) => l.base(),
            Imported::Vmm(v) => v.base(),
        }
    }
}

/// (peer instance, IPC handle, local device): one legacy import each (the driver maps a handle
/// once per context), shared by the regions of one allocation and closed with the last of them.
type LegacyKey = (u128, [u8; 64], i32);

struct Job {
    events: Vec<Event>,
    /// Streams to drain if an enqueue failed midway.
    drain: Vec<Arc<Stream>>,
    enqueue_error: Option<Error>,
    done: Completion,
    notif: Option<(Arc<str>, Vec<u8>, Notifier)>,
    /// The peer regions the copies use, held (not revocable) until the copies are over.
    holds: Holds<Imported>,
    _resolved: Arc<Resolved>,
}

#[derive(Debug)]
struct Inner {
    cfg: CudaConfig,
    target: OnceLock<TargetHandle>,
    server: Mutex<Option<Arc<IpcServer>>>,
    path: OnceLock<PathBuf>,
    fabric: OnceLock<bool>,
    regs: Mutex<HashMap<(u64, u64, u64), Arc<Registration>>>,
    imports: ImportCache<Imported>,
    legacy_imports: Mutex<HashMap<LegacyKey, Weak<Imported>>>,
    devices: Mutex<HashMap<i32, Arc<DevState>>>,
    jobs: Mutex<Option<crossbeam_channel::Sender<Job>>>,
    shut: AtomicBool,
    conns: Clients<Conn>,
    stager: OnceLock<std::result::Result<Arc<staging::CudaStager>, String>>,
    node: Option<NodeOverride>,
    local_fabric: OnceLock<LocalFabric>,
    /// The agents' control channel (cross-node announcements, revocations, notifications).
    control: Option<Arc<dyn ControlChannel>>,
    /// Agents on other nodes that announced imports, per (region, key).
    remote_importers: Mutex<HashMap<(Desc, u64), Vec<Importer>>>,
}

/// The `cuda` backend.
#[derive(Debug)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

impl CudaBackend {
    /// A backend with these settings (it binds its socket when its agent starts it).
    pub fn new(cfg: CudaConfig) -> Arc<CudaBackend> {
        Self::build(cfg, None, None)
    }

    /// A backend that also serves and uses the agents' control channel: a peer on another node
    /// (fabric handles) then announces its imports to the owner, which revokes them when it
    /// deregisters, and notifications reach it. Without one, such peers are reached with no
    /// revocation and no notifications (see the module docs).
    pub fn with_control(cfg: CudaConfig, control: Arc<dyn ControlChannel>) -> Arc<CudaBackend> {
        Self::build(cfg, Some(control), None)
    }

    /// A backend that acts as if it ran on node `node.node_id` (and, where given, in the NVLink
    /// domains of `node.devices`): for tests that force the cross-node (fabric) path between
    /// two processes of one host. Not for production: a wrong node id sends same-node peers
    /// over fabric handles only.
    pub fn with_node_override(
        cfg: CudaConfig,
        control: Option<Arc<dyn ControlChannel>>,
        node: NodeOverride,
    ) -> Arc<CudaBackend> {
        Self::build(cfg, control, Some(node))
    }

    fn build(
        cfg: CudaConfig,
        control: Option<Arc<dyn ControlChannel>>,
        node: Option<NodeOverride>,
    ) -> Arc<CudaBackend> {
        Arc::new(CudaBackend {
            inner: Arc::new(Inner {
                cfg,
                target: OnceLock::new(),
                server: Mutex::new(None),
                path: OnceLock::new(),
                fabric: OnceLock::new(),
                regs: Mutex::new(HashMap::new()),
                imports: ImportCache::default(),
                legacy_imports: Mutex::new(HashMap::new()),
                devices: Mutex::new(HashMap::new()),
                jobs: Mutex::new(None),
                shut: AtomicBool::new(false),
                conns: Clients::default(),
                stager: OnceLock::new(),
                node,
                local_fabric: OnceLock::new(),
                control,
                remote_importers: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Peer chunk mappings currently held by this backend's imported regions (a legacy mapping
    /// shared by two regions counts twice).
    pub fn imported_chunks(&self) -> usize {
        self.inner.imports.mappings()
    }

    /// Peer regions currently imported (announced to or granted by their owner, not revoked).
    pub fn imported_regions(&self) -> usize {
        self.inner.imports.len()
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    /// Forgets legacy mappings that no region uses any more (closed with their last user).
    fn prune_legacy(&self) {
        self.legacy_imports
            .lock()
            .retain(|_, w| w.strong_count() > 0);
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> BackendName {
        BackendName::Cuda
    }

    fn caps(&self) -> Caps {
        Caps::new(VRAM, Locality::SameNode, 1)
    }

    fn probe(&self) -> std::result::Result<(), Unusable> {
        driver::driver().map(|_| ()).map_err(Unusable::Reason)
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        // One fd per exported or imported VMM chunk: the default soft limit of 1024 is far too
        // low for a KV pool of expandable segments.
        crate::limits::raise_nofile();
        let file = crate::owner::socket_file("cuda-", &target);
        let _ = self.inner.target.set(target);
        if let Some(c) = &self.inner.control {
            // Served even without a driver: peers then learn "not registered" from us.
            let weak: Weak<Inner> = Arc::downgrade(&self.inner);
            let weak: Weak<dyn ControlService> = weak;
            c.serve(BackendName::Cuda, weak);
        }
        driver::driver().map_err(unavailable)?;
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let weak: Weak<dyn GrantSource> = weak;
        let server = IpcServer::start(
            &self.inner.cfg.socket_dir,
            &file,
            weak,
            self.inner.cfg.op_timeout,
        )?;
        let _ = self.inner.path.set(server.path().to_owned());
        *self.inner.server.lock() = Some(Arc::new(server));
        self.inner.start_completer()?;
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        let path = self
            .inner
            .path
            .get()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.inner.our_conn_info(&path).encode()
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        if kind != MemKind::Vram {
            return Err(Error::InvalidArgument(format!(
                "cuda registers VRAM, not {kind}"
            )));
        }
        self.inner.register_vram(desc)
    }

    fn deregister(&self, region: Registered<'_>) {
        let d = region.desc;
        // Peers that imported the region give their mappings up first (bounded; see `ipc`), so
        // the caller may free legacy memory once this returns.
        let server = self.inner.server.lock().clone();
        if let Some(server) = server {
            let report = server.revoke(&d, region.key, self.inner.cfg.op_timeout);
            if report.peers > 0 {
                tracing::debug!(
                    region = format_args!("{:#x}+{}", d.addr, d.len),
                    ?report,
                    "cuda: revoked peers' mappings of a deregistered region"
                );
            }
        }
        // Peers on other nodes that announced an import (over the control channel).
        let importers = self
            .inner
            .remote_importers
            .lock()
            .remove(&(d, region.key))
            .unwrap_or_default();
        if let (false, Some(control), Some(t)) = (
            importers.is_empty(),
            &self.inner.control,
            self.inner.target.get(),
        ) {
            let report = revoke_remote(
                control,
                t.name(),
                t.instance_id(),
                &d,
                region.key,
                importers,
                self.inner.cfg.op_timeout,
            );
            tracing::debug!(
                region = format_args!("{:#x}+{}", d.addr, d.len),
                ?report,
                "cuda: revoked imports of peers on other nodes"
            );
        }
        // Dropping the registration closes the exported fds; a peer's VMM mapping (one that
        // did not answer in time) keeps the physical memory alive until it unmaps it.
        self.inner.regs.lock().remove(&(d.dev_id, d.addr, d.len));
    }

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), Unusable> {
        let peer = ConnInfo::decode(conn_info)?;
        peer.route_from(&self.inner.our_conn_info(""), self.inner.cfg.allow_fabric)
            .map(|_| ())
            .map_err(Unusable::Reason)
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let info = ConnInfo::decode(peer.conn_info).map_err(|reason| Error::Backend {
            backend: BackendName::Cuda,
            op: "connect",
            reason,
        })?;
        let ours = self.inner.our_conn_info("");
        let route = info
            .route_from(&ours, self.inner.cfg.allow_fabric)
            .map_err(|reason| Error::Backend {
                backend: BackendName::Cuda,
                op: "connect",
                reason,
            })?;
        let same_process = route == Route::SameNode && info.pid == ours.pid;
        let sink: Arc<dyn RevokeSink> = Arc::new(PeerSink {
            inner: Arc::downgrade(&self.inner),
            peer: peer.name.to_owned(),
            instance: peer.instance_id,
        });
        let conn = Arc::new(Conn {
            inner: Arc::clone(&self.inner),
            peer: peer.name.to_owned(),
            instance: peer.instance_id,
            same_process,
            // A peer on another node has no socket we could reach: nothing goes over one.
            client: (route == Route::SameNode).then(|| {
                Arc::new(IpcClient::new(
                    peer.name,
                    std::path::Path::new(&info.socket),
                    self.inner.cfg.op_timeout,
                    Some(sink),
                ))
            }),
            remote: match (route, &self.inner.control) {
                (Route::Fabric, Some(control)) if !info.control.is_empty() => {
                    Some(Arc::new(RemoteOwner {
                        peer: peer.name.to_owned(),
                        control: Arc::clone(control),
                        endpoint: info.control.clone(),
                        timeout: self.inner.cfg.op_timeout,
                    }))
                }
                _ => None,
            },
            route,
            peer_devices: info.devices,
            closed: Arc::new(AtomicBool::new(false)),
        });
        self.inner.conns.add(&conn);
        Ok(conn)
    }

    fn shutdown(&self) {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        for c in self.inner.conns.drain() {
            c.close();
        }
        if let Some(s) = self.inner.server.lock().take() {
            s.shutdown();
        }
        // The completion thread ends once queued posts are done.
        self.inner.jobs.lock().take();
    }

    fn stager(&self) -> Option<Arc<dyn nixl_core::Stager>> {
        let s = self.inner.stager.get_or_init(|| {
            let c = &self.inner.cfg;
            staging::CudaStager::new(
                c.streams_per_device,
                c.staging_buffer_size,
                c.staging_buffers,
            )
            .map(Arc::new)
        });
        match s {
            Ok(s) => Some(Arc::clone(s) as Arc<dyn nixl_core::Stager>),
            Err(e) => {
                tracing::debug!(reason = %e, "cuda: no stager");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
