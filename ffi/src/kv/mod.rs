//! KV-cache handoff from C (the `nixl-kv` crate), for engines that keep their own KV memory:
//! describe the cache (`nixl_kv_layout`, validated, encoded to exchange with peers), compute the
//! descriptors of a block mapping between layouts (`nixl_kv_descs`), and run pull handoffs: the
//! prefill side offers a request's blocks under a lease and learns when it may free them
//! (`nixl_kv_offer`, `nixl_kv_prefill_poll`); the decode side learns of offers, READs them into
//! its blocks, renews or cancels, and learns when every byte landed (`nixl_kv_decode_poll`,
//! `nixl_kv_pull`, `nixl_kv_renew`, `nixl_kv_decode_cancel`). Push handoffs: the decode side
//! reserves blocks under a lease and asks the prefill group to WRITE into them
//! (`nixl_kv_reserve`, `nixl_kv_decode_cancel_reservation`); the prefill side learns of the
//! reservation (`NIXL_KV_RESERVED`), WRITEs its share (`nixl_kv_push`) and learns when its source
//! blocks are free (`NIXL_KV_FREED` with `push` set); decode learns when every byte landed
//! (`NIXL_KV_ENDED` with `push` set).
//!
//! A side takes the KV messages from its agent's notifications; other notifications stay for
//! `nixl_notif_next`, and while a side is open `nixl_notif_next` leaves KV messages to it.

use super::*;

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use nixl_kv::handoff::{DecodeEvent, DecodeSide, Freed, Offer, Outcome, PrefillSide};
use nixl_kv::{KvError, KvKind, KvLayout, Order};

// The exports, in the header's order: layouts, the prefill side, the decode side, push.
mod layout;
pub use layout::*;
mod prefill;
pub use prefill::*;
mod decode;
pub use decode::*;
mod push;

pub(crate) const PREFILL_MAGIC: u64 = 0x6e69_786c_6b76_7066; // "nixlkvpf"
pub(crate) const DECODE_MAGIC: u64 = 0x6e69_786c_6b76_6463; // "nixlkvdc"

/// Bytes of an encoded layout (`nixl_kv_layout_encode`).
pub const NIXL_KV_LAYOUT_BYTES: usize = 60;
const _: () = assert!(
    NIXL_KV_LAYOUT_BYTES == nixl_kv::LAYOUT_BYTES,
    "the layout grew"
);
/// Most blocks one handoff names.
pub const NIXL_KV_MAX_BLOCKS: usize = 100_000;
const _: () = assert!(
    NIXL_KV_MAX_BLOCKS == nixl_kv::handoff::MAX_HANDOFF_BLOCKS,
    "the handoff bound changed"
);

/// `nixl_kv_layout.kind`: separate K and V (MHA, GQA).
pub const NIXL_KV_SPLIT: u32 = 0;
/// `nixl_kv_layout.kind`: one latent per token, replicated on every rank (MLA).
pub const NIXL_KV_MLA: u32 = 1;
/// `nixl_kv_layout.order`: `[layer][kv][block][token][head][dim]`.
pub const NIXL_KV_LAYER_FIRST_NHD: u32 = 0;
/// `nixl_kv_layout.order`: `[layer][kv][block][head][token][dim]`.
pub const NIXL_KV_LAYER_FIRST_HND: u32 = 1;
/// `nixl_kv_layout.order`: `[block][layer][kv][token][head][dim]`.
pub const NIXL_KV_BLOCK_FIRST_NHD: u32 = 2;
/// `nixl_kv_layout.order`: `[block][layer][kv][head][token][dim]`.
pub const NIXL_KV_BLOCK_FIRST_HND: u32 = 3;

