//! The KV cache: one registered region per tensor-parallel rank, laid out per
//! [`nixl_kv::KvLayout`] in paged blocks, a block allocator with prefix reuse (blocks keyed by
//! the chained block hashes of [`nixl_kv::events::seq_hashes`]), and the KV event log.
//!
//! Tensor parallelism: "compute in full, KV split by heads". A worker of TP `U` computes every
//! head itself, but rank `r`'s region holds only KV heads `[r·H/U, (r+1)·H/U)`, so the bytes
//! a handoff moves between workers of different TP go through `nixl_kv::plan`'s head mapping
//! for real; the compute gathers each head from the region of the rank that holds it. Block
//! ids are shared by all ranks of a worker (block `b` of every rank region is one logical block).

use std::collections::{BTreeMap, HashMap};

use nixl_core::{Agent, Desc, DescList, MemKind, Registration};
use nixl_kv::events::{KvEventLog, StoredBlock};
use nixl_kv::KvLayout;

use crate::model::KvStore;

/// Owned f32 memory behind a raw pointer (freed on drop).
#[derive(Debug)]
struct Mem {
    ptr: *mut f32,
    len: usize,
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` come from the boxed slice of `KvRegion::new`, freed once here.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

/// One rank's KV region: owned, zeroed, f32-aligned memory registered with the rank's agent.
#[derive(Debug)]
pub struct KvRegion {
    // Fields drop in order: deregistered before the memory goes.
    _reg: Registration,
    mem: Mem,
    /// The layout (its `base` is this region's address).
    pub layout: KvLayout,
}

// SAFETY: the region is plain memory owned by this struct; accesses are raw copies within
// bounds, and the engine orders them against transfers (it never computes on blocks a
// transfer is writing, and only reads blocks a peer may be reading).
unsafe impl Send for KvRegion {}

impl KvRegion {
    /// Allocates the region of `layout` (f32: `dtype_bytes` must be 4) and registers it with
    /// `agent`.
    pub fn new(agent: &Agent, mut layout: KvLayout) -> Result<KvRegion, String> {
        layout.validate().map_err(|e| e.to_string())?;
        if layout.dtype_bytes != 4 {
            return Err("the reference engine keeps KV in f32".into());
        }
        let bytes = layout.region_bytes() as usize;
        let len = bytes / 4;
        let mem = Mem {
            ptr: Box::into_raw(vec![0f32; len].into_boxed_slice()) as *mut f32,
            len,
        };
        layout.base = mem.ptr as u64;
        let list =
            DescList::from_descs(MemKind::Dram, vec![Desc::new(layout.base, bytes as u64, 0)])
                .map_err(|e| e.to_string())?;
        // SAFETY: the memory is owned by the returned region and outlives its registration
        // (the registration is dropped first, see the field order).
        let reg = unsafe { agent.register(&list) }.map_err(|e| e.to_string())?;
        Ok(KvRegion {
            _reg: reg,
            mem,
            layout,
        })
    }

    fn index(&self, off: u64, n: usize) -> usize {
        let i = (off / 4) as usize;
        assert!(i + n <= self.mem.len, "KV offset out of the region");
        i
    }

    /// Copies `src` to byte offset `off`.
    pub fn write(&self, off: u64, src: &[f32]) {
        let i = self.index(off, src.len());
        // SAFETY: in bounds (checked above); `src` is not in the region.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.mem.ptr.add(i), src.len()) }
    }

    /// Copies from byte offset `off` into `dst`.
    pub fn read(&self, off: u64, dst: &mut [f32]) {
        let i = self.index(off, dst.len());
        // SAFETY: in bounds (checked above); `dst` is not in the region.
        unsafe { std::ptr::copy_nonoverlapping(self.mem.ptr.add(i), dst.as_mut_ptr(), dst.len()) }
    }
}

/// A request's view of the cache: its block table over the rank regions (a [`KvStore`]).
#[derive(Debug)]
pub struct Paged<'a> {
    /// Rank regions, rank order.
    pub regions: &'a [KvRegion],
    /// Block of each `tokens_per_block` positions.
    pub table: &'a [u32],
}

impl Paged<'_> {
    fn place(&self, pos: u32, head: u32) -> (&KvRegion, u32, u32, u32) {
        let l0 = &self.regions[0].layout;
        let per = l0.heads();
        let r = &self.regions[(head / per) as usize];
        let tpb = l0.tokens_per_block;
        (r, self.table[(pos / tpb) as usize], head % per, pos % tpb)
    }
}

impl KvStore for Paged<'_> {
    fn write(&mut self, layer: u32, pos: u32, head: u32, k: &[f32], v: &[f32]) {
        let (r, b, h, t) = self.place(pos, head);
        r.write(r.layout.offset(layer, 0, b, h, t), k);
        r.write(r.layout.offset(layer, 1, b, h, t), v);
    }
    fn read(&self, layer: u32, plane: u32, pos: u32, head: u32, out: &mut [f32]) {
        let (r, b, h, t) = self.place(pos, head);
        r.read(r.layout.offset(layer, plane, b, h, t), out);
    }
}

/// The block allocator of a worker, with prefix reuse and KV events.
///
/// A block is in use while its reference count is above zero. A free block that holds a full
/// block of known tokens keeps its hash and stays reusable (least recently freed evicted
/// first, with a `removed` event); free blocks without a hash are handed out first.
#[derive(Debug)]
pub struct Blocks {
    refs: Vec<u32>,
    hash: Vec<Option<u64>>,
    by_hash: HashMap<u64, u32>,
    plain: Vec<u32>,
    cached: BTreeMap<u64, u32>,
    stamp: Vec<u64>,
    clock: u64,
    tokens_per_block: u32,
    used: usize,
}

impl Blocks {
    /// `n` blocks of `tokens_per_block` tokens, all free.
    pub fn new(n: u32, tokens_per_block: u32) -> Blocks {
        Blocks {
            refs: vec![0; n as usize],
            hash: vec![None; n as usize],
            by_hash: HashMap::new(),
            plain: (0..n).rev().collect(),
            cached: BTreeMap::new(),
            stamp: vec![0; n as usize],
            clock: 0,
            tokens_per_block,
            used: 0,
        }
    }

    /// Blocks in use (reference count above zero).
    pub fn used(&self) -> usize {
        self.used
    }

    /// All blocks.
    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that could be handed out now.
    pub fn available(&self) -> usize {
        self.refs.len() - self.used
    }

    /// A free block (evicting the least recently freed cached one if needed, recorded in
    /// `log`), with a reference count of one; `None` if every block is in use.
    pub fn alloc(&mut self, log: &mut KvEventLog) -> Option<u32> {
        let b = match self.plain.pop() {
            Some(b) => b,
            None => {
                let (&k, &b) = self.cached.iter().next()?;
                self.cached.remove(&k);
                if let Some(h) = self.hash[b as usize].take() {
                    self.by_hash.remove(&h);
                    log.removed(vec![h]);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        self.used += 1;
        Some(b)
    }

    /// `n` blocks, or none (and nothing taken) if fewer are available.
    pub fn alloc_n(&mut self, n: usize, log: &mut KvEventLog) -> Option<Vec<u32>> {
        if n > self.available() {
            return None;
        }
        Some((0..n).filter_map(|_| self.alloc(log)).collect())
    }

    fn acquire(&mut self, b: u32) {
        let i = b as usize;
        if self.refs[i] == 0 {
            self.cached.remove(&self.stamp[i]);
            self.used += 1;
        }
        self.refs[i] += 1;
    }

    /// Drops one reference to each block of `blocks`.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let i = b as usize;
            if self.refs[i] == 0 {
                continue;
            }
            self.refs[i] -= 1;
            if self.refs[i] == 0 {
                self.used -= 1;
                if self.hash[i].is_some() {
                    self.clock += 1;
                    self.stamp[i] = self.clock;
                    self.cached.insert(self.clock, b);
                } else {
                    self.plain.push(b);
                }
            }
        }
    }

    /// The longest run of cached blocks matching `hashes` from the first, each acquired.
    pub fn lookup(&mut self, hashes: &[u64]) -> Vec<u32> {
        let mut out = Vec::new();
        for h in hashes {
            match self.by_hash.get(h) {
                Some(&b) => out.push(b),
                None => break,
            }
        }
        for &b in &out {
            self.acquire(b);
        }
        out
    }

    /// Records that blocks `blocks[i]` hold the full blocks of sequence hashes `hashes[i]`
    /// (parents first); one `stored` event for those not cached yet.
    pub fn commit(&mut self, blocks: &[u32], hashes: &[u64], log: &mut KvEventLog) {
        let mut stored = Vec::new();
        for (i, (&b, &h)) in blocks.iter().zip(hashes).enumerate() {
            if self.hash[b as usize].is_some() || self.by_hash.contains_key(&h) {
                continue;
            }
            self.hash[b as usize] = Some(h);
            self.by_hash.insert(h, b);
            stored.push(StoredBlock {
                hash: h,
                parent: (i > 0).then(|| hashes[i - 1]),
            });
        }
        if !stored.is_empty() {
            log.stored(stored, self.tokens_per_block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixl_kv::events::{seq_hashes, KvEventKind};

    #[test]
    fn alloc_release_and_exhaustion() {
        let mut log = KvEventLog::new(16);
        let mut b = Blocks::new(4, 2);
        let x = b.alloc_n(3, &mut log).unwrap();
        assert_eq!((b.used(), b.available()), (3, 1));
        assert!(b.alloc_n(2, &mut log).is_none(), "all or nothing");
        assert_eq!(b.used(), 3);
        b.release(&x);
        b.release(&x); // a second release of a free block is ignored
        assert_eq!(b.used(), 0);
        assert_eq!(b.alloc_n(4, &mut log).unwrap().len(), 4);
        assert!(b.alloc(&mut log).is_none());
        assert_eq!(log.last_id(), 0, "no events without hashes");
    }

    #[test]
    fn prefix_reuse_eviction_and_events() {
        let mut log = KvEventLog::new(16);
        let mut b = Blocks::new(3, 2);
        let toks = [1u32, 2, 3, 4, 5];
        let h = seq_hashes(&toks, 2);
        let t = b.alloc_n(3, &mut log).unwrap();
        b.commit(&t[..2], &h, &mut log);
        let (_, held) = log.all_blocks();
        assert_eq!(held.len(), 2);
        assert!(matches!(&log.since(0).unwrap()[0].kind,
            KvEventKind::Stored { blocks, .. } if blocks[1].parent == Some(h[0])));
        // While held, and after release, the prefix is found.
        assert_eq!(b.lookup(&h), t[..2].to_vec());
        b.release(&t[..2]);
        b.release(&t);
        assert_eq!(b.used(), 0);
        assert_eq!(b.lookup(&h[..1]), vec![t[0]]);
        assert_eq!(b.used(), 1);
        // A miss in the middle stops the run.
        assert_eq!(b.lookup(&[h[1]]).len(), 1);
        b.release(&[t[0], t[1]]);
        // Plain blocks go first, then the least recently freed cached one, with an event.
        let x = b.alloc(&mut log).unwrap();
        assert_eq!(x, t[2]);
        let y = b.alloc(&mut log).unwrap();
        assert_eq!(y, t[0]);
        assert!(matches!(&log.since(1).unwrap()[0].kind,
            KvEventKind::Removed { hashes } if hashes == &vec![h[0]]));
        assert_eq!(
            b.lookup(&h),
            Vec::<u32>::new(),
            "the chain's first block is gone"
        );
    }
}
