//! The `rdma` backend: one-sided RDMA READ and WRITE between agents on any nodes, over verbs.
//!
//! # Loading verbs
//!
//! Binaries must start on hosts without rdma-core, so libibverbs is opened at run time
//! (`dlopen("libibverbs.so.1")` through `libloading`) by our own minimal binding in
//! `verbs`. We do not use `rdma-sys`: it links libibverbs at build time. We do not use
//! `sideway` either, although it loads at run time: its `rdma-mummy-sys` build script needs
//! cmake, a C compiler and libclang (bindgen) at build time, and `cargo run --release -p
//! nixl-agent -- demo` must build on a fresh machine with only Rust. The binding declares only
//! the structs and fields it uses; the `verbs_layout` test compiles a C program against
//! `<infiniband/verbs.h>` and compares every size and offset with the Rust declarations. The
//! data path (`ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`, `static inline` in verbs.h) is
//! called through `context->ops` exactly as the inline functions do.
//!
//! When the library or a device is missing, [`RdmaBackend`]'s probe says why
//! (`libibverbs.so.1 not found: ...`, `no RDMA devices (...)`, a configured device absent) and
//! the agent runs without it.
//!
//! # Design
//!
//! - **NICs.** Every device with an active port (or those named in [`RdmaConfig::devices`]) is
//!   opened at start, with one protection domain and one completion queue each. `topo` ranks
//!   NICs by PCIe/NUMA distance from a GPU or CPU socket read from sysfs (`place`). DRAM is
//!   registered with every opened NIC (a peer may stripe over all of them), and the NUMA node
//!   of its first page (`get_mempolicy`, asked once the MR has pinned the page) marks the
//!   nearest NICs: a transfer from that memory stripes over the lanes of those NICs only
//!   (all of them when several are equally near) and fails over to the others.
//!   [`RdmaConfig::gpu_devices`] and the topology choose the NICs for VRAM.
//! - **Connections.** `connect` creates `qps_per_nic` reliable-connected QPs on every local
//!   NIC, each paired with a peer NIC of the same link layer (round robin), plus `qps_per_nic`
//!   QPs to every peer NIC left out of that pairing (so that VRAM the peer registered on the
//!   NICs near its GPU only is reachable), and exchanges QP numbers, PSNs, LIDs and GIDs
//!   with the peer's backend over the agent's control channel
//!   ([`crate::control`], authenticated by the channel). A *lane* is one such QP pair.
//! - **Registration.** `ibv_reg_mr` on every NIC; the region's public data carries the address
//!   and one rkey per NIC. The NIC enforces the rkey on the target; the core has already checked
//!   every remote descriptor against the region bounds from the peer's metadata. Deregistration
//!   deregisters the MRs, so a peer cannot touch the memory afterwards. VRAM is exported as a
//!   dmabuf by the cuda driver layer and registered with `ibv_reg_dmabuf_mr` on the NICs
//!   nearest to its GPU only (`dmabuf`); where dmabuf is not available the device address
//!   is registered with `ibv_reg_mr` (works with `nvidia-peermem`); without a CUDA driver the
//!   registration is `unavailable` with the cuda reason.
//! - **Transfers.** `plan` cuts a request into WRs of at most `slice_bytes` (contiguous
//!   pieces coalesced, at most `max_sge` SGEs), stripes them by bytes over every usable lane
//!   (all NICs, several QPs each, no cap at two rails), and keeps at most `max_outstanding`
//!   WRs in flight per QP. One poller thread polls every CQ in user space (no syscall per
//!   completion), spinning while busy and backing off to short sleeps when idle. A completion
//!   finds its owner through the `wr_id` (a slot of `slab`, checked by generation, no global
//!   lock), and posting the next WRs reuses the post's scratch buffers: no allocation per
//!   completion.
//! - **Notifications.** After every data WR of a post has completed, the initiator posts one
//!   SEND with the message to the target, whose QPs keep receive buffers posted; the target
//!   delivers it with [`TargetHandle::deliver`] under the peer name the control channel
//!   authenticated at the handshake, and reposts the buffer. The post ends Done when the SEND
//!   has completed, so the notification is never seen before the data. Each notification
//!   carries a per-connection sequence number, kept across retries on other lanes, and the
//!   target drops one it has already delivered (`notif`).
//! - **Failures.** Any error completion puts its QP in the error state: the lane goes down for
//!   the connection, the lane's unfinished slices move to other lanes (another NIC first) and
//!   a slice is retried at most `max_retries` times; with no lane left the post ends
//!   `Failed(remote disconnect)` with the reason. A remote access error (the peer deregistered
//!   the region) ends it `Denied`. The QP's own retry count and timeout bound how long a dead
//!   path takes to report. A post ends exactly once; its local memory stays held until every WR
//!   it posted has completed or flushed.

