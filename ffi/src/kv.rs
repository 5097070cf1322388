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

fn layout_from(l: &nixl_kv_layout) -> Res<KvLayout> {
    let kind = match l.kind {
        NIXL_KV_SPLIT => KvKind::Split,
        NIXL_KV_MLA => KvKind::Mla,
        k => {
            return Err(Fail::invalid(format!(
                "layout kind {k} is not NIXL_KV_SPLIT or NIXL_KV_MLA"
            )))
        }
    };
    let order = match l.order {
        NIXL_KV_LAYER_FIRST_NHD => Order::LayerFirstNhd,
        NIXL_KV_LAYER_FIRST_HND => Order::LayerFirstHnd,
        NIXL_KV_BLOCK_FIRST_NHD => Order::BlockFirstNhd,
        NIXL_KV_BLOCK_FIRST_HND => Order::BlockFirstHnd,
        o => {
            return Err(Fail::invalid(format!(
                "layout order {o} is not one of NIXL_KV_*_NHD/HND"
            )))
        }
    };
    let k = KvLayout {
        layers: l.layers,
        blocks: l.blocks,
        tokens_per_block: l.tokens_per_block,
        total_heads: l.total_heads,
        head_dim: l.head_dim,
        dtype_bytes: l.dtype_bytes,
        kind,
        order,
        tp_rank: l.tp_rank,
        tp_size: l.tp_size,
        base: l.base,
        dev_id: l.dev_id,
    };
    k.validate().map_err(kv_fail)?;
    Ok(k)
}

fn layout_to(k: &KvLayout) -> nixl_kv_layout {
    nixl_kv_layout {
        layers: k.layers,
        blocks: k.blocks,
        tokens_per_block: k.tokens_per_block,
        total_heads: k.total_heads,
        head_dim: k.head_dim,
        dtype_bytes: k.dtype_bytes,
        kind: match k.kind {
            KvKind::Split => NIXL_KV_SPLIT,
            KvKind::Mla => NIXL_KV_MLA,
        },
        order: match k.order {
            Order::LayerFirstNhd => NIXL_KV_LAYER_FIRST_NHD,
            Order::LayerFirstHnd => NIXL_KV_LAYER_FIRST_HND,
            Order::BlockFirstNhd => NIXL_KV_BLOCK_FIRST_NHD,
            Order::BlockFirstHnd => NIXL_KV_BLOCK_FIRST_HND,
        },
        tp_rank: k.tp_rank,
        tp_size: k.tp_size,
        base: k.base,
        dev_id: k.dev_id,
    }
}

/// `count` elements of `T` at `p`: non-NULL, aligned, 1..=`max`.
fn array_arg<'a, T>(p: *const T, count: usize, max: usize, what: &str) -> Res<&'a [T]> {
    if count == 0 || count > max {
        return Err(Fail::invalid(format!(
            "{what}: count {count} not in 1..={max}"
        )));
    }
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL with count {count}")));
    }
    if !p.is_aligned() {
        return Err(Fail::invalid(format!("{what} is misaligned")));
    }
    // SAFETY: non-NULL, aligned, count bounded (far below isize::MAX bytes); the caller passes
    // `count` readable elements that stay valid for the call.
    Ok(unsafe { std::slice::from_raw_parts(p, count) })
}

fn layout_arg(p: *const nixl_kv_layout, what: &str) -> Res<KvLayout> {
    let l = array_arg(p, 1, 1, what)?;
    layout_from(&l[0]).map_err(|f| Fail::new(f.code, format!("{what}: {}", f.msg)))
}

fn layouts_arg(p: *const nixl_kv_layout, n: usize, what: &str) -> Res<Vec<KvLayout>> {
    array_arg(p, n, nixl_kv::layout::limits::MAX_TP as usize, what)?
        .iter()
        .enumerate()
        .map(|(i, l)| {
            layout_from(l).map_err(|f| Fail::new(f.code, format!("{what}[{i}]: {}", f.msg)))
        })
        .collect()
}

/// Checks a layout: `NIXL_OK`, or `NIXL_ERR_INVALID` with the field at fault.
///
/// # Safety
/// `layout` is NULL or readable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_layout_validate(layout: *const nixl_kv_layout) -> nixl_status {
    guard(|| {
        layout_arg(layout, "layout")?;
        Ok(NIXL_OK)
    })
}

