//! The prefill side: offers under a lease (pull) and WRITEs into reserved blocks (push).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nixl_core::{Agent, MemKind, Notification, XferOp, XferOptions, XferRequest, XferStatus};

use super::{abort, check_handoff, why_failed, Freed, Msg, Outcome};
use crate::layout::KvLayout;
use crate::{descs, plan, KvError, Result};

#[derive(Debug)]
struct Held {
    peer: String,
    request: String,
    blocks: Vec<u32>,
    lease: Duration,
    expires: Instant,
    /// Set once prefill aborted (or the lease ran out): freed at this instant unless decode's
    /// abort or done comes first.
    free_at: Option<(Instant, Outcome)>,
    /// Decided without decode's word (the time above passed): freed, with this outcome, once
    /// this agent's listeners carry out nothing of the decode peer's any more
    /// ([`Agent::peer_idle`]): a READ decode gave up on may still be served from the blocks.
    /// Past the instant, decode is fenced ([`Agent::fence_peer`]) and the blocks freed.
    /// Decode's abort frees at once (see `poll_notifs`).
    draining: Option<(Instant, Outcome)>,
}

impl Held {
    /// What the engine is told when these blocks (of pull handoff `id`) are freed.
    fn freed(self, id: u64, outcome: Outcome) -> Freed {
        Freed {
            peer: self.peer,
            id,
            request: self.request,
            blocks: self.blocks,
            outcome,
            push: false,
        }
    }
}

/// A push reservation received by the prefill side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The decode agent.
    pub from: String,
    /// Handoff id (decode's).
    pub id: u64,
    /// Request id.
    pub request: String,
    /// Decode block indices reserved.
    pub blocks: Vec<u32>,
    /// Lease.
    pub lease: Duration,
}

#[derive(Debug)]
struct Push {
    request: String,
    blocks: Vec<u32>,
    reqs: Vec<XferRequest>,
}

/// The prefill side of handoffs on one agent: pull (offers under a lease) and push (WRITEs
/// into blocks decode reserved).
#[derive(Debug)]
pub struct PrefillSide<'a> {
    agent: &'a Agent,
    next: u64,
    held: HashMap<u64, Held>,
    /// Push: per decode peer, its layout, this worker's TP group's layouts and its rank.
    decode: HashMap<String, (KvLayout, Vec<KvLayout>, u32)>,
    reservations: Vec<Reservation>,
    pushes: HashMap<(String, u64), Push>,
    /// See [`PrefillSide::set_fence_after`]; `None`: the handoff's lease.
    fence_after: Option<Duration>,
}

/// How long one poll waits for a fenced decode's connections to let go (normally they do within
/// a millisecond: their sockets are shut); a fence that did not finish is made again at the
/// next poll.
const FENCE_WAIT: Duration = Duration::from_millis(100);

/// `outcome`, saying that decode was fenced to end it.
fn fenced(outcome: Outcome) -> Outcome {
    const WHY: &str = "; decode fenced";
    match outcome {
        Outcome::Failed(w) => Outcome::Failed(w + WHY),
        Outcome::Cancelled(w) => Outcome::Cancelled(w + WHY),
        Outcome::Done => Outcome::Done,
    }
}

impl<'a> PrefillSide<'a> {
    /// The prefill side on `agent` (which has loaded the decode peers' metadata).
    pub fn new(agent: &'a Agent) -> Self {
        PrefillSide {
            agent,
            next: 1,
            held: HashMap::new(),
            decode: HashMap::new(),
            reservations: Vec::new(),
            pushes: HashMap::new(),
            fence_after: None,
        }
    }

    /// How long a pull handoff that ended without decode's word (its lease and the grace after
    /// it ran out, or prefill's abort went unanswered for a lease) waits for this agent's
    /// listeners to serve decode nothing any more ([`Agent::peer_idle`]) before it fences decode
    /// ([`Agent::fence_peer`]: decode's connections to this agent are dropped, every READ they
    /// carry fails) and frees its blocks, reported with `; decode fenced` after the reason. By
    /// default the handoff's lease. Applies to handoffs that reach that point after the call.
    pub fn set_fence_after(&mut self, after: Duration) {
        self.fence_after = Some(after);
    }

