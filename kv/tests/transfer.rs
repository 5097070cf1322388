//! The descriptor math with real bytes: decode agents READ synthetic KV from prefill agents
//! over the `local` backend (TP 1→2, 2→1, 4→2, MLA) and every byte of the mapped blocks is
//! checked at its place.

use std::sync::Arc;

use nixl_core::{Agent, Desc, DescList, MemKind, Registration, XferOp, XferOptions};
use nixl_kv::*;
use nixl_transports::local::LocalBackend;

fn value(layer: u32, plane: u32, block: u32, head: u32, token: u32, byte: u64) -> u8 {
    let x = ((layer as u64) << 40
        ^ (plane as u64) << 36
        ^ (block as u64) << 24
        ^ (head as u64) << 16
        ^ (token as u64) << 8
        ^ byte)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

struct Worker {
    // Dropped first: deregistration before the buffer goes.
    _reg: Registration,
    agent: Agent,
    layout: KvLayout,
    buf: Vec<u8>,
}

fn worker(name: &str, mut layout: KvLayout, fill: bool) -> Worker {
    let agent = Agent::builder(name)
        .backend(Arc::new(LocalBackend::new()))
        .build()
        .unwrap();
    let mut buf = vec![0u8; layout.region_bytes() as usize];
    layout.base = buf.as_ptr() as u64;
    if fill {
        for layer in 0..layout.layers {
            for plane in 0..layout.kv_planes() {
                for block in 0..layout.blocks {
                    for h in 0..layout.heads() {
                        let g = match layout.kind {
                            KvKind::Mla => 0,
                            KvKind::Split => layout.tp_rank * layout.heads() + h,
                        };
                        for t in 0..layout.tokens_per_block {
                            let o = layout.offset(layer, plane, block, h, t);
                            for b in 0..layout.unit_bytes() {
                                buf[(o + b) as usize] = value(layer, plane, block, g, t, b);
                            }
                        }
                    }
                }
            }
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

fn handoff(ptp: u32, dtp: u32, mla: bool, order_p: Order, order_d: Order) {
    let shape = |rank, tp, order| KvLayout {
        layers: 3,
        blocks: 12,
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
    };
    let prefill: Vec<Worker> = (0..ptp)
        .map(|r| worker(&format!("prefill-{r}"), shape(r, ptp, order_p), true))
        .collect();
    let layouts: Vec<KvLayout> = prefill.iter().map(|w| w.layout).collect();
    let mapping = [(5, 0), (6, 1), (7, 2), (1, 9)];
    for d in 0..dtp {
        let dec = worker(&format!("decode-{d}"), shape(d, dtp, order_d), false);
        for p in &prefill {
            dec.agent.load_remote(&p.agent.metadata_bytes()).unwrap();
        }
        let runs = plan(&layouts, &dec.layout, &mapping).unwrap();
        for r in 0..ptp {
            let (local, remote) =
                descs(&runs, r, &layouts[r as usize], &dec.layout, MemKind::Dram).unwrap();
            if local.is_empty() {
                continue;
            }
            dec.agent
                .create_xfer(
                    XferOp::Read,
                    &local,
                    &remote,
                    &format!("prefill-{r}"),
                    XferOptions::default(),
                )
                .unwrap()
                .run_blocking()
                .unwrap();
        }
        let l = dec.layout;
        for &(sb, db) in &mapping {
            for layer in 0..l.layers {
                for plane in 0..l.kv_planes() {
                    for h in 0..l.heads() {
                        let g = if mla { 0 } else { d * l.heads() + h };
                        for t in 0..l.tokens_per_block {
                            let o = l.offset(layer, plane, db, h, t);
                            for b in 0..l.unit_bytes() {
                                assert_eq!(
                                    dec.buf[(o + b) as usize],
                                    value(layer, plane, sb, g, t, b),
                                    "TP {ptp}->{dtp} decode rank {d}: layer {layer} plane {plane} block {sb}->{db} head {h} token {t}"
                                );
                            }
                        }
                    }
                }
            }
        }
        // Unmapped decode blocks stay untouched.
        for layer in 0..l.layers {
            let o = l.offset(layer, 0, 4, 0, 0) as usize;
            assert!(dec.buf[o..o + l.unit_bytes() as usize]
                .iter()
                .all(|&x| x == 0));
        }
    }
}

#[test]
fn tp_1_to_2() {
    handoff(1, 2, false, Order::LayerFirstNhd, Order::BlockFirstHnd);
}

#[test]
fn tp_2_to_1() {
    handoff(2, 1, false, Order::BlockFirstNhd, Order::LayerFirstHnd);
}

#[test]
fn tp_4_to_2() {
    handoff(4, 2, false, Order::LayerFirstHnd, Order::LayerFirstNhd);
}

#[test]
fn mla_2_to_4() {
    handoff(2, 4, true, Order::BlockFirstNhd, Order::BlockFirstNhd);
}
