//! The `cuda` backend: VRAM registration, CUDA IPC between processes of one node, device copies,
//! and VRAM ↔ DRAM staging; the CUDA driver is loaded at run time.
//!
//! # Availability
//!
//! The driver (`libcuda.so.1`) is opened at run time and every entry point is resolved and
//! `cuInit` called once, before any other driver call ([`driver`]). Without a driver, without
//! devices, or with a driver older than CUDA 12.0, [`CudaBackend::probe`](nixl_core::Backend)
//! says why (`libcuda.so.1 not found: ...`, `no CUDA devices ...`, `driver too old: ...`), the
//! agent reports `cuda unavailable: <reason>` and runs its other backends, and registering VRAM
//! is refused with that text. No code path reaches a driver call that could panic.
//!
//! # Registration
//!
//! `register(VRAM, desc)` checks that `desc.dev_id` is the pointer's device ordinal and walks the
//! range allocation by allocation ([`handles::plan_chunks`]):
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
//! per device balanced by bytes ([`copy`]); each post enqueues `cuMemcpyDtoDAsync` (NVLink/P2P)
//! and events, and a completion thread waits for the events, delivers the notification to the
//! owner over its socket (the owner calls `TargetHandle::deliver`), and completes the request
//! once. Mappings belong to a peer *region* ([`ipc::RegionImport`]), never to a prepared
//! transfer: a transfer holds the regions it uses (their gate) for each post, from before its
//! copies are enqueued until their events have completed, so a region can be revoked (below)
//! while prepared transfers still exist, and their next post fails cleanly.
//!
//! Access control: VMM fds are granted only to the same uid (`SO_PEERCRED`) with the region's key,
//! checked by the owner's agent (`TargetHandle::check`). Legacy IPC and fabric handles are
//! capabilities carried in the metadata, as in NIXL: CUDA offers no owner-side check for them,
//! so whoever holds an agent's metadata could map those regions with the driver directly; this
//! backend, though, maps one only after its owner accepted an announcement presenting the
//! region key (below), and never uses a region whose announcement was refused.
//!
//! # Deregistration: revoking peers' mappings
//!
//! CUDA's docs say that if the owner frees legacy (`cudaMalloc`) memory while a peer still has
//! it open through IPC, the behaviour is undefined; VMM memory stays allocated while a peer maps
//! it, so a peer could keep writing memory the owner believes gone. So the owner tracks, and
//! revokes, every import ([`ipc`] has the protocol):
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
//!   [`ipc::ImportCache`] and answers "revoked". A later post of a transfer prepared on it fails
//!   with `Denied: region ... was deregistered by its owner`; a new prepare is refused by the
//!   owner;
//! - when the peer's connection to the owner ends (owner gone, garbage on the socket, a reply
//!   timed out), the owner no longer tracks the peer's imports, so the peer gives up every
//!   mapping of that owner at once (later posts fail with `RemoteDisconnect`); the same happens
//!   when the connection is closed (the peer invalidated), and an import whose region key
//!   changed (re-registered) is replaced.
//!
//! # Locality and fabric
//!
//! The backend declares `Locality::SameNode`: `can_reach` accepts peers with our boot id and uid.
//! The core's locality is one value per backend, so "any node within an NVLink domain" cannot be
//! declared for fabric-capable peers only; it would be expressed by `can_reach` accepting a peer
//! on another node whose conn info names the same NVLink domain (cluster UUID and clique id).
//! The driver API does not expose those (NVML's `nvmlDeviceGetGpuFabricInfo` does), so for now
//! fabric handles are published (conn info says whether the devices support them) and used on
//! one node only when a chunk has no POSIX fd; cross-node fabric import is the next step.
//!
//! # Staging
//!
//! [`CudaBackend`] offers a [`nixl_core::Stager`] ([`staging::CudaStager`]: pinned host buffers,
//! batched copies over the device's streams) so the agent can carry VRAM over `tcp`, `shm` or to
//! files when no direct path exists; [`staging::StagePipeline`] is a pipelined engine (device copy
//! of piece k+1 overlapping the send of piece k) for backends that want to stream instead.

pub mod alloc;
pub mod copy;
pub mod dmabuf;
pub mod driver;
pub mod handles;
pub mod ipc;
pub mod staging;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use alloc::{cu_err, unavailable};
pub use alloc::{device, LegacyBuffer, VmmBuffer};
use copy::{CopyPlan, Run};
use driver::{DeviceCtx, Event, LegacyImport, Stream, VmmImport, VmmSource};
use handles::{AllocInfo, AllocKind, AllocationMap, Chunk, ChunkHandles, ConnInfo, RegionPublic};
use ipc::{
    FinishRevoke, Grant, GrantSource, Hold, Holds, ImportCache, IpcClient, IpcServer, RegionImport,
    RegionKey, RevokeSink,
};
use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, Result, TargetHandle, XferOp, XferPlan,
};
use parking_lot::Mutex;

