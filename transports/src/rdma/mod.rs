//! The `rdma` backend: one-sided RDMA READ and WRITE between agents on any nodes, over verbs.
//!
//! # Loading verbs
//!
//! Binaries must start on hosts without rdma-core, so libibverbs is opened at run time
//! (`dlopen("libibverbs.so.1")` through `libloading`) by our own minimal binding in
//! [`verbs`]. We do not use `rdma-sys`: it links libibverbs at build time. We do not use
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
//!   opened at start, with one protection domain and one completion queue each. [`topo`] ranks
//!   NICs by PCIe/NUMA distance from a GPU or CPU socket read from sysfs ([`place`]). DRAM is
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
//!   nearest to its GPU only ([`dmabuf`]); where dmabuf is not available the device address
//!   is registered with `ibv_reg_mr` (works with `nvidia-peermem`); without a CUDA driver the
//!   registration is `unavailable` with the cuda reason.
//! - **Transfers.** [`plan`] cuts a request into WRs of at most `slice_bytes` (contiguous
//!   pieces coalesced, at most `max_sge` SGEs), stripes them by bytes over every usable lane
//!   (all NICs, several QPs each, no cap at two rails), and keeps at most `max_outstanding`
//!   WRs in flight per QP. One poller thread polls every CQ in user space (no syscall per
//!   completion), spinning while busy and backing off to short sleeps when idle. A completion
//!   finds its owner through the `wr_id` (a slot of [`slab`], checked by generation, no global
//!   lock), and posting the next WRs reuses the post's scratch buffers: no allocation per
//!   completion.
//! - **Notifications.** After every data WR of a post has completed, the initiator posts one
//!   SEND with the message to the target, whose QPs keep receive buffers posted; the target
//!   delivers it with [`TargetHandle::deliver`] under the peer name the control channel
//!   authenticated at the handshake, and reposts the buffer. The post ends Done when the SEND
//!   has completed, so the notification is never seen before the data. Each notification
//!   carries a per-connection sequence number, kept across retries on other lanes, and the
//!   target drops one it has already delivered ([`notif`]).
//! - **Failures.** Any error completion puts its QP in the error state: the lane goes down for
//!   the connection, the lane's unfinished slices move to other lanes (another NIC first) and
//!   a slice is retried at most `max_retries` times; with no lane left the post ends
//!   `Failed(remote disconnect)` with the reason. A remote access error (the peer deregistered
//!   the region) ends it `Denied`. The QP's own retry count and timeout bound how long a dead
//!   path takes to report. A post ends exactly once; its local memory stays held until every WR
//!   it posted has completed or flushed.

pub mod dmabuf;
pub mod notif;
pub mod place;
pub mod plan;
pub mod slab;
pub mod topo;
#[doc(hidden)]
pub mod verbs;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, Result, TargetHandle, XferOp, XferPlan,
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

/// How the poller thread waits for completions.
#[derive(Clone, Debug)]
pub struct PollPolicy {
    /// Empty polls of every CQ before the poller starts sleeping.
    pub spin_polls: u32,
    /// Sleep between polls while idle.
    pub idle_sleep: Duration,
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy {
            spin_polls: 2000,
            idle_sleep: Duration::from_micros(50),
        }
    }
}

/// Settings of the `rdma` backend (`[rdma]` in the agent's configuration).
#[derive(Clone, Debug)]
pub struct RdmaConfig {
    /// Use only these devices (by name); `None`: every device with an active port.
    pub devices: Option<Vec<String>>,
    /// Devices per GPU PCI bus id (`0000:19:00.0`), overriding the topology for that GPU.
    pub gpu_devices: BTreeMap<String, Vec<String>>,
    /// Root of sysfs (tests point it at a fake tree).
    pub sysfs: PathBuf,
    /// Queue pairs per NIC per peer.
    pub qps_per_nic: usize,
    /// Largest work request.
    pub slice_bytes: u64,
    /// Most work requests in flight per queue pair.
    pub max_outstanding: u32,
    /// Most SGEs per work request (also capped by the device).
    pub max_sge: usize,
    /// Completion queue entries per NIC (shared by all its QPs; QPs are refused beyond it).
    pub cq_depth: u32,
    /// Times one slice is retried on another lane after a failure.
    pub max_retries: u32,
    /// How long connecting (the QP handshake) may take.
    pub connect_timeout: Duration,
    /// Largest notification received; receive buffers of this size are posted per QP.
    pub max_notif: u32,
    /// Receive buffers posted per target-side QP.
    pub recv_depth: u32,
    /// GID index on RoCE ports; `None`: the first RoCE v2 GID (IPv4-mapped first).
    pub gid_index: Option<u8>,
    /// QP local ACK timeout exponent (4.096 µs × 2^n).
    pub qp_timeout: u8,
    /// QP transport retries before a path is declared failed.
    pub retry_cnt: u8,
    /// Traffic class on RoCE.
    pub traffic_class: u8,
    /// Service level.
    pub service_level: u8,
    /// How the poller waits.
    pub poll: PollPolicy,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            devices: None,
            gpu_devices: BTreeMap::new(),
            sysfs: PathBuf::from("/sys"),
            qps_per_nic: 4,
            slice_bytes: 1 << 20,
            max_outstanding: 32,
            max_sge: 4,
            cq_depth: 16384,
            max_retries: 2,
            connect_timeout: Duration::from_secs(5),
            max_notif: 4096,
            recv_depth: 32,
            gid_index: None,
            qp_timeout: 14,
            retry_cnt: 7,
            traffic_class: 0,
            service_level: 0,
            poll: PollPolicy::default(),
        }
    }
}

impl RdmaConfig {
    fn check(&self) -> std::result::Result<(), String> {
        if self.qps_per_nic == 0 || self.qps_per_nic > 64 {
            return Err(format!("[rdma] qps_per_nic {} (1..=64)", self.qps_per_nic));
        }
        if self.slice_bytes == 0 || self.slice_bytes > 1 << 30 {
            return Err(format!(
                "[rdma] slice_bytes {} (1..=1 GiB)",
                self.slice_bytes
            ));
        }
        if self.max_outstanding == 0 || self.max_sge == 0 || self.recv_depth == 0 {
            return Err("[rdma] max_outstanding, max_sge and recv_depth must be > 0".into());
        }
        if self.max_notif == 0 || self.max_notif > 1 << 20 {
            return Err(format!("[rdma] max_notif {} (1..=1 MiB)", self.max_notif));
        }
        Ok(())
    }
}

fn err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BackendName::Rdma,
        op,
        reason: reason.into(),
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
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
// Target side: lanes peers connected to us.
// ---------------------------------------------------------------------------------------------

struct ServedLane {
    // Declared first: the QP goes before the buffers it receives into.
    qp: LaneQp,
    bufs: OwnedBuf,
    slot: usize,
    token: AtomicU64,
    peer: String,
    /// Notifications delivered on the connection (shared by its lanes).
    dedup: Arc<Mutex<notif::Dedup>>,
}

impl ServedLane {
    fn post_slot(&self, slot: usize) -> std::result::Result<(), verbs::VerbsError> {
        let token = self.token.load(Ordering::Acquire);
        self.qp.qp.post_recv(
            &self.bufs,
            slot * self.slot,
            self.slot,
            (token << 24) | slot as u64,
        )
    }

