//! A connection to one peer ([`Conn`]): resolving a transfer's peer regions to mappings
//! (imported through the owner's socket, legacy IPC or fabric handles), cutting it into copy
//! plans per device, and posting them ([`Prepared`]).

use super::*;

/// A connection to one peer.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) inner: Arc<Inner>,
    pub(super) peer: String,
    pub(super) instance: u128,
    pub(super) same_process: bool,
    /// The owner's socket (same node only).
    pub(super) client: Option<Arc<IpcClient>>,
    /// The owner's cuda service over the control channel (another node, where both have one).
    pub(super) remote: Option<Arc<RemoteOwner>>,
    pub(super) route: Route,
    /// The peer's devices and NVLink domains (its connection info).
    pub(super) peer_devices: Vec<DeviceFabric>,
    pub(super) closed: Arc<AtomicBool>,
}

/// A prepared transfer's resolved form: per local device, the copy plan; plus the peer regions
/// whose mappings it addresses (each post holds them; never a mapping directly, so that a
/// revocation can close the mappings and the next post fails cleanly).
#[derive(Debug)]
pub(super) struct Resolved {
    /// Per device: its copy plan, and the gather tables of the plan's parts (empty, or one
    /// entry per part).
    plans: Vec<(Arc<DevState>, CopyPlan, Vec<Option<copy::GatherTable>>)>,
    regions: Arc<[Arc<RegionImport<Imported>>]>,
}

#[derive(Debug)]
pub(super) struct Prepared {
    inner: Arc<Inner>,
    peer: String,
    closed: Arc<AtomicBool>,
    /// Where the notification goes (`None`: refused at prepare if one was asked for).
    notifier: Option<Notifier>,
    resolved: Arc<Resolved>,
    notif: Option<Vec<u8>>,
    initiator: Arc<str>,
}

pub(super) fn prep_err(reason: String) -> Error {
    Error::Backend {
        backend: BackendName::Cuda,
        op: "prepare",
        reason,
    }
}

impl Conn {
    /// Where notifications to the peer go: its socket on this node, its cuda service over the
    /// control channel on another; `None`: no carrier.
    fn notifier(&self) -> Option<Notifier> {
        match (&self.client, &self.remote) {
            (Some(c), _) => Some(Notifier::Socket(Arc::clone(c))),
            (None, Some(o)) => Some(Notifier::Control(Arc::clone(o))),
            (None, None) => None,
        }
    }

    /// The import of a peer region, announced to its owner on first use (the owner records it
    /// and revokes it when it deregisters the region; a refusal is an error).
    fn import_region(
        &self,
        rinfo: &nixl_core::metadata::RegionInfo,
    ) -> Result<Arc<RegionImport<Imported>>> {
        let key = RegionKey {
            peer: self.instance,
            region: rinfo.desc,
            key: rinfo.key,
        };
        // A peer on another node is told over the control channel where both have one;
        // without, it is not told and cannot revoke the import (see the module docs).
        self.inner
            .imports
            .region(key, &self.peer, self.inner.cfg.op_timeout, || {
                match (&self.client, &self.remote) {
                    (Some(c), _) => c.announce(&rinfo.desc, rinfo.key),
                    (None, Some(o)) => self.inner.announce_remote(o, &rinfo.desc, rinfo.key),
                    (None, None) => Ok(()),
                }
            })
    }