/// Settings of the `cuda` backend.
#[derive(Clone, Debug)]
pub struct CudaConfig {
    /// Streams per device that a transfer's copies are spread over.
    pub streams_per_device: usize,
    /// Most descriptors one prepared transfer may have.
    pub max_batch: usize,
    /// Size of each pinned staging buffer of a [`staging::StagePipeline`].
    pub staging_buffer_size: usize,
    /// Pinned staging buffers per device.
    pub staging_buffers: usize,
    /// Where the agent's Unix socket lives (created with mode 0700).
    pub socket_dir: PathBuf,
    /// Publish and use fabric handles when the device and the allocation support them.
    pub allow_fabric: bool,
    /// How long a request on a peer's socket (fd grant, announcement, notification) may take;
    /// also how long a deregistration waits for peers to give up their mappings, and how long a
    /// peer waits for its copies in flight before giving one up.
    pub op_timeout: Duration,
}

impl Default for CudaConfig {
    fn default() -> Self {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        CudaConfig {
            streams_per_device: 4,
            max_batch: 1 << 20,
            staging_buffer_size: 8 << 20,
            staging_buffers: 4,
            socket_dir: base.join("nixl"),
            allow_fabric: true,
            op_timeout: Duration::from_secs(5),
        }
    }
}

const VRAM: &[MemKind] = &[MemKind::Vram];

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
    notif: Option<(Arc<str>, Vec<u8>, Arc<IpcClient>)>,
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
    conns: Mutex<Vec<Weak<Conn>>>,
    stager: OnceLock<std::result::Result<Arc<staging::CudaStager>, String>>,
}

/// The `cuda` backend.
#[derive(Debug)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

impl CudaBackend {
    /// A backend with these settings (it binds its socket when its agent starts it).
    pub fn new(cfg: CudaConfig) -> Arc<CudaBackend> {
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
                conns: Mutex::new(Vec::new()),
                stager: OnceLock::new(),
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

    /// A pipelined VRAM ↔ DRAM engine over a pool of pinned buffers of device `dev`
    /// ([`CudaConfig::staging_buffers`] × [`CudaConfig::staging_buffer_size`]).
    pub fn pipeline(&self, dev: i32) -> Result<staging::StagePipeline> {
        let ctx = device(dev)?;
        let pool = staging::StagingPool::pinned(
            &ctx,
            self.inner.cfg.staging_buffers,
            self.inner.cfg.staging_buffer_size,
        )?;
        let copier = Arc::new(staging::CudaDeviceCopy::new(&ctx)?);
        Ok(staging::StagePipeline::new(
            pool,
            copier,
            self.inner.cfg.staging_buffers,
        ))
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn our_conn_info(path: &str, fabric: bool) -> ConnInfo {
    ConnInfo {
        boot_id: ipc::boot_id(),
        socket: path.to_owned(),
        uid: ipc::uid(),
        pid: std::process::id(),
        fabric,
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}

impl Inner {
    fn dev_state(&self, ordinal: i32) -> Result<Arc<DevState>> {
        let mut m = self.devices.lock();
        if let Some(d) = m.get(&ordinal) {
            return Ok(Arc::clone(d));
        }
        let ctx = device(ordinal)?;
        let n = self.cfg.streams_per_device.max(1);
        let mut streams = Vec::with_capacity(n);
        for _ in 0..n {
            streams.push(Arc::new(
                Stream::new(&ctx).map_err(|e| cu_err("create streams", e))?,
            ));
        }
        let d = Arc::new(DevState {
            ctx,
            streams,
            next: AtomicUsize::new(0),
        });
        m.insert(ordinal, Arc::clone(&d));
        Ok(d)
    }

    fn fabric_supported(&self) -> bool {
        *self.fabric.get_or_init(|| {
            self.cfg.allow_fabric
                && driver::driver()
                    .is_ok_and(|d| (0..d.device_count()).any(|i| d.device_supports_fabric(i)))
        })
    }

    fn register_vram(&self, desc: &Desc) -> Result<Vec<u8>> {
        driver::driver().map_err(unavailable)?;
        let dev = i32::try_from(desc.dev_id)
            .ok()
            .filter(|d| *d >= 0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("VRAM dev_id {} is not a GPU ordinal", desc.dev_id))
            })?;
        let ctx = device(dev)?;
        let _g = ctx.enter().map_err(|e| cu_err("register", e))?;
        let map = DriverMap { ctx: &ctx };
        let allow_fabric = self.cfg.allow_fabric && ctx.fabric_supported();
        let planned =
            handles::plan_chunks(&map, desc.addr, desc.len, allow_fabric).map_err(|reason| {
                Error::Backend {
                    backend: BackendName::Cuda,
                    op: "register",
                    reason: format!(
                        "VRAM {:#x}+{} on device {dev}: {reason}",
                        desc.addr, desc.len
                    ),
                }
            })?;
        let mut chunks = Vec::with_capacity(planned.len());
        let mut fds = Vec::with_capacity(planned.len());
        for p in &planned {
            let chunk_addr = desc.addr + p.offset;
            let mut h = ChunkHandles {
                legacy: None,
                posix_fd: false,
                fabric: None,
            };
            let mut fd = None;
            match p.alloc.kind {
                AllocKind::Legacy { .. } => {
                    h.legacy = Some(
                        ctx.ipc_handle(p.alloc.base)
                            .map_err(|e| cu_err("register (legacy IPC export)", e))?,
                    );
                }
                AllocKind::Vmm { handle_types } => {
                    if handle_types & driver::HANDLE_POSIX_FD != 0 {
                        fd = Some(
                            ctx.export_fd(chunk_addr)
                                .map_err(|e| cu_err("register (VMM fd export)", e))?,
                        );
                        h.posix_fd = true;
                    }
                    if p.fabric {
                        match ctx.export_fabric(chunk_addr) {
                            Ok(f) => h.fabric = Some(f),
                            // Fabric export needs the IMEX service; an fd still works on one node.
                            Err(e) if h.posix_fd => {
                                tracing::debug!(error = %e, "cuda: no fabric handle for a chunk")
                            }
                            Err(e) => return Err(cu_err("register (VMM fabric export)", e)),
                        }
                    }
                }
            }
            chunks.push(Chunk {
                offset: p.offset,
                len: p.len,
                alloc_size: p.alloc.size,
                alloc_offset: p.alloc_offset,
                handles: h,
            });
            fds.push(fd);
        }
        let public = RegionPublic {
            device: dev as u32,
            uuid: ctx.uuid(),
            chunks,
        };
        let bytes = public.encode();
        self.regs.lock().insert(
            (desc.dev_id, desc.addr, desc.len),
            Arc::new(Registration { public, fds }),
        );
        Ok(bytes)
    }

    fn start_completer(self: &Arc<Self>) -> Result<()> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        std::thread::Builder::new()
            .name("nixl-cuda-done".into())
            .spawn(move || {
                for job in rx.iter() {
                    finish(job);
                }
            })
            .map_err(|e| Error::io("cuda: spawn the completion thread", e))?;
        *self.jobs.lock() = Some(tx);
        Ok(())
    }
}

/// Waits for a post's copies, delivers its notification, completes it once.
fn finish(job: Job) {
    let Job {
        events,
        drain,
        enqueue_error,
        done,
        notif,
        holds,
        _resolved,
    } = job;
    let mut outcome: Result<()> = Ok(());
    for ev in &events {
        if let Err(e) = ev.wait() {
            if outcome.is_ok() {
                outcome = Err(cu_err("device copy", e));
            }
        }
    }
    if let Some(e) = enqueue_error {
        // Copies enqueued before the failure may still run: let them end before the memory is
        // released.
        for s in &drain {
            let _ = s.synchronize();
        }
        outcome = Err(e);
    }
    // The copies are over: the peer regions may be revoked from now on (before the notification,
    // whose answer comes through the reader that handles revocations).
    drop(holds);
    if outcome.is_ok() {
        if let Some((from, msg, client)) = notif {
            outcome = client.notify(&from, &msg);
        }
    }
    drop(events);
    done.complete(outcome);
}

/// The driver as an [`AllocationMap`] (the context must be current).
struct DriverMap<'a> {
    ctx: &'a Arc<DeviceCtx>,
}

