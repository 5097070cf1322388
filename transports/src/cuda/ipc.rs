//! The owner's Unix socket: grants exported VMM fds to peers that present the region key, records
//! which peer imported which region, revokes those imports when the owner deregisters, and
//! receives notifications; plus the importer's side: a client with a reader thread per
//! connection, and the cache of mappings with their revocation.
//!
//! # Wire format
//!
//! Every frame is `u32 length` (at most [`MAX_FRAME`]) then a body starting with a type byte:
//!
//! ```text
//!   peer → owner                                                         owner → peer
//! 1 Grant    u64 id, u64 dev, u64 addr, u64 len, u64 key, u32 chunk
//! 2                                                   Granted  u64 id, u64 alloc size + one fd
//! 3                                                   Refused  u64 id, str reason
//! 4 Notif    u64 id, str from, blob msg
//! 5                                                   Ack      u64 id
//! 6 Opened   u64 id, u64 dev, u64 addr, u64 len, u64 key
//! 7                                                   Revoke   u64 dev, u64 addr, u64 len, u64 key
//! 8 Revoked  u64 dev, u64 addr, u64 len, u64 key
//! ```
//!
//! The region in Grant, Opened, Revoke and Revoked is the whole registered region as the owner's
//! metadata publishes it, and `key` its key. Grant (answered Granted or Refused) asks for a VMM
//! chunk's fd; Opened (answered Ack or Refused) announces that the peer is about to map the
//! region through handles it holds from the metadata (legacy IPC, fabric). The owner checks both
//! with the region key (`TargetHandle::check`, whole region only), and records the import while
//! the check still holds the region, so a deregistration cannot slip between the check and the
//! record. A peer never uses a region whose announcement was refused.
//!
//! # Revocation
//!
//! On deregistration the owner sends Revoke to every connection that imported the region and
//! waits, at most its timeout, for Revoked from each ([`IpcServer::revoke`]). A connection that
//! has ended (the peer died) is skipped at once; one that does not answer in time is reported and
//! the owner goes on. The peer, on Revoke, closes the region's gate so no new copy starts, waits
//! (bounded) for copies in flight on it, closes its mappings, drops it from its [`ImportCache`]
//! and answers Revoked ([`RevokeSink`]). A connection to an owner that ends, for whatever reason,
//! makes the peer give up every mapping imported from that owner: the owner no longer tracks
//! them, so it could not revoke them.
//!
//! # Faults
//!
//! Both ends check `SO_PEERCRED`: the peer runs as our uid. Every frame is length-bounded and
//! decoded without trust; a malformed, oversized or out-of-direction frame drops that connection
//! only. The socket lives in a directory of mode 0700. A client waits at most its timeout for any
//! reply, and every write on either side has that timeout, so a dead or stuck owner or peer is a
//! clear error, never a hang.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nixl_core::codec::Reader;
use nixl_core::region::{enter_all, leave_all, AccessGate, Ticket};
use nixl_core::{BackendName, DecodeError, Desc, Error, Result};
use parking_lot::{Condvar, Mutex};

/// Largest frame body.
pub const MAX_FRAME: usize = (1 << 20) + 4096;
/// Longest notification message carried: the one limit of every backend.
pub const MAX_NOTIF: usize = nixl_core::MAX_NOTIF_BYTES;

const T_GRANT: u8 = 1;
const T_GRANTED: u8 = 2;
const T_REFUSED: u8 = 3;
const T_NOTIF: u8 = 4;
const T_ACK: u8 = 5;
const T_OPENED: u8 = 6;
const T_REVOKE: u8 = 7;
const T_REVOKED: u8 = 8;

/// One message on the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Asks for chunk `chunk` of the region `region`, presenting `key`.
    Grant {
        /// Request id.
        id: u64,
        /// The region as the peer's metadata describes it.
        region: Desc,
        /// The region key.
        key: u64,
        /// Chunk index.
        chunk: u32,
    },
    /// The fd comes with this frame.
    Granted {
        /// Request id.
        id: u64,
        /// Size of the exported allocation.
        alloc_size: u64,
    },
    /// Refused, with the reason.
    Refused {
        /// Request id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// A notification for the owner agent.
    Notif {
        /// Request id.
        id: u64,
        /// Sender agent name.
        from: String,
        /// The message.
        msg: Vec<u8>,
    },
    /// The notification was delivered, or the announcement accepted.
    Ack {
        /// Request id.
        id: u64,
    },
    /// The peer announces that it maps `region` through handles from the metadata.
    Opened {
        /// Request id.
        id: u64,
        /// The region as the peer's metadata describes it.
        region: Desc,
        /// The region key.
        key: u64,
    },
    /// The owner deregistered `region`: the peer must stop using it and close its mappings.
    Revoke {
        /// The region.
        region: Desc,
        /// Its key.
        key: u64,
    },
    /// The peer has closed its mappings of `region`.
    Revoked {
        /// The region.
        region: Desc,
        /// Its key.
        key: u64,
    },
}

fn put_region(b: &mut Vec<u8>, region: &Desc, key: u64) {
    for x in [region.dev_id, region.addr, region.len, key] {
        b.extend_from_slice(&x.to_le_bytes());
    }
}

fn get_region(r: &mut Reader<'_>) -> std::result::Result<(Desc, u64), DecodeError> {
    let dev = r.u64("dev")?;
    let addr = r.u64("addr")?;
    let len = r.u64("len")?;
    Ok((Desc::new(addr, len, dev), r.u64("key")?))
}

impl Frame {
    /// Encodes with the length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 4];
        match self {
            Frame::Grant {
                id,
                region,
                key,
                chunk,
            } => {
                b.push(T_GRANT);
                b.extend_from_slice(&id.to_le_bytes());
                put_region(&mut b, region, *key);
                b.extend_from_slice(&chunk.to_le_bytes());
            }
            Frame::Granted { id, alloc_size } => {
                b.push(T_GRANTED);
                b.extend_from_slice(&id.to_le_bytes());
                b.extend_from_slice(&alloc_size.to_le_bytes());
            }
            Frame::Refused { id, reason } => {
                b.push(T_REFUSED);
                b.extend_from_slice(&id.to_le_bytes());
                let r = truncate(reason, 4000);
                b.extend_from_slice(&(r.len() as u16).to_le_bytes());
                b.extend_from_slice(r.as_bytes());
            }
            Frame::Notif { id, from, msg } => {
                b.push(T_NOTIF);
                b.extend_from_slice(&id.to_le_bytes());
                let f = truncate(from, 256);
                b.extend_from_slice(&(f.len() as u16).to_le_bytes());
                b.extend_from_slice(f.as_bytes());
                b.extend_from_slice(&(msg.len() as u32).to_le_bytes());
                b.extend_from_slice(msg);
            }
            Frame::Ack { id } => {
                b.push(T_ACK);
                b.extend_from_slice(&id.to_le_bytes());
            }
            Frame::Opened { id, region, key } => {
                b.push(T_OPENED);
                b.extend_from_slice(&id.to_le_bytes());
                put_region(&mut b, region, *key);
            }
            Frame::Revoke { region, key } => {
                b.push(T_REVOKE);
                put_region(&mut b, region, *key);
            }
            Frame::Revoked { region, key } => {
                b.push(T_REVOKED);
                put_region(&mut b, region, *key);
            }
        }
        let n = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&n.to_le_bytes());
        b
    }

    /// Decodes a body (without the length prefix).
    pub fn decode(body: &[u8]) -> std::result::Result<Frame, DecodeError> {
        let mut r = Reader::new(body);
        let f = match r.u8("frame type")? {
            T_GRANT => {
                let id = r.u64("id")?;
                let (region, key) = get_region(&mut r)?;
                Frame::Grant {
                    id,
                    region,
                    key,
                    chunk: r.u32("chunk")?,
                }
            }
            T_GRANTED => Frame::Granted {
                id: r.u64("id")?,
                alloc_size: r.u64("alloc size")?,
            },
            T_REFUSED => Frame::Refused {
                id: r.u64("id")?,
                reason: r.str("reason", 4000)?,
            },
            T_NOTIF => {
                let id = r.u64("id")?;
                let from = r.str("from", 256)?;
                let msg = r.blob("notification")?;
                if msg.len() > MAX_NOTIF {
                    return Err(DecodeError::TooLarge {
                        field: "notification",
                        got: msg.len(),
                        limit: MAX_NOTIF,
                    });
                }
                Frame::Notif {
                    id,
                    from,
                    msg: msg.to_vec(),
                }
            }
            T_ACK => Frame::Ack { id: r.u64("id")? },
            T_OPENED => {
                let id = r.u64("id")?;
                let (region, key) = get_region(&mut r)?;
                Frame::Opened { id, region, key }
            }
            T_REVOKE => {
                let (region, key) = get_region(&mut r)?;
                Frame::Revoke { region, key }
            }
            T_REVOKED => {
                let (region, key) = get_region(&mut r)?;
                Frame::Revoked { region, key }
            }
            t => {
                return Err(DecodeError::Invalid {
                    field: "frame type",
                    reason: format!("unknown type {t}"),
                })
            }
        };
        if !r.is_empty() {
            return Err(DecodeError::Invalid {
                field: "frame",
                reason: "trailing bytes".into(),
            });
        }
        Ok(f)
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(crate) use crate::unix::{boot_id, peer_cred, uid};
use crate::unix::{recv_with_fds, send_with_fd};

/// Reads one frame body (and any fds that came with it). `Ok(None)` on a clean EOF.
fn read_frame(s: &UnixStream, fds: &mut Vec<OwnedFd>) -> io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = recv_with_fds(s, &mut head[got..], fds)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "frame cut short",
                ))
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(head) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes (limit {MAX_FRAME})"),
        ));
    }
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = recv_with_fds(s, &mut body[got..], fds)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "frame cut short",
            ));
        }
        got += n;
    }
    Ok(Some(body))
}

