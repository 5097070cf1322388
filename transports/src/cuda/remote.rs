//! Peers on other nodes: our devices' NVLink domains, owners we announce imports to, importers
//! we revoke, and the requests the control channel brings.

use super::*;

/// Our devices' NVLink domains, learned once.
#[derive(Clone, Debug, Default)]
pub(super) struct LocalFabric {
    pub(super) devices: Vec<DeviceFabric>,
    /// Why devices lack a domain (empty when none does).
    pub(super) note: String,
}

/// Why a connection to a peer on another node cannot carry a notification.
pub(super) const FABRIC_NOTIF: &str =
    "cuda carries notifications over the owner's Unix socket on one node \
     and over the agents' control channel across nodes, and this connection has no control \
     channel (this cuda backend was built without one, or the peer publishes no control \
     endpoint): send the notification with another backend after the transfer, or post it \
     without one";

/// Most importers on other nodes recorded per region.
pub(super) const MAX_REMOTE_IMPORTERS: usize = 4096;

/// An agent on another node that announced an import of one of our regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Importer {
    /// Its name, as the control channel authenticated it.
    pub(super) name: String,
    pub(super) instance: u128,
    /// Where its cuda service is reached (to revoke).
    pub(super) endpoint: Vec<u8>,
}

/// A peer on another node, reached over the agents' control channel.
#[derive(Debug)]
pub(super) struct RemoteOwner {
    pub(super) peer: String,
    pub(super) control: Arc<dyn ControlChannel>,
    pub(super) endpoint: Vec<u8>,
    pub(super) timeout: Duration,
}

impl RemoteOwner {
    /// Sends `m` as agent `from`; a refusal names the peer.
    pub(super) fn call(&self, from: &str, m: &Ctl) -> Result<Vec<u8>> {
        self.control
            .call(
                &self.endpoint,
                from,
                BackendName::Cuda,
                &m.encode(),
                self.timeout,
            )
            .map_err(|e| match e {
                Error::Denied { reason, .. } => Error::Denied {
                    peer: self.peer.clone(),
                    reason,
                },
                other => other,
            })
    }

    pub(super) fn notify(&self, from: &str, msg: &[u8]) -> Result<()> {
        if msg.len() > MAX_CTL_NOTIF {
            return Err(Error::InvalidArgument(format!(
                "notification of {} bytes exceeds {MAX_CTL_NOTIF} (the control channel's limit)",
                msg.len()
            )));
        }
        self.call(from, &Ctl::Notif { msg: msg.to_vec() })
            .map(|_| ())
    }
}

/// Where a connection's notifications go.
#[derive(Clone, Debug)]
pub(super) enum Notifier {
    /// The owner's Unix socket (same node).
    Socket(Arc<IpcClient>),
    /// The owner's cuda service over the control channel (another node).
    Control(Arc<RemoteOwner>),
}

impl Notifier {
    pub(super) fn notify(&self, from: &str, msg: &[u8]) -> Result<()> {
        match self {
            Notifier::Socket(c) => c.notify(from, msg),
            Notifier::Control(o) => o.notify(from, msg),
        }
    }
}

