//! The transfer planner: slicing, striping, completion bookkeeping and failover. Pure logic,
//! no verbs: the backend drives a [`Tracker`] with the completions it polls, and the tests
//! drive it with a simulated executor.
//!
//! - [`slice_segments`] cuts a request's segments into work requests ([`Slice`]s): each moves
//!   at most `slice_bytes` to one contiguous remote range of one remote region, from at most
//!   `max_sge` local pieces. Consecutive segments whose remote ranges follow each other are
//!   coalesced; pieces contiguous in local memory (same region) merge into one SGE.
//! - [`stripe`] spreads slices over lanes (a lane is one QP on one NIC) balanced by bytes: the
//!   loads of any two lanes differ by at most one slice.
//! - [`Tracker`] follows one post: which slices are queued on which lane, in flight, done; it
//!   hands out at most `max_outstanding` WRs per lane; a failed WR marks its lane down, and the
//!   lane's unfinished slices move to healthy lanes, another NIC first, then preferred lanes
//!   first; a slice is retried at most `max_retries` times; with no lane left the post fails
//!   with the reason. Lanes may be marked *preferred* (on the NICs nearest to the memory): the
//!   slices are striped over those only, and the others serve for failover.

use std::collections::VecDeque;

use nixl_core::Segment;

/// One local piece of a slice: an SGE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Piece {
    /// Local address.
    pub addr: u64,
    /// Length (at most `slice_bytes`, so it fits an SGE).
    pub len: u64,
    /// Index of the local region (for its lkey).
    pub local_region: u32,
}

/// One work request: local pieces to/from one contiguous remote range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Slice {
    /// Remote start address.
    pub remote_addr: u64,
    /// Index of the remote region (for its rkey).
    pub remote_region: u32,
    /// Total bytes.
    pub len: u64,
    /// Local pieces, in remote order.
    pub pieces: Vec<Piece>,
}

/// Cuts `segs` into slices of at most `slice_bytes` (at least 1) and at most `max_sge` pieces
/// (at least 1).
pub(super) fn slice_segments(segs: &[Segment], slice_bytes: u64, max_sge: usize) -> Vec<Slice> {
    let slice_bytes = slice_bytes.max(1);
    let max_sge = max_sge.max(1);
    let mut out: Vec<Slice> = Vec::new();
    for s in segs {
        let mut done = 0u64;
        let len = s.local.len.min(s.remote.len);
        while done < len {
            let laddr = s.local.addr + done;
            let raddr = s.remote.addr + done;
            let fits = |c: &Slice| {
                c.remote_region == s.remote_region
                    && c.remote_addr.checked_add(c.len) == Some(raddr)
                    && c.len < slice_bytes
                    && (c.pieces.len() < max_sge
                        || c.pieces.last().is_some_and(|p| {
                            p.local_region == s.local_region && p.addr + p.len == laddr
                        }))
            };
            if !out.last().is_some_and(fits) {
                out.push(Slice {
                    remote_addr: raddr,
                    remote_region: s.remote_region,
                    len: 0,
                    pieces: Vec::new(),
                });
            }
            let cur = out.last_mut().expect("pushed above");
            let take = (slice_bytes - cur.len).min(len - done);
            match cur.pieces.last_mut() {
                Some(p) if p.local_region == s.local_region && p.addr + p.len == laddr => {
                    p.len += take
                }
                _ => cur.pieces.push(Piece {
                    addr: laddr,
                    len: take,
                    local_region: s.local_region,
                }),
            }
            cur.len += take;
            done += take;
        }
    }
    out
}

/// Assigns slices (by length) to `lanes` lanes, balanced by bytes: each slice, in order, goes
/// to the least-loaded lane (lowest index on ties). Returns the slice indices per lane.
pub(super) fn stripe(lens: &[u64], lanes: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); lanes];
    if lanes == 0 {
        return out;
    }
    let mut load = vec![0u64; lanes];
    for (i, &l) in lens.iter().enumerate() {
        let best = (0..lanes).min_by_key(|&k| (load[k], k)).unwrap_or(0);
        load[best] = load[best].saturating_add(l);
        out[best].push(i);
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Queued(u32),
    InFlight(u32),
    Done,
}