    /// Accepts push reservations from `peer` (a decode rank with `layout`); this worker is
    /// rank `rank` of the prefill group `group`. Refused with the reason if the layouts cannot
    /// hand KV over.
    pub fn add_decode(
        &mut self,
        peer: &str,
        layout: KvLayout,
        group: Vec<KvLayout>,
        rank: u32,
    ) -> Result<()> {
        crate::check_compatible(&group, &layout)?;
        if rank as usize >= group.len() {
            return Err(KvError::Incompatible(format!(
                "rank {rank} of a group of {}",
                group.len()
            )));
        }
        self.decode.insert(peer.to_owned(), (layout, group, rank));
        Ok(())
    }

    /// Push reservations received and not yet taken.
    pub fn reservations_pending(&self) -> usize {
        self.reservations.len()
    }

    /// Push reservations received by [`PrefillSide::poll`] and not yet taken.
    pub fn take_reservations(&mut self) -> Vec<Reservation> {
        std::mem::take(&mut self.reservations)
    }

    /// Push reservations received and neither taken nor pushed yet, oldest first. One that
    /// decode aborts meanwhile leaves the list at the next poll (acknowledged at once: nothing
    /// writes its blocks).
    pub fn reservations(&self) -> &[Reservation] {
        &self.reservations
    }

    /// [`PrefillSide::push`] of the reservation `id` of decode agent `from` still in
    /// [`PrefillSide::reservations`] (it leaves the list); `None` when there is none.
    pub fn push_reserved(&mut self, from: &str, id: u64, src: &[u32]) -> Option<Result<()>> {
        let i = self
            .reservations
            .iter()
            .position(|r| r.id == id && r.from == from)?;
        let res = self.reservations.remove(i);
        Some(self.push(&res, src))
    }

    /// WRITEs this rank's share of prefill blocks `src` into the reservation's blocks, with a
    /// deadline inside its lease; the WRITE's notification (after the data) tells decode.
    /// [`PrefillSide::poll`] reports the source blocks free when the WRITE has ended.
    pub fn push(&mut self, res: &Reservation, src: &[u32]) -> Result<()> {
        let r = self.start_push(res, src);
        if let Err(e) = &r {
            let msg = abort(res.id, &format!("prefill could not push: {e}"));
            let _ = self.agent.post_notif(&res.from, &msg);
        }
        r
    }

    fn start_push(&mut self, res: &Reservation, src: &[u32]) -> Result<()> {
        let (decode, group, rank) = self
            .decode
            .get(&res.from)
            .ok_or_else(|| KvError::Incompatible(format!("no layout for decode {}", res.from)))?;
        if src.len() != res.blocks.len() {
            return Err(KvError::Mapping(format!(
                "{} prefill blocks for {} reserved",
                src.len(),
                res.blocks.len()
            )));
        }
        let mapping: Vec<(u32, u32)> = src
            .iter()
            .copied()
            .zip(res.blocks.iter().copied())
            .collect();
        let runs = plan(group, decode, &mapping)?;
        let (remote, local) = descs(&runs, *rank, &group[*rank as usize], decode, MemKind::Dram)?;
        let deadline = res.lease.saturating_sub(res.lease / 5);
        let done = Msg::Done {
            id: res.id,
            request: res.request.clone(),
        };
        let mut reqs = Vec::new();
        if local.is_empty() {
            self.agent.post_notif(&res.from, &done.encode())?;
        } else {
            let x = self.agent.create_xfer(
                XferOp::Write,
                &local,
                &remote,
                &res.from,
                XferOptions {
                    notif: Some(done.encode()),
                    deadline: Some(deadline),
                    ..XferOptions::default()
                },
            )?;
            x.post()?;
            reqs.push(x);
        }
        self.pushes.insert(
            (res.from.clone(), res.id),
            Push {
                request: res.request.clone(),
                blocks: src.to_vec(),
                reqs,
            },
        );
        Ok(())
    }

