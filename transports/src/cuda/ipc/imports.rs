//! The importer's cache of peer regions ([`ImportCache`], [`RegionImport`]): mappings shared by
//! the transfers that use them, and their revocation.

use super::*;

/// What identifies one peer region imported here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RegionKey {
    /// The peer's instance id.
    pub peer: u128,
    /// The region (as the peer published it).
    pub region: Desc,
    /// The region's key: a re-registration at the same address is a different region.
    pub key: u64,
}

/// The error of a transfer to a region whose owner deregistered it.
pub(crate) fn deregistered(peer: &str, region: &Desc) -> Error {
    Error::Denied {
        peer: peer.to_owned(),
        reason: format!(
            "region {:#x}+{} (device {}) was deregistered by its owner",
            region.addr, region.len, region.dev_id
        ),
    }
}

#[derive(Debug)]
struct ImportState<T> {
    /// Why the region may no longer be used (set once).
    revoked: Option<Error>,
    /// Mappings per (chunk, local device).
    maps: HashMap<(u32, i32), Arc<T>>,
}

/// One peer region imported here: its mappings, the gate every copy on it holds, and whether it
/// was revoked. Transfers hold the region, never a mapping directly, so a revocation closes the
/// mappings even while prepared transfers still exist (their next post fails cleanly).
#[derive(Debug)]
pub(crate) struct RegionImport<T> {
    key: RegionKey,
    peer: Arc<str>,
    gate: AccessGate,
    /// The owner's answer to our announcement (`None` until made).
    announced: Mutex<Option<Result<()>>>,
    state: Mutex<ImportState<T>>,
}

impl<T> RegionImport<T> {
    pub(super) fn new(key: RegionKey, peer: &str) -> RegionImport<T> {
        RegionImport {
            key,
            peer: Arc::from(peer),
            gate: AccessGate::default(),
            announced: Mutex::new(None),
            state: Mutex::new(ImportState {
                revoked: None,
                maps: HashMap::new(),
            }),
        }
    }

    /// Which region this is.
    pub(crate) fn key(&self) -> &RegionKey {
        &self.key
    }

    /// Why the region can no longer be used, if it cannot.
    pub(crate) fn revoked(&self) -> Option<Error> {
        self.state.lock().revoked.clone()
    }

    fn error(&self) -> Error {
        self.revoked()
            .unwrap_or_else(|| deregistered(&self.peer, &self.key.region))
    }

    /// Mappings held.
    pub(crate) fn mappings(&self) -> usize {
        self.state.lock().maps.len()
    }

    /// The mapping of chunk `chunk` on our device `dev`, made by `make` on first use (outside
    /// any lock; concurrent first uses may both call it, one result is kept). Fails with the
    /// revocation's error once the region was revoked (a mapping made meanwhile is closed).
    pub(crate) fn mapping(
        &self,
        chunk: u32,
        dev: i32,
        make: impl FnOnce() -> Result<Arc<T>>,
    ) -> Result<Arc<T>> {
        {
            let st = self.state.lock();
            if let Some(e) = &st.revoked {
                return Err(e.clone());
            }
            if let Some(m) = st.maps.get(&(chunk, dev)) {
                return Ok(Arc::clone(m));
            }
        }
        let made = make()?;
        let mut st = self.state.lock();
        if let Some(e) = st.revoked.clone() {
            drop(st);
            drop(made);
            return Err(e);
        }
        Ok(Arc::clone(st.maps.entry((chunk, dev)).or_insert(made)))
    }

    /// Marks the region revoked (the first reason stays) and closes its gate: no copy starts
    /// on it any more.
    fn start_revoke(&self, why: Error) {
        let mut st = self.state.lock();
        if st.revoked.is_none() {
            st.revoked = Some(why);
        }
        drop(st);
        self.gate.close_and_drain(Duration::ZERO);
    }

    /// After the region was marked revoked ([`ImportCache::begin_revoke`]): waits until
    /// `deadline` for the copies in flight, then closes the mappings. `false` if copies were
    /// still running: the mappings then stay until the last holder lets go.
    pub(crate) fn finish_revoke(&self, deadline: Instant) -> bool {
        let patience = deadline.saturating_duration_since(Instant::now());
        if !self.gate.close_and_drain(patience) {
            return false;
        }
        let maps = std::mem::take(&mut self.state.lock().maps);
        drop(maps);
        true
    }

    /// Revokes the region: no new copy, copies in flight waited for (at most `patience`), then
    /// its mappings closed. `false` if copies were still running at the bound.
    pub(crate) fn revoke(&self, why: Error, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        self.start_revoke(why);
        self.finish_revoke(deadline)
    }
}

/// Peers' regions imported here, made once and shared by every transfer that uses them; revoked
/// when the owner deregisters a region, when the connection to the owner ends, or when the peer
/// is invalidated, and replaced when the peer re-registers at the same address.
#[derive(Debug)]
pub(crate) struct ImportCache<T> {
    map: Mutex<HashMap<RegionKey, Arc<RegionImport<T>>>>,
}

