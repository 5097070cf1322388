//! The `shm` backend: one-sided transfers between agent processes on one node.
//!
//! # Model
//!
//! Transfers are one-sided, but the process that owns the memory checks every access. Each
//! agent's backend serves a Unix stream socket at `<socket_dir>/<agent name>-<instance id>.sock`
//! (a thread accepts, a thread per connection serves); peers find it in the agent's metadata.
//!
//! - **Cross-memory attach** works for memory allocated any way (engines own their buffers).
//!   Posting a transfer sends the target one OP frame: for each descriptor pair the initiator's
//!   address, the target's address, the length and the target region's key. The *target* checks
//!   every descriptor against its own registrations ([`TargetHandle::check`]: inside a region,
//!   within bounds, with its key) and, if one fails, answers `Denied` naming the descriptor and
//!   touches nothing. Otherwise it copies with `process_vm_readv` (WRITE) or
//!   `process_vm_writev` (READ) against the initiator's pid, in batches of up to `IOV_MAX`
//!   iovecs, resuming after short counts, split over [`ShmConfig::copy_threads`] threads for big
//!   transfers; then it delivers the notification, if any (after the data has landed), and
//!   answers DONE. The initiator's addresses were validated by the initiator's own agent.
//! - **Mapped copies** for memory from [`ShmBuffer`] (a memfd). Its registration says it may be
//!   mapped. The initiator asks the target once per region, presenting the region's key; the
//!   target checks key and registration and passes the memfd over the socket (`SCM_RIGHTS`); the
//!   initiator maps the pages that cover the region (`MAP_SHARED`) and from then on copies with
//!   plain loads and stores in its own process, big copies split over a few threads, with no
//!   round trip; a notification follows as a NOTIF frame once the copy has finished. Bounds were
//!   checked against the peer's metadata when the request was created, and the mapping holds
//!   only that region's pages. The memfd is sealed against shrinking, so a mapping can never
//!   fault. When the target deregisters the region it sends REVOKE to every peer that mapped it;
//!   a peer unmaps once its copies in flight on the mapping are over and acknowledges; the
//!   target's deregistration waits for the acknowledgements ([`ShmConfig::revoke_timeout`]),
//!   then gives up with a warning. The mapped path is used when the target's region is mappable
//!   and the initiator's [`ShmConfig::allow_map`] is set.
//!
//! # Security
//!
//! Both ends check `SO_PEERCRED`: the peer runs as our uid, and is the process its metadata (or
//! its HELLO) names; an OP must name the pid of the connection it comes on. Connection info,
//! region data and frames are decoded with bounds checks and limits (frames at most 64 MiB); a
//! frame that does not decode ends that connection, nothing else.
//!
//! `process_vm_*` needs ptrace permission on the other process. Same uid is enough by default,
//! but with Yama's `kernel.yama.ptrace_scope = 1` only ancestors may ptrace: so the backend
//! calls `prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)` when it starts, which lets any process of
//! the same uid ptrace this one (the kernel's other checks still apply; scopes 2 and 3 need
//! `CAP_SYS_PTRACE` or cannot work at all). An `EPERM` from the copy says so.
//!
//! # Faults
//!
//! Every post ends in bounded time. A target that dies closes its socket: every transfer pending
//! on that connection ends `RemoteDisconnect` at once. A target that is alive but stuck fails
//! them after [`ShmConfig::op_timeout`] (plus an allowance for the bytes queued before them).
//! Closing a connection (the peer was invalidated) fails its pending transfers and later posts
//! at once; shutting the backend down ends pending transfers `Cancelled`.
//!
//! Memory safety across those ends: while the target may still write into (READ) or read from
//! (WRITE) the initiator's memory, the initiator keeps the local regions held (their access
//! gates), even after the request ended by timeout, close or shutdown, until the target answers
//! or its end of the socket is closed. So "deregister, then free" stays safe: deregistration
//! waits for a straggling target as it waits for any transfer.

mod buffer;
mod client;
mod server;
mod sys;
mod wire;

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