#[derive(Clone, Debug)]
struct Lane {
    nic: usize,
    preferred: bool,
    up: bool,
    queue: VecDeque<u32>,
    inflight: u32,
    /// Bytes queued or in flight.
    load: u64,
}

/// Where one post stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Progress {
    /// Slices are queued or in flight.
    Running,
    /// Every slice is done.
    Done,
    /// The post failed (no lane left, a slice out of retries, or aborted), with the reason.
    /// In-flight WRs may still complete; wait for [`Tracker::inflight`] to reach 0 before
    /// letting go of the memory.
    Failed(String),
}

/// The bookkeeping of one post of a request.
#[derive(Clone, Debug)]
pub(super) struct Tracker {
    lens: Vec<u64>,
    state: Vec<State>,
    tries: Vec<u32>,
    lanes: Vec<Lane>,
    done: usize,
    max_outstanding: u32,
    max_retries: u32,
    failure: Option<String>,
}

impl Tracker {
    #[cfg(test)]
    /// A post of slices of these lengths over lanes on these NICs (`lane_nics[lane]` = the
    /// lane's NIC index), at most `max_outstanding` WRs in flight per lane, each slice retried
    /// at most `max_retries` times after a failure.
    pub(super) fn new(
        lens: Vec<u64>,
        lane_nics: &[usize],
        max_outstanding: u32,
        max_retries: u32,
    ) -> Self {
        Tracker::with_preferred(lens, lane_nics, &[], max_outstanding, max_retries)
    }

    /// As [`Tracker::new`], striping the slices over the lanes whose `preferred` entry is true
    /// only (a missing entry is false; with none preferred, over every lane). The other lanes
    /// take slices only when a preferred lane fails.
    pub(super) fn with_preferred(
        lens: Vec<u64>,
        lane_nics: &[usize],
        preferred: &[bool],
        max_outstanding: u32,
        max_retries: u32,
    ) -> Self {
        let n = lens.len();
        let any_preferred = preferred.iter().take(lane_nics.len()).any(|&p| p);
        let mut lanes: Vec<Lane> = lane_nics
            .iter()
            .enumerate()
            .map(|(i, &nic)| Lane {
                nic,
                preferred: !any_preferred || preferred.get(i).copied().unwrap_or(false),
                up: true,
                queue: VecDeque::new(),
                inflight: 0,
                load: 0,
            })
            .collect();
        let first: Vec<usize> = (0..lanes.len()).filter(|&l| lanes[l].preferred).collect();
        let mut state = vec![State::Done; n];
        for (k, slices) in stripe(&lens, first.len()).into_iter().enumerate() {
            let lane = first[k];
            for i in slices {
                state[i] = State::Queued(lane as u32);
                lanes[lane].queue.push_back(i as u32);
                lanes[lane].load += lens[i];
            }
        }
        let failure = (n > 0 && lanes.is_empty()).then(|| "no lane to carry the transfer".into());
        Tracker {
            lens,
            state,
            tries: vec![0; n],
            lanes,
            done: 0,
            max_outstanding: max_outstanding.max(1),
            max_retries,
            failure,
        }
    }

    /// Whether `lane` is still up.
    pub(super) fn lane_up(&self, lane: usize) -> bool {
        self.lanes.get(lane).is_some_and(|l| l.up)
    }

    /// WRs in flight, all lanes.
    pub(super) fn inflight(&self) -> u32 {
        self.lanes.iter().map(|l| l.inflight).sum()
    }

    #[cfg(test)]
    /// Bytes queued or in flight on `lane`.
    pub(super) fn load(&self, lane: usize) -> u64 {
        self.lanes.get(lane).map_or(0, |l| l.load)
    }

    /// The lane `slice` is in flight on, if it is.
    pub(super) fn lane_of(&self, slice: u32) -> Option<usize> {
        match self.state.get(slice as usize) {
            Some(State::InFlight(l)) => Some(*l as usize),
            _ => None,
        }
    }

