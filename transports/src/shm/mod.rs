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
//!
//! # Files
//!
//! `config.rs` the settings; this file the backend and what it publishes; `serve.rs` the
//! target's side of the socket (Ops, mappings, their revocation); `split.rs` big cross-memory
//! copies cut over the copy pool; `grants.rs` the cross-memory grant tables (both sides);
//! `conn.rs` the initiator's connection; `xfer.rs` its prepared transfers; `wire.rs` the frames;
//! `sys.rs` the system calls; `buffer.rs` [`ShmBuffer`]; `tests.rs` the unit tests.

mod buffer;
mod config;
mod conn;
mod grants;
mod serve;
mod split;
mod sys;
#[cfg(test)]
mod tests;
pub(crate) mod wire;
mod xfer;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

pub use buffer::ShmBuffer;
pub use config::ShmConfig;
use conn::*;
use grants::*;
use nixl_core::codec::Reader;
use nixl_core::region::{enter_all, leave_all, AccessGate, Ticket};
use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, RegionAccess, Registered, Result, Run, Runs, TargetHandle, Unusable, XferOp,
    XferPlan,
};
use parking_lot::{Condvar, Mutex};
use serve::*;
use split::*;
use sys::{Cma, Cursor, Pairs};
use wire::{Frame, Framer, Status, WireSeg};
use xfer::*;

use crate::copy::{CopyOp, CopyPlan, CopyPool, INLINE_MAX};
use crate::owner::{Clients, Peers};

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

impl Backend for ShmBackend {
    fn name(&self) -> BackendName {
        BackendName::Shm
    }

    fn caps(&self) -> Caps {
        Caps::new(DRAM, Locality::SameNode, 3)
    }

    fn probe(&self) -> std::result::Result<(), Unusable> {
        sys::probe_cma().map_err(|e| {
            Unusable::failed(
                "process_vm_readv does not work here (seccomp or a container may block it)",
                e,
            )
        })
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        sys::allow_any_ptracer();
        let dir = &self.inner.cfg.socket_dir;
        let path = dir.join(crate::owner::socket_file("", &target));
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

    fn deregister(&self, region: Registered<'_>) {
        let mappable = parse_public(region.public).is_some();
        if mappable {
            self.inner.revoke(region.key);
        }
        self.inner.revoke_grants(region.key);
    }

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), Unusable> {
        let peer = ConnInfo::decode(conn_info)?;
        let ours = ConnInfo::ours("");
        if peer.boot_id != ours.boot_id {
            Err("peer is on another node (boot id differs)".into())
        } else if peer.pid_ns != ours.pid_ns {
            Err("peer is in another pid namespace".into())
        } else if peer.uid != ours.uid {
            Err(format!("peer runs as uid {}, we as {}", peer.uid, ours.uid).into())
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