/// Sends Revoke for `region` (with `key`) of agent `from` (instance `instance`) to each
/// importer at once and waits, at most `timeout` in all, for their answers: acknowledged,
/// unreachable (gone) or late (copies still running, or silent; a silent call goes on in its
/// thread until the channel's own timeout ends it).
pub(super) fn revoke_remote(
    control: &Arc<dyn ControlChannel>,
    from: &str,
    instance: u128,
    region: &Desc,
    key: u64,
    importers: Vec<Importer>,
    timeout: Duration,
) -> ipc::RevokeReport {
    let mut report = ipc::RevokeReport {
        peers: importers.len(),
        ..Default::default()
    };
    let req: Arc<[u8]> = Ctl::Revoke {
        instance,
        region: *region,
        key,
    }
    .encode()
    .into();
    let from: Arc<str> = Arc::from(from);
    let (tx, rx) = crossbeam_channel::unbounded();
    for imp in importers {
        let (tx, control, req, from) = (
            tx.clone(),
            Arc::clone(control),
            Arc::clone(&req),
            Arc::clone(&from),
        );
        let spawned = std::thread::Builder::new()
            .name("nixl-cuda-revoke".into())
            .spawn(move || {
                let r = control.call(&imp.endpoint, &from, BackendName::Cuda, &req, timeout);
                let _ = tx.send((imp.name, r));
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cuda: could not spawn a revocation");
            report.gone += 1;
        }
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut answered = report.gone;
    while answered < report.peers {
        match rx.recv_deadline(deadline) {
            Ok((name, Ok(reply))) => {
                answered += 1;
                if reply == [1] {
                    report.acked += 1;
                } else {
                    tracing::warn!(peer = %name, "cuda: a peer on another node still had copies \
                        running on a revoked region at its bound");
                }
            }
            Ok((name, Err(e))) => {
                answered += 1;
                report.gone += 1;
                tracing::debug!(peer = %name, error = %e, "cuda: revocation not delivered");
            }
            Err(_) => break,
        }
    }
    report.late = report.peers - report.acked - report.gone;
    if report.late > 0 {
        metrics::counter!("nixl_cuda_revoke_timeouts_total").increment(report.late as u64);
        tracing::warn!(
            region = format_args!("{:#x}+{}", region.addr, region.len),
            late = report.late,
            "cuda: peers on other nodes did not confirm a revocation in time"
        );
    }
    report
}

/// Our devices and their NVLink domains, from the driver (UUIDs, fabric export support) and
/// NVML (domains); `note` says why devices lack one.
pub(super) fn probe_local_fabric(allow_fabric: bool) -> LocalFabric {
    if !allow_fabric {
        return LocalFabric {
            devices: Vec::new(),
            note: "fabric is not allowed (cuda allow_fabric = false)".into(),
        };
    }
    let fail = |note: String| LocalFabric {
        devices: Vec::new(),
        note,
    };
    let drv = match driver::driver() {
        Ok(d) => d,
        Err(e) => return fail(format!("cuda unavailable: {e}")),
    };
    let uuids = match nvml::cuda_device_uuids() {
        Ok(u) => u,
        Err(e) => return fail(format!("device UUIDs: {e}")),
    };
    let nv = nvml::nvml();
    let mut notes = Vec::new();
    let mut devices = Vec::with_capacity(uuids.len());
    for (i, uuid) in uuids.into_iter().enumerate() {
        let domain = if !drv.device_supports_fabric(i as i32) {
            notes.push(format!("device {i} does not export fabric handles"));
            None
        } else {
            match nv.as_ref().map(|n| n.domain_of(&uuid)) {
                Ok(Ok(d)) => Some(d),
                Ok(Err(e)) => {
                    notes.push(format!("device {i}: {e}"));
                    None
                }
                Err(e) => {
                    notes.push(format!("NVML unavailable: {e}"));
                    None
                }
            }
        };
        devices.push(DeviceFabric {
            ordinal: i as u32,
            uuid,
            domain,
        });
    }
    notes.dedup();
    LocalFabric {
        devices,
        note: notes.join("; "),
    }
}

impl Inner {
    /// Announces to an owner on another node that we map `region` (whole, with `key`).
    pub(super) fn announce_remote(
        &self,
        owner: &RemoteOwner,
        region: &Desc,
        key: u64,
    ) -> Result<()> {
        let t = self.target.get().ok_or_else(|| Error::Backend {
            backend: BackendName::Cuda,
            op: "announce",
            reason: "the agent is starting".into(),
        })?;
        let endpoint = owner.control.endpoint();
        if endpoint.is_empty() {
            return Err(Error::Backend {
                backend: BackendName::Cuda,
                op: "announce",
                reason: "our control channel is not serving, so the owner could not revoke the \
                         import"
                    .into(),
            });
        }
        owner
            .call(
                t.name(),
                &Ctl::Opened {
                    instance: t.instance_id(),
                    endpoint,
                    region: *region,
                    key,
                },
            )
            .map(|_| ())
    }

    /// Owner `owner` (authenticated by the channel, instance `instance`) revoked `region`:
    /// the same as a revocation over the socket. `[1]`: closed (or not imported); `[0]`:
    /// copies were still running at the bound.
    pub(super) fn revoke_from_owner(
        &self,
        owner: &str,
        instance: u128,
        region: &Desc,
        key: u64,
    ) -> std::result::Result<Vec<u8>, String> {
        let conns: Vec<Arc<Conn>> = self
            .conns
            .live()
            .into_iter()
            .filter(|c| c.instance == instance)
            .collect();
        // Only the agent we connected to under that instance may revoke (dropping an import
        // of an instance we hold no connection to any more is harmless).
        if !conns.is_empty() && !conns.iter().any(|c| c.peer == owner) {
            return Err(format!(
                "agent '{owner}' cannot revoke imports from instance {instance:#x} (not its own)"
            ));
        }
        let deadline = Instant::now() + self.cfg.op_timeout;
        let entry =
            self.imports
                .begin_revoke(instance, region, key, ipc::deregistered(owner, region));
        let done = entry.is_none_or(|e| e.finish_revoke(deadline));
        self.prune_legacy();
        Ok(vec![u8::from(done)])
    }
}

impl ControlService for Inner {
    fn handle(&self, peer: &str, req: &[u8]) -> std::result::Result<Vec<u8>, String> {
        match Ctl::decode(req).map_err(|e| format!("bad cuda control message: {e}"))? {
            Ctl::Opened {
                instance,
                endpoint,
                region,
                key,
            } => {
                if endpoint.is_empty() {
                    return Err("no control endpoint to revoke the import at".into());
                }
                // The access holds the region until the import is recorded, so a
                // deregistration cannot slip between the check and the record.
                let (access, _) = self.check_whole(&region, key)?;
                let mut m = self.remote_importers.lock();
                let v = m.entry((region, key)).or_default();
                if !v.iter().any(|i| i.name == peer && i.instance == instance) {
                    if v.len() >= MAX_REMOTE_IMPORTERS {
                        return Err(format!(
                            "region has {MAX_REMOTE_IMPORTERS} importers on other nodes already"
                        ));
                    }
                    v.push(Importer {
                        name: peer.to_owned(),
                        instance,
                        endpoint,
                    });
                }
                drop(m);
                drop(access);
                Ok(Vec::new())
            }
            Ctl::Notif { msg } => {
                let t = self.target.get().ok_or("the agent is starting")?;
                t.deliver(peer, msg)
                    .map_err(|refused| refused.to_string())?;
                Ok(Vec::new())
            }
            Ctl::Revoke {
                instance,
                region,
                key,
            } => self.revoke_from_owner(peer, instance, &region, key),
        }
    }
}

/// A connection's handler of its owner's revocations: gives up the mappings in this backend's
/// import cache.
pub(super) struct PeerSink {
    pub(super) inner: Weak<Inner>,
    pub(super) peer: String,
    pub(super) instance: u128,
}

impl RevokeSink for PeerSink {
    fn revoke(&self, region: &Desc, key: u64) -> FinishRevoke {
        let Some(inner) = self.inner.upgrade() else {
            return Box::new(|| true); // the backend is gone, and its mappings with it
        };
        let deadline = Instant::now() + inner.cfg.op_timeout;
        let entry = inner.imports.begin_revoke(
            self.instance,
            region,
            key,
            ipc::deregistered(&self.peer, region),
        );
        let peer = self.peer.clone();
        let region = *region;
        Box::new(move || {
            let done = entry.is_none_or(|e| e.finish_revoke(deadline));
            inner.prune_legacy();
            if !done {
                tracing::warn!(
                    peer = %peer,
                    region = format_args!("{:#x}+{}", region.addr, region.len),
                    "cuda: copies on a revoked region were still running at the bound; its \
                     mappings close when they end"
                );
            }
            done
        })
    }

    fn link_lost(&self, reason: &str) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let why = Error::RemoteDisconnect {
            peer: self.peer.clone(),
            reason: format!(
                "the cuda socket to the owner ended ({reason}); mappings of its memory were given up"
            ),
        };
        let (n, busy) = inner
            .imports
            .revoke_peer(self.instance, &why, inner.cfg.op_timeout);
        inner.prune_legacy();
        if n > 0 {
            tracing::debug!(peer = %self.peer, regions = n, busy, reason, "cuda: gave up a peer's mappings");
        }
    }
}