/// `nixl_kv_event.kind` (decode): prefill offers a request's blocks (`blocks`: its blocks).
pub const NIXL_KV_OFFERED: i32 = 1;
/// `nixl_kv_event.kind` (decode): a pull ended (`blocks`: the decode blocks; with
/// `NIXL_KV_DONE` every byte landed, otherwise nothing writes them any more).
pub const NIXL_KV_ENDED: i32 = 2;
/// `nixl_kv_event.kind` (prefill): the blocks of a handoff are the engine's to free.
pub const NIXL_KV_FREED: i32 = 3;
/// `nixl_kv_event.kind` (prefill): decode reserved blocks for a push (`blocks`: decode's
/// blocks; `id`: decode's reservation id): WRITE them with `nixl_kv_push`.
pub const NIXL_KV_RESERVED: i32 = 4;
/// `nixl_kv_event.outcome`: every byte landed.
pub const NIXL_KV_DONE: i32 = 0;
/// `nixl_kv_event.outcome`: failed (`reason` says why: peer died, lease expired, ...).
pub const NIXL_KV_FAILED: i32 = 1;
/// `nixl_kv_event.outcome`: cancelled by one side (`reason` says which and why).
pub const NIXL_KV_CANCELLED: i32 = 2;

/// One worker's KV cache (one tensor-parallel rank), one contiguous registered region at
/// `base`. Both sides exchange it (`nixl_kv_layout_encode` / `_decode`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct nixl_kv_layout {
    /// Layers.
    pub layers: u32,
    /// Blocks in this worker's cache.
    pub blocks: u32,
    /// Tokens per block.
    pub tokens_per_block: u32,
    /// KV heads of the whole model (a rank holds `total_heads / tp_size`; MLA: 1).
    pub total_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Bytes per element.
    pub dtype_bytes: u32,
    /// `NIXL_KV_SPLIT` or `NIXL_KV_MLA`.
    pub kind: u32,
    /// `NIXL_KV_LAYER_FIRST_NHD`, `_LAYER_FIRST_HND`, `_BLOCK_FIRST_NHD` or `_BLOCK_FIRST_HND`.
    pub order: u32,
    /// This worker's tensor-parallel rank.
    pub tp_rank: u32,
    /// Tensor-parallel size of its group.
    pub tp_size: u32,
    /// Address of the region (registered with the worker's agent).
    pub base: u64,
    /// Device of the region (0 for DRAM).
    pub dev_id: u64,
}

/// What a side's poll reports (see `NIXL_KV_OFFERED`, `NIXL_KV_ENDED`, `NIXL_KV_FREED`). The
/// strings are NUL-terminated; `reason` is cut to fit.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nixl_kv_event {
    /// `NIXL_KV_OFFERED`, `NIXL_KV_ENDED` or `NIXL_KV_FREED`.
    pub kind: i32,
    /// `NIXL_KV_DONE`, `NIXL_KV_FAILED` or `NIXL_KV_CANCELLED` (0 for an offer).
    pub outcome: i32,
    /// Handoff id.
    pub id: u64,
    /// The offer's lease, milliseconds (0 otherwise).
    pub lease_ms: u32,
    /// Blocks of the event, written to the caller's array.
    pub nblocks: u32,
    /// The other side's agent (the prefill agent of an offer or a pull; the decode agent of a
    /// freed handoff).
    pub peer: [c_char; 256],
    /// The engine's request id.
    pub request: [c_char; 260],
    /// Why it ended, unless `NIXL_KV_DONE`.
    pub reason: [c_char; 520],
    /// 1 when the event is about a push (`id` is decode's reservation id), 0 for a pull (`id`
    /// is prefill's offer id): the two kinds of id never mix.
    pub push: u32,
}

/// The prefill side of pull handoffs on one agent (opaque): `nixl_kv_prefill_new`,
/// `nixl_kv_prefill_free`.
#[derive(Debug)]
pub struct nixl_kv_prefill {
    _opaque: [u8; 0],
}

/// The decode side of pull handoffs on one agent (opaque): `nixl_kv_decode_new`,
/// `nixl_kv_decode_free`.
#[derive(Debug)]
pub struct nixl_kv_decode {
    _opaque: [u8; 0],
}

/// An event before it is handed to C.
#[derive(Debug)]
struct Ev {
    kind: i32,
    outcome: i32,
    id: u64,
    lease_ms: u32,
    peer: String,
    request: String,
    reason: String,
    blocks: Vec<u32>,
    push: bool,
}

