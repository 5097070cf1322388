//! The `shm` backend: transfers between agent processes on one node.
//!
//! # Two paths
//!
//! - **Cross-memory attach** works for memory allocated any way (engines own their buffers).
//!   The initiator sends the target one Op frame over the target's Unix socket; the *target*
//!   checks every descriptor against its own registrations (region, bounds, key), then copies
//!   with `process_vm_readv` (WRITE) or `process_vm_writev` (READ) against the initiator's pid,
//!   splitting big transfers over several threads, delivers the notification after the data has
//!   landed, and answers Done. The owner of the memory decides, and nothing is touched if a
//!   check fails.
//! - **Mapped copies** for memory from [`ShmBuffer`] (a memfd). Its registration says it may be
//!   mapped; the initiator asks the target once, presenting the region's key, receives the memfd
//!   over the socket (SCM_RIGHTS), maps it, and then copies with plain loads and stores in its
//!   own process, at memory bandwidth, with no round trip per transfer. When the target
//!   deregisters the region it revokes the mapping from every peer and waits (bounded) for the
//!   acknowledgements, so a deregistered buffer is not written afterwards.
//!
//! # Security and faults
//!
//! Both ends check `SO_PEERCRED`: the peer runs as our uid and is the process its metadata names.
//! Every frame is length-bounded and decoded without trusting it; a bad frame drops that
//! connection only. A target that dies closes the socket, and every transfer pending on it ends
//! `Failed(remote disconnect)` at once; a target that is alive but stuck fails them after
//! `op_timeout` plus a size allowance. `process_vm_*` needs ptrace permission on the peer: on
//! hosts with Yama `ptrace_scope = 1` the backend calls `prctl(PR_SET_PTRACER, ANY)` at start, and
//! an EPERM is reported with that explanation.

mod buffer;
mod sys;
#[doc(hidden)] // for the fuzz targets (fuzz/): the frames a peer sends on the socket
pub mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

pub use buffer::ShmBuffer;
use nixl_core::codec::Reader;
use nixl_core::region::{enter_all, leave_all, AccessGate, Ticket};
use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, RegionAccess, Result, TargetHandle, XferOp, XferPlan,
};
use parking_lot::{Condvar, Mutex};
use sys::{Cma, Span};
use wire::{Frame, Framer, Status, WireSeg};

use crate::copy::{CopyOp, CopyPlan, CopyPool, INLINE_MAX};

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
    /// How long deregistration waits for peers to give up a mapping.
    pub revoke_timeout: Duration,
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
        }
    }
}

/// The `shm` backend.
#[derive(Debug)]
pub struct ShmBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct ServerConn {
    writer: Arc<Mutex<UnixStream>>,
}

