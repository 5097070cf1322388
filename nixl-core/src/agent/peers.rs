//! This agent's metadata, and its peers': loading, merging, forgetting; connections to them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Agent, AgentInner};
use crate::backend::{Backend, BackendName, Connection, MetadataHooks, PeerInfo};
use crate::error::{Error, Result};
use crate::mem::{Desc, DescList, MemKind};
use crate::metadata::{AgentMetadata, BackendInfo, RegionInfo};
use crate::region::Region;
use crate::xfer::{Telemetry, XferOp};

type TelemetryCache = Arc<Mutex<HashMap<(BackendName, XferOp), Arc<Telemetry>>>>;

pub(super) struct PeerState {
    pub(super) md: AgentMetadata,
    pub(super) name: Arc<str>,
    telemetry: TelemetryCache,
    /// (kind, dev_id, addr) -> index into md.regions.
    index: BTreeMap<(MemKind, u64, u64), usize>,
    pub(super) conns: Arc<Mutex<HashMap<BackendName, Arc<dyn Connection>>>>,
}

impl PeerState {
    fn new(
        md: AgentMetadata,
        conns: Arc<Mutex<HashMap<BackendName, Arc<dyn Connection>>>>,
        telemetry: TelemetryCache,
    ) -> Self {
        let index = md
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.kind, r.desc.dev_id, r.desc.addr), i))
            .collect();
        PeerState {
            name: Arc::from(md.name.as_str()),
            md,
            telemetry,
            index,
            conns,
        }
    }

    pub(super) fn telemetry(&self, backend: BackendName, op: XferOp) -> Arc<Telemetry> {
        Arc::clone(
            self.telemetry
                .lock()
                .entry((backend, op))
                .or_insert_with(|| Arc::new(Telemetry::new(backend, &self.name, op))),
        )
    }

    pub(super) fn find(&self, kind: MemKind, desc: &Desc) -> Option<(usize, &RegionInfo)> {
        let (_, &i) = self
            .index
            .range(..=(kind, desc.dev_id, desc.addr))
            .next_back()?;
        let r = &self.md.regions[i];
        (r.kind == kind && r.desc.contains(desc)).then_some((i, r))
    }

    /// The index in `held` (indices of this peer's regions) of the region of `kind` that
    /// holds `desc`, descriptor `index` of a request: `held` is searched from its end first
    /// (consecutive descriptors usually share a region), else the region is found in the
    /// peer's metadata and appended to it.
    pub(super) fn find_held(
        &self,
        held: &mut Vec<usize>,
        kind: MemKind,
        desc: &Desc,
        index: usize,
    ) -> Result<usize> {
        let regions = &self.md.regions;
        if let Some(i) = held
            .iter()
            .rposition(|&i| regions[i].kind == kind && regions[i].desc.contains(desc))
        {
            return Ok(i);
        }
        let (i, _) = self
            .find(kind, desc)
            .ok_or_else(|| Error::RemoteNotRegistered {
                peer: self.name.to_string(),
                index,
                kind,
                desc: *desc,
            })?;
        held.push(i);
        Ok(held.len() - 1)
    }

    pub(super) fn backend_info(&self, b: BackendName) -> Option<&BackendInfo> {
        self.md.backends.iter().find(|i| i.name == b)
    }
}

impl MetadataHooks for AgentInner {
    fn metadata(&self) -> Vec<u8> {
        AgentInner::metadata(self).encode()
    }

    fn load(&self, bytes: &[u8]) -> Result<String> {
        self.load_remote_md(AgentMetadata::decode(bytes)?)
    }

    fn forget(&self, name: &str, instance: u128) -> Result<bool> {
        let mut peers = self.peers.write();
        let Some(p) = peers.get(name) else {
            return Ok(false);
        };
        if p.md.instance_id != instance {
            return Err(Error::Denied {
                peer: self.name.to_string(),
                reason: format!(
                    "the metadata loaded for '{name}' is of instance {:032x}, not the caller's \
                     {instance:032x}: an agent may invalidate only its own",
                    p.md.instance_id
                ),
            });
        }
        let p = peers.remove(name);
        drop(peers);
        if let Some(p) = p {
            tracing::info!(agent = %self.name, peer = %name, "peer invalidated its metadata");
            for c in p.conns.lock().values() {
                c.close();
            }
        }
        Ok(true)
    }
}

