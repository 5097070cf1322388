//! nixl-kv: KV-cache handoff for disaggregated serving, on the public nixl-core agent API.
//!
//! - [`KvLayout`]: the versioned, bounded description of one worker's KV cache (shape, order,
//!   tensor-parallel place, region) that both sides exchange.
//! - [`plan()`]: from the prefill group's layouts, a decode rank's layout and a block mapping,
//!   the byte runs to move (heterogeneous tensor parallelism and MLA included), contiguous runs
//!   merged; unsupported combinations refused with the reason.
//! - [`descs`]: the runs as descriptor lists for [`nixl_core::Agent::create_xfer`].
//! - [`events`]: KV events (stored/removed/cleared, monotonic ids, "since N", "all blocks")
//!   and the chained xxh3-64 block hashes of Dynamo's router.
//! - [`handoff`]: the pull handoff between a prefill and a decode agent, with a lease and one
//!   terminal outcome on both sides.
//!
//! ```
//! use nixl_kv::{plan, KvKind, KvLayout, Order};
//! let l = |rank, tp| KvLayout {
//!     layers: 2, blocks: 4, tokens_per_block: 16, total_heads: 4, head_dim: 64, dtype_bytes: 2,
//!     kind: KvKind::Split, order: Order::BlockFirstNhd, tp_rank: rank, tp_size: tp,
//!     base: 0, dev_id: 0,
//! };
//! // Prefill TP 1, decode TP 1, block-first: a block is one contiguous run.
//! let runs = plan(&[l(0, 1)], &l(0, 1), &[(2, 0), (3, 1)]).unwrap();
//! assert_eq!(runs.len(), 1); // blocks 2,3 -> 0,1: adjacent on both sides, merged
//! // Decode TP 2 reads its half of the heads from prefill TP 1.
//! let runs = plan(&[l(0, 1)], &l(1, 2), &[(2, 0)]).unwrap();
//! assert!(runs.iter().all(|r| r.src_rank == 0));
//! ```

pub mod events;
pub mod handoff;
pub mod layout;
pub mod plan;

pub use layout::{KvKind, KvLayout, Order, LAYOUT_BYTES, LAYOUT_VERSION};
pub use plan::{check_compatible, plan, Run, MAX_RUNS};

use nixl_core::{Desc, DescList, MemKind};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// A layout is malformed or out of bounds.
    #[error("KV layout: {0}")]
    Layout(String),
    /// Two layouts cannot hand KV to each other (the reason says which field).
    #[error("incompatible KV layouts: {0}")]
    Incompatible(String),
    /// The block mapping is out of range or too large.
    #[error("KV block mapping: {0}")]
    Mapping(String),
    /// A handoff message is malformed, out of bounds, or names no open handoff.
    #[error("KV handoff: {0}")]
    Protocol(String),
    /// The transfer core refused or failed.
    #[error(transparent)]
    Core(#[from] nixl_core::Error),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, KvError>;

/// The runs read from prefill rank `rank`, as (decode-side local list, prefill-side remote
/// list) for a READ by the decode agent from that rank's agent (or, swapped, a WRITE by the
/// prefill agent).
pub fn descs(
    runs: &[Run],
    rank: u32,
    prefill: &KvLayout,
    decode: &KvLayout,
    kind: MemKind,
) -> Result<(DescList, DescList)> {
    let mut l = Vec::new();
    let mut r = Vec::new();
    for run in runs.iter().filter(|x| x.src_rank == rank) {
        l.push(Desc::new(decode.base + run.dst, run.len, decode.dev_id));
        r.push(Desc::new(prefill.base + run.src, run.len, prefill.dev_id));
    }
    Ok((
        DescList::from_descs(kind, l)?,
        DescList::from_descs(kind, r)?,
    ))
}