impl AllocationMap for DriverMap<'_> {
    fn lookup(&self, addr: u64) -> std::result::Result<AllocInfo, String> {
        let a = self
            .ctx
            .query_allocation(addr)
            .map_err(|e| format!("address {addr:#x} is not CUDA device memory ({e})"))?;
        if !a.device_memory {
            return Err(format!(
                "address {addr:#x} is host or managed memory, not VRAM (register it as DRAM)"
            ));
        }
        if a.ordinal != self.ctx.ordinal() {
            return Err(format!(
                "address {addr:#x} is on device {}, the descriptor says dev_id {}",
                a.ordinal,
                self.ctx.ordinal()
            ));
        }
        Ok(AllocInfo {
            base: a.base,
            size: a.size,
            kind: match a.vmm_handle_types {
                Some(handle_types) => AllocKind::Vmm { handle_types },
                None => AllocKind::Legacy {
                    ipc_capable: a.legacy_ipc,
                },
            },
        })
    }
}

impl Inner {
    /// The owner-side check of a peer's access to a whole registered region: registered with
    /// cuda, in bounds, with its key. The access holds the region (a deregistration waits for it).
    fn check_whole(
        &self,
        region: &Desc,
        key: u64,
    ) -> std::result::Result<(nixl_core::RegionAccess, Arc<Registration>), String> {
        let target = self.target.get().ok_or("the agent is starting")?;
        let access = target
            .check(MemKind::Vram, region, key)
            .map_err(|d| d.to_string())?;
        let r = access.region();
        if r.desc != *region {
            return Err(format!(
                "{:#x}+{} is not a whole registered region",
                region.addr, region.len
            ));
        }
        let reg = self
            .regs
            .lock()
            .get(&(r.desc.dev_id, r.desc.addr, r.desc.len))
            .cloned()
            .ok_or("region is not registered with cuda")?;
        Ok((access, reg))
    }
}