    fn on_recv(&self, st: &State, slot: usize, wc: &IbvWc) {
        if wc.status != verbs::WC_SUCCESS {
            // Flushed (QP closing or broken): the lane is gone; nothing to repost.
            if wc.status != verbs::WC_WR_FLUSH_ERR {
                tracing::warn!(peer = %self.peer, status = wc.status, "rdma receive failed");
            }
            return;
        }
        let len = (wc.byte_len as usize).min(self.slot);
        match self.bufs.read(slot * self.slot, len) {
            Some(mut buf) => match notif::split(&buf).map(|(seq, _)| seq) {
                Some(seq) => {
                    if self.dedup.lock().accept(seq) {
                        buf.drain(..notif::HEADER);
                        // The notification follows the data on the same QP, so the WRITEs have
                        // landed in memory; for VRAM the GPU must also be told to see them.
                        for ctx in st.gdr_flush.lock().iter() {
                            if let Err(e) = ctx.flush_gdr_writes() {
                                tracing::warn!(error = %e, "rdma: flushing GPUDirect writes failed");
                            }
                        }
                        // A refusal (queue over its budget) is counted and logged by `deliver`.
                        let _ = st.target.deliver(&self.peer, buf);
                    } else {
                        metrics::counter!("nixl_rdma_duplicate_notifs_total").increment(1);
                        tracing::debug!(peer = %self.peer, seq, "rdma: duplicate notification dropped");
                    }
                }
                None => tracing::warn!(
                    peer = %self.peer,
                    len,
                    "rdma notification shorter than its header: dropped"
                ),
            },
            None => tracing::warn!(peer = %self.peer, slot, "rdma receive slot out of range"),
        }
        if let Err(e) = self.post_slot(slot) {
            tracing::warn!(peer = %self.peer, error = %e, "rdma receive repost failed");
        }
    }
}

struct ServedConn {
    lanes: Vec<Arc<ServedLane>>,
    instance_id: u128,
    seq: u64,
}

impl State {
    /// DRAM: an MR on every NIC; the NICs nearest to the NUMA node of the first page.
    fn register_dram(&self, desc: &Desc, access: i32) -> Result<(Vec<Option<Mr>>, NicMask)> {
        let mut mrs = Vec::with_capacity(self.nics.len());
        for nic in &self.nics {
            // SAFETY: `register` is called only by the agent under `Agent::register`'s contract:
            // the caller keeps the memory allocated until the region is deregistered, and
            // `deregister` drops these MRs (after the agent has drained the region's users).
            let mr = unsafe { nic.pd.reg_mr(desc.addr, desc.len, access) };
            match mr {
                Ok(m) => mrs.push(Some(m)),
                Err(e) => return Err(err("register", format!("{} {desc:?}: {e}", nic.name))),
            }
        }
        // Asked after ibv_reg_mr pinned (and so placed) the page.
        let near = match place::numa_node_of(desc.addr) {
            Some(node) => place::nearest(
                &self.cfg.sysfs,
                &self.topo,
                &self.names,
                &topo::MemLocation::Numa(node),
            ),
            None => place::all(self.nics.len()),
        };
        Ok((mrs, near))
    }

    fn drop_served(&self, conn: ServedConn) {
        for l in &conn.lanes {
            self.disown(l.token.load(Ordering::Acquire));
            let _ = l.qp.qp.to_err();
        }
    }

    fn accept(
        &self,
        peer: &str,
        conn_id: u64,
        instance_id: u128,
        lanes: &[QpAddr],
    ) -> std::result::Result<Vec<u8>, String> {
        let mut served = Vec::with_capacity(lanes.len());
        match self.accept_lanes(peer, lanes, &mut served) {
            Ok(reply) => {
                self.keep_served(peer, conn_id, instance_id, served);
                Ok(Msg::Accept { lanes: reply }.encode())
            }
            Err(e) => {
                for l in &served {
                    self.disown(l.token.load(Ordering::Acquire));
                }
                Err(e)
            }
        }
    }

    fn accept_lanes(
        &self,
        peer: &str,
        lanes: &[QpAddr],
        served: &mut Vec<Arc<ServedLane>>,
    ) -> std::result::Result<Vec<QpAddr>, String> {
        let slot = self.cfg.max_notif as usize + notif::HEADER;
        let dedup = Arc::new(Mutex::new(notif::Dedup::default()));
        let mut reply = Vec::with_capacity(lanes.len());
        for (i, q) in lanes.iter().enumerate() {
            let nic = self
                .nics
                .get(usize::from(q.target_nic))
                .ok_or_else(|| format!("lane {i}: no NIC {} here", q.target_nic))?;
            let lq = nic
                .create_qp(1, self.cfg.recv_depth, 1)
                .map_err(|e| format!("lane {i}: {e}"))?;
            check_gid_kinds(&nic.name, &nic.gid, &q.gid, nic.link_layer)
                .map_err(|e| format!("lane {i}: {e}"))?;
            let path = nic.path(&self.cfg, q.mtu, q.rd_atomic);
            let remote = RemoteQp {
                qpn: q.qpn,
                psn: q.psn,
                lid: q.lid,
                gid: q.gid,
            };
            let psn = random24();
            lq.qp
                .to_rtr(&remote, &path)
                .and_then(|()| lq.qp.to_rts(psn, &path))
                .map_err(|e| format!("lane {i} on {}: {e}", nic.name))?;
            let depth = self.cfg.recv_depth as usize;
            let bufs = OwnedBuf::new(&nic.pd, slot * depth, 0)
                .map_err(|e| format!("lane {i} receive buffers on {}: {e}", nic.name))?;
            let lane = Arc::new(ServedLane {
                qp: lq,
                bufs,
                slot,
                token: AtomicU64::new(0),
                peer: peer.to_owned(),
                dedup: Arc::clone(&dedup),
            });
            let token = self
                .own(Owner::Recv(Arc::clone(&lane)))
                .ok_or_else(|| format!("lane {i}: {}", State::full()))?;
            lane.token.store(token, Ordering::Release);
            served.push(Arc::clone(&lane));
            for s in 0..depth {
                lane.post_slot(s).map_err(|e| format!("lane {i}: {e}"))?;
            }
            reply.push(QpAddr {
                target_nic: q.target_nic,
                qpn: lane.qp.qp.qpn(),
                psn,
                lid: nic.lid,
                gid: nic.gid,
                mtu: nic.mtu,
                rd_atomic: nic.rd_atomic,
            });
        }
        Ok(reply)
    }

