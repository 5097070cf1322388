//! The initiator's side: a connection to a target, its reader thread, mappings and grants.

use super::*;

pub(super) struct Pending {
    pub(super) done: Completion,
    pub(super) deadline: Instant,
    /// Ended early (timeout, close): the target may still be copying, so the completion (and
    /// with it our local regions) is kept until its answer or the end of the connection.
    pub(super) ended: bool,
}

/// A peer's memfd buffer mapped into this process.
#[derive(Debug)]
pub(super) struct Mapping {
    pub(super) base: *mut u8,
    pub(super) buf_len: usize,
    /// The region's offset inside the buffer, and the region's address in the peer.
    pub(super) offset: u64,
    pub(super) region_addr: u64,
    pub(super) gate: AccessGate,
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

pub(super) type MapResult = std::result::Result<Arc<Mapping>, sys::MapError>;
/// A peer's answer to a mapping request (the memfd, the buffer length, the region's offset) or
/// to a grant request (the table's memfd, the slot, the generation).
pub(super) type Granted = std::result::Result<(OwnedFd, u64, u64), (Status, String)>;

/// A cross-memory grant a target gave us on one of its regions.
#[derive(Debug)]
pub(super) struct Grant {
    pub(super) table: Arc<GrantTable>,
    pub(super) slot: u32,
    pub(super) gen: u64,
    /// The region it covers (in the target).
    pub(super) desc: Desc,
}

impl Grant {
    pub(super) fn live(&self) -> bool {
        self.table.live(self.slot).load(Ordering::SeqCst) == self.gen
    }
}

/// Copies under way on a set of grants: entered with `inflight += 1` on each, left on drop.
pub(super) struct GrantHold<'a>(&'a [Arc<Grant>], usize);

