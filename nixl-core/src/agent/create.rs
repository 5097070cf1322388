//! Creating transfer requests: resolving descriptors against both sides' registrations, choosing
//! the backend (or the staged path), preparing the plan.

use std::sync::Arc;
use std::time::Duration;

use super::peers::PeerState;
use super::Agent;
use crate::backend::{Backend, BackendName, Runs, Segment, XferPlan};
use crate::error::{Error, Rejections, Result, Unusable};
use crate::mem::{DescList, MemKind};
use crate::metadata::RegionInfo;
use crate::region::Region;
use crate::staging::{ChunkPlan, StagedCut};
use crate::xfer::{Choice, XferInfo, XferOp, XferRequest};

use super::notif::check_notif_len;

/// Options of a transfer request.
#[derive(Clone, Debug, Default)]
pub struct XferOptions {
    /// Bytes delivered to the target after the data of each post has landed there.
    pub notif: Option<Vec<u8>>,
    /// Use this backend instead of the policy's choice (an error if it cannot carry the request).
    pub backend: Option<BackendName>,
    /// Each post ends `TimedOut` if it has not ended this long after it started.
    pub deadline: Option<Duration>,
}

impl Agent {
    /// Creates a transfer request: validates both lists against the registrations on both sides
    /// once, chooses the backend, and prepares it. Post it with [`XferRequest::post`].
    pub fn create_xfer(
        &self,
        op: XferOp,
        local: &DescList,
        remote: &DescList,
        peer: &str,
        opts: XferOptions,
    ) -> Result<XferRequest> {
        self.inner.check_live()?;
        check_notif_len(opts.notif.as_deref())?;
        if local.len() != remote.len() {
            return Err(Error::Mismatch(format!(
                "{} local descriptors, {} remote",
                local.len(),
                remote.len()
            )));
        }
        if local.is_empty() {
            return Err(Error::InvalidArgument("empty transfer".into()));
        }
        let p = self.peer(peer)?;
        let regions = &self.inner.target.0.regions;
        let mut local_regions: Vec<Arc<Region>> = Vec::new();
        let mut remote_idx: Vec<usize> = Vec::new();
        let mut segments = Vec::with_capacity(local.len());
        for (index, (l, r)) in local.descs().iter().zip(remote.descs()).enumerate() {
            if l.len != r.len {
                return Err(Error::Mismatch(format!(
                    "descriptor {index}: local length {} != remote length {}",
                    l.len, r.len
                )));
            }
            let li = regions.find_held(&mut local_regions, local.kind(), l, index)?;
            let ri = p.find_held(&mut remote_idx, remote.kind(), r, index)?;
            segments.push(Segment {
                local: *l,
                remote: *r,
                local_region: li as u32,
                remote_region: ri as u32,
            });
        }
        let remote_regions: Vec<RegionInfo> = remote_idx
            .iter()
            .map(|&i| p.md.regions[i].clone())
            .collect();
        self.finish_xfer(
            &p,
            op,
            (local.kind(), remote.kind()),
            Pieces::Segments(segments),
            local_regions,
            remote_regions,
            opts,
        )
    }

    /// Creates a READ of the peer's `remote` into `local` whose every post ends `TimedOut`
    /// `deadline` after it started, and posts it: the request, in flight.
    pub fn post_read(
        &self,
        local: &DescList,
        remote: &DescList,
        peer: &str,
        deadline: Duration,
    ) -> Result<XferRequest> {
        let opts = XferOptions {
            deadline: Some(deadline),
            ..Default::default()
        };
        let x = self.create_xfer(XferOp::Read, local, remote, peer, opts)?;
        x.post()?;
        Ok(x)
    }

