//! The backend contract: what every transport implements, and what the agent gives it.
//!
//! A backend is chosen per transfer request by policy (see [`crate::Agent::create_xfer`]):
//! among the backends that both agents run, that registered every region involved, that reach
//! the peer, and that move the two memory kinds, the one with the best [`Locality`] and then the
//! best [`Caps::preference`] wins, unless the caller names one. Both come from the backends
//! themselves ([`Backend::caps`]): adding a backend changes no policy here.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result, Unusable};
use crate::mem::{Desc, MemKind};
use crate::metadata::RegionInfo;
use crate::region::{AccessDenied, Region, RegionAccess, RegionTable};
use crate::xfer::{Completion, XferOp};

/// The fixed names of the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum BackendName {
    /// Copies inside one process.
    Local = 0,
    /// Between processes on one node.
    Shm = 1,
    /// TCP between nodes.
    Tcp = 2,
    /// RDMA verbs.
    Rdma = 3,
    /// CUDA: VRAM, CUDA IPC, fabric handles.
    Cuda = 4,
    /// GPUDirect Storage.
    Gds = 5,
    /// io_uring files.
    Uring = 6,
    /// POSIX files.
    Posix = 7,
    /// S3-compatible object stores.
    Object = 8,
}

impl BackendName {
    /// All names, in wire order.
    pub const ALL: [BackendName; 9] = [
        BackendName::Local,
        BackendName::Shm,
        BackendName::Tcp,
        BackendName::Rdma,
        BackendName::Cuda,
        BackendName::Gds,
        BackendName::Uring,
        BackendName::Posix,
        BackendName::Object,
    ];

    /// The name as users write it.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendName::Local => "local",
            BackendName::Shm => "shm",
            BackendName::Tcp => "tcp",
            BackendName::Rdma => "rdma",
            BackendName::Cuda => "cuda",
            BackendName::Gds => "gds",
            BackendName::Uring => "uring",
            BackendName::Posix => "posix",
            BackendName::Object => "object",
        }
    }

    /// Parses a user-written name.
    pub fn parse(s: &str) -> Option<BackendName> {
        BackendName::ALL.into_iter().find(|b| b.as_str() == s)
    }

    /// Wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Name for a wire code.
    pub fn from_code(code: u8) -> Option<BackendName> {
        BackendName::ALL.get(usize::from(code)).copied()
    }
}

impl fmt::Display for BackendName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far a backend reaches; nearer is preferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Locality {
    /// Only agents in the same process.
    SameProcess,
    /// Agents on the same node.
    SameNode,
    /// Any node.
    AnyNode,
}

/// What a backend can do.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Kinds it moves on the initiator's side.
    pub local_kinds: &'static [MemKind],
    /// Kinds it moves on the target's side.
    pub remote_kinds: &'static [MemKind],
    /// Whether it carries notifications.
    pub notifications: bool,
    /// How far it reaches.
    pub locality: Locality,
    /// Tie-break among running backends of equal locality: lower is preferred. The built-in
    /// backends put direct device paths first, then shared memory, RDMA, io_uring, POSIX,
    /// object, TCP last: `local` 0, `cuda` 1, `gds` 2, `shm` 3, `rdma` 4, `uring` 5, `posix` 6,
    /// `object` 7, `tcp` 8.
    pub preference: u8,
}

impl Caps {
    /// A backend that moves `kinds` on both sides and carries notifications.
    pub const fn new(kinds: &'static [MemKind], locality: Locality, preference: u8) -> Caps {
        Caps {
            local_kinds: kinds,
            remote_kinds: kinds,
            notifications: true,
            locality,
            preference,
        }
    }

    /// The same, moving `kinds` on the target's side.
    pub const fn remote(self, kinds: &'static [MemKind]) -> Caps {
        Caps {
            remote_kinds: kinds,
            ..self
        }
    }

    /// The same, carrying no notifications.
    pub const fn without_notifications(self) -> Caps {
        Caps {
            notifications: false,
            ..self
        }
    }
}

/// What a peer published about itself, as given to [`Backend::connect`].
#[derive(Clone, Copy, Debug)]
pub struct PeerInfo<'a> {
    /// The peer's name.
    pub name: &'a str,
    /// The peer's instance id.
    pub instance_id: u128,
    /// The peer's connection info for this backend.
    pub conn_info: &'a [u8],
}

/// A region as one backend registered it: what [`Backend::deregister`] is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registered<'a> {
    /// Memory kind.
    pub kind: MemKind,
    /// Address range and device.
    pub desc: Desc,
    /// The region's access key.
    pub key: u64,
    /// What this backend's [`Backend::register`] returned for the region.
    pub public: &'a [u8],
}

