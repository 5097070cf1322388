//! The initiator side: a connection to one peer ([`RdmaConn`]) with its lanes, and preparing
//! transfers on it.

use super::*;

pub(super) struct Lane {
    pub(super) qp: LaneQp,
    pub(super) remote_nic: u8,
    pub(super) up: AtomicBool,
    /// Free send-queue slots, shared by every post on the lane.
    pub(super) free: AtomicU32,
}

impl Lane {
    /// Takes up to `want` send-queue slots; returns how many.
    pub(super) fn acquire(&self, want: u32) -> u32 {
        let mut cur = self.free.load(Ordering::SeqCst);
        loop {
            let k = cur.min(want);
            if k == 0 {
                return 0;
            }
            match self
                .free
                .compare_exchange(cur, cur - k, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return k,
                Err(now) => cur = now,
            }
        }
    }

    pub(super) fn release(&self, n: u32) {
        self.free.fetch_add(n, Ordering::SeqCst);
    }
}

/// A connection to one peer: its lanes.
pub(super) struct RdmaConn {
    pub(super) me: Weak<RdmaConn>,
    pub(super) st: Arc<State>,
    pub(super) control: Arc<dyn ControlChannel>,
    pub(super) peer: String,
    pub(super) conn_id: u64,
    pub(super) remote: ConnInfo,
    pub(super) lanes: Vec<Lane>,
    pub(super) closed: AtomicBool,
    pub(super) timeout: Duration,
    /// Posts waiting for send-queue slots on some lane.
    pub(super) waiters: Mutex<Vec<Weak<PostState>>>,
    /// Whether `waiters` may be non-empty (read without the lock on every completion).
    pub(super) has_waiters: AtomicBool,
    /// The next notification's sequence number.
    pub(super) notif_seq: AtomicU64,
}

impl fmt::Debug for RdmaConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaConn")
            .field("peer", &self.peer)
            .field("lanes", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

impl RdmaConn {
    pub(super) fn lane_down(&self, lane: usize, why: &str) {
        if let Some(l) = self.lanes.get(lane) {
            if l.up.swap(false, Ordering::AcqRel) {
                metrics::counter!("nixl_rdma_lane_failures_total").increment(1);
                tracing::warn!(peer = %self.peer, nic = %l.qp.nic.name, lane, why, "rdma lane down");
            }
        }
    }

    /// Registers a post to be resumed when slots are freed. The caller checks the lanes' free
    /// slots again afterwards: a release that happened before `has_waiters` was set is seen
    /// there (both sides use SeqCst), one after it wakes the post.
    pub(super) fn add_waiter(&self, p: Weak<PostState>) {
        let mut w = self.waiters.lock();
        w.push(p);
        self.has_waiters.store(true, Ordering::SeqCst);
    }

    /// Lets posts that waited for send-queue slots try again (called after slots were freed,
    /// with no post's lock held). No lock is taken when nobody waits.
    pub(super) fn wake(&self, st: &State) {
        if !self.has_waiters.load(Ordering::SeqCst) {
            return;
        }
        let ws: Vec<Weak<PostState>> = {
            let mut w = self.waiters.lock();
            self.has_waiters.store(false, Ordering::SeqCst);
            std::mem::take(&mut *w)
        };
        for p in ws.iter().filter_map(Weak::upgrade) {
            p.resume(st);
        }
    }

    pub(super) fn disconnected(&self, reason: impl Into<String>) -> Error {
        Error::RemoteDisconnect {
            peer: self.peer.clone(),
            reason: reason.into(),
        }
    }

    pub(super) fn next_notif_seq(&self) -> u64 {
        self.notif_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Notification buffers (header + `msg`), one per NIC that one of `lanes` uses.
    pub(super) fn notif_bufs(&self, lanes: &[usize], msg: &[u8]) -> Result<Vec<Option<OwnedBuf>>> {
        let mut bufs: Vec<Option<OwnedBuf>> = (0..self.st.nics.len()).map(|_| None).collect();
        for &i in lanes {
            let nic = &self.lanes[i].qp.nic;
            let slot = &mut bufs[usize::from(nic.idx)];
            if slot.is_none() {
                let b = OwnedBuf::new(&nic.pd, notif::HEADER + msg.len(), 0)
                    .map_err(|e| err("prepare", format!("notification buffer: {e}")))?;
                b.write(notif::HEADER, msg);
                *slot = Some(b);
            }
        }
        Ok(bufs)
    }
}

impl Drop for RdmaConn {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            self.close();
        }
    }
}

