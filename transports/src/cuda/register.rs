//! Registering device memory, the completion thread, and what the owner's socket grants.

use super::*;

impl Inner {
    pub(super) fn dev_state(&self, ordinal: i32) -> Result<Arc<DevState>> {
        let mut m = self.devices.lock();
        if let Some(d) = m.get(&ordinal) {
            return Ok(Arc::clone(d));
        }
        let ctx = device(ordinal)?;
        let n = self.cfg.streams_per_device.max(1);
        let mut streams = Vec::with_capacity(n);
        for _ in 0..n {
            streams.push(Arc::new(
                Stream::new(&ctx).map_err(|e| cu_err("create streams", e))?,
            ));
        }
        let d = Arc::new(DevState {
            ctx,
            streams,
            next: AtomicUsize::new(0),
            gather: OnceLock::new(),
        });
        m.insert(ordinal, Arc::clone(&d));
        Ok(d)
    }

    /// Our devices' NVLink domains (the override's, or probed once).
    pub(super) fn local_fabric(&self) -> &LocalFabric {
        self.local_fabric.get_or_init(
            || match self.node.as_ref().and_then(|n| n.devices.clone()) {
                Some(devices) if self.cfg.allow_fabric => LocalFabric {
                    devices,
                    note: String::new(),
                },
                _ => probe_local_fabric(self.cfg.allow_fabric),
            },
        )
    }

    /// What we publish (and compare a peer's info with).
    pub(super) fn our_conn_info(&self, path: &str) -> ConnInfo {
        let lf = self.local_fabric();
        ConnInfo {
            boot_id: match &self.node {
                Some(n) => n.node_id.clone(),
                None => ipc::boot_id(),
            },
            socket: path.to_owned(),
            uid: ipc::uid(),
            pid: std::process::id(),
            fabric: self.fabric_supported(),
            devices: lf.devices.clone(),
            fabric_note: lf.note.clone(),
            control: self
                .control
                .as_ref()
                .map(|c| c.endpoint())
                .unwrap_or_default(),
        }
    }

    pub(super) fn fabric_supported(&self) -> bool {
        *self.fabric.get_or_init(|| {
            if self.node.as_ref().is_some_and(|n| n.devices.is_some()) {
                return self.cfg.allow_fabric;
            }
            self.cfg.allow_fabric
                && driver::driver()
                    .is_ok_and(|d| (0..d.device_count()).any(|i| d.device_supports_fabric(i)))
        })
    }

    pub(super) fn register_vram(&self, desc: &Desc) -> Result<Vec<u8>> {
        driver::driver().map_err(unavailable)?;
        let dev = i32::try_from(desc.dev_id)
            .ok()
            .filter(|d| *d >= 0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("VRAM dev_id {} is not a GPU ordinal", desc.dev_id))
            })?;
        let ctx = device(dev)?;
        let _g = ctx.enter().map_err(|e| cu_err("register", e))?;
        let map = DriverMap { ctx: &ctx };
        let allow_fabric = self.cfg.allow_fabric && ctx.fabric_supported();
        let planned =
            handles::plan_chunks(&map, desc.addr, desc.len, allow_fabric).map_err(|reason| {
                Error::Backend {
                    backend: BackendName::Cuda,
                    op: "register",
                    reason: format!(
                        "VRAM {:#x}+{} on device {dev}: {reason}",
                        desc.addr, desc.len
                    ),
                }
            })?;
        let mut chunks = Vec::with_capacity(planned.len());
        let mut fds = Vec::with_capacity(planned.len());
        for p in &planned {
            let chunk_addr = desc.addr + p.offset;
            let mut h = ChunkHandles {
                legacy: None,
                posix_fd: false,
                fabric: None,
            };
            let mut fd = None;
            match p.alloc.kind {
                AllocKind::Legacy { .. } => {
                    h.legacy = Some(
                        ctx.ipc_handle(p.alloc.base)
                            .map_err(|e| cu_err("register (legacy IPC export)", e))?,
                    );
                }
                AllocKind::Vmm { handle_types } => {
                    if handle_types & driver::HANDLE_POSIX_FD != 0 {
                        fd = Some(ctx.export_fd(chunk_addr).map_err(|mut e| {
                            // Out of fds shows as a driver error with errno EMFILE left behind.
                            let errno = std::io::Error::last_os_error().raw_os_error();
                            if let Some(h) = errno.and_then(crate::limits::nofile_hint) {
                                e.name = format!("{}; {h}", e.name);
                            }
                            cu_err("register (VMM fd export)", e)
                        })?);
                        h.posix_fd = true;
                    }
                    if p.fabric {
                        match ctx.export_fabric(chunk_addr) {
                            Ok(f) => h.fabric = Some(f),
                            // Fabric export needs the IMEX service; an fd still works on one node.
                            Err(e) if h.posix_fd => {
                                tracing::debug!(error = %e, "cuda: no fabric handle for a chunk")
                            }
                            Err(e) => return Err(cu_err("register (VMM fabric export)", e)),
                        }
                    }
                }
            }
            chunks.push(Chunk {
                offset: p.offset,
                len: p.len,
                alloc_size: p.alloc.size,
                alloc_offset: p.alloc_offset,
                handles: h,
            });
            fds.push(fd);
        }
        let public = RegionPublic {
            device: dev as u32,
            uuid: ctx.uuid(),
            chunks,
        };
        let bytes = public.encode();
        self.regs.lock().insert(
            (desc.dev_id, desc.addr, desc.len),
            Arc::new(Registration { public, fds }),
        );
        Ok(bytes)
    }

    pub(super) fn start_completer(self: &Arc<Self>) -> Result<()> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        std::thread::Builder::new()
            .name("nixl-cuda-done".into())
            .spawn(move || {
                for job in rx.iter() {
                    finish(job);
                }
            })
            .map_err(|e| Error::io("cuda: spawn the completion thread", e))?;
        *self.jobs.lock() = Some(tx);
        Ok(())
    }
}