/// Writes one whole frame; a failed or timed-out write leaves the stream mid-frame, so the
/// connection is shut down (its reader sees the end and cleans up).
fn write_frame(w: &Mutex<UnixStream>, bytes: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let s = w.lock();
    let r = match fd {
        Some(fd) => send_with_fd(&s, bytes, fd),
        None => (&*s).write_all(bytes),
    };
    if r.is_err() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Server.

/// Keeps the owner's region from being deregistered (its `RegionAccess`) until the server has
/// recorded an import and sent its answer.
pub type Hold = Box<dyn Send>;

/// A granted chunk.
pub struct Grant {
    /// A duplicate of the chunk's exported fd.
    pub fd: OwnedFd,
    /// Size of the exported allocation.
    pub alloc_size: u64,
    /// Held until the grant is recorded and sent.
    pub hold: Hold,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("fd", &self.fd)
            .field("alloc_size", &self.alloc_size)
            .finish_non_exhaustive()
    }
}

/// What the server asks its owner (the backend; a fake in tests).
pub trait GrantSource: Send + Sync {
    /// Checks the peer's access to chunk `chunk` of the whole region `region` with `key` and
    /// returns a duplicate of the chunk's exported fd and the allocation size, or the reason for
    /// refusing.
    fn grant(&self, region: &Desc, key: u64, chunk: u32) -> std::result::Result<Grant, String>;
    /// Checks the peer's announcement that it maps the whole region `region` (presenting `key`)
    /// through handles from the metadata; `Err(reason)` refuses it.
    fn opened(&self, region: &Desc, key: u64) -> std::result::Result<Hold, String>;
    /// Delivers a notification from agent `from`.
    fn notify(&self, from: &str, msg: Vec<u8>);
}

/// The outcome of [`IpcServer::revoke`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevokeReport {
    /// Connections that had imported the region.
    pub peers: usize,
    /// Those that acknowledged in time.
    pub acked: usize,
    /// Those whose connection had ended or ended meanwhile (skipped).
    pub gone: usize,
    /// Those still silent at the deadline (reported; the owner went on).
    pub late: usize,
}

/// A region as the owner published it, with its key.
type RegionId = (Desc, u64);

#[derive(Debug)]
struct ServerShared {
    path: PathBuf,
    shut: AtomicBool,
    /// Writers of the live connections (the serving thread answers, `revoke` sends Revoke).
    conns: Mutex<HashMap<u64, Arc<Mutex<UnixStream>>>>,
    next: AtomicU64,
    /// Which connections imported which region.
    imports: Mutex<HashMap<RegionId, HashSet<u64>>>,
    /// Revocations in progress: (connection, region) → acknowledged.
    revokes: Mutex<HashMap<(u64, RegionId), bool>>,
    revoke_cv: Condvar,
    /// Write timeout of every connection.
    io_timeout: Duration,
}

/// The owner's socket service. Stops (and removes its socket) on [`IpcServer::shutdown`] or drop.
#[derive(Debug)]
pub struct IpcServer {
    shared: Arc<ServerShared>,
}

