//! Handoffs between a prefill and a decode worker, each ending in one terminal outcome on both
//! sides within bounded time.
//!
//! Pull: prefill offers a request's blocks under a lease, decode READs them and the READ's own
//! notification (delivered after the data) confirms, so prefill frees the blocks exactly once,
//! and never while the READ may still run.
//!
//! Push: decode reserves blocks ([`DecodeSide::reserve`], under a lease), every prefill rank
//! that holds some of its heads WRITEs its share ([`PrefillSide::push`]) with the request's
//! `Done` as the WRITE's notification (after the data); decode reports the blocks landed when
//! every writer's `Done` came, and never reports them free while a WRITE may still land (an
//! abort waits for the writers' acknowledgement, an expiry for one more lease).
//!
//! Messages travel as nixl notifications ([`nixl_core::Agent::send_notif`]), versioned and
//! bounded ([`Msg::decode`] checks every field of a peer's message). The sides:
//!
//! - [`PrefillSide::offer`] sends `Ready` (handoff id, request id, blocks, lease). The blocks
//!   stay the engine's to keep until [`PrefillSide::poll`] reports them freed, with one
//!   terminal outcome: `Done` (decode's READ landed), `Cancelled` (aborted on either side) or
//!   `Failed(lease expired)`. A lease is renewed by decode ([`DecodeSide::renew`]).
//! - [`DecodeSide::poll`] reports offers; [`DecodeSide::pull`] READs them into the engine's
//!   blocks with a deadline inside the lease; poll reports `Landed` only once the READ is done
//!   (every byte landed), or `Failed` with the reason, after the READ has let go of the memory.
//!
//! The prefill side frees after an abort or an expiry only when the decode side cannot be
//! reading any more: on decode's abort (sent after its READ let go), or a grace period (one
//! more lease) after the lease ran out, since decode's READ deadline ends within the lease;
//! and in both cases only once this agent's own listeners serve that peer nothing any more
//! ([`Agent::peer_idle`]): a `tcp` READ that decode gave up on may still be carried out by the
//! listener from the blocks (its chunks were asked for before decode gave up). A listener
//! stuck on a frozen peer gives up within its I/O timeout, so this wait is bounded too.
//! Replies that nobody waits for (aborts, acknowledgements, renewals) are posted
//! ([`Agent::post_notif`]): over `tcp` an acknowledgement would otherwise wait behind the DATA
//! the peer still has queued to this side.
//! Limitation: a pull from a prefill group of several ranks holds the lease on the offering
//! agent (rank 0) only; the other ranks' blocks must be kept by the engine until rank 0's
//! `Freed`. Push has no such gap (each writing rank tracks its own WRITE).
//!
//! The agent's notifications are taken by the side (it owns the agent's notification queue);
//! notifications that are not KV messages are returned by `poll` in `other`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nixl_core::{Agent, MemKind, Notification, XferOp, XferOptions, XferRequest, XferStatus};

use crate::layout::KvLayout;
use crate::{descs, plan, KvError, Result};

/// The first bytes of every KV message (other notifications can share the agent's queue).
pub const MAGIC: &[u8; 4] = b"NKV1";
/// Longest request id.
pub const MAX_REQUEST_ID: usize = 256;
/// Most blocks one handoff may name.
pub const MAX_HANDOFF_BLOCKS: usize = 100_000;
/// Longest reason in an abort.
pub const MAX_REASON: usize = 512;
/// First push handoff id (decode-chosen); pull ids (prefill-chosen) stay below it.
pub const PUSH_ID_BASE: u64 = 1 << 63;
/// Longest lease a peer may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(600);

