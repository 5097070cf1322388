//! `Desc` geometry and `DescList` validation, checked against simple models: a byte-set model
//! over small windows of the address space (at its bottom, middle and top) and an exact
//! 128-bit interval model for ranges of any size.

use nixl_core::{Desc, DescList, Error, MemKind};
use proptest::prelude::*;

/// Windows of the address space the byte-set model covers: `base + 0..128`. The top one ends at
/// `u64::MAX` itself, so descriptors in it can end exactly at the top or wrap past it.
const WINDOWS: [u64; 3] = [0, 1 << 40, u64::MAX - (WINDOW - 1)];
const WINDOW: u64 = 128;
/// Largest offset and length drawn inside a window (so `offset + len <= WINDOW`).
const MAX_OFF: u64 = 96;
const MAX_LEN: u64 = 32;

/// Device ids: equal ones, different ones, and the extremes.
fn dev_id() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![0u64, 1, 7, u64::MAX])
}

fn mem_kind() -> impl Strategy<Value = MemKind> {
    prop::sample::select(MemKind::ALL.to_vec())
}

/// A descriptor inside window `w` (possibly empty, possibly wrapping in the top window).
fn small_desc(w: usize) -> impl Strategy<Value = Desc> {
    (0..MAX_OFF, 0..=MAX_LEN, dev_id())
        .prop_map(move |(off, len, dev)| Desc::new(WINDOWS[w] + off, len, dev))
}

/// What the model knows of a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bytes {
    /// `addr + len` overflows: not a range at all.
    Wraps,
    /// Bit `i` set: byte `base + i` is covered (0 for an empty range).
    Set(u128),
}

fn model(base: u64, d: &Desc) -> Bytes {
    let Some(end) = d.addr.checked_add(d.len) else {
        return Bytes::Wraps;
    };
    let mut set = 0u128;
    for b in d.addr..end {
        let i = b - base;
        assert!(i < WINDOW, "descriptor {d:?} leaves its window");
        set |= 1 << i;
    }
    Bytes::Set(set)
}

/// The descriptor is what `DescList` accepts: non-empty and not wrapping.
fn valid(d: &Desc) -> bool {
    d.len > 0 && d.addr.checked_add(d.len).is_some()
}