impl GrantSource for Inner {
    fn grant(&self, region: &Desc, key: u64, chunk: u32) -> std::result::Result<Grant, String> {
        let (access, reg) = self.check_whole(region, key)?;
        let c = reg.public.chunks.get(chunk as usize).ok_or_else(|| {
            format!(
                "region has {} chunks, not {}",
                reg.public.chunks.len(),
                chunk + 1
            )
        })?;
        let fd = reg
            .fds
            .get(chunk as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                format!("chunk {chunk} has no POSIX fd (legacy or fabric-only memory)")
            })?;
        let dup = fd.try_clone().map_err(|e| format!("dup: {e}"))?;
        Ok(Grant {
            fd: dup,
            alloc_size: c.alloc_size,
            hold: Box::new(access),
        })
    }

    fn opened(&self, region: &Desc, key: u64) -> std::result::Result<Hold, String> {
        let (access, _) = self.check_whole(region, key)?;
        Ok(Box::new(access))
    }

    fn notify(&self, from: &str, msg: Vec<u8>) {
        if let Some(t) = self.target.get() {
            t.deliver(from, msg);
        }
    }
}

/// A connection's handler of its owner's revocations: gives up the mappings in this backend's
/// import cache.
struct PeerSink {
    inner: Weak<Inner>,
    peer: String,
    instance: u128,
}

impl RevokeSink for PeerSink {
    fn revoke(&self, region: &Desc, key: u64) -> FinishRevoke {
        let Some(inner) = self.inner.upgrade() else {
            return Box::new(|| true); // the backend is gone, and its mappings with it
        };
        let deadline = Instant::now() + inner.cfg.op_timeout;
        let entry = inner.imports.begin_revoke(
            self.instance,
            region,
            key,
            ipc::deregistered(&self.peer, region),
        );
        let peer = self.peer.clone();
        let region = *region;
        Box::new(move || {
            let done = entry.is_none_or(|e| e.finish_revoke(deadline));
            inner.prune_legacy();
            if !done {
                tracing::warn!(
                    peer = %peer,
                    region = format_args!("{:#x}+{}", region.addr, region.len),
                    "cuda: copies on a revoked region were still running at the bound; its \
                     mappings close when they end"
                );
            }
            done
        })
    }