/// One pair of descriptors of a transfer, resolved against both sides' registrations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Local range.
    pub local: Desc,
    /// Remote range.
    pub remote: Desc,
    /// Index into [`XferPlan::local_regions`].
    pub local_region: u32,
    /// Index into [`XferPlan::remote_regions`].
    pub remote_region: u32,
}

/// One piece of a request in compact form ([`Runs`]): `len` bytes at `local` and at `remote`.
/// Laid out as three `u64`s, like a backend's own copy descriptors, so a backend can map a
/// `Vec<Run>` into its own list in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Run {
    /// Local address.
    pub local: u64,
    /// Remote address.
    pub remote: u64,
    /// Bytes.
    pub len: u64,
}

/// The pieces of a request made from prepared lists whose descriptors all have one length and
/// one device and lie in one region on each side ([`Connection::prepare_runs`]): 24 bytes per
/// piece instead of a 56-byte [`Segment`]. Every run lies in `plan.local_regions[0]` and
/// `plan.remote_regions[0]` (the core checked it when the lists were prepared).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Runs {
    /// The pieces, contiguous runs merged, in the caller's order.
    pub runs: Vec<Run>,
    /// Device of every local piece.
    pub local_dev: u64,
    /// Device of every remote piece.
    pub remote_dev: u64,
}

impl Runs {
    /// The same pieces as segments (regions 0 and 0).
    pub fn to_segments(&self) -> Vec<Segment> {
        self.runs
            .iter()
            .map(|r| Segment {
                local: Desc::new(r.local, r.len, self.local_dev),
                remote: Desc::new(r.remote, r.len, self.remote_dev),
                local_region: 0,
                remote_region: 0,
            })
            .collect()
    }

    /// Total bytes.
    pub fn total_bytes(&self) -> u64 {
        self.runs
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.len))
    }
}

/// A validated transfer handed to a backend to prepare.
#[derive(Debug)]
pub struct XferPlan {
    /// READ (remote to local) or WRITE (local to remote).
    pub op: XferOp,
    /// Kind of the local list.
    pub local_kind: MemKind,
    /// Kind of the remote list.
    pub remote_kind: MemKind,
    /// The descriptor pairs, in the caller's order.
    pub segments: Vec<Segment>,
    /// The distinct local regions the segments fall in.
    pub local_regions: Vec<Arc<Region>>,
    /// The distinct remote regions (from the peer's metadata; key and public data included).
    pub remote_regions: Vec<RegionInfo>,
    /// Notification delivered to the target after the data has landed, on every post.
    pub notif: Option<Vec<u8>>,
    /// The initiating agent's name (the sender of notifications).
    pub initiator: Arc<str>,
}

impl XferPlan {
    /// Total bytes moved per post.
    pub fn total_bytes(&self) -> u64 {
        self.segments
            .iter()
            .fold(0u64, |acc, s| acc.saturating_add(s.local.len))
    }
}

/// A backend: one way of moving bytes.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Its fixed name.
    fn name(&self) -> BackendName;
    /// What it can do.
    fn caps(&self) -> Caps;
    /// `Err(why)` if it cannot run on this host.
    fn probe(&self) -> std::result::Result<(), Unusable>;
    /// Called once, before anything else, with the agent's target-side hooks.
    fn start(&self, target: TargetHandle) -> Result<()>;
    /// Connection info published in the agent's metadata.
    fn conn_info(&self) -> Vec<u8>;
    /// Registers a region; returns the public per-region data published in metadata.
    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>>;
    /// Forgets a region this backend registered (after the core has drained its users, or when
    /// the registration failed at another backend).
    fn deregister(&self, region: Registered<'_>);
    /// `Err(why)` if this backend cannot reach a peer with this connection info.
    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), Unusable>;
    /// Connects to a peer.
    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>>;
    /// Stops: in-flight work ends `Cancelled`, threads exit.
    fn shutdown(&self);
    /// Its copier between its device memory and host memory, if it has one: requests from that
    /// memory that no backend carries directly are then staged (see [`crate::staging`]).
    fn stager(&self) -> Option<Arc<dyn crate::staging::Stager>> {
        None
    }
    /// Whether nothing that `peer` asked of this agent's memory through this backend is being
    /// carried out, or was received and waits to be, right now (a listener that serves a peer's
    /// READs reads this agent's memory on the peer's behalf). Backends whose peers touch this
    /// agent's memory only themselves (shared memory, one-sided RDMA) answer true: for them the
    /// peer's own completion is final.
    fn peer_idle(&self, _peer: &str) -> bool {
        true
    }
    /// Ends everything this backend carries out of this agent's memory on `peer`'s behalf now
    /// (for a listener: drops the peer's connections, so the requests it was serving or had
    /// received fail there), and waits up to `wait` for it to have stopped touching the memory;
    /// returns whether it has. Afterwards [`Backend::peer_idle`] no longer counts what was
    /// fenced; the peer may connect again, and what it asks then is served as usual. Backends
    /// that [`Backend::peer_idle`] answers true for have nothing to fence and return true.
    fn fence_peer(&self, _peer: &str, _wait: Duration) -> bool {
        true
    }
}