impl Connection for RdmaConn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        let st = &self.st;
        for k in [plan.local_kind, plan.remote_kind] {
            if !KINDS.contains(&k) {
                return Err(Error::InvalidArgument(format!(
                    "rdma moves DRAM and VRAM, not {k}"
                )));
            }
        }
        let notif = plan.notif.clone();
        if let Some(n) = &notif {
            if n.len() > self.remote.max_notif as usize {
                return Err(Error::InvalidArgument(format!(
                    "notification of {} bytes exceeds peer '{}''s rdma limit of {}",
                    n.len(),
                    self.peer,
                    self.remote.max_notif
                )));
            }
        }
        // Remote keys per remote region.
        let mut rkeys: Vec<RegionKeys> = Vec::with_capacity(plan.remote_regions.len());
        for (i, r) in plan.remote_regions.iter().enumerate() {
            let public = r
                .backends
                .iter()
                .find(|(b, _)| *b == BackendName::Rdma)
                .map(|(_, p)| p.as_slice())
                .ok_or_else(|| Error::RemoteNotRegistered {
                    peer: self.peer.clone(),
                    index: i,
                    kind: r.kind,
                    desc: r.desc,
                })?;
            let keys = RegionKeys::decode(public).map_err(|e| {
                Error::InvalidArgument(format!(
                    "peer '{}': bad rdma data of region {:?}: {e}",
                    self.peer, r.desc
                ))
            })?;
            if keys.addr != r.desc.addr || keys.len != r.desc.len {
                return Err(Error::InvalidArgument(format!(
                    "peer '{}': rdma data of region {:?} covers {:#x}+{} instead",
                    self.peer, r.desc, keys.addr, keys.len
                )));
            }
            rkeys.push(keys);
        }
        // Local keys per local NIC per local region (0 where the NIC has no MR for it), the
        // NICs that hold every local region, and the NICs nearest to all of them.
        let nnics = st.nics.len();
        let mut lkeys: Vec<Vec<u32>> = vec![Vec::with_capacity(plan.local_regions.len()); nnics];
        let mut local_ok = place::all(nnics);
        let mut near = place::all(nnics);
        {
            let regions = st.regions.lock();
            for r in &plan.local_regions {
                let k = (r.kind.code(), r.desc.addr, r.desc.len, r.desc.dev_id);
                let reg = regions.get(&k).ok_or_else(|| {
                    err(
                        "prepare",
                        format!("local region {:?} is not registered with rdma", r.desc),
                    )
                })?;
                for (n, keys) in lkeys.iter_mut().enumerate() {
                    match reg.mrs.get(n).and_then(Option::as_ref) {
                        Some(mr) => keys.push(mr.lkey()),
                        None => {
                            keys.push(0);
                            local_ok &= !(1u64 << n.min(63));
                        }
                    }
                }
                near &= reg.near;
            }
        }
        // Lanes that reach every region on both sides.
        let lanes: Vec<usize> = (0..self.lanes.len())
            .filter(|&i| {
                let l = &self.lanes[i];
                local_ok & (1u64 << usize::from(l.qp.nic.idx).min(63)) != 0
                    && rkeys.iter().all(|k| k.rkey(l.remote_nic).is_some())
            })
            .collect();
        if lanes.is_empty() {
            return Err(err(
                "prepare",
                format!(
                    "no lane to peer '{}' reaches every region (local regions registered on \
                     NICs {local_ok:#b}; remote regions' NICs from the peer's metadata)",
                    self.peer
                ),
            ));
        }
        let preferred: Vec<bool> = lanes
            .iter()
            .map(|&i| near & (1u64 << usize::from(self.lanes[i].qp.nic.idx).min(63)) != 0)
            .collect();
        let read = plan.op == XferOp::Read;
        let max_sge = lanes
            .iter()
            .map(|&i| {
                let n = &self.lanes[i].qp.nic;
                if read {
                    n.max_sge_rd
                } else {
                    n.max_sge
                }
            })
            .min()
            .unwrap_or(1)
            .min(st.cfg.max_sge)
            .max(1);
        let slices = plan::slice_segments(&plan.segments, st.cfg.slice_bytes, max_sge);
        if slices.len() >= MAX_SLICES {
            return Err(Error::InvalidArgument(format!(
                "{} work requests in one transfer (limit {MAX_SLICES}): raise [rdma] slice_bytes",
                slices.len()
            )));
        }
        // Per lane: the rkey of each remote region on the lane's remote NIC.
        let lane_rkeys: Vec<Vec<u32>> = lanes
            .iter()
            .map(|&i| {
                rkeys
                    .iter()
                    .map(|k| k.rkey(self.lanes[i].remote_nic).unwrap_or(0))
                    .collect()
            })
            .collect();
        let notif_bufs = match &notif {
            Some(n) => self.notif_bufs(&lanes, n)?,
            None => Vec::new(),
        };
        Ok(Box::new(Prepared {
            conn: self
                .me
                .upgrade()
                .ok_or_else(|| err("prepare", "connection is gone"))?,
            op: plan.op,
            slices: slices.into(),
            keys: Arc::new(Keys {
                lanes,
                preferred,
                lkeys,
                lane_rkeys,
            }),
            notif,
            notif_bufs: Mutex::new(Arc::new(notif_bufs)),
            current: Mutex::new(None),
        }))
    }

    fn send_notif(&self, _from: &str, msg: &[u8]) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.disconnected("connection closed"));
        }
        if msg.len() > self.remote.max_notif as usize {
            return Err(Error::InvalidArgument(format!(
                "notification of {} bytes exceeds peer '{}''s rdma limit of {}",
                msg.len(),
                self.peer,
                self.remote.max_notif
            )));
        }
        let deadline = Instant::now() + self.timeout;
        let mut last = String::from("no lane is up");
        // One number for every attempt: the target delivers it once.
        let seq = self.next_notif_seq();
        let mut header = [0u8; notif::HEADER];
        notif::put_header(&mut header, seq);
        let len = notif::HEADER + msg.len();
        loop {
            let mut busy = false;
            for (i, l) in self.lanes.iter().enumerate() {
                if !l.up.load(Ordering::Acquire) {
                    continue;
                }
                if l.acquire(1) == 0 {
                    busy = true;
                    continue;
                }
                let buf = match OwnedBuf::new(&l.qp.nic.pd, len, 0) {
                    Ok(b) => b,
                    Err(e) => {
                        l.release(1);
                        return Err(err("notification", e.to_string()));
                    }
                };
                buf.write(0, &header);
                buf.write(notif::HEADER, msg);
                let sync = Arc::new(SyncSend {
                    buf,
                    result: Mutex::new(None),
                    cv: Condvar::new(),
                    conn: self.me.clone(),
                    lane: i,
                });
                let Some(token) = self.st.own(Owner::Sync(Arc::clone(&sync))) else {
                    l.release(1);
                    return Err(err("notification", State::full()));
                };
                let sge = [IbvSge {
                    addr: sync.buf.addr(0),
                    length: len as u32,
                    lkey: sync.buf.mr().lkey(),
                }];
                let req = SendReq {
                    wr_id: (token << 24) | NOTIF_IDX,
                    opcode: verbs::WR_SEND,
                    sges: &sge,
                    remote_addr: 0,
                    rkey: 0,
                };
                // SAFETY: the SGE lies in `sync.buf`, an OwnedBuf with its own MR on this
                // lane's PD; `sync` is owned by the connection's state under `token` until the
                // SEND's completion (or the lane's flush) is reaped, so the buffer outlives it.
                if let Err(e) = unsafe { l.qp.qp.post_send(&[req]) } {
                    self.st.disown(token);
                    l.release(1);
                    self.lane_down(i, &e.to_string());
                    last = e.to_string();
                    continue;
                }
                match sync.wait(deadline.saturating_duration_since(Instant::now())) {
                    Some(Ok(())) => return Ok(()),
                    Some(Err((_, why))) => {
                        self.lane_down(i, &why);
                        last = why;
                    }
                    None => {
                        // The owner entry keeps the buffer alive until the NIC reports.
                        return Err(self.disconnected(format!(
                            "notification not acknowledged within {:?}",
                            self.timeout
                        )));
                    }
                }
            }
            if !busy {
                break;
            }
            if Instant::now() >= deadline {
                return Err(
                    self.disconnected(format!("every lane stayed busy for {:?}", self.timeout))
                );
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Err(self.disconnected(format!("notification failed on every lane: {last}")))
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for l in &self.lanes {
            l.up.store(false, Ordering::Release);
            let _ = l.qp.qp.to_err();
        }
        let from = self.st.target.name().to_owned();
        let _ = self.control.call(
            &self.remote.endpoint,
            &from,
            BackendName::Rdma,
            &Msg::Close {
                conn_id: self.conn_id,
            }
            .encode(),
            Duration::from_secs(1),
        );
    }
}
