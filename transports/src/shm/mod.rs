//! The `shm` backend: transfers between agent processes on one node.
//!
//! # Three paths
//!
//! - **Granted cross-memory copies** (the default for memory allocated any way: engines own
//!   their buffers, numpy, torch). The first time an initiator uses one of the target's regions
//!   it asks the target for a *grant* on it (GrantReq, one round trip per region and
//!   connection). The target checks the request as it would check an Op (the region exists,
//!   the key matches, the range is exactly the registered region) and answers with a slot in
//!   a *grant table* it lends the initiator (a sealed memfd, one per connection, mapped by
//!   both). From then on the initiator copies itself with `process_vm_writev` (WRITE) or
//!   `process_vm_readv` (READ) against the target's pid, with no message and no wake-up of
//!   the target per post; the notification, if any, is sent on the socket after the copy has
//!   returned, so it arrives after the data.
//! - **Round-trip cross-memory copies** (fallback: grants disabled by `cma_grants = false` on
//!   either side, the target's grant table full, no pidfd). The initiator sends one Op frame;
//!   the *target* checks every descriptor against its registrations, copies with
//!   `process_vm_readv`/`writev` against the initiator's pid, delivers the notification after
//!   the data has landed, and answers Done.
//! - **Mapped copies** for memory from [`ShmBuffer`] (a memfd). Its registration says it may be
//!   mapped; the initiator asks the target once, presenting the region's key, receives the memfd
//!   over the socket (SCM_RIGHTS), maps it, and then copies with plain loads and stores in its
//!   own process, at memory bandwidth, with no round trip per transfer. When the target
//!   deregisters the region it revokes the mapping from every peer and waits (bounded) for the
//!   acknowledgements, so a deregistered buffer is not written afterwards.
//!
//! # The grant model
//!
//! What a grant proves, once: the target's pid (the socket's `SO_PEERCRED` equals the pid in
//! its metadata, and a pidfd is taken on it right then), and the bounds and key of the region
//! (checked by the target, which answers only for a region it holds registered with that key,
//! and only for the whole region). What the initiator then enforces on every transfer: each
//! remote range lies inside the region its grant covers (checked when the transfer is
//! prepared), and the grant is still live (checked at every post).
//!
//! Revocation. Slot *i* of the table holds `live` (the grant's generation, or 0 once revoked;
//! written by the target only) and `inflight` (copies under way; written by the initiator
//! only). A post does `inflight += 1`, then reads `live`: if it is not its generation, it backs
//! off and fails `Denied`. After the copy it does `inflight -= 1`. Deregistration removes the
//! region from the table (no new grant or Op), drains the accesses in progress, then for each
//! grant stores `live = 0` and waits until `inflight` is 0 (or the initiator process has
//! exited, seen on a pidfd; at most 60 s, as the agent waits for its own transfers holding a
//! region). When a connection ends (the initiator closes its side on invalidation, possibly
//! with a copy still under way), every grant on it is revoked and drained the same way before
//! it is forgotten. All four accesses are sequentially consistent (Dekker's
//! pattern): either the post sees `live = 0`, or the target sees its count and waits for the
//! copy to end. So once deregistration returns, no granted copy touches the region. A slot
//! whose count does not drain in time is logged and never reused. A granted copy that was
//! posted before the revocation and is in flight may still complete; that is the same as an
//! Op the target was carrying out.
//!
//! What a grant does not add: `process_vm_*` needs ptrace permission, which every agent of the
//! same uid already has on every other (same uid, and `PR_SET_PTRACER_ANY` under Yama). A peer
//! running hostile code as our uid could therefore write anywhere in us with or without this
//! backend; the checks above stop a peer that runs this library from touching anything but the
//! regions the owner registered, with their keys, while they are registered — the same
//! guarantee the round-trip path gives. The grant table is per connection, so a peer writing
//! garbage into it confuses only its own grants; the target never trusts anything in it but
//! the in-flight count, and only to wait (bounded). The target's pid: a post checks the pidfd
//! before copying and fails `RemoteDisconnect` once the target has exited (also on `ESRCH`);
//! the pid cannot be reused before the exited target is reaped, which leaves only a window of
//! microseconds between that check and the copy.
//!
//! # Security and faults
//!
//! Both ends check `SO_PEERCRED`: the peer runs as our uid and is the process its metadata names.
//! Every frame is length-bounded and decoded without trusting it; a bad frame drops that
//! connection only. A target that dies closes the socket, and every transfer pending on it ends
//! `Failed(remote disconnect)` at once; a target that is alive but stuck fails them after
//! `op_timeout` plus a size allowance (a granted copy does not wait for the target at all).
//! `process_vm_*` needs ptrace permission on the peer: on
//! hosts with Yama `ptrace_scope = 1` the backend calls `prctl(PR_SET_PTRACER, ANY)` at start, and
//! an EPERM is reported with that explanation.

mod buffer;
mod sys;
#[doc(hidden)] // for the fuzz targets (fuzz/): the frames a peer sends on the socket
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

pub use buffer::ShmBuffer;
use nixl_core::codec::Reader;
use nixl_core::region::{enter_all, leave_all, AccessGate, Ticket};
use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, RegionAccess, Result, Runs, TargetHandle, XferOp, XferPlan,
};
use parking_lot::{Condvar, Mutex};
use sys::{Cma, Span};
use wire::{Frame, Framer, Status, WireSeg};

use crate::copy::{CopyOp, CopyPlan, CopyPool, INLINE_MAX};
use crate::owner::{Clients, Peers};

/// Settings of the `shm` backend.
#[derive(Clone, Debug)]
pub struct ShmConfig {
    /// Where the agent's Unix socket lives: created with mode 0700; an existing directory must
    /// be ours and writable by nobody else (see `unix::secure_socket_dir`).
    pub socket_dir: PathBuf,
    /// How long an initiator waits for a stuck (alive) target, plus 1 s per 500 MB moved.
    pub op_timeout: Duration,
    /// Threads a target uses for one big cross-memory copy.
    pub copy_threads: usize,
    /// Whether this agent maps peers' memfd buffers when they allow it.
    pub allow_map: bool,
    /// How long deregistration waits for peers to give up a mapping or a grant.
    pub revoke_timeout: Duration,
    /// Cross-memory grants: as initiator, ask targets for a grant per region and copy with
    /// `process_vm_*` ourselves; as target, give grants. Off: every cross-memory transfer is a
    /// round trip on the socket (the target copies).
    pub cma_grants: bool,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            socket_dir: crate::unix::default_socket_dir(),
            op_timeout: Duration::from_secs(5),
            copy_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .min(8),
            allow_map: true,
            revoke_timeout: Duration::from_secs(2),
            cma_grants: true,
        }
    }
}

/// The `shm` backend.
#[derive(Debug)]
pub struct ShmBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: ShmConfig,
    target: OnceLock<TargetHandle>,
    path: OnceLock<PathBuf>,
    shut: AtomicBool,
    /// Connections peers opened to us, and which mapped which region (by key).
    peers: Peers<u64>,
    /// Connections we opened to peers.
    clients: Clients<Conn>,
    /// Connection -> the grant table we gave it.
    grant_tables: Mutex<HashMap<u64, TableSlots>>,
    /// Region key -> the cross-memory grants given on it: (connection, slot).
    cma_grants: Mutex<HashMap<u64, Vec<(u64, u32)>>>,
}

