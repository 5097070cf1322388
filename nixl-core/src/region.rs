//! Registered regions: the table the owner of the memory checks every access against.
//!
//! Each region carries an [`AccessGate`]: a transfer that touches the region holds the gate open
//! for as long as its backend may touch the memory, and deregistration closes the gate and waits
//! until every holder has let go. So "deregister, then free" is always safe, whatever transfers
//! were running, and no lock is shared between regions or taken on the post path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::backend::BackendName;
use crate::error::{Error, Result};
use crate::mem::{Desc, MemKind};

/// Counters per gate: threads spread over them, so posts from several threads into one region
/// do not all hit one cache line.
const SHARDS: usize = 16;

#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(AtomicU64);

thread_local! {
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
    };
}

/// Counts the users of a region and lets deregistration wait for them to finish.
///
/// A user increments the counter of its thread's shard, then checks the closed flag; closing
/// sets the flag, then waits for every shard to drain. Both sides use sequentially consistent
/// operations, so either the user sees the flag (and backs out) or the closer sees the user.
#[derive(Debug, Default)]
pub struct AccessGate {
    closed: AtomicBool,
    shards: [Shard; SHARDS],
}

/// Proof of one hold on a gate: which shard to release.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(usize);

impl AccessGate {
    /// Takes one hold on the gate; `None` once the gate is closed.
    pub fn enter(&self) -> Option<Ticket> {
        let i = SHARD.with(|s| *s);
        self.shards[i].0.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.shards[i].0.fetch_sub(1, Ordering::Release);
            return None;
        }
        Some(Ticket(i))
    }

    /// Releases a hold taken by [`AccessGate::enter`] (from any thread).
    pub fn leave(&self, ticket: Ticket) {
        self.shards[ticket.0].0.fetch_sub(1, Ordering::Release);
    }

    /// Whether the gate has been closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn holders(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::SeqCst))
            .fold(0u64, u64::wrapping_add)
    }

    /// Closes the gate and waits until no hold remains. Returns false if holders remained after
    /// `patience` (the gate stays closed; the caller reports it).
    pub fn close_and_drain(&self, patience: Duration) -> bool {
        self.closed.store(true, Ordering::SeqCst);
        let start = Instant::now();
        let mut spins = 0u32;
        while self.holders() != 0 {
            if start.elapsed() > patience {
                return false;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 256 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        true
    }
}

/// Enters the gate of every item, or none: `Ok(ticket)` (`None` only for no items), or
/// `Err(index)` of the first closed gate. One thread's holds share one ticket.
pub fn enter_all<T>(
    items: &[T],
    gate: impl Fn(&T) -> &AccessGate,
) -> Result<Option<Ticket>, usize> {
    let mut ticket = None;
    for (i, item) in items.iter().enumerate() {
        match gate(item).enter() {
            Some(t) => ticket = Some(t),
            None => {
                leave_all(&items[..i], gate, ticket);
                return Err(i);
            }
        }
    }
    Ok(ticket)
}

/// Releases the holds taken by [`enter_all`].
pub fn leave_all<T>(items: &[T], gate: impl Fn(&T) -> &AccessGate, ticket: Option<Ticket>) {
    if let Some(t) = ticket {
        for item in items {
            gate(item).leave(t);
        }
    }
}

/// A hold on a region's gate, released on drop.
#[derive(Debug)]
pub struct RegionAccess {
    region: Arc<Region>,
    ticket: Ticket,
}

impl RegionAccess {
    /// The region held.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }
}

impl Drop for RegionAccess {
    fn drop(&mut self) {
        self.region.gate.leave(self.ticket);
    }
}

/// One registered region.
#[derive(Debug)]
pub struct Region {
    /// Agent-unique id.
    pub id: u64,
    /// Memory kind.
    pub kind: MemKind,
    /// Address range and device.
    pub desc: Desc,
    /// Random key a peer must present to touch the region.
    pub key: u64,
    /// Backends that registered it, with their public per-region data (goes into metadata).
    pub backends: Vec<(BackendName, Vec<u8>)>,
    /// Users in flight; closed on deregistration.
    pub gate: AccessGate,
}

impl Region {
    /// Takes a hold on the region, or `None` if it is being deregistered.
    pub fn access(self: &Arc<Self>) -> Option<RegionAccess> {
        let ticket = self.gate.enter()?;
        Some(RegionAccess {
            region: Arc::clone(self),
            ticket,
        })
    }

    /// Whether `backend` registered this region.
    pub fn has_backend(&self, backend: BackendName) -> bool {
        self.backends.iter().any(|(b, _)| *b == backend)
    }

    /// The public data `backend` produced for this region.
    pub fn backend_public(&self, backend: BackendName) -> Option<&[u8]> {
        self.backends
            .iter()
            .find(|(b, _)| *b == backend)
            .map(|(_, p)| p.as_slice())
    }

    /// The region as `backend` registered it (its public data empty if it did not).
    pub fn registered(&self, backend: BackendName) -> crate::backend::Registered<'_> {
        crate::backend::Registered {
            kind: self.kind,
            desc: self.desc,
            key: self.key,
            public: self.backend_public(backend).unwrap_or_default(),
        }
    }
}

