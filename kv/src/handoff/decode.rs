//! The decode side: READs of offered blocks (pull) and reservations for writers (push).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nixl_core::{Agent, MemKind, Notification, XferOp, XferOptions, XferRequest, XferStatus};

use super::{abort, check_handoff, Msg, Outcome, PUSH_ID_BASE};
use crate::layout::KvLayout;
use crate::{descs, plan, KvError, Result};

/// An offer received by the decode side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The prefill agent.
    pub from: String,
    /// Handoff id.
    pub id: u64,
    /// Request id.
    pub request: String,
    /// Prefill block indices.
    pub blocks: Vec<u32>,
    /// Lease.
    pub lease: Duration,
}

/// What [`DecodeSide::poll`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeEvent {
    /// Prefill offers a request's blocks: reserve blocks and [`DecodeSide::pull`].
    Offered(Offer),
    /// A pull ended: with `Done`, every byte landed in `blocks`; otherwise the blocks may be
    /// freed (nothing writes them any more).
    Ended {
        /// The prefill agent: the one that offered (pull), or that the reservation was made
        /// with (push).
        from: String,
        /// Handoff id.
        id: u64,
        /// Request id.
        request: String,
        /// The decode blocks of the pull.
        blocks: Vec<u32>,
        /// How it ended.
        outcome: Outcome,
        /// A push reservation ([`DecodeSide::reserve`], `id` is its id) rather than a pull
        /// (`id` is prefill's offer id): the two kinds of id never mix.
        push: bool,
    },
}

#[derive(Debug)]
struct Pull {
    from: String,
    request: String,
    blocks: Vec<u32>,
    reqs: Vec<XferRequest>,
    /// Whether the READ carries the confirmation (a single prefill rank); else poll sends it.
    confirmed_by_read: bool,
}

/// The decode side of pull handoffs on one agent: a single prefill rank per peer (its layouts
/// known from the handshake) and this rank's layout.
#[derive(Debug)]
pub struct DecodeSide<'a> {
    agent: &'a Agent,
    layout: KvLayout,
    /// Per prefill peer: the layouts of its TP group and the agent names, rank order.
    prefill: HashMap<String, (Vec<KvLayout>, Vec<String>)>,
    pulls: HashMap<(String, u64), Pull>,
    /// Offers seen and not yet pulled: (from, id) -> lease end.
    offered: HashMap<(String, u64), Instant>,
    /// Push reservations by id (decode's).
    reserved: HashMap<u64, Reserved>,
    next: u64,
    /// Acknowledgements of pulls that ended without every byte: posted at the start of the next
    /// poll, once the engine has seen the end (prefill may reuse the blocks as soon as it has
    /// one).
    outbox: Vec<(String, Vec<u8>)>,
}

#[derive(Debug)]
struct Reserved {
    /// The prefill agent the reservation was made with.
    prefill: String,
    request: String,
    blocks: Vec<u32>,
    lease: Duration,
    expires: Instant,
    /// Writers whose `Done` has not come yet.
    waiting: Vec<String>,
    /// Set on abort or expiry: freed then, unless every writer acknowledges first.
    free_at: Option<(Instant, Outcome)>,
}

impl<'a> DecodeSide<'a> {
    /// The decode side on `agent`, whose KV cache is `layout` (registered with `agent`).
    pub fn new(agent: &'a Agent, layout: KvLayout) -> Result<Self> {
        layout.validate()?;
        Ok(DecodeSide {
            agent,
            layout,
            prefill: HashMap::new(),
            pulls: HashMap::new(),
            offered: HashMap::new(),
            reserved: HashMap::new(),
            // Push ids have the top bit set, pull ids (prefill's) do not: a message naming an
            // id can never be taken for the other kind of handoff.
            next: PUSH_ID_BASE,
            outbox: Vec::new(),
        })
    }