fn outcome_parts(o: &Outcome) -> (i32, String) {
    match o {
        Outcome::Done => (NIXL_KV_DONE, String::new()),
        Outcome::Failed(r) => (NIXL_KV_FAILED, r.clone()),
        Outcome::Cancelled(r) => (NIXL_KV_CANCELLED, r.clone()),
    }
}

/// Copies `s` into `out` with a NUL, cut (at a character boundary) to fit.
fn put_fixed<const N: usize>(out: &mut [c_char; N], s: &str) {
    let mut n = s.len().min(N - 1);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    for (o, b) in out.iter_mut().zip(&s.as_bytes()[..n]) {
        *o = *b as c_char;
    }
    out[n] = 0;
}

impl Ev {
    fn to_c(&self) -> nixl_kv_event {
        let mut e = nixl_kv_event {
            kind: self.kind,
            outcome: self.outcome,
            id: self.id,
            lease_ms: self.lease_ms,
            nblocks: self.blocks.len() as u32,
            peer: [0; 256],
            request: [0; 260],
            reason: [0; 520],
            push: u32::from(self.push),
        };
        put_fixed(&mut e.peer, &self.peer);
        put_fixed(&mut e.request, &self.request);
        put_fixed(&mut e.reason, &self.reason);
        e
    }
}

/// Hands the oldest event of `q` to C: `NIXL_EMPTY` when none; `NIXL_ERR_BUFFER_TOO_SMALL`
/// (with `ev->nblocks` the count needed, the event kept) when `blocks` is too small.
fn hand_event(
    q: &mut VecDeque<Ev>,
    ev: *mut nixl_kv_event,
    blocks: *mut u32,
    cap: usize,
) -> Res<nixl_status> {
    if ev.is_null() || !ev.is_aligned() {
        return Err(Fail::invalid("ev is NULL or misaligned"));
    }
    if blocks.is_null() && cap > 0 {
        return Err(Fail::invalid(format!("blocks is NULL with capacity {cap}")));
    }
    if !blocks.is_null() && !blocks.is_aligned() {
        return Err(Fail::invalid("blocks is misaligned"));
    }
    let Some(front) = q.front() else {
        return Ok(NIXL_EMPTY);
    };
    let c = front.to_c();
    // SAFETY: `ev` is non-NULL and aligned (checked above); the caller passes a writable
    // `nixl_kv_event`.
    unsafe { ev.write(c) };
    let need = front.blocks.len();
    if need > cap {
        return Err(Fail::new(
            NIXL_ERR_BUFFER_TOO_SMALL,
            format!("blocks: {need} needed, capacity is {cap} (ev->nblocks says how many)"),
        ));
    }
    let e = q.pop_front().expect("present");
    if need > 0 {
        // SAFETY: `blocks` is non-NULL (need > 0 and need <= cap, NULL only with cap 0),
        // aligned, and has room for `cap >= need` u32s; `e.blocks` is ours and cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(e.blocks.as_ptr(), blocks, need) };
    }
    Ok(NIXL_OK)
}

fn kv_fail(e: KvError) -> Fail {
    let code = match &e {
        KvError::Core(c) => code_of(c),
        _ => NIXL_ERR_INVALID,
    };
    Fail::new(code, e.to_string())
}

/// `count` elements of `T` at `p`: non-NULL, aligned, 1..=`max`.
fn array_arg<'a, T>(p: *const T, count: usize, max: usize, what: &str) -> Res<&'a [T]> {
    if count == 0 || count > max {
        return Err(Fail::invalid(format!(
            "{what}: count {count} not in 1..={max}"
        )));
    }
    slice_arg(p, count, what)
}

/// `PrefillSide` and `DecodeSide` borrow their agent; the handle holds the agent (in `_agent`,
/// dropped after the side) so the borrow is as long as the handle.
fn agent_static(shared: &Arc<Shared>) -> &'static Agent {
    let p: *const Agent = Arc::as_ptr(&shared.agent);
    // SAFETY: the Agent lives in an Arc allocation that never moves; every handle that uses
    // this reference also holds an `Arc<Shared>` (holding the `Arc<Agent>`) in a field
    // declared after (so dropped after) the side that borrows it.
    unsafe { &*p }
}