    fn link_lost(&self, reason: &str) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let why = Error::RemoteDisconnect {
            peer: self.peer.clone(),
            reason: format!(
                "the cuda socket to the owner ended ({reason}); mappings of its memory were given up"
            ),
        };
        let (n, busy) = inner
            .imports
            .revoke_peer(self.instance, &why, inner.cfg.op_timeout);
        inner.prune_legacy();
        if n > 0 {
            tracing::debug!(peer = %self.peer, regions = n, busy, reason, "cuda: gave up a peer's mappings");
        }
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
        Caps {
            local_kinds: VRAM,
            remote_kinds: VRAM,
            notifications: true,
            locality: Locality::SameNode,
        }
    }

    fn probe(&self) -> std::result::Result<(), String> {
        driver::driver().map(|_| ())
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        driver::driver().map_err(unavailable)?;
        let file = format!(
            "cuda-{}-{:032x}.sock",
            sanitize(target.name()),
            target.instance_id()
        );
        let _ = self.inner.target.set(target);
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
        our_conn_info(&path, self.inner.fabric_supported()).encode()
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        if kind != MemKind::Vram {
            return Err(Error::InvalidArgument(format!(
                "cuda registers VRAM, not {kind}"
            )));
        }
        self.inner.register_vram(desc)
    }

    fn deregister(&self, region: &Region) {
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
        // Dropping the registration closes the exported fds; a peer's VMM mapping (one that
        // did not answer in time) keeps the physical memory alive until it unmaps it.
        self.inner.regs.lock().remove(&(d.dev_id, d.addr, d.len));
    }

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), String> {
        let peer = ConnInfo::decode(conn_info)?;
        peer.reachable_from(&our_conn_info("", false))
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let info = ConnInfo::decode(peer.conn_info).map_err(|reason| Error::Backend {
            backend: BackendName::Cuda,
            op: "connect",
            reason,
        })?;
        let ours = our_conn_info("", false);
        info.reachable_from(&ours)
            .map_err(|reason| Error::Backend {
                backend: BackendName::Cuda,
                op: "connect",
                reason,
            })?;
        let same_process = info.pid == ours.pid;
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
            client: Arc::new(IpcClient::new(
                peer.name,
                std::path::Path::new(&info.socket),
                self.inner.cfg.op_timeout,
                Some(sink),
            )),
            closed: Arc::new(AtomicBool::new(false)),
        });
        let mut conns = self.inner.conns.lock();
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
        Ok(conn)
    }

    fn shutdown(&self) {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        for c in self.inner.conns.lock().drain(..) {
            if let Some(c) = c.upgrade() {
                c.close();
            }
        }
        if let Some(s) = self.inner.server.lock().take() {
            s.shutdown();
        }
        // The completion thread ends once queued posts are done.
        self.inner.jobs.lock().take();
    }

    fn stager(&self) -> Option<Arc<dyn nixl_core::Stager>> {
        let s = self.inner.stager.get_or_init(|| {
            staging::CudaStager::new(self.inner.cfg.streams_per_device).map(Arc::new)
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

/// A connection to one peer.
#[derive(Debug)]
struct Conn {
    inner: Arc<Inner>,
    peer: String,
    instance: u128,
    same_process: bool,
    client: Arc<IpcClient>,
    closed: Arc<AtomicBool>,
}

/// A prepared transfer's resolved form: per local device, the copy plan; plus the peer regions
/// whose mappings it addresses (each post holds them; never a mapping directly, so that a
/// revocation can close the mappings and the next post fails cleanly).
#[derive(Debug)]
struct Resolved {
    plans: Vec<(Arc<DevState>, CopyPlan)>,
    regions: Arc<[Arc<RegionImport<Imported>>]>,
}

#[derive(Debug)]
struct Prepared {
    inner: Arc<Inner>,
    peer: String,
    closed: Arc<AtomicBool>,
    client: Arc<IpcClient>,
    resolved: Arc<Resolved>,
    notif: Option<Vec<u8>>,
    initiator: Arc<str>,
}

fn prep_err(reason: String) -> Error {
    Error::Backend {
        backend: BackendName::Cuda,
        op: "prepare",
        reason,
    }
}

impl Conn {
    /// The import of a peer region, announced to its owner on first use (the owner records it
    /// and revokes it when it deregisters the region; a refusal is an error).
    fn import_region(
        &self,
        rinfo: &nixl_core::metadata::RegionInfo,
    ) -> Result<Arc<RegionImport<Imported>>> {
        let key = RegionKey {
            peer: self.instance,
            region: rinfo.desc,
            key: rinfo.key,
        };
        self.inner
            .imports
            .region(key, &self.peer, self.inner.cfg.op_timeout, || {
                self.client.announce(&rinfo.desc, rinfo.key)
            })
    }

    /// Maps chunk `ci` of an imported region on our device `local` (once per region).
    fn import_chunk(
        &self,
        region: &RegionImport<Imported>,
        public: &RegionPublic,
        ci: usize,
        local: &Arc<DevState>,
    ) -> Result<Arc<Imported>> {
        let c = &public.chunks[ci];
        let ctx = &local.ctx;
        let rk = region.key();
        region.mapping(ci as u32, ctx.ordinal(), || {
            if let Some(h) = &c.handles.legacy {
                let key = (self.instance, *h, ctx.ordinal());
                if let Some(i) = self
                    .inner
                    .legacy_imports
                    .lock()
                    .get(&key)
                    .and_then(Weak::upgrade)
                {
                    return Ok(i);
                }
                let imp =
                    LegacyImport::open(ctx, h).map_err(|e| cu_err("import (legacy IPC)", e))?;
                let imp = Arc::new(Imported::Legacy(imp));
                let mut m = self.inner.legacy_imports.lock();
                if let Some(i) = m.get(&key).and_then(Weak::upgrade) {
                    drop(m);
                    return Ok(i); // another thread opened it meanwhile; ours is closed
                }
                m.retain(|_, w| w.strong_count() > 0);
                m.insert(key, Arc::downgrade(&imp));
                return Ok(imp);
            }
            if c.handles.posix_fd {
                let (fd, size) = self.client.grant(&rk.region, rk.key, ci as u32)?;
                if size != c.alloc_size {
                    return Err(prep_err(format!(
                        "peer '{}' granted an allocation of {size} bytes for chunk {ci}, its \
                         metadata says {}",
                        self.peer, c.alloc_size
                    )));
                }
                VmmImport::import(ctx, VmmSource::Fd(&fd), size)
                    .map(|v| Arc::new(Imported::Vmm(v)))
                    .map_err(|e| cu_err("import (VMM fd)", e))
            } else if let Some(h) = &c.handles.fabric {
                VmmImport::import(ctx, VmmSource::Fabric(h), c.alloc_size)
                    .map(|v| Arc::new(Imported::Vmm(v)))
                    .map_err(|e| cu_err("import (fabric)", e))
            } else {
                Err(prep_err(format!("chunk {ci} has no handle")))
            }
        })
    }

    fn resolve(&self, plan: &XferPlan) -> Result<Resolved> {
        let max = self.inner.cfg.max_batch.max(1);
        if plan.segments.len() > max {
            return Err(Error::InvalidArgument(format!(
                "{} descriptors exceed the cuda backend's max_batch of {max}",
                plan.segments.len()
            )));
        }
        let publics = decode_publics(plan, &self.peer)?;
        let mut devs: HashMap<i32, Arc<DevState>> = HashMap::new();
        let mut regions: HashMap<usize, Arc<RegionImport<Imported>>> = HashMap::new();
        let mut bases: HashMap<(usize, usize, i32), u64> = HashMap::new();
        let runs = resolve_runs(plan, &publics, |ri, ci, local_dev| {
            let dev = match devs.get(&local_dev) {
                Some(d) => Arc::clone(d),
                None => {
                    let d = self.inner.dev_state(local_dev)?;
                    devs.insert(local_dev, Arc::clone(&d));
                    d
                }
            };
            if self.same_process {
                return Ok(None);
            }
            if let Some(b) = bases.get(&(ri, ci, local_dev)) {
                return Ok(Some(*b));
            }
            let region = match regions.get(&ri) {
                Some(r) => Arc::clone(r),
                None => {
                    let r = self.import_region(&plan.remote_regions[ri])?;
                    regions.insert(ri, Arc::clone(&r));
                    r
                }
            };
            // The mapping stays with the region; the address is valid while a post holds it.
            let base = self.import_chunk(&region, &publics[ri], ci, &dev)?.base();
            bases.insert((ri, ci, local_dev), base);
            Ok(Some(base))
        })?;
        let streams = self.inner.cfg.streams_per_device.max(1);
        let mut plans = Vec::with_capacity(runs.len());
        for (local_dev, v) in runs {
            let d = match devs.get(&local_dev) {
                Some(d) => Arc::clone(d),
                None => self.inner.dev_state(local_dev)?,
            };
            plans.push((d, copy::plan(v, streams)));
        }
        Ok(Resolved {
            plans,
            regions: regions.into_values().collect(),
        })
    }
}

/// Decodes the cuda data of every remote region of a plan (checked against the region length).
fn decode_publics(plan: &XferPlan, peer: &str) -> Result<Vec<RegionPublic>> {
    let mut publics = Vec::with_capacity(plan.remote_regions.len());
    for (i, r) in plan.remote_regions.iter().enumerate() {
        let p = r
            .backends
            .iter()
            .find(|(b, _)| *b == BackendName::Cuda)
            .ok_or_else(|| {
                prep_err(format!(
                    "remote region {i} ({:#x}+{}) is not registered with cuda on peer '{peer}'",
                    r.desc.addr, r.desc.len
                ))
            })?;
        let public = RegionPublic::decode(&p.1, r.desc.len).map_err(|e| {
            prep_err(format!(
                "peer '{peer}' region {:#x}+{}: bad cuda data: {e}",
                r.desc.addr, r.desc.len
            ))
        })?;
        publics.push(public);
    }
    Ok(publics)
}

/// Turns a plan's segments into copies per local device: each remote range is cut at chunk
/// boundaries and addressed through `base_of(region, chunk, local device)`, which gives where the
/// chunk's allocation is mapped here (`None`: the peer is in this process, use its address).
fn resolve_runs(
    plan: &XferPlan,
    publics: &[RegionPublic],
    mut base_of: impl FnMut(usize, usize, i32) -> Result<Option<u64>>,
) -> Result<HashMap<i32, Vec<Run>>> {
    let mut runs: HashMap<i32, Vec<Run>> = HashMap::new();
    for (si, s) in plan.segments.iter().enumerate() {
        let ri = s.remote_region as usize;
        let (rinfo, public) = match (plan.remote_regions.get(ri), publics.get(ri)) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(prep_err(format!("segment {si}: no remote region {ri}"))),
        };
        if s.local.len != s.remote.len {
            return Err(prep_err(format!(
                "segment {si}: local and remote lengths differ"
            )));
        }
        let local_dev = i32::try_from(s.local.dev_id)
            .map_err(|_| prep_err(format!("segment {si}: bad local dev_id {}", s.local.dev_id)))?;
        let outside = || prep_err(format!("segment {si}: remote range outside its region"));
        // Offset of the segment in the remote region, then cut at chunk boundaries.
        let mut off = s
            .remote
            .addr
            .checked_sub(rinfo.desc.addr)
            .ok_or_else(outside)?;
        let end = off
            .checked_add(s.remote.len)
            .filter(|e| *e <= rinfo.desc.len)
            .ok_or_else(outside)?;
        let mut local_addr = s.local.addr;
        let out = runs.entry(local_dev).or_default();
        while off < end {
            let ci = public
                .chunk_at(off)
                .ok_or_else(|| prep_err(format!("segment {si}: no chunk at offset {off}")))?;
            let c = &public.chunks[ci];
            let take = (c.offset + c.len).min(end) - off;
            let remote_addr = match base_of(ri, ci, local_dev)? {
                None => rinfo.desc.addr + off,
                Some(base) => base + c.alloc_offset + (off - c.offset),
            };
            out.push(match plan.op {
                XferOp::Read => Run {
                    src: remote_addr,
                    dst: local_addr,
                    len: take,
                },
                XferOp::Write => Run {
                    src: local_addr,
                    dst: remote_addr,
                    len: take,
                },
            });
            off += take;
            local_addr += take;
        }
    }
    Ok(runs)
}

impl Connection for Conn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::RemoteDisconnect {
                peer: self.peer.clone(),
                reason: "connection closed".into(),
            });
        }
        if plan.local_kind != MemKind::Vram || plan.remote_kind != MemKind::Vram {
            return Err(Error::InvalidArgument(format!(
                "cuda moves VRAM to VRAM, not {} to {}",
                plan.local_kind, plan.remote_kind
            )));
        }
        let resolved = self.resolve(&plan)?;
        Ok(Box::new(Prepared {
            inner: Arc::clone(&self.inner),
            peer: self.peer.clone(),
            closed: Arc::clone(&self.closed),
            client: Arc::clone(&self.client),
            resolved: Arc::new(resolved),
            notif: plan.notif,
            initiator: plan.initiator,
        }))
    }

    fn send_notif(&self, from: &str, msg: &[u8]) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::RemoteDisconnect {
                peer: self.peer.clone(),
                reason: "connection closed".into(),
            });
        }
        self.client.notify(from, msg)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.client.close();
        let why = Error::RemoteDisconnect {
            peer: self.peer.clone(),
            reason: "connection closed".into(),
        };
        let (_, busy) =
            self.inner
                .imports
                .revoke_peer(self.instance, &why, self.inner.cfg.op_timeout);
        self.inner.prune_legacy();
        if busy > 0 {
            tracing::warn!(peer = %self.peer, regions = busy,
                "cuda: copies were still running when the connection closed; their mappings \
                 close when they end");
        }
    }
}