/// Encodes a (valid) layout into `NIXL_KV_LAYOUT_BYTES` bytes at `out` (`cap` bytes), for the
/// peer; writes the length to `*len`.
///
/// # Safety
/// `layout` is NULL or readable; `out` has `cap` writable bytes; `len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_layout_encode(
    layout: *const nixl_kv_layout,
    out: *mut u8,
    cap: usize,
    len: *mut usize,
) -> nixl_status {
    guard(|| {
        let l = layout_arg(layout, "layout")?;
        if out.is_null() {
            return Err(Fail::invalid("out is NULL"));
        }
        if len.is_null() || !len.is_aligned() {
            return Err(Fail::invalid("len is NULL or misaligned"));
        }
        let b = l.encode();
        if b.len() > cap {
            return Err(Fail::new(
                NIXL_ERR_BUFFER_TOO_SMALL,
                format!("out: {} bytes needed, capacity is {cap}", b.len()),
            ));
        }
        // SAFETY: `out` is non-NULL with `cap >= b.len()` writable bytes; `b` is ours.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out, b.len()) };
        write_out(len, b.len(), "len")?;
        Ok(NIXL_OK)
    })
}

/// Decodes a peer's encoded layout (every field checked) into `*out`.
///
/// # Safety
/// `bytes` points to `len` readable bytes; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_layout_decode(
    bytes: *const u8,
    len: usize,
    out: *mut nixl_kv_layout,
) -> nixl_status {
    guard(|| {
        let b = bytes_arg(bytes, len, "bytes")?;
        let l = KvLayout::decode(b).map_err(kv_fail)?;
        write_out(out, layout_to(&l), "out")?;
        Ok(NIXL_OK)
    })
}

