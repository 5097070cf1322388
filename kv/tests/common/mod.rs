//! Synthetic KV workers for the tests: an agent over the `local` backend with its cache
//! registered, every element holding a value known from its place.
#![allow(dead_code)]

use std::sync::Arc;

use nixl_core::{Agent, Desc, DescList, MemKind, Registration};
use nixl_kv::*;
use nixl_transports::local::LocalBackend;

/// A small layout of rank `rank` of `tp`: 3 layers of `blocks` blocks of 4 tokens, 4 KV heads
/// of 8 two-byte elements (`mla`: one latent head, replicated on every rank); base 0.
pub fn small_layout(rank: u32, tp: u32, blocks: u32, order: Order, mla: bool) -> KvLayout {
    KvLayout {
        layers: 3,
        blocks,
        tokens_per_block: 4,
        total_heads: if mla { 1 } else { 4 },
        head_dim: 8,
        dtype_bytes: 2,
        kind: if mla { KvKind::Mla } else { KvKind::Split },
        order,
        tp_rank: rank,
        tp_size: tp,
        base: 0,
        dev_id: 0,
    }
}

pub fn value(layer: u32, plane: u32, block: u32, head: u32, token: u32, byte: u64) -> u8 {
    let x = ((layer as u64) << 40
        ^ (plane as u64) << 36
        ^ (block as u64) << 24
        ^ (head as u64) << 16
        ^ (token as u64) << 8
        ^ byte)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

pub struct Worker {
    // Dropped first: deregistration before the buffer goes.
    _reg: Registration,
    pub agent: Agent,
    pub layout: KvLayout,
    pub buf: Vec<u8>,
}

pub fn worker(name: &str, layout: KvLayout, fill: bool) -> Worker {
    let agent = Agent::builder(name)
        .backend(Arc::new(LocalBackend::new()))
        .build()
        .unwrap();
    worker_on(agent, layout, fill)
}

/// A synthetic KV worker on `agent` (any backends).
pub fn worker_on(agent: Agent, mut layout: KvLayout, fill: bool) -> Worker {
    let mut buf = vec![0u8; layout.region_bytes() as usize];
    layout.base = buf.as_ptr() as u64;
    if fill {
        let l = layout;
        for block in 0..l.blocks {
            each(&l, block, |i, v| buf[i] = v(block));
        }
    }
    // SAFETY: `buf` lives in the `Worker` beside the registration, which is dropped first; the
    // test reads it only after the transfers that write it have completed.
    let reg = unsafe {
        agent.register(
            &DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(&mut buf)]).unwrap(),
        )
    }
    .unwrap();
    Worker {
        _reg: reg,
        agent,
        layout,
        buf,
    }
}

/// Calls `f(byte index, value of that byte given the source block)` for every byte of
/// `block` of `l`.
pub fn each(l: &KvLayout, block: u32, mut f: impl FnMut(usize, &dyn Fn(u32) -> u8)) {
    for layer in 0..l.layers {
        for plane in 0..l.kv_planes() {
            for h in 0..l.heads() {
                let g = match l.kind {
                    KvKind::Mla => 0,
                    KvKind::Split => l.tp_rank * l.heads() + h,
                };
                for t in 0..l.tokens_per_block {
                    let o = l.offset(layer, plane, block, h, t);
                    for b in 0..l.unit_bytes() {
                        f((o + b) as usize, &|src| value(layer, plane, src, g, t, b));
                    }
                }
            }
        }
    }
}

/// Checks that decode blocks `mapping[i].1` of `w` hold prefill blocks `mapping[i].0`.
pub fn check(w: &Worker, mapping: &[(u32, u32)]) {
    for &(sb, db) in mapping {
        each(&w.layout, db, |i, v| {
            assert_eq!(w.buf[i], v(sb), "byte {i} of decode block {db} (from {sb})")
        });
    }
}
