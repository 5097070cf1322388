//! [`Router`]: picks a worker for a request by KV overlap and load (Dynamo's cost), or
//! round-robin, or at random.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::index::{KvIndex, Overlaps, SharedIndex};
use crate::wire::WorkerLoad;

/// How a [`Router`] picks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Lowest [`cost`]: blocks left to prefill after the overlap × `overlap_weight` + the
    /// worker's decode load (Dynamo's KV router; weight 1 is Dynamo's default, 0 ignores the
    /// cache and balances load only).
    KvAware {
        /// Weight of the prefill blocks.
        overlap_weight: f64,
    },
    /// Candidates in turn.
    RoundRobin,
    /// A candidate drawn uniformly (seeded: [`Router::with_seed`]).
    Random,
}

impl Mode {
    /// Parses `kv`, `kv:WEIGHT`, `round-robin` (or `rr`), `random`.
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "kv" | "kv-aware" => Ok(Mode::KvAware {
                overlap_weight: 1.0,
            }),
            "round-robin" | "round_robin" | "rr" => Ok(Mode::RoundRobin),
            "random" => Ok(Mode::Random),
            _ => match s.strip_prefix("kv:") {
                Some(w) => match w.parse::<f64>() {
                    Ok(w) if w.is_finite() && w >= 0.0 => Ok(Mode::KvAware { overlap_weight: w }),
                    _ => Err(format!("bad overlap weight {w:?} (a number >= 0)")),
                },
                None => Err(format!(
                    "unknown router mode {s:?} (kv, kv:WEIGHT, round-robin, random)"
                )),
            },
        }
    }
}

/// The router's pick.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The worker.
    pub worker: String,
    /// Leading blocks of the request it holds.
    pub overlap_blocks: usize,
    /// Its cost (0 in the round-robin and random modes).
    pub cost: f64,
}