    /// Maps chunk `ci` of an imported region on our device `local` (once per region).
    fn import_chunk(
        &self,
        region: &RegionImport<Imported>,
        public: &RegionPublic,
        ci: usize,
        local: &Arc<DevState>,
    ) -> Result<Arc<Imported>> {
        let c = &public.chunks[ci];
        let ctx = &local.ctx;
        let rk = region.key();
        region.mapping(ci as u32, ctx.ordinal(), || {
            let Some(client) = &self.client else {
                // Another node: the fabric handle only (checked at prepare).
                let h = c.handles.fabric.as_ref().ok_or_else(|| {
                    prep_err(format!(
                        "chunk {ci} of peer '{}' has no fabric handle",
                        self.peer
                    ))
                })?;
                return VmmImport::import(ctx, VmmSource::Fabric(h), c.alloc_size)
                    .map(|v| Arc::new(Imported::Vmm(v)))
                    .map_err(|e| cu_err("import (fabric, from another node)", e));
            };
            if let Some(h) = &c.handles.legacy {
                let key = (self.instance, *h, ctx.ordinal());
                if let Some(i) = self
                    .inner
                    .legacy_imports
                    .lock()
                    .get(&key)
                    .and_then(Weak::upgrade)
                {
                    return Ok(i);
                }
                let imp =
                    LegacyImport::open(ctx, h).map_err(|e| cu_err("import (legacy IPC)", e))?;
                let imp = Arc::new(Imported::Legacy(imp));
                let mut m = self.inner.legacy_imports.lock();
                if let Some(i) = m.get(&key).and_then(Weak::upgrade) {
                    drop(m);
                    return Ok(i); // another thread opened it meanwhile; ours is closed
                }
                m.retain(|_, w| w.strong_count() > 0);
                m.insert(key, Arc::downgrade(&imp));
                return Ok(imp);
            }
            if c.handles.posix_fd {
                let (fd, size) = client.grant(&rk.region, rk.key, ci as u32)?;
                if size != c.alloc_size {
                    return Err(prep_err(format!(
                        "peer '{}' granted an allocation of {size} bytes for chunk {ci}, its \
                         metadata says {}",
                        self.peer, c.alloc_size
                    )));
                }
                VmmImport::import(ctx, VmmSource::Fd(&fd), size)
                    .map(|v| Arc::new(Imported::Vmm(v)))
                    .map_err(|e| cu_err("import (VMM fd)", e))
            } else if let Some(h) = &c.handles.fabric {
                VmmImport::import(ctx, VmmSource::Fabric(h), c.alloc_size)
                    .map(|v| Arc::new(Imported::Vmm(v)))
                    .map_err(|e| cu_err("import (fabric)", e))
            } else {
                Err(prep_err(format!("chunk {ci} has no handle")))
            }
        })
    }

    fn resolve(&self, plan: &XferPlan) -> Result<Resolved> {
        let max = self.inner.cfg.max_batch.max(1);
        if plan.segments.len() > max {
            return Err(Error::InvalidArgument(format!(
                "{} descriptors exceed the cuda backend's max_batch of {max}",
                plan.segments.len()
            )));
        }
        let publics = decode_publics(plan, &self.peer)?;
        let fabric = self.route == Route::Fabric;
        if fabric {
            // Every chunk the request touches must have a fabric handle: say which does not
            // before anything is opened or mapped.
            resolve_runs(plan, &publics, |ri, ci, _| {
                fabric_handle(&plan.remote_regions[ri], &publics[ri], ci, &self.peer).map(|_| None)
            })?;
        }
        let mut devs: HashMap<i32, Arc<DevState>> = HashMap::new();
        let mut regions: HashMap<usize, Arc<RegionImport<Imported>>> = HashMap::new();
        let mut bases: HashMap<(usize, usize, i32), u64> = HashMap::new();
        let mut granted: std::collections::HashSet<(usize, usize, i32)> = Default::default();
        let runs = resolve_runs(plan, &publics, |ri, ci, local_dev| {
            // The owner hears of the import (and may refuse it) before anything is opened.
            let region = match (self.same_process, regions.get(&ri)) {
                (true, _) => None,
                (false, Some(r)) => Some(Arc::clone(r)),
                (false, None) => {
                    let r = self.import_region(&plan.remote_regions[ri])?;
                    regions.insert(ri, Arc::clone(&r));
                    Some(r)
                }
            };
            let dev = match devs.get(&local_dev) {
                Some(d) => Arc::clone(d),
                None => {
                    let d = self.inner.dev_state(local_dev)?;
                    devs.insert(local_dev, Arc::clone(&d));
                    d
                }
            };
            let Some(region) = region else {
                // Same process: addressed directly. VMM memory of another GPU is mapped with
                // access for its own device only: grant ours once per mapping.
                let c = &publics[ri].chunks[ci];
                let vmm = c.handles.legacy.is_none();
                if vmm
                    && publics[ri].device as i32 != local_dev
                    && granted.insert((ri, ci, local_dev))
                {
                    let rinfo = &plan.remote_regions[ri];
                    let va = rinfo.desc.addr + c.offset - c.alloc_offset;
                    let size = usize::try_from(c.alloc_size).unwrap_or(usize::MAX);
                    dev.ctx.grant_access(va, size).map_err(|e| {
                        prep_err(format!(
                            "agent '{}' in this process: GPU {local_dev} cannot be given access \
                             to its VMM memory on GPU {} ({e}); peer access between the two \
                             GPUs is needed",
                            self.peer, publics[ri].device
                        ))
                    })?;
                }
                return Ok(None);
            };
            if let Some(b) = bases.get(&(ri, ci, local_dev)) {
                return Ok(Some(*b));
            }
            if fabric {
                handles::common_domain(
                    &self.peer_devices,
                    &publics[ri].uuid,
                    &self.inner.local_fabric().devices,
                    &dev.ctx.uuid(),
                )
                .map_err(|why| {
                    prep_err(format!(
                        "peer '{}' (another node) region {:#x}+{} on its device {}, our \
                         device {local_dev}: {why}",
                        self.peer,
                        plan.remote_regions[ri].desc.addr,
                        plan.remote_regions[ri].desc.len,
                        publics[ri].device
                    ))
                })?;
            }
            // The mapping stays with the region; the address is valid while a post holds it.
            let base = self
                .import_chunk(&region, &publics[ri], ci, &dev)
                .map_err(|e| match invisible_device_hint(&publics[ri].uuid) {
                    Some(h) => prep_err(format!("{e}; {h}")),
                    None => e,
                })?
                .base();
            bases.insert((ri, ci, local_dev), base);
            Ok(Some(base))
        })?;
        let streams = self.inner.cfg.streams_per_device.max(1);
        let mut plans = Vec::with_capacity(runs.len());
        for (local_dev, v) in runs {
            let d = match devs.get(&local_dev) {
                Some(d) => Arc::clone(d),
                None => self.inner.dev_state(local_dev)?,
            };
            let plan = copy::plan(v, streams);
            let gathers = if self.inner.cfg.gather_kernel {
                copy::gather_tables(&plan, &d.ctx, || d.gather())
                    .map_err(|e| cu_err("upload the gather table", e))?
            } else {
                Vec::new()
            };
            plans.push((d, plan, gathers));
        }
        Ok(Resolved {
            plans,
            regions: regions.into_values().collect(),
        })
    }
}

