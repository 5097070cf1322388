//! The owner's Unix socket: grants exported VMM fds to peers that present the region key, and
//! receives notifications; plus the importer's cache of mappings.
//!
//! # Wire format
//!
//! Every frame is `u32 length` (at most [`MAX_FRAME`]) then a body starting with a type byte:
//!
//! ```text
//! 1 Grant    u64 id, u64 dev, u64 addr, u64 len, u64 key, u32 chunk   (region as the peer saw it)
//! 2 Granted  u64 id, u64 allocation size        + one fd (SCM_RIGHTS, sent with the frame)
//! 3 Refused  u64 id, str reason
//! 4 Notif    u64 id, str from, blob msg
//! 5 Ack      u64 id
//! ```
//!
//! Both ends check `SO_PEERCRED`: the peer runs as our uid. The server answers each request in
//! turn; a malformed or oversized frame drops that connection only. The socket lives in a
//! directory of mode 0700. A client waits at most its timeout for any reply, so a dead or stuck
//! owner is a clear error, never a hang.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use nixl_core::codec::Reader;
use nixl_core::{BackendName, DecodeError, Desc, Error, Result};
use parking_lot::Mutex;

/// Largest frame body.
pub const MAX_FRAME: usize = (1 << 20) + 4096;
/// Longest notification message carried.
pub const MAX_NOTIF: usize = 1 << 20;

