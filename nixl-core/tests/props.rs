//! Property tests: the metadata decoder never panics and round-trips everything it encodes;
//! descriptor geometry agrees with a byte-set model.

use nixl_core::metadata::{AgentMetadata, BackendInfo, RegionInfo};
use nixl_core::{BackendName, Desc, DescList, MemKind};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = MemKind> {
    (0u8..5).prop_map(|c| MemKind::from_code(c).expect("code"))
}

fn backend() -> impl Strategy<Value = BackendName> {
    (0u8..9).prop_map(|c| BackendName::from_code(c).expect("code"))
}

fn region() -> impl Strategy<Value = RegionInfo> {
    (
        kind(),
        any::<u64>(),
        1u64..u64::MAX / 2,
        any::<u64>(),
        any::<u64>(),
        prop::collection::btree_map(backend(), prop::collection::vec(any::<u8>(), 0..40), 0..4),
    )
        .prop_map(|(kind, addr, len, dev, key, backends)| {
            let addr = addr.min(u64::MAX - len);
            RegionInfo {
                kind,
                desc: Desc::new(addr, len, dev),
                key,
                backends: backends.into_iter().collect(),
            }
        })
}

fn metadata() -> impl Strategy<Value = AgentMetadata> {
    (
        "[a-zA-Z0-9_\\-\\.é漢]{1,60}",
        any::<u128>(),
        any::<u64>(),
        any::<bool>(),
        prop::sample::subsequence(BackendName::ALL.to_vec(), 0..9),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 9),
        prop::collection::vec(region(), 0..60),
    )
        .prop_map(
            |(name, instance_id, generation, partial, names, blobs, regions)| AgentMetadata {
                name,
                instance_id,
                generation,
                partial,
                backends: names
                    .into_iter()
                    .zip(blobs)
                    .map(|(name, conn_info)| BackendInfo { name, conn_info })
                    .collect(),
                regions,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_decode_round_trips(md in metadata()) {
        let bytes = md.encode();
        prop_assert_eq!(AgentMetadata::decode(&bytes).unwrap(), md);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = AgentMetadata::decode(&bytes);
    }

    #[test]
    fn valid_header_random_body_never_panics(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut bytes = b"NXMD\x01\x00\x00\x00".to_vec();
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&body);
        let _ = AgentMetadata::decode(&bytes);
    }

    #[test]
    fn prefixes_fail_and_mutations_never_panic(
        md in metadata(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        val in any::<u8>(),
        wide in any::<prop::sample::Index>(),
    ) {
        let bytes = md.encode();
        let n = cut.index(bytes.len());
        prop_assert!(AgentMetadata::decode(&bytes[..n]).is_err());
        let mut m = bytes.clone();
        let i = flip.index(m.len());
        m[i] = val;
        let _ = AgentMetadata::decode(&m);
        // Overwrite four bytes anywhere with a huge little-endian value (hits counts and lengths).
        let mut m = bytes.clone();
        let i = wide.index(m.len().saturating_sub(4).max(1));
        for (k, b) in u32::MAX.to_le_bytes().iter().enumerate() {
            if let Some(x) = m.get_mut(i + k) { *x = *b; }
        }
        let _ = AgentMetadata::decode(&m);
        let mut longer = bytes;
        longer.push(0);
        prop_assert!(AgentMetadata::decode(&longer).is_err());
    }

    #[test]
    fn contains_and_overlaps_match_a_byte_model(
        a in (0u64..64, 1u64..32, 0u64..2),
        b in (0u64..64, 1u64..32, 0u64..2),
    ) {
        let (x, y) = (Desc::new(a.0, a.1, a.2), Desc::new(b.0, b.1, b.2));
        let bytes = |d: &Desc| (d.addr..d.addr + d.len).collect::<std::collections::HashSet<_>>();
        let same_dev = x.dev_id == y.dev_id;
        prop_assert_eq!(x.contains(&y), same_dev && bytes(&y).is_subset(&bytes(&x)));
        prop_assert_eq!(x.overlaps(&y), same_dev && !bytes(&x).is_disjoint(&bytes(&y)));
    }

    #[test]
    fn geometry_near_the_top_of_the_address_space(addr in (u64::MAX - 64)..=u64::MAX, len in 0u64..128) {
        let d = Desc::new(addr, len, 0);
        let wraps = addr.checked_add(len).is_none();
        prop_assert_eq!(d.end().is_none(), wraps);
        let listed = DescList::from_descs(MemKind::Dram, vec![Desc::new(1, 1, 0), d]);
        prop_assert_eq!(listed.is_ok(), len > 0 && !wraps);
        if wraps {
            prop_assert!(!Desc::new(0, u64::MAX, 0).contains(&d));
            prop_assert!(!d.overlaps(&Desc::new(0, 1, 0)));
        }
    }
}