#![warn(unreachable_pub)]

pub(crate) mod dmabuf;
mod notif;
pub(crate) mod place;
mod plan;
mod slab;
pub(crate) mod topo;
pub(crate) mod verbs;
pub(crate) mod wire;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Registered, Result, TargetHandle, Unusable, XferOp, XferPlan,
};
use parking_lot::{Condvar, Mutex};

use crate::control::{ControlChannel, ControlService};
use place::NicMask;
use plan::{Progress, Slice, Tracker};
use slab::Slab;
use verbs::{
    Context, Cq, IbvSge, IbvWc, Mr, OwnedBuf, PathCfg, Pd, Qp, RemoteQp, SendBatch, SendReq, Verbs,
};
use wire::{ConnInfo, Msg, NicAddr, QpAddr, RegionKeys};

mod backend;
mod config;
mod conn;
mod post;
mod served;
#[cfg(test)]
mod tests;

use conn::*;
use post::*;
use served::*;

pub use config::{PollPolicy, RdmaConfig};

fn err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BackendName::Rdma,
        op,
        reason: reason.into(),
    }
}

fn unavailable(reason: impl Into<Unusable>) -> Error {
    Error::Unavailable {
        backend: BackendName::Rdma,
        reason: reason.into(),
    }
}

fn random24() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b) & wire::MAX_24
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

/// Slice index reserved for a post's notification SEND.
const NOTIF_IDX: u64 = (1 << 24) - 1;
/// Most slices per post (the rest of the index space).
const MAX_SLICES: usize = NOTIF_IDX as usize;
/// Most connections a peer keeps served at once (older ones are closed).
const MAX_SERVED_PER_PEER: usize = 16;

/// One opened NIC.
struct Nic {
    idx: u8,
    name: String,
    ctx: Context,
    pd: Pd,
    cq: Cq,
    port: u8,
    lid: u16,
    gid: [u8; 16],
    sgid_index: u8,
    mtu: u8,
    link_layer: u8,
    max_sge: usize,
    max_sge_rd: usize,
    max_qp_wr: u32,
    /// RDMA READs this NIC serves at once as a responder (`max_qp_rd_atom`), announced to peers.
    rd_atomic: u8,
    /// RDMA READs a QP of this NIC may have outstanding as the initiator
    /// (`max_qp_init_rd_atom`, often lower than the responder depth).
    init_rd_atomic: u8,
    guid: u64,
    /// CQ entries promised to live QPs.
    cq_reserved: AtomicU64,
    cq_depth: u64,
}

impl fmt::Debug for Nic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nic")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("link_layer", &self.link_layer)
            .finish_non_exhaustive()
    }
}

impl Nic {
    fn addr(&self) -> NicAddr {
        NicAddr {
            name: self.name.clone(),
            port: self.port,
            lid: self.lid,
            gid: self.gid,
            mtu: self.mtu,
            link_layer: self.link_layer,
        }
    }

    fn path(&self, cfg: &RdmaConfig, remote_mtu: u8, remote_rd_atomic: u8) -> PathCfg {
        PathCfg {
            port: self.port,
            sgid_index: self.sgid_index,
            global: self.link_layer == verbs::LINK_LAYER_ETHERNET,
            mtu: u32::from(self.mtu.min(remote_mtu).max(1)),
            timeout: cfg.qp_timeout,
            retry_cnt: cfg.retry_cnt.min(7),
            rnr_retry: 7,
            // Our READs in flight: what we may initiate and what the peer serves.
            rd_atomic: self.init_rd_atomic.min(remote_rd_atomic).max(1),
            dest_rd_atomic: self.rd_atomic,
            sl: cfg.service_level,
            traffic_class: cfg.traffic_class,
        }
    }

