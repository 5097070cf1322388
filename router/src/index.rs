//! [`KvIndex`]: which worker holds which prefix, from the workers' KV events.
//!
//! Block hashes are chained (the sequence hash of a block covers the whole prefix up to it,
//! [`nixl_kv::events::seq_hashes`]), so a node of the prefix tree is named by its sequence
//! hash alone: the tree is a map from sequence hash to a node holding its parent link and the
//! set of workers (a bit set over worker slots) that hold the block. A request's overlap with a
//! worker is the number of its leading blocks the worker holds, walked from the root and
//! stopped at the first block the worker lacks; every worker is walked at once by intersecting
//! bit sets, so the walk stops as soon as no worker is left.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use nixl_kv::events::{KvEvent, KvEventKind, StoredBlock};

/// Default bound on the blocks one worker may hold in the index (blocks beyond it are ignored
/// and counted in [`WorkerInfo::dropped`]).
pub const DEFAULT_MAX_BLOCKS_PER_WORKER: usize = 1 << 24;

/// Hash builder for keys that are already xxh3 hashes: a multiply with a per-index random key
/// (so that a peer cannot aim hashes at one bucket) and a fold of the high half.
#[derive(Clone, Copy, Debug)]
struct Mix(u64);

impl Mix {
    fn random() -> Self {
        Mix(std::collections::hash_map::RandomState::new().hash_one(0x6e69_786cu64) | 1)
    }
}

impl BuildHasher for Mix {
    type Hasher = MixHasher;
    fn build_hasher(&self) -> MixHasher {
        MixHasher { k: self.0, h: 0 }
    }
}

#[derive(Debug)]
struct MixHasher {
    k: u64,
    h: u64,
}

impl Hasher for MixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.h = (self.h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        let x = (v ^ self.k).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.h = x ^ (x >> 32);
    }
    fn finish(&self) -> u64 {
        self.h
    }
}

/// A set of worker slots; the first 64 inline.
#[derive(Clone, Debug, Default)]
struct Bits {
    w0: u64,
    rest: Vec<u64>,
}

impl Bits {
    fn word(&self, j: usize) -> u64 {
        if j == 0 {
            self.w0
        } else {
            self.rest.get(j - 1).copied().unwrap_or(0)
        }
    }
    fn word_mut(&mut self, j: usize) -> &mut u64 {
        if j == 0 {
            &mut self.w0
        } else {
            if self.rest.len() < j {
                self.rest.resize(j, 0);
            }
            &mut self.rest[j - 1]
        }
    }
    fn words(&self) -> usize {
        1 + self.rest.len()
    }
    fn set(&mut self, i: usize) {
        *self.word_mut(i / 64) |= 1 << (i % 64);
    }
    fn unset(&mut self, i: usize) {
        if i / 64 < self.words() {
            *self.word_mut(i / 64) &= !(1 << (i % 64));
        }
    }
    fn is_empty(&self) -> bool {
        self.w0 == 0 && self.rest.iter().all(|&w| w == 0)
    }
}

#[derive(Debug)]
struct Node {
    parent: Option<u64>,
    workers: Bits,
}

#[derive(Debug)]
struct Worker {
    name: Arc<str>,
    blocks: HashSet<u64, Mix>,
    last_id: u64,
    up: bool,
    tokens_per_block: Option<u32>,
    dropped: u64,
}

/// What [`KvIndex::apply`] did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied; the worker's last event id is now the event's.
    Applied,
    /// An id not above the worker's last one: ignored (a repeat, or a worker that restarted:
    /// the caller decides, see [`crate::Follower`]).
    Stale {
        /// The worker's last applied id.
        last_id: u64,
    },
    /// Events between the worker's last id and this one are missing: not applied; the caller
    /// must [`KvIndex::reset`] the worker from its full block list.
    Gap {
        /// The id expected next.
        expected: u64,
    },
}

