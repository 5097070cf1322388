//! The completion-owner table: what a work request's `wr_id` refers to, found without a global
//! lock or a hash lookup.
//!
//! A `wr_id` is `(token << 24) | index`; the 40-bit token is `(generation << 20) | slot`. The
//! slot indexes a table of fixed-size chunks allocated on first use (so lookups read a chunk
//! pointer with one atomic load and lock only that slot's own mutex); the generation, bumped
//! each time the slot is given out, makes a completion of a previous owner of the slot (a
//! receive flushed after its lane was dropped) a stale one that is ignored. Freed slots are
//! reused first in, first out, so a slot's generation wraps (after 2^20 reuses) only after
//! every other free slot has been reused as often: far longer than a flushed completion takes.

use std::collections::VecDeque;
use std::sync::OnceLock;

use parking_lot::Mutex;

/// Bits of the slot number in a token.
pub(super) const SLOT_BITS: u32 = 20;
/// Bits of the generation in a token.
pub(super) const GEN_BITS: u32 = 20;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;
const CHUNK_BITS: u32 = 10;
const CHUNK: usize = 1 << CHUNK_BITS;
const CHUNKS: usize = 1 << (SLOT_BITS - CHUNK_BITS);
/// Most owners at once.
pub(super) const CAPACITY: usize = 1 << SLOT_BITS;

struct Entry<T> {
    gen: u32,
    val: Option<T>,
}

struct Free {
    queue: VecDeque<u32>,
    /// Slots never handed out start here.
    fresh: u32,
}

/// One chunk of slots, allocated on first use.
type Chunk<T> = Box<[Mutex<Entry<T>>]>;

/// A table of owners addressed by 40-bit tokens.
pub(super) struct Slab<T> {
    chunks: Box<[OnceLock<Chunk<T>>]>,
    free: Mutex<Free>,
}

impl<T> std::fmt::Debug for Slab<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let free = self.free.lock();
        f.debug_struct("Slab")
            .field("slots", &free.fresh)
            .field("free", &free.queue.len())
            .finish()
    }
}

impl<T: Clone> Default for Slab<T> {
    fn default() -> Self {
        Slab::new()
    }
}

impl<T: Clone> Slab<T> {
    /// An empty table (no chunk allocated yet).
    pub(super) fn new() -> Slab<T> {
        Slab {
            chunks: (0..CHUNKS).map(|_| OnceLock::new()).collect(),
            free: Mutex::new(Free {
                queue: VecDeque::new(),
                fresh: 0,
            }),
        }
    }

    fn entry(&self, slot: usize) -> Option<&Mutex<Entry<T>>> {
        self.chunks
            .get(slot >> CHUNK_BITS)?
            .get()
            .map(|c| &c[slot & (CHUNK - 1)])
    }

    /// Stores `val`; returns its token, or `None` when every slot is taken.
    pub(super) fn insert(&self, val: T) -> Option<u64> {
        let slot = {
            let mut f = self.free.lock();
            match f.queue.pop_front() {
                Some(s) => s,
                None if (f.fresh as usize) < CAPACITY => {
                    f.fresh += 1;
                    f.fresh - 1
                }
                None => return None,
            }
        } as usize;
        let chunk = self.chunks[slot >> CHUNK_BITS].get_or_init(|| {
            (0..CHUNK)
                .map(|_| Mutex::new(Entry { gen: 0, val: None }))
                .collect()
        });
        let mut e = chunk[slot & (CHUNK - 1)].lock();
        e.gen = (e.gen + 1) & GEN_MASK;
        e.val = Some(val);
        Some((u64::from(e.gen) << SLOT_BITS) | slot as u64)
    }

    /// The owner of `token`, if it is still the slot's current one.
    pub(super) fn get(&self, token: u64) -> Option<T> {
        let (slot, gen) = split(token);
        let e = self.entry(slot)?.lock();
        if e.gen == gen {
            e.val.clone()
        } else {
            None
        }
    }

    /// Removes the owner of `token` (nothing if it is stale) and frees its slot.
    pub(super) fn remove(&self, token: u64) -> Option<T> {
        let (slot, gen) = split(token);
        let val = {
            let mut e = self.entry(slot)?.lock();
            if e.gen != gen {
                return None;
            }
            e.val.take()
        };
        if val.is_some() {
            self.free.lock().queue.push_back(slot as u32);
        }
        val
    }

    /// Removes every owner (shutdown).
    pub(super) fn drain(&self) -> Vec<T> {
        let mut out = Vec::new();
        for (c, chunk) in self.chunks.iter().enumerate() {
            let Some(chunk) = chunk.get() else { continue };
            for (i, e) in chunk.iter().enumerate() {
                let v = e.lock().val.take();
                if let Some(v) = v {
                    out.push(v);
                    self.free
                        .lock()
                        .queue
                        .push_back(((c << CHUNK_BITS) | i) as u32);
                }
            }
        }
        out
    }
}

fn split(token: u64) -> (usize, u32) {
    (
        (token & SLOT_MASK) as usize,
        ((token >> SLOT_BITS) as u32) & GEN_MASK,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_find_their_owner_and_stale_ones_nothing() {
        let s: Slab<u32> = Slab::new();
        let a = s.insert(1).unwrap();
        let b = s.insert(2).unwrap();
        assert_ne!(a, b);
        assert!(a < 1 << 40 && b < 1 << 40);
        assert_eq!(s.get(a), Some(1));
        assert_eq!(s.get(b), Some(2));
        assert_eq!(s.remove(a), Some(1));
        assert_eq!(s.get(a), None, "removed");
        assert_eq!(s.remove(a), None, "removed twice");
        // Reuse of a's slot (FIFO: the only free one) gets a new generation.
        let c = s.insert(3).unwrap();
        assert_eq!(c & SLOT_MASK, a & SLOT_MASK);
        assert_ne!(c, a);
        assert_eq!(s.get(a), None, "stale token of the slot's previous owner");
        assert_eq!(s.get(c), Some(3));
        // Garbage tokens: a slot never handed out, a chunk never allocated.
        assert_eq!(s.get(7), None);
        assert_eq!(s.get((1 << 40) - 1), None);
        assert_eq!(s.remove((1 << 40) - 1), None);
        let mut all = s.drain();
        all.sort_unstable();
        assert_eq!(all, vec![2, 3]);
        assert_eq!(s.get(b), None);
    }

    #[test]
    fn freed_slots_are_reused_first_in_first_out() {
        let s: Slab<usize> = Slab::new();
        let t: Vec<u64> = (0..3000).map(|i| s.insert(i).unwrap()).collect();
        for (i, &k) in t.iter().enumerate() {
            assert_eq!(s.get(k), Some(i));
        }
        s.remove(t[5]);
        s.remove(t[2000]);
        let x = s.insert(9).unwrap();
        let y = s.insert(10).unwrap();
        assert_eq!(x & SLOT_MASK, t[5] & SLOT_MASK);
        assert_eq!(y & SLOT_MASK, t[2000] & SLOT_MASK);
        // No slot was made beyond the 3000 needed.
        assert_eq!(s.insert(11).unwrap() & SLOT_MASK, 3000);
    }
}