impl<'a> GrantHold<'a> {
    /// Enters every grant, or none if one was revoked.
    pub(super) fn enter(grants: &'a [Arc<Grant>]) -> Option<GrantHold<'a>> {
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
pub(super) struct Conn {
    /// Ourselves, for the prepared transfers that keep the connection alive.
    pub(super) me: Weak<Conn>,
    pub(super) peer: Arc<str>,
    pub(super) backend: Arc<Inner>,
    pub(super) writer: Mutex<UnixStream>,
    /// The same socket, only polled for the target hanging up ([`Conn::target_gone`]).
    pub(super) watch: UnixStream,
    pub(super) pending: Mutex<HashMap<u64, Pending>>,
    pub(super) map_waits: Mutex<HashMap<u64, Option<Granted>>>,
    pub(super) map_cv: Condvar,
    pub(super) maps: Mutex<HashMap<u64, Arc<Mapping>>>,
    pub(super) next_id: AtomicU64,
    pub(super) closed: AtomicBool,
    pub(super) close_reason: Mutex<String>,
    /// The target's pid (its socket's SO_PEERCRED, matching its metadata) and a pidfd on it.
    pub(super) pid: i32,
    pub(super) pidfd: Option<OwnedFd>,
    /// The grant table the target lent us, and our grants by region key.
    pub(super) table: Mutex<Option<Arc<GrantTable>>>,
    pub(super) grants: Mutex<HashMap<u64, Arc<Grant>>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("shm::Conn")
            .field("peer", &self.peer)
            .finish()
    }
}

impl Conn {
    pub(super) fn open(inner: &Arc<Inner>, peer: &str, info: &ConnInfo) -> Result<Arc<Conn>> {
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
        let watch = stream
            .try_clone()
            .map_err(|e| Error::io("shm: clone socket", e))?;
        let conn = Arc::new_cyclic(|me| Conn {
            me: me.clone(),
            peer: Arc::from(peer),
            backend: Arc::clone(inner),
            writer: Mutex::new(stream),
            watch,
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

    pub(super) fn disconnected(&self) -> Error {
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

    pub(super) fn mark_closed(&self, reason: &str) {
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
    pub(super) fn end_all_early(&self, err: &Error) {
        for p in self.pending.lock().values_mut() {
            if !p.ended {
                p.done.end_early(Err(err.clone()));
                p.ended = true;
            }
        }
    }

    /// Ends every pending post with `err` and lets go of them: only once nothing can still
    /// touch their memory (the connection has ended).
    pub(super) fn fail_all(&self, err: Error) {
        let drained: Vec<Pending> = self.pending.lock().drain().map(|(_, p)| p).collect();
        for p in drained {
            p.done.complete(Err(err.clone()));
        }
    }

    pub(super) fn send(&self, f: &Frame) -> Result<()> {
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
    pub(super) fn ask(&self, req: impl FnOnce(u64) -> Frame) -> Granted {
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
    pub(super) fn grant_region(
        &self,
        region: &Desc,
        key: u64,
    ) -> std::result::Result<Arc<Grant>, Error> {
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
                    let adopted =
                        Arc::new(GrantTable::adopt(&fd).map_err(|e| failed(e.to_string()))?);
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
    pub(super) fn target_exited(&self) -> bool {
        self.pidfd.as_ref().is_none_or(sys::pid_exited)
    }

    /// Why a post found a region of the target revoked: the target left (its agent shut the
    /// connection down after deregistering everything, or its process exited), which is a
    /// disconnect, not a refusal; or it deregistered that region and stays (`Denied`). The
    /// socket is asked directly, so the answer does not depend on whether our reader thread has
    /// seen the end yet.
    pub(super) fn revoked(&self) -> Error {
        if self.closed.load(Ordering::Acquire) {
            return self.disconnected();
        }
        if sys::peer_hung_up(&self.watch) || self.target_exited() {
            return Error::RemoteDisconnect {
                peer: self.peer.to_string(),
                reason: "the target left (it deregistered its regions and closed the connection)"
                    .into(),
            };
        }
        Error::Denied {
            peer: self.peer.to_string(),
            reason: "the peer deregistered a region of this transfer".into(),
        }
    }

    pub(super) fn map_region(&self, region: &Desc, key: u64) -> MapResult {
        if let Some(m) = self.maps.lock().get(&key) {
            return Ok(Arc::clone(m));
        }
        let got = self.ask(|id| Frame::MapReq {
            id,
            addr: region.addr,
            len: region.len,
            key,
        });
        let (fd, buf_len, offset) = got.map_err(|(_, text)| sys::MapError::Peer(text))?;
        let base = sys::map_sealed(fd.as_raw_fd(), "buffer", buf_len as usize, |size| {
            let end = offset.checked_add(region.len);
            if size < buf_len || end.is_none_or(|e| e > buf_len) {
                return Err(format!(
                    "too small for region at offset {offset} (+{})",
                    region.len
                ));
            }
            Ok(())
        })?;
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

pub(super) fn read_loop(c: Arc<Conn>, stream: UnixStream) {
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
pub(super) fn answer(
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

pub(super) fn handle_reply(c: &Conn, f: Frame, fds: &mut VecDeque<OwnedFd>) {
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
    pub(super) fn mapped(&self, plan: &XferPlan) -> Result<Option<Vec<Arc<Mapping>>>> {
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
        let maps: std::result::Result<Vec<Arc<Mapping>>, _> = plan
            .remote_regions
            .iter()
            .map(|r| self.map_region(&r.desc, r.key))
            .collect();
        match maps {
            Ok(maps) => Ok(Some(maps)),
            // The peer's key check refused: the transfer is refused, not sent another way.
            Err(sys::MapError::Peer(reason))
                if reason.contains("denied") || reason.contains("key") =>
            {
                Err(Error::Denied {
                    peer: self.peer.to_string(),
                    reason,
                })
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e,
                    "shm: mapping refused; using cross-memory attach");
                Ok(None)
            }
        }
    }
}

impl Connection for Conn {
    fn prepare_runs(&self, mut plan: XferPlan, runs: Runs) -> Result<Box<dyn PreparedXfer>> {
        let Some(maps) = self.mapped(&plan)? else {
            // Granted copies straight from the runs (one remote region): no segment list, so
            // no megabytes of fresh memory to fault in for a 56,000-block request.
            if self.backend.cfg.cma_grants && self.pidfd.is_some() && plan.remote_regions.len() == 1
            {
                let r = &plan.remote_regions[0];
                match self.grant_region(&r.desc, r.key) {
                    Ok(g) => return self.granted_runs(self.self_arc()?, &plan, runs, g),
                    Err(e @ Error::Denied { .. }) => return Err(e),
                    // The general path below says why in its log and goes by round trips.
                    Err(_) => {}
                }
            }
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
    pub(super) fn self_arc(&self) -> Result<Arc<Conn>> {
        self.me.upgrade().ok_or_else(|| self.disconnected())
    }

    /// `Denied` unless `len` bytes at `remote` (piece `i` of a request) lie inside the region
    /// `g` grants: what stops a peer's indices or descriptors from reaching anything else.
    fn inside_grant(&self, g: &Grant, i: usize, remote: u64, len: u64) -> Result<()> {
        let (lo, hi) = (g.desc.addr, g.desc.addr.saturating_add(g.desc.len));
        if len != 0 && remote >= lo && remote.checked_add(len).is_some_and(|e| e <= hi) {
            return Ok(());
        }
        Err(Error::Denied {
            peer: self.peer.to_string(),
            reason: format!("piece {i} ({remote:#x}+{len}) is outside the granted region"),
        })
    }

    /// [`Conn::granted_xfer`] from runs in one remote region: every run checked against the
    /// grant, then kept as they are (each post reads them in place).
    pub(super) fn granted_runs(
        &self,
        conn: Arc<Conn>,
        plan: &XferPlan,
        runs: Runs,
        g: Arc<Grant>,
    ) -> Result<Box<dyn PreparedXfer>> {
        for (i, r) in runs.runs.iter().enumerate() {
            self.inside_grant(&g, i, r.remote, r.len)?;
        }
        Ok(Box::new(GrantedXfer::new(conn, plan, runs.runs, vec![g])))
    }

    /// A transfer we copy ourselves under `grants` (one per remote region of `plan`). Every
    /// remote range is checked here against the region its grant covers.
    pub(super) fn granted_xfer(
        &self,
        conn: Arc<Conn>,
        plan: &XferPlan,
        grants: Vec<Arc<Grant>>,
    ) -> Result<Box<dyn PreparedXfer>> {
        let runs = plan
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let g = grants
                    .get(s.remote_region as usize)
                    .ok_or_else(|| Error::InvalidArgument(format!("descriptor {i}: no region")))?;
                self.inside_grant(g, i, s.remote.addr, s.local.len)?;
                Ok(Run {
                    local: s.local.addr,
                    remote: s.remote.addr,
                    len: s.local.len,
                })
            })
            .collect::<Result<Vec<Run>>>()?;
        Ok(Box::new(GrantedXfer::new(conn, plan, runs, grants)))
    }
}