/// A backend's connection to one peer.
pub trait Connection: Send + Sync + fmt::Debug {
    /// Prepares a transfer; the result is posted any number of times.
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>>;
    /// Prepares a transfer given as [`Runs`] (`plan.segments` is empty; one region per side).
    /// By default the runs become segments for [`Connection::prepare`]; a backend that copies
    /// by address (`shm`'s mapped path) builds its copy list from the runs directly, which
    /// spares writing and reading a 56-byte segment per piece of a 100k-piece request.
    fn prepare_runs(&self, mut plan: XferPlan, runs: Runs) -> Result<Box<dyn PreparedXfer>> {
        plan.segments = runs.to_segments();
        self.prepare(plan)
    }
    /// Sends a standalone notification.
    fn send_notif(&self, from: &str, msg: &[u8]) -> Result<()>;
    /// Sends a standalone notification without waiting for the peer to take it (a refusal or
    /// a failure after the call is only logged). By default the same as
    /// [`Connection::send_notif`]; a backend whose acknowledgement can queue behind data (`tcp`)
    /// returns once the message is queued.
    fn post_notif(&self, from: &str, msg: &[u8]) -> Result<()> {
        self.send_notif(from, msg)
    }
    /// Closes the connection (the peer was invalidated): its transfers fail from now on.
    fn close(&self);
}

/// A prepared transfer.
pub trait PreparedXfer: Send + Sync + fmt::Debug {
    /// Starts one execution. The backend ends it by calling [`Completion::complete`] exactly once,
    /// inline or later from any thread (dropping the completion counts as a failure).
    fn post(&self, done: Completion);
    /// Asks the backend to stop the current execution early (best effort; the request is
    /// already marked cancelled or timed out).
    fn cancel(&self) {}
}

/// Largest notification, on every backend: [`crate::Agent::create_xfer`] and
/// [`crate::Agent::send_notif`] refuse a longer one with [`Error::InvalidArgument`], and a
/// backend's receiver accepts at least this much, so a notification is never dropped for its size
/// on the way (backends with a smaller configured limit, such as `rdma`'s `max_notif`, refuse
/// longer ones when the request is made).
pub const MAX_NOTIF_BYTES: usize = 1 << 20;

/// A notification received by an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// Name of the agent that sent it.
    pub from: String,
    /// The bytes.
    pub msg: Vec<u8>,
}

/// Most notifications queued before new ones are refused (and counted).
pub const MAX_QUEUED_NOTIFS: usize = 1 << 20;

/// Default byte budget of an agent's queue of notifications not yet taken
/// ([`crate::AgentBuilder::notif_queue_bytes`]).
pub const DEFAULT_NOTIF_QUEUE_BYTES: usize = 64 << 20;

/// Bytes a queued notification costs besides its message and its sender's name.
const NOTIF_OVERHEAD: usize = 64;

/// A notification the target's queue has no room for: its owner takes notifications more
/// slowly than peers send them. Backends answer the sender with it where their wire can.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifRefused {
    /// The receiving agent.
    pub agent: String,
    /// Bytes of the refused notification.
    pub bytes: usize,
    /// Bytes queued (messages, names and per-notification overhead).
    pub queued_bytes: usize,
    /// Notifications queued.
    pub queued: usize,
    /// The queue's byte budget.
    pub budget: usize,
}

impl fmt::Display for NotifRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "notification of {} bytes refused: agent '{}' has {} notifications ({} bytes) not \
             yet taken, its budget is {} notifications or {} bytes; it takes them too slowly",
            self.bytes, self.agent, self.queued, self.queued_bytes, MAX_QUEUED_NOTIFS, self.budget
        )
    }
}

impl std::error::Error for NotifRefused {}

#[derive(Debug, Default)]
struct NotifQueue {
    q: VecDeque<Notification>,
    /// What the queued notifications cost against the budget.
    bytes: usize,
}

/// What an agent lends its backends so they can serve its metadata on their own listeners.
pub(crate) trait MetadataHooks: Send + Sync {
    /// The agent's full metadata, encoded.
    fn metadata(&self) -> Vec<u8>;
    /// Loads a peer's metadata, as [`crate::Agent::load_remote`] does.
    fn load(&self, bytes: &[u8]) -> Result<String>;
    /// Forgets the peer `name` at a request the peer made itself (see
    /// [`TargetHandle::drop_pushed`]).
    fn forget(&self, name: &str, instance: u128) -> Result<bool>;
}