impl PreparedXfer for Prepared {
    fn post(&self, done: Completion) {
        if self.closed.load(Ordering::Acquire) {
            done.complete(Err(Error::RemoteDisconnect {
                peer: self.peer.clone(),
                reason: "connection closed".into(),
            }));
            return;
        }
        let Some(tx) = self.inner.jobs.lock().clone() else {
            done.complete(Err(Error::Cancelled));
            return;
        };
        // The peer regions stay mapped (revocations wait) until the copies are over; a region
        // revoked since prepare fails the post before anything is enqueued.
        let holds = match ipc::hold_all(&self.resolved.regions) {
            Ok(h) => h,
            Err(e) => {
                done.complete(Err(e));
                return;
            }
        };
        let mut events = Vec::new();
        let mut drain = Vec::new();
        let mut enqueue_error = None;
        for (dev, plan) in &self.resolved.plans {
            let n = dev.streams.len();
            // Rotate the stream assignment so concurrent requests spread over the pool.
            let first = dev.next.fetch_add(1, Ordering::Relaxed) % n;
            let streams: Vec<Arc<Stream>> = (0..n)
                .map(|i| Arc::clone(&dev.streams[(first + i) % n]))
                .collect();
            drain.extend(streams.iter().cloned());
            // SAFETY: local ranges are inside local regions the core validated and holds for this
            // post (the completion keeps them until it is dropped, after the events completed);
            // remote ranges are inside peer chunks mapped in `resolved`, held by the job until
            // its events completed (or the streams were drained after an enqueue failure).
            let r = unsafe { copy::enqueue(plan, &streams, &mut events) };
            if let Err(e) = r {
                enqueue_error = Some(cu_err("enqueue copies", e));
                break;
            }
        }
        let notif = self.notif.as_ref().map(|m| {
            (
                Arc::clone(&self.initiator),
                m.clone(),
                Arc::clone(&self.client),
            )
        });
        let job = Job {
            events,
            drain,
            enqueue_error,
            done,
            notif,
            holds,
            _resolved: Arc::clone(&self.resolved),
        };
        if let Err(crossbeam_channel::SendError(job)) = tx.send(job) {
            // The completion thread is gone (shutdown): finish here.
            finish(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixl_core::metadata::RegionInfo;
    use nixl_core::Segment;

    fn chunk(offset: u64, len: u64, alloc_size: u64, alloc_offset: u64, legacy: bool) -> Chunk {
        Chunk {
            offset,
            len,
            alloc_size,
            alloc_offset,
            handles: ChunkHandles {
                legacy: legacy.then_some([3; 64]),
                posix_fd: !legacy,
                fabric: None,
            },
        }
    }

    /// A peer region at 0x10_0000 of 300 bytes in three chunks: a legacy one 50 bytes into its
    /// allocation, and two VMM chunks.
    fn remote_region() -> RegionInfo {
        let public = RegionPublic {
            device: 1,
            uuid: [0; 16],
            chunks: vec![
                chunk(0, 100, 1000, 50, true),
                chunk(100, 100, 100, 0, false),
                chunk(200, 100, 4096, 0, false),
            ],
        };
        RegionInfo {
            kind: MemKind::Vram,
            desc: Desc::new(0x10_0000, 300, 1),
            key: 9,
            backends: vec![(BackendName::Cuda, public.encode())],
        }
    }

    fn xplan(op: XferOp, segs: Vec<(Desc, Desc)>, remote: RegionInfo) -> XferPlan {
        XferPlan {
            op,
            local_kind: MemKind::Vram,
            remote_kind: MemKind::Vram,
            segments: segs
                .into_iter()
                .map(|(local, remote)| Segment {
                    local,
                    remote,
                    local_region: 0,
                    remote_region: 0,
                })
                .collect(),
            local_regions: Vec::new(),
            remote_regions: vec![remote],
            notif: None,
            initiator: Arc::from("me"),
        }
    }

    #[test]
    fn segments_are_cut_at_chunks_and_addressed_through_the_mappings() {
        // One segment over the whole region (3 chunks), one inside chunk 2, on two local devices.
        let p = xplan(
            XferOp::Read,
            vec![
                (Desc::new(0xa000, 300, 0), Desc::new(0x10_0000, 300, 1)),
                (Desc::new(0xb000, 10, 2), Desc::new(0x10_0000 + 250, 10, 1)),
            ],
            remote_region(),
        );
        let publics = decode_publics(&p, "peer").unwrap();
        let bases = [0x1_0000u64, 0x2_0000, 0x3_0000];
        let mut calls = Vec::new();
        let runs = resolve_runs(&p, &publics, |ri, ci, dev| {
            calls.push((ri, ci, dev));
            Ok(Some(bases[ci] + dev as u64 * 0x100_0000))
        })
        .unwrap();
        assert_eq!(
            runs[&0],
            vec![
                Run {
                    src: 0x1_0000 + 50,
                    dst: 0xa000,
                    len: 100
                },
                Run {
                    src: 0x2_0000,
                    dst: 0xa000 + 100,
                    len: 100
                },
                Run {
                    src: 0x3_0000,
                    dst: 0xa000 + 200,
                    len: 100
                },
            ]
        );
        assert_eq!(
            runs[&2],
            vec![Run {
                src: 0x200_0000 + 0x3_0000 + 50,
                dst: 0xb000,
                len: 10
            }]
        );
        assert_eq!(calls, vec![(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 2, 2)]);

        // WRITE swaps the direction; a peer in this process is addressed directly.
        let p = xplan(
            XferOp::Write,
            vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000 + 90, 20, 1))],
            remote_region(),
        );
        let runs = resolve_runs(&p, &publics, |_, _, _| Ok(None)).unwrap();
        assert_eq!(
            runs[&0],
            vec![
                Run {
                    src: 0xa000,
                    dst: 0x10_0000 + 90,
                    len: 10
                },
                Run {
                    src: 0xa000 + 10,
                    dst: 0x10_0000 + 100,
                    len: 10
                },
            ]
        );
    }