/// Dynamo's cost of placing a request of `request_blocks` blocks on a worker holding
/// `overlap_blocks` of them, whose decode load is `active_blocks`:
/// `overlap_weight × prefill_blocks + decode_blocks`, where `prefill_blocks` = request blocks
/// − overlap, and `decode_blocks` = the worker's active blocks + the blocks this request adds
/// (its prefill blocks), Dynamo's "potential active blocks". Lower is better.
pub fn cost(
    overlap_weight: f64,
    request_blocks: usize,
    overlap_blocks: usize,
    active_blocks: u64,
) -> f64 {
    let prefill = request_blocks.saturating_sub(overlap_blocks) as f64;
    overlap_weight * prefill + (active_blocks as f64 + prefill)
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LoadState {
    polled: WorkerLoad,
    booked_requests: u64,
    booked_blocks: u64,
}

impl LoadState {
    fn effective(&self) -> WorkerLoad {
        WorkerLoad {
            active_requests: self.polled.active_requests.max(self.booked_requests),
            active_blocks: self.polled.active_blocks.max(self.booked_blocks),
            total_blocks: self.polled.total_blocks,
        }
    }
}

pub(crate) type Loads = Arc<Mutex<HashMap<String, LoadState>>>;

pub(crate) fn set_polled(loads: &Loads, worker: &str, load: WorkerLoad) {
    loads.lock().entry(worker.to_string()).or_default().polled = load;
}

pub(crate) fn clear_polled(loads: &Loads, worker: &str) {
    if let Some(l) = loads.lock().get_mut(worker) {
        l.polled = WorkerLoad::default();
    }
}

/// A request placed on a worker: counted in the worker's load until dropped.
#[derive(Debug)]
pub struct Booking {
    loads: Loads,
    worker: String,
    blocks: u64,
}

impl Booking {
    /// The worker.
    pub fn worker(&self) -> &str {
        &self.worker
    }
    /// Changes the blocks this request holds (decode grows it).
    pub fn set_blocks(&mut self, blocks: u64) {
        let mut l = self.loads.lock();
        let st = l.entry(self.worker.clone()).or_default();
        st.booked_blocks = st.booked_blocks.saturating_sub(self.blocks) + blocks;
        self.blocks = blocks;
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        let mut l = self.loads.lock();
        if let Some(st) = l.get_mut(&self.worker) {
            st.booked_requests = st.booked_requests.saturating_sub(1);
            st.booked_blocks = st.booked_blocks.saturating_sub(self.blocks);
        }
    }
}

/// Picks workers for requests. Cheap to share (`Arc<Router>`); every method takes `&self`.
///
/// A worker's load is the larger of what it last reported (`/load`, polled by its follower or
/// set with [`Router::set_load`]) and what this router booked on it ([`Router::book`]).
///
/// ```
/// use nixl_router::{Mode, Router};
/// use nixl_kv::events::{seq_hashes, KvEvent, KvEventKind, StoredBlock};
/// let r = Router::new(Mode::KvAware { overlap_weight: 1.0 });
/// let prompt: Vec<u32> = (0..64).collect();
/// let h = seq_hashes(&prompt, 16);
/// let blocks = h.iter().enumerate()
///     .map(|(i, &hash)| StoredBlock { hash, parent: i.checked_sub(1).map(|p| h[p]) })
///     .collect();
/// r.index().write().apply("w1", &KvEvent { id: 1, kind: KvEventKind::Stored { blocks, tokens_per_block: 16 } });
/// let c = r.choose(&h, &["w0", "w1"]).unwrap();
/// assert_eq!((c.worker.as_str(), c.overlap_blocks), ("w1", 4));
/// ```
#[derive(Debug)]
pub struct Router {
    mode: Mode,
    index: SharedIndex,
    loads: Loads,
    rr: AtomicUsize,
    rng: Mutex<u64>,
}

impl Router {
    /// A router with a new empty index.
    pub fn new(mode: Mode) -> Self {
        Self::with_index(mode, KvIndex::shared())
    }

    /// A router over an existing index.
    pub fn with_index(mode: Mode, index: SharedIndex) -> Self {
        Router {
            mode,
            index,
            loads: Arc::default(),
            rr: AtomicUsize::new(0),
            rng: Mutex::new(0x853c_49e6_748f_ea9b),
        }
    }

    /// Seeds the random mode (same seed, same picks).
    pub fn with_seed(self, seed: u64) -> Self {
        *self.rng.lock() = seed;
        self
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The index the followers feed.
    pub fn index(&self) -> &SharedIndex {
        &self.index
    }

    pub(crate) fn loads(&self) -> &Loads {
        &self.loads
    }

    /// Sets what `worker` last reported as its load.
    pub fn set_load(&self, worker: &str, load: WorkerLoad) {
        set_polled(&self.loads, worker, load);
    }

    /// The load the router counts for `worker` (see [`Router`]).
    pub fn load(&self, worker: &str) -> WorkerLoad {
        self.loads
            .lock()
            .get(worker)
            .map(LoadState::effective)
            .unwrap_or_default()
    }

    /// Counts a request of `blocks` blocks on `worker` until the booking is dropped.
    pub fn book(&self, worker: &str, blocks: u64) -> Booking {
        let mut l = self.loads.lock();
        let st = l.entry(worker.to_string()).or_default();
        st.booked_requests += 1;
        st.booked_blocks += blocks;
        Booking {
            loads: self.loads.clone(),
            worker: worker.to_string(),
            blocks,
        }
    }

    /// Forgets `worker`'s load and its blocks in the index.
    pub fn remove_worker(&self, worker: &str) {
        self.loads.lock().remove(worker);
        self.index.write().remove_worker(worker);
    }

    /// Overlap of the request (its block sequence hashes) with every worker.
    pub fn overlaps(&self, hashes: &[u64]) -> Overlaps {
        self.index.read().overlap(hashes)
    }

    fn next_rr(&self, n: usize) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed) % n
    }

    fn next_random(&self, n: usize) -> usize {
        let z = splitmix64(&mut self.rng.lock());
        ((u128::from(z) * n as u128) >> 64) as usize
    }

    /// Picks the worker for a whole request (aggregated serving), or its prefill worker: in
    /// the KV-aware mode the candidate of lowest [`cost`]; ties go to the larger overlap, then
    /// the fewer active requests, then the smaller name. Candidates whose reported free blocks
    /// (`total_blocks` − active blocks) cannot hold the request's new blocks come after all
    /// that can. `None` if `candidates` is empty.
    pub fn choose<S: AsRef<str>>(&self, hashes: &[u64], candidates: &[S]) -> Option<Choice> {
        let weight = match self.mode {
            Mode::KvAware { overlap_weight } => overlap_weight,
            _ => return self.choose_blind(hashes, candidates),
        };
        let ov = self.overlaps(hashes);
        let loads = self.loads.lock();
        let mut best: Option<Key> = None;
        for c in candidates {
            let name = c.as_ref();
            let o = ov.get(name);
            let load = loads
                .get(name)
                .map(LoadState::effective)
                .unwrap_or_default();
            let k = Key {
                overfull: overfull(&load, hashes.len().saturating_sub(o)),
                cost: cost(weight, hashes.len(), o, load.active_blocks),
                overlap: o,
                requests: load.active_requests,
                name,
            };
            if best.as_ref().is_none_or(|b| k.better(b)) {
                best = Some(k);
            }
        }
        best.map(|k| Choice {
            worker: k.name.to_string(),
            overlap_blocks: k.overlap,
            cost: k.cost,
        })
    }

    /// The prefill worker of a disaggregated request: by overlap and load, as [`Router::choose`].
    pub fn choose_prefill<S: AsRef<str>>(
        &self,
        hashes: &[u64],
        candidates: &[S],
    ) -> Option<Choice> {
        self.choose(hashes, candidates)
    }

    /// The decode worker of a disaggregated request (its KV comes from the prefill worker, so
    /// overlap does not matter): in the KV-aware mode the candidate of least decode load, its
    /// active blocks + the request's blocks (reported as the cost); ties go to the fewer
    /// active requests, then the smaller name; candidates without room for the request's
    /// blocks come last.
    pub fn choose_decode<S: AsRef<str>>(&self, hashes: &[u64], candidates: &[S]) -> Option<Choice> {
        if !matches!(self.mode, Mode::KvAware { .. }) {
            return self.choose_blind(hashes, candidates);
        }
        let loads = self.loads.lock();
        let mut best: Option<Key> = None;
        for c in candidates {
            let name = c.as_ref();
            let load = loads
                .get(name)
                .map(LoadState::effective)
                .unwrap_or_default();
            let k = Key {
                overfull: overfull(&load, hashes.len()),
                cost: load.active_blocks as f64 + hashes.len() as f64,
                overlap: 0,
                requests: load.active_requests,
                name,
            };
            if best.as_ref().is_none_or(|b| k.better(b)) {
                best = Some(k);
            }
        }
        drop(loads);
        let k = best?;
        Some(Choice {
            worker: k.name.to_string(),
            overlap_blocks: self.overlaps(hashes).get(k.name),
            cost: k.cost,
        })
    }

    fn choose_blind<S: AsRef<str>>(&self, hashes: &[u64], candidates: &[S]) -> Option<Choice> {
        if candidates.is_empty() {
            return None;
        }
        let i = match self.mode {
            Mode::Random => self.next_random(candidates.len()),
            _ => self.next_rr(candidates.len()),
        };
        let name = candidates[i].as_ref();
        Some(Choice {
            worker: name.to_string(),
            overlap_blocks: self.overlaps(hashes).get(name),
            cost: 0.0,
        })
    }
}

