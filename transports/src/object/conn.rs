//! The connection to the store and how a request is cut into ranged GETs and objects to
//! write.

use super::*;

pub(super) struct ObjectConn {
    pub(super) inner: Arc<Inner>,
    pub(super) target: TargetHandle,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) s3: Arc<S3>,
}

impl fmt::Debug for ObjectConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectConn")
            .field("agent", &self.target.name())
            .finish_non_exhaustive()
    }
}

/// One ranged GET: `len` bytes of object `obj` from `offset`, scattered into `pieces`
/// (address, length) of registered DRAM, in object order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RangeOp {
    pub(super) obj: usize,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) pieces: Vec<(u64, u64)>,
}

/// Most memory pieces one GET scatters into.
pub(super) const MAX_PIECES: usize = 4096;

/// Cuts READ segments into GETs: consecutive ranges of one object are merged (up to
/// `max_range` bytes and [`MAX_PIECES`] pieces), long ones split. `segments` are (memory,
/// index of the object, offset in the object).
pub(super) fn plan_ranges(segments: &[(Desc, usize, u64)], max_range: u64) -> Vec<RangeOp> {
    let mut ops: Vec<RangeOp> = Vec::new();
    for &(mem, obj, off) in segments {
        let mut done = 0u64;
        while done < mem.len {
            let (addr, o) = (mem.addr + done, off + done);
            let room = match ops.last() {
                Some(op)
                    if op.obj == obj
                        && op.offset + op.len == o
                        && op.pieces.len() < MAX_PIECES
                        && op.len < max_range =>
                {
                    max_range - op.len
                }
                _ => {
                    ops.push(RangeOp {
                        obj,
                        offset: o,
                        len: 0,
                        pieces: Vec::new(),
                    });
                    max_range
                }
            };
            let take = room.min(mem.len - done);
            let op = ops.last_mut().expect("pushed above");
            match op.pieces.last_mut() {
                Some(last) if last.0 + last.1 == addr => last.1 += take,
                _ => op.pieces.push((addr, take)),
            }
            op.len += take;
            done += take;
        }
    }
    ops
}

/// One object written by a WRITE: `len` bytes from `addr` in registered DRAM.
#[derive(Clone, Debug)]
pub(super) struct WriteObj {
    pub(super) name: ObjectName,
    pub(super) addr: u64,
    pub(super) len: u64,
    /// Number of multipart parts; 0 for a single PUT.
    pub(super) parts: u64,
}

#[derive(Debug)]
pub(super) enum Work {
    Read {
        names: Arc<[ObjectName]>,
        ops: Arc<[RangeOp]>,
    },
    Write(Arc<[WriteObj]>),
}

/// Settings a request runs with.
#[derive(Clone, Debug)]
pub(super) struct Run {
    pub(super) s3: Arc<S3>,
    pub(super) conc: usize,
    pub(super) timeout: Duration,
    pub(super) part_size: u64,
}

pub(super) struct ObjectXfer {
    pub(super) work: Arc<Work>,
    pub(super) run: Run,
    pub(super) remote_regions: Arc<[Arc<Region>]>,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) current: Mutex<Weak<Post>>,
}

impl fmt::Debug for ObjectXfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectXfer")
            .field("work", &self.work)
            .finish_non_exhaustive()
    }
}

impl Connection for ObjectConn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        if plan.local_kind != MemKind::Dram || plan.remote_kind != MemKind::Object {
            return Err(Error::InvalidArgument(format!(
                "object moves DRAM <-> OBJECT, not {} <-> {}",
                plan.local_kind, plan.remote_kind
            )));
        }
        let remote_regions = owner_check(&self.target, &plan, self.target.name(), "object")?;
        let cfg = &self.inner.cfg;
        let work = match plan.op {
            XferOp::Read => {
                let mut ids: Vec<u64> = Vec::new();
                let mut names: Vec<ObjectName> = Vec::new();
                let mut segs = Vec::with_capacity(plan.segments.len());
                for s in &plan.segments {
                    let id = s.remote.dev_id;
                    let obj = match ids.iter().rposition(|&x| x == id) {
                        Some(i) => i,
                        None => {
                            names.push(self.inner.name_or_err(id)?);
                            ids.push(id);
                            ids.len() - 1
                        }
                    };
                    segs.push((s.local, obj, s.remote.addr));
                }
                let ops = plan_ranges(&segs, cfg.part_size as u64);
                Work::Read {
                    names: names.into(),
                    ops: ops.into(),
                }
            }
            XferOp::Write => {
                let mut objs: Vec<WriteObj> = Vec::with_capacity(plan.segments.len());
                let mut seen: Vec<u64> = Vec::with_capacity(plan.segments.len());
                for (i, s) in plan.segments.iter().enumerate() {
                    let id = s.remote.dev_id;
                    let name = self.inner.name_or_err(id)?;
                    let size = plan.remote_regions[s.remote_region as usize].desc.len;
                    if s.remote.addr != 0 || s.remote.len != size {
                        return Err(Error::InvalidDesc {
                            index: i,
                            reason: format!(
                                "WRITE of object {id} ({name}) must cover the whole object \
                                 (offset 0, length {size} as registered): S3 cannot write part \
                                 of an object; this one is offset {} length {}",
                                s.remote.addr, s.remote.len
                            ),
                        });
                    }
                    if seen.contains(&id) {
                        return Err(Error::InvalidDesc {
                            index: i,
                            reason: format!(
                                "object {id} ({name}) is written by two descriptors of one \
                                 WRITE"
                            ),
                        });
                    }
                    seen.push(id);
                    let parts = if s.local.len > cfg.multipart_threshold as u64 {
                        s.local.len.div_ceil(cfg.part_size as u64)
                    } else {
                        0
                    };
                    if parts > 10_000 {
                        return Err(Error::InvalidDesc {
                            index: i,
                            reason: format!(
                                "object {id} ({name}) of {} bytes needs {parts} parts of \
                                 {} bytes; S3 allows 10000 (raise [object] part_size)",
                                s.local.len, cfg.part_size
                            ),
                        });
                    }
                    objs.push(WriteObj {
                        name,
                        addr: s.local.addr,
                        len: s.local.len,
                        parts,
                    });
                }
                Work::Write(objs.into())
            }
        };
        Ok(Box::new(ObjectXfer {
            work: Arc::new(work),
            run: Run {
                s3: Arc::clone(&self.s3),
                conc: cfg.max_concurrency,
                timeout: cfg.request_timeout,
                part_size: cfg.part_size as u64,
            },
            remote_regions: remote_regions.into(),
            rt: self.rt.clone(),
            stop: self.inner.stop.subscribe(),
            current: Mutex::new(Weak::new()),
        }))
    }

    fn send_notif(&self, _from: &str, _msg: &[u8]) -> Result<()> {
        Err(backend_err(
            "notification",
            "object carries no notifications",
        ))
    }

    fn close(&self) {}
}