/// The descriptors that move blocks `src[i]` of the prefill group (`prefill`, `nprefill`
/// layouts in rank order) into blocks `dst[i]` of `decode`, for the part read from prefill rank
/// `rank`: decode-side (`local`) and prefill-side (`remote`) lists of `*count` entries each,
/// contiguous runs merged. With fewer than `*count` places (`cap`) it returns
/// `NIXL_ERR_BUFFER_TOO_SMALL` with `*count` set. Layouts that cannot hand KV over are
/// `NIXL_ERR_INVALID` with the reason.
///
/// # Safety
/// The arrays hold the counts given; `local` and `remote` have `cap` writable entries; `count`
/// is writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_descs(
    prefill: *const nixl_kv_layout,
    nprefill: usize,
    decode: *const nixl_kv_layout,
    src: *const u32,
    dst: *const u32,
    nblocks: usize,
    rank: u32,
    local: *mut nixl_desc,
    remote: *mut nixl_desc,
    cap: usize,
    count: *mut usize,
) -> nixl_status {
    guard(|| {
        let pre = layouts_arg(prefill, nprefill, "prefill")?;
        let dec = layout_arg(decode, "decode")?;
        let src = array_arg(src, nblocks, NIXL_KV_MAX_BLOCKS, "src")?;
        let dst = array_arg(dst, nblocks, NIXL_KV_MAX_BLOCKS, "dst")?;
        if rank as usize >= pre.len() {
            return Err(Fail::invalid(format!(
                "rank {rank} of {} prefill ranks",
                pre.len()
            )));
        }
        if count.is_null() || !count.is_aligned() {
            return Err(Fail::invalid("count is NULL or misaligned"));
        }
        for (p, what) in [(local, "local"), (remote, "remote")] {
            if (p.is_null() && cap > 0) || (!p.is_null() && !p.is_aligned()) {
                return Err(Fail::invalid(format!("{what} is NULL or misaligned")));
            }
        }
        let mapping: Vec<(u32, u32)> = src.iter().copied().zip(dst.iter().copied()).collect();
        let runs = nixl_kv::plan(&pre, &dec, &mapping).map_err(kv_fail)?;
        let (l, r) = nixl_kv::descs(&runs, rank, &pre[rank as usize], &dec, MemKind::Dram)
            .map_err(kv_fail)?;
        let n = l.len();
        write_out(count, n, "count")?;
        if n > cap {
            return Err(Fail::new(
                NIXL_ERR_BUFFER_TOO_SMALL,
                format!("{n} descriptors, capacity is {cap} (*count says how many)"),
            ));
        }
        for (i, (a, b)) in l.descs().iter().zip(r.descs()).enumerate() {
            let c = |d: &Desc| nixl_desc {
                addr: d.addr,
                len: d.len,
                dev_id: d.dev_id,
            };
            // SAFETY: i < n <= cap entries, non-NULL (n > 0 here) and aligned, checked above.
            unsafe {
                local.add(i).write(c(a));
                remote.add(i).write(c(b));
            }
        }
        Ok(NIXL_OK)
    })
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

/// What a `nixl_kv_prefill *` points to.
#[repr(C)]
struct PrefillHandle {
    magic: u64,
    inner: Mutex<PrefillInner>,
    agent: Arc<Shared>,
}

struct DecodeInner {
    side: DecodeSide<'static>,
    events: VecDeque<Ev>,
    /// Offers reported and not yet pulled or cancelled, by (prefill agent, id).
    offers: HashMap<(String, u64), Offer>,
}

/// What a `nixl_kv_decode *` points to.
#[repr(C)]
struct DecodeHandle {
    magic: u64,
    inner: Mutex<DecodeInner>,
    agent: Arc<Shared>,
}

fn prefill_ref<'a>(p: *const nixl_kv_prefill) -> Res<&'a PrefillHandle> {
    tagged(p.cast(), "prefill", PREFILL_MAGIC)
}

fn decode_ref<'a>(p: *const nixl_kv_decode) -> Res<&'a DecodeHandle> {
    tagged(p.cast(), "decode", DECODE_MAGIC)
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

/// Opens the prefill side of pull handoffs on `agent` (which has loaded the decode peers'
/// metadata) and writes the handle to `*out`.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_new(
    agent: *mut nixl_agent,
    out: *mut *mut nixl_kv_prefill,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        if out.is_null() || !out.is_aligned() {
            return Err(Fail::invalid("out is NULL or misaligned"));
        }
        let shared = Arc::clone(&a.shared);
        let side = PrefillSide::new(agent_static(&shared));
        shared.kv_sides.fetch_add(1, Ordering::AcqRel);
        let p = Box::into_raw(Box::new(PrefillHandle {
            magic: PREFILL_MAGIC,
            inner: Mutex::new(PrefillInner {
                side,
                events: VecDeque::new(),
                reported: HashSet::new(),
            }),
            agent: shared,
        }));
        write_out(out, p.cast::<nixl_kv_prefill>(), "out")?;
        hand_out(p, PREFILL_MAGIC);
        Ok(NIXL_OK)
    })
}

/// Frees a prefill side. Handoffs still held are forgotten (their blocks are the engine's
/// again at once: free only when no decode reads them). NULL is a no-op.
///
/// # Safety
/// `p` is NULL or a handle from `nixl_kv_prefill_new` not yet freed; no other thread uses it
/// during or after this call.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_free(p: *mut nixl_kv_prefill) {
    guard(|| {
        if p.is_null() {
            return Ok(NIXL_OK);
        }
        take_back(p.cast(), "prefill", PREFILL_MAGIC)?;
        // SAFETY: a live handle made by `Box::into_raw` in `nixl_kv_prefill_new`, given up by
        // the caller, and now out of LIVE, so no later call touches it.
        let mut b = unsafe { Box::from_raw(p.cast::<PrefillHandle>()) };
        b.magic = DEAD_MAGIC;
        b.agent.kv_sides.fetch_sub(1, Ordering::AcqRel);
        drop(b);
        Ok(NIXL_OK)
    });
}

/// Offers `nblocks` blocks of `request` to agent `decode` under a lease of `lease_ms`; writes
/// the handoff id to `*id`. The blocks stay held until `nixl_kv_prefill_poll` reports them
/// freed (`NIXL_KV_FREED`).
///
/// # Safety
/// `decode` and `request` are NUL-terminated; `blocks` has `nblocks` entries; `id` is writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_offer(
    p: *mut nixl_kv_prefill,
    decode: *const c_char,
    request: *const c_char,
    blocks: *const u32,
    nblocks: usize,
    lease_ms: u32,
    id: *mut u64,
) -> nixl_status {
    guard(|| {
        let h = prefill_ref(p)?;
        let decode = str_arg(decode, "decode")?;
        let request = str_arg(request, "request")?;
        let blocks = array_arg(blocks, nblocks, NIXL_KV_MAX_BLOCKS, "blocks")?;
        if id.is_null() || !id.is_aligned() {
            return Err(Fail::invalid("id is NULL or misaligned"));
        }
        let lease = Duration::from_millis(lease_ms.into());
        let got = h
            .inner
            .lock()
            .side
            .offer(decode, request, blocks, lease)
            .map_err(kv_fail)?;
        write_out(id, got, "id")?;
        Ok(NIXL_OK)
    })
}