/// Why an import may have failed: the owner's GPU is not among this process's devices (vLLM and
/// others start each worker with `CUDA_VISIBLE_DEVICES` naming its own GPU only). `None` when the
/// device is visible, or when that cannot be told.
pub(super) fn invisible_device_hint(owner_uuid: &[u8; 16]) -> Option<String> {
    let drv = driver::driver().ok()?;
    let visible = (0..drv.device_count()).any(|i| drv.device_uuid(i).ok() == Some(*owner_uuid));
    if visible {
        return None;
    }
    Some(format!(
        "the owner's GPU (uuid {}) is not visible in this process (CUDA_VISIBLE_DEVICES={}): \
         CUDA can map another process's memory only on devices this process can see; make the \
         owner's GPU visible here too (list it in CUDA_VISIBLE_DEVICES after this worker's own \
         GPU, so ordinal 0 stays the same), or move the bytes over another backend",
        uuid_text(owner_uuid),
        std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into())
    ))
}

pub(super) fn uuid_text(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The fabric handle of chunk `ci` of a peer's region: all that a peer on another node can map.
/// Its absence is a prepare error naming the chunk, why it has none and the fix.
pub(super) fn fabric_handle<'a>(
    rinfo: &nixl_core::metadata::RegionInfo,
    public: &'a RegionPublic,
    ci: usize,
    peer: &str,
) -> Result<&'a [u8; 64]> {
    let c = public
        .chunks
        .get(ci)
        .ok_or_else(|| prep_err(format!("peer '{peer}': no chunk {ci}")))?;
    c.handles.fabric.as_ref().ok_or_else(|| {
        let what = if c.handles.legacy.is_some() {
            "cudaMalloc memory, shareable through legacy CUDA IPC on its node only"
        } else {
            "VMM memory allocated without CU_MEM_HANDLE_TYPE_FABRIC (or whose owner could not \
             export a fabric handle: no IMEX channel, or its allow_fabric off), shareable as a \
             POSIX fd on its node only"
        };
        prep_err(format!(
            "peer '{peer}' is on another node, reached through fabric handles only, and chunk \
             {ci} (bytes {}..{} of its region {:#x}+{} on its device {}) has none: it is {what}; \
             allocate that memory with CU_MEM_HANDLE_TYPE_FABRIC (nixl's VmmBuffer with fabric, \
             or PyTorch's allocator configured for fabric handles)",
            c.offset,
            c.offset + c.len,
            rinfo.desc.addr,
            rinfo.desc.len,
            public.device
        ))
    })
}