/// A descriptor of any size, biased to the edges of the address space.
fn any_desc() -> impl Strategy<Value = Desc> {
    let edge = prop_oneof![
        3 => any::<u64>(),
        1 => 0u64..16,
        1 => (0u64..16).prop_map(|x| u64::MAX - x),
        1 => (0u64..16).prop_map(|x| (1 << 63) - 8 + x),
    ];
    (edge.clone(), edge, prop::sample::select(vec![0u64, 1]))
        .prop_map(|(addr, len, dev)| Desc::new(addr, len, dev))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Valid descriptors in one window: `contains` is byte-set inclusion and `overlaps` a shared
    /// byte, on the same device only; a wrapping descriptor contains, is contained in and
    /// overlaps nothing.
    #[test]
    fn contains_and_overlaps_match_the_byte_model(
        (w, x, y) in (0..WINDOWS.len()).prop_flat_map(|w| (Just(w), small_desc(w), small_desc(w))),
    ) {
        let (bx, by) = (model(WINDOWS[w], &x), model(WINDOWS[w], &y));
        let same_dev = x.dev_id == y.dev_id;
        match (bx, by) {
            (Bytes::Set(sx), Bytes::Set(sy)) if sx != 0 && sy != 0 => {
                prop_assert_eq!(x.contains(&y), same_dev && sy & !sx == 0);
                prop_assert_eq!(y.contains(&x), same_dev && sx & !sy == 0);
                prop_assert_eq!(x.overlaps(&y), same_dev && sx & sy != 0);
                prop_assert_eq!(y.overlaps(&x), same_dev && sx & sy != 0);
            }
            (Bytes::Wraps, _) | (_, Bytes::Wraps) => {
                prop_assert!(!x.contains(&y) && !y.contains(&x));
                prop_assert!(!x.overlaps(&y) && !y.overlaps(&x));
            }
            _ => {} // empty descriptors: see `empty_descriptor_overlaps_nothing`
        }
        for d in [x, y] {
            prop_assert_eq!(d.end().is_none(), model(WINDOWS[w], &d) == Bytes::Wraps);
            if valid(&d) {
                prop_assert!(d.contains(&d) && d.overlaps(&d));
                // The same range on another device is neither inside nor overlapping.
                let other = Desc::new(d.addr, d.len, d.dev_id ^ 1);
                prop_assert!(!d.contains(&other) && !d.overlaps(&other));
            }
        }
    }

    /// Descriptors in different windows (at least 2^40 apart) never meet.
    #[test]
    fn far_apart_descriptors_never_meet(
        x in small_desc(0), y in small_desc(1), z in small_desc(2),
    ) {
        for (a, b) in [(x, y), (y, z), (x, z)] {
            prop_assert!(!a.contains(&b) && !b.contains(&a));
            prop_assert!(!a.overlaps(&b) && !b.overlaps(&a));
        }
    }

    /// Ranges of any size, many near `u64::MAX`, against exact 128-bit interval arithmetic.
    #[test]
    fn contains_and_overlaps_match_wide_intervals(x in any_desc(), y in any_desc()) {
        let interval = |d: &Desc| -> Option<(u128, u128)> {
            let end = u128::from(d.addr) + u128::from(d.len);
            (end <= u128::from(u64::MAX)).then_some((u128::from(d.addr), end))
        };
        prop_assert_eq!(x.end().map(u128::from), interval(&x).map(|i| i.1));
        let same_dev = x.dev_id == y.dev_id;
        match (interval(&x), interval(&y)) {
            (Some((xs, xe)), Some((ys, ye))) if xs < xe && ys < ye => {
                prop_assert_eq!(x.contains(&y), same_dev && xs <= ys && ye <= xe);
                prop_assert_eq!(x.overlaps(&y), same_dev && xs < ye && ys < xe);
                prop_assert_eq!(y.overlaps(&x), x.overlaps(&y));
            }
            (None, _) | (_, None) => {
                prop_assert!(!x.contains(&y) && !y.contains(&x));
                prop_assert!(!x.overlaps(&y) && !y.overlaps(&x));
            }
            _ => {}
        }
    }

    /// `from_descs` accepts exactly the lists whose descriptors are all non-empty and
    /// non-wrapping, and otherwise names the first bad one.
    #[test]
    fn from_descs_names_the_first_bad_descriptor(
        kind in mem_kind(),
        descs in prop::collection::vec(
            prop_oneof![
                4 => small_desc(0),
                2 => small_desc(2), // top window: may end at u64::MAX or wrap
                1 => any_desc(),
            ],
            0..12,
        ),
    ) {
        let first_bad = descs.iter().position(|d| !valid(d));
        match DescList::from_descs(kind, descs.clone()) {
            Ok(list) => {
                prop_assert_eq!(first_bad, None);
                prop_assert_eq!(list.kind(), kind);
                prop_assert_eq!(list.descs(), &descs[..]);
                prop_assert_eq!(list.len(), descs.len());
                prop_assert_eq!(list.is_empty(), descs.is_empty());
                let total: u128 = descs.iter().map(|d| u128::from(d.len)).sum();
                if let Ok(total) = u64::try_from(total) {
                    prop_assert_eq!(list.total_bytes(), total);
                }
            }
            Err(err) => {
                let Some(bad) = first_bad else {
                    return Err(TestCaseError::fail(format!("valid list refused: {err}")));
                };
                check_invalid_desc(&err, bad, &descs[bad]);
            }
        }
    }

    /// `push` checks each descriptor like `from_descs`, names the position it would have taken,
    /// and leaves the list as it was when it refuses.
    #[test]
    fn push_checks_like_from_descs(
        kind in mem_kind(),
        descs in prop::collection::vec(prop_oneof![3 => small_desc(0), 1 => small_desc(2), 1 => any_desc()], 0..12),
    ) {
        let mut list = DescList::new(kind);
        prop_assert!(list.is_empty());
        let mut kept = Vec::new();
        for d in descs {
            let before = list.clone();
            match list.push(d) {
                Ok(()) => {
                    prop_assert!(valid(&d), "{d:?} accepted");
                    kept.push(d);
                }
                Err(err) => {
                    prop_assert!(!valid(&d), "{d:?} refused: {err}");
                    check_invalid_desc(&err, kept.len(), &d);
                    prop_assert_eq!(&list, &before);
                }
            }
            prop_assert_eq!(list.descs(), &kept[..]);
        }
        prop_assert_eq!(DescList::from_descs(kind, kept).expect("kept descriptors are valid"), list);
    }
}