/// Aborts handoff `id`: decode is told; the blocks are reported freed once decode let go (or a
/// lease from now at the latest). An unknown id is `NIXL_ERR_NOT_FOUND`.
///
/// # Safety
/// `reason` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_cancel(
    p: *mut nixl_kv_prefill,
    id: u64,
    reason: *const c_char,
) -> nixl_status {
    guard(|| {
        let h = prefill_ref(p)?;
        let reason = if reason.is_null() {
            "cancelled"
        } else {
            str_arg(reason, "reason")?
        };
        let mut g = h.inner.lock();
        if !g.side.is_held(id) {
            return Err(Fail::new(
                NIXL_ERR_NOT_FOUND,
                format!("no handoff {id} held"),
            ));
        }
        g.side.cancel(id, reason);
        Ok(NIXL_OK)
    })
}

/// Reads decode's messages and the clock, then hands out the oldest event (`NIXL_KV_FREED`:
/// the handoff's blocks, written to `blocks`, are the engine's to free): `NIXL_OK`, or
/// `NIXL_EMPTY` when there is none. With fewer than `ev->nblocks` places (`cap`) it returns
/// `NIXL_ERR_BUFFER_TOO_SMALL` and keeps the event.
///
/// # Safety
/// `ev` is writable; `blocks` has `cap` writable entries (NULL with `cap` 0).
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_poll(
    p: *mut nixl_kv_prefill,
    ev: *mut nixl_kv_event,
    blocks: *mut u32,
    cap: usize,
) -> nixl_status {
    guard(|| {
        let h = prefill_ref(p)?;
        let mut g = h.inner.lock();
        let notifs = take_kv_notifs(&h.agent);
        let (freed, other) = g.side.poll_notifs(notifs);
        give_back(&h.agent, other);
        for f in freed {
            g.events.push_back(freed_ev(f));
        }
        let g = &mut *g;
        let open: HashSet<(String, u64)> = g
            .side
            .reservations()
            .iter()
            .map(|r| (r.from.clone(), r.id))
            .collect();
        for r in g.side.reservations() {
            if g.reported.insert((r.from.clone(), r.id)) {
                g.events.push_back(Ev {
                    kind: NIXL_KV_RESERVED,
                    outcome: 0,
                    id: r.id,
                    lease_ms: u32::try_from(r.lease.as_millis()).unwrap_or(u32::MAX),
                    peer: r.from.clone(),
                    request: r.request.clone(),
                    reason: String::new(),
                    blocks: r.blocks.clone(),
                    push: true,
                });
            }
        }
        // Forget the ones pushed or aborted since.
        g.reported.retain(|k| open.contains(k));
        hand_event(&mut g.events, ev, blocks, cap)
    })
}

/// Writes how many handoffs still hold blocks to `*count`.
///
/// # Safety
/// `count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_held(
    p: *mut nixl_kv_prefill,
    count: *mut usize,
) -> nixl_status {
    guard(|| {
        let h = prefill_ref(p)?;
        let n = h.inner.lock().side.held();
        write_out(count, n, "count")?;
        Ok(NIXL_OK)
    })
}

/// Opens the decode side of pull handoffs on `agent`, whose KV cache is `*layout` (registered
/// with the agent), and writes the handle to `*out`.
///
/// # Safety
/// `layout` is readable; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_new(
    agent: *mut nixl_agent,
    layout: *const nixl_kv_layout,
    out: *mut *mut nixl_kv_decode,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let l = layout_arg(layout, "layout")?;
        if out.is_null() || !out.is_aligned() {
            return Err(Fail::invalid("out is NULL or misaligned"));
        }
        let shared = Arc::clone(&a.shared);
        let side = DecodeSide::new(agent_static(&shared), l).map_err(kv_fail)?;
        shared.kv_sides.fetch_add(1, Ordering::AcqRel);
        let p = Box::into_raw(Box::new(DecodeHandle {
            magic: DECODE_MAGIC,
            inner: Mutex::new(DecodeInner {
                side,
                events: VecDeque::new(),
                offers: HashMap::new(),
            }),
            agent: shared,
        }));
        write_out(out, p.cast::<nixl_kv_decode>(), "out")?;
        hand_out(p, DECODE_MAGIC);
        Ok(NIXL_OK)
    })
}

