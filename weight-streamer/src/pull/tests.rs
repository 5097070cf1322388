use super::*;
use crate::manifest::FileEntry;

fn claiming(size: u64) -> Manifest {
    Manifest {
        name: "liar".into(),
        chunk_size: crate::manifest::DEFAULT_CHUNK,
        files: vec![FileEntry {
            name: "model.safetensors".into(),
            size,
            header_bytes: 0,
            chunk_sums: Vec::new(),
        }],
        tensors: Vec::new(),
    }
}

fn view(holders: Vec<u16>, me: u64) -> View {
    View {
        owner: vec![me; holders.len()],
        holders,
        me,
    }
}

#[test]
fn the_picker_takes_the_rarest_chunk_and_leaves_to_an_origin_only_what_nobody_has() {
    // Chunks 0..6; holders per chunk among the serving replicas (held or being fetched).
    let holders = vec![3, 1, 0, 2, 1, 0];
    for me in 0..64 {
        let v = view(holders.clone(), me);
        // From a replica: the rarest chunk it holds, whatever the tie-break order.
        assert_eq!(rarest([0, 1, 3], &v, From::Replica), Some(1));
        assert_eq!(rarest([0, 3], &v, From::Replica), Some(3));
        let c = rarest(0..6, &v, From::Replica).unwrap();
        assert!(c == 2 || c == 5, "salt {me}: chunk {c} has holders");
        // From an origin: only chunks no replica holds or fetches, never a held one.
        assert_eq!(rarest([0, 1, 3, 4], &v, From::Origin), None);
        assert_eq!(rarest([0, 1, 5], &v, From::Origin), Some(5));
        assert_eq!(rarest(std::iter::empty(), &v, From::Replica), None);
    }
    // Ties go by each replica's own order: replicas picking at once from the same stale
    // view spread over the unheld chunks rather than all taking the first.
    let firsts: std::collections::BTreeSet<usize> = (0..8)
        .map(|r| {
            rarest(
                0..64,
                &view(vec![0; 64], salt(&format!("r{r}"))),
                From::Origin,
            )
        })
        .map(Option::unwrap)
        .collect();
    assert!(firsts.len() >= 6, "eight replicas' first picks: {firsts:?}");
    // The same replica picks the same way every time (deterministic).
    let v = view(vec![0; 64], 42);
    assert_eq!(
        rarest(0..64, &v, From::Origin),
        rarest(0..64, &v, From::Origin)
    );
}

#[test]
fn replicas_that_know_each_other_split_the_origin_chunks_and_help_the_one_behind() {
    let names = ["a", "b", "c", "d"];
    let absent = vec![ABSENT; 256];
    let views: Vec<View> = names
        .iter()
        .map(|me| {
            let others: Vec<(&str, &[u8])> = names
                .iter()
                .filter(|n| *n != me)
                .map(|n| (*n, absent.as_slice()))
                .collect();
            View::new(me, &others, 256)
        })
        .collect();
    // Each chunk has the same taker in every view, and each replica about a quarter.
    for c in 0..256 {
        assert!(views.iter().all(|v| v.owner[c] == views[0].owner[c]), "{c}");
    }
    for v in &views {
        let n = v.owner.iter().filter(|&&o| o == v.me).count();
        assert!((40..=90).contains(&n), "{n} of 256 chunks");
    }
    // From an origin a replica takes its own unheld chunks first.
    let a = &views[0];
    let pick = rarest(0..256, a, From::Origin).unwrap();
    assert_eq!(a.owner[pick], a.me);
    // With none of its own left, it helps the replica with the most unheld chunks left,
    // from the back of that replica's order: not what that replica takes next.
    let (b, c) = (salt("b"), salt("c"));
    let left: Vec<usize> = (0..256)
        .filter(|&x| a.owner[x] == b)
        .take(6)
        .chain((0..256).filter(|&x| a.owner[x] == c).take(2))
        .collect();
    let help = rarest(left.iter().copied(), a, From::Origin).unwrap();
    assert_eq!(a.owner[help], b);
    let b_next = rarest(left.iter().copied(), &views[1], From::Origin).unwrap();
    assert_eq!(views[1].owner[b_next], b);
    assert_ne!(help, b_next, "a helper took what the owner takes next");
    // The owner's last few are its own, unless the helper has waited long enough.
    let last: Vec<usize> = (0..256).filter(|&x| a.owner[x] == b).take(2).collect();
    assert_eq!(rarest(last.iter().copied(), a, From::Origin), None);
    let late = rarest(last.iter().copied(), a, From::OriginImpatient).unwrap();
    assert!(last.contains(&late));
    // A chunk someone holds or fetches, never.
    let mut held = a.clone();
    for &x in &left {
        held.holders[x] = 1;
    }
    assert_eq!(rarest(left.iter().copied(), &held, From::Origin), None);
    // Alone, a replica takes everything.
    let alone = View::new("a", &[], 8);
    assert!(alone.owner.iter().all(|&o| o == alone.me));
    // A replica counts as a holder once it holds or fetches a chunk.
    let have = [HAVE, FETCHING, ABSENT];
    let v = View::new("a", &[("b", &have), ("c", &have[..1])], 3);
    assert_eq!(v.holders, vec![2, 1, 0]);
}

#[test]
fn a_model_larger_than_the_node_is_refused_before_anything_is_mapped() {
    let dir = std::env::temp_dir();
    // More memory than any host has: refused by the memory check.
    let e = check_room(&claiming(1 << 62), 1 << 62, Some(&dir)).unwrap_err();
    assert!(e.to_string().contains("bytes of memory"), "{e}");
    // Fits in memory, but not on the filesystem of the output directory (which need not
    // exist yet).
    let free = free_bytes(&dir).unwrap();
    let e = check_room(&claiming(free + (1 << 30)), 4096, Some(&dir.join("a/b"))).unwrap_err();
    assert!(e.to_string().contains("bytes free under"), "{e}");
    // A model that fits passes, with an output directory or without one.
    check_room(&claiming(1 << 20), 1 << 20, Some(&dir)).unwrap();
    check_room(&claiming(1 << 20), 1 << 20, None).unwrap();
}