/// Decodes the cuda data of every remote region of a plan (checked against the region length).
pub(super) fn decode_publics(plan: &XferPlan, peer: &str) -> Result<Vec<RegionPublic>> {
    let mut publics = Vec::with_capacity(plan.remote_regions.len());
    for (i, r) in plan.remote_regions.iter().enumerate() {
        let p = r
            .backends
            .iter()
            .find(|(b, _)| *b == BackendName::Cuda)
            .ok_or_else(|| {
                prep_err(format!(
                    "remote region {i} ({:#x}+{}) is not registered with cuda on peer '{peer}'",
                    r.desc.addr, r.desc.len
                ))
            })?;
        let public = RegionPublic::decode(&p.1, r.desc.len).map_err(|e| {
            prep_err(format!(
                "peer '{peer}' region {:#x}+{}: bad cuda data: {e}",
                r.desc.addr, r.desc.len
            ))
        })?;
        publics.push(public);
    }
    Ok(publics)
}

/// Turns a plan's segments into copies per local device: each remote range is cut at chunk
/// boundaries and addressed through `base_of(region, chunk, local device)`, which gives where the
/// chunk's allocation is mapped here (`None`: the peer is in this process, use its address).
pub(super) fn resolve_runs(
    plan: &XferPlan,
    publics: &[RegionPublic],
    mut base_of: impl FnMut(usize, usize, i32) -> Result<Option<u64>>,
) -> Result<HashMap<i32, Vec<Run>>> {
    let mut runs: HashMap<i32, Vec<Run>> = HashMap::new();
    for (si, s) in plan.segments.iter().enumerate() {
        let ri = s.remote_region as usize;
        let (rinfo, public) = match (plan.remote_regions.get(ri), publics.get(ri)) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(prep_err(format!("segment {si}: no remote region {ri}"))),
        };
        if s.local.len != s.remote.len {
            return Err(prep_err(format!(
                "segment {si}: local and remote lengths differ"
            )));
        }
        let local_dev = i32::try_from(s.local.dev_id)
            .map_err(|_| prep_err(format!("segment {si}: bad local dev_id {}", s.local.dev_id)))?;
        let outside = || prep_err(format!("segment {si}: remote range outside its region"));
        // Offset of the segment in the remote region, then cut at chunk boundaries.
        let mut off = s
            .remote
            .addr
            .checked_sub(rinfo.desc.addr)
            .ok_or_else(outside)?;
        let end = off
            .checked_add(s.remote.len)
            .filter(|e| *e <= rinfo.desc.len)
            .ok_or_else(outside)?;
        let mut local_addr = s.local.addr;
        let out = runs.entry(local_dev).or_default();
        while off < end {
            let ci = public
                .chunk_at(off)
                .ok_or_else(|| prep_err(format!("segment {si}: no chunk at offset {off}")))?;
            let c = &public.chunks[ci];
            let take = (c.offset + c.len).min(end) - off;
            let remote_addr = match base_of(ri, ci, local_dev)? {
                None => rinfo.desc.addr + off,
                Some(base) => base + c.alloc_offset + (off - c.offset),
            };
            out.push(match plan.op {
                XferOp::Read => Run {
                    src: remote_addr,
                    dst: local_addr,
                    len: take,
                },
                XferOp::Write => Run {
                    src: local_addr,
                    dst: remote_addr,
                    len: take,
                },
            });
            off += take;
            local_addr += take;
        }
    }
    Ok(runs)
}