    /// Push: reserves `blocks` of this rank for `request` and asks the prefill group of
    /// `prefill` (added with [`DecodeSide::add_prefill`]) to WRITE into them within `lease`.
    /// [`DecodeSide::poll`] reports `Ended` once every writing rank's data has landed (or why
    /// not); the blocks are never reported free while a WRITE may still land in them.
    pub fn reserve(
        &mut self,
        prefill: &str,
        request: &str,
        blocks: &[u32],
        lease: Duration,
    ) -> Result<u64> {
        check_handoff(request, blocks, lease)?;
        let (layouts, agents) = self
            .prefill
            .get(prefill)
            .ok_or_else(|| KvError::Incompatible(format!("no layouts for prefill {prefill}")))?;
        // The ranks that hold this rank's heads (independent of which blocks).
        let writers: std::collections::BTreeSet<u32> =
            plan(layouts, &self.layout, &[(0, blocks[0])])?
                .iter()
                .map(|r| r.src_rank)
                .collect();
        let waiting: Vec<String> = writers
            .iter()
            .map(|&r| agents[r as usize].clone())
            .collect();
        let id = self.next;
        self.next += 1;
        let msg = Msg::Reserve {
            id,
            request: request.to_owned(),
            blocks: blocks.to_vec(),
            lease_ms: lease.as_millis() as u32,
        }
        .encode();
        // Posted, not sent: the caller's poll loop never waits on a writer. A reservation a
        // writer never gets ends `Failed(lease expired)` (see poll), within two leases.
        for (i, w) in waiting.iter().enumerate() {
            if let Err(e) = self.agent.post_notif(w, &msg) {
                if i == 0 {
                    return Err(e.into());
                }
                // Some writers may write already: the reservation ends through an abort.
                let why = format!("could not ask writer {w}: {e}");
                self.insert_reserved(id, prefill, request, blocks, lease, waiting.clone());
                self.cancel_reservation(id, &why);
                if let Some(r) = self.reserved.get_mut(&id) {
                    r.free_at = r.free_at.take().map(|(t, _)| (t, Outcome::Failed(why)));
                }
                return Ok(id);
            }
        }
        self.insert_reserved(id, prefill, request, blocks, lease, waiting);
        Ok(id)
    }

    fn insert_reserved(
        &mut self,
        id: u64,
        prefill: &str,
        request: &str,
        blocks: &[u32],
        lease: Duration,
        waiting: Vec<String>,
    ) {
        self.reserved.insert(
            id,
            Reserved {
                prefill: prefill.to_owned(),
                request: request.to_owned(),
                blocks: blocks.to_vec(),
                lease,
                expires: Instant::now() + lease,
                waiting,
                free_at: None,
            },
        );
    }

    /// Aborts a push reservation: the writers are told; the blocks are reported free when
    /// they acknowledge (their WRITE let go) or a lease from now at the latest.
    pub fn cancel_reservation(&mut self, id: u64, reason: &str) {
        if let Some(r) = self.reserved.get_mut(&id) {
            if r.free_at.is_none() {
                let msg = abort(id, reason);
                for w in &r.waiting {
                    let _ = self.agent.post_notif(w, &msg);
                }
                r.free_at = Some((
                    Instant::now() + r.lease,
                    Outcome::Cancelled(format!("cancelled by decode: {reason}")),
                ));
            }
        }
    }

    /// Accepts the prefill group whose rank 0 agent is `peer` (offers come from it), with the
    /// layouts and agent names of its ranks: refused with the reason if the layouts cannot
    /// hand KV to this rank.
    pub fn add_prefill(
        &mut self,
        peer: &str,
        layouts: Vec<KvLayout>,
        agents: Vec<String>,
    ) -> Result<()> {
        crate::check_compatible(&layouts, &self.layout)?;
        if agents.len() != layouts.len() {
            return Err(KvError::Incompatible(
                "one agent name per prefill rank".into(),
            ));
        }
        self.prefill.insert(peer.to_owned(), (layouts, agents));
        Ok(())
    }

    /// READs the offer's blocks into `dst` (same count) with a deadline inside the lease.
    pub fn pull(&mut self, offer: &Offer, dst: &[u32]) -> Result<()> {
        let key = (offer.from.clone(), offer.id);
        let Some(until) = self.offered.remove(&key) else {
            return Err(KvError::Protocol(format!(
                "no open offer {} from {}",
                offer.id, offer.from
            )));
        };
        let res = self.start(offer, dst, until);
        if let Err(e) = &res {
            // Nothing runs: tell prefill at once so it frees.
            let msg = abort(offer.id, &format!("decode could not pull: {e}"));
            let _ = self.agent.post_notif(&offer.from, &msg);
        }
        res
    }