    /// A QP on this NIC with `send` + `recv` WRs, its CQ entries reserved.
    fn create_qp(self: &Arc<Nic>, send: u32, recv: u32, max_sge: usize) -> Result<LaneQp> {
        let send = send.min(self.max_qp_wr).max(1);
        let recv = recv.min(self.max_qp_wr).max(1);
        let need = u64::from(send) + u64::from(recv);
        let prev = self.cq_reserved.fetch_add(need, Ordering::AcqRel);
        if prev + need > self.cq_depth {
            self.cq_reserved.fetch_sub(need, Ordering::AcqRel);
            return Err(err(
                "connect",
                format!(
                    "completion queue of {} is fully promised ({prev} of {} entries): raise [rdma] cq_depth or lower qps_per_nic/max_outstanding",
                    self.name, self.cq_depth
                ),
            ));
        }
        let cap = verbs::IbvQpCap {
            max_send_wr: send,
            max_recv_wr: recv,
            max_send_sge: max_sge as u32,
            max_recv_sge: 1,
            max_inline_data: 0,
        };
        let qp = self.pd.create_rc_qp(&self.cq, cap).and_then(|qp| {
            qp.to_init(self.port)?;
            Ok(qp)
        });
        match qp {
            Ok(qp) => Ok(LaneQp {
                qp,
                nic: Arc::clone(self),
                reserved: need,
                send_slots: send,
            }),
            Err(e) => {
                self.cq_reserved.fetch_sub(need, Ordering::AcqRel);
                Err(err("connect", format!("{}: {e}", self.name)))
            }
        }
    }
}

/// A QP and its share of its NIC's CQ.
struct LaneQp {
    qp: Qp,
    nic: Arc<Nic>,
    reserved: u64,
    /// Send-queue slots requested (and granted at least).
    send_slots: u32,
}

impl Drop for LaneQp {
    fn drop(&mut self) {
        self.nic
            .cq_reserved
            .fetch_sub(self.reserved, Ordering::AcqRel);
    }
}

impl fmt::Debug for LaneQp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.qp.fmt(f)
    }
}

/// What a completion's `wr_id` token refers to.
#[derive(Clone)]
enum Owner {
    Post(Arc<PostState>),
    Recv(Arc<ServedLane>),
    Sync(Arc<SyncSend>),
}

/// A registered region: (kind code, address, length, device id).
type RegionKey = (u8, u64, u64, u64);

/// A region's MRs.
struct RegionMrs {
    /// One per NIC (same order as `State::nics`); `None` where it is not registered (VRAM is
    /// registered on the NICs near its GPU only).
    mrs: Vec<Option<Mr>>,
    /// The NICs nearest to the memory.
    near: NicMask,
}

/// State after start.
struct State {
    cfg: RdmaConfig,
    nics: Vec<Arc<Nic>>,
    /// The opened NICs' names (same order as `nics`).
    names: Vec<String>,
    /// NIC topology from sysfs, read at start.
    topo: Vec<topo::NicInfo>,
    target: TargetHandle,
    regions: Mutex<HashMap<RegionKey, RegionMrs>>,
    /// What each completion's token refers to.
    owners: Slab<Owner>,
    /// Connections peers opened to us: (peer, conn id) -> lanes.
    served: Mutex<HashMap<(String, u64), ServedConn>>,
    served_seq: AtomicU64,
    conns: Mutex<Vec<Weak<RdmaConn>>>,
    /// GPUs with VRAM registered here: their GPUDirect RDMA writes are flushed before a
    /// notification is delivered, so the application's kernels see the bytes it announces.
    gdr_flush: Mutex<Vec<Arc<crate::cuda::driver::DeviceCtx>>>,
    stop: AtomicBool,
    poller: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("nics", &self.nics)
            .finish_non_exhaustive()
    }
}

impl State {
    /// A token (40 bits) for `owner`'s work requests; `None` when the table is full.
    fn own(&self, owner: Owner) -> Option<u64> {
        self.owners.insert(owner)
    }