/// Waits for a post's copies, delivers its notification, completes it once.
pub(super) fn finish(job: Job) {
    let Job {
        events,
        drain,
        enqueue_error,
        done,
        notif,
        holds,
        _resolved,
    } = job;
    let mut outcome: Result<()> = Ok(());
    for ev in &events {
        if let Err(e) = ev.wait() {
            if outcome.is_ok() {
                outcome = Err(cu_err("device copy", e));
            }
        }
    }
    if let Some(e) = enqueue_error {
        // Copies enqueued before the failure may still run: let them end before the memory is
        // released.
        for s in &drain {
            let _ = s.synchronize();
        }
        outcome = Err(e);
    }
    // The copies are over: the peer regions may be revoked from now on (before the notification,
    // whose answer comes through the reader that handles revocations).
    drop(holds);
    if outcome.is_ok() {
        if let Some((from, msg, to)) = notif {
            outcome = to.notify(&from, &msg);
        }
    }
    drop(events);
    done.complete(outcome);
}

/// The driver as an [`AllocationMap`] (the context must be current).
pub(super) struct DriverMap<'a> {
    pub(super) ctx: &'a Arc<DeviceCtx>,
}

impl AllocationMap for DriverMap<'_> {
    fn lookup(&self, addr: u64) -> std::result::Result<AllocInfo, String> {
        let a = self
            .ctx
            .query_allocation(addr)
            .map_err(|e| format!("address {addr:#x} is not CUDA device memory ({e})"))?;
        if !a.device_memory {
            return Err(format!(
                "address {addr:#x} is host or managed memory, not VRAM (register it as DRAM)"
            ));
        }
        if a.ordinal != self.ctx.ordinal() {
            return Err(format!(
                "address {addr:#x} is on device {}, the descriptor says dev_id {}",
                a.ordinal,
                self.ctx.ordinal()
            ));
        }
        Ok(AllocInfo {
            base: a.base,
            size: a.size,
            kind: match a.vmm_handle_types {
                Some(handle_types) => AllocKind::Vmm { handle_types },
                None => AllocKind::Legacy {
                    ipc_capable: a.legacy_ipc,
                },
            },
        })
    }
}

impl Inner {
    /// The owner-side check of a peer's access to a whole registered region: registered with
    /// cuda, in bounds, with its key. The access holds the region (a deregistration waits for it).
    pub(super) fn check_whole(
        &self,
        region: &Desc,
        key: u64,
    ) -> std::result::Result<(nixl_core::RegionAccess, Arc<Registration>), String> {
        let target = self.target.get().ok_or("the agent is starting")?;
        let access = target
            .check(MemKind::Vram, region, key)
            .map_err(|d| d.to_string())?;
        let r = access.region();
        if r.desc != *region {
            return Err(format!(
                "{:#x}+{} is not a whole registered region",
                region.addr, region.len
            ));
        }
        let reg = self
            .regs
            .lock()
            .get(&(r.desc.dev_id, r.desc.addr, r.desc.len))
            .cloned()
            .ok_or("region is not registered with cuda")?;
        Ok((access, reg))
    }
}

impl GrantSource for Inner {
    fn grant(&self, region: &Desc, key: u64, chunk: u32) -> std::result::Result<Grant, String> {
        let (access, reg) = self.check_whole(region, key)?;
        let c = reg.public.chunks.get(chunk as usize).ok_or_else(|| {
            format!(
                "region has {} chunks, not {}",
                reg.public.chunks.len(),
                chunk + 1
            )
        })?;
        let fd = reg
            .fds
            .get(chunk as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                format!("chunk {chunk} has no POSIX fd (legacy or fabric-only memory)")
            })?;
        let dup = fd.try_clone().map_err(|e| format!("dup: {e}"))?;
        Ok(Grant {
            fd: dup,
            alloc_size: c.alloc_size,
            _hold: Box::new(access),
        })
    }

    fn opened(&self, region: &Desc, key: u64) -> std::result::Result<Hold, String> {
        let (access, _) = self.check_whole(region, key)?;
        Ok(Box::new(access))
    }

    fn notify(&self, from: &str, msg: Vec<u8>) {
        if let Some(t) = self.target.get() {
            // A refusal (queue over its budget) is counted and logged by `deliver`.
            let _ = t.deliver(from, msg);
        }
    }
}