pub use buffer::ShmBuffer;
use nixl_core::{
    Backend, BackendName, Caps, Connection, Desc, Error, Locality, MemKind, PeerInfo, Region,
    Result, TargetHandle,
};
use parking_lot::{Condvar, Mutex};

/// Settings of the `shm` backend.
#[derive(Clone, Debug)]
pub struct ShmConfig {
    /// Directory of the agent's Unix socket (created if missing, mode 0700). Default:
    /// `$XDG_RUNTIME_DIR/nixl`, else `/tmp/nixl`.
    pub socket_dir: PathBuf,
    /// How long an initiator waits for the target's answer to a transfer (plus an allowance of
    /// one second per 256 MiB queued on the connection) before failing it `RemoteDisconnect`;
    /// also the limit for connecting and for a send to a peer that does not read. Default 5 s.
    pub op_timeout: Duration,
    /// Threads a target uses for one big (8 MiB or more) cross-memory copy. Default: the
    /// available parallelism, at most 8.
    pub copy_threads: usize,
    /// Whether this agent, as initiator, maps peers' memfd buffers when they allow it (else it
    /// always uses cross-memory attach). Default true.
    pub allow_map: bool,
    /// How long deregistering a mapped region waits for the peers that mapped it to let go.
    /// Default 2 s.
    pub revoke_timeout: Duration,
}

impl Default for ShmConfig {
    fn default() -> Self {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        ShmConfig {
            socket_dir: base.join("nixl"),
            op_timeout: Duration::from_secs(5),
            copy_threads: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(8),
            allow_map: true,
            revoke_timeout: Duration::from_secs(2),
        }
    }
}

/// The `shm` backend (see the [module docs](self)).
#[derive(Debug)]
pub struct ShmBackend {
    inner: Arc<Inner>,
}

/// What we compare a peer's connection info with.
#[derive(Debug)]
struct Ours {
    boot_id: String,
    pid_ns: u64,
    uid: u32,
}

/// A connection a peer opened to us, as the deregistration path needs it.
#[derive(Debug)]
struct Served {
    writer: Mutex<std::os::unix::net::UnixStream>,
    /// The socket, for waking its thread at shutdown.
    fd: std::os::fd::RawFd,
}

/// The state shared by the backend, its server threads and its connections.
#[derive(Debug)]
struct Inner {
    cfg: ShmConfig,
    ours: Ours,
    target: OnceLock<TargetHandle>,
    path: OnceLock<PathBuf>,
    listener: OnceLock<Arc<UnixListener>>,
    shut: AtomicBool,
    next_conn: AtomicU64,
    /// Connections peers opened to us, by id.
    served: Mutex<HashMap<u64, Arc<Served>>>,
    /// Region key -> ids of the served connections that were given its memfd.
    granted: Mutex<HashMap<u64, HashSet<u64>>>,
    /// (connection id, key) pairs whose revocation was acknowledged.
    acks: Mutex<HashSet<(u64, u64)>>,
    acks_cv: Condvar,
    /// Connections we opened to peers.
    clients: Mutex<Vec<Weak<client::ConnShared>>>,
}

