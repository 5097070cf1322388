//! KV events: what a worker's cache holds, published as `stored` / `removed` / `cleared`
//! events with a monotonic id, so a router can follow it, recover from a gap by asking for the
//! events since an id, and start over from "all blocks you hold".
//!
//! Block hashes follow the scheme of Dynamo's router: the local hash of a block is xxh3-64
//! (seed 1337) of its token ids as little-endian u32; the sequence hash of the first block is
//! its local hash, and of each next block xxh3-64 (seed 1337) of the parent's sequence hash
//! and the block's local hash (both little-endian u64), so equal hashes mean equal prefixes.
//!
//! Events, blocks and kinds encode with serde; in JSON a kind is tagged by `type`
//! (`{"id":3,"kind":{"type":"stored","blocks":[{"hash":1,"parent":null}],"tokens_per_block":16}}`).
//! A consumer decoding what a peer sent checks it with [`KvEvent::check`] (bounded block counts).

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

/// Most blocks (or hashes) one event may carry; [`KvEvent::check`] refuses more.
pub const MAX_EVENT_BLOCKS: usize = 1 << 20;

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

impl KvEvent {
    /// Checks an event decoded from a peer: an id from 1, at most `max_blocks` blocks (or
    /// hashes), and tokens per block from 1. Returns the reason otherwise.
    ///
    /// ```
    /// use nixl_kv::events::{KvEvent, KvEventKind, StoredBlock};
    /// let e: KvEvent = serde_json::from_str(
    ///     r#"{"id":1,"kind":{"type":"stored","blocks":[{"hash":7,"parent":null}],"tokens_per_block":16}}"#,
    /// ).unwrap();
    /// assert!(e.check(1).is_ok());
    /// assert_eq!(e.kind, KvEventKind::Stored {
    ///     blocks: vec![StoredBlock { hash: 7, parent: None }], tokens_per_block: 16 });
    /// assert!(e.check(0).is_err());
    /// ```
    pub fn check(&self, max_blocks: usize) -> Result<(), String> {
        if self.id == 0 {
            return Err("event id 0 (ids start at 1)".into());
        }
        let n = match &self.kind {
            KvEventKind::Stored {
                blocks,
                tokens_per_block,
            } => {
                if *tokens_per_block == 0 {
                    return Err(format!("event {}: tokens_per_block 0", self.id));
                }
                blocks.len()
            }
            KvEventKind::Removed { hashes } => hashes.len(),
            KvEventKind::Cleared => 0,
        };
        if n > max_blocks {
            return Err(format!(
                "event {}: {n} blocks, more than the limit {max_blocks}",
                self.id
            ));
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_tags() {
        let mut log = KvEventLog::new(8);
        let h = seq_hashes(&(0..32).collect::<Vec<u32>>(), 16);
        log.stored(
            vec![
                StoredBlock {
                    hash: h[0],
                    parent: None,
                },
                StoredBlock {
                    hash: h[1],
                    parent: Some(h[0]),
                },
            ],
            16,
        );
        log.removed(vec![h[1]]);
        log.cleared();
        let events = log.since(0).unwrap();
        let json = serde_json::to_string(&events).unwrap();
        assert!(json.contains(r#""type":"stored""#), "{json}");
        assert!(json.contains(r#""type":"removed""#), "{json}");
        assert!(json.contains(r#""type":"cleared""#), "{json}");
        // u64 hashes above 2^53 survive.
        assert!(json.contains(&h[0].to_string()), "{json}");
        let back: Vec<KvEvent> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, events);
        for e in &back {
            e.check(2).unwrap();
        }
    }

    #[test]
    fn check_refuses_bad_events() {
        let e = |id, kind| KvEvent { id, kind };
        assert!(e(0, KvEventKind::Cleared).check(10).is_err());
        let stored = KvEventKind::Stored {
            blocks: vec![
                StoredBlock {
                    hash: 1,
                    parent: None
                };
                3
            ],
            tokens_per_block: 16,
        };
        assert!(e(1, stored.clone()).check(3).is_ok());
        assert!(e(1, stored).check(2).is_err());
        let zero_tpb = KvEventKind::Stored {
            blocks: vec![],
            tokens_per_block: 0,
        };
        assert!(e(1, zero_tpb).check(3).is_err());
        let removed = KvEventKind::Removed {
            hashes: vec![1, 2, 3],
        };
        assert!(e(1, removed).check(2).is_err());
        // Unknown tags and missing fields are decode errors, not panics.
        assert!(serde_json::from_str::<KvEvent>(r#"{"id":1,"kind":{"type":"evicted"}}"#).is_err());
        assert!(serde_json::from_str::<KvEvent>(r#"{"id":1,"kind":{"type":"stored"}}"#).is_err());
        assert!(serde_json::from_str::<KvEvent>(r#"{"id":-1,"kind":{"type":"cleared"}}"#).is_err());
    }
}