/// One worker's state in the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its name.
    pub name: String,
    /// Blocks it holds.
    pub blocks: usize,
    /// Id of the last event applied (or of the snapshot it was reset from).
    pub last_id: u64,
    /// False after [`KvIndex::mark_down`] until the next [`KvIndex::reset`].
    pub up: bool,
    /// Tokens per block of its last `stored` event.
    pub tokens_per_block: Option<u32>,
    /// Blocks ignored because it held [`KvIndex::max_blocks_per_worker`] already.
    pub dropped: u64,
}

/// Per-worker overlap of one request: how many of its leading blocks each worker holds.
/// Only workers with at least one block are listed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlaps {
    counts: Vec<(Arc<str>, usize)>,
}

impl Overlaps {
    /// Leading blocks `worker` holds (0 if none or unknown).
    pub fn get(&self, worker: &str) -> usize {
        self.counts
            .iter()
            .find(|(w, _)| &**w == worker)
            .map_or(0, |&(_, n)| n)
    }
    /// `(worker, leading blocks held)` for every worker holding at least one.
    pub fn iter(&self) -> impl Iterator<Item = (&str, usize)> {
        self.counts.iter().map(|(w, n)| (&**w, *n))
    }
    /// The largest overlap (0 if none).
    pub fn max(&self) -> usize {
        self.counts.iter().map(|&(_, n)| n).max().unwrap_or(0)
    }
    /// Number of workers listed.
    pub fn len(&self) -> usize {
        self.counts.len()
    }
    /// True if no worker holds the first block.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// The prefix index of every worker's cached blocks. Not synchronized: share it as a
/// [`SharedIndex`].
#[derive(Debug)]
pub struct KvIndex {
    nodes: HashMap<u64, Node, Mix>,
    slots: Vec<Option<Worker>>,
    by_name: HashMap<Arc<str>, usize>,
    live: Bits,
    max_blocks: usize,
}

/// An index shared between the followers that write it and the router that reads it.
pub type SharedIndex = Arc<parking_lot::RwLock<KvIndex>>;

impl Default for KvIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl KvIndex {
    /// An empty index with [`DEFAULT_MAX_BLOCKS_PER_WORKER`].
    pub fn new() -> Self {
        Self::with_max_blocks_per_worker(DEFAULT_MAX_BLOCKS_PER_WORKER)
    }

    /// An empty index holding at most `max` blocks per worker.
    pub fn with_max_blocks_per_worker(max: usize) -> Self {
        KvIndex {
            nodes: HashMap::with_hasher(Mix::random()),
            slots: Vec::new(),
            by_name: HashMap::new(),
            live: Bits::default(),
            max_blocks: max,
        }
    }

    /// Bound on the blocks per worker.
    pub fn max_blocks_per_worker(&self) -> usize {
        self.max_blocks
    }

    /// A new empty index behind a lock.
    pub fn shared() -> SharedIndex {
        Arc::new(parking_lot::RwLock::new(Self::new()))
    }

    fn slot(&mut self, worker: &str) -> usize {
        if let Some(&s) = self.by_name.get(worker) {
            return s;
        }
        let name: Arc<str> = Arc::from(worker);
        let w = Worker {
            name: name.clone(),
            blocks: HashSet::with_hasher(Mix::random()),
            last_id: 0,
            up: true,
            tokens_per_block: None,
            dropped: 0,
        };
        let s = match self.slots.iter().position(Option::is_none) {
            Some(s) => {
                self.slots[s] = Some(w);
                s
            }
            None => {
                self.slots.push(Some(w));
                self.slots.len() - 1
            }
        };
        self.by_name.insert(name, s);
        self.live.set(s);
        s
    }

    fn store(&mut self, s: usize, blocks: &[StoredBlock]) {
        let Some(w) = self.slots[s].as_mut() else {
            return;
        };
        for b in blocks {
            if w.blocks.contains(&b.hash) {
                continue;
            }
            if w.blocks.len() >= self.max_blocks {
                w.dropped += 1;
                continue;
            }
            w.blocks.insert(b.hash);
            self.nodes
                .entry(b.hash)
                .or_insert_with(|| Node {
                    parent: b.parent,
                    workers: Bits::default(),
                })
                .workers
                .set(s);
        }
    }