/// A message between the two sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Prefill → decode: the blocks of `request` are ready under a lease.
    Ready {
        /// Handoff id (chosen by prefill, unique per prefill agent).
        id: u64,
        /// The engine's request id.
        request: String,
        /// Prefill block indices, in token order.
        blocks: Vec<u32>,
        /// Lease, milliseconds.
        lease_ms: u32,
    },
    /// Decode → prefill, as the notification of decode's READ (after the data): done.
    Done {
        /// Handoff id.
        id: u64,
        /// Request id, for the engine's logs.
        request: String,
    },
    /// Either way: the handoff ends; the sender no longer touches the blocks.
    Abort {
        /// Handoff id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// Decode → prefill: extend the lease by its length from now.
    Renew {
        /// Handoff id.
        id: u64,
    },
    /// Decode → prefill (push): decode reserved `blocks` for `request` until the lease ends;
    /// prefill WRITEs into them, its WRITE's notification (`Done`) confirms.
    Reserve {
        /// Handoff id (chosen by decode, unique per decode agent).
        id: u64,
        /// The engine's request id.
        request: String,
        /// Decode block indices, in token order.
        blocks: Vec<u32>,
        /// Lease, milliseconds.
        lease_ms: u32,
    },
}

impl Msg {
    /// Encodes (little-endian, `NKV1` first).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend_from_slice(&(x.len() as u32).to_le_bytes());
            b.extend_from_slice(x.as_bytes());
        };
        match self {
            Msg::Ready {
                id,
                request,
                blocks,
                lease_ms,
            }
            | Msg::Reserve {
                id,
                request,
                blocks,
                lease_ms,
            } => {
                b.push(if matches!(self, Msg::Ready { .. }) {
                    1
                } else {
                    5
                });
                b.extend_from_slice(&id.to_le_bytes());
                s(&mut b, request);
                b.extend_from_slice(&lease_ms.to_le_bytes());
                b.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
                for x in blocks {
                    b.extend_from_slice(&x.to_le_bytes());
                }
            }
            Msg::Done { id, request } => {
                b.push(2);
                b.extend_from_slice(&id.to_le_bytes());
                s(&mut b, request);
            }
            Msg::Abort { id, reason } => {
                b.push(3);
                b.extend_from_slice(&id.to_le_bytes());
                s(&mut b, reason);
            }
            Msg::Renew { id } => {
                b.push(4);
                b.extend_from_slice(&id.to_le_bytes());
            }
        }
        b
    }

    /// Decodes a peer's message: `None` if it is not a KV message at all (no magic),
    /// `Some(Err)` if it is one but malformed or out of bounds.
    pub fn decode(b: &[u8]) -> Option<Result<Msg>> {
        let rest = b.strip_prefix(MAGIC)?;
        Some(Self::decode_body(rest))
    }

    fn decode_body(b: &[u8]) -> Result<Msg> {
        let mut r = Reader(b);
        let bad = |w: &str| KvError::Protocol(w.to_owned());
        let t = r.u8()?;
        let id = r.u64()?;
        let m = match t {
            1 | 5 => {
                let request = r.str(MAX_REQUEST_ID)?;
                let lease_ms = r.u32()?;
                if lease_ms == 0 || Duration::from_millis(lease_ms.into()) > MAX_LEASE {
                    return Err(bad("lease out of range"));
                }
                let n = r.u32()? as usize;
                if n == 0 || n > MAX_HANDOFF_BLOCKS {
                    return Err(bad("block count out of range"));
                }
                let mut blocks = Vec::with_capacity(n);
                for _ in 0..n {
                    blocks.push(r.u32()?);
                }
                if t == 1 {
                    Msg::Ready {
                        id,
                        request,
                        blocks,
                        lease_ms,
                    }
                } else {
                    Msg::Reserve {
                        id,
                        request,
                        blocks,
                        lease_ms,
                    }
                }
            }
            2 => Msg::Done {
                id,
                request: r.str(MAX_REQUEST_ID)?,
            },
            3 => Msg::Abort {
                id,
                reason: r.str(MAX_REASON)?,
            },
            4 => Msg::Renew { id },
            t => return Err(KvError::Protocol(format!("unknown message type {t}"))),
        };
        if !r.0.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(m)
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(KvError::Protocol("truncated message".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self, max: usize) -> Result<String> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(KvError::Protocol(format!("string of {n} bytes over {max}")));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| KvError::Protocol("string is not UTF-8".into()))
    }
}

