//! The target side: accepts peers' connections, checks and carries out their transfers on the
//! memory this agent owns, hands out memfds of mappable regions, and takes revocation acks.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nixl_core::{BackendName, Desc, MemKind, RegionAccess, TargetHandle};
use parking_lot::Mutex;

use super::sys::{self, Cma, Cursor, Pair};
use super::wire::{self, Frame, Framer, OpView, Status};
use super::{buffer, Inner, Served};

/// Cross-memory copies of at least this many bytes are split over the copy threads.
pub(super) const SPLIT_MIN: u64 = 8 << 20;
/// Smallest piece a copy thread is given.
const PIECE_MIN: u64 = 2 << 20;
/// Regions a descriptor is looked up in before asking the region table.
const HELD_SCAN: usize = 8;

pub(super) fn spawn_accept(inner: &Arc<Inner>, listener: Arc<UnixListener>) -> io::Result<()> {
    let inner = Arc::clone(inner);
    std::thread::Builder::new()
        .name("nixl-shm-accept".into())
        .spawn(move || accept_loop(inner, listener))
        .map(drop)
}

fn accept_loop(inner: Arc<Inner>, listener: Arc<UnixListener>) {
    loop {
        let r = listener.accept();
        if inner.shut.load(Ordering::Acquire) {
            return;
        }
        match r {
            Ok((stream, _)) => {
                let inner = Arc::clone(&inner);
                let spawned = std::thread::Builder::new()
                    .name("nixl-shm-serve".into())
                    .spawn(move || {
                        if let Err(e) = serve(&inner, stream) {
                            tracing::debug!(error = %e, "shm: served connection ended");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "shm: cannot start a thread for a connection");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                tracing::warn!(error = %e, "shm: accept failed");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads until the framer holds a whole frame; `Ok(None)` at end of stream.
fn read_frame(
    stream: &UnixStream,
    framer: &mut Framer,
) -> io::Result<Option<std::ops::Range<usize>>> {
    loop {
        if let Some(r) = framer
            .next_frame()
            .map_err(|e| invalid(format!("bad frame: {e}")))?
        {
            return Ok(Some(r));
        }
        let n = loop {
            match (&*stream).read(framer.spare()) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(None);
        }
        framer.filled(n);
    }
}

/// Who is at the other end of a served connection.
struct Peer {
    name: Arc<str>,
    pid: i32,
    conn_id: u64,
}

/// Buffers reused across the ops of one connection.
#[derive(Default)]
struct Scratch {
    pairs: Vec<Pair>,
    held: Vec<RegionAccess>,
    parts: Vec<(Cursor, u64)>,
    out: Vec<u8>,
}

/// Serves one connection a peer opened to us, until it closes or misbehaves.
fn serve(inner: &Arc<Inner>, stream: UnixStream) -> io::Result<()> {
    let (pid, uid) = sys::peer_cred(&stream)?;
    let timeout = Some(inner.cfg.op_timeout);
    stream.set_write_timeout(timeout)?;
    let refuse = |text: String| {
        let _ = sys::send_bytes(&stream, &Frame::Refused { text: &text }.encode());
        Err(io::Error::new(io::ErrorKind::PermissionDenied, text))
    };
    if uid != inner.ours.uid {
        return refuse(format!(
            "connecting process runs as uid {uid}, this agent as {}",
            inner.ours.uid
        ));
    }
    let Some(target) = inner.target.get().cloned() else {
        return refuse("backend not started".into());
    };
    // The HELLO must come promptly; afterwards reads block until a frame or shutdown.
    stream.set_read_timeout(timeout)?;
    let mut framer = Framer::default();
    let Some(r) = read_frame(&stream, &mut framer)? else {
        return Ok(());
    };
    let name: Arc<str> = match wire::decode(&framer.bytes()[r]) {
        Ok(Frame::Hello {
            version,
            name,
            pid: claimed,
            ..
        }) => {
            if version != wire::PROTOCOL {
                return refuse(format!(
                    "protocol version {version}, this agent speaks {}",
                    wire::PROTOCOL
                ));
            }
            if i64::from(claimed) != i64::from(pid) {
                return refuse(format!(
                    "HELLO names pid {claimed}, the socket's credentials say {pid}"
                ));
            }
            Arc::from(name)
        }
        Ok(other) => return refuse(format!("expected HELLO, got {other:?}")),
        Err(e) => return refuse(format!("bad HELLO: {e}")),
    };
    stream.set_read_timeout(None)?;
    let conn_id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let served = Arc::new(Served {
        writer: Mutex::new(stream.try_clone()?),
        fd: stream.as_raw_fd(),
    });
    inner.served.lock().insert(conn_id, Arc::clone(&served));
    let peer = Peer { name, pid, conn_id };
    tracing::debug!(peer = %peer.name, pid, "shm: peer connected");
    let result = if inner.shut.load(Ordering::Acquire) {
        Ok(()) // shut down while we were registering: nothing woke us, so leave now
    } else {
        sys::send_bytes(
            &served.writer.lock(),
            &Frame::Welcome {
                version: wire::PROTOCOL,
            }
            .encode(),
        )
        .and_then(|()| serve_frames(inner, &target, &stream, &served, &peer, framer))
    };
    // Forget the connection before its socket closes (the descriptor number may be reused).
    inner.served.lock().remove(&conn_id);
    for conns in inner.granted.lock().values_mut() {
        conns.remove(&conn_id);
    }
    inner.acks_cv.notify_all();
    drop(served);
    drop(stream);
    result
}

fn serve_frames(
    inner: &Inner,
    target: &TargetHandle,
    stream: &UnixStream,
    served: &Served,
    peer: &Peer,
    mut framer: Framer,
) -> io::Result<()> {
    let mut scratch = Scratch::default();
    while let Some(r) = read_frame(stream, &mut framer)? {
        let frame = wire::decode(&framer.bytes()[r]).map_err(|e| invalid(format!("bad frame: {e}")))?;
        match frame {
            Frame::Op(op) => {
                let (status, text) = carry_out(inner, target, peer, &op, &mut scratch);
                if status == Status::Ok {
                    if let Some(msg) = op.notif {
                        // After the data has landed: carry_out returns once every byte moved.
                        target.deliver(&peer.name, msg.to_vec());
                    }
                }
                scratch.out.clear();
                Frame::Done {
                    id: op.id,
                    status,
                    text: &text,
                }
                .encode_into(&mut scratch.out);
                sys::send_bytes(&served.writer.lock(), &scratch.out)?;
            }
            Frame::Notif { msg } => target.deliver(&peer.name, msg.to_vec()),
            Frame::MapReq { id, addr, len, key } => {
                grant_map(inner, target, served, peer, id, Desc::new(addr, len, 0), key)?;
            }
            Frame::RevokeAck { key } => {
                inner.acks.lock().insert((peer.conn_id, key));
                inner.acks_cv.notify_all();
            }
            other => return Err(invalid(format!("unexpected frame {other:?}"))),
        }
    }
    Ok(())
}

/// Checks one OP as the owner of the memory, then carries it out. Touches nothing unless every
/// descriptor passes.
fn carry_out(
    inner: &Inner,
    target: &TargetHandle,
    peer: &Peer,
    op: &OpView<'_>,
    s: &mut Scratch,
) -> (Status, String) {
    if i64::from(op.pid) != i64::from(peer.pid) {
        return (
            Status::Denied,
            format!(
                "op names pid {}, but came from pid {} (the connection's credentials)",
                op.pid, peer.pid
            ),
        );
    }
    s.pairs.clear();
    s.held.clear();
    let mut total = 0u64;
    for (i, seg) in op.segs().enumerate() {
        let d = Desc::new(seg.target, seg.len, 0);
        if seg.len == 0 || d.end().is_none() || seg.init.checked_add(seg.len).is_none() {
            s.held.clear();
            return (
                Status::Denied,
                format!("descriptor {i}: empty or wrapping range"),
            );
        }
        let covered = s.held.iter().rev().take(HELD_SCAN).any(|h| {
            let r = h.region();
            r.key == seg.key && r.desc.contains(&d)
        });
        if !covered {
            match target.check(MemKind::Dram, &d, seg.key) {
                Ok(access) => s.held.push(access),
                Err(denied) => {
                    s.held.clear();
                    metrics::counter!("nixl_access_denied_total", "backend" => "shm")
                        .increment(1);
                    tracing::debug!(peer = %peer.name, index = i, %denied, "shm: access denied");
                    return (
                        Status::Denied,
                        format!(
                            "descriptor {i} ({:#x}+{}): {denied}",
                            seg.target, seg.len
                        ),
                    );
                }
            }
        }
        total = total.saturating_add(seg.len);
        s.pairs.push(Pair {
            ours: seg.target,
            theirs: seg.init,
            len: seg.len,
        });
    }
    let dir = if op.write { Cma::Pull } else { Cma::Push };
    let threads = inner.cfg.copy_threads.clamp(1, 64);
    // SAFETY: every pair's `ours` range was just checked to lie inside a registered region of
    // this agent, and `s.held` keeps those regions registered (deregistration waits) until the
    // copy is over: the memory is live. The initiator's ranges are checked by the kernel.
    let result = unsafe { copy_pairs(peer.pid, dir, &s.pairs, total, threads, &mut s.parts) };
    s.held.clear();
    match result {
        Ok(n) if n == total => (Status::Ok, String::new()),
        Ok(n) => (
            Status::Failed,
            format!("{} moved {n} of {total} bytes", dir.syscall()),
        ),
        Err(e) => (Status::Failed, explain(&e, dir, peer.pid)),
    }
}

fn explain(e: &io::Error, dir: Cma, pid: i32) -> String {
    let call = dir.syscall();
    match e.raw_os_error() {
        Some(libc::EPERM) => format!(
            "{call} on pid {pid}: {e}. Cross-memory attach needs ptrace permission on the \
             initiator: the same uid, and under Yama ptrace_scope 1 the initiator must allow it \
             (its shm backend calls prctl(PR_SET_PTRACER, ANY) at start); scope 2 needs \
             CAP_SYS_PTRACE and scope 3 forbids it; a seccomp profile may also block the call"
        ),
        Some(libc::ESRCH) => format!("{call}: initiator process {pid} is gone"),
        Some(libc::EFAULT) => format!(
            "{call} on pid {pid}: {e} (an address of the transfer is not mapped in the initiator \
             or in this process: memory freed while registered?)"
        ),
        _ => format!("{call} on pid {pid}: {e}"),
    }
}

/// Copies the stream of `pairs` (`total` bytes), split over up to `threads` threads when big.
///
/// # Safety
/// As [`sys::cma_copy`] for every pair.
unsafe fn copy_pairs(
    pid: i32,
    dir: Cma,
    pairs: &[Pair],
    total: u64,
    threads: usize,
    parts: &mut Vec<(Cursor, u64)>,
) -> io::Result<u64> {
    let n = if total >= SPLIT_MIN {
        (threads as u64).min(total.div_ceil(PIECE_MIN)).max(1)
    } else {
        1
    };
    if n == 1 {
        // SAFETY: forwarded contract.
        return unsafe { sys::cma_copy(pid, dir, pairs, (0, 0), total) };
    }
    // Cut the stream into n byte ranges and find where each starts.
    let per = total.div_ceil(n);
    parts.clear();
    let (mut i, mut before) = (0usize, 0u64);
    for k in 0..n {
        let at = k * per;
        if at >= total {
            break;
        }
        while i < pairs.len() && before + pairs[i].len <= at {
            before += pairs[i].len;
            i += 1;
        }
        parts.push(((i, at - before), per.min(total - at)));
    }
    let parts = &parts[..];
    std::thread::scope(|sc| {
        let mut handles = Vec::with_capacity(parts.len());
        let mut inline = Vec::new();
        for &(start, bytes) in &parts[1..] {
            // SAFETY: forwarded contract; the scope joins the thread before returning.
            let spawned = std::thread::Builder::new()
                .name("nixl-shm-copy".into())
                .spawn_scoped(sc, move || unsafe {
                    sys::cma_copy(pid, dir, pairs, start, bytes)
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(_) => inline.push((start, bytes)),
            }
        }
        let mut moved = 0u64;
        let mut first_err = None;
        for &(start, bytes) in std::iter::once(&parts[0]).chain(&inline) {
            // SAFETY: forwarded contract.
            match unsafe { sys::cma_copy(pid, dir, pairs, start, bytes) } {
                Ok(m) => moved += m,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for h in handles {
            match h.join() {
                Ok(Ok(m)) => moved += m,
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(io::Error::other("a copy thread panicked"));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(moved),
        }
    })
}

/// Answers a request for the memfd behind a mappable region: checks the key and the
/// registration like any access, then passes a duplicate of the fd. Errors end the connection.
fn grant_map(
    inner: &Inner,
    target: &TargetHandle,
    served: &Served,
    peer: &Peer,
    id: u64,
    d: Desc,
    key: u64,
) -> io::Result<()> {
    let reply = |status: Status, text: &str| {
        let f = Frame::MapReply {
            id,
            status,
            buf_len: 0,
            offset: 0,
            page: 0,
            text,
        };
        sys::send_bytes(&served.writer.lock(), &f.encode())
    };
    if d.len == 0 || d.end().is_none() {
        return reply(Status::Denied, "empty or wrapping region");
    }
    // Held until the grant is recorded, so a deregistration (which waits for holders) cannot
    // slip between the check and the record and miss this peer when it revokes.
    let access = match target.check(MemKind::Dram, &d, key) {
        Ok(a) => a,
        Err(denied) => {
            metrics::counter!("nixl_access_denied_total", "backend" => "shm").increment(1);
            return reply(Status::Denied, &denied.to_string());
        }
    };
    let Some(m) = access
        .region()
        .backend_public(BackendName::Shm)
        .and_then(wire::decode_public)
    else {
        return reply(Status::Denied, "region is not mappable (not a ShmBuffer)");
    };
    // Duplicate the fd under the registry lock (so it cannot be closed meanwhile); send later.
    let found = buffer::with_buffer(m.start, m.id, |b| {
        let inside = d.addr >= b.start && d.end().is_some_and(|e| e <= b.start + b.len);
        inside.then(|| sys::dup(b.fd).map(|fd| (fd, *b)))
    });
    let (fd, b) = match found {
        None => return reply(Status::Failed, "the region's buffer was freed"),
        Some(None) => return reply(Status::Denied, "region does not lie inside its buffer"),
        Some(Some(Err(e))) => return reply(Status::Failed, &format!("dup: {e}")),
        Some(Some(Ok(x))) => x,
    };
    let f = Frame::MapReply {
        id,
        status: Status::Ok,
        buf_len: b.len,
        offset: d.addr - b.start,
        page: b.page,
        text: "",
    };
    sys::send_with_fd(&served.writer.lock(), &f.encode(), fd.as_raw_fd())?;
    inner
        .granted
        .lock()
        .entry(key)
        .or_default()
        .insert(peer.conn_id);
    drop(access);
    tracing::debug!(peer = %peer.name, key, "shm: granted a mapping");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_copy_moves_every_byte_once() {
        let len = (SPLIT_MIN as usize) * 2 + 12_345;
        let src: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        let mut dst = vec![0u8; len];
        // Uneven pairs: 1000 of odd sizes and one big remainder, swapped halves.
        let mut pairs = Vec::new();
        let mut off = 0u64;
        let mut k = 0u64;
        while off < len as u64 {
            let l = (1 + (k * 7919) % 40_000).min(len as u64 - off);
            pairs.push(Pair {
                ours: dst.as_mut_ptr() as u64 + off,
                theirs: src.as_ptr() as u64 + off,
                len: l,
            });
            off += l;
            k += 1;
        }
        let mut parts = Vec::new();
        // SAFETY: every `ours` range lies inside `dst`, live and writable for the call.
        let n = unsafe {
            copy_pairs(
                std::process::id() as i32,
                Cma::Pull,
                &pairs,
                len as u64,
                3,
                &mut parts,
            )
        }
        .unwrap();
        assert_eq!(n, len as u64);
        assert_eq!(parts.len(), 3);
        assert!(dst == src);
    }
}