    /// Offers `blocks` of `request` to `decode` under `lease`; returns the handoff id. The
    /// blocks stay held until [`PrefillSide::poll`] reports them freed.
    pub fn offer(
        &mut self,
        decode: &str,
        request: &str,
        blocks: &[u32],
        lease: Duration,
    ) -> Result<u64> {
        check_handoff(request, blocks, lease)?;
        let id = self.next;
        self.next += 1;
        let msg = Msg::Ready {
            id,
            request: request.to_owned(),
            blocks: blocks.to_vec(),
            lease_ms: lease.as_millis() as u32,
        };
        // Posted, not sent: the caller's poll loop never waits on decode. An offer decode never
        // gets ends `Failed(lease expired)` (see poll), within two leases.
        self.agent.post_notif(decode, &msg.encode())?;
        self.held.insert(
            id,
            Held {
                peer: decode.to_owned(),
                request: request.to_owned(),
                blocks: blocks.to_vec(),
                lease,
                expires: Instant::now() + lease,
                free_at: None,
                draining: None,
            },
        );
        Ok(id)
    }

    /// Aborts a handoff: decode is told; the blocks are freed when decode acknowledges (its
    /// READ let go), or without its word a lease after now once this agent serves decode
    /// nothing any more, and `fence_after` later at the latest (decode fenced, see
    /// [`PrefillSide::set_fence_after`]).
    pub fn cancel(&mut self, id: u64, reason: &str) {
        if let Some(h) = self.held.get_mut(&id) {
            if h.free_at.is_none() && h.draining.is_none() {
                let msg = abort(id, reason);
                let _ = self.agent.post_notif(&h.peer, &msg);
                h.free_at = Some((
                    Instant::now() + h.lease,
                    Outcome::Cancelled(format!("cancelled by prefill: {reason}")),
                ));
            }
        }
    }

    /// Whether handoff `id` still holds its blocks.
    pub fn is_held(&self, id: u64) -> bool {
        self.held.contains_key(&id)
    }

    /// Handoffs still holding blocks.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Reads decode's messages and the clock; returns the handoffs whose blocks are now free,
    /// and notifications that were not KV messages.
    pub fn poll(&mut self) -> (Vec<Freed>, Vec<Notification>) {
        let notifs = self.agent.take_notifs();
        self.poll_notifs(notifs)
    }