#[derive(Debug)]
struct Inner {
    cfg: ShmConfig,
    target: OnceLock<TargetHandle>,
    path: OnceLock<PathBuf>,
    shut: AtomicBool,
    next_conn: AtomicU64,
    /// Connections peers opened to us.
    served: Mutex<HashMap<u64, ServerConn>>,
    /// Region key -> connections that mapped it.
    granted: Mutex<HashMap<u64, HashSet<u64>>>,
    /// (connection, key) pairs whose revocation was acknowledged.
    acks: Mutex<HashSet<(u64, u64)>>,
    acks_cv: Condvar,
    /// Connections we opened to peers.
    clients: Mutex<Vec<Weak<Conn>>>,
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
                next_conn: AtomicU64::new(1),
                served: Mutex::new(HashMap::new()),
                granted: Mutex::new(HashMap::new()),
                acks: Mutex::new(HashSet::new()),
                acks_cv: Condvar::new(),
                clients: Mutex::new(Vec::new()),
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
        crate::unix::secure_socket_dir(dir, "shm")?;
        let path = dir.join(format!(
            "{}-{:032x}.sock",
            sanitize(target.name()),
            target.instance_id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io(format!("shm: bind {}", path.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("shm: listener", e))?;
        let _ = self.inner.target.set(target);
        let _ = self.inner.path.set(path);
        let inner = Arc::clone(&self.inner);
        std::thread::Builder::new()
            .name("nixl-shm-accept".into())
            .spawn(move || accept_loop(inner, listener))
            .map_err(|e| Error::io("shm: spawn accept thread", e))?;
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
        let mut clients = self.inner.clients.lock();
        clients.retain(|w| w.strong_count() > 0);
        clients.push(Arc::downgrade(&conn));
        Ok(conn)
    }

    fn shutdown(&self) {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        for c in self.inner.clients.lock().drain(..) {
            if let Some(c) = c.upgrade() {
                c.end_all_early(&Error::Cancelled);
                c.mark_closed("agent shut down");
            }
        }
        for (_, s) in self.inner.served.lock().drain() {
            let _ = s.writer.lock().shutdown(std::net::Shutdown::Both);
        }
        if let Some(p) = self.inner.path.get() {
            let _ = std::fs::remove_file(p);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Target side.

fn accept_loop(inner: Arc<Inner>, listener: UnixListener) {
    while !inner.shut.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                let inner = Arc::clone(&inner);
                let spawned = std::thread::Builder::new()
                    .name("nixl-shm-serve".into())
                    .spawn(move || {
                        if let Err(e) = serve(&inner, stream) {
                            tracing::debug!(error = %e, "shm: connection ended");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "shm: cannot serve a connection");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Sleep in poll(2) until a peer connects (at once) or 200 ms pass (to look at
                // `shut`): an idle agent wakes 5 times a second here, not 100.
                let mut pfd = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd on our own listening socket, for the call's duration.
                unsafe { libc::poll(&mut pfd, 1, 200) };
            }
            Err(e) => {
                tracing::warn!(error = %e, "shm: accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn send(w: &Mutex<UnixStream>, f: &Frame) -> io::Result<()> {
    let bytes = f.encode();
    w.lock().write_all(&bytes)
}

/// Serves one connection a peer opened to us, until it closes.
fn serve(inner: &Arc<Inner>, stream: UnixStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let (cred_pid, cred_uid) = sys::peer_cred(&stream)?;
    if cred_uid != sys::uid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("peer uid {cred_uid} is not ours"),
        ));
    }
    let target = inner
        .target
        .get()
        .cloned()
        .ok_or_else(|| io::Error::other("not started"))?;
    let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    inner.served.lock().insert(
        id,
        ServerConn {
            writer: Arc::clone(&writer),
        },
    );
    let result = serve_frames(inner, &target, &stream, &writer, id, cred_pid);
    inner.served.lock().remove(&id);
    for conns in inner.granted.lock().values_mut() {
        conns.remove(&id);
    }
    inner.acks_cv.notify_all();
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
                inner.acks.lock().insert((conn_id, key));
                inner.acks_cv.notify_all();
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
    let threads = inner.cfg.copy_threads.max(1);
    let result = if total >= (8 << 20) && threads > 1 {
        let parts = split_spans(&ours, &theirs, threads);
        std::thread::scope(|sc| {
            let handles: Vec<_> = parts
                .iter()
                .map(|(o, t)| {
                    // SAFETY: every span of `o` was checked against a registration held in
                    // `held` (live memory of ours) for the whole scope.
                    sc.spawn(move || unsafe { sys::cross_copy(peer_pid, dir, o, t) })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("copy thread panicked")))
                })
                .try_fold(0u64, |acc, r| r.map(|n| acc + n))
        })
    } else {
        // SAFETY: as above.
        unsafe { sys::cross_copy(peer_pid, dir, &ours, &theirs) }
    };
    drop(held);
    match result {
        Ok(n) if n == total => (Status::Ok, String::new()),
        Ok(n) => (Status::Failed, format!("moved {n} of {total} bytes")),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => (
            Status::Failed,
            format!(
                "process_vm_{} on pid {peer_pid}: {e} (ptrace permission: same uid needed, and \
                 Yama ptrace_scope <= 1 with PR_SET_PTRACER, or CAP_SYS_PTRACE)",
                if write { "readv" } else { "writev" }
            ),
        ),
        Err(e) => (Status::Failed, format!("cross-memory copy: {e}")),
    }
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
            inner.granted.lock().entry(key).or_default().insert(conn_id);
            None
        }
    }
}

impl Inner {
    /// Revokes every peer's mapping of the region with `key` and waits (bounded) for them.
    fn revoke(&self, key: u64) {
        let conns = self.granted.lock().remove(&key).unwrap_or_default();
        if conns.is_empty() {
            return;
        }
        for c in &conns {
            let writer = self.served.lock().get(c).map(|s| Arc::clone(&s.writer));
            if let Some(w) = writer {
                let _ = send(&w, &Frame::Revoke { key });
            }
        }
        let deadline = Instant::now() + self.cfg.revoke_timeout;
        let mut acks = self.acks.lock();
        loop {
            let served = self.served.lock();
            let waiting: Vec<u64> = conns
                .iter()
                .copied()
                .filter(|c| served.contains_key(c) && !acks.contains(&(*c, key)))
                .collect();
            drop(served);
            if waiting.is_empty() {
                break;
            }
            if self.acks_cv.wait_until(&mut acks, deadline).timed_out() {
                tracing::warn!(
                    key,
                    peers = waiting.len(),
                    "shm: peers did not give up a mapping of a deregistered region in time"
                );
                break;
            }
        }
        acks.retain(|(_, k)| *k != key);
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
/// A peer's answer to a mapping request: the memfd, the buffer length, the region's offset.
type Granted = std::result::Result<(OwnedFd, u64, u64), String>;

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
    fn map_region(&self, region: &Desc, key: u64) -> MapResult {
        if let Some(m) = self.maps.lock().get(&key) {
            return Ok(Arc::clone(m));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.map_waits.lock().insert(id, None);
        let req = Frame::MapReq {
            id,
            addr: region.addr,
            len: region.len,
            key,
        };
        if let Err(e) = self.send(&req) {
            self.map_waits.lock().remove(&id);
            return Err(e.to_string());
        }
        let deadline = Instant::now() + self.backend.cfg.op_timeout;
        let mut waits = self.map_waits.lock();
        let got = loop {
            if let Some(Some(r)) = waits.get_mut(&id).map(Option::take) {
                break r;
            }
            if self.closed.load(Ordering::Acquire) {
                break Err("connection closed".into());
            }
            if self.map_cv.wait_until(&mut waits, deadline).timed_out() {
                break Err("no answer to the mapping request".into());
            }
        };
        waits.remove(&id);
        drop(waits);
        let (fd, buf_len, offset) = got?;
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
        } => {
            let r = if status == Status::Ok {
                match fds.pop_front() {
                    Some(fd) => Ok((fd, buf_len, offset)),
                    None => Err("mapping reply came without a file descriptor".into()),
                }
            } else {
                Err(text)
            };
            if let Some(slot) = c.map_waits.lock().get_mut(&id) {
                *slot = Some(r);
            }
            c.map_cv.notify_all();
        }
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

impl Connection for Conn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        let write = plan.op == XferOp::Write;
        let total = plan.total_bytes();
        let conn = self.self_arc()?;
        // Mapped path when we allow it and every remote region is mappable and mapped.
        if self.backend.cfg.allow_map {
            let mappable = plan.remote_regions.iter().all(|r| {
                r.backends
                    .iter()
                    .any(|(b, p)| *b == BackendName::Shm && parse_public(p).is_some())
            });
            if mappable {
                let maps: std::result::Result<Vec<Arc<Mapping>>, String> = plan
                    .remote_regions
                    .iter()
                    .map(|r| self.map_region(&r.desc, r.key))
                    .collect();
                match maps {
                    Ok(maps) => {
                        let ops = plan
                            .segments
                            .iter()
                            .map(|s| {
                                let m = &maps[s.remote_region as usize];
                                let mapped =
                                    m.base as u64 + m.offset + (s.remote.addr - m.region_addr);
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
                    Err(reason) => {
                        if reason.contains("denied") || reason.contains("key") {
                            return Err(Error::Denied {
                                peer: self.peer.to_string(),
                                reason,
                            });
                        }
                        tracing::debug!(peer = %self.peer, %reason,
                            "shm: mapping refused; using cross-memory attach");
                    }
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

    /// A fake peer answers a mapping request with `fd`; returns what the initiator made of it.
    fn map_from_fake_peer(fd: OwnedFd) -> Option<MapResult> {
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
                    if let Frame::MapReq { id, .. } = Frame::decode(&body).unwrap() {
                        let reply = Frame::MapReply {
                            id,
                            status: Status::Ok,
                            buf_len: 4096,
                            offset: 0,
                            text: String::new(),
                        };
                        sys::send_with_fd(&s, &reply.encode(), fd.as_raw_fd()).unwrap();
                        // Hold the socket until the initiator is done.
                        let _ = (&s).read(&mut [0u8; 64]);
                        return;
                    }
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
        let got = conn.map_region(&Desc::new(0x10000, 4096, 0), 7);
        conn.mark_closed("test over");
        drop(conn);
        drop(agent);
        peer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        Some(got)
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