    /// The second half of creating a request, once its segments are resolved: chooses the
    /// backend (or the staged path) and prepares the plan.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_xfer(
        &self,
        p: &Arc<PeerState>,
        op: XferOp,
        (local_kind, remote_kind): (MemKind, MemKind),
        pieces: Pieces,
        local_regions: Vec<Arc<Region>>,
        remote_regions: Vec<RegionInfo>,
        opts: XferOptions,
    ) -> Result<XferRequest> {
        let peer = &*p.name;
        let descs = pieces.len();
        let (backend, reason) = match self.select(
            p,
            op,
            local_kind,
            remote_kind,
            &local_regions,
            &remote_regions,
            &opts,
        ) {
            Ok(x) => x,
            Err(Error::NoBackend {
                peer,
                local_kind,
                remote_kind,
                mut rejected,
            }) => {
                return match self.create_staged(
                    p,
                    op,
                    remote_kind,
                    pieces.into_segments(),
                    local_regions,
                    remote_regions,
                    &opts,
                    &rejected,
                ) {
                    Some(Ok(x)) => Ok(x),
                    Some(Err(why)) => {
                        rejected.staged = Some(why);
                        Err(Error::NoBackend {
                            peer,
                            local_kind,
                            remote_kind,
                            rejected,
                        })
                    }
                    None => Err(Error::NoBackend {
                        peer,
                        local_kind,
                        remote_kind,
                        rejected,
                    }),
                };
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(agent = %self.inner.name, peer, backend = %backend.name(), op = op.as_str(),
            descs, "backend {}: {reason}", backend.name());
        let conn = self.connection(p, backend)?;
        let bytes = pieces.total_bytes();
        let mut plan = XferPlan {
            op,
            local_kind,
            remote_kind,
            segments: Vec::new(),
            local_regions: local_regions.clone(),
            remote_regions,
            notif: opts.notif,
            initiator: Arc::clone(&self.inner.name),
        };
        let prepared = match pieces {
            Pieces::Segments(segments) => {
                plan.segments = segments;
                conn.prepare(plan)?
            }
            Pieces::Runs(runs) => conn.prepare_runs(plan, runs)?,
        };
        Ok(XferRequest::new(
            prepared,
            local_regions,
            XferInfo {
                op,
                backend: backend.name(),
                peer: Arc::clone(&p.name),
                bytes,
                descs,
                reason,
                staged: None,
            },
            opts.deadline,
            Arc::clone(&self.inner.watchdog),
            p.telemetry(backend.name(), op),
        ))
    }

    /// The staged path (see [`crate::staging`]): `None` when no backend stages the local kind;
    /// `Some(Err(why))` when one does but the request cannot go that way.
    #[allow(clippy::too_many_arguments)]
    fn create_staged(
        &self,
        p: &Arc<PeerState>,
        op: XferOp,
        remote_kind: MemKind,
        segments: Vec<Segment>,
        local_regions: Vec<Arc<Region>>,
        remote_regions: Vec<RegionInfo>,
        opts: &XferOptions,
        direct: &Rejections,
    ) -> Option<std::result::Result<XferRequest, Unusable>> {
        let kind = local_regions.first()?.kind;
        let stager = self
            .inner
            .backends
            .iter()
            .filter_map(|b| b.stager())
            .find(|s| s.kind() == kind)?;
        Some(self.create_staged_with(
            stager,
            p,
            op,
            remote_kind,
            segments,
            local_regions,
            remote_regions,
            opts,
            direct,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn create_staged_with(
        &self,
        stager: Arc<dyn crate::staging::Stager>,
        p: &Arc<PeerState>,
        op: XferOp,
        remote_kind: MemKind,
        segments: Vec<Segment>,
        mut local_regions: Vec<Arc<Region>>,
        remote_regions: Vec<RegionInfo>,
        opts: &XferOptions,
        direct: &Rejections,
    ) -> std::result::Result<XferRequest, Unusable> {
        let dram: Vec<Arc<dyn Backend>> = self
            .inner
            .backends
            .iter()
            .filter(|b| b.caps().local_kinds.contains(&MemKind::Dram))
            .cloned()
            .collect();
        let StagedCut { total, bounce, cut } =
            StagedCut::new(&*stager, &segments, dram, &self.inner.next_region)?;
        let bounce_regions = [Arc::clone(&bounce.region)];
        let (backend, _) = self
            .select(
                p,
                op,
                MemKind::Dram,
                remote_kind,
                &bounce_regions,
                &remote_regions,
                opts,
            )
            .map_err(|e| match e {
                Error::NoBackend { rejected, .. } => {
                    Unusable::failed("no backend carries host memory", rejected)
                }
                e => Unusable::from_error(e),
            })?;
        let conn = self.connection(p, backend).map_err(Unusable::from_error)?;
        let telemetry = p.telemetry(backend.name(), op);
        let chunks = ChunkPlan {
            op,
            remote_kind,
            remote_regions: &remote_regions,
            notif: opts.notif.as_ref(),
            initiator: &self.inner.name,
            backend: backend.name(),
            peer: &p.name,
            watchdog: &self.inner.watchdog,
        }
        .prepare(&*conn, cut, &bounce)?;
        let jobs = match self.inner.stage.get() {
            Some(t) => t.sender(),
            None => {
                let t = crate::staging::StageThread::start(&self.inner.name)
                    .map_err(Unusable::from_error)?;
                self.inner.stage.get_or_init(|| t).sender()
            }
        };
        let descs = segments.len();
        local_regions.push(Arc::clone(&bounce.region));
        let staged_by = stager.backend();
        tracing::debug!(agent = %self.inner.name, peer = %p.name, backend = %backend.name(),
            stager = %staged_by, op = op.as_str(), descs, chunks = chunks.len(),
            "staged through host memory");
        let notif = opts.notif.is_some();
        let staged = crate::staging::StagedXfer::new(op, stager, chunks, notif, bounce, jobs);
        Ok(XferRequest::new(
            Box::new(staged),
            local_regions,
            XferInfo {
                op,
                backend: backend.name(),
                peer: Arc::clone(&p.name),
                bytes: total,
                descs,
                reason: Choice::PassedOver(format!(" {direct}")),
                staged: Some(staged_by),
            },
            opts.deadline,
            Arc::clone(&self.inner.watchdog),
            telemetry,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn select<'a>(
        &'a self,
        p: &PeerState,
        _op: XferOp,
        local_kind: MemKind,
        remote_kind: MemKind,
        local_regions: &[Arc<Region>],
        remote_regions: &[RegionInfo],
        opts: &XferOptions,
    ) -> Result<(&'a Arc<dyn Backend>, Choice)> {
        let mut rejected = Rejections::default();
        let candidates: Vec<&Arc<dyn Backend>> = match opts.backend {
            Some(n) => vec![self.backend(n).ok_or_else(|| self.missing_backend(n))?],
            None => self.inner.backends.iter().collect(),
        };
        for b in candidates {
            let n = b.name();
            let caps = b.caps();
            let reject: Option<Unusable> = if !caps.local_kinds.contains(&local_kind) {
                Some(format!("does not move local {}", local_kind).into())
            } else if !caps.remote_kinds.contains(&remote_kind) {
                Some(format!("does not move remote {}", remote_kind).into())
            } else if opts.notif.is_some() && !caps.notifications {
                Some("carries no notifications".into())
            } else if let Some(r) = local_regions.iter().find(|r| !r.has_backend(n)) {
                Some(format!("local region {:?} not registered with it", r.desc).into())
            } else if let Some(r) = remote_regions
                .iter()
                .find(|r| !r.backends.iter().any(|x| x.0 == n))
            {
                Some(format!("remote region {:?} not registered with it", r.desc).into())
            } else {
                match p.backend_info(n) {
                    None => Some("peer does not run it".into()),
                    Some(info) => b.can_reach(&info.conn_info).err(),
                }
            };
            match reject {
                None => {
                    let reason = if opts.backend.is_some() {
                        Choice::Named
                    } else if rejected.is_empty() {
                        Choice::Best
                    } else {
                        Choice::PassedOver(format!(" {rejected}"))
                    };
                    return Ok((b, reason));
                }
                Some(r) => rejected.backends.push((n, r)),
            }
        }
        for (name, why) in &self.inner.unusable {
            rejected
                .backends
                .push((*name, why.clone().context("unavailable")));
        }
        Err(Error::NoBackend {
            peer: p.md.name.clone(),
            local_kind,
            remote_kind,
            rejected,
        })
    }
}

/// A request's pieces as the core resolved them: segments, or compact runs (one region and
/// device per side) for the backends that take them ([`crate::Connection::prepare_runs`]).
pub(super) enum Pieces {
    Segments(Vec<Segment>),
    Runs(Runs),
}

impl Pieces {
    fn len(&self) -> usize {
        match self {
            Pieces::Segments(s) => s.len(),
            Pieces::Runs(r) => r.runs.len(),
        }
    }

    fn total_bytes(&self) -> u64 {
        match self {
            Pieces::Segments(s) => s
                .iter()
                .fold(0u64, |acc, s| acc.saturating_add(s.local.len)),
            Pieces::Runs(r) => r.total_bytes(),
        }
    }

    fn into_segments(self) -> Vec<Segment> {
        match self {
            Pieces::Segments(s) => s,
            Pieces::Runs(r) => r.to_segments(),
        }
    }
}