    /// Where the post stands.
    pub(super) fn progress(&self) -> Progress {
        if let Some(f) = &self.failure {
            Progress::Failed(f.clone())
        } else if self.done == self.lens.len() {
            Progress::Done
        } else {
            Progress::Running
        }
    }

    /// How many slices [`Tracker::take`] would hand out on `lane` now.
    pub(super) fn wants(&self, lane: usize) -> u32 {
        match self.lanes.get(lane) {
            Some(l) if l.up && self.failure.is_none() => {
                let room = self.max_outstanding.saturating_sub(l.inflight);
                room.min(u32::try_from(l.queue.len()).unwrap_or(u32::MAX))
            }
            _ => 0,
        }
    }

    /// The next slices to post on `lane`, at most `limit` and up to the lane's outstanding
    /// limit; marks them in flight. Nothing once the post has failed.
    pub(super) fn take(&mut self, lane: usize, limit: u32, out: &mut Vec<u32>) {
        out.clear();
        if self.failure.is_some() {
            return;
        }
        let max = self.max_outstanding;
        let Some(l) = self.lanes.get_mut(lane) else {
            return;
        };
        if !l.up {
            return;
        }
        while l.inflight < max && (out.len() as u32) < limit {
            let Some(i) = l.queue.pop_front() else { break };
            l.inflight += 1;
            self.state[i as usize] = State::InFlight(lane as u32);
            out.push(i);
        }
    }

    /// A WR of `slice` on `lane` succeeded. Stale or duplicate reports change nothing.
    pub(super) fn complete(&mut self, slice: u32, lane: usize) {
        let i = slice as usize;
        if self.state.get(i) != Some(&State::InFlight(lane as u32)) {
            return;
        }
        self.state[i] = State::Done;
        self.done += 1;
        let l = &mut self.lanes[lane];
        l.inflight -= 1;
        l.load = l.load.saturating_sub(self.lens[i]);
    }

    /// A WR of `slice` on `lane` failed (`reason`): the lane goes down, its queued slices move
    /// to healthy lanes, and the slice is retried elsewhere (or the post fails).
    pub(super) fn fail(&mut self, slice: u32, lane: usize, reason: &str) {
        let i = slice as usize;
        if self.state.get(i) != Some(&State::InFlight(lane as u32)) {
            return;
        }
        let l = &mut self.lanes[lane];
        l.inflight -= 1;
        l.load = l.load.saturating_sub(self.lens[i]);
        self.fail_lane(lane, reason);
        self.tries[i] += 1;
        if self.tries[i] > self.max_retries {
            self.set_failure(format!(
                "slice {i} ({} bytes) failed {} times; last: {reason}",
                self.lens[i], self.tries[i]
            ));
            return;
        }
        self.requeue(i, self.lanes[lane].nic, reason);
    }

    /// Marks `lane` down (a path failure seen outside a WR of this post, or a failed post
    /// call) and moves its queued slices to healthy lanes. In-flight WRs on it still report.
    pub(super) fn fail_lane(&mut self, lane: usize, reason: &str) {
        let Some(l) = self.lanes.get_mut(lane) else {
            return;
        };
        if !l.up {
            return;
        }
        l.up = false;
        let nic = l.nic;
        let queued: Vec<u32> = l.queue.drain(..).collect();
        for i in queued {
            let i = i as usize;
            self.lanes[lane].load = self.lanes[lane].load.saturating_sub(self.lens[i]);
            self.requeue(i, nic, reason);
        }
    }

    /// Ends the post early (cancelled, backend stopping).
    pub(super) fn abort(&mut self, reason: &str) {
        self.set_failure(reason.to_owned());
    }

    fn set_failure(&mut self, reason: String) {
        if self.failure.is_none() {
            self.failure = Some(reason);
        }
    }

