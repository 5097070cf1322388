//! KV events: what a worker's cache holds, published as `stored` / `removed` / `cleared`
//! events with a monotonic id, so a router can follow it, recover from a gap by asking for the
//! events since an id, and start over from "all blocks you hold".
//!
//! Block hashes follow the scheme of Dynamo's router: the local hash of a block is xxh3-64
//! (seed 1337) of its token ids as little-endian u32; the sequence hash of the first block is
//! its local hash, and of each next block xxh3-64 (seed 1337) of the parent's sequence hash
//! and the block's local hash (both little-endian u64), so equal hashes mean equal prefixes.

use std::collections::{BTreeMap, VecDeque};

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of every hash (Dynamo's).
pub const HASH_SEED: u64 = 1337;

/// Local hash of one block's tokens.
pub fn block_hash(tokens: &[u32]) -> u64 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    xxh3_64_with_seed(&bytes, HASH_SEED)
}

/// Sequence hash of a block whose parent has sequence hash `parent` (`None`: the first block).
pub fn chain(parent: Option<u64>, local: u64) -> u64 {
    match parent {
        None => local,
        Some(p) => {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&p.to_le_bytes());
            b[8..].copy_from_slice(&local.to_le_bytes());
            xxh3_64_with_seed(&b, HASH_SEED)
        }
    }
}

/// Sequence hashes of the full blocks of `tokens` (a partial last block has none).
///
/// ```
/// use nixl_kv::events::{block_hash, chain, seq_hashes};
/// let t: Vec<u32> = (0..40).collect();
/// let h = seq_hashes(&t, 16);
/// assert_eq!(h.len(), 2);
/// assert_eq!(h[0], block_hash(&t[..16]));
/// assert_eq!(h[1], chain(Some(h[0]), block_hash(&t[16..32])));
/// ```
pub fn seq_hashes(tokens: &[u32], tokens_per_block: usize) -> Vec<u64> {
    let mut parent = None;
    tokens
        .chunks_exact(tokens_per_block.max(1))
        .map(|c| {
            let h = chain(parent, block_hash(c));
            parent = Some(h);
            h
        })
        .collect()
}

/// One cached block as events describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredBlock {
    /// Sequence hash.
    pub hash: u64,
    /// Sequence hash of the parent block, `None` for a first block.
    pub parent: Option<u64>,
}

/// What changed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEventKind {
    /// Blocks now held (each with its parent), of `tokens_per_block` tokens.
    Stored {
        /// The blocks, parents first.
        blocks: Vec<StoredBlock>,
        /// Tokens per block.
        tokens_per_block: u32,
    },
    /// Blocks no longer held.
    Removed {
        /// Their sequence hashes.
        hashes: Vec<u64>,
    },
    /// Everything dropped.
    Cleared,
}

/// An event with its id (monotonic per worker, from 1).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvEvent {
    /// Event id.
    pub id: u64,
    /// What changed.
    pub kind: KvEventKind,
}

/// A consumer asked for events the log no longer keeps: it must start over from
/// [`KvEventLog::all_blocks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    /// The oldest event id still kept (events since `oldest - 1` can be answered).
    pub oldest: u64,
}

/// A worker's event log: the blocks it holds and its last `capacity` events.
#[derive(Debug)]
pub struct KvEventLog {
    next: u64,
    capacity: usize,
    events: VecDeque<KvEvent>,
    blocks: BTreeMap<u64, Option<u64>>,
}

impl KvEventLog {
    /// A log keeping the last `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        KvEventLog {
            next: 1,
            capacity: capacity.max(1),
            events: VecDeque::new(),
            blocks: BTreeMap::new(),
        }
    }

    fn push(&mut self, kind: KvEventKind) -> u64 {
        let id = self.next;
        self.next += 1;
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(KvEvent { id, kind });
        id
    }

    /// Records blocks stored; returns the event id.
    pub fn stored(&mut self, blocks: Vec<StoredBlock>, tokens_per_block: u32) -> u64 {
        for b in &blocks {
            self.blocks.insert(b.hash, b.parent);
        }
        self.push(KvEventKind::Stored {
            blocks,
            tokens_per_block,
        })
    }

    /// Records blocks removed; returns the event id.
    pub fn removed(&mut self, hashes: Vec<u64>) -> u64 {
        for h in &hashes {
            self.blocks.remove(h);
        }
        self.push(KvEventKind::Removed { hashes })
    }

    /// Records that everything was dropped; returns the event id.
    pub fn cleared(&mut self) -> u64 {
        self.blocks.clear();
        self.push(KvEventKind::Cleared)
    }

    /// Id of the last event (0 before any).
    pub fn last_id(&self) -> u64 {
        self.next - 1
    }

    /// Events with id greater than `since`, or the [`Gap`] if some are no longer kept.
    pub fn since(&self, since: u64) -> Result<Vec<KvEvent>, Gap> {
        let oldest = self.events.front().map_or(self.next, |e| e.id);
        if since + 1 < oldest {
            return Err(Gap { oldest });
        }
        Ok(self
            .events
            .iter()
            .filter(|e| e.id > since)
            .cloned()
            .collect())
    }

    /// Every block held now, and the id of the last event it reflects.
    pub fn all_blocks(&self) -> (u64, Vec<StoredBlock>) {
        (
            self.last_id(),
            self.blocks
                .iter()
                .map(|(&hash, &parent)| StoredBlock { hash, parent })
                .collect(),
        )
    }
}
