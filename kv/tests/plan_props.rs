//! The descriptor math against a naive per-element model: random layouts (orders, tensor
//! parallelism on both sides, MLA) and block mappings; every byte of every mapped block lands
//! at its place on the decode rank, nothing else is written, and runs are merged maximally.

use nixl_kv::*;
use proptest::prelude::*;

/// The value of byte `byte` of (layer, plane, block, global head, token): what synthetic KV holds.
fn value(layer: u32, plane: u32, block: u32, head: u32, token: u32, byte: u64) -> u8 {
    let mut x = (layer as u64) << 48
        ^ (plane as u64) << 44
        ^ (block as u64) << 28
        ^ (head as u64) << 18
        ^ (token as u64) << 8
        ^ byte;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// Global head of local head `h` of `l`.
fn global(l: &KvLayout, h: u32) -> u32 {
    match l.kind {
        KvKind::Mla => h,
        KvKind::Split => l.tp_rank * l.heads() + h,
    }
}

/// A rank's region filled with synthetic KV, every element at the place its layout says.
fn fill(l: &KvLayout) -> Vec<u8> {
    let mut buf = vec![0u8; l.region_bytes() as usize];
    for layer in 0..l.layers {
        for plane in 0..l.kv_planes() {
            for block in 0..l.blocks {
                for h in 0..l.heads() {
                    for t in 0..l.tokens_per_block {
                        let o = l.offset(layer, plane, block, h, t);
                        for b in 0..l.unit_bytes() {
                            buf[(o + b) as usize] = value(layer, plane, block, global(l, h), t, b);
                        }
                    }
                }
            }
        }
    }
    buf
}

fn layout(
    order: Order,
    kind: KvKind,
    heads: u32,
    tp: u32,
    rank: u32,
    (layers, blocks, tokens, dim, dtype): (u32, u32, u32, u32, u32),
) -> KvLayout {
    KvLayout {
        layers,
        blocks,
        tokens_per_block: tokens,
        total_heads: heads,
        head_dim: dim,
        dtype_bytes: dtype,
        kind,
        order,
        tp_rank: rank,
        tp_size: tp,
        base: 0,
        dev_id: 0,
    }
}

fn order() -> impl Strategy<Value = Order> {
    prop_oneof![
        Just(Order::LayerFirstNhd),
        Just(Order::LayerFirstHnd),
        Just(Order::BlockFirstNhd),
        Just(Order::BlockFirstHnd)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn plan_matches_the_per_element_model(
        porder in order(), dorder in order(),
        mla in any::<bool>(),
        heads_log in 0u32..4, ptp_log in 0u32..3, dtp_log in 0u32..3, drank_pick in 0u32..8,
        layers in 1u32..4, pblocks in 1u32..7, dblocks in 1u32..7, tokens in 1u32..5,
        dim in 1u32..5, dtype in 1u32..3,
        pairs in proptest::collection::vec((0u32..7, 0u32..7), 0..8),
    ) {
        let kind = if mla { KvKind::Mla } else { KvKind::Split };
        let heads = if mla { 1 } else { 1 << heads_log.max(ptp_log).max(dtp_log) };
        let (ptp, dtp) = (1 << ptp_log, 1 << dtp_log);
        let drank = drank_pick % dtp;
        let prefill: Vec<KvLayout> = (0..ptp)
            .map(|r| layout(porder, kind, heads, ptp, r, (layers, pblocks, tokens, dim, dtype)))
            .collect();
        let decode = layout(dorder, kind, heads, dtp, drank, (layers, dblocks, tokens, dim, dtype));
        // Distinct decode blocks, in range.
        let mut seen = vec![false; dblocks as usize];
        let mapping: Vec<(u32, u32)> = pairs
            .into_iter()
            .map(|(s, d)| (s % pblocks, d % dblocks))
            .filter(|&(_, d)| !std::mem::replace(&mut seen[d as usize], true))
            .collect();
        let runs = plan(&prefill, &decode, &mapping).unwrap();
        // Maximal merging: no two consecutive runs could be one.
        for w in runs.windows(2) {
            prop_assert!(!(w[0].src_rank == w[1].src_rank
                && w[0].src + w[0].len == w[1].src
                && w[0].dst + w[0].len == w[1].dst), "{:?} and {:?} not merged", w[0], w[1]);
        }
        let srcs: Vec<Vec<u8>> = prefill.iter().map(fill).collect();
        let mut dst = vec![0u8; decode.region_bytes() as usize];
        let mut written = vec![false; dst.len()];
        for r in &runs {
            let (s, d, n) = (r.src as usize, r.dst as usize, r.len as usize);
            for k in 0..n {
                prop_assert!(!written[d + k], "byte {} written twice", d + k);
                written[d + k] = true;
            }
            dst[d..d + n].copy_from_slice(&srcs[r.src_rank as usize][s..s + n]);
        }
        let mut expected_bytes = 0usize;
        for &(sb, db) in &mapping {
            for layer in 0..layers {
                for plane in 0..decode.kv_planes() {
                    for h in 0..decode.heads() {
                        for t in 0..tokens {
                            let o = decode.offset(layer, plane, db, h, t);
                            for b in 0..decode.unit_bytes() {
                                let i = (o + b) as usize;
                                prop_assert!(written[i]);
                                prop_assert_eq!(dst[i], value(layer, plane, sb, global(&decode, h), t, b),
                                    "layer {} plane {} block {}->{} head {} token {} byte {}",
                                    layer, plane, sb, db, h, t, b);
                                expected_bytes += 1;
                            }
                        }
                    }
                }
            }
        }
        prop_assert_eq!(written.iter().filter(|&&w| w).count(), expected_bytes,
            "bytes outside the mapped blocks were written");
    }

    #[test]
    fn layout_encoding_round_trips_and_garbage_is_refused(
        bytes in proptest::collection::vec(any::<u8>(), 0..80),
        order in order(), heads_log in 0u32..4, tp_log in 0u32..3,
    ) {
        // Never a panic, whatever the bytes.
        let _ = KvLayout::decode(&bytes);
        let tp = 1 << tp_log.min(heads_log);
        let l = layout(order, KvKind::Split, 1 << heads_log, tp, tp - 1, (3, 10, 16, 128, 2));
        prop_assert_eq!(KvLayout::decode(&l.encode()).unwrap(), l);
    }
}

#[test]
fn contiguous_blocks_merge_into_one_run() {
    let l = layout(
        Order::BlockFirstNhd,
        KvKind::Split,
        8,
        1,
        0,
        (4, 16, 16, 64, 2),
    );
    let runs = plan(&[l], &l, &[(3, 0), (4, 1), (5, 2)]).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].len, 3 * l.region_bytes() / 16);
    // Layer-first: one run per (layer, plane) for the same mapping.
    let l = KvLayout {
        order: Order::LayerFirstNhd,
        ..l
    };
    let runs = plan(&[l], &l, &[(3, 0), (4, 1), (5, 2)]).unwrap();
    assert_eq!(runs.len(), 4 * 2);
}