    fn unstore(nodes: &mut HashMap<u64, Node, Mix>, s: usize, h: u64) {
        if let Some(n) = nodes.get_mut(&h) {
            n.workers.unset(s);
            if n.workers.is_empty() {
                nodes.remove(&h);
            }
        }
    }

    fn clear_slot(&mut self, s: usize) {
        let Some(w) = self.slots[s].as_mut() else {
            return;
        };
        for h in w.blocks.drain() {
            Self::unstore(&mut self.nodes, s, h);
        }
    }

    /// Applies one event of `worker` (known or not: a new worker starts at id 0). Events must
    /// come in id order without holes; see [`Applied`] for what happens otherwise.
    pub fn apply(&mut self, worker: &str, ev: &KvEvent) -> Applied {
        let s = self.slot(worker);
        let last_id = self.slots[s].as_ref().map_or(0, |w| w.last_id);
        if ev.id <= last_id {
            return Applied::Stale { last_id };
        }
        if ev.id != last_id + 1 {
            return Applied::Gap {
                expected: last_id + 1,
            };
        }
        match &ev.kind {
            KvEventKind::Stored {
                blocks,
                tokens_per_block,
            } => {
                if let Some(w) = self.slots[s].as_mut() {
                    w.tokens_per_block = Some(*tokens_per_block);
                }
                self.store(s, blocks);
            }
            KvEventKind::Removed { hashes } => {
                if let Some(w) = self.slots[s].as_mut() {
                    for h in hashes {
                        if w.blocks.remove(h) {
                            Self::unstore(&mut self.nodes, s, *h);
                        }
                    }
                }
            }
            KvEventKind::Cleared => self.clear_slot(s),
        }
        if let Some(w) = self.slots[s].as_mut() {
            w.last_id = ev.id;
        }
        Applied::Applied
    }

    /// Replaces everything known of `worker` by `blocks` (its full list, as of event
    /// `last_id`), and marks it up.
    pub fn reset(&mut self, worker: &str, last_id: u64, blocks: &[StoredBlock]) {
        let s = self.slot(worker);
        self.clear_slot(s);
        self.store(s, blocks);
        if let Some(w) = self.slots[s].as_mut() {
            w.last_id = last_id;
            w.up = true;
        }
    }

    /// Drops every block of `worker` (keeps its last event id).
    pub fn clear(&mut self, worker: &str) {
        if let Some(&s) = self.by_name.get(worker) {
            self.clear_slot(s);
        }
    }

    /// Marks `worker` down (unreachable): its blocks are dropped, so it gets no overlap, until
    /// the next [`KvIndex::reset`].
    pub fn mark_down(&mut self, worker: &str) {
        let s = self.slot(worker);
        self.clear_slot(s);
        if let Some(w) = self.slots[s].as_mut() {
            w.up = false;
        }
    }

    /// Forgets `worker` entirely.
    pub fn remove_worker(&mut self, worker: &str) {
        if let Some(s) = self.by_name.remove(worker) {
            self.clear_slot(s);
            self.slots[s] = None;
            self.live.unset(s);
        }
    }

    /// State of `worker`, if known.
    pub fn worker(&self, worker: &str) -> Option<WorkerInfo> {
        let s = *self.by_name.get(worker)?;
        let w = self.slots[s].as_ref()?;
        Some(WorkerInfo {
            name: w.name.to_string(),
            blocks: w.blocks.len(),
            last_id: w.last_id,
            up: w.up,
            tokens_per_block: w.tokens_per_block,
            dropped: w.dropped,
        })
    }

    /// Every known worker, in slot order.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.slots
            .iter()
            .flatten()
            .filter_map(|w| self.worker(&w.name))
            .collect()
    }

    /// True if `worker` holds the block of sequence hash `hash`.
    pub fn holds(&self, worker: &str, hash: u64) -> bool {
        self.by_name
            .get(worker)
            .and_then(|&s| self.slots[s].as_ref())
            .is_some_and(|w| w.blocks.contains(&hash))
    }