impl AgentInner {
    fn build_metadata(&self, regions: Vec<RegionInfo>, partial: bool) -> AgentMetadata {
        AgentMetadata {
            name: self.name.to_string(),
            instance_id: self.instance_id,
            generation: self.generation.load(Ordering::Acquire),
            partial,
            backends: self
                .backends
                .iter()
                .map(|b| BackendInfo {
                    name: b.name(),
                    conn_info: b.conn_info(),
                })
                .collect(),
            regions,
        }
    }

    fn metadata(&self) -> AgentMetadata {
        let regions = self
            .target
            .0
            .regions
            .snapshot()
            .iter()
            .map(|r| region_info(r))
            .collect();
        self.build_metadata(regions, false)
    }

    /// Loads decoded metadata (see [`Agent::load_remote`]).
    fn load_remote_md(&self, md: AgentMetadata) -> Result<String> {
        self.check_live()?;
        if md.name == *self.name {
            return Err(Error::InvalidArgument(format!(
                "metadata of '{}' is this agent's own name",
                md.name
            )));
        }
        let name = md.name.clone();
        let mut peers = self.peers.write();
        let next = match peers.get(&name) {
            Some(old) if old.md.instance_id == md.instance_id => {
                if md.generation < old.md.generation {
                    return Err(Error::StaleMetadata {
                        peer: name,
                        have: old.md.generation,
                        got: md.generation,
                    });
                }
                // Connections whose info changed are closed and made again on next use.
                {
                    let mut conns = old.conns.lock();
                    conns.retain(|b, c| {
                        let same = md.backends.iter().any(|i| i.name == *b)
                            && old.backend_info(*b).map(|i| &i.conn_info)
                                == md
                                    .backends
                                    .iter()
                                    .find(|i| i.name == *b)
                                    .map(|i| &i.conn_info);
                        if !same {
                            c.close();
                        }
                        same
                    });
                }
                let merged = if md.partial {
                    let mut merged = old.md.clone();
                    merged.generation = md.generation;
                    merged.backends = md.backends;
                    for r in md.regions {
                        merged
                            .regions
                            .retain(|x| !(x.kind == r.kind && x.desc.overlaps(&r.desc)));
                        merged.regions.push(r);
                    }
                    merged
                } else {
                    md
                };
                PeerState::new(merged, Arc::clone(&old.conns), Arc::clone(&old.telemetry))
            }
            old => {
                if let Some(old) = old {
                    // A restart, or someone loading other metadata under the peer's name: either
                    // way worth a line and a count.
                    metrics::counter!("nixl_peer_instance_replaced_total").increment(1);
                    tracing::warn!(agent = %self.name, peer = %name,
                        old_instance = %format_args!("{:032x}", old.md.instance_id),
                        new_instance = %format_args!("{:032x}", md.instance_id),
                        "peer metadata of a new instance replaces the loaded one; reconnecting");
                    for c in old.conns.lock().values() {
                        c.close();
                    }
                }
                PeerState::new(md, Arc::default(), Arc::default())
            }
        };
        tracing::debug!(agent = %self.name, peer = %name, generation = next.md.generation,
            regions = next.md.regions.len(), "loaded peer metadata");
        peers.insert(name.clone(), Arc::new(next));
        Ok(name)
    }
}

impl Agent {
    /// The agent's full metadata.
    pub fn metadata(&self) -> AgentMetadata {
        self.inner.metadata()
    }

    /// The full metadata, encoded.
    pub fn metadata_bytes(&self) -> Vec<u8> {
        self.metadata().encode()
    }

    /// Metadata that describes only the regions containing `list`'s descriptors (a peer merges it
    /// into what it has). An empty list gives the connection info alone.
    pub fn partial_metadata(&self, list: &DescList) -> Result<AgentMetadata> {
        let mut regions: Vec<RegionInfo> = Vec::new();
        for (index, d) in list.descs().iter().enumerate() {
            let r = self.inner.target.0.regions.find(list.kind(), d).ok_or(
                Error::LocalNotRegistered {
                    index,
                    kind: list.kind(),
                    desc: *d,
                },
            )?;
            if !regions.iter().any(|x| x.desc == r.desc && x.kind == r.kind) {
                regions.push(region_info(&r));
            }
        }
        Ok(self.inner.build_metadata(regions, true))
    }