impl ShmBackend {
    /// A backend with these settings; it binds its socket when its agent starts it.
    pub fn new(cfg: ShmConfig) -> ShmBackend {
        ShmBackend {
            inner: Arc::new(Inner {
                cfg,
                ours: Ours {
                    boot_id: sys::boot_id(),
                    pid_ns: sys::pid_ns(),
                    uid: sys::uid(),
                },
                target: OnceLock::new(),
                path: OnceLock::new(),
                listener: OnceLock::new(),
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

    /// The socket this backend serves, once started.
    pub fn socket_path(&self) -> Option<&std::path::Path> {
        self.inner.path.get().map(PathBuf::as_path)
    }
}

impl Drop for ShmBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

const DRAM: &[MemKind] = &[MemKind::Dram];

/// Keeps `[A-Za-z0-9_-]`, replaces the rest, and cuts to `max` bytes.
fn sanitize(name: &str, max: usize) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect()
}

/// Room in `sockaddr_un.sun_path`, less its NUL.
const MAX_SOCKET_PATH: usize = 107;

fn backend_err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BackendName::Shm,
        op,
        reason: reason.into(),
    }
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
                "process_vm_readv does not work here ({e}); a seccomp filter or container \
                 profile may block it"
            )
        })
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        if self.inner.target.get().is_some() {
            return Err(backend_err("start", "started twice"));
        }
        if let Err(e) = sys::allow_any_ptracer() {
            tracing::warn!(error = %e, "shm: prctl(PR_SET_PTRACER) failed; peers may be refused \
                cross-memory attach under Yama ptrace_scope 1");
        }
        let dir = &self.inner.cfg.socket_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("shm: creating {}", dir.display()), e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Best effort: a shared directory made by someone else keeps its mode.
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let suffix = format!("-{:032x}.sock", target.instance_id());
        let room = MAX_SOCKET_PATH
            .saturating_sub(dir.as_os_str().len() + 1 + suffix.len())
            .min(64);
        if room == 0 {
            return Err(backend_err(
                "start",
                format!(
                    "socket directory {} is too long for a Unix socket path ({MAX_SOCKET_PATH} \
                     bytes at most); set ShmConfig::socket_dir to a shorter one",
                    dir.display()
                ),
            ));
        }
        let path = dir.join(format!("{}{suffix}", sanitize(target.name(), room)));
        // The instance id is random: a file at this path is a leftover of nobody.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io(format!("shm: binding {}", path.display()), e))?;
        let listener = Arc::new(listener);
        let _ = self.inner.target.set(target);
        let _ = self.inner.path.set(path.clone());
        let _ = self.inner.listener.set(Arc::clone(&listener));
        if let Err(e) = server::spawn_accept(&self.inner, listener) {
            let _ = std::fs::remove_file(&path);
            return Err(Error::io("shm: starting the accept thread", e));
        }
        tracing::debug!(path = %path.display(), "shm: serving");
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        wire::ConnInfo {
            boot_id: self.inner.ours.boot_id.clone(),
            pid_ns: self.inner.ours.pid_ns,
            pid: std::process::id(),
            uid: self.inner.ours.uid,
            path: self
                .inner
                .path
                .get()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
        .encode()
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        if kind != MemKind::Dram {
            return Err(Error::InvalidArgument(format!(
                "the shm backend registers DRAM only, not {kind}"
            )));
        }
        let mappable = buffer::find(desc).map(|b| wire::Mappable {
            id: b.id,
            start: b.start,
        });
        Ok(wire::encode_public(mappable))
    }

    fn deregister(&self, region: &Region) {
        let mappable = region
            .backend_public(BackendName::Shm)
            .and_then(wire::decode_public)
            .is_some();
        if mappable {
            self.inner.revoke(region.key);
        }
    }

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), String> {
        let peer =
            wire::ConnInfo::decode(conn_info).map_err(|e| format!("bad shm connection info: {e}"))?;
        let ours = &self.inner.ours;
        if peer.boot_id != ours.boot_id || ours.boot_id.is_empty() {
            Err(format!(
                "peer is on another node (boot id {:?}, ours {:?})",
                peer.boot_id, ours.boot_id
            ))
        } else if peer.pid_ns != ours.pid_ns || ours.pid_ns == 0 {
            Err(format!(
                "peer is in another pid namespace (inode {}, ours {})",
                peer.pid_ns, ours.pid_ns
            ))
        } else if peer.uid != ours.uid {
            Err(format!("peer runs as uid {}, we as {}", peer.uid, ours.uid))
        } else {
            Ok(())
        }
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        if self.inner.shut.load(Ordering::Acquire) {
            return Err(Error::Shutdown("shm backend".into()));
        }
        let info = wire::ConnInfo::decode(peer.conn_info)
            .map_err(|e| backend_err("connect", format!("bad connection info: {e}")))?;
        let conn = client::Conn::open(&self.inner, peer.name, &info)?;
        let mut clients = self.inner.clients.lock();
        clients.retain(|w| w.strong_count() > 0);
        clients.push(conn.downgrade());
        Ok(Arc::new(conn))
    }

    fn shutdown(&self) {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        let clients: Vec<_> = self.inner.clients.lock().drain(..).collect();
        for c in clients.iter().filter_map(Weak::upgrade) {
            c.close("the shm backend shut down", true);
        }
        if let Some(l) = self.inner.listener.get() {
            // Wakes the accept thread (accept fails with EINVAL), which then exits.
            let _ = sys::shutdown(l.as_raw_fd(), std::net::Shutdown::Both);
        }
        for s in self.inner.served.lock().values() {
            // Wakes each serving thread's read; it finishes the op in hand, answers, and exits.
            let _ = sys::shutdown(s.fd, std::net::Shutdown::Read);
        }
        if let Some(p) = self.inner.path.get() {
            let _ = std::fs::remove_file(p);
        }
        self.inner.acks_cv.notify_all();
    }
}