fn check_invalid_desc(err: &Error, index: usize, d: &Desc) {
    match err {
        Error::InvalidDesc { index: got, reason } => {
            assert_eq!(*got, index, "{err}");
            if d.len == 0 {
                assert!(reason.contains("zero-length"), "{reason}");
            } else {
                assert!(reason.contains("overflows"), "{reason}");
            }
            assert!(
                err.to_string().starts_with(&format!("descriptor {index}:")),
                "{err}"
            );
        }
        other => panic!("want InvalidDesc at {index}, got {other:?}"),
    }
}

#[test]
fn ranges_at_the_top_of_the_address_space() {
    // The last byte that a descriptor can cover is u64::MAX - 1: `end` must fit in a u64.
    let top = Desc::new(u64::MAX - 1, 1, 0);
    assert_eq!(top.end(), Some(u64::MAX));
    assert!(DescList::from_descs(MemKind::File, vec![top]).is_ok());
    let whole = Desc::new(0, u64::MAX, 0);
    assert!(whole.contains(&top) && whole.overlaps(&top) && top.overlaps(&whole));
    assert!(!top.contains(&whole));
    for wraps in [
        Desc::new(u64::MAX, 1, 0),
        Desc::new(1, u64::MAX, 0),
        Desc::new(u64::MAX, u64::MAX, 0),
    ] {
        assert_eq!(wraps.end(), None);
        assert!(!whole.contains(&wraps) && !whole.overlaps(&wraps) && !wraps.overlaps(&whole));
        let err = DescList::from_descs(MemKind::Dram, vec![top, top, wraps]).unwrap_err();
        check_invalid_desc(&err, 2, &wraps);
    }
    let err = DescList::from_descs(MemKind::Vram, vec![Desc::new(u64::MAX, 0, 4)]).unwrap_err();
    check_invalid_desc(&err, 0, &Desc::new(u64::MAX, 0, 4));
}

/// `overlaps` is documented as "share at least one byte"; an empty descriptor shares none.
#[test]
fn empty_descriptor_overlaps_nothing() {
    let r = Desc::new(100, 50, 0);
    for empty in [
        Desc::new(99, 0, 0),
        Desc::new(100, 0, 0),
        Desc::new(120, 0, 0),
        Desc::new(150, 0, 0),
    ] {
        assert!(!r.overlaps(&empty), "{r:?} overlaps {empty:?}");
        assert!(!empty.overlaps(&r), "{empty:?} overlaps {r:?}");
        assert!(!empty.overlaps(&empty), "{empty:?} overlaps itself");
    }
}

/// Two valid descriptors of 2^63 bytes each: their total does not fit a u64. The sum saturates.
#[test]
fn total_bytes_does_not_overflow() {
    let half = 1u64 << 63;
    let list = DescList::from_descs(
        MemKind::File,
        vec![Desc::new(0, half, 1), Desc::new(0, half, 2)],
    )
    .unwrap();
    let total = std::panic::catch_unwind(|| list.total_bytes()).expect("total_bytes panicked");
    assert!(total >= half, "total_bytes wrapped to {total}");
}