    fn start(&mut self, offer: &Offer, dst: &[u32], until: Instant) -> Result<()> {
        if dst.len() != offer.blocks.len() {
            return Err(KvError::Mapping(format!(
                "{} decode blocks for {} prefill blocks",
                dst.len(),
                offer.blocks.len()
            )));
        }
        let (layouts, agents) = self.prefill.get(&offer.from).ok_or_else(|| {
            KvError::Incompatible(format!("no layouts for prefill {}", offer.from))
        })?;
        let mapping: Vec<(u32, u32)> = offer
            .blocks
            .iter()
            .copied()
            .zip(dst.iter().copied())
            .collect();
        let runs = plan(layouts, &self.layout, &mapping)?;
        // The READ must end inside the lease (with a margin for the confirmation to travel).
        let left = until.saturating_duration_since(Instant::now());
        let deadline = left.saturating_sub(left / 5);
        if deadline.is_zero() {
            return Err(KvError::Protocol("the lease has already run out".into()));
        }
        let done = Msg::Done {
            id: offer.id,
            request: offer.request.clone(),
        }
        .encode();
        let mut reqs = Vec::new();
        for (rank, l) in layouts.iter().enumerate() {
            let (local, remote) = descs(&runs, rank as u32, l, &self.layout, MemKind::Dram)?;
            if local.is_empty() {
                continue;
            }
            // Rank 0's READ carries the confirmation; with several ranks, it is sent once all
            // READs are done (see poll).
            let notif = (layouts.len() == 1).then(|| done.clone());
            let x = self.agent.create_xfer(
                XferOp::Read,
                &local,
                &remote,
                &agents[rank],
                XferOptions {
                    notif,
                    deadline: Some(deadline),
                    ..XferOptions::default()
                },
            )?;
            reqs.push(x);
        }
        for x in &reqs {
            x.post()?;
        }
        self.pulls.insert(
            (offer.from.clone(), offer.id),
            Pull {
                from: offer.from.clone(),
                request: offer.request.clone(),
                blocks: dst.to_vec(),
                reqs,
                confirmed_by_read: layouts.len() == 1,
            },
        );
        Ok(())
    }

    /// Asks prefill to extend the lease of an open offer or a pull.
    pub fn renew(&mut self, from: &str, id: u64) -> Result<()> {
        self.agent.post_notif(from, &Msg::Renew { id }.encode())?;
        Ok(())
    }

    /// Aborts a pull (or declines an offer): the READ is cancelled and let go, then prefill is
    /// told, so it can free.
    pub fn cancel(&mut self, from: &str, id: u64, reason: &str) -> Option<DecodeEvent> {
        self.offered.remove(&(from.to_owned(), id));
        let p = self.pulls.remove(&(from.to_owned(), id));
        for x in p.iter().flat_map(|p| &p.reqs) {
            x.release();
        }
        let msg = abort(id, reason);
        let _ = self.agent.post_notif(from, &msg);
        p.map(|p| DecodeEvent::Ended {
            from: from.to_owned(),
            id,
            request: p.request,
            blocks: p.blocks,
            outcome: Outcome::Cancelled(format!("cancelled by decode: {reason}")),
            push: false,
        })
    }

    /// Cancels every pull (its READ let go first, prefill told) and declines every open
    /// offer: for a decode side that closes. Returns the pulls that ended. Push reservations
    /// are left to [`DecodeSide::cancel_reservation`] (their blocks stay reserved until the
    /// writers let go).
    pub fn cancel_all(&mut self, reason: &str) -> Vec<DecodeEvent> {
        let keys: Vec<(String, u64)> = self.pulls.keys().cloned().collect();
        let ev = keys
            .into_iter()
            .filter_map(|(from, id)| self.cancel(&from, id, reason))
            .collect();
        for (from, id) in std::mem::take(&mut self.offered).into_keys() {
            let _ = self.agent.post_notif(&from, &abort(id, reason));
        }
        for (to, msg) in std::mem::take(&mut self.outbox) {
            let _ = self.agent.post_notif(&to, &msg);
        }
        ev
    }

    /// Reads prefill's messages and the pulls' states. A pull that ended without every byte
    /// (its READ let go of the blocks first) is reported here and prefill is told at the next
    /// poll.
    pub fn poll(&mut self) -> (Vec<DecodeEvent>, Vec<Notification>) {
        let notifs = self.agent.take_notifs();
        self.poll_notifs(notifs)
    }