const T_GRANT: u8 = 1;
const T_GRANTED: u8 = 2;
const T_REFUSED: u8 = 3;
const T_NOTIF: u8 = 4;
const T_ACK: u8 = 5;

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
    /// The notification was delivered.
    Ack {
        /// Request id.
        id: u64,
    },
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
                for x in [*id, region.dev_id, region.addr, region.len, *key] {
                    b.extend_from_slice(&x.to_le_bytes());
                }
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
                let dev = r.u64("dev")?;
                let addr = r.u64("addr")?;
                let len = r.u64("len")?;
                Frame::Grant {
                    id,
                    region: Desc::new(addr, len, dev),
                    key: r.u64("key")?,
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

// ---------------------------------------------------------------------------------------------
// Syscalls.

fn cvt(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// The (pid, uid) of the process at the other end of a Unix socket.
pub fn peer_cred(s: &UnixStream) -> io::Result<(i32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    cvt(r as libc::c_long)?;
    Ok((cred.pid, cred.uid))
}

/// Our uid.
pub fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Contents of /proc/sys/kernel/random/boot_id (empty if unreadable).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Sends `data` with `fd` attached to its first byte (SCM_RIGHTS).
fn send_with_fd(s: &UnixStream, data: &[u8], fd: RawFd) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: a zeroed msghdr is a valid value; the fields set below point at live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is CMSG_SPACE(sizeof fd) bytes (8-aligned), so the first header
    // and its payload fit; the macros only compute addresses inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
    }
    let sent = loop {
        // SAFETY: `msg` points at live buffers for the duration of the call.
        match cvt(unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } as libc::c_long)
        {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    if sent < data.len() {
        // The fd went with the first byte; the rest is ordinary stream data.
        (&*s).write_all(&data[sent..])?;
    }
    Ok(())
}

/// Receives into `buf`, keeping any fds that came with the bytes. Returns bytes read (0 = EOF).
fn recv_with_fds(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: a zeroed msghdr is a valid value; the fields point at live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let n = loop {
        // SAFETY: `msg` points at live buffers for the duration of the call.
        let r = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match cvt(r as libc::c_long) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    // SAFETY: walks the control messages the kernel wrote, with the kernel's macros, within
    // msg_controllen; each SCM_RIGHTS payload is an array of fds that we now own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let bytes = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(n)
}

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

// ---------------------------------------------------------------------------------------------
// Server.

/// What the server asks its owner (the backend; a fake in tests).
pub trait GrantSource: Send + Sync {
    /// Checks the peer's access to chunk `chunk` of `region` with `key` and returns a duplicate
    /// of the chunk's exported fd and the allocation size, or the reason for refusing.
    fn grant(
        &self,
        region: &Desc,
        key: u64,
        chunk: u32,
    ) -> std::result::Result<(OwnedFd, u64), String>;
    /// Delivers a notification from agent `from`.
    fn notify(&self, from: &str, msg: Vec<u8>);
}

#[derive(Debug)]
struct ServerShared {
    path: PathBuf,
    shut: AtomicBool,
    conns: Mutex<HashMap<u64, UnixStream>>,
    next: AtomicU64,
}

/// The owner's socket service. Stops (and removes its socket) on [`IpcServer::shutdown`] or drop.
#[derive(Debug)]
pub struct IpcServer {
    shared: Arc<ServerShared>,
}

impl IpcServer {
    /// Binds `dir/<file>` (creating `dir` with mode 0700) and serves `source` (held weakly: a
    /// dropped owner is answered "shut down").
    pub fn start(dir: &Path, file: &str, source: Weak<dyn GrantSource>) -> Result<IpcServer> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("cuda: create {}", dir.display()), e))?;
        // An existing directory keeps its mode; tighten it if it is ours.
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
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

    /// Stops accepting, closes every connection, removes the socket.
    pub fn shutdown(&self) {
        if self.shared.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        for (_, c) in self.shared.conns.lock().drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
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
    let id = sh.next.fetch_add(1, Ordering::Relaxed);
    sh.conns.lock().insert(id, stream.try_clone()?);
    if sh.shut.load(Ordering::Acquire) {
        sh.conns.lock().remove(&id);
        return Ok(());
    }
    let result = serve_frames(&stream, source);
    sh.conns.lock().remove(&id);
    result
}

fn serve_frames(stream: &UnixStream, source: &Weak<dyn GrantSource>) -> io::Result<()> {
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
                Frame::Grant { id, .. } | Frame::Notif { id, .. } => id,
                _ => 0,
            };
            let f = Frame::Refused {
                id,
                reason: "the agent has shut down".into(),
            };
            (&*stream).write_all(&f.encode())?;
            return Ok(());
        };
        match frame {
            Frame::Grant {
                id,
                region,
                key,
                chunk,
            } => match src.grant(&region, key, chunk) {
                Ok((fd, alloc_size)) => {
                    let f = Frame::Granted { id, alloc_size };
                    send_with_fd(stream, &f.encode(), fd.as_raw_fd())?;
                }
                Err(reason) => {
                    metrics::counter!("nixl_access_denied_total", "backend" => "cuda").increment(1);
                    (&*stream).write_all(&Frame::Refused { id, reason }.encode())?;
                }
            },
            Frame::Notif { id, from, msg } => {
                src.notify(&from, msg);
                (&*stream).write_all(&Frame::Ack { id }.encode())?;
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

/// A connection to a peer's socket; one request at a time.
#[derive(Debug)]
pub struct IpcClient {
    peer: String,
    stream: Mutex<Option<UnixStream>>,
    path: PathBuf,
    next: AtomicU64,
    timeout: Duration,
}

impl IpcClient {
    /// A client of the socket at `path` of agent `peer` (connects on first use, and again after a
    /// broken connection).
    pub fn new(peer: &str, path: &Path, timeout: Duration) -> IpcClient {
        IpcClient {
            peer: peer.to_owned(),
            stream: Mutex::new(None),
            path: path.to_owned(),
            next: AtomicU64::new(1),
            timeout,
        }
    }

    fn disconnect(&self, reason: String) -> Error {
        Error::RemoteDisconnect {
            peer: self.peer.clone(),
            reason,
        }
    }

    fn open(&self) -> Result<UnixStream> {
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
        s.set_read_timeout(Some(self.timeout))
            .and_then(|()| s.set_write_timeout(Some(self.timeout)))
            .map_err(|e| self.disconnect(format!("socket timeouts: {e}")))?;
        Ok(s)
    }

    /// Sends `f` and reads the reply with its fds.
    fn call(&self, f: &Frame) -> Result<(Frame, Vec<OwnedFd>)> {
        let mut guard = self.stream.lock();
        if guard.is_none() {
            *guard = Some(self.open()?);
        }
        let result = (|| {
            let s = guard
                .as_ref()
                .ok_or_else(|| self.disconnect("not connected".into()))?;
            (&*s).write_all(&f.encode()).map_err(|e| self.io_err(e))?;
            let mut fds = Vec::new();
            let body = read_frame(s, &mut fds)
                .map_err(|e| self.io_err(e))?
                .ok_or_else(|| self.disconnect("the owner closed its cuda socket".into()))?;
            let reply =
                Frame::decode(&body).map_err(|e| self.disconnect(format!("bad reply: {e}")))?;
            Ok((reply, fds))
        })();
        if result.is_err() {
            // A broken or confused connection is not reused.
            if let Some(s) = guard.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        result
    }

    fn io_err(&self, e: io::Error) -> Error {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            self.disconnect(format!(
                "no reply on the cuda socket within {:?}",
                self.timeout
            ))
        } else {
            self.disconnect(format!("cuda socket: {e}"))
        }
    }

    /// Asks for chunk `chunk` of `region` with `key`: the exported fd and the allocation size.
    pub fn grant(&self, region: &Desc, key: u64, chunk: u32) -> Result<(OwnedFd, u64)> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, mut fds) = self.call(&Frame::Grant {
            id,
            region: *region,
            key,
            chunk,
        })?;
        match reply {
            Frame::Granted {
                id: rid,
                alloc_size,
            } if rid == id => match fds.len() {
                1 => Ok((fds.remove(0), alloc_size)),
                n => Err(self.disconnect(format!("grant came with {n} fds, not 1"))),
            },
            Frame::Refused { id: rid, reason } if rid == id => Err(Error::Denied {
                peer: self.peer.clone(),
                reason,
            }),
            other => {
                self.stream.lock().take();
                Err(self.disconnect(format!("unexpected reply {other:?}")))
            }
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
        let (reply, _) = self.call(&Frame::Notif {
            id,
            from: from.to_owned(),
            msg: msg.to_vec(),
        })?;
        match reply {
            Frame::Ack { id: rid } if rid == id => Ok(()),
            Frame::Refused { id: rid, reason } if rid == id => Err(Error::Denied {
                peer: self.peer.clone(),
                reason,
            }),
            other => {
                self.stream.lock().take();
                Err(self.disconnect(format!("unexpected reply {other:?}")))
            }
        }
    }

    /// Closes the connection (a later call reconnects).
    pub fn close(&self) {
        if let Some(s) = self.stream.lock().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Import cache.

/// What identifies one imported chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImportKey {
    /// The peer's instance id.
    pub peer: u128,
    /// The region (as the peer published it).
    pub region: Desc,
    /// The region's key: a re-registration at the same address is a different region.
    pub region_key: u64,
    /// Chunk index.
    pub chunk: u32,
    /// Our device that maps it.
    pub local_dev: i32,
}

/// Mappings of peers' chunks, made once and shared by every transfer that uses them; dropped
/// (unmapped once the last transfer holding one lets go) when the peer is invalidated or the
/// region is replaced.
#[derive(Debug)]
pub struct ImportCache<T> {
    map: Mutex<HashMap<ImportKey, Arc<T>>>,
}

impl<T> Default for ImportCache<T> {
    fn default() -> Self {
        ImportCache {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> ImportCache<T> {
    /// The mapping for `key`, made by `make` on first use. Concurrent first uses may both call
    /// `make`; one result is kept and the other dropped. A stale entry for the same peer and
    /// region address with another key (the peer re-registered) is dropped.
    pub fn get_or_import(
        &self,
        key: ImportKey,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        if let Some(v) = self.map.lock().get(&key) {
            return Ok(Arc::clone(v));
        }
        let made = Arc::new(make()?);
        let mut m = self.map.lock();
        m.retain(|k, _| {
            !(k.peer == key.peer
                && k.region.addr == key.region.addr
                && k.region.dev_id == key.region.dev_id
                && k.region_key != key.region_key)
        });
        Ok(Arc::clone(m.entry(key).or_insert(made)))
    }

    /// Drops every mapping of a peer.
    pub fn drop_peer(&self, peer: u128) -> usize {
        self.drop_where(|k| k.peer == peer)
    }

    /// Drops every mapping of one region of a peer.
    pub fn drop_region(&self, peer: u128, region: &Desc) -> usize {
        self.drop_where(|k| k.peer == peer && k.region == *region)
    }

    fn drop_where(&self, f: impl Fn(&ImportKey) -> bool) -> usize {
        let mut m = self.map.lock();
        let before = m.len();
        // Values are dropped outside the lock (unmapping calls into the driver).
        let gone: Vec<Arc<T>> = {
            let keys: Vec<ImportKey> = m.keys().filter(|k| f(k)).copied().collect();
            keys.iter().filter_map(|k| m.remove(k)).collect()
        };
        let n = before - m.len();
        drop(m);
        drop(gone);
        n
    }

    /// Number of cached mappings.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    use std::io::Read;
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
        // Maps the fd (the importer's view) and copies out.
        // SAFETY: a fresh shared read-only mapping of `len` bytes of a file at least that long.
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
        // SAFETY: `p` maps `len` readable bytes until the munmap below.
        let v = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }.to_vec();
        // SAFETY: unmaps the mapping made above; no reference into it remains.
        unsafe { libc::munmap(p, len) };
        v
    }

    /// An owner with two chunks of one region, each backed by a memfd.
    struct Owner {
        region: Desc,
        key: u64,
        chunks: Vec<OwnedFd>,
        notifs: Mutex<Vec<(String, Vec<u8>)>>,
    }

    impl GrantSource for Owner {
        fn grant(
            &self,
            region: &Desc,
            key: u64,
            chunk: u32,
        ) -> std::result::Result<(OwnedFd, u64), String> {
            if *region != self.region {
                return Err("not registered".into());
            }
            if key != self.key {
                return Err("wrong key".into());
            }
            let fd = self
                .chunks
                .get(chunk as usize)
                .ok_or_else(|| format!("no chunk {chunk}"))?;
            Ok((fd.try_clone().map_err(|e| e.to_string())?, 4096))
        }

        fn notify(&self, from: &str, msg: Vec<u8>) {
            self.notifs.lock().push((from.to_owned(), msg));
        }
    }

    fn dir(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("nixl-cuda-ipc-{tag}-{}", std::process::id()))
    }

    fn owner() -> Arc<Owner> {
        Arc::new(Owner {
            region: Desc::new(0x7000_0000, 8192, 0),
            key: 42,
            chunks: vec![memfd(&[0xa1; 4096]), memfd(&[0xb2; 4096])],
            notifs: Mutex::new(Vec::new()),
        })
    }

    #[test]
    fn grant_maps_the_same_bytes_and_wrong_key_is_denied() {
        let o = owner();
        let d = dir("grant");
        let src: Arc<dyn GrantSource> = o.clone();
        let srv = IpcServer::start(&d, "a.sock", Arc::downgrade(&src)).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
        }
        let c = IpcClient::new("a", srv.path(), Duration::from_secs(5));
        let (fd, size) = c.grant(&o.region, 42, 1).unwrap();
        assert_eq!(size, 4096);
        assert_eq!(read_fd(&fd, 4096), vec![0xb2; 4096]);
        let (fd, _) = c.grant(&o.region, 42, 0).unwrap();
        assert_eq!(read_fd(&fd, 4096), vec![0xa1; 4096]);
        // The granted fd is a separate descriptor of the same file.
        assert_ne!(fd.as_raw_fd(), o.chunks[0].as_raw_fd());

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
        // The connection survives refusals.
        c.notify("b", b"hello").unwrap();
        assert_eq!(
            o.notifs.lock().clone(),
            vec![("b".to_owned(), b"hello".to_vec())]
        );
        drop(srv);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn garbage_frames_drop_only_that_connection() {
        let o = owner();
        let d = dir("garbage");
        let src: Arc<dyn GrantSource> = o.clone();
        let srv = IpcServer::start(&d, "a.sock", Arc::downgrade(&src)).unwrap();
        let good = IpcClient::new("a", srv.path(), Duration::from_secs(5));
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
            Frame::Ack { id: 1 }.encode(), // a reply sent as a request
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
        // The good connection and new ones still work.
        good.notify("x", b"2").unwrap();
        let (fd, _) = IpcClient::new("a", srv.path(), Duration::from_secs(5))
            .grant(&o.region, 42, 0)
            .unwrap();
        assert_eq!(read_fd(&fd, 16), vec![0xa1; 16]);
        assert_eq!(o.notifs.lock().len(), 2);
        drop(srv);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn dead_or_stuck_server_is_a_clear_error() {
        // Nobody listening.
        let d = dir("dead");
        std::fs::create_dir_all(&d).unwrap();
        let c = IpcClient::new("gone", &d.join("none.sock"), Duration::from_secs(1));
        let e = c.grant(&Desc::new(0, 1, 0), 1, 0).unwrap_err();
        assert!(matches!(e, Error::RemoteDisconnect { .. }), "{e}");
        assert!(e.to_string().contains("none.sock"), "{e}");

        // A server that shut down after the client connected.
        let o = owner();
        let src: Arc<dyn GrantSource> = o.clone();
        let srv = IpcServer::start(&d, "b.sock", Arc::downgrade(&src)).unwrap();
        let c = IpcClient::new("b", srv.path(), Duration::from_secs(5));
        c.notify("x", b"1").unwrap();
        srv.shutdown();
        let t = std::time::Instant::now();
        let e = c.notify("x", b"2").unwrap_err();
        assert!(matches!(e, Error::RemoteDisconnect { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));

        // The owner agent is gone but the socket thread still answers: refused, not a hang.
        let srv = IpcServer::start(&d, "c.sock", Arc::downgrade(&src)).unwrap();
        let c = IpcClient::new("c", srv.path(), Duration::from_secs(5));
        drop(src);
        drop(o);
        let e = c
            .grant(&Desc::new(0x7000_0000, 8192, 0), 42, 0)
            .unwrap_err();
        assert!(e.to_string().contains("shut down"), "{e}");

        // A stuck server (accepts, never answers): the client's timeout.
        let stuck_path = d.join("stuck.sock");
        let _ = std::fs::remove_file(&stuck_path);
        let l = UnixListener::bind(&stuck_path).unwrap();
        let c = IpcClient::new("stuck", &stuck_path, Duration::from_millis(300));
        let t = std::time::Instant::now();
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
        }
    }

    struct Mapping(Arc<AtomicUsize>);
    impl Drop for Mapping {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn import_cache_imports_once_and_drops_on_invalidate() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let cache: ImportCache<Mapping> = ImportCache::default();
        let made = AtomicUsize::new(0);
        let key = |peer, addr, rkey, chunk| ImportKey {
            peer,
            region: Desc::new(addr, 100, 0),
            region_key: rkey,
            chunk,
            local_dev: 0,
        };
        let mk = || {
            made.fetch_add(1, Ordering::Relaxed);
            Ok(Mapping(Arc::clone(&dropped)))
        };
        let a = cache.get_or_import(key(1, 0x1000, 7, 0), mk).unwrap();
        let a2 = cache.get_or_import(key(1, 0x1000, 7, 0), mk).unwrap();
        assert!(Arc::ptr_eq(&a, &a2));
        assert_eq!(made.load(Ordering::Relaxed), 1, "imported once");
        cache.get_or_import(key(1, 0x1000, 7, 1), mk).unwrap();
        cache.get_or_import(key(2, 0x1000, 7, 0), mk).unwrap();
        assert_eq!(cache.len(), 3);
        // A failed import is not cached.
        assert!(cache
            .get_or_import(key(3, 0, 0, 0), || Err(Error::TimedOut))
            .is_err());
        assert_eq!(cache.len(), 3);
        // Peer 1 re-registered the region (new key): the old chunks go.
        cache.get_or_import(key(1, 0x1000, 8, 0), mk).unwrap();
        assert_eq!(
            cache.len(),
            2,
            "peer 1's two old chunks replaced by the new one"
        );
        assert_eq!(
            dropped.load(Ordering::Relaxed),
            1,
            "chunk 1 unmapped; chunk 0 still held by `a`"
        );
        drop((a, a2));
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
        // Invalidate peer 1 (connection closed).
        assert_eq!(cache.drop_peer(1), 1);
        assert_eq!(dropped.load(Ordering::Relaxed), 3);
        assert_eq!(cache.drop_region(2, &Desc::new(0x1000, 100, 0)), 1);
        assert!(cache.is_empty());
        assert_eq!(dropped.load(Ordering::Relaxed), 4);
    }
}
