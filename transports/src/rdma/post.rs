//! A prepared transfer and its post state machine: slices striped over the lanes, completions,
//! retries and failover, notifications after the data ([`Prepared`], `PostState`).

use super::*;

/// A standalone notification waiting for its SEND completion.
pub(super) struct SyncSend {
    pub(super) buf: OwnedBuf,
    pub(super) result: Mutex<Option<std::result::Result<(), (u32, String)>>>,
    pub(super) cv: Condvar,
    /// The lane whose send slot it holds.
    pub(super) conn: Weak<RdmaConn>,
    pub(super) lane: usize,
}

impl SyncSend {
    pub(super) fn finish(&self, r: std::result::Result<(), (u32, String)>) {
        *self.result.lock() = Some(r);
        self.cv.notify_all();
    }

    pub(super) fn wait(&self, timeout: Duration) -> Option<std::result::Result<(), (u32, String)>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.result.lock();
        while g.is_none() {
            if self.cv.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        g.take()
    }
}

/// What every post of a prepared transfer reads: lanes and keys.
pub(super) struct Keys {
    /// Connection lane index per tracker lane.
    pub(super) lanes: Vec<usize>,
    /// Whether each tracker lane is on a NIC nearest to the local memory.
    pub(super) preferred: Vec<bool>,
    /// lkeys[nic][local region].
    pub(super) lkeys: Vec<Vec<u32>>,
    /// rkeys[tracker lane][remote region].
    pub(super) lane_rkeys: Vec<Vec<u32>>,
}