/// Frees a decode side; READs still running are cancelled and let go first. NULL is a no-op.
///
/// # Safety
/// `d` is NULL or a handle from `nixl_kv_decode_new` not yet freed; no other thread uses it
/// during or after this call.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_free(d: *mut nixl_kv_decode) {
    guard(|| {
        if d.is_null() {
            return Ok(NIXL_OK);
        }
        take_back(d.cast(), "decode", DECODE_MAGIC)?;
        // SAFETY: a live handle made by `Box::into_raw` in `nixl_kv_decode_new`, given up by
        // the caller, and now out of LIVE, so no later call touches it.
        let mut b = unsafe { Box::from_raw(d.cast::<DecodeHandle>()) };
        b.magic = DEAD_MAGIC;
        b.inner
            .get_mut()
            .side
            .cancel_all("the decode side was closed");
        b.agent.kv_sides.fetch_sub(1, Ordering::AcqRel);
        drop(b);
        Ok(NIXL_OK)
    });
}

/// Accepts offers from the prefill group whose rank 0 is agent `peer`: `n` layouts in rank
/// order and the agent name of each rank. Layouts that cannot hand KV to this rank are
/// `NIXL_ERR_INVALID` with the reason.
///
/// # Safety
/// `peer` is NUL-terminated; `layouts` and `agents` have `n` entries, each agent name
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_add_prefill(
    d: *mut nixl_kv_decode,
    peer: *const c_char,
    layouts: *const nixl_kv_layout,
    agents: *const *const c_char,
    n: usize,
) -> nixl_status {
    guard(|| {
        let h = decode_ref(d)?;
        let peer = str_arg(peer, "peer")?;
        let ls = layouts_arg(layouts, n, "layouts")?;
        let names = array_arg(agents, n, ls.len(), "agents")?
            .iter()
            .enumerate()
            .map(|(i, &a)| str_arg(a, &format!("agents[{i}]")).map(str::to_owned))
            .collect::<Res<Vec<String>>>()?;
        h.inner
            .lock()
            .side
            .add_prefill(peer, ls, names)
            .map_err(kv_fail)?;
        Ok(NIXL_OK)
    })
}

/// Reads prefill's messages and the pulls' states, then hands out the oldest event:
/// `NIXL_KV_OFFERED` (pull it with `nixl_kv_pull`, or decline with `nixl_kv_decode_cancel`;
/// `blocks`: prefill's blocks) or `NIXL_KV_ENDED` (`blocks`: the decode blocks; with
/// `NIXL_KV_DONE` every byte landed, otherwise nothing writes them any more). `NIXL_EMPTY` when
/// there is none; `NIXL_ERR_BUFFER_TOO_SMALL` (event kept, `ev->nblocks` the count) when `cap`
/// is too small.
///
/// # Safety
/// `ev` is writable; `blocks` has `cap` writable entries (NULL with `cap` 0).
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_poll(
    d: *mut nixl_kv_decode,
    ev: *mut nixl_kv_event,
    blocks: *mut u32,
    cap: usize,
) -> nixl_status {
    guard(|| {
        let h = decode_ref(d)?;
        let mut g = h.inner.lock();
        let notifs = take_kv_notifs(&h.agent);
        let (evs, other) = g.side.poll_notifs(notifs);
        give_back(&h.agent, other);
        for e in evs {
            let ev = match e {
                DecodeEvent::Offered(o) => {
                    let ev = Ev {
                        kind: NIXL_KV_OFFERED,
                        outcome: 0,
                        id: o.id,
                        lease_ms: u32::try_from(o.lease.as_millis()).unwrap_or(u32::MAX),
                        peer: o.from.clone(),
                        request: o.request.clone(),
                        reason: String::new(),
                        blocks: o.blocks.clone(),
                        push: false,
                    };
                    g.offers.insert((o.from.clone(), o.id), o);
                    ev
                }
                DecodeEvent::Ended {
                    from,
                    id,
                    request,
                    blocks,
                    outcome,
                    push,
                } => ended_ev(from, id, request, blocks, &outcome, push),
            };
            g.events.push_back(ev);
        }
        hand_event(&mut g.events, ev, blocks, cap)
    })
}