type Key = (MemKind, u64, u64); // kind, dev_id, start address

/// The registrations of one agent, ordered so that lookups are a range query.
#[derive(Debug, Default)]
pub struct RegionTable {
    map: RwLock<BTreeMap<Key, Arc<Region>>>,
}

/// Why an access was refused by the owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessDenied {
    /// No registered region contains the range.
    NotRegistered,
    /// A region contains it but the key is wrong.
    BadKey,
    /// The region is being deregistered.
    Deregistered,
}

impl std::fmt::Display for AccessDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccessDenied::NotRegistered => "range is not inside a registered region",
            AccessDenied::BadKey => "wrong region key",
            AccessDenied::Deregistered => "region was deregistered",
        })
    }
}

impl RegionTable {
    /// Inserts a region unless it overlaps one of the same kind and device.
    pub fn insert(&self, region: Region) -> Result<Arc<Region>> {
        let mut map = self.map.write();
        let k = (region.kind, region.desc.dev_id, region.desc.addr);
        // The only candidates for overlap are the last region starting at or before our start
        // and the first starting after it.
        let before = map
            .range(..=k)
            .next_back()
            .filter(|(key, _)| key.0 == k.0 && key.1 == k.1);
        let after = map
            .range((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded))
            .next()
            .filter(|(key, _)| key.0 == k.0 && key.1 == k.1);
        for (_, existing) in before.into_iter().chain(after) {
            if existing.desc.overlaps(&region.desc) {
                return Err(Error::Overlap {
                    kind: region.kind,
                    new: region.desc,
                    existing: existing.desc,
                });
            }
        }
        let region = Arc::new(region);
        map.insert(k, Arc::clone(&region));
        Ok(region)
    }

    /// Removes exactly the region registered as `desc`.
    pub fn remove(&self, kind: MemKind, desc: &Desc) -> Result<Arc<Region>> {
        let mut map = self.map.write();
        let k = (kind, desc.dev_id, desc.addr);
        match map.get(&k) {
            Some(r) if r.desc.len == desc.len => Ok(map.remove(&k).expect("present")),
            _ => Err(Error::NotRegistered { kind, desc: *desc }),
        }
    }

    /// Removes the region with this id, if present.
    pub fn remove_id(&self, region: &Region) -> Option<Arc<Region>> {
        let mut map = self.map.write();
        let k = (region.kind, region.desc.dev_id, region.desc.addr);
        match map.get(&k) {
            Some(r) if r.id == region.id => map.remove(&k),
            _ => None,
        }
    }

    /// The region that contains `desc`, if any.
    pub fn find(&self, kind: MemKind, desc: &Desc) -> Option<Arc<Region>> {
        let map = self.map.read();
        let (_, r) = map.range(..=(kind, desc.dev_id, desc.addr)).next_back()?;
        (r.kind == kind && r.desc.contains(desc)).then(|| Arc::clone(r))
    }

    /// The index in `held` of the region of `kind` that holds `desc`, descriptor `index` of a
    /// request: `held` is searched from its end first (consecutive descriptors usually share a
    /// region), else the region is found here and appended to it.
    pub(crate) fn find_held(
        &self,
        held: &mut Vec<Arc<Region>>,
        kind: MemKind,
        desc: &Desc,
        index: usize,
    ) -> Result<usize> {
        if let Some(i) = held
            .iter()
            .rposition(|r| r.kind == kind && r.desc.contains(desc))
        {
            return Ok(i);
        }
        let r = self.find(kind, desc).ok_or(Error::LocalNotRegistered {
            index,
            kind,
            desc: *desc,
        })?;
        held.push(r);
        Ok(held.len() - 1)
    }

    /// Owner-side check of a peer's access: inside a region, with its key, not deregistered.
    /// On success the region is held until the returned access is dropped.
    pub fn check(
        &self,
        kind: MemKind,
        desc: &Desc,
        key: u64,
    ) -> std::result::Result<RegionAccess, AccessDenied> {
        let region = self.find(kind, desc).ok_or(AccessDenied::NotRegistered)?;
        if region.key != key {
            return Err(AccessDenied::BadKey);
        }
        region.access().ok_or(AccessDenied::Deregistered)
    }