    #[test]
    fn bad_plans_and_bad_peer_data_are_errors() {
        let ok = |_: usize, _: usize, _: i32| -> Result<Option<u64>> { Ok(Some(0)) };
        // Past the region's end.
        let p = xplan(
            XferOp::Read,
            vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000 + 290, 20, 1))],
            remote_region(),
        );
        let publics = decode_publics(&p, "peer").unwrap();
        let e = resolve_runs(&p, &publics, ok).unwrap_err();
        assert!(e.to_string().contains("outside its region"), "{e}");
        // Before the region's start.
        let p = xplan(
            XferOp::Read,
            vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000 - 1, 20, 1))],
            remote_region(),
        );
        assert!(resolve_runs(&p, &publics, ok).is_err());
        // An import failure ends the resolution with that error.
        let p = xplan(
            XferOp::Read,
            vec![(Desc::new(0xa000, 20, 0), Desc::new(0x10_0000, 20, 1))],
            remote_region(),
        );
        let e = resolve_runs(&p, &publics, |_, _, _| {
            Err(Error::Denied {
                peer: "peer".into(),
                reason: "wrong key".into(),
            })
        })
        .unwrap_err();
        assert!(matches!(e, Error::Denied { .. }), "{e}");
        // Peer data that does not match the region, or is missing, or is garbage.
        let mut r = remote_region();
        r.desc.len = 301;
        let e = decode_publics(&xplan(XferOp::Read, vec![], r), "peer").unwrap_err();
        assert!(e.to_string().contains("bad cuda data"), "{e}");
        let mut r = remote_region();
        r.backends.clear();
        let e = decode_publics(&xplan(XferOp::Read, vec![], r), "peer").unwrap_err();
        assert!(e.to_string().contains("not registered with cuda"), "{e}");
        let mut r = remote_region();
        r.backends[0].1.truncate(20);
        assert!(decode_publics(&xplan(XferOp::Read, vec![], r), "peer").is_err());
    }

    #[test]
    fn unavailable_without_a_driver_and_reachability() {
        let b = CudaBackend::new(CudaConfig::default());
        assert_eq!(b.name(), BackendName::Cuda);
        assert_eq!(b.caps().local_kinds, VRAM);
        assert_eq!(b.caps().locality, Locality::SameNode);
        match b.probe() {
            Ok(()) => eprintln!("SKIP: unavailable_without_a_driver_and_reachability (driver part): a CUDA driver is present"),
            Err(reason) => {
                assert!(reason.starts_with("libcuda.so.1 not found: "), "{reason}");
                let e = b
                    .register(MemKind::Vram, &Desc::new(0x1000, 10, 0))
                    .unwrap_err();
                assert!(matches!(e, Error::Unavailable { .. }), "{e}");
                assert!(e.to_string().contains("libcuda.so.1 not found"), "{e}");
                assert!(b.stager().is_none());
            }
        }
        // DRAM is refused whatever the host.
        let e = b
            .register(MemKind::Dram, &Desc::new(0x1000, 10, 0))
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");

        // Reachability from connection info alone.
        let ours = our_conn_info("/tmp/x.sock", false);
        assert!(b.can_reach(&ours.encode()).is_ok());
        let mut other = ours.clone();
        other.boot_id = "another-node".into();
        assert!(b
            .can_reach(&other.encode())
            .unwrap_err()
            .starts_with("different node"));
        assert!(b
            .can_reach(b"garbage")
            .unwrap_err()
            .contains("bad cuda connection info"));
        let info = b.conn_info();
        let d = ConnInfo::decode(&info).unwrap();
        assert_eq!(d.pid, std::process::id());
    }
}