    /// Puts slice `i` on the healthy lane with the least load, preferring NICs other than
    /// `avoid_nic`, then preferred lanes.
    fn requeue(&mut self, i: usize, avoid_nic: usize, reason: &str) {
        let best = self
            .lanes
            .iter()
            .enumerate()
            .filter(|(_, l)| l.up)
            .min_by_key(|(k, l)| (l.nic == avoid_nic, !l.preferred, l.load, *k))
            .map(|(k, _)| k);
        match best {
            Some(k) => {
                self.state[i] = State::Queued(k as u32);
                self.lanes[k].queue.push_back(i as u32);
                self.lanes[k].load += self.lens[i];
            }
            None => {
                self.state[i] = State::Queued(u32::MAX);
                self.set_failure(format!("no healthy path left; last failure: {reason}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixl_core::Desc;
    use proptest::prelude::*;

    fn seg(l: u64, r: u64, len: u64, lr: u32, rr: u32) -> Segment {
        Segment {
            local: Desc::new(l, len, 0),
            remote: Desc::new(r, len, 0),
            local_region: lr,
            remote_region: rr,
        }
    }

    #[test]
    fn coalesces_contiguous_remote_ranges_and_splits_long_ones() {
        // Remote contiguous, local not: one slice with two pieces.
        let s = slice_segments(&[seg(0, 100, 10, 0, 0), seg(50, 110, 10, 0, 0)], 1 << 20, 4);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].pieces.len(), 2);
        assert_eq!((s[0].remote_addr, s[0].len), (100, 20));
        // Both contiguous, same region: one piece.
        let s = slice_segments(&[seg(0, 100, 10, 0, 0), seg(10, 110, 10, 0, 0)], 1 << 20, 1);
        assert_eq!(s.len(), 1);
        assert_eq!(
            s[0].pieces,
            vec![Piece {
                addr: 0,
                len: 20,
                local_region: 0
            }]
        );
        // Contiguous local memory but another region: two pieces (two lkeys).
        let s = slice_segments(&[seg(0, 100, 10, 0, 0), seg(10, 110, 10, 1, 0)], 1 << 20, 4);
        assert_eq!(s[0].pieces.len(), 2);
        // Another remote region never coalesces.
        let s = slice_segments(&[seg(0, 100, 10, 0, 0), seg(10, 110, 10, 0, 1)], 1 << 20, 4);
        assert_eq!(s.len(), 2);
        // max_sge bounds the pieces.
        let s = slice_segments(
            &[seg(0, 0, 1, 0, 0), seg(5, 1, 1, 0, 0), seg(9, 2, 1, 0, 0)],
            64,
            2,
        );
        assert_eq!(s.len(), 2);
        // Long segment split at slice_bytes.
        let s = slice_segments(&[seg(0, 0, 25, 0, 0)], 10, 4);
        let lens: Vec<u64> = s.iter().map(|x| x.len).collect();
        assert_eq!(lens, vec![10, 10, 5]);
        assert_eq!(s[2].pieces[0].addr, 20);
    }

    #[test]
    fn stripes_over_more_than_two_lanes() {
        let lanes = stripe(&[10; 16], 8);
        assert!(lanes.iter().all(|l| l.len() == 2), "{lanes:?}");
    }

    #[test]
    fn failover_prefers_another_nic_and_fails_when_none_is_left() {
        // Lanes 0,1 on NIC 0; lane 2 on NIC 1.
        let mut t = Tracker::new(vec![10; 3], &[0, 0, 1], 1, 3);
        let mut out = Vec::new();
        t.take(0, u32::MAX, &mut out);
        assert_eq!(out, vec![0]);
        t.fail(0, 0, "IBV_WC_RETRY_EXC_ERR");
        assert!(!t.lane_up(0));
        // Slice 0 went to NIC 1 (lane 2), not to lane 1 on the same NIC.
        assert_eq!(t.load(2), 20);
        assert_eq!(t.load(1), 10);
        t.take(2, u32::MAX, &mut out);
        assert_eq!(out, vec![2]);
        t.fail(2, 2, "port down");
        t.take(1, u32::MAX, &mut out);
        assert_eq!(out, vec![1]);
        t.fail(1, 1, "port down");
        match t.progress() {
            Progress::Failed(r) => assert!(r.contains("no healthy path left"), "{r}"),
            p => panic!("{p:?}"),
        }
        assert_eq!(t.inflight(), 0);
    }

    #[test]
    fn preferred_lanes_carry_the_work_and_the_others_take_over() {
        // Lanes 0,1 on NIC 0 (far), lanes 2,3 on NIC 1 (near, preferred).
        let pref = [false, false, true, true];
        let mut t = Tracker::with_preferred(vec![10; 8], &[0, 0, 1, 1], &pref, 8, 2);
        assert_eq!((t.load(0), t.load(1), t.load(2), t.load(3)), (0, 0, 40, 40));
        assert_eq!(t.wants(0), 0);
        let mut out = Vec::new();
        t.take(2, u32::MAX, &mut out);
        assert_eq!(out.len(), 4);
        // Lane 2 fails: its slices go to the other NIC first (lanes 0/1), not to lane 3.
        t.fail(out[0], 2, "IBV_WC_RETRY_EXC_ERR");
        assert_eq!(t.load(3), 40);
        assert_eq!(t.load(0) + t.load(1), 10);
        // A failure on the far NIC moves its work back to the near NIC (lane 3).
        let far = if t.load(0) > 0 { 0 } else { 1 };
        t.take(far, u32::MAX, &mut out);
        t.fail(out[0], far, "port down");
        assert_eq!(t.load(3), 50);
        // No preferred entry at all, or none true: every lane is striped over.
        let t = Tracker::with_preferred(vec![10; 4], &[0, 1], &[], 8, 2);
        assert_eq!((t.load(0), t.load(1)), (20, 20));
        let t = Tracker::with_preferred(vec![10; 4], &[0, 1], &[false, false], 8, 2);
        assert_eq!((t.load(0), t.load(1)), (20, 20));
    }

    #[test]
    fn retries_are_bounded() {
        let mut t = Tracker::new(vec![10], &[0, 1, 2, 3], 4, 1);
        let mut out = Vec::new();
        t.take(0, u32::MAX, &mut out);
        t.fail(0, 0, "a");
        let lane = (0..4).find(|&l| t.load(l) > 0).unwrap();
        t.take(lane, u32::MAX, &mut out);
        t.fail(0, lane, "b");
        match t.progress() {
            Progress::Failed(r) => assert!(r.contains("failed 2 times; last: b"), "{r}"),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn no_lanes_fails_at_once_and_empty_is_done() {
        assert!(matches!(
            Tracker::new(vec![1], &[], 1, 1).progress(),
            Progress::Failed(_)
        ));
        assert_eq!(Tracker::new(vec![], &[], 1, 1).progress(), Progress::Done);
    }

    /// Segments with random sizes, random local/remote contiguity and regions.
    fn segs_strategy() -> impl Strategy<Value = Vec<Segment>> {
        prop::collection::vec(
            (1u64..5000, any::<bool>(), any::<bool>(), 0u32..3, 0u32..3),
            1..40,
        )
        .prop_map(|v| {
            let (mut l, mut r) = (1u64 << 20, 1u64 << 40);
            v.into_iter()
                .map(|(len, lgap, rgap, lr, rr)| {
                    l += if lgap { 64 } else { 0 };
                    r += if rgap { 64 } else { 0 };
                    let s = seg(l, r, len, lr, rr);
                    l += len;
                    r += len;
                    s
                })
                .collect()
        })
    }

    /// Expands slices to (local byte, remote byte) pairs, as ranges.
    fn coverage(slices: &[Slice]) -> Vec<(u64, u64, u64)> {
        let mut v = Vec::new();
        for s in slices {
            let mut r = s.remote_addr;
            for p in &s.pieces {
                v.push((p.addr, r, p.len));
                r += p.len;
            }
            assert_eq!(r - s.remote_addr, s.len);
        }
        v
    }

    fn expand(v: &[(u64, u64, u64)]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = v
            .iter()
            .flat_map(|&(l, r, n)| (0..n).map(move |k| (l + k, r + k)))
            .collect();
        out.sort_unstable();
        out
    }

    proptest! {
        #[test]
        fn slicing_covers_every_byte_once(segs in segs_strategy(), sb in 1u64..3000, sge in 1usize..5) {
            let slices = slice_segments(&segs, sb, sge);
            let want: Vec<_> = segs.iter().map(|s| (s.local.addr, s.remote.addr, s.local.len)).collect();
            prop_assert_eq!(expand(&coverage(&slices)), expand(&want));
            for s in &slices {
                prop_assert!(s.len <= sb && s.len > 0);
                prop_assert!(s.pieces.len() <= sge);
                prop_assert_eq!(s.pieces.iter().map(|p| p.len).sum::<u64>(), s.len);
            }
        }

        #[test]
        fn striping_is_balanced_within_one_slice(lens in prop::collection::vec(1u64..10_000, 0..200), lanes in 1usize..17) {
            let st = stripe(&lens, lanes);
            let mut seen = vec![false; lens.len()];
            for l in &st { for &i in l { prop_assert!(!seen[i]); seen[i] = true; } }
            prop_assert!(seen.iter().all(|&b| b));
            let loads: Vec<u64> = st.iter().map(|l| l.iter().map(|&i| lens[i]).sum()).collect();
            let max_slice = lens.iter().copied().max().unwrap_or(0);
            let (mx, mn) = (loads.iter().max().unwrap(), loads.iter().min().unwrap());
            prop_assert!(mx - mn <= max_slice, "{:?}", loads);
        }

        /// A simulated executor: lanes fail at random; every slice is completed exactly once
        /// on success, and a failure happens only when no lane is left or retries ran out.
        #[test]
        fn simulated_executor(
            lens in prop::collection::vec(1u64..100, 1..120),
            nics in prop::collection::vec(0usize..4, 1..10),
            max_out in 1u32..5,
            retries in 0u32..4,
            fail_pct in 0u32..40,
            seed in any::<u64>(),
            preferred in prop::collection::vec(any::<bool>(), 0..10),
        ) {
            let mut rng = seed | 1;
            let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
            let mut t = Tracker::with_preferred(lens.clone(), &nics, &preferred, max_out, retries);
            let mut flight: Vec<(u32, usize)> = Vec::new();
            let mut completed = vec![0u32; lens.len()];
            let mut dead = vec![false; nics.len()];
            let mut buf = Vec::new();
            for _round in 0..1_000_000 {
                for (lane, &is_dead) in dead.iter().enumerate() {
                    // A budget shared with other posts: sometimes less than wanted.
                    let limit = (next() % (u64::from(max_out) + 1)) as u32;
                    t.take(lane, limit, &mut buf);
                    prop_assert!(buf.len() as u32 <= limit);
                    for &s in &buf {
                        prop_assert!(!is_dead, "posted on a dead lane");
                        flight.push((s, lane));
                    }
                    let on_lane = flight.iter().filter(|f| f.1 == lane).count() as u32;
                    prop_assert!(on_lane <= max_out);
                }
                if flight.is_empty() {
                    if (0..nics.len()).all(|l| t.wants(l) == 0) { break; }
                    continue;
                }
                let k = (next() % flight.len() as u64) as usize;
                let (s, lane) = flight.swap_remove(k);
                if dead[lane] || next() % 100 < u64::from(fail_pct) {
                    dead[lane] = true;
                    t.fail(s, lane, "simulated");
                } else {
                    completed[s as usize] += 1;
                    t.complete(s, lane);
                }
            }
            prop_assert!(flight.is_empty());
            prop_assert_eq!(t.inflight(), 0);
            match t.progress() {
                Progress::Done => prop_assert!(completed.iter().all(|&c| c == 1)),
                Progress::Failed(r) => {
                    prop_assert!(completed.iter().all(|&c| c <= 1));
                    prop_assert!(r.contains("no healthy path") || r.contains("times; last"), "{}", r);
                    prop_assert!(dead.iter().all(|&d| d) || r.contains("times; last"));
                }
                Progress::Running => prop_assert!(false, "stuck running"),
            }
        }
    }
}
