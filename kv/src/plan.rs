//! The descriptor math: from the prefill side's layouts (one per tensor-parallel rank), one
//! decode rank's layout, and a block mapping, the byte runs to move, contiguous runs merged.
//!
//! Heterogeneous tensor parallelism: a decode rank holds global heads
//! `[r·H/Td, (r+1)·H/Td)`. With Td > Tp it reads its slice of each block from the one prefill
//! rank that holds it; with Td < Tp it gathers from the Tp/Td prefill ranks that hold its
//! heads. MLA is replicated: decode rank `r` reads the whole latent from prefill rank
//! `r mod Tp`.

use crate::layout::{KvKind, KvLayout};
use crate::{KvError, Result};

/// Most runs one plan may hold (a request of this many descriptors at worst).
pub const MAX_RUNS: usize = 1 << 24;

/// One contiguous byte run: from `src` bytes past prefill rank `src_rank`'s base to `dst`
/// bytes past the decode rank's base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The prefill rank that holds the bytes.
    pub src_rank: u32,
    /// Offset in that rank's region.
    pub src: u64,
    /// Offset in the decode rank's region.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// Checks that `prefill` (every rank of the prefill group, in rank order) and `decode` agree,
/// or says why not.
pub fn check_compatible(prefill: &[KvLayout], decode: &KvLayout) -> Result<()> {
    let Some(p0) = prefill.first() else {
        return Err(KvError::Incompatible("no prefill layout".into()));
    };
    decode.validate()?;
    for (i, p) in prefill.iter().enumerate() {
        p.validate()?;
        if p.tp_rank as usize != i || p.tp_size as usize != prefill.len() {
            return Err(KvError::Incompatible(format!(
                "prefill layout {i} is rank {} of {}: expected rank {i} of {}",
                p.tp_rank,
                p.tp_size,
                prefill.len()
            )));
        }
        let same = (
            p.layers,
            p.tokens_per_block,
            p.total_heads,
            p.head_dim,
            p.dtype_bytes,
            p.kind,
        ) == (
            p0.layers,
            p0.tokens_per_block,
            p0.total_heads,
            p0.head_dim,
            p0.dtype_bytes,
            p0.kind,
        );
        if !same {
            return Err(KvError::Incompatible(format!(
                "prefill ranks 0 and {i} have different shapes"
            )));
        }
    }
    let mismatch = |what: &str, a: u64, b: u64| {
        Err(KvError::Incompatible(format!(
            "{what}: prefill {a}, decode {b}"
        )))
    };
    if p0.layers != decode.layers {
        return mismatch("layers", p0.layers.into(), decode.layers.into());
    }
    if p0.total_heads != decode.total_heads {
        return mismatch("KV heads", p0.total_heads.into(), decode.total_heads.into());
    }
    if p0.head_dim != decode.head_dim {
        return mismatch("head_dim", p0.head_dim.into(), decode.head_dim.into());
    }
    if p0.dtype_bytes != decode.dtype_bytes {
        return mismatch(
            "dtype bytes",
            p0.dtype_bytes.into(),
            decode.dtype_bytes.into(),
        );
    }
    if p0.tokens_per_block != decode.tokens_per_block {
        return Err(KvError::Incompatible(format!(
            "tokens per block: prefill {}, decode {} (different block sizes are not supported \
             yet: map blocks of one size)",
            p0.tokens_per_block, decode.tokens_per_block
        )));
    }
    if p0.kind != decode.kind {
        return Err(KvError::Incompatible(format!(
            "KV kind: prefill {:?}, decode {:?}",
            p0.kind, decode.kind
        )));
    }
    Ok(())
}

/// The runs that bring blocks `mapping[i].0` of the prefill group into blocks `mapping[i].1`
/// of the decode rank `decode`, contiguous runs merged; ordered by (prefill rank, decode
/// offset).
pub fn plan(prefill: &[KvLayout], decode: &KvLayout, mapping: &[(u32, u32)]) -> Result<Vec<Run>> {
    check_compatible(prefill, decode)?;
    let p0 = &prefill[0];
    for (i, &(s, d)) in mapping.iter().enumerate() {
        if s >= p0.blocks || d >= decode.blocks {
            return Err(KvError::Mapping(format!(
                "pair {i}: prefill block {s} of {}, decode block {d} of {}",
                p0.blocks, decode.blocks
            )));
        }
    }
    // (prefill rank, first global head, heads) that make up this decode rank's heads.
    let sources: Vec<(u32, u32, u32)> = match decode.kind {
        KvKind::Mla => vec![(decode.tp_rank % p0.tp_size, 0, 1)],
        KvKind::Split => {
            let (hp, hd) = (p0.heads(), decode.heads());
            let g0 = decode.tp_rank * hd;
            let mut v = Vec::new();
            let mut g = g0;
            while g < g0 + hd {
                let rank = g / hp;
                let end = ((rank + 1) * hp).min(g0 + hd);
                v.push((rank, g, end - g));
                g = end;
            }
            v
        }
    };
    let unit = decode.unit_bytes();
    let mut runs: Vec<Run> = Vec::new();
    let push = |runs: &mut Vec<Run>, r: Run| -> Result<()> {
        if let Some(last) = runs.last_mut() {
            if last.src_rank == r.src_rank
                && last.src + last.len == r.src
                && last.dst + last.len == r.dst
            {
                last.len += r.len;
                return Ok(());
            }
        }
        if runs.len() >= MAX_RUNS {
            return Err(KvError::Mapping(format!(
                "over {MAX_RUNS} runs: hand the blocks over in several handoffs"
            )));
        }
        runs.push(r);
        Ok(())
    };
    for &(sb, db) in mapping {
        for &(rank, g, n) in &sources {
            let src = &prefill[rank as usize];
            // Local head indices on each side.
            let (sh, dh) = match decode.kind {
                KvKind::Mla => (0, 0),
                KvKind::Split => (g - rank * src.heads(), g - decode.tp_rank * decode.heads()),
            };
            for layer in 0..decode.layers {
                for plane in 0..decode.kv_planes() {
                    for t in 0..decode.tokens_per_block {
                        for h in 0..n {
                            push(
                                &mut runs,
                                Run {
                                    src_rank: rank,
                                    src: src.offset(layer, plane, sb, sh + h, t),
                                    dst: decode.offset(layer, plane, db, dh + h, t),
                                    len: unit,
                                },
                            )?;
                        }
                    }
                }
            }
        }
    }
    // Runs of different pairs may continue each other (layer-first orders, consecutive
    // blocks): order by destination and merge again. The order of a request's runs does not
    // matter; each destination byte is written once.
    runs.sort_unstable_by_key(|r| (r.src_rank, r.dst));
    let mut merged: Vec<Run> = Vec::with_capacity(runs.len());
    for r in runs {
        push(&mut merged, r)?;
    }
    Ok(merged)
}
