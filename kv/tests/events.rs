//! KV events: a consumer that follows the log, misses events, and recovers from a gap by the
//! snapshot ends with exactly the worker's blocks; the hashes match the reference scheme.

use nixl_kv::events::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

#[test]
fn hashes_follow_the_chained_xxh3_scheme() {
    // Independent of our helper: xxh3-64, seed 1337, over u32 LE token bytes.
    let t = [1u32, 2, 3, 4];
    let bytes: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(
        block_hash(&t),
        xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, 1337)
    );
    let h = seq_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
    assert_eq!(h.len(), 2, "the partial block has no hash");
    let mut pair = h[0].to_le_bytes().to_vec();
    pair.extend(block_hash(&[5, 6, 7, 8]).to_le_bytes());
    assert_eq!(h[1], xxhash_rust::xxh3::xxh3_64_with_seed(&pair, 1337));
    // Same block after a different prefix: a different sequence hash.
    let other = seq_hashes(&[9, 9, 9, 9, 5, 6, 7, 8], 4);
    assert_ne!(other[1], h[1]);
}

#[test]
fn since_reports_a_gap_past_the_window() {
    let mut log = KvEventLog::new(2);
    assert_eq!(log.since(0).unwrap(), vec![]);
    let b = |hash| StoredBlock { hash, parent: None };
    log.stored(vec![b(1)], 16);
    log.stored(vec![b(2)], 16);
    log.removed(vec![1]);
    assert_eq!(log.last_id(), 3);
    assert_eq!(log.since(0), Err(Gap { oldest: 2 }));
    assert_eq!(log.since(1).unwrap().len(), 2);
    assert_eq!(log.since(3).unwrap(), vec![]);
    assert_eq!(log.all_blocks(), (3, vec![b(2)]));
}

proptest! {
    #[test]
    fn a_consumer_with_gaps_converges(
        ops in proptest::collection::vec((0u8..3, 0u64..20), 1..60),
        cap in 1usize..8,
        every in 1usize..5,
    ) {
        let mut log = KvEventLog::new(cap);
        let mut seen = 0u64;
        let mut mirror: BTreeSet<u64> = BTreeSet::new();
        for (i, (op, h)) in ops.into_iter().enumerate() {
            match op {
                0 => { log.stored(vec![StoredBlock { hash: h, parent: None }], 16); }
                1 => { log.removed(vec![h]); }
                _ => { if h % 7 == 0 { log.cleared(); } }
            }
            // The consumer polls only now and then.
            if i % every == 0 {
                match log.since(seen) {
                    Ok(evs) => {
                        for e in evs {
                            prop_assert_eq!(e.id, seen + 1, "ids are consecutive");
                            seen = e.id;
                            match e.kind {
                                KvEventKind::Stored { blocks, .. } => mirror.extend(blocks.iter().map(|b| b.hash)),
                                KvEventKind::Removed { hashes } => for h in hashes { mirror.remove(&h); },
                                KvEventKind::Cleared => mirror.clear(),
                            }
                        }
                    }
                    Err(_) => {
                        let (id, all) = log.all_blocks();
                        seen = id;
                        mirror = all.iter().map(|b| b.hash).collect();
                    }
                }
                let truth: BTreeSet<u64> = log.all_blocks().1.iter().map(|b| b.hash).collect();
                prop_assert_eq!(&mirror, &truth);
            }
        }
    }
}
