//! Exactly-once notifications over several lanes.
//!
//! A notification SEND whose ACK was lost is reported failed to the initiator (its QP gave up
//! retrying) although the target received it; the initiator then sends it again on another
//! lane, and the target would deliver it twice. So every notification carries, ahead of the
//! message, an 8-byte little-endian sequence number that the initiator assigns per connection
//! when it first sends it and keeps for every retry, and the target drops a number it has
//! already delivered ([`Dedup`]).
//!
//! The target cannot learn from the initiator what it has processed (a SEND acknowledged by
//! the NIC may still sit unpolled in another completion queue), so it keeps its own record: a
//! floor below which every number was delivered, and the set of delivered numbers above it;
//! the floor rises over every contiguous run. A number that never arrives (the initiator gave
//! up on every lane) would hold the floor down, so once [`MAX_PENDING`] numbers wait above a
//! gap the floor skips it: a copy of that number arriving after `MAX_PENDING` later ones is
//! taken for a duplicate. The first copy of a notification always reaches the target before
//! the initiator even learns that its SEND failed, so only a retry can come that late.

use std::collections::BTreeSet;

/// Bytes of the header (the sequence number) ahead of every notification.
pub(super) const HEADER: usize = 8;
/// Delivered numbers kept above a gap before the floor skips it.
pub(super) const MAX_PENDING: usize = 16384;

/// Writes the header of notification `seq` into `out` (at least [`HEADER`] bytes).
pub(super) fn put_header(out: &mut [u8; HEADER], seq: u64) {
    *out = seq.to_le_bytes();
}

/// Splits a received notification into its sequence number and message; `None` when it is
/// shorter than the header.
pub(super) fn split(buf: &[u8]) -> Option<(u64, &[u8])> {
    let (h, msg) = buf.split_first_chunk::<HEADER>()?;
    Some((u64::from_le_bytes(*h), msg))
}

/// What a target remembers of one connection's notifications.
#[derive(Debug, Default)]
pub(super) struct Dedup {
    /// Every number below was delivered (or skipped).
    floor: u64,
    /// Delivered numbers at or above `floor`.
    above: BTreeSet<u64>,
    dropped: u64,
}

impl Dedup {
    /// Whether notification `seq` is new (deliver it) or a duplicate (drop it).
    pub(super) fn accept(&mut self, seq: u64) -> bool {
        if seq < self.floor || !self.above.insert(seq) {
            self.dropped += 1;
            return false;
        }
        self.settle();
        if self.above.len() > MAX_PENDING {
            // A gap that never fills: skip it.
            if let Some(&first) = self.above.first() {
                self.floor = first;
                self.settle();
            }
        }
        true
    }

    fn settle(&mut self) {
        while self.above.first() == Some(&self.floor) {
            self.above.pop_first();
            self.floor = self.floor.saturating_add(1);
        }
    }

    #[cfg(test)]
    /// Duplicates dropped so far.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped
    }

    #[cfg(test)]
    /// Numbers remembered above the floor (bounded by [`MAX_PENDING`]).
    pub(super) fn pending(&self) -> usize {
        self.above.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip_and_short_input() {
        let mut h = [0u8; HEADER];
        put_header(&mut h, 0x0102_0304_0506_0708);
        let mut buf = h.to_vec();
        buf.extend_from_slice(b"msg");
        assert_eq!(split(&buf), Some((0x0102_0304_0506_0708, &b"msg"[..])));
        assert_eq!(split(&h), Some((0x0102_0304_0506_0708, &b""[..])));
        assert_eq!(split(&buf[..7]), None);
        assert_eq!(split(&[]), None);
    }

    #[test]
    fn a_retry_after_later_notifications_is_dropped() {
        let mut d = Dedup::default();
        assert!(d.accept(0));
        assert!(d.accept(2), "out of order across lanes");
        assert!(d.accept(1));
        assert_eq!(d.pending(), 0, "0..=2 contiguous: folded into the floor");
        assert!(d.accept(3));
        // Seq 3's ACK was lost; the initiator retried it on another lane after 4 and 5.
        assert!(d.accept(5));
        assert!(d.accept(4));
        assert!(!d.accept(3), "retry of a delivered notification");
        assert!(!d.accept(5));
        // A retry that overtakes nothing: delivered once as well.
        assert!(d.accept(7));
        assert!(!d.accept(7));
        assert!(d.accept(6));
        assert!(!d.accept(6));
        assert_eq!(d.dropped(), 4);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn a_gap_that_never_fills_is_skipped_and_memory_stays_bounded() {
        let mut d = Dedup::default();
        // Seq 0 was given up by the initiator: never arrives.
        for s in 1..=(MAX_PENDING as u64 + 10) {
            assert!(d.accept(s), "{s}");
            assert!(d.pending() <= MAX_PENDING);
        }
        assert_eq!(d.pending(), 0, "floor skipped the gap");
        assert!(!d.accept(0), "too late: taken for a duplicate");
        assert!(!d.accept(17));
        assert!(d.accept(MAX_PENDING as u64 + 11));
    }

    proptest! {
        /// Any arrival order of notifications 0..n, each possibly duplicated (a duplicate
        /// always after its original): every number delivered exactly once.
        #[test]
        fn exactly_once(n in 1usize..300, dups in prop::collection::vec(any::<(u16, u16)>(), 0..200), seed in any::<u64>()) {
            let mut order: Vec<u64> = (0..n as u64).collect();
            let mut rng = seed | 1;
            let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
            // Local reordering (across lanes), bounded by 32 positions.
            for i in 0..order.len() {
                let j = (i + (next() % 32) as usize).min(order.len() - 1);
                order.swap(i, j);
            }
            for (a, b) in dups {
                let s = u64::from(a) % n as u64;
                let pos = order.iter().position(|&x| x == s).unwrap();
                let at = (pos + 1 + usize::from(b) % 64).min(order.len());
                order.insert(at, s);
            }
            let mut d = Dedup::default();
            let mut got = vec![0u32; n];
            for s in order {
                if d.accept(s) {
                    got[s as usize] += 1;
                }
            }
            prop_assert!(got.iter().all(|&c| c == 1), "{:?}", got);
        }
    }
}