fn ended_ev(
    from: String,
    id: u64,
    request: String,
    blocks: Vec<u32>,
    o: &Outcome,
    push: bool,
) -> Ev {
    let (outcome, reason) = outcome_parts(o);
    Ev {
        kind: NIXL_KV_ENDED,
        outcome,
        id,
        lease_ms: 0,
        peer: from,
        request,
        reason,
        blocks,
        push,
    }
}

/// READs offer `id` of prefill agent `from` (reported by `nixl_kv_decode_poll`) into the
/// `n` decode blocks `dst` (as many as the offer's), with a deadline inside its lease;
/// `nixl_kv_decode_poll` reports `NIXL_KV_ENDED` when it is over. An offer not reported, or
/// already pulled, is `NIXL_ERR_NOT_FOUND`.
///
/// # Safety
/// `from` is NUL-terminated; `dst` has `n` entries.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_pull(
    d: *mut nixl_kv_decode,
    from: *const c_char,
    id: u64,
    dst: *const u32,
    n: usize,
) -> nixl_status {
    guard(|| {
        let h = decode_ref(d)?;
        let from = str_arg(from, "from")?;
        let dst = array_arg(dst, n, NIXL_KV_MAX_BLOCKS, "dst")?;
        let mut g = h.inner.lock();
        let Some(offer) = g.offers.remove(&(from.to_owned(), id)) else {
            return Err(Fail::new(
                NIXL_ERR_NOT_FOUND,
                format!("no open offer {id} from '{from}'"),
            ));
        };
        g.side.pull(&offer, dst).map_err(kv_fail)?;
        Ok(NIXL_OK)
    })
}

/// Asks prefill agent `from` to extend the lease of handoff `id` by its length from now.
///
/// # Safety
/// `from` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_renew(
    d: *mut nixl_kv_decode,
    from: *const c_char,
    id: u64,
) -> nixl_status {
    guard(|| {
        let h = decode_ref(d)?;
        let from = str_arg(from, "from")?;
        h.inner.lock().side.renew(from, id).map_err(kv_fail)?;
        Ok(NIXL_OK)
    })
}

/// Aborts pull `id` of `from` (or declines its offer): the READ is cancelled and let go, then
/// prefill is told; a pull that was running is reported `NIXL_KV_ENDED` (cancelled) by the next
/// poll.
///
/// # Safety
/// `from` is NUL-terminated; `reason` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_cancel(
    d: *mut nixl_kv_decode,
    from: *const c_char,
    id: u64,
    reason: *const c_char,
) -> nixl_status {
    guard(|| {
        let h = decode_ref(d)?;
        let from = str_arg(from, "from")?;
        let reason = if reason.is_null() {
            "cancelled"
        } else {
            str_arg(reason, "reason")?
        };
        let mut g = h.inner.lock();
        g.offers.remove(&(from.to_owned(), id));
        if let Some(DecodeEvent::Ended {
            from,
            id,
            request,
            blocks,
            outcome,
            push,
        }) = g.side.cancel(from, id, reason)
        {
            let ev = ended_ev(from, id, request, blocks, &outcome, push);
            g.events.push_back(ev);
        }
        Ok(NIXL_OK)
    })
}

/// Push: accepts reservations from decode agent `decode`, whose KV cache is `*decode_layout`;
/// this worker is rank `rank` of the prefill group whose layouts are `group` (`n`, rank
/// order). Layouts that cannot hand KV over are `NIXL_ERR_INVALID` with the reason.
///
/// # Safety
/// `decode` is NUL-terminated; `decode_layout` is readable; `group` has `n` entries.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_prefill_add_decode(
    p: *mut nixl_kv_prefill,
    decode: *const c_char,
    decode_layout: *const nixl_kv_layout,
    group: *const nixl_kv_layout,
    n: usize,
    rank: u32,
) -> nixl_status {
    guard(|| {
        let h = prefill_ref(p)?;
        let decode = str_arg(decode, "decode")?;
        let dl = layout_arg(decode_layout, "decode_layout")?;
        let group = layouts_arg(group, n, "group")?;
        h.inner
            .lock()
            .side
            .add_decode(decode, dl, group, rank)
            .map_err(kv_fail)?;
        Ok(NIXL_OK)
    })
}

