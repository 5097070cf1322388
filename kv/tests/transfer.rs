//! The descriptor math with real bytes: decode agents READ synthetic KV from prefill agents
//! over the `local` backend (TP 1→2, 2→1, 4→2, MLA) and every byte of the mapped blocks is
//! checked at its place.

mod common;
use common::{check, small_layout, worker, Worker};

use nixl_core::{MemKind, XferOp, XferOptions};
use nixl_kv::*;

fn handoff(ptp: u32, dtp: u32, mla: bool, order_p: Order, order_d: Order) {
    let shape = |rank, tp, order| small_layout(rank, tp, 12, order, mla);
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
        check(&dec, &mapping);
        let l = dec.layout;
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