/// splitmix64: the next value of a small seeded generator (the random mode's, and the load
/// generator's), the same on every machine.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// True if `load` says the worker has fewer free blocks than `new_blocks` (never when it
/// reports no total).
fn overfull(load: &WorkerLoad, new_blocks: usize) -> bool {
    load.total_blocks > 0
        && load.active_blocks.saturating_add(new_blocks as u64) > load.total_blocks
}

/// Ranking of a candidate: those with room first, then lower cost, larger overlap, fewer
/// active requests, smaller name.
struct Key<'a> {
    overfull: bool,
    cost: f64,
    overlap: usize,
    requests: u64,
    name: &'a str,
}

impl Key<'_> {
    fn better(&self, b: &Key<'_>) -> bool {
        self.overfull
            .cmp(&b.overfull)
            .then(self.cost.total_cmp(&b.cost))
            .then(b.overlap.cmp(&self.overlap))
            .then(self.requests.cmp(&b.requests))
            .then(self.name.cmp(b.name))
            .is_lt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixl_kv::events::{KvEvent, KvEventKind, StoredBlock};
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn store(r: &Router, w: &str, h: &[u64]) {
        let mut idx = r.index().write();
        let id = idx.worker(w).map_or(0, |i| i.last_id) + 1;
        let blocks = h
            .iter()
            .map(|&hash| StoredBlock { hash, parent: None })
            .collect();
        idx.apply(
            w,
            &KvEvent {
                id,
                kind: KvEventKind::Stored {
                    blocks,
                    tokens_per_block: 16,
                },
            },
        );
    }

    #[test]
    fn parse_modes() {
        assert_eq!(
            Mode::parse("kv").unwrap(),
            Mode::KvAware {
                overlap_weight: 1.0
            }
        );
        assert_eq!(
            Mode::parse("kv:2.5").unwrap(),
            Mode::KvAware {
                overlap_weight: 2.5
            }
        );
        assert_eq!(Mode::parse("round-robin").unwrap(), Mode::RoundRobin);
        assert_eq!(Mode::parse("random").unwrap(), Mode::Random);
        for bad in ["", "kv:", "kv:-1", "kv:nan", "kv:inf", "fastest"] {
            assert!(Mode::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlap_against_load() {
        let r = Router::new(Mode::KvAware {
            overlap_weight: 1.0,
        });
        let h: Vec<u64> = (1..=10).collect();
        store(&r, "a", &h[..8]);
        // a: 2 prefill blocks; b: 10. Costs: a = 2 + (load_a + 2), b = 10 + (0 + 10).
        let c = r.choose(&h, &["a", "b"]).unwrap();
        assert_eq!((c.worker.as_str(), c.overlap_blocks, c.cost), ("a", 8, 4.0));
        // a busy with 16 active blocks: 2 + 18 = 20 ties b's 20; the tie goes to the overlap.
        r.set_load(
            "a",
            WorkerLoad {
                active_requests: 1,
                active_blocks: 16,
                total_blocks: 100,
            },
        );
        assert_eq!(r.choose(&h, &["b", "a"]).unwrap().worker, "a");
        // One more block of load and b wins.
        let _bk = r.book("a", 17);
        assert_eq!(r.load("a").active_blocks, 17);
        let c = r.choose(&h, &["a", "b"]).unwrap();
        assert_eq!((c.worker.as_str(), c.cost), ("b", 20.0));
        drop(_bk);
        assert_eq!(r.load("a").active_blocks, 16);
        // Weight 0: load only; b (idle) wins even without overlap.
        let r0 = Router::with_index(
            Mode::KvAware {
                overlap_weight: 0.0,
            },
            r.index().clone(),
        );
        r0.set_load(
            "a",
            WorkerLoad {
                active_requests: 1,
                active_blocks: 9,
                total_blocks: 100,
            },
        );
        assert_eq!(r0.choose(&h, &["a", "b"]).unwrap().worker, "b");
        assert!(r.choose::<&str>(&h, &[]).is_none());
    }

    #[test]
    fn workers_without_room_come_last() {
        let r = Router::new(Mode::KvAware {
            overlap_weight: 1.0,
        });
        let h: Vec<u64> = (1..=10).collect();
        store(&r, "a", &h[..8]);
        let load = |active, total| WorkerLoad {
            active_requests: 1,
            active_blocks: active,
            total_blocks: total,
        };
        // a: cheapest (2 new blocks), but only 1 free block; b: 10 new blocks, 10 free.
        r.set_load("a", load(15, 16));
        r.set_load("b", load(30, 40));
        let c = r.choose(&h, &["a", "b"]).unwrap();
        assert_eq!((c.worker.as_str(), c.cost), ("b", 50.0));
        // a has exactly the room it needs: back to the cost.
        r.set_load("a", load(14, 16));
        assert_eq!(r.choose(&h, &["a", "b"]).unwrap().worker, "a");
        // Nobody has room: still the cheapest, never none.
        r.set_load("b", load(39, 40));
        r.set_load("a", load(15, 16));
        assert_eq!(r.choose(&h, &["a", "b"]).unwrap().worker, "a");
        // Decode: the request needs all 10 blocks.
        r.set_load("d0", load(0, 9));
        r.set_load("d1", load(20, 100));
        assert_eq!(r.choose_decode(&h, &["d0", "d1"]).unwrap().worker, "d1");
    }

    #[test]
    fn decode_by_load_and_blind_modes() {
        let r = Router::new(Mode::KvAware {
            overlap_weight: 1.0,
        });
        let h: Vec<u64> = (1..=4).collect();
        store(&r, "d0", &h);
        let _b = r.book("d0", 3);
        let c = r.choose_decode(&h, &["d0", "d1"]).unwrap();
        assert_eq!((c.worker.as_str(), c.cost), ("d1", 4.0));
        // Prefill prefers the overlap (cost d0 = 0 + 3, d1 = 4 + 4).
        assert_eq!(r.choose_prefill(&h, &["d0", "d1"]).unwrap().worker, "d0");

        let rr = Router::with_index(Mode::RoundRobin, r.index().clone());
        let picks: Vec<String> = (0..5)
            .map(|_| rr.choose(&h, &["x", "d0", "z"]).unwrap().worker)
            .collect();
        assert_eq!(picks, ["x", "d0", "z", "x", "d0"]);
        assert_eq!(rr.choose(&h, &["d0"]).unwrap().overlap_blocks, 4);

        let pick = |seed| {
            let r = Router::new(Mode::Random).with_seed(seed);
            (0..64)
                .map(|_| r.choose_decode(&h, &["a", "b", "c"]).unwrap().worker)
                .collect::<Vec<_>>()
        };
        let p = pick(7);
        assert_eq!(p, pick(7), "same seed, same picks");
        let seen: HashSet<&String> = p.iter().collect();
        assert_eq!(seen.len(), 3, "{p:?}");
    }

    /// Brute-force model: per-worker sets of hashes, prefix count by scanning, cost by the
    /// formula, minimum by sorting on the full key.
    fn model(
        held: &[Vec<u64>],
        loads: &[(u64, u64, u64)],
        req: &[u64],
        weight: f64,
    ) -> (String, usize, f64) {
        let mut rows: Vec<(bool, f64, usize, u64, String)> = held
            .iter()
            .enumerate()
            .map(|(w, set)| {
                let set: HashSet<u64> = set.iter().copied().collect();
                let o = req.iter().take_while(|h| set.contains(h)).count();
                let prefill = (req.len() - o) as f64;
                let c = weight * prefill + loads[w].1 as f64 + prefill;
                let (total, active) = (loads[w].2, loads[w].1);
                let full = total != 0 && active + (req.len() - o) as u64 > total;
                (full, c, o, loads[w].0, format!("w{w:02}"))
            })
            .collect();
        rows.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then(a.1.partial_cmp(&b.1).unwrap())
                .then(b.2.cmp(&a.2))
                .then(a.3.cmp(&b.3))
                .then(a.4.cmp(&b.4))
        });
        let (_, c, o, _, w) = rows.swap_remove(0);
        (w, o, c)
    }

    proptest! {
        #[test]
        fn choice_matches_brute_force(
            held in prop::collection::vec(prop::collection::vec(0u64..24, 0..24), 1..10),
            loads in prop::collection::vec((0u64..4, 0u64..30, prop::sample::select(vec![0u64, 20, 40, 64])), 10),
            req in prop::collection::vec(0u64..24, 0..16),
            weight in prop::sample::select(vec![0.0, 0.5, 1.0, 2.0, 7.25]),
        ) {
            let r = Router::new(Mode::KvAware { overlap_weight: weight });
            let names: Vec<String> = (0..held.len()).map(|w| format!("w{w:02}")).collect();
            for (w, h) in held.iter().enumerate() {
                store(&r, &names[w], h);
                r.set_load(&names[w], WorkerLoad {
                    active_requests: loads[w].0, active_blocks: loads[w].1, total_blocks: loads[w].2 });
            }
            let c = r.choose(&req, &names).unwrap();
            let (w, o, cost) = model(&held, &loads, &req, weight);
            prop_assert_eq!((c.worker, c.overlap_blocks, c.cost), (w, o, cost));
            // The overlap of every worker matches the model's prefix count too.
            let ov = r.overlaps(&req);
            for (w, h) in held.iter().enumerate() {
                let set: HashSet<u64> = h.iter().copied().collect();
                prop_assert_eq!(ov.get(&names[w]), req.iter().take_while(|x| set.contains(x)).count());
            }
        }
    }
}