struct PrefillInner {
    side: PrefillSide<'static>,
    events: VecDeque<Ev>,
    /// Push reservations already reported (they stay in the side until pushed, so that an
    /// abort of one not pushed is acknowledged there), by (decode agent, id).
    reported: HashSet<(String, u64)>,
}

struct DecodeInner {
    side: DecodeSide<'static>,
    events: VecDeque<Ev>,
    /// Offers reported and not yet pulled or cancelled, by (prefill agent, id).
    offers: HashMap<(String, u64), Offer>,
}

/// What a `nixl_kv_prefill *` (`PrefillInner`) or a `nixl_kv_decode *` (`DecodeInner`) points
/// to: the side, and the agent it borrows (declared after it, so dropped after it).
#[repr(C)]
struct SideHandle<I> {
    magic: u64,
    inner: Mutex<I>,
    agent: Arc<Shared>,
}

type PrefillHandle = SideHandle<PrefillInner>;
type DecodeHandle = SideHandle<DecodeInner>;

handle!(PrefillHandle, nixl_kv_prefill, PREFILL_MAGIC, "prefill");
handle!(DecodeHandle, nixl_kv_decode, DECODE_MAGIC, "decode");

/// The body of a side's `_new`: the side `make` makes on `agent`'s agent goes behind a new
/// handle written to `*out`, counted as a KV side open on the agent (so `nixl_notif_next`
/// leaves KV messages to it).
fn open_side<I>(
    agent: *const nixl_agent,
    out: *mut *mut <SideHandle<I> as Handle>::C,
    make: impl FnOnce(&'static Agent) -> Res<I>,
) -> nixl_status
where
    SideHandle<I>: Handle,
{
    AgentHandle::with(agent, |a| {
        out_arg(out, "out")?;
        let inner = make(agent_static(&a.shared))?;
        a.shared.kv_sides.fetch_add(1, Ordering::AcqRel);
        let h = SideHandle {
            magic: <SideHandle<I> as Handle>::MAGIC,
            inner: Mutex::new(inner),
            agent: Arc::clone(&a.shared),
        };
        publish(out, h)
    })
}

/// What an offer (pull) and a reservation (push) are given: the peer's and the request's
/// names, the blocks, and the lease; `id`, where the handoff's id goes, is checked up front.
fn handoff_args<'a>(
    (peer, peer_what): (*const c_char, &str),
    request: *const c_char,
    (blocks, n): (*const u32, usize),
    lease_ms: u32,
    id: *mut u64,
) -> Res<(&'a str, &'a str, &'a [u32], Duration)> {
    let peer = str_arg(peer, peer_what)?;
    let request = str_arg(request, "request")?;
    let blocks = array_arg(blocks, n, NIXL_KV_MAX_BLOCKS, "blocks")?;
    out_arg(id, "id")?;
    Ok((
        peer,
        request,
        blocks,
        Duration::from_millis(lease_ms.into()),
    ))
}

/// The notifications a side reads: KV messages `nixl_notif_next` set aside, then the agent's.
fn take_kv_notifs(s: &Shared) -> Vec<Notification> {
    let mut v: Vec<Notification> = s.kv_pending.lock().drain(..).collect();
    v.extend(s.agent.take_notifs());
    v
}

/// Gives notifications that were not KV messages back to `nixl_notif_next`.
fn give_back(s: &Shared, other: Vec<Notification>) {
    if !other.is_empty() {
        s.notifs.lock().extend(other);
    }
}

fn freed_ev(f: Freed) -> Ev {
    let (outcome, reason) = outcome_parts(&f.outcome);
    Ev {
        kind: NIXL_KV_FREED,
        outcome,
        id: f.id,
        lease_ms: 0,
        peer: f.peer,
        request: f.request,
        reason,
        blocks: f.blocks,
        push: f.push,
    }
}