    /// Parent link of a block some worker holds (`Some(None)` for a first block).
    pub fn parent(&self, hash: u64) -> Option<Option<u64>> {
        self.nodes.get(&hash).map(|n| n.parent)
    }

    /// Distinct blocks held by any worker.
    pub fn distinct_blocks(&self) -> usize {
        self.nodes.len()
    }

    /// For each worker, how many leading blocks of the request (its sequence hashes, in order)
    /// it holds: a prefix match that stops at the first block the worker lacks.
    pub fn overlap(&self, hashes: &[u64]) -> Overlaps {
        let mut active = self.live.clone();
        let mut counts = Vec::new();
        let words = active.words();
        let mut depth = 0;
        for &h in hashes {
            let Some(node) = self.nodes.get(&h) else {
                break;
            };
            let mut any = false;
            for j in 0..words {
                let a = active.word(j);
                let kept = a & node.workers.word(j);
                let mut lost = a & !kept;
                while depth > 0 && lost != 0 {
                    let s = j * 64 + lost.trailing_zeros() as usize;
                    lost &= lost - 1;
                    if let Some(w) = self.slots.get(s).and_then(Option::as_ref) {
                        counts.push((w.name.clone(), depth));
                    }
                }
                *active.word_mut(j) = kept;
                any |= kept != 0;
            }
            depth += 1;
            if !any {
                break;
            }
        }
        if depth > 0 {
            for j in 0..words {
                let mut left = active.word(j);
                while left != 0 {
                    let s = j * 64 + left.trailing_zeros() as usize;
                    left &= left - 1;
                    if let Some(w) = self.slots.get(s).and_then(Option::as_ref) {
                        counts.push((w.name.clone(), depth));
                    }
                }
            }
        }
        Overlaps { counts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixl_kv::events::seq_hashes;

    /// Sequence hashes of `n` blocks of 4 tokens from token `start` (distinct starts give
    /// distinct prefixes).
    pub(crate) fn chain(start: u32, n: usize) -> Vec<u64> {
        let t: Vec<u32> = (start..start + 4 * n as u32).collect();
        seq_hashes(&t, 4)
    }

    pub(crate) fn stored(id: u64, h: &[u64]) -> KvEvent {
        KvEvent {
            id,
            kind: KvEventKind::Stored {
                blocks: h
                    .iter()
                    .enumerate()
                    .map(|(i, &hash)| StoredBlock {
                        hash,
                        parent: i.checked_sub(1).map(|p| h[p]),
                    })
                    .collect(),
                tokens_per_block: 4,
            },
        }
    }

    #[test]
    fn insert_and_prefix_overlap() {
        let mut idx = KvIndex::new();
        let a = chain(0, 10);
        assert_eq!(idx.apply("w0", &stored(1, &a[..6])), Applied::Applied);
        assert_eq!(idx.apply("w1", &stored(1, &a[..3])), Applied::Applied);
        // w2 holds blocks 0..2 and 4..8 but not 2,3: its prefix match stops at block 2.
        idx.apply("w2", &stored(1, &a[..2]));
        idx.apply("w2", &stored(2, &a[4..8]));
        let ov = idx.overlap(&a);
        assert_eq!(ov.get("w0"), 6);
        assert_eq!(ov.get("w1"), 3);
        assert_eq!(ov.get("w2"), 2);
        assert_eq!(ov.get("nobody"), 0);
        assert_eq!(ov.max(), 6);
        assert_eq!(ov.len(), 3);
        // Another prompt shares nothing.
        assert!(idx.overlap(&chain(1000, 5)).is_empty());
        // A request shorter than what is held.
        assert_eq!(idx.overlap(&a[..2]).get("w0"), 2);
        assert!(idx.overlap(&[]).is_empty());
        assert_eq!(idx.parent(a[3]), Some(Some(a[2])));
        assert_eq!(idx.parent(a[0]), Some(None));
        assert_eq!(idx.distinct_blocks(), 8);
        let w = idx.worker("w2").unwrap();
        assert_eq!((w.blocks, w.last_id, w.tokens_per_block), (6, 2, Some(4)));
    }

    #[test]
    fn remove_and_clear() {
        let mut idx = KvIndex::new();
        let a = chain(0, 8);
        idx.apply("w0", &stored(1, &a));
        idx.apply("w1", &stored(1, &a));
        let rm = KvEvent {
            id: 2,
            kind: KvEventKind::Removed {
                hashes: vec![a[5], a[5], 12345],
            },
        };
        assert_eq!(idx.apply("w0", &rm), Applied::Applied);
        let ov = idx.overlap(&a);
        assert_eq!((ov.get("w0"), ov.get("w1")), (5, 8));
        assert!(!idx.holds("w0", a[5]) && idx.holds("w1", a[5]));
        // A cleared event drops all of w1's blocks; nodes only w1 held go.
        let cl = KvEvent {
            id: 2,
            kind: KvEventKind::Cleared,
        };
        assert_eq!(idx.apply("w1", &cl), Applied::Applied);
        let ov = idx.overlap(&a);
        assert_eq!((ov.get("w0"), ov.get("w1")), (5, 0));
        assert_eq!(idx.distinct_blocks(), 7);
        idx.clear("w0");
        assert_eq!(idx.distinct_blocks(), 0);
        assert_eq!(idx.worker("w0").unwrap().last_id, 2);
        // Removing a worker frees its slot for the next one, which starts empty.
        idx.apply("w0", &stored(3, &a));
        idx.remove_worker("w0");
        assert!(idx.worker("w0").is_none());
        assert_eq!(idx.distinct_blocks(), 0);
        idx.apply("w9", &stored(1, &a[..1]));
        assert_eq!(idx.overlap(&a).get("w9"), 1);
        assert_eq!(idx.workers().len(), 2);
    }

    #[test]
    fn gaps_and_stale_ids_are_not_applied() {
        let mut idx = KvIndex::new();
        let a = chain(0, 4);
        assert_eq!(
            idx.apply("w0", &stored(3, &a)),
            Applied::Gap { expected: 1 }
        );
        assert!(idx.overlap(&a).is_empty());
        idx.apply("w0", &stored(1, &a[..1]));
        assert_eq!(
            idx.apply("w0", &stored(1, &a)),
            Applied::Stale { last_id: 1 }
        );
        assert_eq!(idx.overlap(&a).get("w0"), 1);
        // Reset from a snapshot: last id and blocks replaced.
        let snap = match stored(0, &a[..3]).kind {
            KvEventKind::Stored { blocks, .. } => blocks,
            _ => unreachable!(),
        };
        idx.reset("w0", 40, &snap);
        assert_eq!(idx.overlap(&a).get("w0"), 3);
        assert_eq!(idx.apply("w0", &stored(41, &a)), Applied::Applied);
        assert_eq!(idx.overlap(&a).get("w0"), 4);
        idx.mark_down("w0");
        assert!(idx.overlap(&a).is_empty());
        assert!(!idx.worker("w0").unwrap().up);
        idx.reset("w0", 41, &snap);
        assert!(idx.worker("w0").unwrap().up);
    }

    #[test]
    fn many_workers_beyond_one_word() {
        let mut idx = KvIndex::new();
        let a = chain(0, 200);
        for w in 0..150usize {
            idx.apply(&format!("w{w}"), &stored(1, &a[..w + 1]));
        }
        let ov = idx.overlap(&a);
        assert_eq!(ov.len(), 150);
        for w in 0..150usize {
            assert_eq!(ov.get(&format!("w{w}")), w + 1, "w{w}");
        }
        idx.remove_worker("w70");
        assert_eq!(idx.overlap(&a).get("w70"), 0);
        assert_eq!(idx.overlap(&a).get("w149"), 150);
    }

    #[test]
    fn per_worker_bound() {
        let mut idx = KvIndex::with_max_blocks_per_worker(3);
        let a = chain(0, 5);
        idx.apply("w0", &stored(1, &a));
        let w = idx.worker("w0").unwrap();
        assert_eq!((w.blocks, w.dropped), (3, 2));
        assert_eq!(idx.overlap(&a).get("w0"), 3);
    }
}