    /// [`DecodeSide::poll`] with notifications the caller took from the agent itself (an
    /// application that shares the agent's queue with other readers).
    pub fn poll_notifs(
        &mut self,
        notifs: Vec<Notification>,
    ) -> (Vec<DecodeEvent>, Vec<Notification>) {
        for (to, msg) in std::mem::take(&mut self.outbox) {
            let _ = self.agent.post_notif(&to, &msg);
        }
        let mut ev = Vec::new();
        let mut other = Vec::new();
        for n in notifs {
            match Msg::decode(&n.msg) {
                None => other.push(n),
                Some(Err(_)) => {}
                Some(Ok(Msg::Ready {
                    id,
                    request,
                    blocks,
                    lease_ms,
                })) => {
                    let key = (n.from.clone(), id);
                    if self.prefill.contains_key(&n.from)
                        && !self.pulls.contains_key(&key)
                        && !self.offered.contains_key(&key)
                    {
                        let lease = Duration::from_millis(lease_ms.into());
                        self.offered.insert(key, Instant::now() + lease);
                        ev.push(DecodeEvent::Offered(Offer {
                            from: n.from,
                            id,
                            request,
                            blocks,
                            lease,
                        }));
                    }
                }
                Some(Ok(Msg::Done { id, .. })) => {
                    if let Some(r) = self.reserved.get_mut(&id) {
                        r.waiting.retain(|w| *w != n.from);
                    }
                }
                Some(Ok(Msg::Abort { id, reason }))
                    if self
                        .reserved
                        .get(&id)
                        .is_some_and(|r| r.waiting.contains(&n.from)) =>
                {
                    let r = self.reserved.get_mut(&id).expect("present");
                    r.waiting.retain(|w| *w != n.from);
                    if r.free_at.is_none() {
                        // A writer gave up: the others are told, and the handoff fails once
                        // they have let go too.
                        let msg = abort(id, "another rank aborted");
                        for w in &r.waiting {
                            let _ = self.agent.post_notif(w, &msg);
                        }
                        r.free_at = Some((
                            Instant::now() + r.lease,
                            Outcome::Cancelled(format!("cancelled by prefill: {reason}")),
                        ));
                    }
                }
                Some(Ok(Msg::Abort { id, reason })) => {
                    let key = (n.from.clone(), id);
                    if self.offered.remove(&key).is_some() {
                        // An offer not pulled: nothing reads; acknowledge so prefill frees.
                        let ack = abort(id, "acknowledged");
                        let _ = self.agent.post_notif(&n.from, &ack);
                    }
                    if let Some(p) = self.pulls.remove(&key) {
                        for x in &p.reqs {
                            x.release();
                        }
                        // Acknowledge (next poll): our READ has let go.
                        self.outbox
                            .push((n.from.clone(), abort(id, "acknowledged")));
                        ev.push(DecodeEvent::Ended {
                            from: n.from.clone(),
                            id,
                            request: p.request,
                            blocks: p.blocks,
                            outcome: Outcome::Cancelled(format!("cancelled by prefill: {reason}")),
                            push: false,
                        });
                    }
                }
                Some(Ok(_)) => {}
            }
        }
        let now = Instant::now();
        let mut over = Vec::new();
        for (id, r) in self.reserved.iter_mut() {
            if r.free_at.is_none() && now >= r.expires && !r.waiting.is_empty() {
                let msg = abort(*id, "lease expired");
                for w in &r.waiting {
                    let _ = self.agent.post_notif(w, &msg);
                }
                // Writers' deadlines end within the lease; free one more lease later.
                r.free_at = Some((now + r.lease, Outcome::Failed("lease expired".into())));
            }
            let outcome = match &r.free_at {
                None if r.waiting.is_empty() => Some(Outcome::Done),
                Some((_, o)) if r.waiting.is_empty() => Some(o.clone()),
                Some((t, o)) if now >= *t => Some(o.clone()),
                _ => None,
            };
            if let Some(o) = outcome {
                over.push((*id, o));
            }
        }
        for (id, outcome) in over {
            let r = self.reserved.remove(&id).expect("present");
            ev.push(DecodeEvent::Ended {
                from: r.prefill,
                id,
                request: r.request,
                blocks: r.blocks,
                outcome,
                push: true,
            });
        }
        let mut ended = Vec::new();
        for (key, p) in &self.pulls {
            let st: Vec<XferStatus> = p.reqs.iter().map(|x| x.status()).collect();
            if let Some(bad) = st
                .iter()
                .find(|s| s.is_terminal() && !matches!(s, XferStatus::Done))
            {
                let why = match bad {
                    XferStatus::TimedOut => "transfer ran past the lease".to_owned(),
                    XferStatus::Failed(e) => format!("transfer failed: {e}"),
                    _ => "transfer cancelled".to_owned(),
                };
                ended.push((key.clone(), Outcome::Failed(why)));
            } else if st.iter().all(|s| matches!(s, XferStatus::Done)) {
                ended.push((key.clone(), Outcome::Done));
            }
        }
        for (key, outcome) in ended {
            let p = self.pulls.remove(&key).expect("present");
            match &outcome {
                Outcome::Done => {
                    // Several prefill ranks: the offering rank may not even be one that was
                    // read (MLA, or decode TP above prefill TP), so it is told here.
                    if !p.confirmed_by_read {
                        let done = Msg::Done {
                            id: key.1,
                            request: p.request.clone(),
                        };
                        let _ = self.agent.post_notif(&p.from, &done.encode());
                    }
                }
                Outcome::Failed(why) | Outcome::Cancelled(why) => {
                    for x in &p.reqs {
                        x.release();
                    }
                    self.outbox.push((p.from.clone(), abort(key.1, why)));
                }
            }
            ev.push(DecodeEvent::Ended {
                from: key.0.clone(),
                id: key.1,
                request: p.request,
                blocks: p.blocks,
                outcome,
                push: false,
            });
        }
        (ev, other)
    }
}