    fn disown(&self, token: u64) {
        self.owners.remove(token);
    }

    fn full() -> String {
        format!(
            "more than {} transfers and lanes in flight at once",
            slab::CAPACITY
        )
    }

    fn conn_info(&self, endpoint: Vec<u8>) -> ConnInfo {
        ConnInfo {
            endpoint,
            node_guid: self.nics.first().map_or(0, |n| n.guid),
            max_notif: self.cfg.max_notif,
            nics: self.nics.iter().map(|n| n.addr()).collect(),
        }
    }

    /// The poller: polls every CQ without a syscall, spins while busy, sleeps when idle.
    fn poll_loop(self: Arc<State>) {
        let mut wcs = vec![IbvWc::default(); 64];
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            let mut any = false;
            for nic in &self.nics {
                match nic.cq.poll(&mut wcs) {
                    Ok(0) => {}
                    Ok(n) => {
                        any = true;
                        for wc in &wcs[..n] {
                            self.dispatch(wc);
                        }
                    }
                    Err(e) => {
                        tracing::error!(nic = %nic.name, error = %e, "rdma CQ poll failed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            if any {
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                if idle > self.cfg.poll.spin_polls {
                    std::thread::sleep(self.cfg.poll.idle_sleep);
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }

    fn dispatch(&self, wc: &IbvWc) {
        let token = wc.wr_id >> 24;
        let idx = wc.wr_id & NOTIF_IDX;
        match self.owners.get(token) {
            Some(Owner::Post(p)) => p.on_wc(self, idx, wc),
            Some(Owner::Recv(l)) => l.on_recv(self, idx as usize, wc),
            Some(Owner::Sync(s)) => {
                self.disown(token);
                let conn = s.conn.upgrade();
                if let Some(l) = conn.as_ref().and_then(|c| c.lanes.get(s.lane)) {
                    l.release(1);
                }
                s.finish(self.status_result(wc));
                if let Some(c) = conn {
                    c.wake(self);
                }
            }
            None => metrics::counter!("nixl_rdma_stale_completions_total").increment(1),
        }
    }

    fn status_result(&self, wc: &IbvWc) -> std::result::Result<(), (u32, String)> {
        if wc.status == verbs::WC_SUCCESS {
            return Ok(());
        }
        let text = self
            .nics
            .first()
            .map(|n| n.ctx.verbs().wc_status_str(wc.status))
            .unwrap_or_default();
        Err((
            wc.status,
            format!(
                "{text} (status {}, vendor error {:#x})",
                wc.status, wc.vendor_err
            ),
        ))
    }
}

/// On RoCE, both ends of a QP must use GIDs of the same kind: an IPv4-mapped GID (RoCE v2 over
/// IPv4, `::ffff:a.b.c.d`) against an IPv6 or link-local one (RoCE v1, or v2 over IPv6) never
/// connects, and the QP only fails with retry-exceeded seconds later. Checked before the QP is
/// brought up, with the fix in the error. InfiniBand routes by LID: nothing to check.
fn check_gid_kinds(
    nic: &str,
    ours: &[u8; 16],
    theirs: &[u8; 16],
    link_layer: u8,
) -> std::result::Result<(), String> {
    if link_layer != verbs::LINK_LAYER_ETHERNET {
        return Ok(());
    }
    let v4 = |g: &[u8; 16]| g[..10].iter().all(|b| *b == 0) && g[10] == 0xff && g[11] == 0xff;
    let kind = |g: &[u8; 16]| {
        if v4(g) {
            "IPv4-mapped (RoCE v2 over IPv4)"
        } else if g[0] == 0xfe && g[1] & 0xc0 == 0x80 {
            "link-local (RoCE v1 or v2 over IPv6 link-local)"
        } else {
            "IPv6"
        }
    };
    if *ours == [0; 16] || *theirs == [0; 16] {
        return Err(format!(
            "{nic}: a GID of zero (ours {}, the peer's {}): the chosen GID index has no address; \
             set [rdma] gid_index to a RoCE v2 entry of `show_gids` on both hosts",
            kind(ours),
            kind(theirs)
        ));
    }
    if v4(ours) != v4(theirs) {
        return Err(format!(
            "{nic}: GID kinds differ (ours {}, the peer's {}): the QP could never connect; use \
             the same RoCE version and address family on both hosts ([rdma] gid_index, see \
             `show_gids`)",
            kind(ours),
            kind(theirs)
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The backend.
// ---------------------------------------------------------------------------------------------

/// The `rdma` backend.
pub struct RdmaBackend {
    cfg: RdmaConfig,
    control: Arc<dyn ControlChannel>,
    lib_name: String,
    me: Weak<RdmaBackend>,
    verbs: OnceLock<std::result::Result<Arc<Verbs>, String>>,
    state: OnceLock<Arc<State>>,
    shut: AtomicBool,
}

impl fmt::Debug for RdmaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaBackend")
            .field("cfg", &self.cfg)
            .field("state", &self.state.get())
            .finish_non_exhaustive()
    }
}

impl Drop for RdmaBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

const KINDS: &[MemKind] = &[MemKind::Dram, MemKind::Vram];

impl RdmaBackend {
    /// A backend with these settings, reaching peers through `control` (the agent's control
    /// channel). Nothing is opened until the agent starts it.
    pub fn new(cfg: RdmaConfig, control: Arc<dyn ControlChannel>) -> Arc<RdmaBackend> {
        RdmaBackend::with_library(cfg, control, verbs::LIBIBVERBS)
    }

    /// As [`RdmaBackend::new`], loading verbs from `lib` (tests name a missing library).
    #[doc(hidden)]
    pub fn with_library(
        cfg: RdmaConfig,
        control: Arc<dyn ControlChannel>,
        lib: &str,
    ) -> Arc<RdmaBackend> {
        Arc::new_cyclic(|me| RdmaBackend {
            cfg,
            control,
            lib_name: lib.to_owned(),
            me: me.clone(),
            verbs: OnceLock::new(),
            state: OnceLock::new(),
            shut: AtomicBool::new(false),
        })
    }

    fn verbs(&self) -> std::result::Result<Arc<Verbs>, String> {
        self.verbs
            .get_or_init(|| Verbs::load_from(&self.lib_name))
            .clone()
    }

    fn state(&self) -> Result<&Arc<State>> {
        if self.shut.load(Ordering::Acquire) {
            return Err(Error::Shutdown("rdma backend shut down".into()));
        }
        self.state
            .get()
            .ok_or_else(|| unavailable("the rdma backend has not been started"))
    }

    /// The device names the probe and start consider, or why there are none.
    fn device_names(&self, verbs: &Verbs) -> std::result::Result<Vec<String>, String> {
        let found = verbs.devices().map_err(|e| {
            format!(
                "no RDMA devices ({e}; {})",
                topo::describe_empty(&self.cfg.sysfs)
            )
        })?;
        let names: Vec<String> = found.into_iter().map(|(n, _)| n).collect();
        choose_devices(&names, self.cfg.devices.as_deref(), &self.cfg.sysfs)
    }

    fn open_nic(
        &self,
        verbs: &Arc<Verbs>,
        idx: u8,
        name: &str,
    ) -> std::result::Result<Nic, Unusable> {
        let ctx = verbs.open(name).map_err(Unusable::from_error)?;
        let dev = ctx.query_device().map_err(Unusable::from_error)?;
        let mut found = None;
        for port in 1..=dev.phys_port_cnt {
            let a = ctx.query_port(port).map_err(Unusable::from_error)?;
            if a.state == verbs::PORT_ACTIVE {
                found = Some((port, a));
                break;
            }
        }
        let (port, pa) = found.ok_or_else(|| format!("{name} has no active port"))?;
        let link_layer = if pa.link_layer == verbs::LINK_LAYER_ETHERNET {
            verbs::LINK_LAYER_ETHERNET
        } else {
            verbs::LINK_LAYER_INFINIBAND
        };
        let sgid_index = match (self.cfg.gid_index, link_layer) {
            (Some(i), _) => i,
            (None, verbs::LINK_LAYER_ETHERNET) => {
                topo::roce_v2_gid_index(&self.cfg.sysfs, name, port).unwrap_or(0)
            }
            _ => 0,
        };
        let gid = ctx
            .query_gid(port, sgid_index)
            .map_err(Unusable::from_error)?;
        let pd = ctx.alloc_pd().map_err(Unusable::from_error)?;
        let depth = self
            .cfg
            .cq_depth
            .min(u32::try_from(dev.max_cqe).unwrap_or(u32::MAX));
        let cq = ctx.create_cq(depth).map_err(Unusable::from_error)?;
        Ok(Nic {
            idx,
            name: name.to_owned(),
            port,
            lid: pa.lid,
            gid,
            sgid_index,
            mtu: (pa.active_mtu.clamp(1, 5)) as u8,
            link_layer,
            max_sge: usize::try_from(dev.max_sge).unwrap_or(1).max(1),
            max_sge_rd: usize::try_from(dev.max_sge_rd).unwrap_or(1).max(1),
            max_qp_wr: u32::try_from(dev.max_qp_wr).unwrap_or(1).max(1),
            rd_atomic: u8::try_from(dev.max_qp_rd_atom.clamp(1, 16)).unwrap_or(1),
            init_rd_atomic: u8::try_from(dev.max_qp_init_rd_atom.clamp(1, 16)).unwrap_or(1),
            guid: u64::from_be(dev.node_guid),
            cq_reserved: AtomicU64::new(0),
            cq_depth: u64::from(depth),
            ctx,
            pd,
            cq,
        })
    }

    /// The NICs (by name) that topology picks for memory at `loc` (for diagnostics and
    /// VRAM): the configured override, or all usable NICs at the best PCIe/NUMA distance.
    pub fn nics_for(&self, loc: &topo::MemLocation) -> std::result::Result<Vec<String>, Unusable> {
        let nics = topo::scan(&self.cfg.sysfs)
            .map_err(|e| Unusable::failed(format!("reading {}", self.cfg.sysfs.display()), e))?;
        let over = topo::NicOverride {
            devices: self.cfg.devices.clone(),
            per_gpu: self
                .cfg
                .gpu_devices
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
        };
        topo::select(&self.cfg.sysfs, &nics, loc, &over).map_err(Unusable::Reason)
    }
}

/// Which local NIC talks to which peer NIC (indices into `local` and `remote`, their link
/// layers): every local NIC to a peer NIC of the same link layer, round robin (NIC i to NIC i
/// on rail-aligned hosts); then every peer NIC left out gets a local NIC of its link layer, so
/// that a region the peer registered on some NICs only (VRAM, near its GPU) is reachable.
fn pair_nics(local: &[u8], remote: &[u8]) -> Vec<(usize, u8)> {
    let mut pairs = Vec::new();
    let mut covered = vec![false; remote.len()];
    for (i, ll) in local.iter().enumerate() {
        let cands: Vec<usize> = (0..remote.len()).filter(|&k| remote[k] == *ll).collect();
        if !cands.is_empty() {
            let k = cands[i % cands.len()];
            covered[k] = true;
            pairs.push((i, k as u8));
        }
    }
    for (k, ll) in remote.iter().enumerate() {
        if covered[k] {
            continue;
        }
        let cands: Vec<usize> = (0..local.len()).filter(|&i| local[i] == *ll).collect();
        if !cands.is_empty() {
            pairs.push((cands[k % cands.len()], k as u8));
        }
    }
    pairs
}

/// The devices to open among those `found`: all of them, or the configured ones, which must
/// all be present. `Err` says why there are none.
fn choose_devices(
    found: &[String],
    wanted: Option<&[String]>,
    sysfs: &std::path::Path,
) -> std::result::Result<Vec<String>, String> {
    if found.is_empty() {
        return Err(format!(
            "no RDMA devices (ibv_get_device_list returned 0; {})",
            topo::describe_empty(sysfs)
        ));
    }
    match wanted {
        None => Ok(found.to_vec()),
        Some([]) => Err("[rdma] devices is an empty list".into()),
        Some(want) => {
            for w in want {
                if !found.contains(w) {
                    return Err(format!(
                        "configured RDMA device '{w}' is not present (found: {})",
                        found.join(", ")
                    ));
                }
            }
            Ok(want.to_vec())
        }
    }
}