impl<T> Default for ImportCache<T> {
    fn default() -> Self {
        ImportCache {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> ImportCache<T> {
    /// The import of region `key` of peer `peer`. The first user runs `announce` (telling the
    /// owner, who may refuse) while later users wait for its answer; a refused or failed
    /// announcement is returned to all of them and the entry dropped, so a later call asks
    /// again. A revoked import is an error. An entry of the same peer and address with another
    /// key (the peer re-registered) is revoked and dropped.
    pub(crate) fn region(
        &self,
        key: RegionKey,
        peer: &str,
        patience: Duration,
        announce: impl FnOnce() -> Result<()>,
    ) -> Result<Arc<RegionImport<T>>> {
        let (entry, stale) = {
            let mut m = self.map.lock();
            let stale: Vec<Arc<RegionImport<T>>> = {
                let old: Vec<RegionKey> = m
                    .keys()
                    .filter(|k| {
                        k.peer == key.peer
                            && k.region.addr == key.region.addr
                            && k.region.dev_id == key.region.dev_id
                            && **k != key
                    })
                    .copied()
                    .collect();
                old.iter().filter_map(|k| m.remove(k)).collect()
            };
            let entry = Arc::clone(
                m.entry(key)
                    .or_insert_with(|| Arc::new(RegionImport::new(key, peer))),
            );
            (entry, stale)
        };
        for s in stale {
            let region = s.key.region;
            s.revoke(deregistered(peer, &region), patience);
        }
        let answer = {
            let mut a = entry.announced.lock();
            if a.is_none() {
                *a = Some(announce());
            }
            a.clone().unwrap_or(Ok(()))
        };
        if let Err(e) = answer {
            self.remove_if(&entry);
            entry.start_revoke(e.clone());
            return Err(e);
        }
        match entry.revoked() {
            Some(e) => Err(e),
            None => Ok(entry),
        }
    }

    fn remove_if(&self, entry: &Arc<RegionImport<T>>) {
        let mut m = self.map.lock();
        if m.get(&entry.key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            m.remove(&entry.key);
        }
    }

    #[cfg(test)]
    /// Revokes one region of a peer (see [`RegionImport::revoke`]) and drops it. `true` if it
    /// was not imported or is now closed; `false` if copies were still running at the bound.
    pub(crate) fn revoke_region(
        &self,
        peer: u128,
        region: &Desc,
        key: u64,
        why: Error,
        patience: Duration,
    ) -> bool {
        let deadline = Instant::now() + patience;
        self.begin_revoke(peer, region, key, why)
            .is_none_or(|e| e.finish_revoke(deadline))
    }

    /// The quick half of [`ImportCache::revoke_region`]: drops the region from the cache, marks
    /// it revoked and closes its gate (no new copy starts on it). The rest is
    /// [`RegionImport::finish_revoke`]. `None` if it was not imported.
    pub(crate) fn begin_revoke(
        &self,
        peer: u128,
        region: &Desc,
        key: u64,
        why: Error,
    ) -> Option<Arc<RegionImport<T>>> {
        let k = RegionKey {
            peer,
            region: *region,
            key,
        };
        let entry = self.map.lock().remove(&k)?;
        entry.start_revoke(why);
        Some(entry)
    }

    /// Revokes every region of a peer (gates closed first, then one common bound for the copies
    /// in flight). Returns the number of regions and how many still had copies running.
    pub(crate) fn revoke_peer(
        &self,
        peer: u128,
        why: &Error,
        patience: Duration,
    ) -> (usize, usize) {
        let deadline = Instant::now() + patience;
        let gone: Vec<Arc<RegionImport<T>>> = {
            let mut m = self.map.lock();
            let keys: Vec<RegionKey> = m.keys().filter(|k| k.peer == peer).copied().collect();
            keys.iter().filter_map(|k| m.remove(k)).collect()
        };
        for e in &gone {
            e.start_revoke(why.clone());
        }
        let busy = gone.iter().filter(|e| !e.finish_revoke(deadline)).count();
        (gone.len(), busy)
    }

    #[cfg(test)]
    /// Whether region `key` is imported (and not revoked).
    pub(crate) fn contains(&self, key: &RegionKey) -> bool {
        self.map.lock().contains_key(key)
    }

    /// Number of imported regions.
    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }

    #[cfg(test)]
    /// Whether no region is imported.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of mappings held by imported regions.
    pub(crate) fn mappings(&self) -> usize {
        let regions: Vec<Arc<RegionImport<T>>> = self.map.lock().values().cloned().collect();
        regions.iter().map(|r| r.mappings()).sum()
    }
}

/// Holds on the gates of the regions a post uses, taken together and released on drop (after
/// the post's copies are over).
#[derive(Debug)]
pub(crate) struct Holds<T> {
    regions: Arc<[Arc<RegionImport<T>>]>,
    ticket: Option<Ticket>,
}

/// Takes a hold on every region, or none: `Err` with the revocation's reason of the first region
/// that can no longer be used ("region was deregistered by its owner").
pub(crate) fn hold_all<T>(regions: &Arc<[Arc<RegionImport<T>>]>) -> Result<Holds<T>> {
    match enter_all(regions, |r| &r.gate) {
        Ok(ticket) => Ok(Holds {
            regions: Arc::clone(regions),
            ticket,
        }),
        Err(i) => Err(regions[i].error()),
    }
}

impl<T> Drop for Holds<T> {
    fn drop(&mut self) {
        leave_all(&self.regions, |r| &r.gate, self.ticket.take());
    }
}
