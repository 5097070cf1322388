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
//! Messages travel as nixl notifications, versioned and bounded ([`Msg::decode`] checks every
//! field of a peer's message), all of them posted ([`nixl_core::Agent::post_notif`]): no call
//! of a side waits on the peer (over `tcp` not even to connect), so an engine's poll loop
//! never blocks on a slow or dead peer; a message that never arrives ends its handoff through
//! the lease (`Failed(lease expired)`, within two leases; three at most by default if decode
//! keeps this agent's listener busy meanwhile, see below). The sides:
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
//! reading any more: at once on decode's abort (sent after its READ let go; a `tcp`
//! notification reaches this agent only after every transfer decode had posted before it
//! ended, on every connection, so no READ of the blocks is carried out any more, however busy
//! decode keeps its connections), or, without a word from decode, a grace period (one more
//! lease) after the lease ran out, since decode's READ deadline ends within the lease, and
//! then only once this agent's own listeners serve that peer nothing any more
//! ([`Agent::peer_idle`](nixl_core::Agent::peer_idle)): a `tcp` READ that decode gave up on may
//! still be carried out by the listener from the blocks. If the listeners still serve decode
//! `fence_after` later ([`PrefillSide::set_fence_after`], by default one more lease), prefill
//! fences decode ([`Agent::fence_peer`](nixl_core::Agent::fence_peer)): decode's connections to
//! this agent's listener are shut down and their threads end, so nothing decode asked before
//! reads the blocks any more, and they are freed with the reason and `; decode fenced`
//! (`Failed("lease expired; decode fenced")`). So every pull handoff is freed within a fixed
//! bound whatever decode does, silent or keeping every connection busy: lease + grace (one
//! lease) + `fence_after` after its last renewal, three leases by default (after prefill's
//! [`PrefillSide::cancel`]: one lease + `fence_after`), plus the time between two polls and
//! the fence's own wait (a shut socket fails its thread's reads and writes at once, so
//! milliseconds; a poll waits at most 100 ms for it and fences again at the next one). The
//! price, paid only by a decode silent for a lease past its lease, which is broken or hostile:
//! its other READs from this agent in flight at the fence fail with a remote disconnect (and
//! messages it had queued on those connections may be lost); its next request connects again
//! and is served as usual, so a READ it asks after the fence of blocks it lost with its lease
//! gets whatever the engine put there since.
//! Replies that nobody waits for (aborts, acknowledgements, renewals) are posted
//! ([`Agent::post_notif`](nixl_core::Agent::post_notif)): over `tcp` an acknowledgement would otherwise wait behind the DATA
//! the peer still has queued to this side.
//! Limitation: a pull from a prefill group of several ranks holds the lease on the offering
//! agent (rank 0) only; the other ranks' blocks must be kept by the engine until rank 0's
//! `Freed`. Push has no such gap (each writing rank tracks its own WRITE).
//!
//! The agent's notifications are taken by the side (it owns the agent's notification queue);
//! notifications that are not KV messages are returned by `poll` in `other`.

use std::time::Duration;

use nixl_core::XferStatus;

use crate::{KvError, Result};

mod decode;
mod msg;
mod prefill;

pub use decode::{DecodeEvent, DecodeSide, Offer};
pub use msg::Msg;
pub use prefill::{PrefillSide, Reservation};

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