    /// Loads decoded metadata (see [`Agent::load_remote`]).
    pub fn load_remote_md(&self, md: AgentMetadata) -> Result<String> {
        self.inner.load_remote_md(md)
    }

    /// Loads a peer's metadata; returns the peer's name. A newer instance or generation replaces
    /// what was loaded, partial metadata of the current instance is merged, older generations are
    /// refused.
    pub fn load_remote(&self, bytes: &[u8]) -> Result<String> {
        let md = AgentMetadata::decode(bytes)?;
        self.load_remote_md(md)
    }

    /// Forgets a peer: its connections close and its transfers fail from then on.
    pub fn invalidate_remote(&self, name: &str) -> Result<()> {
        let removed = self.inner.peers.write().remove(name);
        match removed {
            Some(p) => {
                for c in p.conns.lock().values() {
                    c.close();
                }
                Ok(())
            }
            None => Err(Error::UnknownPeer(name.to_owned())),
        }
    }

    /// Names of the loaded peers.
    pub fn peers(&self) -> Vec<String> {
        self.inner.peers.read().keys().cloned().collect()
    }

    /// The metadata loaded for the peer `name` (what [`Agent::load_remote`] accepted, merged),
    /// or `None` when no such peer is loaded: for services that reach a peer by other means than
    /// a transfer (a health check through its listener's control channel, say).
    pub fn peer_metadata(&self, name: &str) -> Option<AgentMetadata> {
        self.inner.peers.read().get(name).map(|p| p.md.clone())
    }

    /// `Ok` if peer `name` is loaded and every descriptor of `list` lies inside a region that
    /// its metadata describes (what a transfer to it would be checked against); otherwise the
    /// error a transfer would get (`UnknownPeer`, `RemoteNotRegistered`). Bindings that poll
    /// for a peer's (partial) metadata use it.
    pub fn check_remote(&self, name: &str, list: &DescList) -> Result<()> {
        let p = self
            .inner
            .peers
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownPeer(name.to_owned()))?;
        for (index, d) in list.descs().iter().enumerate() {
            if p.find(list.kind(), d).is_none() {
                return Err(Error::RemoteNotRegistered {
                    peer: name.to_owned(),
                    index,
                    kind: list.kind(),
                    desc: *d,
                });
            }
        }
        Ok(())
    }

    pub(super) fn peer(&self, name: &str) -> Result<Arc<PeerState>> {
        if name == &*self.inner.name {
            // Transfers to ourselves (storage, or local copies) use our own metadata.
            let gen = self.generation();
            let mut own = self.inner.own_peer.lock();
            if let Some((g, p)) = &*own {
                if *g == gen {
                    return Ok(Arc::clone(p));
                }
            }
            let (conns, telemetry) = own
                .as_ref()
                .map(|(_, p)| (Arc::clone(&p.conns), Arc::clone(&p.telemetry)))
                .unwrap_or_default();
            let p = Arc::new(PeerState::new(self.metadata(), conns, telemetry));
            *own = Some((gen, Arc::clone(&p)));
            return Ok(p);
        }
        self.inner
            .peers
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownPeer(name.to_owned()))
    }

    pub(super) fn connection(
        &self,
        peer: &PeerState,
        b: &Arc<dyn Backend>,
    ) -> Result<Arc<dyn Connection>> {
        let mut conns = peer.conns.lock();
        if let Some(c) = conns.get(&b.name()) {
            return Ok(Arc::clone(c));
        }
        let info = peer
            .backend_info(b.name())
            .ok_or_else(|| Error::UnknownBackend(format!("{} not offered by peer", b.name())))?;
        let c = b.connect(&PeerInfo {
            name: &peer.md.name,
            instance_id: peer.md.instance_id,
            conn_info: &info.conn_info,
        })?;
        conns.insert(b.name(), Arc::clone(&c));
        Ok(c)
    }
}

fn region_info(r: &Region) -> RegionInfo {
    RegionInfo {
        kind: r.kind,
        desc: r.desc,
        key: r.key,
        backends: r.backends.clone(),
    }
}