impl IpcServer {
    /// Binds `dir/<file>` (`dir` created with mode 0700, or refused unless ours and private:
    /// see `unix::secure_socket_dir`) and serves `source` (held weakly: a dropped owner is
    /// answered "shut down"). Writes to a peer time out after `io_timeout`.
    pub fn start(
        dir: &Path,
        file: &str,
        source: Weak<dyn GrantSource>,
        io_timeout: Duration,
    ) -> Result<IpcServer> {
        crate::unix::secure_socket_dir(dir, "cuda")?;
        let path = dir.join(file);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io(format!("cuda: bind {}", path.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("cuda: listener", e))?;
        let shared = Arc::new(ServerShared {
            path,
            shut: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            imports: Mutex::new(HashMap::new()),
            revokes: Mutex::new(HashMap::new()),
            revoke_cv: Condvar::new(),
            io_timeout: io_timeout.max(Duration::from_millis(1)),
        });
        let sh = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("nixl-cuda-ipc".into())
            .spawn(move || accept_loop(sh, listener, source))
            .map_err(|e| Error::io("cuda: spawn the socket thread", e))?;
        Ok(IpcServer { shared })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Connections that imported `region` (with key `key`) and have not given it up.
    pub fn importers(&self, region: &Desc, key: u64) -> usize {
        self.shared
            .imports
            .lock()
            .get(&(*region, key))
            .map_or(0, HashSet::len)
    }

    /// Revokes every peer's import of `region` (with key `key`): sends Revoke to each connection
    /// that imported it and waits until each has answered Revoked or ended, at most `timeout`.
    /// Peers still silent then are logged and counted in [`RevokeReport::late`].
    pub fn revoke(&self, region: &Desc, key: u64, timeout: Duration) -> RevokeReport {
        let sh = &self.shared;
        let id: RegionId = (*region, key);
        let holders: Vec<u64> = sh
            .imports
            .lock()
            .remove(&id)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        let mut report = RevokeReport {
            peers: holders.len(),
            ..RevokeReport::default()
        };
        if holders.is_empty() {
            return report;
        }
        let deadline = Instant::now() + timeout;
        {
            // Registered before sending, so that an answer cannot come before its slot.
            let mut r = sh.revokes.lock();
            for c in &holders {
                r.insert((*c, id), false);
            }
        }
        let frame = Frame::Revoke {
            region: *region,
            key,
        }
        .encode();
        for c in &holders {
            let w = sh.conns.lock().get(c).cloned();
            if let Some(w) = w {
                if let Err(e) = write_frame(&w, &frame, None) {
                    tracing::debug!(conn = c, error = %e, "cuda: sending a revocation failed");
                }
            }
        }
        let mut r = sh.revokes.lock();
        loop {
            let waiting = {
                let conns = sh.conns.lock();
                holders
                    .iter()
                    .filter(|c| conns.contains_key(c) && r.get(&(**c, id)) == Some(&false))
                    .count()
            };
            if waiting == 0 || sh.shut.load(Ordering::Acquire) {
                break;
            }
            if sh.revoke_cv.wait_until(&mut r, deadline).timed_out() {
                break;
            }
        }
        let conns = sh.conns.lock();
        for c in &holders {
            match r.remove(&(*c, id)) {
                Some(true) => report.acked += 1,
                _ if !conns.contains_key(c) => report.gone += 1,
                _ => report.late += 1,
            }
        }
        drop(conns);
        drop(r);
        if report.late > 0 {
            metrics::counter!("nixl_cuda_revoke_timeouts_total").increment(report.late as u64);
            tracing::warn!(
                region = format_args!("{:#x}+{} dev {}", region.addr, region.len, region.dev_id),
                late = report.late,
                ?timeout,
                "cuda: peers did not give up their mappings of a deregistered region in time"
            );
        }
        report
    }

    /// Stops accepting, closes every connection, removes the socket.
    pub fn shutdown(&self) {
        if self.shared.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        for (_, c) in self.shared.conns.lock().drain() {
            let _ = c.lock().shutdown(std::net::Shutdown::Both);
        }
        self.shared.revoke_cv.notify_all();
        let _ = std::fs::remove_file(&self.shared.path);
    }
}

impl Drop for IpcServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(sh: Arc<ServerShared>, listener: UnixListener, source: Weak<dyn GrantSource>) {
    while !sh.shut.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                let sh2 = Arc::clone(&sh);
                let source = source.clone();
                let spawned = std::thread::Builder::new()
                    .name("nixl-cuda-serve".into())
                    .spawn(move || {
                        if let Err(e) = serve(&sh2, stream, &source) {
                            tracing::debug!(error = %e, "cuda: socket connection ended");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cuda: cannot serve a connection");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cuda: accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve(sh: &ServerShared, stream: UnixStream, source: &Weak<dyn GrantSource>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let (_, cred_uid) = peer_cred(&stream)?;
    if cred_uid != uid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("peer uid {cred_uid} is not ours"),
        ));
    }
    stream.set_write_timeout(Some(sh.io_timeout))?;
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let id = sh.next.fetch_add(1, Ordering::Relaxed);
    sh.conns.lock().insert(id, Arc::clone(&writer));
    let result = if sh.shut.load(Ordering::Acquire) {
        Ok(())
    } else {
        serve_frames(sh, id, &stream, &writer, source)
    };
    // The connection is over: nothing it imported is tracked any more (the peer gives its
    // mappings up when it sees the end), and a revocation waiting for it goes on.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    sh.conns.lock().remove(&id);
    sh.imports.lock().retain(|_, conns| {
        conns.remove(&id);
        !conns.is_empty()
    });
    let _r = sh.revokes.lock();
    sh.revoke_cv.notify_all();
    result
}

fn record(sh: &ServerShared, conn: u64, region: &Desc, key: u64) {
    sh.imports
        .lock()
        .entry((*region, key))
        .or_default()
        .insert(conn);
}

fn serve_frames(
    sh: &ServerShared,
    conn: u64,
    stream: &UnixStream,
    writer: &Mutex<UnixStream>,
    source: &Weak<dyn GrantSource>,
) -> io::Result<()> {
    let mut junk = Vec::new();
    loop {
        let Some(body) = read_frame(stream, &mut junk)? else {
            return Ok(());
        };
        // A client never sends fds; drop any it did.
        junk.clear();
        let frame = Frame::decode(&body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let Some(src) = source.upgrade() else {
            let id = match frame {
                Frame::Grant { id, .. } | Frame::Notif { id, .. } | Frame::Opened { id, .. } => id,
                _ => 0,
            };
            let f = Frame::Refused {
                id,
                reason: "the agent has shut down".into(),
            };
            write_frame(writer, &f.encode(), None)?;
            return Ok(());
        };
        let refuse = |id: u64, reason: String| {
            metrics::counter!("nixl_access_denied_total", "backend" => "cuda").increment(1);
            write_frame(writer, &Frame::Refused { id, reason }.encode(), None)
        };
        match frame {
            Frame::Grant {
                id,
                region,
                key,
                chunk,
            } => match src.grant(&region, key, chunk) {
                Ok(g) => {
                    // Recorded and answered while the region is held: a deregistration waits
                    // for both and then finds this import.
                    record(sh, conn, &region, key);
                    let f = Frame::Granted {
                        id,
                        alloc_size: g.alloc_size,
                    };
                    write_frame(writer, &f.encode(), Some(g.fd.as_raw_fd()))?;
                    drop(g);
                }
                Err(reason) => refuse(id, reason)?,
            },
            Frame::Opened { id, region, key } => match src.opened(&region, key) {
                Ok(hold) => {
                    record(sh, conn, &region, key);
                    write_frame(writer, &Frame::Ack { id }.encode(), None)?;
                    drop(hold);
                }
                Err(reason) => refuse(id, reason)?,
            },
            Frame::Notif { id, from, msg } => {
                src.notify(&from, msg);
                write_frame(writer, &Frame::Ack { id }.encode(), None)?;
            }
            Frame::Revoked { region, key } => {
                // Only an answer to a revocation in progress counts; others are ignored.
                let mut r = sh.revokes.lock();
                if let Some(acked) = r.get_mut(&(conn, (region, key))) {
                    *acked = true;
                    sh.revoke_cv.notify_all();
                }
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected frame {other:?}"),
                ))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client.

/// The second half of a revocation (see [`RevokeSink::revoke`]): waits (bounded) for the copies
/// in flight, closes the mappings; `true` once done, `false` if copies were still running at the
/// bound.
pub type FinishRevoke = Box<dyn FnOnce() -> bool + Send>;

/// What a client does when its owner revokes a region or the connection ends (the backend's
/// import cache; a fake in tests).
pub trait RevokeSink: Send + Sync {
    /// The owner revoked `region` (with key `key`). Called on the connection's reader, in frame
    /// order, so it must be quick: stop new copies on the region and forget it. The returned
    /// rest runs on another thread (waiting for copies must not stop the reader, which carries
    /// the answers those copies' notifications wait for); when it returns `true` the client
    /// answers Revoked, otherwise it stays silent and the owner reports it.
    fn revoke(&self, region: &Desc, key: u64) -> FinishRevoke;
    /// The connection to the owner ended (`reason`): the owner no longer tracks what we mapped,
    /// so everything imported from it must be given up.
    fn link_lost(&self, reason: &str);
}

type Reply = (Frame, Vec<OwnedFd>);

/// One connection to the owner: a writer shared by the callers, a reader thread that routes
/// replies to them and handles revocations.
#[derive(Debug)]
struct Link {
    writer: Mutex<UnixStream>,
    waits: Mutex<HashMap<u64, Option<Reply>>>,
    cv: Condvar,
    closed: AtomicBool,
    reason: Mutex<String>,
}

impl Link {
    /// Ends the link (the first reason is kept): callers waiting get an error, the reader sees
    /// the end of the stream.
    fn fail(&self, reason: &str) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            *self.reason.lock() = reason.to_owned();
        }
        let _ = self.writer.lock().shutdown(std::net::Shutdown::Both);
        let _w = self.waits.lock();
        self.cv.notify_all();
    }

    fn reason(&self) -> String {
        let r = self.reason.lock().clone();
        if r.is_empty() {
            "connection closed".into()
        } else {
            r
        }
    }
}

/// A connection to a peer's socket; calls from several threads share it. Connects on first
/// use, and again after the connection ended.
pub struct IpcClient {
    peer: String,
    path: PathBuf,
    next: AtomicU64,
    timeout: Duration,
    link: Mutex<Option<Arc<Link>>>,
    sink: Option<Arc<dyn RevokeSink>>,
}

impl std::fmt::Debug for IpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcClient")
            .field("peer", &self.peer)
            .field("path", &self.path)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl IpcClient {
    /// A client of the socket at `path` of agent `peer`; every reply is awaited at most
    /// `timeout`. Revocations go to `sink` (without one they are acknowledged at once: nothing
    /// is mapped through such a client).
    pub fn new(
        peer: &str,
        path: &Path,
        timeout: Duration,
        sink: Option<Arc<dyn RevokeSink>>,
    ) -> IpcClient {
        IpcClient {
            peer: peer.to_owned(),
            path: path.to_owned(),
            next: AtomicU64::new(1),
            timeout: timeout.max(Duration::from_millis(1)),
            link: Mutex::new(None),
            sink,
        }
    }

    fn disconnect(&self, reason: String) -> Error {
        Error::RemoteDisconnect {
            peer: self.peer.clone(),
            reason,
        }
    }

    fn open(&self) -> Result<Arc<Link>> {
        let s = UnixStream::connect(&self.path)
            .map_err(|e| self.disconnect(format!("cuda socket {}: {e}", self.path.display())))?;
        let (_, cred_uid) =
            peer_cred(&s).map_err(|e| self.disconnect(format!("SO_PEERCRED: {e}")))?;
        if cred_uid != uid() {
            return Err(Error::Denied {
                peer: self.peer.clone(),
                reason: format!("cuda socket is owned by uid {cred_uid}, not ours"),
            });
        }
        s.set_write_timeout(Some(self.timeout))
            .map_err(|e| self.disconnect(format!("socket timeouts: {e}")))?;
        let reader = s
            .try_clone()
            .map_err(|e| self.disconnect(format!("clone the socket: {e}")))?;
        let link = Arc::new(Link {
            writer: Mutex::new(s),
            waits: Mutex::new(HashMap::new()),
            cv: Condvar::new(),
            closed: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
        });
        let l = Arc::clone(&link);
        let sink = self.sink.clone();
        std::thread::Builder::new()
            .name("nixl-cuda-link".into())
            .spawn(move || read_loop(l, &reader, sink.as_deref()))
            .map_err(|e| Error::io("cuda: spawn the socket reader", e))?;
        Ok(link)
    }

    fn link(&self) -> Result<Arc<Link>> {
        let mut g = self.link.lock();
        if let Some(l) = g.as_ref() {
            if !l.closed.load(Ordering::Acquire) {
                return Ok(Arc::clone(l));
            }
        }
        let l = self.open()?;
        *g = Some(Arc::clone(&l));
        Ok(l)
    }

    /// Sends request `id` and waits for its reply (with its fds).
    fn call(&self, id: u64, f: &Frame) -> Result<Reply> {
        let link = self.link()?;
        link.waits.lock().insert(id, None);
        if let Err(e) = write_frame(&link.writer, &f.encode(), None) {
            link.waits.lock().remove(&id);
            let reason = if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                format!("the owner took no data for {:?}", self.timeout)
            } else {
                format!("cuda socket: {e}")
            };
            link.fail(&reason);
            return Err(self.disconnect(reason));
        }
        let deadline = Instant::now() + self.timeout;
        let mut waits = link.waits.lock();
        let got = loop {
            if let Some(Some(r)) = waits.get_mut(&id).map(Option::take) {
                break Ok(r);
            }
            if link.closed.load(Ordering::Acquire) {
                break Err(self.disconnect(link.reason()));
            }
            if link.cv.wait_until(&mut waits, deadline).timed_out() {
                break Err(self.disconnect(format!(
                    "no reply on the cuda socket within {:?}",
                    self.timeout
                )));
            }
        };
        waits.remove(&id);
        drop(waits);
        if got.is_err() && !link.closed.load(Ordering::Acquire) {
            // A stuck owner: the connection is not reused.
            link.fail("no reply in time");
        }
        got
    }

    fn unexpected(&self, reply: &Frame) -> Error {
        if let Some(l) = self.link.lock().as_ref() {
            l.fail("unexpected reply");
        }
        self.disconnect(format!("unexpected reply {reply:?}"))
    }

    /// Asks for chunk `chunk` of `region` with `key`: the exported fd and the allocation size.
    pub fn grant(&self, region: &Desc, key: u64, chunk: u32) -> Result<(OwnedFd, u64)> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, mut fds) = self.call(
            id,
            &Frame::Grant {
                id,
                region: *region,
                key,
                chunk,
            },
        )?;
        match reply {
            Frame::Granted { alloc_size, .. } => match fds.len() {
                1 => Ok((fds.remove(0), alloc_size)),
                n => Err(self.disconnect(format!("grant came with {n} fds, not 1"))),
            },
            Frame::Refused { reason, .. } => Err(Error::Denied {
                peer: self.peer.clone(),
                reason,
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Announces that we map `region` (presenting `key`) through handles from the metadata;
    /// `Err(Denied)` if the owner refused (the region must then not be used).
    pub fn announce(&self, region: &Desc, key: u64) -> Result<()> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, _) = self.call(
            id,
            &Frame::Opened {
                id,
                region: *region,
                key,
            },
        )?;
        match reply {
            Frame::Ack { .. } => Ok(()),
            Frame::Refused { reason, .. } => Err(Error::Denied {
                peer: self.peer.clone(),
                reason,
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Delivers a notification from `from` and waits for the owner's acknowledgement.
    pub fn notify(&self, from: &str, msg: &[u8]) -> Result<()> {
        if msg.len() > MAX_NOTIF {
            return Err(Error::InvalidArgument(format!(
                "notification of {} bytes exceeds {MAX_NOTIF}",
                msg.len()
            )));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, _) = self.call(
            id,
            &Frame::Notif {
                id,
                from: from.to_owned(),
                msg: msg.to_vec(),
            },
        )?;
        match reply {
            Frame::Ack { .. } => Ok(()),
            Frame::Refused { reason, .. } => Err(Error::Denied {
                peer: self.peer.clone(),
                reason,
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Closes the connection (a later call reconnects).
    pub fn close(&self) {
        if let Some(l) = self.link.lock().take() {
            l.fail("closed by us");
        }
    }
}

impl Drop for IpcClient {
    fn drop(&mut self) {
        self.close();
    }
}

type RevokeJob = (Desc, u64, FinishRevoke);

/// Finishes revocations in order and answers each (one thread per link, started on the first).
fn revoke_worker(link: &Link, jobs: &crossbeam_channel::Receiver<RevokeJob>) {
    for (region, key, finish) in jobs.iter() {
        if finish() {
            let f = Frame::Revoked { region, key };
            if let Err(e) = write_frame(&link.writer, &f.encode(), None) {
                link.fail(&format!("answering a revocation: {e}"));
            }
        }
    }
}

/// The reader of one link: replies go to their callers, revocations to the sink (then to the
/// link's revocation worker); anything else, or garbage, ends the link. At the end the sink
/// gives up what was imported through it.
fn read_loop(link: Arc<Link>, stream: &UnixStream, sink: Option<&dyn RevokeSink>) {
    let mut worker: Option<crossbeam_channel::Sender<RevokeJob>> = None;
    let reason = loop {
        let mut fds = Vec::new();
        let body = match read_frame(stream, &mut fds) {
            Ok(Some(b)) => b,
            Ok(None) => break "the owner closed its cuda socket".to_owned(),
            Err(e) => break format!("cuda socket: {e}"),
        };
        let frame = match Frame::decode(&body) {
            Ok(f) => f,
            Err(e) => break format!("bad frame from the owner: {e}"),
        };
        match frame {
            Frame::Granted { id, .. } | Frame::Refused { id, .. } | Frame::Ack { id } => {
                let mut waits = link.waits.lock();
                // A reply nobody waits for (its caller gave up) is dropped, fds closed.
                if let Some(slot @ None) = waits.get_mut(&id) {
                    *slot = Some((frame, fds));
                    link.cv.notify_all();
                }
            }
            Frame::Revoke { region, key } => {
                drop(fds);
                let finish: FinishRevoke = match sink {
                    Some(s) => s.revoke(&region, key),
                    None => Box::new(|| true),
                };
                if worker.is_none() {
                    let (tx, rx) = crossbeam_channel::unbounded::<RevokeJob>();
                    let l = Arc::clone(&link);
                    let spawned = std::thread::Builder::new()
                        .name("nixl-cuda-revoke".into())
                        .spawn(move || revoke_worker(&l, &rx));
                    match spawned {
                        Ok(_) => worker = Some(tx),
                        Err(e) => break format!("cannot start the revocation thread: {e}"),
                    }
                }
                if let Some(tx) = &worker {
                    if tx.send((region, key, finish)).is_err() {
                        break "the revocation thread ended".to_owned();
                    }
                }
            }
            other => break format!("unexpected frame from the owner: {other:?}"),
        }
    };
    link.fail(&reason);
    // The worker finishes what it was given (its answers fail on the closed link) and ends.
    drop(worker);
    if let Some(s) = sink {
        s.link_lost(&link.reason());
    }
}

// ---------------------------------------------------------------------------------------------
// Import cache.

/// What identifies one peer region imported here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionKey {
    /// The peer's instance id.
    pub peer: u128,
    /// The region (as the peer published it).
    pub region: Desc,
    /// The region's key: a re-registration at the same address is a different region.
    pub key: u64,
}

/// The error of a transfer to a region whose owner deregistered it.
pub fn deregistered(peer: &str, region: &Desc) -> Error {
    Error::Denied {
        peer: peer.to_owned(),
        reason: format!(
            "region {:#x}+{} (device {}) was deregistered by its owner",
            region.addr, region.len, region.dev_id
        ),
    }
}

#[derive(Debug)]
struct ImportState<T> {
    /// Why the region may no longer be used (set once).
    revoked: Option<Error>,
    /// Mappings per (chunk, local device).
    maps: HashMap<(u32, i32), Arc<T>>,
}

/// One peer region imported here: its mappings, the gate every copy on it holds, and whether it
/// was revoked. Transfers hold the region, never a mapping directly, so a revocation closes the
/// mappings even while prepared transfers still exist (their next post fails cleanly).
#[derive(Debug)]
pub struct RegionImport<T> {
    key: RegionKey,
    peer: Arc<str>,
    gate: AccessGate,
    /// The owner's answer to our announcement (`None` until made).
    announced: Mutex<Option<Result<()>>>,
    state: Mutex<ImportState<T>>,
}

impl<T> RegionImport<T> {
    fn new(key: RegionKey, peer: &str) -> RegionImport<T> {
        RegionImport {
            key,
            peer: Arc::from(peer),
            gate: AccessGate::default(),
            announced: Mutex::new(None),
            state: Mutex::new(ImportState {
                revoked: None,
                maps: HashMap::new(),
            }),
        }
    }

    /// Which region this is.
    pub fn key(&self) -> &RegionKey {
        &self.key
    }

    /// Why the region can no longer be used, if it cannot.
    pub fn revoked(&self) -> Option<Error> {
        self.state.lock().revoked.clone()
    }

    fn error(&self) -> Error {
        self.revoked()
            .unwrap_or_else(|| deregistered(&self.peer, &self.key.region))
    }

    /// Mappings held.
    pub fn mappings(&self) -> usize {
        self.state.lock().maps.len()
    }

    /// The mapping of chunk `chunk` on our device `dev`, made by `make` on first use (outside
    /// any lock; concurrent first uses may both call it, one result is kept). Fails with the
    /// revocation's error once the region was revoked (a mapping made meanwhile is closed).
    pub fn mapping(
        &self,
        chunk: u32,
        dev: i32,
        make: impl FnOnce() -> Result<Arc<T>>,
    ) -> Result<Arc<T>> {
        {
            let st = self.state.lock();
            if let Some(e) = &st.revoked {
                return Err(e.clone());
            }
            if let Some(m) = st.maps.get(&(chunk, dev)) {
                return Ok(Arc::clone(m));
            }
        }
        let made = make()?;
        let mut st = self.state.lock();
        if let Some(e) = st.revoked.clone() {
            drop(st);
            drop(made);
            return Err(e);
        }
        Ok(Arc::clone(st.maps.entry((chunk, dev)).or_insert(made)))
    }

    /// Marks the region revoked (the first reason stays) and closes its gate: no copy starts
    /// on it any more.
    fn start_revoke(&self, why: Error) {
        let mut st = self.state.lock();
        if st.revoked.is_none() {
            st.revoked = Some(why);
        }
        drop(st);
        self.gate.close_and_drain(Duration::ZERO);
    }

    /// After the region was marked revoked ([`ImportCache::begin_revoke`]): waits until
    /// `deadline` for the copies in flight, then closes the mappings. `false` if copies were
    /// still running: the mappings then stay until the last holder lets go.
    pub fn finish_revoke(&self, deadline: Instant) -> bool {
        let patience = deadline.saturating_duration_since(Instant::now());
        if !self.gate.close_and_drain(patience) {
            return false;
        }
        let maps = std::mem::take(&mut self.state.lock().maps);
        drop(maps);
        true
    }

    /// Revokes the region: no new copy, copies in flight waited for (at most `patience`), then
    /// its mappings closed. `false` if copies were still running at the bound.
    pub fn revoke(&self, why: Error, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        self.start_revoke(why);
        self.finish_revoke(deadline)
    }
}

/// Peers' regions imported here, made once and shared by every transfer that uses them; revoked
/// when the owner deregisters a region, when the connection to the owner ends, or when the peer
/// is invalidated, and replaced when the peer re-registers at the same address.
#[derive(Debug)]
pub struct ImportCache<T> {
    map: Mutex<HashMap<RegionKey, Arc<RegionImport<T>>>>,
}

impl<T> Default for ImportCache<T> {
    fn default() -> Self {
        ImportCache {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> ImportCache<T> {
    /// The import of region `key` of peer `peer`. The first user runs `announce` (telling the
    /// owner, who may refuse) while later users wait for its answer; a refused or failed
    /// announcement is returned to all of them and the entry dropped, so a later call asks
    /// again. A revoked import is an error. An entry of the same peer and address with another
    /// key (the peer re-registered) is revoked and dropped.
    pub fn region(
        &self,
        key: RegionKey,
        peer: &str,
        patience: Duration,
        announce: impl FnOnce() -> Result<()>,
    ) -> Result<Arc<RegionImport<T>>> {
        let (entry, stale) = {
            let mut m = self.map.lock();
            let stale: Vec<Arc<RegionImport<T>>> = {
                let old: Vec<RegionKey> = m
                    .keys()
                    .filter(|k| {
                        k.peer == key.peer
                            && k.region.addr == key.region.addr
                            && k.region.dev_id == key.region.dev_id
                            && **k != key
                    })
                    .copied()
                    .collect();
                old.iter().filter_map(|k| m.remove(k)).collect()
            };
            let entry = Arc::clone(
                m.entry(key)
                    .or_insert_with(|| Arc::new(RegionImport::new(key, peer))),
            );
            (entry, stale)
        };
        for s in stale {
            let region = s.key.region;
            s.revoke(deregistered(peer, &region), patience);
        }
        let answer = {
            let mut a = entry.announced.lock();
            if a.is_none() {
                *a = Some(announce());
            }
            a.clone().unwrap_or(Ok(()))
        };
        if let Err(e) = answer {
            self.remove_if(&entry);
            entry.start_revoke(e.clone());
            return Err(e);
        }
        match entry.revoked() {
            Some(e) => Err(e),
            None => Ok(entry),
        }
    }

    fn remove_if(&self, entry: &Arc<RegionImport<T>>) {
        let mut m = self.map.lock();
        if m.get(&entry.key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            m.remove(&entry.key);
        }
    }

    /// Revokes one region of a peer (see [`RegionImport::revoke`]) and drops it. `true` if it
    /// was not imported or is now closed; `false` if copies were still running at the bound.
    pub fn revoke_region(
        &self,
        peer: u128,
        region: &Desc,
        key: u64,
        why: Error,
        patience: Duration,
    ) -> bool {
        let deadline = Instant::now() + patience;
        self.begin_revoke(peer, region, key, why)
            .is_none_or(|e| e.finish_revoke(deadline))
    }

    /// The quick half of [`ImportCache::revoke_region`]: drops the region from the cache, marks
    /// it revoked and closes its gate (no new copy starts on it). The rest is
    /// [`RegionImport::finish_revoke`]. `None` if it was not imported.
    pub fn begin_revoke(
        &self,
        peer: u128,
        region: &Desc,
        key: u64,
        why: Error,
    ) -> Option<Arc<RegionImport<T>>> {
        let k = RegionKey {
            peer,
            region: *region,
            key,
        };
        let entry = self.map.lock().remove(&k)?;
        entry.start_revoke(why);
        Some(entry)
    }

    /// Revokes every region of a peer (gates closed first, then one common bound for the copies
    /// in flight). Returns the number of regions and how many still had copies running.
    pub fn revoke_peer(&self, peer: u128, why: &Error, patience: Duration) -> (usize, usize) {
        let deadline = Instant::now() + patience;
        let gone: Vec<Arc<RegionImport<T>>> = {
            let mut m = self.map.lock();
            let keys: Vec<RegionKey> = m.keys().filter(|k| k.peer == peer).copied().collect();
            keys.iter().filter_map(|k| m.remove(k)).collect()
        };
        for e in &gone {
            e.start_revoke(why.clone());
        }
        let busy = gone.iter().filter(|e| !e.finish_revoke(deadline)).count();
        (gone.len(), busy)
    }

    /// Whether region `key` is imported (and not revoked).
    pub fn contains(&self, key: &RegionKey) -> bool {
        self.map.lock().contains_key(key)
    }

    /// Number of imported regions.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether no region is imported.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of mappings held by imported regions.
    pub fn mappings(&self) -> usize {
        let regions: Vec<Arc<RegionImport<T>>> = self.map.lock().values().cloned().collect();
        regions.iter().map(|r| r.mappings()).sum()
    }
}

/// Holds on the gates of the regions a post uses, taken together and released on drop (after
/// the post's copies are over).
#[derive(Debug)]
pub struct Holds<T> {
    regions: Arc<[Arc<RegionImport<T>>]>,
    ticket: Option<Ticket>,
}

/// Takes a hold on every region, or none: `Err` with the revocation's reason of the first region
/// that can no longer be used ("region was deregistered by its owner").
pub fn hold_all<T>(regions: &Arc<[Arc<RegionImport<T>>]>) -> Result<Holds<T>> {
    match enter_all(regions, |r| &r.gate) {
        Ok(ticket) => Ok(Holds {
            regions: Arc::clone(regions),
            ticket,
        }),
        Err(i) => Err(regions[i].error()),
    }
}

impl<T> Drop for Holds<T> {
    fn drop(&mut self) {
        leave_all(&self.regions, |r| &r.gate, self.ticket.take());
    }
}

/// An error of this module's kind for the backend.
pub fn backend_err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BackendName::Cuda,
        op,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixl_core::ErrorClass;
    use std::io::{BufRead, Read};
    use std::os::fd::FromRawFd;
    use std::sync::atomic::AtomicUsize;

    fn memfd(bytes: &[u8]) -> OwnedFd {
        // SAFETY: the name is a NUL-terminated static string.
        let fd = unsafe { libc::memfd_create(c"nixl-cuda-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: memfd_create returned a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut f = std::fs::File::from(fd.try_clone().unwrap());
        f.write_all(bytes).unwrap();
        fd
    }

    fn read_fd(fd: &OwnedFd, len: usize) -> Vec<u8> {
        let m = Mapped::new(fd, len, Arc::new(AtomicUsize::new(0)));
        // SAFETY: `m` maps `len` readable bytes until it is dropped below.
        unsafe { std::slice::from_raw_parts(m.base, len) }.to_vec()
    }

    /// The stand-in for a device mapping: the owner's memfd mapped here (as the peer maps a
    /// granted VMM fd or opens a legacy IPC handle), unmapped on drop, drops counted.
    #[derive(Debug)]
    struct Mapped {
        base: *const u8,
        len: usize,
        closed: Arc<AtomicUsize>,
    }

    // SAFETY: a shared read-only mapping, readable from any thread while it exists.
    unsafe impl Send for Mapped {}
    // SAFETY: as above.
    unsafe impl Sync for Mapped {}

    impl Mapped {
        fn new(fd: &OwnedFd, len: usize, closed: Arc<AtomicUsize>) -> Mapped {
            // SAFETY: a fresh shared read-only mapping of `len` bytes of a file at least that
            // long.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Mapped {
                base: p.cast(),
                len,
                closed,
            }
        }
    }

    impl Drop for Mapped {
        fn drop(&mut self) {
            // SAFETY: unmaps the mapping made in `new`; the last Arc is gone, so no reader
            // holds a pointer into it (readers hold the region's gate, revocation drains it).
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A prepared transfer as the backend keeps one: the regions it uses and addresses resolved
    /// once, no mapping held directly.
    struct Prepared {
        regions: Arc<[Arc<RegionImport<Mapped>>]>,
        src: usize,
        len: usize,
    }

    impl Prepared {
        fn new(region: &Arc<RegionImport<Mapped>>, m: &Mapped) -> Prepared {
            Prepared {
                regions: Arc::from(vec![Arc::clone(region)]),
                src: m.base as usize,
                len: m.len,
            }
        }

        /// One post: holds the regions as the backend's post does, "copies" after `dwell`.
        fn post(
            &self,
            entered: Option<&crossbeam_channel::Sender<()>>,
            dwell: Duration,
        ) -> Result<Vec<u8>> {
            self.post_then(entered, dwell, || {})
        }

        /// A post that also runs `during` while it holds the regions.
        fn post_then(
            &self,
            entered: Option<&crossbeam_channel::Sender<()>>,
            dwell: Duration,
            during: impl FnOnce(),
        ) -> Result<Vec<u8>> {
            let holds = hold_all(&self.regions)?;
            if let Some(tx) = entered {
                tx.send(()).unwrap();
            }
            std::thread::sleep(dwell);
            during();
            // SAFETY: the region's gate is held, so its mappings are open: a revocation closes
            // them only after every hold is released.
            let v = unsafe { std::slice::from_raw_parts(self.src as *const u8, self.len) }.to_vec();
            drop(holds);
            Ok(v)
        }
    }

    /// An owner with one region of two chunks, each backed by a memfd.
    struct Owner {
        region: Desc,
        key: u64,
        registered: AtomicBool,
        chunks: Vec<OwnedFd>,
        notifs: Mutex<Vec<(String, Vec<u8>)>>,
    }

    impl Owner {
        fn check(&self, region: &Desc, key: u64) -> std::result::Result<(), String> {
            if *region != self.region || !self.registered.load(Ordering::SeqCst) {
                return Err("not registered".into());
            }
            if key != self.key {
                return Err("wrong key".into());
            }
            Ok(())
        }
    }

    impl GrantSource for Owner {
        fn grant(&self, region: &Desc, key: u64, chunk: u32) -> std::result::Result<Grant, String> {
            self.check(region, key)?;
            let fd = self
                .chunks
                .get(chunk as usize)
                .ok_or_else(|| format!("no chunk {chunk}"))?;
            Ok(Grant {
                fd: fd.try_clone().map_err(|e| e.to_string())?,
                alloc_size: 4096,
                hold: Box::new(()),
            })
        }

        fn opened(&self, region: &Desc, key: u64) -> std::result::Result<Hold, String> {
            self.check(region, key)?;
            Ok(Box::new(()))
        }

        fn notify(&self, from: &str, msg: Vec<u8>) {
            self.notifs.lock().push((from.to_owned(), msg));
        }
    }

    const REGION: Desc = Desc {
        addr: 0x7000_0000,
        len: 8192,
        dev_id: 0,
    };

    fn dir(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("nixl-cuda-ipc-{tag}-{}", std::process::id()))
    }

    fn owner() -> Arc<Owner> {
        Arc::new(Owner {
            region: REGION,
            key: 42,
            registered: AtomicBool::new(true),
            chunks: vec![memfd(&[0xa1; 4096]), memfd(&[0xb2; 4096])],
            notifs: Mutex::new(Vec::new()),
        })
    }

    fn start(o: &Arc<Owner>, d: &Path, file: &str) -> (IpcServer, Arc<dyn GrantSource>) {
        let src: Arc<dyn GrantSource> = o.clone();
        let srv = IpcServer::start(d, file, Arc::downgrade(&src), Duration::from_secs(2)).unwrap();
        (srv, src)
    }

    /// The peer's side: its import cache, as the backend's sink does it.
    struct Peer {
        cache: ImportCache<Mapped>,
        revokes: AtomicUsize,
        lost: Mutex<Vec<String>>,
    }

    const PEER: u128 = 7;

    impl RevokeSink for Peer {
        fn revoke(&self, region: &Desc, key: u64) -> FinishRevoke {
            self.revokes.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(5);
            let e = self
                .cache
                .begin_revoke(PEER, region, key, deregistered("owner", region));
            Box::new(move || e.is_none_or(|e| e.finish_revoke(deadline)))
        }

        fn link_lost(&self, reason: &str) {
            let e = Error::RemoteDisconnect {
                peer: "owner".into(),
                reason: format!("the cuda socket to the owner ended ({reason})"),
            };
            self.cache.revoke_peer(PEER, &e, Duration::from_secs(5));
            self.lost.lock().push(reason.to_owned());
        }
    }

    fn peer() -> Arc<Peer> {
        Arc::new(Peer {
            cache: ImportCache::default(),
            revokes: AtomicUsize::new(0),
            lost: Mutex::new(Vec::new()),
        })
    }

    fn client(p: &Arc<Peer>, path: &Path, timeout: Duration) -> IpcClient {
        let sink: Arc<dyn RevokeSink> = p.clone();
        IpcClient::new("owner", path, timeout, Some(sink))
    }

    fn rkey(key: u64) -> RegionKey {
        RegionKey {
            peer: PEER,
            region: REGION,
            key,
        }
    }

    fn import(p: &Peer, c: &IpcClient, key: u64) -> Result<Arc<RegionImport<Mapped>>> {
        p.cache
            .region(rkey(key), "owner", Duration::from_secs(5), || {
                c.announce(&REGION, key)
            })
    }

    #[test]
    fn grant_maps_the_same_bytes_and_wrong_key_is_denied() {
        let o = owner();
        let d = dir("grant");
        let (srv, _src) = start(&o, &d, "a.sock");
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
        }
        let c = IpcClient::new("a", srv.path(), Duration::from_secs(5), None);
        let (fd, size) = c.grant(&o.region, 42, 1).unwrap();
        assert_eq!(size, 4096);
        assert_eq!(read_fd(&fd, 4096), vec![0xb2; 4096]);
        let (fd, _) = c.grant(&o.region, 42, 0).unwrap();
        assert_eq!(read_fd(&fd, 4096), vec![0xa1; 4096]);
        // The granted fd is a separate descriptor of the same file.
        assert_ne!(fd.as_raw_fd(), o.chunks[0].as_raw_fd());
        assert_eq!(srv.importers(&o.region, 42), 1, "the grant is recorded");

        let e = c.grant(&o.region, 41, 0).unwrap_err();
        assert!(
            matches!(&e, Error::Denied { reason, .. } if reason == "wrong key"),
            "{e}"
        );
        let e = c.grant(&o.region, 42, 2).unwrap_err();
        assert!(
            matches!(&e, Error::Denied { reason, .. } if reason == "no chunk 2"),
            "{e}"
        );
        let e = c
            .grant(&Desc::new(0x7000_0000, 8193, 0), 42, 0)
            .unwrap_err();
        assert!(matches!(e, Error::Denied { .. }), "{e}");
        // Announcements are checked the same way, and refusals are not recorded.
        let e = c.announce(&o.region, 41).unwrap_err();
        assert!(
            matches!(&e, Error::Denied { reason, .. } if reason == "wrong key"),
            "{e}"
        );
        assert_eq!(srv.importers(&o.region, 41), 0);
        c.announce(&o.region, 42).unwrap();
        // The connection survives refusals.
        c.notify("b", b"hello").unwrap();
        assert_eq!(
            o.notifs.lock().clone(),
            vec![("b".to_owned(), b"hello".to_vec())]
        );
        // Calls from several threads share the connection.
        let c = Arc::new(c);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    for j in 0..20 {
                        c.notify("t", &[i, j]).unwrap();
                        let (fd, _) = c.grant(&REGION, 42, u32::from(j % 2)).unwrap();
                        assert_eq!(read_fd(&fd, 1)[0], if j % 2 == 0 { 0xa1 } else { 0xb2 });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(o.notifs.lock().len(), 1 + 8 * 20);
        drop(srv);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn garbage_frames_drop_only_that_connection() {
        let o = owner();
        let d = dir("garbage");
        let (srv, _src) = start(&o, &d, "a.sock");
        let good = IpcClient::new("a", srv.path(), Duration::from_secs(5), None);
        good.notify("x", b"1").unwrap();
        let cases: Vec<Vec<u8>> = vec![
            vec![0xff; 4],    // huge length
            vec![0, 0, 0, 0], // empty frame
            {
                let mut v = 3u32.to_le_bytes().to_vec();
                v.extend_from_slice(&[9, 9, 9]); // unknown type
                v
            },
            {
                let mut v = 2u32.to_le_bytes().to_vec();
                v.extend_from_slice(&[T_GRANT, 0]); // truncated grant
                v
            },
            {
                let mut v = 9u32.to_le_bytes().to_vec();
                v.extend_from_slice(&[T_OPENED, 0, 0, 0, 0, 0, 0, 0, 0]); // truncated announcement
                v
            },
            Frame::Ack { id: 1 }.encode(), // a reply sent as a request
            Frame::Revoke {
                region: REGION,
                key: 42,
            }
            .encode(), // the owner's frame sent to the owner
        ];
        for bytes in cases {
            let mut s = UnixStream::connect(srv.path()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&bytes).unwrap();
            let mut buf = [0u8; 16];
            // The server closes the connection: EOF (or reset), not a hang.
            let n = s.read(&mut buf).unwrap_or(0);
            assert_eq!(n, 0, "connection dropped for {bytes:?}");
        }
        // An unsolicited Revoked is ignored (no state kept), the connection stays.
        let mut s = UnixStream::connect(srv.path()).unwrap();
        s.write_all(
            &Frame::Revoked {
                region: REGION,
                key: 42,
            }
            .encode(),
        )
        .unwrap();
        s.write_all(
            &Frame::Notif {
                id: 5,
                from: "raw".into(),
                msg: vec![1],
            }
            .encode(),
        )
        .unwrap();
        let mut fds = Vec::new();
        let body = read_frame(&s, &mut fds).unwrap().unwrap();
        assert_eq!(Frame::decode(&body).unwrap(), Frame::Ack { id: 5 });
        assert!(srv.shared.revokes.lock().is_empty());
        // The good connection and new ones still work.
        good.notify("x", b"2").unwrap();
        let (fd, _) = IpcClient::new("a", srv.path(), Duration::from_secs(5), None)
            .grant(&o.region, 42, 0)
            .unwrap();
        assert_eq!(read_fd(&fd, 16), vec![0xa1; 16]);
        assert_eq!(o.notifs.lock().len(), 3);
        drop(srv);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn dead_or_stuck_server_is_a_clear_error() {
        // Nobody listening.
        let d = dir("dead");
        std::fs::create_dir_all(&d).unwrap();
        let c = IpcClient::new("gone", &d.join("none.sock"), Duration::from_secs(1), None);
        let e = c.grant(&Desc::new(0, 1, 0), 1, 0).unwrap_err();
        assert!(matches!(e, Error::RemoteDisconnect { .. }), "{e}");
        assert!(e.to_string().contains("none.sock"), "{e}");

        // A server that shut down after the client connected.
        let o = owner();
        let (srv, src) = start(&o, &d, "b.sock");
        let c = IpcClient::new("b", srv.path(), Duration::from_secs(5), None);
        c.notify("x", b"1").unwrap();
        srv.shutdown();
        let t = Instant::now();
        let e = c.notify("x", b"2").unwrap_err();
        assert!(matches!(e, Error::RemoteDisconnect { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));

        // The owner agent is gone but the socket thread still answers: refused, not a hang.
        let srv =
            IpcServer::start(&d, "c.sock", Arc::downgrade(&src), Duration::from_secs(2)).unwrap();
        let c = IpcClient::new("c", srv.path(), Duration::from_secs(5), None);
        drop(src);
        drop(o);
        let e = c.grant(&REGION, 42, 0).unwrap_err();
        assert!(e.to_string().contains("shut down"), "{e}");

        // A stuck server (accepts, never answers): the client's timeout.
        let stuck_path = d.join("stuck.sock");
        let _ = std::fs::remove_file(&stuck_path);
        let l = UnixListener::bind(&stuck_path).unwrap();
        let c = IpcClient::new("stuck", &stuck_path, Duration::from_millis(300), None);
        let t = Instant::now();
        let e = c.notify("x", b"1").unwrap_err();
        assert!(e.to_string().contains("no reply"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        drop(l);
        drop(srv);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn frames_round_trip_and_truncations_fail() {
        let frames = vec![
            Frame::Grant {
                id: 1,
                region: Desc::new(2, 3, 4),
                key: 5,
                chunk: 6,
            },
            Frame::Granted {
                id: 7,
                alloc_size: 8,
            },
            Frame::Refused {
                id: 9,
                reason: "nope".into(),
            },
            Frame::Notif {
                id: 10,
                from: "agent".into(),
                msg: vec![1, 2, 3],
            },
            Frame::Ack { id: 11 },
            Frame::Opened {
                id: 12,
                region: Desc::new(13, 14, 15),
                key: 16,
            },
            Frame::Revoke {
                region: Desc::new(17, 18, 19),
                key: 20,
            },
            Frame::Revoked {
                region: Desc::new(21, 22, 23),
                key: 24,
            },
        ];
        for f in frames {
            let b = f.encode();
            assert_eq!(
                u32::from_le_bytes(b[..4].try_into().unwrap()) as usize,
                b.len() - 4
            );
            assert_eq!(Frame::decode(&b[4..]).unwrap(), f);
            for n in 4..b.len() {
                assert!(Frame::decode(&b[4..n]).is_err(), "{f:?} cut at {n}");
            }
            let mut long = b[4..].to_vec();
            long.push(0);
            assert!(Frame::decode(&long).is_err(), "{f:?} with a trailing byte");
        }
    }

    /// Owner and peer in two threads over the real socket: the peer imports both chunks (one
    /// through a granted fd, one "opened" from a handle after announcing it), the owner
    /// deregisters while a copy is in flight, the peer waits for it, closes both mappings,
    /// drops the region and answers; its next transfer fails with the clear error.
    #[test]
    fn owner_deregistration_revokes_the_peer_mapping() {
        let o = owner();
        let d = dir("revoke");
        let (srv, _src) = start(&o, &d, "a.sock");
        let p = peer();
        let c = Arc::new(client(&p, srv.path(), Duration::from_secs(5)));
        let closed = Arc::new(AtomicUsize::new(0));

        let r = import(&p, &c, 42).unwrap();
        assert_eq!(
            srv.importers(&REGION, 42),
            1,
            "the announcement is recorded"
        );
        let m0 = r
            .mapping(0, 0, || {
                let (fd, size) = c.grant(&REGION, 42, 0)?;
                Ok(Arc::new(Mapped::new(
                    &fd,
                    size as usize,
                    Arc::clone(&closed),
                )))
            })
            .unwrap();
        let m1 = r
            .mapping(1, 0, || {
                Ok(Arc::new(Mapped::new(
                    &o.chunks[1],
                    4096,
                    Arc::clone(&closed),
                )))
            })
            .unwrap();
        // Made once, then shared; a second user of the region does not announce again.
        let again = r.mapping(0, 0, || Err(Error::TimedOut)).unwrap();
        assert!(Arc::ptr_eq(&again, &m0));
        let r2 = p
            .cache
            .region(rkey(42), "owner", Duration::from_secs(5), || {
                Err(Error::TimedOut)
            })
            .unwrap();
        assert!(Arc::ptr_eq(&r, &r2));
        assert_eq!(p.cache.mappings(), 2);
        let x0 = Arc::new(Prepared::new(&r, &m0));
        let x1 = Prepared::new(&r, &m1);
        drop((again, m0, m1, r, r2));
        assert_eq!(x0.post(None, Duration::ZERO).unwrap(), vec![0xa1; 4096]);
        assert_eq!(x1.post(None, Duration::ZERO).unwrap(), vec![0xb2; 4096]);

        // A copy in flight when the owner deregisters: the revocation waits for it.
        let (tx, rx) = crossbeam_channel::bounded(1);
        let slow = {
            let x0 = Arc::clone(&x0);
            let c = Arc::clone(&c);
            // The copy's completion also needs the reader (a notification's answer): the
            // revocation must not block it.
            std::thread::spawn(move || {
                x0.post_then(Some(&tx), Duration::from_millis(300), || {
                    c.notify("peer", b"in flight").unwrap()
                })
            })
        };
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        o.registered.store(false, Ordering::SeqCst); // the agent removed the region
        let t = Instant::now();
        let report = srv.revoke(&REGION, 42, Duration::from_secs(5));
        let took = t.elapsed();
        assert_eq!(
            report,
            RevokeReport {
                peers: 1,
                acked: 1,
                gone: 0,
                late: 0
            }
        );
        assert!(
            took >= Duration::from_millis(250),
            "answered after the copy: {took:?}"
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(
            slow.join().unwrap().unwrap(),
            vec![0xa1; 4096],
            "the copy in flight ended well"
        );
        assert_eq!(p.revokes.load(Ordering::SeqCst), 1);
        assert_eq!(closed.load(Ordering::SeqCst), 2, "both mappings closed");
        assert!(!p.cache.contains(&rkey(42)) && p.cache.is_empty());
        assert_eq!(srv.importers(&REGION, 42), 0);

        // Later transfers fail cleanly, without touching the (unmapped) memory.
        for x in [&*x0, &x1] {
            let e = x.post(None, Duration::ZERO).unwrap_err();
            assert_eq!(e.class(), ErrorClass::Denied, "{e}");
            assert!(
                e.to_string().contains("was deregistered by its owner"),
                "{e}"
            );
        }
        // A new import is refused by the owner and not kept.
        let e = import(&p, &c, 42).unwrap_err();
        assert!(
            matches!(&e, Error::Denied { reason, .. } if reason == "not registered"),
            "{e}"
        );
        assert!(p.cache.is_empty());
        // Nothing to revoke a second time; the connection is still good.
        assert_eq!(srv.revoke(&REGION, 42, Duration::from_secs(5)).peers, 0);
        c.notify("peer", b"still here").unwrap();
        assert!(p.lost.lock().is_empty());
        drop(srv);
        let _ = std::fs::remove_dir_all(&d);
    }

    fn raw_announce(path: &Path, key: u64) -> UnixStream {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let f = Frame::Opened {
            id: 1,
            region: REGION,
            key,
        };
        (&s).write_all(&f.encode()).unwrap();
        let body = read_frame(&s, &mut Vec::new()).unwrap().unwrap();
        assert_eq!(Frame::decode(&body).unwrap(), Frame::Ack { id: 1 });
        s
    }

    const CHILD_ENV: &str = "NIXL_CUDA_IPC_TEST_CHILD";

    /// The peer that dies (does nothing unless started by the test below): announces, says so,
    /// and waits to be killed.
    #[test]
    fn revoke_child_announces_and_waits() {
        let Some(path) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let _s = raw_announce(Path::new(&path), 42);
        println!("ANNOUNCED");
        std::io::stdout().flush().unwrap();
        std::thread::sleep(Duration::from_secs(60));
    }

    #[test]
    fn silent_peers_cost_only_the_bound_and_dead_ones_are_skipped() {
        if std::env::var_os(CHILD_ENV).is_some() {
            return;
        }
        let o = owner();
        let d = dir("silent");
        let (srv, _src) = start(&o, &d, "a.sock");
        let p = peer();
        let c = client(&p, srv.path(), Duration::from_secs(5));

        // A peer process that announced and was then killed.
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cuda::ipc::tests::revoke_child_announces_and_waits",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, srv.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                if line.is_ok_and(|l| l.contains("ANNOUNCED")) {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the child announced");
        import(&p, &c, 42).unwrap();
        assert_eq!(srv.importers(&REGION, 42), 2);
        child.kill().unwrap();
        child.wait().unwrap();
        let t = Instant::now();
        let report = srv.revoke(&REGION, 42, Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!((report.acked, report.late), (1, 0), "{report:?}");
        assert_eq!(report.gone + report.acked, report.peers, "{report:?}");
        assert!(p.cache.is_empty());

        // A live peer that never answers: the owner waits the bound, reports it, goes on.
        let silent = raw_announce(srv.path(), 42);
        import(&p, &c, 42).unwrap();
        assert_eq!(srv.importers(&REGION, 42), 2);
        let bound = Duration::from_millis(600);
        let t = Instant::now();
        let report = srv.revoke(&REGION, 42, bound);
        let took = t.elapsed();
        assert_eq!(
            report,
            RevokeReport {
                peers: 2,
                acked: 1,
                gone: 0,
                late: 1
            }
        );
        assert!(took >= bound - Duration::from_millis(20), "{took:?}");
        assert!(took < bound + Duration::from_secs(2), "{took:?}");
        assert!(p.cache.is_empty(), "the good peer gave its import up");
        // The silent peer did receive the revocation.
        let body = read_frame(&silent, &mut Vec::new()).unwrap().unwrap();
        assert_eq!(
            Frame::decode(&body).unwrap(),
            Frame::Revoke {
                region: REGION,
                key: 42
            }
        );
        drop(srv);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A fake owner on a raw socket: answers the first announcement with `script`, then runs
    /// `then` on the connection.
    fn fake_owner(
        path: &Path,
        script: impl FnOnce(&UnixStream, u64) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let body = read_frame(&s, &mut Vec::new()).unwrap().unwrap();
            let Frame::Opened { id, .. } = Frame::decode(&body).unwrap() else {
                panic!("expected an announcement");
            };
            script(&s, id);
        })
    }

    #[test]
    fn a_revocation_racing_the_announcement_wins() {
        let d = dir("race");
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("fake.sock");
        // The owner deregisters between recording the import and answering it.
        let owner = fake_owner(&path, |s, id| {
            let revoke = Frame::Revoke {
                region: REGION,
                key: 42,
            };
            (&*s).write_all(&revoke.encode()).unwrap();
            (&*s).write_all(&Frame::Ack { id }.encode()).unwrap();
            let body = read_frame(s, &mut Vec::new()).unwrap().unwrap();
            assert_eq!(
                Frame::decode(&body).unwrap(),
                Frame::Revoked {
                    region: REGION,
                    key: 42
                }
            );
        });
        let p = peer();
        let c = client(&p, &path, Duration::from_secs(5));
        let e = import(&p, &c, 42).unwrap_err();
        assert!(e.to_string().contains("deregistered by its owner"), "{e}");
        assert!(p.cache.is_empty());
        owner.join().unwrap(); // it got the answer
        c.close();

        // A mapping made while its region is being revoked is closed, not kept.
        let r: Arc<RegionImport<Mapped>> = Arc::new(RegionImport::new(rkey(1), "owner"));
        let closed = Arc::new(AtomicUsize::new(0));
        let fd = memfd(&[1; 4096]);
        let e = r
            .mapping(0, 0, || {
                assert!(r.revoke(deregistered("owner", &REGION), Duration::from_secs(1)));
                Ok(Arc::new(Mapped::new(&fd, 4096, Arc::clone(&closed))))
            })
            .unwrap_err();
        assert!(e.to_string().contains("deregistered by its owner"), "{e}");
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        assert_eq!(r.mappings(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn garbage_or_a_dead_owner_makes_the_peer_give_its_mappings_up() {
        let d = dir("owner-garbage");
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("fake.sock");
        let garbage: Vec<(&str, Vec<u8>)> = vec![
            ("unknown type", {
                let mut v = 3u32.to_le_bytes().to_vec();
                v.extend_from_slice(&[9, 9, 9]);
                v
            }),
            ("oversized", ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec()),
            (
                "wrong direction",
                Frame::Opened {
                    id: 1,
                    region: REGION,
                    key: 42,
                }
                .encode(),
            ),
            ("truncated revoke", {
                let mut v = 9u32.to_le_bytes().to_vec();
                v.extend_from_slice(&[T_REVOKE, 1, 2, 3, 4, 5, 6, 7, 8]);
                v
            }),
            ("owner died", Vec::new()),
        ];
        for (what, bytes) in garbage {
            let owner = fake_owner(&path, move |s, id| {
                (&*s).write_all(&Frame::Ack { id }.encode()).unwrap();
                // A revocation of a region the peer never imported is simply answered.
                let other = Frame::Revoke {
                    region: Desc::new(1, 2, 3),
                    key: 4,
                };
                (&*s).write_all(&other.encode()).unwrap();
                let body = read_frame(s, &mut Vec::new()).unwrap().unwrap();
                assert!(matches!(
                    Frame::decode(&body).unwrap(),
                    Frame::Revoked { .. }
                ));
                (&*s).write_all(&bytes).unwrap();
                // Then the connection ends (or the client drops it first).
            });
            let p = peer();
            let c = client(&p, &path, Duration::from_secs(5));
            let closed = Arc::new(AtomicUsize::new(0));
            let fd = memfd(&[3; 4096]);
            let r = import(&p, &c, 42).unwrap();
            let m = r
                .mapping(0, 0, || {
                    Ok(Arc::new(Mapped::new(&fd, 4096, Arc::clone(&closed))))
                })
                .unwrap();
            let x = Prepared::new(&r, &m);
            drop((m, r));
            owner.join().unwrap();
            let t = Instant::now();
            while p.lost.lock().is_empty() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let lost = p.lost.lock().clone();
            assert_eq!(lost.len(), 1, "{what}: {lost:?}");
            assert_eq!(closed.load(Ordering::SeqCst), 1, "{what}: mapping closed");
            assert!(p.cache.is_empty(), "{what}");
            let e = x.post(None, Duration::ZERO).unwrap_err();
            assert_eq!(e.class(), ErrorClass::RemoteDisconnect, "{what}: {e}");
            assert!(
                e.to_string().contains("the cuda socket to the owner ended"),
                "{what}: {e}"
            );
            eprintln!("{what}: {e}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn import_cache_replaces_re_registered_regions_and_revokes_peers() {
        let p = peer();
        let closed = Arc::new(AtomicUsize::new(0));
        let fd = memfd(&[5; 4096]);
        let mk = || Ok(Arc::new(Mapped::new(&fd, 4096, Arc::clone(&closed))));
        let ok = || Ok(());
        let a = p
            .cache
            .region(rkey(7), "owner", Duration::from_secs(1), ok)
            .unwrap();
        a.mapping(0, 0, mk).unwrap();
        a.mapping(0, 1, mk).unwrap();
        let other = RegionKey { peer: 8, ..rkey(7) };
        let b = p
            .cache
            .region(other, "other", Duration::from_secs(1), ok)
            .unwrap();
        b.mapping(0, 0, mk).unwrap();
        assert_eq!((p.cache.len(), p.cache.mappings()), (2, 3));
        // A failed announcement is returned and not cached; the next call asks again.
        let elsewhere = RegionKey {
            region: Desc::new(0x9000_0000, 100, 0),
            ..rkey(9)
        };
        let e = p
            .cache
            .region(elsewhere, "owner", Duration::from_secs(1), || {
                Err(Error::TimedOut)
            })
            .unwrap_err();
        assert!(matches!(e, Error::TimedOut));
        assert_eq!(p.cache.len(), 2);
        // Peer 7 re-registered the region (new key): the old import is revoked and dropped.
        let a2 = p
            .cache
            .region(rkey(8), "owner", Duration::from_secs(1), ok)
            .unwrap();
        assert_eq!(closed.load(Ordering::SeqCst), 2);
        assert!(a.revoked().is_some() && a2.revoked().is_none());
        assert!(hold_all(&Arc::from(vec![Arc::clone(&a)])).is_err());
        // Holds on several regions are all or nothing.
        let both: Arc<[Arc<RegionImport<Mapped>>]> =
            Arc::from(vec![Arc::clone(&a2), Arc::clone(&b)]);
        let h = hold_all(&both).unwrap();
        let mixed: Arc<[Arc<RegionImport<Mapped>>]> =
            Arc::from(vec![Arc::clone(&a2), Arc::clone(&a)]);
        assert!(hold_all(&mixed).is_err());
        drop(h);
        // Invalidating peer 8 revokes its regions.
        let e = Error::RemoteDisconnect {
            peer: "other".into(),
            reason: "connection closed".into(),
        };
        assert_eq!(p.cache.revoke_peer(8, &e, Duration::from_secs(1)), (1, 0));
        assert_eq!(closed.load(Ordering::SeqCst), 3);
        let e = hold_all(&both).unwrap_err();
        assert!(matches!(e, Error::RemoteDisconnect { .. }), "{e}");
        assert_eq!(p.cache.len(), 1);
        // A revocation with a copy still running gives up at the bound and keeps the mapping
        // until the copy lets go.
        a2.mapping(0, 0, mk).unwrap();
        let only: Arc<[Arc<RegionImport<Mapped>>]> = Arc::from(vec![Arc::clone(&a2)]);
        let h = hold_all(&only).unwrap();
        let t = Instant::now();
        assert!(!p.cache.revoke_region(
            PEER,
            &REGION,
            8,
            deregistered("owner", &REGION),
            Duration::from_millis(100)
        ));
        assert!(t.elapsed() >= Duration::from_millis(90));
        assert_eq!(closed.load(Ordering::SeqCst), 3, "still mapped while held");
        drop(h);
        drop((only, a2, both, mixed));
        assert_eq!(
            closed.load(Ordering::SeqCst),
            4,
            "closed with the last holder"
        );
    }
}