    /// [`PrefillSide::poll`] with notifications the caller took from the agent itself (an
    /// application that shares the agent's queue with other readers).
    pub fn poll_notifs(&mut self, notifs: Vec<Notification>) -> (Vec<Freed>, Vec<Notification>) {
        let mut freed = Vec::new();
        let mut other = Vec::new();
        for n in notifs {
            let msg = match Msg::decode(&n.msg) {
                None => {
                    other.push(n);
                    continue;
                }
                Some(Err(_)) => continue, // malformed: nothing to act on
                Some(Ok(m)) => m,
            };
            let id = match msg {
                Msg::Reserve {
                    id,
                    request,
                    blocks,
                    lease_ms,
                } => {
                    if self.decode.contains_key(&n.from) {
                        self.reservations.push(Reservation {
                            from: n.from,
                            id,
                            request,
                            blocks,
                            lease: Duration::from_millis(lease_ms.into()),
                        });
                    }
                    continue;
                }
                Msg::Abort { id, .. }
                    if self
                        .reservations
                        .iter()
                        .any(|r| r.id == id && r.from == n.from) =>
                {
                    // A reservation not pushed yet: nothing writes; acknowledge.
                    self.reservations
                        .retain(|r| !(r.id == id && r.from == n.from));
                    let ack = abort(id, "acknowledged");
                    let _ = self.agent.post_notif(&n.from, &ack);
                    continue;
                }
                Msg::Abort { id, ref reason }
                    if self.pushes.contains_key(&(n.from.clone(), id)) =>
                {
                    let p = self.pushes.remove(&(n.from.clone(), id)).expect("present");
                    for x in &p.reqs {
                        x.release();
                    }
                    // Acknowledge: our WRITE has let go of decode's blocks.
                    let ack = abort(id, "acknowledged");
                    let _ = self.agent.post_notif(&n.from, &ack);
                    freed.push(Freed {
                        peer: n.from.clone(),
                        id,
                        request: p.request,
                        blocks: p.blocks,
                        outcome: Outcome::Cancelled(format!("cancelled by decode: {reason}")),
                        push: true,
                    });
                    continue;
                }
                Msg::Done { id, .. } | Msg::Abort { id, .. } | Msg::Renew { id } => id,
                Msg::Ready { .. } => continue,
            };
            // Only the decode peer the handoff was offered to may act on it.
            let Some(h) = self.held.get_mut(&id).filter(|h| h.peer == n.from) else {
                continue;
            };
            match msg {
                // The READ's own notification (or, with several ranks, sent once every READ
                // ended): every chunk was answered, nothing reads the blocks any more.
                Msg::Done { .. } => {
                    let h = self.held.remove(&id).expect("present");
                    freed.push(Freed {
                        peer: h.peer,
                        id,
                        request: h.request,
                        blocks: h.blocks,
                        outcome: Outcome::Done,
                        push: false,
                    });
                }
                // Decode sends its abort (or its acknowledgement of ours) once its READ let
                // go, and a standalone notification reaches this agent only after every transfer
                // decode had posted before it ended (the tcp barrier): nothing of the
                // READ is carried out any more, however busy decode keeps its connections.
                Msg::Abort { reason, .. } => {
                    let mut h = self.held.remove(&id).expect("present");
                    let outcome = match (h.draining.take(), h.free_at.take()) {
                        (Some((_, o)), _) | (None, Some((_, o))) => o,
                        (None, None) => {
                            Outcome::Cancelled(format!("cancelled by decode: {reason}"))
                        }
                    };
                    freed.push(h.freed(id, outcome));
                }
                _ => {
                    if h.free_at.is_none() && h.draining.is_none() {
                        h.expires = Instant::now() + h.lease;
                    }
                }
            }
        }
        let mut done_pushes = Vec::new();
        for (key, p) in &self.pushes {
            let st: Vec<XferStatus> = p.reqs.iter().map(|x| x.status()).collect();
            if let Some(bad) = st
                .iter()
                .find(|s| s.is_terminal() && !matches!(s, XferStatus::Done))
            {
                done_pushes.push((key.clone(), Outcome::Failed(why_failed(bad))));
            } else if st.iter().all(|s| matches!(s, XferStatus::Done)) {
                done_pushes.push((key.clone(), Outcome::Done));
            }
        }
        for (key, outcome) in done_pushes {
            let p = self.pushes.remove(&key).expect("present");
            if let Outcome::Failed(why) = &outcome {
                for x in &p.reqs {
                    x.release();
                }
                let msg = abort(key.1, why);
                let _ = self.agent.post_notif(&key.0, &msg);
            }
            freed.push(Freed {
                peer: key.0.clone(),
                id: key.1,
                request: p.request,
                blocks: p.blocks,
                outcome,
                push: true,
            });
        }
        let now = Instant::now();
        let mut ended = Vec::new();
        let mut fence: Vec<String> = Vec::new();
        for (id, h) in self.held.iter_mut() {
            if h.draining.is_none() && h.free_at.is_none() && now >= h.expires {
                // Decode's READ ends within the lease; free one more lease later.
                h.free_at = Some((now + h.lease, Outcome::Failed("lease expired".into())));
                let msg = abort(*id, "lease expired");
                let _ = self.agent.post_notif(&h.peer, &msg);
            }
            if matches!(&h.free_at, Some((t, _)) if now >= *t) {
                let fence_at = now + self.fence_after.unwrap_or(h.lease);
                h.draining = h.free_at.take().map(|(_, o)| (fence_at, o));
            }
            // Never free while this agent still serves the peer a READ that may read them:
            // wait for its listeners to go idle for the peer, and past `fence_at` end what
            // they serve it.
            if let Some((fence_at, _)) = h.draining {
                if self.agent.peer_idle(&h.peer) {
                    ended.extend(h.draining.take().map(|(_, outcome)| (*id, outcome)));
                } else if now >= fence_at && !fence.contains(&h.peer) {
                    fence.push(h.peer.clone());
                }
            }
        }
        for peer in fence {
            if !self.agent.fence_peer(&peer, FENCE_WAIT) {
                continue; // made again at the next poll
            }
            // Nothing decode asked before the fence is carried out any more: every handoff of
            // that peer that waited for it to go idle is free now.
            for (id, h) in self.held.iter_mut().filter(|(_, h)| h.peer == peer) {
                if let Some((_, outcome)) = h.draining.take() {
                    ended.push((*id, fenced(outcome)));
                }
            }
        }
        for (id, outcome) in ended {
            if let Some(h) = self.held.remove(&id) {
                freed.push(h.freed(id, outcome));
            }
        }
        (freed, other)
    }
}