    /// All regions (a snapshot).
    pub fn snapshot(&self) -> Vec<Arc<Region>> {
        self.map.read().values().cloned().collect()
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.read().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: u64, addr: u64, len: u64) -> Region {
        Region {
            id,
            kind: MemKind::Dram,
            desc: Desc::new(addr, len, 0),
            key: 42 + id,
            backends: Vec::new(),
            gate: AccessGate::default(),
        }
    }

    #[test]
    fn overlap_rules() {
        let t = RegionTable::default();
        t.insert(region(1, 1000, 100)).unwrap();
        t.insert(region(2, 1100, 100)).unwrap(); // adjacent is fine
        t.insert(region(3, 900, 100)).unwrap();
        for (addr, len) in [(1050, 10), (950, 100), (1199, 5), (800, 2000), (1000, 100)] {
            let err = t.insert(region(9, addr, len)).unwrap_err();
            assert!(matches!(err, Error::Overlap { .. }), "{addr} {len}: {err}");
        }
        // Other kind or device does not overlap.
        let mut r = region(4, 1000, 100);
        r.kind = MemKind::File;
        t.insert(r).unwrap();
        let mut r = region(5, 1000, 100);
        r.desc.dev_id = 7;
        t.insert(r).unwrap();
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn find_check_and_remove() {
        let t = RegionTable::default();
        t.insert(region(1, 1000, 100)).unwrap();
        assert!(t.find(MemKind::Dram, &Desc::new(1010, 90, 0)).is_some());
        assert!(t.find(MemKind::Dram, &Desc::new(1010, 91, 0)).is_none());
        assert!(t.find(MemKind::Dram, &Desc::new(999, 1, 0)).is_none());
        assert!(t.find(MemKind::Vram, &Desc::new(1010, 1, 0)).is_none());
        assert_eq!(
            t.check(MemKind::Dram, &Desc::new(1000, 1, 0), 0)
                .unwrap_err(),
            AccessDenied::BadKey
        );
        assert_eq!(
            t.check(MemKind::Dram, &Desc::new(2000, 1, 0), 43)
                .unwrap_err(),
            AccessDenied::NotRegistered
        );
        let held = t.check(MemKind::Dram, &Desc::new(1000, 1, 0), 43).unwrap();
        assert!(t.remove(MemKind::Dram, &Desc::new(1000, 99, 0)).is_err());
        let r = t.remove(MemKind::Dram, &Desc::new(1000, 100, 0)).unwrap();
        assert!(!r.gate.close_and_drain(Duration::from_millis(5)), "held");
        drop(held);
        assert!(r.gate.close_and_drain(Duration::from_millis(5)));
        assert!(r.access().is_none());
        let err = t
            .remove(MemKind::Dram, &Desc::new(1000, 100, 0))
            .unwrap_err();
        assert!(matches!(err, Error::NotRegistered { .. }));
    }

    #[test]
    fn gate_waits_for_holders_across_threads() {
        let r = Arc::new(region(1, 0, 1));
        let held = r.access().unwrap();
        let r2 = Arc::clone(&r);
        let t = std::thread::spawn(move || r2.gate.close_and_drain(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(r.access().is_none(), "closed while draining");
        drop(held);
        assert!(t.join().unwrap());
    }

    #[test]
    fn no_hold_survives_a_drained_close_under_contention() {
        use std::sync::atomic::AtomicBool;
        for _ in 0..20 {
            let gate = Arc::new(AccessGate::default());
            let drained = Arc::new(AtomicBool::new(false));
            let violations = Arc::new(AtomicU64::new(0));
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let (gate, drained, violations) = (
                        Arc::clone(&gate),
                        Arc::clone(&drained),
                        Arc::clone(&violations),
                    );
                    std::thread::spawn(move || {
                        for _ in 0..20_000 {
                            if let Some(t) = gate.enter() {
                                if drained.load(Ordering::SeqCst) {
                                    violations.fetch_add(1, Ordering::SeqCst);
                                }
                                gate.leave(t);
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_micros(200));
            assert!(gate.close_and_drain(Duration::from_secs(5)));
            drained.store(true, Ordering::SeqCst);
            for w in workers {
                w.join().unwrap();
            }
            assert_eq!(violations.load(Ordering::SeqCst), 0);
            assert!(gate.enter().is_none());
        }
    }
}
