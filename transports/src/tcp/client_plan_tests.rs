//! Tests of the chunking of a post's plan (a child of `client_plan`).

use std::sync::Arc;

use super::*;
use nixl_core::{Desc, MemKind, Segment};

fn xplan(segs: &[(u64, u64)]) -> XferPlan {
    XferPlan {
        op: XferOp::Write,
        local_kind: MemKind::Dram,
        remote_kind: MemKind::Dram,
        segments: segs
            .iter()
            .map(|&(addr, len)| Segment {
                local: Desc::new(addr, len, 0),
                remote: Desc::new(addr + (1 << 40), len, 0),
                local_region: 0,
                remote_region: 0,
            })
            .collect(),
        local_regions: Vec::new(),
        remote_regions: vec![nixl_core::metadata::RegionInfo {
            kind: MemKind::Dram,
            desc: Desc::new(1 << 40, 1 << 40, 0),
            key: 77,
            backends: Vec::new(),
        }],
        notif: None,
        initiator: Arc::from("me"),
    }
}

#[test]
fn large_segments_are_cut_and_small_ones_batched() {
    let p = make_plan(&xplan(&[(0, 10_000), (20_000, 100), (30_000, 100)]), 4096);
    let Body::Pieces { local, remote } = &p.body else {
        panic!("segments make pieces")
    };
    let bytes: Vec<u64> = p.chunks.iter().map(|c| c.bytes).collect();
    assert_eq!(bytes, vec![4096, 4096, 2008]);
    assert_eq!(local.iter().map(|s| s.len).sum::<u64>(), 10_200);
    for (l, r) in local.iter().zip(remote) {
        assert_eq!(l.len, r.len);
        assert_eq!(l.addr + (1 << 40), r.addr);
        assert_eq!(r.key, 77);
    }
    // Every chunk's pieces add up to its bytes, and chunks tile the pieces.
    let mut next = 0;
    for c in &p.chunks {
        assert_eq!(c.start, next);
        let sum: u64 = local[c.start as usize..c.end as usize]
            .iter()
            .map(|s| s.len)
            .sum();
        assert_eq!(sum, c.bytes);
        next = c.end;
    }
    assert_eq!(next as usize, local.len());
}

fn run(local: u64, len: u64) -> Run {
    Run {
        local,
        remote: local + (1 << 40),
        len,
    }
}

#[test]
fn runs_are_chunked_at_run_boundaries_and_long_ones_cut() {
    // 4 KiB blocks fill 512 KiB chunks exactly, in place.
    let runs: Vec<Run> = (0..300).map(|i| run(i * 8192, 4096)).collect();
    let ptr = runs.as_ptr();
    let (out, chunks) = cut_runs(runs, 512 << 10);
    assert_eq!(out.as_ptr(), ptr, "no new list when nothing is cut");
    let n: Vec<u32> = chunks.iter().map(|c| c.end - c.start).collect();
    assert_eq!(n, vec![128, 128, 44]);
    // A long run is cut, empty ones dropped, and a chunk never goes over its bytes.
    let (out, chunks) = cut_runs(vec![run(0, 3000), run(10_000, 0), run(20_000, 9000)], 4096);
    assert_eq!(
        out,
        vec![
            run(0, 3000),
            run(20_000, 4096),
            run(24_096, 4096),
            run(28_192, 808)
        ]
    );
    let bytes: Vec<u64> = chunks.iter().map(|c| c.bytes).collect();
    assert_eq!(bytes, vec![3000, 4096, 4096, 808]);
    // Many tiny runs: at most MAX_SPANS per chunk.
    let runs: Vec<Run> = (0..40_000).map(|i| run(i * 16, 8)).collect();
    let (_, chunks) = cut_runs(runs, 64 << 20);
    let n: Vec<u32> = chunks.iter().map(|c| c.end - c.start).collect();
    assert_eq!(n, vec![16384, 16384, 7232]);
}

#[test]
fn many_small_descriptors_fill_frames_up_to_the_piece_limit() {
    let segs: Vec<(u64, u64)> = (0..2500).map(|i| (i * 64, 8)).collect();
    let p = make_plan(&xplan(&segs), 1 << 20);
    let pieces: Vec<u32> = p.chunks.iter().map(|c| c.end - c.start).collect();
    assert_eq!(pieces, vec![1000, 1000, 500]);
}