impl Connection for Conn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::RemoteDisconnect {
                peer: self.peer.clone(),
                reason: "connection closed".into(),
            });
        }
        if plan.local_kind != MemKind::Vram || plan.remote_kind != MemKind::Vram {
            return Err(Error::InvalidArgument(format!(
                "cuda moves VRAM to VRAM, not {} to {}",
                plan.local_kind, plan.remote_kind
            )));
        }
        let notifier = self.notifier();
        if plan.notif.is_some() && notifier.is_none() {
            return Err(prep_err(format!(
                "peer '{}' is on another node (reached through fabric handles): {FABRIC_NOTIF}",
                self.peer
            )));
        }
        let resolved = self.resolve(&plan)?;
        Ok(Box::new(Prepared {
            inner: Arc::clone(&self.inner),
            peer: self.peer.clone(),
            closed: Arc::clone(&self.closed),
            notifier,
            resolved: Arc::new(resolved),
            notif: plan.notif,
            initiator: plan.initiator,
        }))
    }

    fn send_notif(&self, from: &str, msg: &[u8]) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::RemoteDisconnect {
                peer: self.peer.clone(),
                reason: "connection closed".into(),
            });
        }
        match self.notifier() {
            Some(n) => n.notify(from, msg),
            None => Err(Error::Backend {
                backend: BackendName::Cuda,
                op: "send_notif",
                reason: format!("peer '{}' is on another node: {FABRIC_NOTIF}", self.peer),
            }),
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(c) = &self.client {
            c.close();
        }
        let why = Error::RemoteDisconnect {
            peer: self.peer.clone(),
            reason: "connection closed".into(),
        };
        let (_, busy) =
            self.inner
                .imports
                .revoke_peer(self.instance, &why, self.inner.cfg.op_timeout);
        self.inner.prune_legacy();
        if busy > 0 {
            tracing::warn!(peer = %self.peer, regions = busy,
                "cuda: copies were still running when the connection closed; their mappings \
                 close when they end");
        }
    }
}

impl PreparedXfer for Prepared {
    fn post(&self, done: Completion) {
        if self.closed.load(Ordering::Acquire) {
            done.complete(Err(Error::RemoteDisconnect {
                peer: self.peer.clone(),
                reason: "connection closed".into(),
            }));
            return;
        }
        let Some(tx) = self.inner.jobs.lock().clone() else {
            done.complete(Err(Error::Cancelled));
            return;
        };
        // The peer regions stay mapped (revocations wait) until the copies are over; a region
        // revoked since prepare fails the post before anything is enqueued.
        let holds = match ipc::hold_all(&self.resolved.regions) {
            Ok(h) => h,
            Err(e) => {
                done.complete(Err(e));
                return;
            }
        };
        let mut events = Vec::new();
        let mut drain = Vec::new();
        let mut enqueue_error = None;
        for (dev, plan, gathers) in &self.resolved.plans {
            let n = dev.streams.len();
            // Rotate the stream assignment so concurrent requests spread over the pool.
            let first = dev.next.fetch_add(1, Ordering::Relaxed) % n;
            let streams: Vec<Arc<Stream>> = (0..n)
                .map(|i| Arc::clone(&dev.streams[(first + i) % n]))
                .collect();
            drain.extend(streams.iter().cloned());
            // SAFETY: local ranges are inside local regions the core validated and holds for this
            // post (the completion keeps them until it is dropped, after the events completed);
            // remote ranges are inside peer chunks mapped in `resolved`, held by the job until
            // its events completed (or the streams were drained after an enqueue failure).
            let r = unsafe {
                copy::enqueue(
                    plan,
                    &streams,
                    &mut events,
                    self.inner.cfg.batch_copies,
                    gathers,
                )
            };
            if let Err(e) = r {
                enqueue_error = Some(cu_err("enqueue copies", e));
                break;
            }
        }
        // A notification without a carrier was refused at prepare.
        let notif = self
            .notif
            .as_ref()
            .zip(self.notifier.as_ref())
            .map(|(m, n)| (Arc::clone(&self.initiator), m.clone(), n.clone()));
        let bytes: u64 = self.resolved.plans.iter().map(|(_, p, _)| p.bytes).sum();
        let job = Job {
            events,
            drain,
            enqueue_error,
            done,
            notif,
            holds,
            _resolved: Arc::clone(&self.resolved),
        };
        // A small request is usually done within microseconds: poll it here, and complete it
        // on this thread when it is (no hand-off to the completion thread and back).
        let wait = self.inner.cfg.inline_wait;
        if job.enqueue_error.is_none() && bytes <= INLINE_MAX_BYTES && !wait.is_zero() {
            let until = Instant::now() + wait + Duration::from_nanos(bytes / 1000);
            loop {
                match job
                    .events
                    .iter()
                    .try_fold(true, |all, e| Ok(all && e.is_done()?))
                {
                    // Done (or failed: `finish` reports the error from the events).
                    Ok(true) | Err::<bool, CuError>(_) => {
                        finish(job);
                        return;
                    }
                    Ok(false) if Instant::now() < until => std::hint::spin_loop(),
                    Ok(false) => break,
                }
            }
        }
        if let Err(crossbeam_channel::SendError(job)) = tx.send(job) {
            // The completion thread is gone (shutdown): finish here.
            finish(job);
        }
    }
}