#[test]
fn unsupported_combinations_are_refused_with_the_reason() {
    let shape = (2, 8, 16, 64, 2);
    let p = layout(Order::LayerFirstNhd, KvKind::Split, 8, 1, 0, shape);
    let why = |p: &[KvLayout], d: KvLayout| plan(p, &d, &[(0, 0)]).unwrap_err().to_string();
    assert!(why(&[p], KvLayout { layers: 3, ..p }).contains("layers: prefill 2, decode 3"));
    assert!(why(&[p], KvLayout { head_dim: 128, ..p }).contains("head_dim"));
    assert!(why(
        &[p],
        KvLayout {
            dtype_bytes: 4,
            ..p
        }
    )
    .contains("dtype"));
    assert!(why(
        &[p],
        KvLayout {
            tokens_per_block: 32,
            ..p
        }
    )
    .contains("tokens per block"));
    assert!(why(
        &[p],
        KvLayout {
            total_heads: 4,
            ..p
        }
    )
    .contains("KV heads"));
    let mla = KvLayout {
        kind: KvKind::Mla,
        total_heads: 1,
        ..p
    };
    assert!(why(&[p], mla).contains("KV heads"));
    assert!(why(
        &[KvLayout {
            total_heads: 1,
            ..p
        }],
        mla
    )
    .contains("KV kind"));
    // Heads that do not split over the decode TP.
    let d = KvLayout {
        tp_size: 16,
        tp_rank: 3,
        ..p
    };
    assert!(
        why(&[p], d).contains("do not split evenly"),
        "{}",
        why(&[p], d)
    );
    // A prefill group out of order or incomplete.
    let p2 = |r| KvLayout {
        tp_size: 2,
        tp_rank: r,
        ..p
    };
    assert!(why(&[p2(1), p2(0)], p).contains("expected rank 0"));
    assert!(why(&[p2(0)], p).contains("expected rank 0 of 1"));
    // Out-of-range mapping.
    let e = plan(&[p], &p, &[(8, 0)]).unwrap_err().to_string();
    assert!(e.contains("prefill block 8 of 8"), "{e}");
    // MLA with more than one head; a rank past the group.
    assert!(KvLayout {
        kind: KvKind::Mla,
        ..p
    }
    .validate()
    .is_err());
    assert!(KvLayout { tp_rank: 1, ..p }.validate().is_err());
}