/// How a handoff ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every byte landed on the decode side.
    Done,
    /// Failed, with the reason (peer died, lease expired, layout mismatch, transfer error).
    Failed(String),
    /// Aborted by one side, with its reason.
    Cancelled(String),
}

/// What [`PrefillSide::poll`] reports: the blocks of a handoff are the engine's to free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Freed {
    /// The decode agent of the handoff.
    pub peer: String,
    /// Handoff id.
    pub id: u64,
    /// Request id.
    pub request: String,
    /// The blocks that were held.
    pub blocks: Vec<u32>,
    /// How it ended.
    pub outcome: Outcome,
    /// A push (its id is decode's reservation id, its blocks the prefill blocks written)
    /// rather than a pull (its id is this side's offer id): the two kinds of id never mix.
    pub push: bool,
}

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
    /// Decided (decode's abort came, or the time above passed): freed, with this outcome, once
    /// this agent's listeners carry out nothing of the decode peer's any more
    /// ([`Agent::peer_idle`]): a READ decode gave up on may still be served from the blocks.
    draining: Option<Outcome>,
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
        }
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
            self.agent.send_notif(&res.from, &done.encode())?;
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
        self.agent.send_notif(decode, &msg.encode())?;
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
    /// READ let go) or a lease after now at the latest.
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
                Msg::Abort { reason, .. } => {
                    if h.draining.is_none() {
                        h.draining = Some(match h.free_at.take() {
                            // Decode acknowledges our abort: its READ has let go.
                            Some((_, o)) => o,
                            None => Outcome::Cancelled(format!("cancelled by decode: {reason}")),
                        });
                    }
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
        for (id, h) in self.held.iter_mut() {
            if h.draining.is_none() && h.free_at.is_none() && now >= h.expires {
                // Decode's READ ends within the lease; free one more lease later.
                h.free_at = Some((now + h.lease, Outcome::Failed("lease expired".into())));
                let msg = abort(*id, "lease expired");
                let _ = self.agent.post_notif(&h.peer, &msg);
            }
            if matches!(&h.free_at, Some((t, _)) if now >= *t) {
                h.draining = h.free_at.take().map(|x| x.1);
            }
            // Never free while this agent still serves the peer a READ that may read them.
            if h.draining.is_some() && self.agent.peer_idle(&h.peer) {
                ended.push(*id);
            }
        }
        for id in ended {
            let h = self.held.remove(&id).expect("present");
            let outcome = h
                .draining
                .unwrap_or(Outcome::Failed("lease expired".into()));
            freed.push(Freed {
                peer: h.peer,
                id,
                request: h.request,
                blocks: h.blocks,
                outcome,
                push: false,
            });
        }
        (freed, other)
    }
}

/// An encoded `Abort` (the reason cut to fit [`MAX_REASON`]).
fn abort(id: u64, reason: &str) -> Vec<u8> {
    Msg::Abort {
        id,
        reason: reason.chars().take(MAX_REASON / 4).collect(),
    }
    .encode()
}

/// The bounds of a handoff this side starts (the same as [`Msg::decode`] applies to a peer's).
fn check_handoff(request: &str, blocks: &[u32], lease: Duration) -> Result<()> {
    if request.len() > MAX_REQUEST_ID || blocks.is_empty() || blocks.len() > MAX_HANDOFF_BLOCKS {
        return Err(KvError::Protocol(format!(
            "request id of at most {MAX_REQUEST_ID} bytes and 1..={MAX_HANDOFF_BLOCKS} blocks"
        )));
    }
    if lease.is_zero() || lease > MAX_LEASE {
        return Err(KvError::Protocol(format!(
            "lease {lease:?} not in (0, {MAX_LEASE:?}]"
        )));
    }
    Ok(())
}

fn why_failed(st: &XferStatus) -> String {
    match st {
        XferStatus::TimedOut => "transfer ran past the lease".to_owned(),
        XferStatus::Failed(e) => format!("transfer failed: {e}"),
        _ => "transfer cancelled".to_owned(),
    }
}

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
        for w in &waiting {
            self.agent.send_notif(w, &msg)?;
        }
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
        Ok(id)
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