pub(crate) struct TargetShared {
    pub(crate) name: Arc<str>,
    pub(crate) instance_id: u128,
    pub(crate) regions: RegionTable,
    notifs: Mutex<NotifQueue>,
    notif_budget: usize,
    notif_cv: Condvar,
    pub(crate) hooks: OnceLock<Weak<dyn MetadataHooks>>,
}

impl fmt::Debug for TargetShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetShared")
            .field("name", &self.name)
            .field("instance_id", &self.instance_id)
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

/// The target side of an agent, as its backends see it: the owner-side access check and the
/// notification queue.
#[derive(Clone, Debug)]
pub struct TargetHandle(pub(crate) Arc<TargetShared>);

impl TargetHandle {
    pub(crate) fn new(name: Arc<str>, instance_id: u128, notif_budget: usize) -> TargetHandle {
        TargetHandle(Arc::new(TargetShared {
            name,
            instance_id,
            regions: RegionTable::default(),
            notifs: Mutex::new(NotifQueue::default()),
            notif_budget,
            notif_cv: Condvar::new(),
            hooks: OnceLock::new(),
        }))
    }

    fn hooks(&self) -> Result<Arc<dyn MetadataHooks>> {
        self.0
            .hooks
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| Error::Shutdown(self.0.name.to_string()))
    }

    /// The agent's current full metadata, encoded, for a backend that serves it to peers
    /// (`Err(Shutdown)` while the agent is starting or after it is gone).
    pub fn local_metadata(&self) -> Result<Vec<u8>> {
        Ok(self.hooks()?.metadata())
    }

    /// Loads metadata that a peer pushed to this agent (as [`crate::Agent::load_remote`] does);
    /// returns the peer's name.
    pub fn load_pushed(&self, bytes: &[u8]) -> Result<String> {
        self.hooks()?.load(bytes)
    }

    /// Forgets the peer `name` (as [`crate::Agent::invalidate_remote`] does) at the request of
    /// that peer itself, instance `instance` as its connection proved it: `Ok(false)` when no
    /// metadata of `name` is loaded, `Err(Denied)` when the loaded metadata is of another
    /// instance (a stale process may not drop its successor's).
    pub fn drop_pushed(&self, name: &str, instance: u128) -> Result<bool> {
        self.hooks()?.forget(name, instance)
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The agent's name, shared.
    pub fn name_arc(&self) -> Arc<str> {
        Arc::clone(&self.0.name)
    }

    /// The agent's instance id.
    pub fn instance_id(&self) -> u128 {
        self.0.instance_id
    }

    /// Checks a peer's access to `desc` of `kind` with `key`; holds the region until the access
    /// is dropped.
    pub fn check(
        &self,
        kind: MemKind,
        desc: &Desc,
        key: u64,
    ) -> std::result::Result<RegionAccess, AccessDenied> {
        self.0.regions.check(kind, desc, key)
    }

    /// Delivers a notification to this agent, or refuses it (counted, and logged at most once
    /// a second) when the queue of notifications not yet taken is over its count or byte budget:
    /// a sender then learns it from the backend instead of the agent's memory growing.
    pub fn deliver(&self, from: &str, msg: Vec<u8>) -> std::result::Result<(), NotifRefused> {
        let cost = msg.len() + from.len() + NOTIF_OVERHEAD;
        let mut q = self.0.notifs.lock();
        if q.q.len() >= MAX_QUEUED_NOTIFS || q.bytes.saturating_add(cost) > self.0.notif_budget {
            let refused = NotifRefused {
                agent: self.0.name.to_string(),
                bytes: msg.len(),
                queued_bytes: q.bytes,
                queued: q.q.len(),
                budget: self.0.notif_budget,
            };
            drop(q);
            metrics::counter!("nixl_notifs_dropped_total").increment(1);
            static LAST: Mutex<Option<Instant>> = Mutex::new(None);
            let mut last = LAST.lock();
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                *last = Some(Instant::now());
                tracing::warn!(agent = %self.0.name, from, "{refused}");
            }
            return Err(refused);
        }
        q.bytes += cost;
        q.q.push_back(Notification {
            from: from.to_owned(),
            msg,
        });
        drop(q);
        metrics::counter!("nixl_notifs_received_total").increment(1);
        self.0.notif_cv.notify_all();
        Ok(())
    }

    pub(crate) fn take_notifs(&self) -> Vec<Notification> {
        let mut q = self.0.notifs.lock();
        q.bytes = 0;
        q.q.drain(..).collect()
    }

    pub(crate) fn wait_notifs(&self, timeout: Duration) -> Vec<Notification> {
        let deadline = Instant::now() + timeout;
        let mut q = self.0.notifs.lock();
        while q.q.is_empty() {
            if self.0.notif_cv.wait_until(&mut q, deadline).timed_out() {
                break;
            }
        }
        q.bytes = 0;
        q.q.drain(..).collect()
    }
}