impl Inner {
    /// Revokes every peer's mapping of the region with `key` and waits (bounded) for their
    /// acknowledgements.
    fn revoke(&self, key: u64) {
        let Some(conns) = self.granted.lock().remove(&key) else {
            return;
        };
        let mut frame = Vec::new();
        wire::Frame::Revoke { key }.encode_into(&mut frame);
        for c in &conns {
            let served = self.served.lock().get(c).cloned();
            if let Some(s) = served {
                let _ = sys::send_bytes(&s.writer.lock(), &frame);
            }
        }
        let deadline = std::time::Instant::now() + self.cfg.revoke_timeout;
        let mut acks = self.acks.lock();
        loop {
            let waiting = {
                let served = self.served.lock();
                conns
                    .iter()
                    .filter(|c| served.contains_key(c) && !acks.contains(&(**c, key)))
                    .count()
            };
            if waiting == 0 {
                break;
            }
            if self.shut.load(Ordering::Acquire)
                || self.acks_cv.wait_until(&mut acks, deadline).timed_out()
            {
                tracing::warn!(
                    key,
                    peers = waiting,
                    "shm: peers did not give up their mapping of a deregistered region within \
                     {:?}; they can still write the buffer until they do",
                    self.cfg.revoke_timeout
                );
                break;
            }
        }
        acks.retain(|(_, k)| *k != key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> wire::ConnInfo {
        wire::ConnInfo {
            boot_id: sys::boot_id(),
            pid_ns: sys::pid_ns(),
            pid: 1,
            uid: sys::uid(),
            path: "/x".into(),
        }
    }

    #[test]
    fn reach_rules_say_what_differs() {
        let be = ShmBackend::new(ShmConfig::default());
        assert!(be.can_reach(&info().encode()).is_ok());
        let mut i = info();
        i.boot_id = "other".into();
        assert!(be.can_reach(&i.encode()).unwrap_err().contains("another node"));
        let mut i = info();
        i.pid_ns += 1;
        assert!(be.can_reach(&i.encode()).unwrap_err().contains("pid namespace"));
        let mut i = info();
        i.uid += 1;
        assert!(be.can_reach(&i.encode()).unwrap_err().contains("uid"));
        assert!(be.can_reach(b"garbage").unwrap_err().contains("bad shm"));
        assert!(be.can_reach(&[]).is_err());
    }

    #[test]
    fn sanitize_keeps_safe_characters() {
        assert_eq!(sanitize("prefill-0/../x y", 64), "prefill-0____x_y");
        assert_eq!(sanitize("abcdef", 3), "abc");
    }

    #[test]
    fn register_tells_mappable_memory_apart() {
        let be = ShmBackend::new(ShmConfig::default());
        let buf = ShmBuffer::new(8192).unwrap();
        let p = be.register(MemKind::Dram, &buf.desc()).unwrap();
        let m = wire::decode_public(&p).unwrap();
        assert_eq!(m.start, buf.as_ptr() as u64);
        let v = vec![0u8; 100];
        let p = be.register(MemKind::Dram, &Desc::from_slice(&v)).unwrap();
        assert_eq!(wire::decode_public(&p), None);
        assert!(be.register(MemKind::File, &Desc::new(0, 1, 3)).is_err());
    }
}