/// Push: WRITEs this rank's share of prefill blocks `src` (`n`, as many as reserved) into the
/// blocks of reservation `id` of decode agent `decode` (reported by `nixl_kv_prefill_poll` as
/// `NIXL_KV_RESERVED`), with a deadline inside its lease; decode learns of it after the data.
/// `nixl_kv_prefill_poll` reports `src` free (`NIXL_KV_FREED`, `push` set) once the WRITE
/// ended. A reservation not reported, or already pushed, is `NIXL_ERR_NOT_FOUND`; a failed
/// start is reported to decode, which ends the handoff.
///
/// # Safety
/// `decode` is NUL-terminated; `src` has `n` entries.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_push(
    p: *mut nixl_kv_prefill,
    decode: *const c_char,
    id: u64,
    src: *const u32,
    n: usize,
) -> nixl_status {
    guard(|| {
        let h = prefill_ref(p)?;
        let decode = str_arg(decode, "decode")?;
        let src = array_arg(src, n, NIXL_KV_MAX_BLOCKS, "src")?;
        let mut g = h.inner.lock();
        let g = &mut *g;
        if !g.reported.remove(&(decode.to_owned(), id)) {
            return Err(Fail::new(
                NIXL_ERR_NOT_FOUND,
                format!(
                    "no open reservation {id} from '{decode}' (not reported, pushed or aborted)"
                ),
            ));
        }
        match g.side.push_reserved(decode, id, src) {
            None => Err(Fail::new(
                NIXL_ERR_NOT_FOUND,
                format!("reservation {id} from '{decode}' was aborted"),
            )),
            Some(r) => {
                r.map_err(kv_fail)?;
                Ok(NIXL_OK)
            }
        }
    })
}

/// Push: reserves the `n` decode blocks `blocks` for `request` and asks the prefill group of
/// `prefill` (added with `nixl_kv_decode_add_prefill`) to WRITE into them within `lease_ms`;
/// writes the reservation id to `*id`. `nixl_kv_decode_poll` reports `NIXL_KV_ENDED` (`push`
/// set) once every writing rank's data landed, or why not; the blocks are never reported
/// while a WRITE may still land in them.
///
/// # Safety
/// `prefill` and `request` are NUL-terminated; `blocks` has `n` entries; `id` is writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_reserve(
    d: *mut nixl_kv_decode,
    prefill: *const c_char,
    request: *const c_char,
    blocks: *const u32,
    n: usize,
    lease_ms: u32,
    id: *mut u64,
) -> nixl_status {
    guard(|| {
        let h = decode_ref(d)?;
        let prefill = str_arg(prefill, "prefill")?;
        let request = str_arg(request, "request")?;
        let blocks = array_arg(blocks, n, NIXL_KV_MAX_BLOCKS, "blocks")?;
        if id.is_null() || !id.is_aligned() {
            return Err(Fail::invalid("id is NULL or misaligned"));
        }
        let lease = Duration::from_millis(lease_ms.into());
        let got = h
            .inner
            .lock()
            .side
            .reserve(prefill, request, blocks, lease)
            .map_err(kv_fail)?;
        write_out(id, got, "id")?;
        Ok(NIXL_OK)
    })
}

/// Push: aborts reservation `id`: the writers are told; `nixl_kv_decode_poll` reports it ended
/// (cancelled) once they let go, or a lease from now at the latest.
///
/// # Safety
/// `reason` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_kv_decode_cancel_reservation(
    d: *mut nixl_kv_decode,
    id: u64,
    reason: *const c_char,
) -> nixl_status {
    guard(|| {
        let h = decode_ref(d)?;
        let reason = if reason.is_null() {
            "cancelled"
        } else {
            str_arg(reason, "reason")?
        };
        h.inner.lock().side.cancel_reservation(id, reason);
        Ok(NIXL_OK)
    })
}