    fn keep_served(
        &self,
        peer: &str,
        conn_id: u64,
        instance_id: u128,
        served: Vec<Arc<ServedLane>>,
    ) {
        let seq = self.served_seq.fetch_add(1, Ordering::Relaxed);
        let mut map = self.served.lock();
        // A new incarnation of the peer: its old connections are dead.
        let stale: Vec<(String, u64)> = map
            .iter()
            .filter(|((p, _), c)| p == peer && c.instance_id != instance_id)
            .map(|(k, _)| k.clone())
            .collect();
        let mut dropped: Vec<ServedConn> = stale.iter().filter_map(|k| map.remove(k)).collect();
        let mut mine: Vec<((String, u64), u64)> = map
            .iter()
            .filter(|((p, _), _)| p == peer)
            .map(|(k, c)| (k.clone(), c.seq))
            .collect();
        mine.sort_by_key(|(_, s)| *s);
        while mine.len() >= MAX_SERVED_PER_PEER {
            let (k, _) = mine.remove(0);
            dropped.extend(map.remove(&k));
        }
        if let Some(old) = map.insert(
            (peer.to_owned(), conn_id),
            ServedConn {
                lanes: served,
                instance_id,
                seq,
            },
        ) {
            dropped.push(old);
        }
        drop(map);
        for c in dropped {
            self.drop_served(c);
        }
    }
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
    ) -> std::result::Result<Nic, String> {
        let ctx = verbs.open(name).map_err(|e| e.to_string())?;
        let dev = ctx.query_device().map_err(|e| e.to_string())?;
        let mut found = None;
        for port in 1..=dev.phys_port_cnt {
            let a = ctx.query_port(port).map_err(|e| e.to_string())?;
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
        let gid = ctx.query_gid(port, sgid_index).map_err(|e| e.to_string())?;
        let pd = ctx.alloc_pd().map_err(|e| e.to_string())?;
        let depth = self
            .cfg
            .cq_depth
            .min(u32::try_from(dev.max_cqe).unwrap_or(u32::MAX));
        let cq = ctx.create_cq(depth).map_err(|e| e.to_string())?;
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
    pub fn nics_for(&self, loc: &topo::MemLocation) -> std::result::Result<Vec<String>, String> {
        let nics = topo::scan(&self.cfg.sysfs).map_err(|e| e.to_string())?;
        let over = topo::NicOverride {
            devices: self.cfg.devices.clone(),
            per_gpu: self
                .cfg
                .gpu_devices
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
        };
        topo::select(&self.cfg.sysfs, &nics, loc, &over)
    }
}

impl Backend for RdmaBackend {
    fn name(&self) -> BackendName {
        BackendName::Rdma
    }

    fn caps(&self) -> Caps {
        Caps {
            local_kinds: KINDS,
            remote_kinds: KINDS,
            notifications: true,
            locality: Locality::AnyNode,
        }
    }

    fn probe(&self) -> std::result::Result<(), String> {
        self.cfg.check()?;
        let verbs = self.verbs()?;
        self.device_names(&verbs).map(|_| ())
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        self.cfg.check().map_err(unavailable)?;
        crate::limits::raise_nofile();
        let verbs = self.verbs().map_err(unavailable)?;
        let names = self.device_names(&verbs).map_err(unavailable)?;
        let mut nics = Vec::new();
        let mut skipped = Vec::new();
        for name in names {
            if nics.len() >= wire::MAX_NICS {
                break;
            }
            match self.open_nic(&verbs, nics.len() as u8, &name) {
                Ok(n) => nics.push(Arc::new(n)),
                Err(e) if self.cfg.devices.is_some() => {
                    return Err(unavailable(format!("configured device {name}: {e}")))
                }
                Err(e) => skipped.push(format!("{name}: {e}")),
            }
        }
        if nics.is_empty() {
            return Err(unavailable(format!(
                "no usable RDMA device ({})",
                skipped.join("; ")
            )));
        }
        for s in &skipped {
            tracing::info!(reason = %s, "rdma device skipped");
        }
        let names = nics.iter().map(|n| n.name.clone()).collect();
        let state = Arc::new(State {
            cfg: self.cfg.clone(),
            nics,
            names,
            topo: dmabuf::scan_topology(&self.cfg.sysfs),
            target,
            regions: Mutex::new(HashMap::new()),
            owners: Slab::new(),
            served: Mutex::new(HashMap::new()),
            served_seq: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            gdr_flush: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            poller: Mutex::new(None),
        });
        let st = Arc::clone(&state);
        let h = std::thread::Builder::new()
            .name("nixl-rdma-poll".into())
            .spawn(move || st.poll_loop())
            .map_err(|e| Error::io("spawning the rdma poller", e))?;
        *state.poller.lock() = Some(h);
        if self.state.set(state).is_err() {
            return Err(err("start", "started twice"));
        }
        let svc: Weak<dyn ControlService> = self.me.clone();
        self.control.serve(BackendName::Rdma, svc);
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        match self.state.get() {
            Some(st) => st.conn_info(self.control.endpoint()).encode(),
            None => Vec::new(),
        }
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        let st = self.state()?;
        let access =
            verbs::ACCESS_LOCAL_WRITE | verbs::ACCESS_REMOTE_READ | verbs::ACCESS_REMOTE_WRITE;
        let (mrs, near) = match kind {
            MemKind::Dram => st.register_dram(desc, access)?,
            MemKind::Vram => dmabuf::register(st, desc, access)?,
            k => {
                return Err(Error::InvalidArgument(format!(
                    "rdma registers DRAM and VRAM, not {k}"
                )))
            }
        };
        let keys = RegionKeys {
            addr: desc.addr,
            len: desc.len,
            rkeys: mrs
                .iter()
                .zip(&st.nics)
                .filter_map(|(m, n)| m.as_ref().map(|m| (n.idx, m.rkey())))
                .collect(),
        };
        st.regions.lock().insert(
            (kind.code(), desc.addr, desc.len, desc.dev_id),
            RegionMrs { mrs, near },
        );
        Ok(keys.encode())
    }

    fn deregister(&self, region: &Region) {
        if let Some(st) = self.state.get() {
            let k = (
                region.kind.code(),
                region.desc.addr,
                region.desc.len,
                region.desc.dev_id,
            );
            let mrs = st.regions.lock().remove(&k);
            drop(mrs);
        }
    }

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), String> {
        let st = self.state().map_err(|e| e.to_string())?;
        let ci =
            ConnInfo::decode(conn_info).map_err(|e| format!("bad rdma connection info: {e}"))?;
        if ci.endpoint.is_empty() {
            return Err("the peer's control channel is not serving".into());
        }
        if !ci
            .nics
            .iter()
            .any(|r| st.nics.iter().any(|n| n.link_layer == r.link_layer))
        {
            return Err("no NIC of the peer shares a link layer with ours".into());
        }
        Ok(())
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let st = Arc::clone(self.state()?);
        let remote = ConnInfo::decode(peer.conn_info).map_err(|e| {
            Error::InvalidArgument(format!(
                "peer '{}': bad rdma connection info: {e}",
                peer.name
            ))
        })?;
        let local_ll: Vec<u8> = st.nics.iter().map(|n| n.link_layer).collect();
        let remote_ll: Vec<u8> = remote.nics.iter().map(|n| n.link_layer).collect();
        let pairs: Vec<(Arc<Nic>, u8)> = pair_nics(&local_ll, &remote_ll)
            .into_iter()
            .map(|(l, r)| (Arc::clone(&st.nics[l]), r))
            .collect();
        if pairs.is_empty() {
            return Err(err(
                "connect",
                format!(
                    "no NIC of peer '{}' shares a link layer with ours",
                    peer.name
                ),
            ));
        }
        let total = pairs.len() * self.cfg.qps_per_nic;
        if total > wire::MAX_LANES {
            return Err(Error::InvalidArgument(format!(
                "{total} lanes to peer '{}' exceed the handshake limit of {}: lower [rdma] qps_per_nic",
                peer.name,
                wire::MAX_LANES
            )));
        }
        let max_sge = self.cfg.max_sge;
        let mut lanes = Vec::new();
        let mut req = Vec::new();
        for (nic, rnic) in &pairs {
            for _ in 0..self.cfg.qps_per_nic {
                let sge = max_sge.min(nic.max_sge).min(nic.max_sge_rd).max(1);
                let lq = nic.create_qp(self.cfg.max_outstanding + 2, 1, sge)?;
                let psn = random24();
                req.push(QpAddr {
                    target_nic: *rnic,
                    qpn: lq.qp.qpn(),
                    psn,
                    lid: nic.lid,
                    gid: nic.gid,
                    mtu: nic.mtu,
                    rd_atomic: nic.rd_atomic,
                });
                lanes.push((lq, *rnic, psn));
            }
        }
        let conn_id = random_u64();
        let msg = Msg::Connect {
            conn_id,
            instance_id: st.target.instance_id(),
            lanes: req,
        };
        let reply = self.control.call(
            &remote.endpoint,
            st.target.name(),
            BackendName::Rdma,
            &msg.encode(),
            self.cfg.connect_timeout,
        )?;
        let close = |e: Error| {
            // The peer set up its side: let it free those QPs (best effort).
            let _ = self.control.call(
                &remote.endpoint,
                st.target.name(),
                BackendName::Rdma,
                &Msg::Close { conn_id }.encode(),
                Duration::from_secs(1),
            );
            e
        };
        let theirs = match Msg::decode(&reply) {
            Ok(Msg::Accept { lanes }) if lanes.len() == total => lanes,
            Ok(other) => {
                return Err(close(err(
                    "connect",
                    format!("peer '{}' answered {other:?} to a connect", peer.name),
                )))
            }
            Err(e) => {
                return Err(close(err(
                    "connect",
                    format!("peer '{}' sent a bad handshake reply: {e}", peer.name),
                )))
            }
        };
        let mut out = Vec::with_capacity(lanes.len());
        for ((lq, rnic, psn), t) in lanes.into_iter().zip(theirs) {
            if t.target_nic != rnic {
                return Err(close(err(
                    "connect",
                    format!("peer '{}' answered for another NIC", peer.name),
                )));
            }
            check_gid_kinds(&lq.nic.name, &lq.nic.gid, &t.gid, lq.nic.link_layer)
                .map_err(|e| close(err("connect", e)))?;
            let path = lq.nic.path(&self.cfg, t.mtu, t.rd_atomic);
            let remote_qp = RemoteQp {
                qpn: t.qpn,
                psn: t.psn,
                lid: t.lid,
                gid: t.gid,
            };
            lq.qp
                .to_rtr(&remote_qp, &path)
                .and_then(|()| lq.qp.to_rts(psn, &path))
                .map_err(|e| close(err("connect", format!("{}: {e}", lq.nic.name))))?;
            out.push(Lane {
                free: AtomicU32::new(lq.send_slots),
                qp: lq,
                remote_nic: rnic,
                up: AtomicBool::new(true),
            });
        }
        let conn = Arc::new_cyclic(|me| RdmaConn {
            me: me.clone(),
            st: Arc::clone(&st),
            control: Arc::clone(&self.control),
            peer: peer.name.to_owned(),
            conn_id,
            remote,
            lanes: out,
            closed: AtomicBool::new(false),
            timeout: self.cfg.connect_timeout,
            waiters: Mutex::new(Vec::new()),
            has_waiters: AtomicBool::new(false),
            notif_seq: AtomicU64::new(0),
        });
        let mut conns = st.conns.lock();
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
        Ok(conn)
    }

    fn shutdown(&self) {
        if self.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(st) = self.state.get() else {
            return;
        };
        st.stop.store(true, Ordering::Release);
        if let Some(h) = st.poller.lock().take() {
            let _ = h.join();
        }
        // Stop the hardware: every QP to ERR, so the NICs no longer touch memory.
        for c in st.conns.lock().drain(..).filter_map(|w| w.upgrade()) {
            c.closed.store(true, Ordering::Release);
            for l in &c.lanes {
                l.up.store(false, Ordering::Release);
                let _ = l.qp.qp.to_err();
            }
        }
        let served: Vec<ServedConn> = st.served.lock().drain().map(|(_, c)| c).collect();
        for c in served {
            st.drop_served(c);
        }
        for o in st.owners.drain() {
            match o {
                Owner::Post(p) => p.cancel_now(Error::Cancelled),
                Owner::Sync(s) => s.finish(Err((0, "the rdma backend shut down".into()))),
                Owner::Recv(_) => {}
            }
        }
        st.regions.lock().clear();
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

impl ControlService for RdmaBackend {
    fn handle(&self, peer: &str, req: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let st = self.state().map_err(|e| e.to_string())?;
        match Msg::decode(req).map_err(|e| format!("bad rdma control message: {e}"))? {
            Msg::Connect {
                conn_id,
                instance_id,
                lanes,
            } => st.accept(peer, conn_id, instance_id, &lanes),
            Msg::Close { conn_id } => {
                let c = st.served.lock().remove(&(peer.to_owned(), conn_id));
                if let Some(c) = c {
                    st.drop_served(c);
                }
                Ok(Msg::Ok.encode())
            }
            other => Err(format!("unexpected rdma control message {other:?}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Initiator side.
// ---------------------------------------------------------------------------------------------

struct Lane {
    qp: LaneQp,
    remote_nic: u8,
    up: AtomicBool,
    /// Free send-queue slots, shared by every post on the lane.
    free: AtomicU32,
}

impl Lane {
    /// Takes up to `want` send-queue slots; returns how many.
    fn acquire(&self, want: u32) -> u32 {
        let mut cur = self.free.load(Ordering::SeqCst);
        loop {
            let k = cur.min(want);
            if k == 0 {
                return 0;
            }
            match self
                .free
                .compare_exchange(cur, cur - k, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return k,
                Err(now) => cur = now,
            }
        }
    }

    fn release(&self, n: u32) {
        self.free.fetch_add(n, Ordering::SeqCst);
    }
}

/// A connection to one peer: its lanes.
struct RdmaConn {
    me: Weak<RdmaConn>,
    st: Arc<State>,
    control: Arc<dyn ControlChannel>,
    peer: String,
    conn_id: u64,
    remote: ConnInfo,
    lanes: Vec<Lane>,
    closed: AtomicBool,
    timeout: Duration,
    /// Posts waiting for send-queue slots on some lane.
    waiters: Mutex<Vec<Weak<PostState>>>,
    /// Whether `waiters` may be non-empty (read without the lock on every completion).
    has_waiters: AtomicBool,
    /// The next notification's sequence number.
    notif_seq: AtomicU64,
}

impl fmt::Debug for RdmaConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaConn")
            .field("peer", &self.peer)
            .field("lanes", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

impl RdmaConn {
    fn lane_down(&self, lane: usize, why: &str) {
        if let Some(l) = self.lanes.get(lane) {
            if l.up.swap(false, Ordering::AcqRel) {
                metrics::counter!("nixl_rdma_lane_failures_total").increment(1);
                tracing::warn!(peer = %self.peer, nic = %l.qp.nic.name, lane, why, "rdma lane down");
            }
        }
    }

    /// Registers a post to be resumed when slots are freed. The caller checks the lanes' free
    /// slots again afterwards: a release that happened before `has_waiters` was set is seen
    /// there (both sides use SeqCst), one after it wakes the post.
    fn add_waiter(&self, p: Weak<PostState>) {
        let mut w = self.waiters.lock();
        w.push(p);
        self.has_waiters.store(true, Ordering::SeqCst);
    }

    /// Lets posts that waited for send-queue slots try again (called after slots were freed,
    /// with no post's lock held). No lock is taken when nobody waits.
    fn wake(&self, st: &State) {
        if !self.has_waiters.load(Ordering::SeqCst) {
            return;
        }
        let ws: Vec<Weak<PostState>> = {
            let mut w = self.waiters.lock();
            self.has_waiters.store(false, Ordering::SeqCst);
            std::mem::take(&mut *w)
        };
        for p in ws.iter().filter_map(Weak::upgrade) {
            p.resume(st);
        }
    }

    fn disconnected(&self, reason: impl Into<String>) -> Error {
        Error::RemoteDisconnect {
            peer: self.peer.clone(),
            reason: reason.into(),
        }
    }

    fn next_notif_seq(&self) -> u64 {
        self.notif_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Notification buffers (header + `msg`), one per NIC that one of `lanes` uses.
    fn notif_bufs(&self, lanes: &[usize], msg: &[u8]) -> Result<Vec<Option<OwnedBuf>>> {
        let mut bufs: Vec<Option<OwnedBuf>> = (0..self.st.nics.len()).map(|_| None).collect();
        for &i in lanes {
            let nic = &self.lanes[i].qp.nic;
            let slot = &mut bufs[usize::from(nic.idx)];
            if slot.is_none() {
                let b = OwnedBuf::new(&nic.pd, notif::HEADER + msg.len(), 0)
                    .map_err(|e| err("prepare", format!("notification buffer: {e}")))?;
                b.write(notif::HEADER, msg);
                *slot = Some(b);
            }
        }
        Ok(bufs)
    }
}

impl Drop for RdmaConn {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            self.close();
        }
    }
}

impl Connection for RdmaConn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        let st = &self.st;
        for k in [plan.local_kind, plan.remote_kind] {
            if !KINDS.contains(&k) {
                return Err(Error::InvalidArgument(format!(
                    "rdma moves DRAM and VRAM, not {k}"
                )));
            }
        }
        let notif = plan.notif.clone();
        if let Some(n) = &notif {
            if n.len() > self.remote.max_notif as usize {
                return Err(Error::InvalidArgument(format!(
                    "notification of {} bytes exceeds peer '{}''s rdma limit of {}",
                    n.len(),
                    self.peer,
                    self.remote.max_notif
                )));
            }
        }
        // Remote keys per remote region.
        let mut rkeys: Vec<RegionKeys> = Vec::with_capacity(plan.remote_regions.len());
        for (i, r) in plan.remote_regions.iter().enumerate() {
            let public = r
                .backends
                .iter()
                .find(|(b, _)| *b == BackendName::Rdma)
                .map(|(_, p)| p.as_slice())
                .ok_or_else(|| Error::RemoteNotRegistered {
                    peer: self.peer.clone(),
                    index: i,
                    kind: r.kind,
                    desc: r.desc,
                })?;
            let keys = RegionKeys::decode(public).map_err(|e| {
                Error::InvalidArgument(format!(
                    "peer '{}': bad rdma data of region {:?}: {e}",
                    self.peer, r.desc
                ))
            })?;
            if keys.addr != r.desc.addr || keys.len != r.desc.len {
                return Err(Error::InvalidArgument(format!(
                    "peer '{}': rdma data of region {:?} covers {:#x}+{} instead",
                    self.peer, r.desc, keys.addr, keys.len
                )));
            }
            rkeys.push(keys);
        }
        // Local keys per local NIC per local region (0 where the NIC has no MR for it), the
        // NICs that hold every local region, and the NICs nearest to all of them.
        let nnics = st.nics.len();
        let mut lkeys: Vec<Vec<u32>> = vec![Vec::with_capacity(plan.local_regions.len()); nnics];
        let mut local_ok = place::all(nnics);
        let mut near = place::all(nnics);
        {
            let regions = st.regions.lock();
            for r in &plan.local_regions {
                let k = (r.kind.code(), r.desc.addr, r.desc.len, r.desc.dev_id);
                let reg = regions.get(&k).ok_or_else(|| {
                    err(
                        "prepare",
                        format!("local region {:?} is not registered with rdma", r.desc),
                    )
                })?;
                for (n, keys) in lkeys.iter_mut().enumerate() {
                    match reg.mrs.get(n).and_then(Option::as_ref) {
                        Some(mr) => keys.push(mr.lkey()),
                        None => {
                            keys.push(0);
                            local_ok &= !(1u64 << n.min(63));
                        }
                    }
                }
                near &= reg.near;
            }
        }
        // Lanes that reach every region on both sides.
        let lanes: Vec<usize> = (0..self.lanes.len())
            .filter(|&i| {
                let l = &self.lanes[i];
                local_ok & (1u64 << usize::from(l.qp.nic.idx).min(63)) != 0
                    && rkeys.iter().all(|k| k.rkey(l.remote_nic).is_some())
            })
            .collect();
        if lanes.is_empty() {
            return Err(err(
                "prepare",
                format!(
                    "no lane to peer '{}' reaches every region (local regions registered on \
                     NICs {local_ok:#b}; remote regions' NICs from the peer's metadata)",
                    self.peer
                ),
            ));
        }
        let preferred: Vec<bool> = lanes
            .iter()
            .map(|&i| near & (1u64 << usize::from(self.lanes[i].qp.nic.idx).min(63)) != 0)
            .collect();
        let read = plan.op == XferOp::Read;
        let max_sge = lanes
            .iter()
            .map(|&i| {
                let n = &self.lanes[i].qp.nic;
                if read {
                    n.max_sge_rd
                } else {
                    n.max_sge
                }
            })
            .min()
            .unwrap_or(1)
            .min(st.cfg.max_sge)
            .max(1);
        let slices = plan::slice_segments(&plan.segments, st.cfg.slice_bytes, max_sge);
        if slices.len() >= MAX_SLICES {
            return Err(Error::InvalidArgument(format!(
                "{} work requests in one transfer (limit {MAX_SLICES}): raise [rdma] slice_bytes",
                slices.len()
            )));
        }
        // Per lane: the rkey of each remote region on the lane's remote NIC.
        let lane_rkeys: Vec<Vec<u32>> = lanes
            .iter()
            .map(|&i| {
                rkeys
                    .iter()
                    .map(|k| k.rkey(self.lanes[i].remote_nic).unwrap_or(0))
                    .collect()
            })
            .collect();
        let notif_bufs = match &notif {
            Some(n) => self.notif_bufs(&lanes, n)?,
            None => Vec::new(),
        };
        Ok(Box::new(Prepared {
            conn: self
                .me
                .upgrade()
                .ok_or_else(|| err("prepare", "connection is gone"))?,
            op: plan.op,
            slices: slices.into(),
            keys: Arc::new(Keys {
                lanes,
                preferred,
                lkeys,
                lane_rkeys,
            }),
            notif,
            notif_bufs: Mutex::new(Arc::new(notif_bufs)),
            current: Mutex::new(None),
        }))
    }

    fn send_notif(&self, _from: &str, msg: &[u8]) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.disconnected("connection closed"));
        }
        if msg.len() > self.remote.max_notif as usize {
            return Err(Error::InvalidArgument(format!(
                "notification of {} bytes exceeds peer '{}''s rdma limit of {}",
                msg.len(),
                self.peer,
                self.remote.max_notif
            )));
        }
        let deadline = Instant::now() + self.timeout;
        let mut last = String::from("no lane is up");
        // One number for every attempt: the target delivers it once.
        let seq = self.next_notif_seq();
        let mut header = [0u8; notif::HEADER];
        notif::put_header(&mut header, seq);
        let len = notif::HEADER + msg.len();
        loop {
            let mut busy = false;
            for (i, l) in self.lanes.iter().enumerate() {
                if !l.up.load(Ordering::Acquire) {
                    continue;
                }
                if l.acquire(1) == 0 {
                    busy = true;
                    continue;
                }
                let buf = match OwnedBuf::new(&l.qp.nic.pd, len, 0) {
                    Ok(b) => b,
                    Err(e) => {
                        l.release(1);
                        return Err(err("notification", e.to_string()));
                    }
                };
                buf.write(0, &header);
                buf.write(notif::HEADER, msg);
                let sync = Arc::new(SyncSend {
                    buf,
                    result: Mutex::new(None),
                    cv: Condvar::new(),
                    conn: self.me.clone(),
                    lane: i,
                });
                let Some(token) = self.st.own(Owner::Sync(Arc::clone(&sync))) else {
                    l.release(1);
                    return Err(err("notification", State::full()));
                };
                let sge = [IbvSge {
                    addr: sync.buf.addr(0),
                    length: len as u32,
                    lkey: sync.buf.mr().lkey(),
                }];
                let req = SendReq {
                    wr_id: (token << 24) | NOTIF_IDX,
                    opcode: verbs::WR_SEND,
                    sges: &sge,
                    remote_addr: 0,
                    rkey: 0,
                };
                // SAFETY: the SGE lies in `sync.buf`, an OwnedBuf with its own MR on this
                // lane's PD; `sync` is owned by the connection's state under `token` until the
                // SEND's completion (or the lane's flush) is reaped, so the buffer outlives it.
                if let Err(e) = unsafe { l.qp.qp.post_send(&[req]) } {
                    self.st.disown(token);
                    l.release(1);
                    self.lane_down(i, &e.to_string());
                    last = e.to_string();
                    continue;
                }
                match sync.wait(deadline.saturating_duration_since(Instant::now())) {
                    Some(Ok(())) => return Ok(()),
                    Some(Err((_, why))) => {
                        self.lane_down(i, &why);
                        last = why;
                    }
                    None => {
                        // The owner entry keeps the buffer alive until the NIC reports.
                        return Err(self.disconnected(format!(
                            "notification not acknowledged within {:?}",
                            self.timeout
                        )));
                    }
                }
            }
            if !busy {
                break;
            }
            if Instant::now() >= deadline {
                return Err(
                    self.disconnected(format!("every lane stayed busy for {:?}", self.timeout))
                );
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Err(self.disconnected(format!("notification failed on every lane: {last}")))
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for l in &self.lanes {
            l.up.store(false, Ordering::Release);
            let _ = l.qp.qp.to_err();
        }
        let from = self.st.target.name().to_owned();
        let _ = self.control.call(
            &self.remote.endpoint,
            &from,
            BackendName::Rdma,
            &Msg::Close {
                conn_id: self.conn_id,
            }
            .encode(),
            Duration::from_secs(1),
        );
    }
}

/// A standalone notification waiting for its SEND completion.
struct SyncSend {
    buf: OwnedBuf,
    result: Mutex<Option<std::result::Result<(), (u32, String)>>>,
    cv: Condvar,
    /// The lane whose send slot it holds.
    conn: Weak<RdmaConn>,
    lane: usize,
}

impl SyncSend {
    fn finish(&self, r: std::result::Result<(), (u32, String)>) {
        *self.result.lock() = Some(r);
        self.cv.notify_all();
    }

    fn wait(&self, timeout: Duration) -> Option<std::result::Result<(), (u32, String)>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.result.lock();
        while g.is_none() {
            if self.cv.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        g.take()
    }
}

/// What every post of a prepared transfer reads: lanes and keys.
struct Keys {
    /// Connection lane index per tracker lane.
    lanes: Vec<usize>,
    /// Whether each tracker lane is on a NIC nearest to the local memory.
    preferred: Vec<bool>,
    /// lkeys[nic][local region].
    lkeys: Vec<Vec<u32>>,
    /// rkeys[tracker lane][remote region].
    lane_rkeys: Vec<Vec<u32>>,
}

/// A prepared transfer.
struct Prepared {
    conn: Arc<RdmaConn>,
    op: XferOp,
    slices: Arc<[Slice]>,
    keys: Arc<Keys>,
    notif: Option<Vec<u8>>,
    /// Notification buffers per NIC (header + message); replaced when a post that ended early
    /// may still be sending from them.
    notif_bufs: Mutex<Arc<Vec<Option<OwnedBuf>>>>,
    current: Mutex<Option<Weak<PostState>>>,
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("peer", &self.conn.peer)
            .field("op", &self.op)
            .field("slices", &self.slices.len())
            .field("lanes", &self.keys.lanes.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotifStage {
    None,
    Pending,
    Sent { lane: usize },
    Acked,
}

/// Buffers a post reuses for every round of posting (no allocation per completion once they
/// have grown).
#[derive(Debug, Default)]
struct Scratch {
    take: Vec<u32>,
    starved: Vec<usize>,
    batch: SendBatch,
}

struct PostInner {
    tracker: Tracker,
    done: Option<Completion>,
    notif: NotifStage,
    /// The notification's sequence number, set when it is first sent, kept for retries.
    notif_seq: Option<u64>,
    /// The error to report when the tracker fails (set by non-path failures).
    error: Option<Error>,
    ended: bool,
    /// Registered in the connection's waiters.
    waiting: bool,
    scratch: Scratch,
}

/// One post in flight.
struct PostState {
    me: Weak<PostState>,
    token: AtomicU64,
    conn: Arc<RdmaConn>,
    op: XferOp,
    slices: Arc<[Slice]>,
    keys: Arc<Keys>,
    notif_len: Option<usize>,
    notif_bufs: Arc<Vec<Option<OwnedBuf>>>,
    inner: Mutex<PostInner>,
}

impl Prepared {
    /// The notification buffers for a new post: the current ones, or fresh ones while the
    /// previous post (ended early) may still be sending from them.
    fn bufs_for_post(&self) -> Result<Arc<Vec<Option<OwnedBuf>>>> {
        let Some(msg) = &self.notif else {
            return Ok(Arc::clone(&self.notif_bufs.lock()));
        };
        let prev = self.current.lock().as_ref().and_then(Weak::upgrade);
        let busy = prev.is_some_and(|p| !p.inner.lock().ended);
        let mut cur = self.notif_bufs.lock();
        if busy {
            *cur = Arc::new(self.conn.notif_bufs(&self.keys.lanes, msg)?);
        }
        Ok(Arc::clone(&cur))
    }
}

impl PreparedXfer for Prepared {
    fn post(&self, done: Completion) {
        if self.conn.closed.load(Ordering::Acquire) {
            done.complete(Err(self.conn.disconnected("connection closed")));
            return;
        }
        let notif_bufs = match self.bufs_for_post() {
            Ok(b) => b,
            Err(e) => {
                done.complete(Err(e));
                return;
            }
        };
        let st = Arc::clone(&self.conn.st);
        let keys = &self.keys;
        let lane_nics: Vec<usize> = keys
            .lanes
            .iter()
            .map(|&i| usize::from(self.conn.lanes[i].qp.nic.idx))
            .collect();
        let lens: Vec<u64> = self.slices.iter().map(|s| s.len).collect();
        let mut tracker = Tracker::with_preferred(
            lens,
            &lane_nics,
            &keys.preferred,
            st.cfg.max_outstanding,
            st.cfg.max_retries,
        );
        for (t, &i) in keys.lanes.iter().enumerate() {
            if !self.conn.lanes[i].up.load(Ordering::Acquire) {
                tracker.fail_lane(t, "lane was already down");
            }
        }
        let ps = Arc::new_cyclic(|me| PostState {
            me: me.clone(),
            token: AtomicU64::new(0),
            conn: Arc::clone(&self.conn),
            op: self.op,
            slices: Arc::clone(&self.slices),
            keys: Arc::clone(keys),
            notif_len: self.notif.as_ref().map(Vec::len),
            notif_bufs,
            inner: Mutex::new(PostInner {
                tracker,
                done: Some(done),
                notif: if self.notif.is_some() {
                    NotifStage::Pending
                } else {
                    NotifStage::None
                },
                notif_seq: None,
                error: None,
                ended: false,
                waiting: false,
                scratch: Scratch::default(),
            }),
        });
        let Some(token) = st.own(Owner::Post(Arc::clone(&ps))) else {
            if let Some(c) = ps.inner.lock().done.take() {
                c.complete(Err(err("post", State::full())));
            }
            return;
        };
        ps.token.store(token, Ordering::Release);
        *self.current.lock() = Some(Arc::downgrade(&ps));
        let finish = {
            let mut g = ps.inner.lock();
            ps.pump(&mut g, None);
            ps.check(&st, &mut g)
        };
        if let Some((c, r)) = finish {
            c.complete(r);
        }
    }

    fn cancel(&self) {
        let cur = self.current.lock().as_ref().and_then(Weak::upgrade);
        if let Some(ps) = cur {
            let st = Arc::clone(&ps.conn.st);
            let finish = {
                let mut g = ps.inner.lock();
                g.tracker.abort("cancelled");
                if g.error.is_none() {
                    g.error = Some(Error::Cancelled);
                }
                ps.check(&st, &mut g)
            };
            if let Some((c, r)) = finish {
                c.complete(r);
            }
        }
    }
}

type Finish = Option<(Completion, Result<()>)>;

impl PostState {
    fn lane(&self, t: usize) -> &Lane {
        &self.conn.lanes[self.keys.lanes[t]]
    }

    /// Posts what the tracker hands out, on `only` lane or all of them.
    fn pump(&self, g: &mut PostInner, only: Option<usize>) {
        let mut only = only;
        for _ in 0..4 {
            self.pump_once(g, only.take());
            if g.scratch.starved.is_empty() {
                return;
            }
            if !g.waiting {
                g.waiting = true;
                self.conn.add_waiter(self.me.clone());
            }
            // Slots freed between our attempt and the registration woke nobody: try again.
            let freed = g
                .scratch
                .starved
                .iter()
                .any(|&t| self.lane(t).free.load(Ordering::SeqCst) > 0);
            if !freed {
                return;
            }
        }
    }

    /// One round of posting; leaves in `scratch.starved` the lanes that had work but no free
    /// slots. Allocation-free once the scratch buffers have grown.
    fn pump_once(&self, g: &mut PostInner, only: Option<usize>) {
        let PostInner {
            tracker, scratch, ..
        } = g;
        let Scratch {
            take,
            starved,
            batch,
        } = scratch;
        starved.clear();
        let token = self.token.load(Ordering::Acquire);
        let opcode = match self.op {
            XferOp::Read => verbs::WR_RDMA_READ,
            XferOp::Write => verbs::WR_RDMA_WRITE,
        };
        let n = self.keys.lanes.len();
        // Requeues after a failed post may land on any lane: loop until nothing moves.
        for round in 0..=n {
            let mut moved = false;
            let (lo, hi) = match only {
                Some(l) if round == 0 && l < n => (l, l + 1),
                _ => (0, n),
            };
            for t in lo..hi {
                let lane = self.lane(t);
                if !lane.up.load(Ordering::Acquire) {
                    if tracker.lane_up(t) {
                        tracker.fail_lane(t, "the lane failed in another transfer");
                        moved = true;
                    }
                    continue;
                }
                let want = tracker.wants(t);
                if want == 0 {
                    continue;
                }
                let k = lane.acquire(want);
                if k < want && !starved.contains(&t) {
                    starved.push(t);
                }
                if k == 0 {
                    continue;
                }
                tracker.take(t, k, take);
                if (take.len() as u32) < k {
                    lane.release(k - take.len() as u32);
                }
                if take.is_empty() {
                    continue;
                }
                let lkeys = &self.keys.lkeys[usize::from(lane.qp.nic.idx)];
                let rkeys = &self.keys.lane_rkeys[t];
                batch.clear();
                for &s in take.iter() {
                    let sl = &self.slices[s as usize];
                    batch.push(
                        (token << 24) | u64::from(s),
                        opcode,
                        sl.pieces.iter().map(|p| IbvSge {
                            addr: p.addr,
                            length: p.len as u32,
                            lkey: lkeys.get(p.local_region as usize).copied().unwrap_or(0),
                        }),
                        sl.remote_addr,
                        rkeys.get(sl.remote_region as usize).copied().unwrap_or(0),
                    );
                }
                // SAFETY: every SGE lies in a local region of the request, carrying the lkey
                // of that region's MR on this NIC; the post holds those regions (its
                // completion keeps them registered) until every slice's completion, or the
                // lane's flush, is reaped.
                if let Err(e) = unsafe { lane.qp.qp.post_batch(batch) } {
                    // The head of the chain before the refused WR is on the send queue: its
                    // slices stay tracked on this lane (their completions, or the flush that
                    // the error state below forces, come back here and fail over from there);
                    // only the rest never went out.
                    let posted = e.posted.min(take.len());
                    let why = e.err.to_string();
                    lane.release((take.len() - posted) as u32);
                    self.conn.lane_down(self.keys.lanes[t], &why);
                    if posted > 0 {
                        let _ = lane.qp.qp.to_err();
                    }
                    for &s in take[posted..].iter() {
                        tracker.fail(s, t, &why);
                    }
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Woken after slots were freed: posts what it can, ends if over.
    fn resume(&self, st: &State) {
        let finish = {
            let mut g = self.inner.lock();
            g.waiting = false;
            if g.ended {
                return;
            }
            self.pump(&mut g, None);
            self.check(st, &mut g)
        };
        if let Some((c, r)) = finish {
            c.complete(r);
        }
    }

    /// Handles one completion of this post.
    fn on_wc(&self, st: &State, idx: u64, wc: &IbvWc) {
        let finish = {
            let mut g = self.inner.lock();
            let status = st.status_result(wc);
            if idx == NOTIF_IDX {
                if let NotifStage::Sent { lane } = g.notif {
                    self.lane(lane).release(1);
                    match status {
                        Ok(()) => g.notif = NotifStage::Acked,
                        Err((_, why)) => {
                            self.conn.lane_down(self.keys.lanes[lane], &why);
                            g.tracker.fail_lane(lane, &why);
                            g.notif = NotifStage::Pending;
                        }
                    }
                }
            } else {
                let s = idx as u32;
                if let Some(lane) = g.tracker.lane_of(s) {
                    self.lane(lane).release(1);
                    match status {
                        Ok(()) => {
                            g.tracker.complete(s, lane);
                            self.pump(&mut g, Some(lane));
                        }
                        Err((code, why)) => {
                            self.conn.lane_down(self.keys.lanes[lane], &why);
                            g.tracker.fail(s, lane, &why);
                            if code == verbs::WC_REM_ACCESS_ERR && g.error.is_none() {
                                g.error = Some(Error::Denied {
                                    peer: self.conn.peer.clone(),
                                    reason: format!(
                                        "remote access refused: {why} (region deregistered?)"
                                    ),
                                });
                                g.tracker.abort("remote access refused");
                            }
                            self.pump(&mut g, None);
                        }
                    }
                }
            }
            self.check(st, &mut g)
        };
        if let Some((c, r)) = finish {
            c.complete(r);
        }
        self.conn.wake(st);
    }

    /// Ends the post if it is over; sends the notification once the data is done.
    fn check(&self, st: &State, g: &mut PostInner) -> Finish {
        if g.ended {
            return None;
        }
        if g.done.as_ref().is_some_and(Completion::is_abandoned) && g.error.is_none() {
            g.error = Some(Error::Cancelled);
            g.tracker.abort("cancelled");
        }
        match g.tracker.progress() {
            Progress::Running => None,
            Progress::Failed(reason) => {
                let e = g
                    .error
                    .clone()
                    .unwrap_or_else(|| self.conn.disconnected(reason));
                if let Some(c) = &g.done {
                    c.end_early(Err(e.clone()));
                }
                let notif_out = matches!(g.notif, NotifStage::Sent { .. });
                if g.tracker.inflight() == 0 && !notif_out {
                    self.end(st, g, Err(e))
                } else {
                    None
                }
            }
            Progress::Done => match g.notif {
                NotifStage::None | NotifStage::Acked => self.end(st, g, Ok(())),
                NotifStage::Sent { .. } => None,
                NotifStage::Pending => self.send_notif(st, g),
            },
        }
    }

    /// Posts the notification SEND on the first healthy lane with a free slot; waits for a
    /// slot if every healthy lane is full; fails when no lane is left. Each failure takes a
    /// lane down, so this ends.
    fn send_notif(&self, st: &State, g: &mut PostInner) -> Finish {
        for _ in 0..4 {
            if self.send_notif_once(g) {
                return None;
            }
            if g.scratch.starved.is_empty() {
                let e = self.conn.disconnected(
                    "the data landed but the notification could not be sent on any lane",
                );
                return self.end(st, g, Err(e));
            }
            if !g.waiting {
                g.waiting = true;
                self.conn.add_waiter(self.me.clone());
            }
            let freed = g
                .scratch
                .starved
                .iter()
                .any(|&t| self.lane(t).free.load(Ordering::SeqCst) > 0);
            if !freed {
                return None;
            }
        }
        None
    }

    /// `true` when the SEND is posted; otherwise `scratch.starved` holds the busy lanes
    /// (empty: no lane left).
    fn send_notif_once(&self, g: &mut PostInner) -> bool {
        let len = notif::HEADER + self.notif_len.unwrap_or(0);
        let token = self.token.load(Ordering::Acquire);
        g.scratch.starved.clear();
        for t in 0..self.keys.lanes.len() {
            let lane = self.lane(t);
            if !g.tracker.lane_up(t) || !lane.up.load(Ordering::Acquire) {
                continue;
            }
            let Some(Some(buf)) = self.notif_bufs.get(usize::from(lane.qp.nic.idx)) else {
                continue;
            };
            if lane.acquire(1) == 0 {
                g.scratch.starved.push(t);
                continue;
            }
            // The same number on every attempt: the target delivers it once.
            let seq = *g
                .notif_seq
                .get_or_insert_with(|| self.conn.next_notif_seq());
            let mut header = [0u8; notif::HEADER];
            notif::put_header(&mut header, seq);
            // No SEND of this buffer is in flight: a previous attempt has completed, and a
            // post still sending from it makes the next post take fresh buffers.
            buf.write(0, &header);
            let batch = &mut g.scratch.batch;
            batch.clear();
            batch.push(
                (token << 24) | NOTIF_IDX,
                verbs::WR_SEND,
                [IbvSge {
                    addr: buf.addr(0),
                    length: len as u32,
                    lkey: buf.mr().lkey(),
                }],
                0,
                0,
            );
            // SAFETY: the SGE lies in this NIC's notification buffer of the prepared request,
            // registered with its own MR and kept by the request until the SEND's completion is
            // reaped (a post still sending from it makes the next post take fresh buffers).
            match unsafe { lane.qp.qp.post_batch(batch) } {
                Ok(()) => {
                    g.notif = NotifStage::Sent { lane: t };
                    return true;
                }
                // A chain of one: `posted` is 0 (the SEND did not go out).
                Err(e) => {
                    lane.release(1);
                    let why = e.err.to_string();
                    self.conn.lane_down(self.keys.lanes[t], &why);
                    g.tracker.fail_lane(t, &why);
                }
            }
        }
        false
    }

    fn end(&self, st: &State, g: &mut PostInner, r: Result<()>) -> Finish {
        g.ended = true;
        st.disown(self.token.load(Ordering::Acquire));
        g.done.take().map(|c| (c, r))
    }

    /// Shutdown: the hardware is stopped; end the post now.
    fn cancel_now(&self, e: Error) {
        let done = {
            let mut g = self.inner.lock();
            g.ended = true;
            g.done.take()
        };
        if let Some(c) = done {
            c.complete(Err(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::topo::fake::FakeSys;
    use super::*;

    #[test]
    fn roce_gids_of_different_kinds_are_refused_before_the_qp_tries() {
        let v4 = |a: [u8; 4]| {
            let mut g = [0u8; 16];
            g[10] = 0xff;
            g[11] = 0xff;
            g[12..].copy_from_slice(&a);
            g
        };
        let mut ll = [0u8; 16];
        ll[0] = 0xfe;
        ll[1] = 0x80;
        ll[15] = 7;
        let eth = verbs::LINK_LAYER_ETHERNET;
        assert!(check_gid_kinds("mlx5_0", &v4([10, 0, 0, 1]), &v4([10, 0, 0, 2]), eth).is_ok());
        assert!(check_gid_kinds("mlx5_0", &ll, &ll, eth).is_ok());
        let e = check_gid_kinds("mlx5_0", &v4([10, 0, 0, 1]), &ll, eth).unwrap_err();
        assert!(
            e.contains("GID kinds differ") && e.contains("gid_index"),
            "{e}"
        );
        let e = check_gid_kinds("mlx5_0", &[0; 16], &ll, eth).unwrap_err();
        assert!(e.contains("zero"), "{e}");
        // InfiniBand routes by LID.
        assert!(check_gid_kinds("mlx5_0", &[0; 16], &ll, verbs::LINK_LAYER_INFINIBAND).is_ok());
    }

    #[test]
    fn device_choice_and_its_reasons() {
        let fs = FakeSys::new("choose").unwrap();
        let e = choose_devices(&[], None, &fs.root).unwrap_err();
        assert_eq!(
            e,
            format!(
                "no RDMA devices (ibv_get_device_list returned 0; {}/class/infiniband is empty)",
                fs.root.display()
            )
        );
        let e = choose_devices(&[], None, &fs.root.join("absent")).unwrap_err();
        assert!(
            e.ends_with("/absent/class/infiniband does not exist)"),
            "{e}"
        );
        let found = vec!["mlx5_0".to_string(), "mlx5_1".to_string()];
        assert_eq!(choose_devices(&found, None, &fs.root).unwrap(), found);
        let want = vec!["mlx5_1".to_string()];
        assert_eq!(choose_devices(&found, Some(&want), &fs.root).unwrap(), want);
        let want = vec!["mlx5_9".to_string()];
        assert_eq!(
            choose_devices(&found, Some(&want), &fs.root).unwrap_err(),
            "configured RDMA device 'mlx5_9' is not present (found: mlx5_0, mlx5_1)"
        );
        assert!(choose_devices(&found, Some(&[]), &fs.root)
            .unwrap_err()
            .contains("empty list"));
    }

    #[test]
    fn every_peer_nic_is_reachable() {
        const IB: u8 = 1;
        const ETH: u8 = 2;
        // Rail-aligned: NIC i to NIC i, nothing more.
        assert_eq!(
            pair_nics(&[IB; 4], &[IB; 4]),
            vec![(0, 0), (1, 1), (2, 2), (3, 3)]
        );
        // One local NIC, eight on the peer: the rail pair plus one lane to each other NIC.
        let p = pair_nics(&[IB], &[IB; 8]);
        assert_eq!(p.len(), 8);
        assert!((0..8u8).all(|k| p.iter().any(|&(l, r)| l == 0 && r == k)));
        // More local NICs than peer NICs: round robin, all covered.
        assert_eq!(pair_nics(&[IB; 3], &[IB; 2]), vec![(0, 0), (1, 1), (2, 0)]);
        // Link layers must match; a peer NIC no local NIC shares a link layer with is left.
        assert_eq!(
            pair_nics(&[IB, ETH], &[ETH, ETH, IB]),
            vec![(0, 2), (1, 1), (1, 0)]
        );
        assert_eq!(pair_nics(&[ETH], &[IB]), vec![]);
        assert_eq!(pair_nics(&[], &[IB]), vec![]);
    }

    #[test]
    fn config_limits() {
        assert!(RdmaConfig::default().check().is_ok());
        let bad = [
            RdmaConfig {
                qps_per_nic: 0,
                ..Default::default()
            },
            RdmaConfig {
                slice_bytes: 0,
                ..Default::default()
            },
            RdmaConfig {
                slice_bytes: 2 << 30,
                ..Default::default()
            },
            RdmaConfig {
                max_outstanding: 0,
                ..Default::default()
            },
            RdmaConfig {
                max_notif: 0,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.check().is_err(), "{c:?}");
        }
    }
}