/// A prepared transfer.
pub(super) struct Prepared {
    pub(super) conn: Arc<RdmaConn>,
    pub(super) op: XferOp,
    pub(super) slices: Arc<[Slice]>,
    pub(super) keys: Arc<Keys>,
    pub(super) notif: Option<Vec<u8>>,
    /// Notification buffers per NIC (header + message); replaced when a post that ended early
    /// may still be sending from them.
    pub(super) notif_bufs: Mutex<Arc<Vec<Option<OwnedBuf>>>>,
    pub(super) current: Mutex<Option<Weak<PostState>>>,
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("peer", &self.conn.peer)
            .field("op", &self.op)
            .field("slices", &self.slices.len())
            .field("lanes", &self.keys.lanes.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NotifStage {
    None,
    Pending,
    Sent { lane: usize },
    Acked,
}

/// Buffers a post reuses for every round of posting (no allocation per completion once they
/// have grown).
#[derive(Debug, Default)]
pub(super) struct Scratch {
    pub(super) take: Vec<u32>,
    pub(super) starved: Vec<usize>,
    pub(super) batch: SendBatch,
}

pub(super) struct PostInner {
    pub(super) tracker: Tracker,
    pub(super) done: Option<Completion>,
    pub(super) notif: NotifStage,
    /// The notification's sequence number, set when it is first sent, kept for retries.
    pub(super) notif_seq: Option<u64>,
    /// The error to report when the tracker fails (set by non-path failures).
    pub(super) error: Option<Error>,
    pub(super) ended: bool,
    /// Registered in the connection's waiters.
    pub(super) waiting: bool,
    pub(super) scratch: Scratch,
}

/// One post in flight.
pub(super) struct PostState {
    pub(super) me: Weak<PostState>,
    pub(super) token: AtomicU64,
    pub(super) conn: Arc<RdmaConn>,
    pub(super) op: XferOp,
    pub(super) slices: Arc<[Slice]>,
    pub(super) keys: Arc<Keys>,
    pub(super) notif_len: Option<usize>,
    pub(super) notif_bufs: Arc<Vec<Option<OwnedBuf>>>,
    pub(super) inner: Mutex<PostInner>,
}

impl Prepared {
    /// The notification buffers for a new post: the current ones, or fresh ones while the
    /// previous post (ended early) may still be sending from them.
    pub(super) fn bufs_for_post(&self) -> Result<Arc<Vec<Option<OwnedBuf>>>> {
        let Some(msg) = &self.notif else {
            return Ok(Arc::clone(&self.notif_bufs.lock()));
        };
        let prev = self.current.lock().as_ref().and_then(Weak::upgrade);
        let busy = prev.is_some_and(|p| !p.inner.lock().ended);
        let mut cur = self.notif_bufs.lock();
        if busy {
            *cur = Arc::new(self.conn.notif_bufs(&self.keys.lanes, msg)?);
        }
        Ok(Arc::clone(&cur))
    }
}

impl PreparedXfer for Prepared {
    fn post(&self, done: Completion) {
        if self.conn.closed.load(Ordering::Acquire) {
            done.complete(Err(self.conn.disconnected("connection closed")));
            return;
        }
        let notif_bufs = match self.bufs_for_post() {
            Ok(b) => b,
            Err(e) => {
                done.complete(Err(e));
                return;
            }
        };
        let st = Arc::clone(&self.conn.st);
        let keys = &self.keys;
        let lane_nics: Vec<usize> = keys
            .lanes
            .iter()
            .map(|&i| usize::from(self.conn.lanes[i].qp.nic.idx))
            .collect();
        let lens: Vec<u64> = self.slices.iter().map(|s| s.len).collect();
        let mut tracker = Tracker::with_preferred(
            lens,
            &lane_nics,
            &keys.preferred,
            st.cfg.max_outstanding,
            st.cfg.max_retries,
        );
        for (t, &i) in keys.lanes.iter().enumerate() {
            if !self.conn.lanes[i].up.load(Ordering::Acquire) {
                tracker.fail_lane(t, "lane was already down");
            }
        }
        let ps = Arc::new_cyclic(|me| PostState {
            me: me.clone(),
            token: AtomicU64::new(0),
            conn: Arc::clone(&self.conn),
            op: self.op,
            slices: Arc::clone(&self.slices),
            keys: Arc::clone(keys),
            notif_len: self.notif.as_ref().map(Vec::len),
            notif_bufs,
            inner: Mutex::new(PostInner {
                tracker,
                done: Some(done),
                notif: if self.notif.is_some() {
                    NotifStage::Pending
                } else {
                    NotifStage::None
                },
                notif_seq: None,
                error: None,
                ended: false,
                waiting: false,
                scratch: Scratch::default(),
            }),
        });
        let Some(token) = st.own(Owner::Post(Arc::clone(&ps))) else {
            if let Some(c) = ps.inner.lock().done.take() {
                c.complete(Err(err("post", State::full())));
            }
            return;
        };
        ps.token.store(token, Ordering::Release);
        *self.current.lock() = Some(Arc::downgrade(&ps));
        let finish = {
            let mut g = ps.inner.lock();
            ps.pump(&mut g, None);
            ps.check(&st, &mut g)
        };
        if let Some((c, r)) = finish {
            c.complete(r);
        }
    }

    fn cancel(&self) {
        let cur = self.current.lock().as_ref().and_then(Weak::upgrade);
        if let Some(ps) = cur {
            let st = Arc::clone(&ps.conn.st);
            let finish = {
                let mut g = ps.inner.lock();
                g.tracker.abort("cancelled");
                if g.error.is_none() {
                    g.error = Some(Error::Cancelled);
                }
                ps.check(&st, &mut g)
            };
            if let Some((c, r)) = finish {
                c.complete(r);
            }
        }
    }
}

pub(super) type Finish = Option<(Completion, Result<()>)>;

impl PostState {
    pub(super) fn lane(&self, t: usize) -> &Lane {
        &self.conn.lanes[self.keys.lanes[t]]
    }

    /// Waits (once registered, it is woken) for a slot on the starved lanes; `true` if one was
    /// freed between the caller's attempt and the registration, which woke nobody: try again.
    fn wait_for_slot(&self, g: &mut PostInner) -> bool {
        if !g.waiting {
            g.waiting = true;
            self.conn.add_waiter(self.me.clone());
        }
        g.scratch
            .starved
            .iter()
            .any(|&t| self.lane(t).free.load(Ordering::SeqCst) > 0)
    }

    /// Posts what the tracker hands out, on `only` lane or all of them.
    pub(super) fn pump(&self, g: &mut PostInner, only: Option<usize>) {
        let mut only = only;
        for _ in 0..4 {
            self.pump_once(g, only.take());
            if g.scratch.starved.is_empty() {
                return;
            }
            if !self.wait_for_slot(g) {
                return;
            }
        }
    }

    /// One round of posting; leaves in `scratch.starved` the lanes that had work but no free
    /// slots. Allocation-free once the scratch buffers have grown.
    pub(super) fn pump_once(&self, g: &mut PostInner, only: Option<usize>) {
        let PostInner {
            tracker, scratch, ..
        } = g;
        let Scratch {
            take,
            starved,
            batch,
        } = scratch;
        starved.clear();
        let token = self.token.load(Ordering::Acquire);
        let opcode = match self.op {
            XferOp::Read => verbs::WR_RDMA_READ,
            XferOp::Write => verbs::WR_RDMA_WRITE,
        };
        let n = self.keys.lanes.len();
        // Requeues after a failed post may land on any lane: loop until nothing moves.
        for round in 0..=n {
            let mut moved = false;
            let (lo, hi) = match only {
                Some(l) if round == 0 && l < n => (l, l + 1),
                _ => (0, n),
            };
            for t in lo..hi {
                let lane = self.lane(t);
                if !lane.up.load(Ordering::Acquire) {
                    if tracker.lane_up(t) {
                        tracker.fail_lane(t, "the lane failed in another transfer");
                        moved = true;
                    }
                    continue;
                }
                let want = tracker.wants(t);
                if want == 0 {
                    continue;
                }
                let k = lane.acquire(want);
                if k < want && !starved.contains(&t) {
                    starved.push(t);
                }
                if k == 0 {
                    continue;
                }
                tracker.take(t, k, take);
                if (take.len() as u32) < k {
                    lane.release(k - take.len() as u32);
                }
                if take.is_empty() {
                    continue;
                }
                let lkeys = &self.keys.lkeys[usize::from(lane.qp.nic.idx)];
                let rkeys = &self.keys.lane_rkeys[t];
                batch.clear();
                for &s in take.iter() {
                    let sl = &self.slices[s as usize];
                    batch.push(
                        (token << 24) | u64::from(s),
                        opcode,
                        sl.pieces.iter().map(|p| IbvSge {
                            addr: p.addr,
                            length: p.len as u32,
                            lkey: lkeys.get(p.local_region as usize).copied().unwrap_or(0),
                        }),
                        sl.remote_addr,
                        rkeys.get(sl.remote_region as usize).copied().unwrap_or(0),
                    );
                }
                // SAFETY: every SGE lies in a local region of the request, carrying the lkey
                // of that region's MR on this NIC; the post holds those regions (its
                // completion keeps them registered) until every slice's completion, or the
                // lane's flush, is reaped.
                if let Err(e) = unsafe { lane.qp.qp.post_batch(batch) } {
                    // The head of the chain before the refused WR is on the send queue: its
                    // slices stay tracked on this lane (their completions, or the flush that
                    // the error state below forces, come back here and fail over from there);
                    // only the rest never went out.
                    let posted = e.posted.min(take.len());
                    let why = e.err.to_string();
                    lane.release((take.len() - posted) as u32);
                    self.conn.lane_down(self.keys.lanes[t], &why);
                    if posted > 0 {
                        let _ = lane.qp.qp.to_err();
                    }
                    for &s in take[posted..].iter() {
                        tracker.fail(s, t, &why);
                    }
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Woken after slots were freed: posts what it can, ends if over.
    pub(super) fn resume(&self, st: &State) {
        let finish = {
            let mut g = self.inner.lock();
            g.waiting = false;
            if g.ended {
                return;
            }
            self.pump(&mut g, None);
            self.check(st, &mut g)
        };
        if let Some((c, r)) = finish {
            c.complete(r);
        }
    }

    /// Handles one completion of this post.
    pub(super) fn on_wc(&self, st: &State, idx: u64, wc: &IbvWc) {
        let finish = {
            let mut g = self.inner.lock();
            let status = st.status_result(wc);
            if idx == NOTIF_IDX {
                if let NotifStage::Sent { lane } = g.notif {
                    self.lane(lane).release(1);
                    match status {
                        Ok(()) => g.notif = NotifStage::Acked,
                        Err((_, why)) => {
                            self.conn.lane_down(self.keys.lanes[lane], &why);
                            g.tracker.fail_lane(lane, &why);
                            g.notif = NotifStage::Pending;
                        }
                    }
                }
            } else {
                let s = idx as u32;
                if let Some(lane) = g.tracker.lane_of(s) {
                    self.lane(lane).release(1);
                    match status {
                        Ok(()) => {
                            g.tracker.complete(s, lane);
                            self.pump(&mut g, Some(lane));
                        }
                        Err((code, why)) => {
                            self.conn.lane_down(self.keys.lanes[lane], &why);
                            g.tracker.fail(s, lane, &why);
                            if code == verbs::WC_REM_ACCESS_ERR && g.error.is_none() {
                                g.error = Some(Error::Denied {
                                    peer: self.conn.peer.clone(),
                                    reason: format!(
                                        "remote access refused: {why} (region deregistered?)"
                                    ),
                                });
                                g.tracker.abort("remote access refused");
                            }
                            self.pump(&mut g, None);
                        }
                    }
                }
            }
            self.check(st, &mut g)
        };
        if let Some((c, r)) = finish {
            c.complete(r);
        }
        self.conn.wake(st);
    }

    /// Ends the post if it is over; sends the notification once the data is done.
    pub(super) fn check(&self, st: &State, g: &mut PostInner) -> Finish {
        if g.ended {
            return None;
        }
        if g.done.as_ref().is_some_and(Completion::is_abandoned) && g.error.is_none() {
            g.error = Some(Error::Cancelled);
            g.tracker.abort("cancelled");
        }
        match g.tracker.progress() {
            Progress::Running => None,
            Progress::Failed(reason) => {
                let e = g
                    .error
                    .clone()
                    .unwrap_or_else(|| self.conn.disconnected(reason));
                if let Some(c) = &g.done {
                    c.end_early(Err(e.clone()));
                }
                let notif_out = matches!(g.notif, NotifStage::Sent { .. });
                if g.tracker.inflight() == 0 && !notif_out {
                    self.end(st, g, Err(e))
                } else {
                    None
                }
            }
            Progress::Done => match g.notif {
                NotifStage::None | NotifStage::Acked => self.end(st, g, Ok(())),
                NotifStage::Sent { .. } => None,
                NotifStage::Pending => self.send_notif(st, g),
            },
        }
    }

    /// Posts the notification SEND on the first healthy lane with a free slot; waits for a
    /// slot if every healthy lane is full; fails when no lane is left. Each failure takes a
    /// lane down, so this ends.
    pub(super) fn send_notif(&self, st: &State, g: &mut PostInner) -> Finish {
        for _ in 0..4 {
            if self.send_notif_once(g) {
                return None;
            }
            if g.scratch.starved.is_empty() {
                let e = self.conn.disconnected(
                    "the data landed but the notification could not be sent on any lane",
                );
                return self.end(st, g, Err(e));
            }
            if !self.wait_for_slot(g) {
                return None;
            }
        }
        None
    }

    /// `true` when the SEND is posted; otherwise `scratch.starved` holds the busy lanes
    /// (empty: no lane left).
    pub(super) fn send_notif_once(&self, g: &mut PostInner) -> bool {
        let len = notif::HEADER + self.notif_len.unwrap_or(0);
        let token = self.token.load(Ordering::Acquire);
        g.scratch.starved.clear();
        for t in 0..self.keys.lanes.len() {
            let lane = self.lane(t);
            if !g.tracker.lane_up(t) || !lane.up.load(Ordering::Acquire) {
                continue;
            }
            let Some(Some(buf)) = self.notif_bufs.get(usize::from(lane.qp.nic.idx)) else {
                continue;
            };
            if lane.acquire(1) == 0 {
                g.scratch.starved.push(t);
                continue;
            }
            // The same number on every attempt: the target delivers it once.
            let seq = *g
                .notif_seq
                .get_or_insert_with(|| self.conn.next_notif_seq());
            let mut header = [0u8; notif::HEADER];
            notif::put_header(&mut header, seq);
            // No SEND of this buffer is in flight: a previous attempt has completed, and a
            // post still sending from it makes the next post take fresh buffers.
            buf.write(0, &header);
            let batch = &mut g.scratch.batch;
            batch.clear();
            batch.push(
                (token << 24) | NOTIF_IDX,
                verbs::WR_SEND,
                [IbvSge {
                    addr: buf.addr(0),
                    length: len as u32,
                    lkey: buf.mr().lkey(),
                }],
                0,
                0,
            );
            // SAFETY: the SGE lies in this NIC's notification buffer of the prepared request,
            // registered with its own MR and kept by the request until the SEND's completion is
            // reaped (a post still sending from it makes the next post take fresh buffers).
            match unsafe { lane.qp.qp.post_batch(batch) } {
                Ok(()) => {
                    g.notif = NotifStage::Sent { lane: t };
                    return true;
                }
                // A chain of one: `posted` is 0 (the SEND did not go out).
                Err(e) => {
                    lane.release(1);
                    let why = e.err.to_string();
                    self.conn.lane_down(self.keys.lanes[t], &why);
                    g.tracker.fail_lane(t, &why);
                }
            }
        }
        false
    }

    pub(super) fn end(&self, st: &State, g: &mut PostInner, r: Result<()>) -> Finish {
        g.ended = true;
        st.disown(self.token.load(Ordering::Acquire));
        g.done.take().map(|c| (c, r))
    }

    /// Shutdown: the hardware is stopped; end the post now.
    pub(super) fn cancel_now(&self, e: Error) {
        let done = {
            let mut g = self.inner.lock();
            g.ended = true;
            g.done.take()
        };
        if let Some(c) = done {
            c.complete(Err(e));
        }
    }
}