impl ShmBackend {
    /// A backend with these settings (it binds its socket when its agent starts it).
    pub fn new(cfg: ShmConfig) -> ShmBackend {
        ShmBackend {
            inner: Arc::new(Inner {
                cfg,
                target: OnceLock::new(),
                path: OnceLock::new(),
                shut: AtomicBool::new(false),
                peers: Peers::default(),
                clients: Clients::default(),
                grant_tables: Mutex::new(HashMap::new()),
                cma_grants: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Drop for ShmBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What a peer publishes: enough to tell whether we share a node, pid namespace and uid.
#[derive(Debug, PartialEq, Eq)]
struct ConnInfo {
    boot_id: String,
    pid_ns: u64,
    pid: u32,
    uid: u32,
    path: String,
}

impl ConnInfo {
    fn ours(path: &str) -> ConnInfo {
        ConnInfo {
            boot_id: sys::boot_id(),
            pid_ns: sys::pid_ns(),
            pid: std::process::id(),
            uid: sys::uid(),
            path: path.to_owned(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.path.len());
        for s in [&self.boot_id, &self.path] {
            v.extend_from_slice(&(s.len() as u16).to_le_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        v.extend_from_slice(&self.pid_ns.to_le_bytes());
        v.extend_from_slice(&self.pid.to_le_bytes());
        v.extend_from_slice(&self.uid.to_le_bytes());
        v
    }

    fn decode(b: &[u8]) -> std::result::Result<ConnInfo, String> {
        let mut r = Reader::new(b);
        let e = |e: nixl_core::DecodeError| format!("bad shm connection info: {e}");
        let boot_id = r.str("boot id", 64).map_err(e)?;
        let path = r.str("socket path", 4096).map_err(e)?;
        let info = ConnInfo {
            boot_id,
            path,
            pid_ns: r.u64("pid namespace").map_err(e)?,
            pid: r.u32("pid").map_err(e)?,
            uid: r.u32("uid").map_err(e)?,
        };
        if !r.is_empty() {
            return Err("bad shm connection info: trailing bytes".into());
        }
        Ok(info)
    }
}

// Per-region public data: 0 = cross-memory attach only; 1 = mappable (+ buffer start, id).
const NOT_MAPPABLE: u8 = 0;
const MAPPABLE: u8 = 1;

fn parse_public(p: &[u8]) -> Option<(u64, u64)> {
    let mut r = Reader::new(p);
    (r.u8("flag").ok()? == MAPPABLE).then_some(())?;
    Some((r.u64("start").ok()?, r.u64("id").ok()?))
}

const DRAM: &[MemKind] = &[MemKind::Dram];

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

impl Backend for ShmBackend {
    fn name(&self) -> BackendName {
        BackendName::Shm
    }

    fn caps(&self) -> Caps {
        Caps {
            local_kinds: DRAM,
            remote_kinds: DRAM,
            notifications: true,
            locality: Locality::SameNode,
        }
    }

    fn probe(&self) -> std::result::Result<(), String> {
        sys::probe_cma().map_err(|e| {
            format!(
                "process_vm_readv does not work here ({e}); seccomp or a container may block it"
            )
        })
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        sys::allow_any_ptracer();
        let dir = &self.inner.cfg.socket_dir;
        let path = dir.join(format!(
            "{}-{:032x}.sock",
            sanitize(target.name()),
            target.instance_id()
        ));
        let listener = crate::owner::bind(dir, &path, "shm")?;
        let _ = self.inner.target.set(target);
        let _ = self.inner.path.set(path);
        let (inner, inner2) = (Arc::clone(&self.inner), Arc::clone(&self.inner));
        crate::owner::spawn_accept(
            listener,
            "shm",
            "nixl-shm-accept",
            "nixl-shm-serve",
            move || inner.shut.load(Ordering::Acquire),
            move |stream| serve(&inner2, stream),
        )?;
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        let path = self
            .inner
            .path
            .get()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        ConnInfo::ours(&path).encode()
    }

    fn register(&self, _kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        Ok(match buffer::find(desc) {
            Some((start, _, _, id)) => {
                let mut v = vec![MAPPABLE];
                v.extend_from_slice(&start.to_le_bytes());
                v.extend_from_slice(&id.to_le_bytes());
                v
            }
            None => vec![NOT_MAPPABLE],
        })
    }

    fn deregister(&self, region: &Region) {
        let mappable = region
            .backend_public(BackendName::Shm)
            .and_then(parse_public)
            .is_some();
        if mappable {
            self.inner.revoke(region.key);
        }
        self.inner.revoke_grants(region.key);
    }

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), String> {
        let peer = ConnInfo::decode(conn_info)?;
        let ours = ConnInfo::ours("");
        if peer.boot_id != ours.boot_id {
            Err("peer is on another node (boot id differs)".into())
        } else if peer.pid_ns != ours.pid_ns {
            Err("peer is in another pid namespace".into())
        } else if peer.uid != ours.uid {
            Err(format!("peer runs as uid {}, we as {}", peer.uid, ours.uid))
        } else {
            Ok(())
        }
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let info = ConnInfo::decode(peer.conn_info).map_err(|reason| Error::Backend {
            backend: BackendName::Shm,
            op: "connect",
            reason,
        })?;
        let conn = Conn::open(&self.inner, peer.name, &info)?;
        self.inner.clients.add(&conn);
        Ok(conn)
    }

    fn shutdown(&self) {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        for c in self.inner.clients.drain() {
            c.end_all_early(&Error::Cancelled);
            c.mark_closed("agent shut down");
        }
        self.inner.peers.close_all();
        if let Some(p) = self.inner.path.get() {
            let _ = std::fs::remove_file(p);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Target side.

fn send(w: &Mutex<UnixStream>, f: &Frame) -> io::Result<()> {
    let bytes = f.encode();
    w.lock().write_all(&bytes)
}

/// Serves one connection a peer opened to us, until it closes.
fn serve(inner: &Arc<Inner>, stream: UnixStream) -> io::Result<()> {
    let cred_pid = crate::owner::admit(&stream)?;
    let target = inner
        .target
        .get()
        .cloned()
        .ok_or_else(|| io::Error::other("not started"))?;
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let id = inner.peers.join(Arc::clone(&writer));
    let result = serve_frames(inner, &target, &stream, &writer, id, cred_pid);
    inner.peers.leave(id);
    inner.end_grants(id);
    result
}

fn serve_frames(
    inner: &Arc<Inner>,
    target: &TargetHandle,
    stream: &UnixStream,
    writer: &Mutex<UnixStream>,
    conn_id: u64,
    cred_pid: i32,
) -> io::Result<()> {
    let mut framer = Framer::default();
    let mut peer: Option<(Arc<str>, i32)> = None;
    let bad = |e: nixl_core::DecodeError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    loop {
        let body = loop {
            if let Some(b) = framer.next_frame().map_err(bad)? {
                break b;
            }
            let spare = framer.spare(64 << 10);
            let n = (&*stream).read(spare)?;
            framer.commit(64 << 10, n);
            if n == 0 {
                return Ok(());
            }
        };
        let frame = Frame::decode(&body).map_err(bad)?;
        let (who, frame) = match (&peer, frame) {
            (None, Frame::Hello { name, pid, .. }) => {
                if pid as i32 != cred_pid {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("hello says pid {pid}, socket says {cred_pid}"),
                    ));
                }
                peer = Some((Arc::from(name), cred_pid));
                continue;
            }
            (None, _) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "no hello"));
            }
            (Some(p), f) => (p.clone(), f),
        };
        let (peer_name, peer_pid) = who;
        match frame {
            Frame::Op {
                id,
                write,
                notif,
                segs,
            } => {
                let (mut status, mut text) = carry_out(inner, target, peer_pid, write, &segs);
                if status == Status::Ok {
                    if let Some(msg) = notif {
                        if let Err(refused) = target.deliver(&peer_name, msg) {
                            (status, text) = (Status::Denied, refused.to_string());
                        }
                    }
                }
                send(writer, &Frame::Done { id, status, text })?;
            }
            Frame::Notif { msg } => {
                // Standalone notifications have no answer on this wire: a refusal (queue over
                // its budget) is counted and logged by `deliver`.
                let _ = target.deliver(&peer_name, msg);
            }
            Frame::MapReq { id, addr, len, key } => {
                let reply = grant_map(inner, target, writer, conn_id, id, addr, len, key);
                if let Some(f) = reply {
                    send(writer, &f)?;
                }
            }
            Frame::RevokeAck { key } => {
                inner.peers.acked(conn_id, key);
            }
            Frame::GrantReq { id, addr, len, key } => {
                let peer = (conn_id, peer_pid);
                grant_cma(inner, target, writer, peer, id, addr, len, key)?;
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected frame {other:?}"),
                ));
            }
        }
    }
}

/// Checks and performs one Op as the owner of the memory.
fn carry_out(
    inner: &Inner,
    target: &TargetHandle,
    peer_pid: i32,
    write: bool,
    segs: &[WireSeg],
) -> (Status, String) {
    // Owner-side check of every descriptor; the held regions cannot be deregistered until the
    // copy is over.
    let mut held: Vec<RegionAccess> = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let d = Desc::new(s.target, s.len, 0);
        if s.len == 0 || d.end().is_none() {
            return (
                Status::Denied,
                format!("descriptor {i}: empty or wrapping range"),
            );
        }
        if held
            .last()
            .is_some_and(|h| h.region().desc.contains(&d) && h.region().key == s.key)
        {
            continue;
        }
        match target.check(MemKind::Dram, &d, s.key) {
            Ok(a) => held.push(a),
            Err(denied) => {
                metrics::counter!("nixl_access_denied_total", "backend" => "shm").increment(1);
                return (
                    Status::Denied,
                    format!("descriptor {i} ({:#x}+{}): {denied}", s.target, s.len),
                );
            }
        }
    }
    let ours: Vec<Span> = segs
        .iter()
        .map(|s| Span {
            addr: s.target,
            len: s.len,
        })
        .collect();
    let theirs: Vec<Span> = segs
        .iter()
        .map(|s| Span {
            addr: s.init,
            len: s.len,
        })
        .collect();
    let dir = if write { Cma::Pull } else { Cma::Push };
    let total: u64 = segs.iter().map(|s| s.len).sum();
    // SAFETY: every span of `ours` was checked against a registration held in `held` (live
    // memory of ours) until after the copy.
    let result = unsafe { copy_split(peer_pid, dir, &ours, &theirs, inner.cfg.copy_threads) };
    drop(held);
    match result {
        Ok(n) if n == total => (Status::Ok, String::new()),
        Ok(n) => (Status::Failed, format!("moved {n} of {total} bytes")),
        Err(e) => (Status::Failed, cma_failure(&e, peer_pid, dir)),
    }
}

/// Explains a failed `process_vm_*` call on `pid`.
fn cma_failure(e: &io::Error, pid: i32, dir: Cma) -> String {
    if e.raw_os_error() == Some(libc::EPERM) {
        format!(
            "process_vm_{} on pid {pid}: {e} (ptrace permission: same uid needed, and Yama \
             ptrace_scope <= 1 with PR_SET_PTRACER, or CAP_SYS_PTRACE)",
            if dir == Cma::Pull { "readv" } else { "writev" }
        )
    } else {
        format!("cross-memory copy with pid {pid}: {e}")
    }
}

/// Cross-memory copies from this many bytes are split over the copy pool's workers (see
/// [`copy_split`]).
const SPLIT_MIN: u64 = 8 << 20;
/// A split copy is cut into pieces that its threads take in turn: about four per thread, and
/// at least this big.
const SPLIT_PIECE_MIN: u64 = 1 << 20;

/// Cross-memory copy of `ours` with `theirs` in process `pid`, split over up to `threads`
/// threads when it is big: the calling thread and parked workers of the copy pool (no thread is
/// started per copy). The copy is cut into pieces (about four per thread, at least
/// [`SPLIT_PIECE_MIN`]) that each thread takes in turn, so a worker that starts late (a busy
/// host) takes fewer and the caller never waits for more than the piece a worker is copying.
/// Returns the bytes moved.
///
/// # Safety
/// As [`sys::cross_copy`]: every span of `ours` stays valid for the whole call.
unsafe fn copy_split(
    pid: i32,
    dir: Cma,
    ours: &[Span],
    theirs: &[Span],
    threads: usize,
) -> io::Result<u64> {
    let total: u64 = ours.iter().map(|s| s.len).sum();
    let pool = CopyPool::global();
    let threads = threads.min(pool.workers() + 1).max(1);
    if total < SPLIT_MIN || threads == 1 {
        // SAFETY: forwarded contract.
        return unsafe { sys::cross_copy(pid, dir, ours, theirs) };
    }
    let piece = total.div_ceil(threads as u64 * 4).max(SPLIT_PIECE_MIN);
    let pieces = split_spans(ours, theirs, total.div_ceil(piece) as usize);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let take = || -> io::Result<u64> {
        let mut moved = 0;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((o, t)) = pieces.get(i) else {
                return Ok(moved);
            };
            // SAFETY: forwarded contract; `join` returns only once every part has ended.
            match unsafe { sys::cross_copy(pid, dir, o, t) } {
                Ok(n) => moved += n,
                Err(e) => {
                    // The others stop at their next piece.
                    next.store(pieces.len(), Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    };
    let parts = (0..threads)
        .map(|_| Box::new(&take) as Box<dyn FnOnce() -> io::Result<u64> + Send + '_>)
        .collect();
    pool.join(parts).into_iter().try_fold(0u64, |acc, r| {
        let n = r.unwrap_or_else(|_| Err(io::Error::other("copy part panicked")))?;
        Ok(acc + n)
    })
}

/// Cuts paired span lists (equal lengths pairwise) into `n` parts of about equal bytes.
fn split_spans(ours: &[Span], theirs: &[Span], n: usize) -> Vec<(Vec<Span>, Vec<Span>)> {
    let total: u64 = ours.iter().map(|s| s.len).sum();
    let per = total.div_ceil(n as u64).max(1);
    let mut parts = Vec::with_capacity(n);
    let (mut o, mut t) = (Vec::new(), Vec::new());
    let mut in_part = 0u64;
    for (a, b) in ours.iter().zip(theirs) {
        let mut off = 0;
        while off < a.len {
            let take = (a.len - off).min(per - in_part);
            o.push(Span {
                addr: a.addr + off,
                len: take,
            });
            t.push(Span {
                addr: b.addr + off,
                len: take,
            });
            off += take;
            in_part += take;
            if in_part == per {
                parts.push((std::mem::take(&mut o), std::mem::take(&mut t)));
                in_part = 0;
            }
        }
    }
    if !o.is_empty() {
        parts.push((o, t));
    }
    parts
}

#[allow(clippy::too_many_arguments)]
fn grant_map(
    inner: &Inner,
    target: &TargetHandle,
    writer: &Mutex<UnixStream>,
    conn_id: u64,
    id: u64,
    addr: u64,
    len: u64,
    key: u64,
) -> Option<Frame> {
    let refuse = |status, text: String| {
        Some(Frame::MapReply {
            id,
            status,
            buf_len: 0,
            offset: 0,
            text,
        })
    };
    let d = Desc::new(addr, len, 0);
    if len == 0 || d.end().is_none() {
        return refuse(Status::Denied, "empty or wrapping region".into());
    }
    let access = match target.check(MemKind::Dram, &d, key) {
        Ok(a) => a,
        Err(denied) => return refuse(Status::Denied, denied.to_string()),
    };
    let Some((start, id_buf)) = access
        .region()
        .backend_public(BackendName::Shm)
        .and_then(parse_public)
    else {
        return refuse(Status::Denied, "region is not mappable".into());
    };
    // Send while the buffer registry is locked, so the fd cannot be closed under us.
    let sent = buffer::with_fd(start, id_buf, |fd, buf_len| {
        let reply = Frame::MapReply {
            id,
            status: Status::Ok,
            buf_len,
            offset: addr - start,
            text: String::new(),
        };
        let w = writer.lock();
        sys::send_with_fd(&w, &reply.encode(), fd)
    });
    match sent {
        None => refuse(Status::Failed, "buffer was freed".into()),
        Some(Err(e)) => {
            tracing::debug!(error = %e, "shm: sending a mapping failed");
            None
        }
        Some(Ok(())) => {
            inner.peers.record(conn_id, key);
            None
        }
    }
}

impl Inner {
    /// Revokes every peer's mapping of the region with `key` and waits (bounded) for them.
    fn revoke(&self, key: u64) {
        let report = self.peers.revoke(
            key,
            |_, w| {
                let _ = send(w, &Frame::Revoke { key });
            },
            Instant::now() + self.cfg.revoke_timeout,
            || self.shut.load(Ordering::Acquire),
        );
        if report.late > 0 {
            tracing::warn!(
                key,
                peers = report.late,
                "shm: peers did not give up a mapping of a deregistered region in time"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-memory grants (both sides).

/// Slots in a connection's grant table.
const GRANT_SLOTS: usize = 4096;
/// Bytes per slot: the live generation word, then the in-flight counter.
const SLOT_BYTES: usize = 16;
/// Size of a grant table.
const TABLE_BYTES: usize = GRANT_SLOTS * SLOT_BYTES;
/// How long deregistration waits for a peer's granted copy in flight (as long as the agent
/// waits for its own transfers holding a region).
const GRANT_DRAIN_PATIENCE: Duration = Duration::from_secs(60);

/// A connection's grant table: a sealed memfd the target creates and maps, and lends to the
/// one initiator of that connection, which maps it too. Slot `i` holds two words: `live`, the
/// generation of the grant in it (0: revoked, written by the target only), and `inflight`, the
/// initiator's copies under way on it (written by the initiator only).
#[derive(Debug)]
struct GrantTable {
    base: *mut u8,
    /// The memfd, kept by the target to lend it.
    fd: Option<OwnedFd>,
}

// SAFETY: the table is shared memory accessed only through atomics.
unsafe impl Send for GrantTable {}
// SAFETY: as above.
unsafe impl Sync for GrantTable {}

impl GrantTable {
    /// A fresh table (target side).
    fn create() -> io::Result<GrantTable> {
        let fd = sys::memfd(TABLE_BYTES, false)?;
        let base = sys::map_shared(fd.as_raw_fd(), TABLE_BYTES, true)?;
        Ok(GrantTable { base, fd: Some(fd) })
    }

    /// Maps a table a target lent us (initiator side): a memfd sealed against shrinking and
    /// growing, of the right size, or nothing is mapped.
    fn adopt(fd: &OwnedFd) -> std::result::Result<GrantTable, String> {
        sys::check_sealed(fd.as_raw_fd())?;
        let size = sys::fd_size(fd.as_raw_fd()).map_err(|e| e.to_string())?;
        if size != TABLE_BYTES as u64 {
            return Err(format!(
                "peer's grant table is {size} bytes, not {TABLE_BYTES}"
            ));
        }
        let base = sys::map_shared(fd.as_raw_fd(), TABLE_BYTES, true).map_err(|e| e.to_string())?;
        Ok(GrantTable { base, fd: None })
    }

    fn word(&self, slot: u32, which: usize) -> &AtomicU64 {
        let i = (slot as usize).min(GRANT_SLOTS - 1) * SLOT_BYTES + which * 8;
        // SAFETY: `i + 8 <= TABLE_BYTES` (slot clamped), the mapping is page-aligned so the word
        // is 8-aligned, and it lives as long as `self`; it is only accessed atomically.
        unsafe { &*(self.base.add(i) as *const AtomicU64) }
    }

    fn live(&self, slot: u32) -> &AtomicU64 {
        self.word(slot, 0)
    }

    fn inflight(&self, slot: u32) -> &AtomicU64 {
        self.word(slot, 1)
    }
}

impl Drop for GrantTable {
    fn drop(&mut self) {
        // SAFETY: (base, TABLE_BYTES) is our mapping; the table is dropped with its last user.
        unsafe { sys::unmap(self.base, TABLE_BYTES) };
    }
}

/// The target's view of one connection's grant table.
#[derive(Debug)]
struct TableSlots {
    table: Arc<GrantTable>,
    /// The initiator process (None if no pidfd could be had: then only its count tells).
    pidfd: Option<Arc<OwnedFd>>,
    free: Vec<u32>,
    next_gen: u64,
}

/// Answers a GrantReq: checks the region as for an Op, records the grant, lends the table.
#[allow(clippy::too_many_arguments)]
fn grant_cma(
    inner: &Inner,
    target: &TargetHandle,
    writer: &Mutex<UnixStream>,
    (conn_id, peer_pid): (u64, i32),
    id: u64,
    addr: u64,
    len: u64,
    key: u64,
) -> io::Result<()> {
    let refuse = |status, text: String| {
        let f = Frame::GrantReply {
            id,
            status,
            slot: 0,
            gen: 0,
            text,
        };
        send(writer, &f)
    };
    if !inner.cfg.cma_grants {
        return refuse(
            Status::Failed,
            "this agent gives no cross-memory grants".into(),
        );
    }
    let d = Desc::new(addr, len, 0);
    if len == 0 || d.end().is_none() {
        return refuse(Status::Denied, "empty or wrapping region".into());
    }
    // Held until the grant is recorded: a deregistration drains it before it revokes grants.
    let access = match target.check(MemKind::Dram, &d, key) {
        Ok(a) => a,
        Err(denied) => {
            metrics::counter!("nixl_access_denied_total", "backend" => "shm").increment(1);
            return refuse(Status::Denied, denied.to_string());
        }
    };
    if access.region().desc != d {
        return refuse(Status::Denied, "a grant covers a whole region".into());
    }
    let mut tables = inner.grant_tables.lock();
    let slots = match tables.entry(conn_id) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => match GrantTable::create() {
            Ok(t) => v.insert(TableSlots {
                table: Arc::new(t),
                pidfd: sys::pidfd_open(peer_pid).ok().map(Arc::new),
                free: (0..GRANT_SLOTS as u32).rev().collect(),
                next_gen: 0,
            }),
            Err(e) => {
                drop(tables);
                return refuse(Status::Failed, format!("grant table: {e}"));
            }
        },
    };
    let Some(slot) = slots.free.pop() else {
        drop(tables);
        return refuse(Status::Failed, "grant table full".into());
    };
    slots.next_gen += 1;
    let gen = slots.next_gen;
    let table = Arc::clone(&slots.table);
    table.live(slot).store(gen, Ordering::SeqCst);
    inner
        .cma_grants
        .lock()
        .entry(key)
        .or_default()
        .push((conn_id, slot));
    drop(tables);
    drop(access);
    let reply = Frame::GrantReply {
        id,
        status: Status::Ok,
        slot,
        gen,
        text: String::new(),
    };
    let fd = table.fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
    let w = writer.lock();
    sys::send_with_fd(&w, &reply.encode(), fd)
}

/// Waits until `idle()`, or the process behind `pidfd` has exited (its copies with it), or
/// `deadline`; false on the deadline.
fn drain(idle: impl Fn() -> bool, pidfd: Option<&OwnedFd>, deadline: Instant) -> bool {
    let mut spins = 0u32;
    loop {
        if idle() || pidfd.is_some_and(sys::pid_exited) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        spins += 1;
        if spins < 100 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Inner {
    /// The connection `conn` has ended: revokes every grant given on it and waits for the
    /// copies under way, then forgets them. (A connection ends when the peer closes its side,
    /// which it also does on invalidation, alive and possibly still copying: so the end of
    /// the connection alone is not the end of its copies.)
    fn end_grants(&self, conn: u64) {
        let entry = self
            .grant_tables
            .lock()
            .get(&conn)
            .map(|t| (Arc::clone(&t.table), t.pidfd.clone()));
        if let Some((table, pidfd)) = entry {
            for slot in 0..GRANT_SLOTS as u32 {
                table.live(slot).store(0, Ordering::SeqCst);
            }
            let idle =
                || (0..GRANT_SLOTS as u32).all(|s| table.inflight(s).load(Ordering::SeqCst) == 0);
            if !drain(
                idle,
                pidfd.as_deref(),
                Instant::now() + GRANT_DRAIN_PATIENCE,
            ) {
                tracing::error!(
                    conn,
                    "shm: a closed peer's granted copies did not end in time"
                );
            }
        }
        // Only now: a revocation meanwhile found the table and waited on its slot itself.
        self.grant_tables.lock().remove(&conn);
        for grants in self.cma_grants.lock().values_mut() {
            grants.retain(|(c, _)| *c != conn);
        }
    }

    /// Revokes every cross-memory grant on the region with `key`: marks each slot revoked, then
    /// waits (bounded) until the copies the initiator started before that have ended.
    fn revoke_grants(&self, key: u64) {
        let Some(grants) = self.cma_grants.lock().remove(&key) else {
            return;
        };
        // A copy under way ends in microseconds to milliseconds; a peer stopped in the middle
        // of one (SIGSTOP, a debugger) holds us as long as a held local transfer holds the
        // agent's deregistration, since the memory may be freed and reused once we return.
        let deadline = Instant::now() + GRANT_DRAIN_PATIENCE.max(self.cfg.revoke_timeout);
        for (conn, slot) in grants {
            let Some((table, pidfd)) = self
                .grant_tables
                .lock()
                .get(&conn)
                .map(|t| (Arc::clone(&t.table), t.pidfd.clone()))
            else {
                continue; // that connection's grants were all revoked and drained when it ended
            };
            // Dekker with the initiator's `inflight += 1; check live`: both SeqCst, so either
            // it sees 0 here and backs off, or we see its count below and wait for the copy.
            table.live(slot).store(0, Ordering::SeqCst);
            let idle = || table.inflight(slot).load(Ordering::SeqCst) == 0;
            let drained = drain(idle, pidfd.as_deref(), deadline);
            if drained {
                if let Some(t) = self.grant_tables.lock().get_mut(&conn) {
                    t.free.push(slot);
                }
            } else {
                // The slot is not reused (its counter is not trusted any more).
                tracing::error!(
                    key,
                    "shm: a peer's copy on a deregistered region did not end in time"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Initiator side.

struct Pending {
    done: Completion,
    deadline: Instant,
    /// Ended early (timeout, close): the target may still be copying, so the completion (and
    /// with it our local regions) is kept until its answer or the end of the connection.
    ended: bool,
}

/// A peer's memfd buffer mapped into this process.
#[derive(Debug)]
struct Mapping {
    base: *mut u8,
    buf_len: usize,
    /// The region's offset inside the buffer, and the region's address in the peer.
    offset: u64,
    region_addr: u64,
    gate: AccessGate,
}

// SAFETY: the mapping is shared memory; access is raw-pointer copies guarded by `gate`.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: (base, buf_len) is the mapping made in `Conn::map_region`; the last Arc is
        // gone, so no copy uses it.
        unsafe { sys::unmap(self.base, self.buf_len) };
    }
}

type MapResult = std::result::Result<Arc<Mapping>, String>;
/// A peer's answer to a mapping request (the memfd, the buffer length, the region's offset) or
/// to a grant request (the table's memfd, the slot, the generation).
type Granted = std::result::Result<(OwnedFd, u64, u64), (Status, String)>;

/// A cross-memory grant a target gave us on one of its regions.
#[derive(Debug)]
struct Grant {
    table: Arc<GrantTable>,
    slot: u32,
    gen: u64,
    /// The region it covers (in the target).
    desc: Desc,
}

impl Grant {
    fn live(&self) -> bool {
        self.table.live(self.slot).load(Ordering::SeqCst) == self.gen
    }
}

/// Copies under way on a set of grants: entered with `inflight += 1` on each, left on drop.
struct GrantHold<'a>(&'a [Arc<Grant>], usize);

impl<'a> GrantHold<'a> {
    /// Enters every grant, or none if one was revoked.
    fn enter(grants: &'a [Arc<Grant>]) -> Option<GrantHold<'a>> {
        let mut hold = GrantHold(grants, 0);
        for g in grants {
            g.table.inflight(g.slot).fetch_add(1, Ordering::SeqCst);
            hold.1 += 1;
            if !g.live() {
                return None; // `hold` leaves the ones entered
            }
        }
        Some(hold)
    }
}

impl Drop for GrantHold<'_> {
    fn drop(&mut self) {
        for g in &self.0[..self.1] {
            g.table.inflight(g.slot).fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Our connection to one peer's socket.
struct Conn {
    /// Ourselves, for the prepared transfers that keep the connection alive.
    me: Weak<Conn>,
    peer: Arc<str>,
    backend: Arc<Inner>,
    writer: Mutex<UnixStream>,
    pending: Mutex<HashMap<u64, Pending>>,
    map_waits: Mutex<HashMap<u64, Option<Granted>>>,
    map_cv: Condvar,
    maps: Mutex<HashMap<u64, Arc<Mapping>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    close_reason: Mutex<String>,
    /// The target's pid (its socket's SO_PEERCRED, matching its metadata) and a pidfd on it.
    pid: i32,
    pidfd: Option<OwnedFd>,
    /// The grant table the target lent us, and our grants by region key.
    table: Mutex<Option<Arc<GrantTable>>>,
    grants: Mutex<HashMap<u64, Arc<Grant>>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("shm::Conn")
            .field("peer", &self.peer)
            .finish()
    }
}

impl Conn {
    fn open(inner: &Arc<Inner>, peer: &str, info: &ConnInfo) -> Result<Arc<Conn>> {
        let disconnected = |reason: String| Error::RemoteDisconnect {
            peer: peer.to_owned(),
            reason,
        };
        let stream = UnixStream::connect(&info.path)
            .map_err(|e| disconnected(format!("connect {}: {e}", info.path)))?;
        let (pid, uid) = sys::peer_cred(&stream).map_err(|e| disconnected(e.to_string()))?;
        if pid as u32 != info.pid || uid != sys::uid() {
            return Err(Error::Denied {
                peer: peer.to_owned(),
                reason: format!(
                    "socket {} belongs to pid {pid} uid {uid}, metadata says pid {} uid {}",
                    info.path, info.pid, info.uid
                ),
            });
        }
        let target = inner
            .target
            .get()
            .ok_or_else(|| Error::Shutdown("shm backend not started".into()))?;
        let hello = Frame::Hello {
            name: target.name().to_owned(),
            instance: target.instance_id(),
            pid: std::process::id(),
        };
        (&stream)
            .write_all(&hello.encode())
            .map_err(|e| disconnected(format!("hello: {e}")))?;
        // Taken after the pid was checked against the socket: the process that listens there.
        let pidfd = sys::pidfd_open(pid)
            .map_err(|e| tracing::debug!(error = %e, "shm: no pidfd; grants off for this peer"))
            .ok();
        let reader = stream
            .try_clone()
            .map_err(|e| Error::io("shm: clone socket", e))?;
        reader
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| Error::io("shm: socket timeout", e))?;
        let conn = Arc::new_cyclic(|me| Conn {
            me: me.clone(),
            peer: Arc::from(peer),
            backend: Arc::clone(inner),
            writer: Mutex::new(stream),
            pending: Mutex::new(HashMap::new()),
            map_waits: Mutex::new(HashMap::new()),
            map_cv: Condvar::new(),
            maps: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(String::new()),
            pid,
            pidfd,
            table: Mutex::new(None),
            grants: Mutex::new(HashMap::new()),
        });
        // The reader holds the connection until the peer's end of the socket closes: pending
        // posts keep our memory held until then (we close our sending side on invalidation or
        // shutdown, and the peer then closes its side).
        let held = Arc::clone(&conn);
        std::thread::Builder::new()
            .name("nixl-shm-read".into())
            .spawn(move || read_loop(held, reader))
            .map_err(|e| Error::io("shm: spawn reader", e))?;
        Ok(conn)
    }

    fn disconnected(&self) -> Error {
        let reason = self.close_reason.lock().clone();
        Error::RemoteDisconnect {
            peer: self.peer.to_string(),
            reason: if reason.is_empty() {
                "connection closed".into()
            } else {
                reason
            },
        }
    }

    fn mark_closed(&self, reason: &str) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            *self.close_reason.lock() = reason.to_owned();
        }
        // Only our sending side: the target finishes the op it is on, answers, sees EOF and
        // closes, and our reader then lets go of the memory those ops held.
        let _ = self.writer.lock().shutdown(std::net::Shutdown::Write);
        self.map_cv.notify_all();
    }

    /// Ends every pending post now with `err`, keeping their memory held until the target
    /// answers or the connection ends (see [`Pending::ended`]).
    fn end_all_early(&self, err: &Error) {
        for p in self.pending.lock().values_mut() {
            if !p.ended {
                p.done.end_early(Err(err.clone()));
                p.ended = true;
            }
        }
    }

    /// Ends every pending post with `err` and lets go of them: only once nothing can still
    /// touch their memory (the connection has ended).
    fn fail_all(&self, err: Error) {
        let drained: Vec<Pending> = self.pending.lock().drain().map(|(_, p)| p).collect();
        for p in drained {
            p.done.complete(Err(err.clone()));
        }
    }

    fn send(&self, f: &Frame) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.disconnected());
        }
        let bytes = f.encode();
        let r = self.writer.lock().write_all(&bytes);
        r.map_err(|e| {
            self.mark_closed(&format!("send: {e}"));
            self.disconnected()
        })
    }

    /// The mapping of a peer's mappable region, asking the peer for it the first time.
    /// Sends a MapReq or GrantReq made by `req(id)` and waits (bounded) for its answer.
    fn ask(&self, req: impl FnOnce(u64) -> Frame) -> Granted {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.map_waits.lock().insert(id, None);
        if let Err(e) = self.send(&req(id)) {
            self.map_waits.lock().remove(&id);
            return Err((Status::Failed, e.to_string()));
        }
        let deadline = Instant::now() + self.backend.cfg.op_timeout;
        let mut waits = self.map_waits.lock();
        let got = loop {
            if let Some(Some(r)) = waits.get_mut(&id).map(Option::take) {
                break r;
            }
            if self.closed.load(Ordering::Acquire) {
                break Err((Status::Failed, "connection closed".into()));
            }
            if self.map_cv.wait_until(&mut waits, deadline).timed_out() {
                break Err((Status::Failed, "no answer to the request".into()));
            }
        };
        waits.remove(&id);
        got
    }

    /// Our cross-memory grant on a peer's region, asking the peer for it the first time (or
    /// again after a revocation, which the peer then refuses if the region is gone).
    fn grant_region(&self, region: &Desc, key: u64) -> std::result::Result<Arc<Grant>, Error> {
        if let Some(g) = self.grants.lock().get(&key) {
            if g.live() && g.desc == *region {
                return Ok(Arc::clone(g));
            }
        }
        let failed = |reason: String| Error::Backend {
            backend: BackendName::Shm,
            op: "grant",
            reason,
        };
        let got = self.ask(|id| Frame::GrantReq {
            id,
            addr: region.addr,
            len: region.len,
            key,
        });
        let (fd, slot, gen) = got.map_err(|(status, reason)| match status {
            Status::Denied => Error::Denied {
                peer: self.peer.to_string(),
                reason,
            },
            _ => failed(reason),
        })?;
        if slot >= GRANT_SLOTS as u64 || gen == 0 {
            return Err(failed(format!("peer gave slot {slot} generation {gen}")));
        }
        let table = {
            let mut t = self.table.lock();
            match &*t {
                Some(t) => Arc::clone(t),
                None => {
                    let adopted = Arc::new(GrantTable::adopt(&fd).map_err(failed)?);
                    *t = Some(Arc::clone(&adopted));
                    adopted
                }
            }
        };
        let g = Arc::new(Grant {
            table,
            slot: slot as u32,
            gen,
            desc: *region,
        });
        self.grants.lock().insert(key, Arc::clone(&g));
        Ok(g)
    }

    /// Whether the target process is known to have exited.
    fn target_exited(&self) -> bool {
        self.pidfd.as_ref().is_none_or(sys::pid_exited)
    }

    fn map_region(&self, region: &Desc, key: u64) -> MapResult {
        if let Some(m) = self.maps.lock().get(&key) {
            return Ok(Arc::clone(m));
        }
        let got = self.ask(|id| Frame::MapReq {
            id,
            addr: region.addr,
            len: region.len,
            key,
        });
        let (fd, buf_len, offset) = got.map_err(|(_, text)| text)?;
        // Sealed first: only then does the size checked next stay the size.
        sys::check_sealed(fd.as_raw_fd())?;
        let size = sys::fd_size(fd.as_raw_fd()).map_err(|e| e.to_string())?;
        let end = offset.checked_add(region.len);
        if size < buf_len || end.is_none_or(|e| e > buf_len) {
            return Err(format!(
                "peer's buffer is {size} bytes, too small for region at offset {offset} (+{})",
                region.len
            ));
        }
        let base =
            sys::map_shared(fd.as_raw_fd(), buf_len as usize, true).map_err(|e| e.to_string())?;
        let m = Arc::new(Mapping {
            base,
            buf_len: buf_len as usize,
            offset,
            region_addr: region.addr,
            gate: AccessGate::default(),
        });
        self.maps.lock().insert(key, Arc::clone(&m));
        Ok(m)
    }
}

fn read_loop(c: Arc<Conn>, stream: UnixStream) {
    let mut framer = Framer::default();
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
    let mut got: Vec<OwnedFd> = Vec::new();
    loop {
        // Frames already buffered.
        loop {
            match framer.next_frame() {
                Ok(Some(body)) => match Frame::decode(&body) {
                    Ok(f) => handle_reply(&c, f, &mut fds),
                    Err(e) => {
                        c.mark_closed(&format!("bad frame from peer: {e}"));
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    c.mark_closed(&format!("bad frame from peer: {e}"));
                    break;
                }
            }
        }
        let spare = framer.spare(64 << 10);
        match sys::recv_with_fds(&stream, spare, &mut got) {
            Ok(0) => {
                // End of the connection: the target can no longer touch our memory.
                c.mark_closed("peer closed the connection (process gone?)");
                c.fail_all(c.disconnected());
                return;
            }
            Ok(n) => {
                framer.commit(64 << 10, n);
                fds.extend(got.drain(..));
                if fds.len() > 64 {
                    // Only mapping replies carry descriptors, one each; a peer sending more is
                    // misbehaving, and holding them would leak.
                    c.mark_closed("peer sent file descriptors nobody asked for");
                    fds.clear();
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                framer.commit(64 << 10, 0);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => framer.commit(64 << 10, 0),
            Err(e) => {
                c.mark_closed(&format!("receive: {e}"));
                c.fail_all(c.disconnected());
                return;
            }
        }
        // End posts a stuck peer has not answered in time (their memory stays held).
        let now = Instant::now();
        for p in c.pending.lock().values_mut() {
            if !p.ended && p.deadline <= now {
                p.done.end_early(Err(Error::RemoteDisconnect {
                    peer: c.peer.to_string(),
                    reason: "no answer within the operation timeout".into(),
                }));
                p.ended = true;
            }
        }
    }
}

/// Hands a MapReply or GrantReply (its file descriptor and two numbers) to the request waiting
/// for it.
fn answer(
    c: &Conn,
    fds: &mut VecDeque<OwnedFd>,
    id: u64,
    status: Status,
    (a, b): (u64, u64),
    text: String,
    what: &str,
) {
    let r = if status == Status::Ok {
        match fds.pop_front() {
            Some(fd) => Ok((fd, a, b)),
            None => Err((
                Status::Failed,
                format!("{what} reply came without a file descriptor"),
            )),
        }
    } else {
        Err((status, text))
    };
    if let Some(w) = c.map_waits.lock().get_mut(&id) {
        *w = Some(r);
    }
    c.map_cv.notify_all();
}

fn handle_reply(c: &Conn, f: Frame, fds: &mut VecDeque<OwnedFd>) {
    match f {
        Frame::Done { id, status, text } => {
            let Some(p) = c.pending.lock().remove(&id) else {
                return; // cancelled or expired meanwhile
            };
            let outcome = match status {
                Status::Ok => Ok(()),
                Status::Denied => Err(Error::Denied {
                    peer: c.peer.to_string(),
                    reason: text,
                }),
                Status::Failed => Err(Error::Backend {
                    backend: BackendName::Shm,
                    op: "copy",
                    reason: text,
                }),
            };
            p.done.complete(outcome);
        }
        Frame::MapReply {
            id,
            status,
            buf_len,
            offset,
            text,
        } => answer(c, fds, id, status, (buf_len, offset), text, "mapping"),
        Frame::GrantReply {
            id,
            status,
            slot,
            gen,
            text,
        } => answer(c, fds, id, status, (u64::from(slot), gen), text, "grant"),
        Frame::Revoke { key } => {
            let m = c.maps.lock().remove(&key);
            if let Some(m) = m {
                // Wait for copies in flight on it, then let it go (unmapped with the last Arc).
                m.gate.close_and_drain(Duration::from_secs(30));
            }
            let _ = c.send(&Frame::RevokeAck { key });
        }
        other => {
            c.mark_closed(&format!("unexpected frame from peer: {other:?}"));
        }
    }
}

impl Conn {
    /// The peer's buffers mapped here for every remote region of `plan`, when this backend maps
    /// and every region is mappable; `None` when the request must go another way (a mapping
    /// refused for a reason other than the key is logged and left to the other paths).
    fn mapped(&self, plan: &XferPlan) -> Result<Option<Vec<Arc<Mapping>>>> {
        if !self.backend.cfg.allow_map {
            return Ok(None);
        }
        let mappable = plan.remote_regions.iter().all(|r| {
            r.backends
                .iter()
                .any(|(b, p)| *b == BackendName::Shm && parse_public(p).is_some())
        });
        if !mappable {
            return Ok(None);
        }
        let maps: std::result::Result<Vec<Arc<Mapping>>, String> = plan
            .remote_regions
            .iter()
            .map(|r| self.map_region(&r.desc, r.key))
            .collect();
        match maps {
            Ok(maps) => Ok(Some(maps)),
            Err(reason) => {
                if reason.contains("denied") || reason.contains("key") {
                    return Err(Error::Denied {
                        peer: self.peer.to_string(),
                        reason,
                    });
                }
                tracing::debug!(peer = %self.peer, %reason,
                    "shm: mapping refused; using cross-memory attach");
                Ok(None)
            }
        }
    }
}

impl Connection for Conn {
    fn prepare_runs(&self, mut plan: XferPlan, runs: Runs) -> Result<Box<dyn PreparedXfer>> {
        let Some(maps) = self.mapped(&plan)? else {
            plan.segments = runs.to_segments();
            return self.prepare(plan);
        };
        let conn = self.self_arc()?;
        // One remote region (the core's contract for runs): one offset maps every remote
        // address into the mapping; the region lies inside the mapped buffer (checked when it
        // was mapped), and every run inside the region (checked when its list was prepared).
        let m = &maps[0];
        let delta = (m.base as u64 + m.offset).wrapping_sub(m.region_addr);
        let write = plan.op == XferOp::Write;
        // `Run` and `CopyOp` are both three u64s: this map reuses the runs' allocation.
        let ops: Vec<CopyOp> = runs
            .runs
            .into_iter()
            .map(|r| {
                let mapped = r.remote.wrapping_add(delta);
                if write {
                    CopyOp {
                        src: r.local,
                        dst: mapped,
                        len: r.len,
                    }
                } else {
                    CopyOp {
                        src: mapped,
                        dst: r.local,
                        len: r.len,
                    }
                }
            })
            .collect();
        Ok(Box::new(MappedXfer {
            conn,
            plan: CopyPlan::new(ops),
            maps: maps.into(),
            notif: plan.notif,
        }))
    }

    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        let write = plan.op == XferOp::Write;
        let total = plan.total_bytes();
        let conn = self.self_arc()?;
        // Mapped path when we allow it and every remote region is mappable and mapped.
        if let Some(maps) = self.mapped(&plan)? {
            let ops = plan
                .segments
                .iter()
                .map(|s| {
                    let m = &maps[s.remote_region as usize];
                    let mapped = m.base as u64 + m.offset + (s.remote.addr - m.region_addr);
                    if write {
                        CopyOp {
                            src: s.local.addr,
                            dst: mapped,
                            len: s.local.len,
                        }
                    } else {
                        CopyOp {
                            src: mapped,
                            dst: s.local.addr,
                            len: s.local.len,
                        }
                    }
                })
                .collect();
            return Ok(Box::new(MappedXfer {
                conn,
                plan: CopyPlan::new(ops),
                maps: maps.into(),
                notif: plan.notif,
            }));
        }
        if self.backend.cfg.cma_grants && self.pidfd.is_some() {
            let grants: Result<Vec<Arc<Grant>>> = plan
                .remote_regions
                .iter()
                .map(|r| self.grant_region(&r.desc, r.key))
                .collect();
            match grants {
                Ok(grants) => return self.granted_xfer(conn, &plan, grants),
                Err(e @ Error::Denied { .. }) => return Err(e),
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e,
                        "shm: no cross-memory grant; the target copies");
                }
            }
        }
        let segs: Vec<WireSeg> = plan
            .segments
            .iter()
            .map(|s| WireSeg {
                init: s.local.addr,
                target: s.remote.addr,
                len: s.local.len,
                key: plan.remote_regions[s.remote_region as usize].key,
            })
            .collect();
        let frame = Frame::Op {
            id: 0,
            write,
            notif: plan.notif,
            segs,
        }
        .encode();
        if frame.len() > wire::MAX_FRAME {
            return Err(Error::InvalidArgument(format!(
                "{} descriptors exceed one shm frame; split the request",
                plan.segments.len()
            )));
        }
        Ok(Box::new(CmaXfer {
            conn,
            frame,
            timeout: self.backend.cfg.op_timeout + Duration::from_millis(total / 500_000),
        }))
    }

    fn send_notif(&self, _from: &str, msg: &[u8]) -> Result<()> {
        self.send(&Frame::Notif { msg: msg.to_vec() })
    }

    fn close(&self) {
        self.mark_closed("peer invalidated");
        self.end_all_early(&self.disconnected());
    }
}

impl Conn {
    fn self_arc(&self) -> Result<Arc<Conn>> {
        self.me.upgrade().ok_or_else(|| self.disconnected())
    }

    /// A transfer we copy ourselves under `grants` (one per remote region of `plan`). Every
    /// remote range is checked here against the region its grant covers.
    fn granted_xfer(
        &self,
        conn: Arc<Conn>,
        plan: &XferPlan,
        grants: Vec<Arc<Grant>>,
    ) -> Result<Box<dyn PreparedXfer>> {
        let mut ours = Vec::with_capacity(plan.segments.len());
        let mut theirs = Vec::with_capacity(plan.segments.len());
        for (i, s) in plan.segments.iter().enumerate() {
            let g = grants
                .get(s.remote_region as usize)
                .ok_or_else(|| Error::InvalidArgument(format!("descriptor {i}: no region")))?;
            let remote = Desc::new(s.remote.addr, s.local.len, g.desc.dev_id);
            if s.local.len == 0 || remote.end().is_none() || !g.desc.contains(&remote) {
                return Err(Error::Denied {
                    peer: self.peer.to_string(),
                    reason: format!(
                        "descriptor {i} ({:#x}+{}) is outside the granted region",
                        s.remote.addr, s.local.len
                    ),
                });
            }
            ours.push(Span {
                addr: s.local.addr,
                len: s.local.len,
            });
            theirs.push(Span {
                addr: s.remote.addr,
                len: s.local.len,
            });
        }
        Ok(Box::new(GrantedXfer {
            conn,
            dir: if plan.op == XferOp::Write {
                Cma::Push
            } else {
                Cma::Pull
            },
            total: plan.total_bytes(),
            ours: ours.into(),
            theirs: theirs.into(),
            grants: grants.into(),
            notif: plan.notif.clone(),
        }))
    }
}

/// Granted copies up to this size run on the posting thread (a few milliseconds at most; from
/// 8 MiB with copy pool workers beside it): no thread to wake first, which on a busy host costs
/// more than the copy. Bigger ones run on a thread of their own.
const GRANT_INLINE_MAX: u64 = 16 << 20;

/// A prepared transfer we copy ourselves with `process_vm_*` under the target's grants.
#[derive(Debug)]
struct GrantedXfer {
    conn: Arc<Conn>,
    dir: Cma,
    total: u64,
    ours: Arc<[Span]>,
    theirs: Arc<[Span]>,
    grants: Arc<[Arc<Grant>]>,
    notif: Option<Vec<u8>>,
}

impl GrantedXfer {
    /// Copies under the grants and ends the post.
    fn run(
        conn: &Conn,
        dir: Cma,
        total: u64,
        (ours, theirs): (&[Span], &[Span]),
        grants: &[Arc<Grant>],
        notif: Option<&[u8]>,
        done: Completion,
    ) {
        let Some(hold) = GrantHold::enter(grants) else {
            done.complete(Err(Error::Denied {
                peer: conn.peer.to_string(),
                reason: "the peer deregistered a region of this transfer".into(),
            }));
            return;
        };
        // Checked after entering: a target that exits can no longer revoke, and its pid must
        // not be written once it may have been reused.
        if conn.target_exited() {
            drop(hold);
            done.complete(Err(Error::RemoteDisconnect {
                peer: conn.peer.to_string(),
                reason: "the target process has exited".into(),
            }));
            return;
        }
        let threads = conn.backend.cfg.copy_threads;
        // SAFETY: our spans lie in our registered regions, held by `done` until it completes;
        // the target's were checked against its grants, held live by `hold`.
        let r = unsafe { copy_split(conn.pid, dir, ours, theirs, threads) };
        drop(hold);
        let outcome = match r {
            Ok(n) if n == total => match notif {
                // The data has landed: the notification follows it on the socket.
                Some(msg) => conn.send(&Frame::Notif { msg: msg.to_vec() }),
                None => Ok(()),
            },
            Ok(n) => Err(Error::Backend {
                backend: BackendName::Shm,
                op: "copy",
                reason: format!("moved {n} of {total} bytes"),
            }),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) || conn.target_exited() => {
                Err(Error::RemoteDisconnect {
                    peer: conn.peer.to_string(),
                    reason: format!("the target process has exited ({e})"),
                })
            }
            Err(e) => Err(Error::Backend {
                backend: BackendName::Shm,
                op: "copy",
                reason: cma_failure(&e, conn.pid, dir),
            }),
        };
        done.complete(outcome);
    }
}

impl PreparedXfer for GrantedXfer {
    fn post(&self, done: Completion) {
        let c = &self.conn;
        if c.closed.load(Ordering::Acquire) {
            done.complete(Err(c.disconnected()));
            return;
        }
        if self.total <= GRANT_INLINE_MAX {
            let spans = (&self.ours[..], &self.theirs[..]);
            let notif = self.notif.as_deref();
            GrantedXfer::run(c, self.dir, self.total, spans, &self.grants, notif, done);
            return;
        }
        // Big: on a thread of its own (which splits the copy further), not the caller's.
        let (conn, dir, total) = (Arc::clone(c), self.dir, self.total);
        let (ours, theirs) = (Arc::clone(&self.ours), Arc::clone(&self.theirs));
        let (grants, notif) = (Arc::clone(&self.grants), self.notif.clone());
        let spawned = std::thread::Builder::new()
            .name("nixl-shm-copy".into())
            .spawn(move || {
                let spans = (&ours[..], &theirs[..]);
                GrantedXfer::run(&conn, dir, total, spans, &grants, notif.as_deref(), done);
            });
        if let Err(e) = spawned {
            // The closure (and the completion in it) is dropped: the post ends as failed.
            tracing::error!(error = %e, "shm: cannot start a copy thread");
        }
    }
}

/// A prepared transfer the target carries out (cross-memory attach).
#[derive(Debug)]
struct CmaXfer {
    conn: Arc<Conn>,
    /// The encoded Op frame; its id (bytes 5..13) is set per post.
    frame: Vec<u8>,
    timeout: Duration,
}

impl PreparedXfer for CmaXfer {
    fn post(&self, done: Completion) {
        let c = &self.conn;
        if c.closed.load(Ordering::Acquire) {
            done.complete(Err(c.disconnected()));
            return;
        }
        let id = c.next_id.fetch_add(1, Ordering::Relaxed);
        c.pending.lock().insert(
            id,
            Pending {
                done,
                deadline: Instant::now() + self.timeout,
                ended: false,
            },
        );
        // One write per post: the prepared frame with this post's id patched in.
        let mut frame = self.frame.clone();
        frame[5..13].copy_from_slice(&id.to_le_bytes());
        let r = c.writer.lock().write_all(&frame);
        if let Err(e) = r {
            c.mark_closed(&format!("send: {e}"));
            if let Some(p) = c.pending.lock().remove(&id) {
                p.done.complete(Err(c.disconnected()));
            }
        }
    }
}

/// A prepared transfer we copy ourselves through the peer's mapped buffer.
#[derive(Debug)]
struct MappedXfer {
    conn: Arc<Conn>,
    plan: CopyPlan,
    maps: Arc<[Arc<Mapping>]>,
    notif: Option<Vec<u8>>,
}

struct MapHold(Arc<[Arc<Mapping>]>, Option<Ticket>);

impl Drop for MapHold {
    fn drop(&mut self) {
        leave_all(&self.0, |m| &m.gate, self.1);
    }
}

fn finish_mapped(conn: &Conn, notif: Option<&[u8]>, done: Completion) {
    let outcome = match notif {
        Some(msg) => conn.send(&Frame::Notif { msg: msg.to_vec() }),
        None if conn.closed.load(Ordering::Acquire) => Err(conn.disconnected()),
        None => Ok(()),
    };
    done.complete(outcome);
}

impl PreparedXfer for MappedXfer {
    fn post(&self, done: Completion) {
        let Ok(ticket) = enter_all(&self.maps, |m| &m.gate) else {
            done.complete(Err(Error::Denied {
                peer: self.conn.peer.to_string(),
                reason: "the peer deregistered a region of this transfer".into(),
            }));
            return;
        };
        let hold = MapHold(Arc::clone(&self.maps), ticket);
        if self.plan.total() <= INLINE_MAX {
            // SAFETY: local ranges lie in our registered regions (held by the completion), the
            // remote ones inside the peer's buffer mapped here (bounds checked against the
            // peer's metadata at creation, and the mapping covers the whole buffer), held open
            // by `hold`.
            unsafe { self.plan.copy_range(0, self.plan.total(), false) };
            drop(hold);
            finish_mapped(&self.conn, self.notif.as_deref(), done);
            return;
        }
        let conn = Arc::clone(&self.conn);
        let notif = self.notif.clone();
        let finish = move |done: Completion| finish_mapped(&conn, notif.as_deref(), done);
        // SAFETY: as above; the mappings (`hold`) and the local regions (the completion) stay
        // held until every range is copied.
        unsafe { CopyPool::global().run_post(self.plan.clone(), done, hold, finish) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixListener;

    #[test]
    fn conn_info_round_trips_and_garbage_is_refused() {
        let i = ConnInfo::ours("/tmp/x.sock");
        assert_eq!(ConnInfo::decode(&i.encode()).unwrap(), i);
        let b = i.encode();
        for n in 0..b.len() {
            assert!(ConnInfo::decode(&b[..n]).is_err());
        }
        let mut long = b.clone();
        long.push(0);
        assert!(ConnInfo::decode(&long).is_err());
        assert!(ConnInfo::decode(&[0xff; 64]).is_err());
    }

    #[test]
    fn reach_rules() {
        let be = ShmBackend::new(ShmConfig::default());
        let mut i = ConnInfo::ours("/x");
        assert!(be.can_reach(&i.encode()).is_ok());
        i.boot_id = "other".into();
        assert!(be
            .can_reach(&i.encode())
            .unwrap_err()
            .contains("another node"));
        let mut i = ConnInfo::ours("/x");
        i.uid += 1;
        assert!(be.can_reach(&i.encode()).unwrap_err().contains("uid"));
    }

    #[test]
    fn split_spans_preserves_pairs_and_bytes() {
        let ours = [Span { addr: 0, len: 10 }, Span { addr: 100, len: 7 }];
        let theirs = [
            Span {
                addr: 1000,
                len: 10,
            },
            Span { addr: 2000, len: 7 },
        ];
        let parts = split_spans(&ours, &theirs, 3);
        assert_eq!(parts.len(), 3);
        let flat: Vec<(u64, u64, u64)> = parts
            .iter()
            .flat_map(|(o, t)| o.iter().zip(t).map(|(a, b)| (a.addr, b.addr, a.len)))
            .collect();
        let total: u64 = flat.iter().map(|x| x.2).sum();
        assert_eq!(total, 17);
        for (a, b, _) in flat {
            assert!(b == a + 1000 || b == a + 1900, "pairing kept: {a} {b}");
        }
    }

    #[test]
    fn cross_copy_handles_many_uneven_spans() {
        let src: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; 5000];
        // 2500 spans of 2 bytes on our side, 1000 of 5 on theirs: more than IOV_MAX.
        let ours: Vec<Span> = (0..2500)
            .map(|i| Span {
                addr: dst.as_mut_ptr() as u64 + i * 2,
                len: 2,
            })
            .collect();
        let theirs: Vec<Span> = (0..1000)
            .map(|i| Span {
                addr: src.as_ptr() as u64 + i * 5,
                len: 5,
            })
            .collect();
        // SAFETY: `ours` covers `dst`, live and writable for the call.
        let n = unsafe { sys::cross_copy(std::process::id() as i32, Cma::Pull, &ours, &theirs) }
            .unwrap();
        assert_eq!(n, 5000);
        assert_eq!(dst, src);
    }

    #[test]
    fn split_copy_moves_every_byte_and_reports_a_bad_span() {
        // 20 MiB + 3 bytes in spans of uneven lengths (pairwise equal), over 4 threads: several
        // pieces each, taken by the caller and the copy pool's workers.
        let len = (20 << 20) + 3;
        let src: Vec<u8> = (0..len as u64).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0u8; len];
        let cuts = [0, 1, 4097, 3 << 20, (3 << 20) + 5, 11 << 20, len];
        let spans = |base: u64| -> Vec<Span> {
            cuts.windows(2)
                .map(|w| Span {
                    addr: base + w[0] as u64,
                    len: (w[1] - w[0]) as u64,
                })
                .collect()
        };
        let ours = spans(dst.as_mut_ptr() as u64);
        let theirs = spans(src.as_ptr() as u64);
        let me = std::process::id() as i32;
        // SAFETY: `ours` covers `dst`, live and writable for the call.
        let n = unsafe { copy_split(me, Cma::Pull, &ours, &theirs, 4) }.unwrap();
        assert_eq!(n, len as u64);
        assert!(dst == src, "bytes differ");
        // The far side's last span points at nothing mapped: an error, not a hang or a panic.
        let mut bad = theirs.clone();
        bad.last_mut().unwrap().addr = 8;
        // SAFETY: as above.
        let r = unsafe { copy_split(me, Cma::Pull, &ours, &bad, 4) };
        assert!(r.is_err(), "{r:?}");
    }

    /// A fake peer answers a mapping request with `fd`; returns what the initiator made of it.
    fn map_from_fake_peer(fd: OwnedFd) -> Option<MapResult> {
        with_fake_peer(fd, 0, 0, |conn| {
            conn.map_region(&Desc::new(0x10000, 4096, 0), 7)
        })
    }

    /// Runs `ask` on a connection to a fake peer that answers a MapReq or a GrantReq with
    /// success, `fd` attached (and `slot`, `gen` in a GrantReply).
    fn with_fake_peer<T>(
        fd: OwnedFd,
        slot: u32,
        gen: u64,
        ask: impl FnOnce(&Conn) -> T,
    ) -> Option<T> {
        let dir = std::env::temp_dir().join(format!(
            "nixl-seal-{}-{:x}",
            std::process::id(),
            nixl_core::random_u64().unwrap()
        ));
        let be = Arc::new(ShmBackend::new(ShmConfig {
            socket_dir: dir.join("agent"),
            ..ShmConfig::default()
        }));
        let agent = nixl_core::Agent::builder("seal-initiator")
            .backend(be.clone())
            .build()
            .unwrap();
        if be.inner.target.get().is_none() {
            eprintln!("skipped: the shm backend does not run here");
            return None;
        }
        let path = dir.join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let peer = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut framer = Framer::default();
            loop {
                while let Some(body) = framer.next_frame().unwrap() {
                    let reply = match Frame::decode(&body).unwrap() {
                        Frame::MapReq { id, .. } => Frame::MapReply {
                            id,
                            status: Status::Ok,
                            buf_len: 4096,
                            offset: 0,
                            text: String::new(),
                        },
                        Frame::GrantReq { id, .. } => Frame::GrantReply {
                            id,
                            status: Status::Ok,
                            slot,
                            gen,
                            text: String::new(),
                        },
                        _ => continue,
                    };
                    sys::send_with_fd(&s, &reply.encode(), fd.as_raw_fd()).unwrap();
                    // Hold the socket until the initiator is done.
                    let _ = (&s).read(&mut [0u8; 64]);
                    return;
                }
                let spare = framer.spare(4096);
                let n = (&s).read(spare).unwrap();
                framer.commit(4096, n);
                assert!(n > 0, "initiator went away");
            }
        });
        let mut info = ConnInfo::ours(&path.to_string_lossy());
        info.pid = std::process::id();
        let conn = Conn::open(&be.inner, "fake", &info).unwrap();
        let got = ask(&conn);
        conn.mark_closed("test over");
        drop(conn);
        drop(agent);
        peer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        Some(got)
    }

    fn memfd_of(len: i64, seals: libc::c_int) -> OwnedFd {
        // SAFETY: the name is a NUL-terminated static string.
        let raw = unsafe {
            libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate and fcntl with integer arguments on an fd we own.
        unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len), 0);
            if seals != 0 {
                assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals), 0);
            }
        }
        fd
    }

    #[test]
    fn a_lying_peers_grant_is_refused() {
        let region = Desc::new(0x10000, 4096, 0);
        let table = TABLE_BYTES as i64;
        // A grant table that is not sealed, or of the wrong size, or a slot out of range or a
        // zero generation: refused (the transfer then goes the round-trip way).
        let cases: [(OwnedFd, u32, u64, &str); 5] = [
            (memfd_of(table, 0), 1, 1, "not sealed"),
            (memfd_of(table, libc::F_SEAL_SHRINK), 1, 1, "not sealed"),
            (memfd_of(4096, sys::SIZE_SEALS), 1, 1, "bytes, not"),
            (
                memfd_of(table, sys::SIZE_SEALS),
                GRANT_SLOTS as u32,
                1,
                "slot",
            ),
            (memfd_of(table, sys::SIZE_SEALS), 3, 0, "generation 0"),
        ];
        for (fd, slot, gen, want) in cases {
            let Some(got) = with_fake_peer(fd, slot, gen, |c| c.grant_region(&region, 7)) else {
                return;
            };
            let e = got.unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        // A good one is taken, but its slot is live only when the target set it so.
        let fd = memfd_of(table, sys::SIZE_SEALS);
        let Some(got) = with_fake_peer(fd, 3, 9, |c| c.grant_region(&region, 7)) else {
            return;
        };
        let g = got.unwrap();
        assert!(
            !g.live(),
            "the fake peer never wrote generation 9 in slot 3"
        );
        assert!(GrantHold::enter(std::slice::from_ref(&g)).is_none());
        assert_eq!(
            g.table.inflight(3).load(Ordering::SeqCst),
            0,
            "enter backed out"
        );
    }

    #[test]
    fn a_peer_memfd_that_can_shrink_is_not_mapped() {
        // Unsealed: the peer (or anyone holding the fd) could truncate it under our mapping.
        // SAFETY: the name is a NUL-terminated static string.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on an fd we own.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        let Some(got) = map_from_fake_peer(fd) else {
            return;
        };
        let e = got.unwrap_err();
        assert!(e.contains("not sealed"), "{e}");

        // Sealed against shrinking only: growing is refused as well (both seals are asked).
        // SAFETY: as above.
        let raw = unsafe {
            libc::memfd_create(
                c"shrink-only".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        // SAFETY: as above.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fcntl and ftruncate with integer arguments on an fd we own.
        unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), 4096), 0);
            assert_eq!(
                libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK),
                0
            );
        }
        let e = map_from_fake_peer(fd).unwrap().unwrap_err();
        assert!(e.contains("not sealed"), "{e}");

        // Our own buffers are sealed, and a peer's sealed memfd maps.
        let fd = sys::memfd(4096, false).unwrap();
        // SAFETY: ftruncate on an fd we own; the seal makes it fail.
        assert_ne!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0) }, 0);
        let m = map_from_fake_peer(fd).unwrap().unwrap();
        assert_eq!(m.buf_len, 4096);
    }
}
