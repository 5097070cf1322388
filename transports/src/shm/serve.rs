//! The target's side of the socket: serving a peer's connection (Ops carried out with
//! cross-memory copies, mapping requests answered with the buffer's memfd) and revoking mappings.

use super::*;

pub(super) fn send(w: &Mutex<UnixStream>, f: &Frame) -> io::Result<()> {
    let bytes = f.encode();
    w.lock().write_all(&bytes)
}

/// Serves one connection a peer opened to us, until it closes.
pub(super) fn serve(inner: &Arc<Inner>, stream: UnixStream) -> io::Result<()> {
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

pub(super) fn serve_frames(
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
pub(super) fn carry_out(
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
    let dir = if write { Cma::Pull } else { Cma::Push };
    let total: u64 = segs.iter().map(|s| s.len).sum();
    // SAFETY: every target range of `segs` (ours) was checked against a registration held in
    // `held` (live memory of ours) until after the copy.
    let result = unsafe { copy_split(peer_pid, dir, segs, total, inner.cfg.copy_threads) };
    drop(held);
    match result {
        Ok(n) if n == total => (Status::Ok, String::new()),
        Ok(n) => (Status::Failed, format!("moved {n} of {total} bytes")),
        Err(e) => (Status::Failed, cma_failure(&e, peer_pid, dir)),
    }
}

/// Explains a failed `process_vm_*` call on `pid`.
pub(super) fn cma_failure(e: &io::Error, pid: i32, dir: Cma) -> String {
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

#[allow(clippy::too_many_arguments)]
pub(super) fn grant_map(
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
    pub(super) fn revoke(&self, key: u64) {
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
