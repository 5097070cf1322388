//! Prepared descriptor lists: a list validated once against one side's registrations (this
//! agent's, or a peer's through its loaded metadata), from which requests are made by index
//! arrays with no further lookup (NIXL's `prep_xfer_dlist` / `make_prepped_xfer`).
//!
//! A KV cache of 50 000 blocks is prepared once per side; each handoff then names its blocks by
//! index, and making its request costs one pass over the indices, merging runs that are
//! contiguous on both sides into one segment.

use std::sync::Arc;

use super::{Agent, PeerState};
use crate::backend::{Run, Runs, Segment};
use crate::error::{Error, Result};
use crate::mem::{Desc, DescList, MemKind, Strided, MAX_STRIDED_COUNT};
use crate::metadata::RegionInfo;
use crate::region::Region;
use crate::xfer::{XferOp, XferRequest};
use crate::XferOptions;

use super::create::Pieces;

/// Whose registrations a [`PreppedList`] was checked against.
#[derive(Clone)]
enum Side {
    Local(Vec<Arc<Region>>),
    Remote {
        peer: Arc<PeerState>,
        regions: Vec<RegionInfo>,
    },
}

impl std::fmt::Debug for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Side::Local(r) => write!(f, "Local({} regions)", r.len()),
            Side::Remote { peer, regions } => {
                write!(f, "Remote({}, {} regions)", peer.name, regions.len())
            }
        }
    }
}

/// A descriptor list validated once against one side's registrations: made by
/// [`Agent::prep_local`] or [`Agent::prep_remote`], used by [`Agent::create_xfer_prepped`].
///
/// ```
/// use nixl_core::{Agent, Desc, DescList, MemKind, Strided, XferOp, XferOptions};
/// # fn demo(agent: &Agent, local_base: u64, remote_base: u64) -> nixl_core::Result<()> {
/// // 1000 blocks of 4 KiB on each side, prepared once.
/// let blocks = |base| {
///     let mut l = DescList::new(MemKind::Dram);
///     l.push_strided(Strided { addr: base, stride: 4096, count: 1000, len: 4096, dev_id: 0 })
///         .map(|_| l)
/// };
/// let local = agent.prep_local(&blocks(local_base)?)?;
/// let remote = agent.prep_remote("prefill-0", &blocks(remote_base)?)?;
/// // Read remote blocks 7, 8, 9 into local blocks 0, 1, 2: one merged segment.
/// let req = agent.create_xfer_prepped(
///     XferOp::Read, &local, &[0, 1, 2], &remote, &[7, 8, 9], XferOptions::default())?;
/// assert_eq!(req.info().descs, 1);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PreppedList {
    kind: MemKind,
    descs: Descs,
    side: Side,
}

/// The descriptors of a prepared list: explicit, or one strided run computed on the fly (no
/// memory read per index, which is what makes 100k-block requests cheap).
#[derive(Clone, Debug)]
enum Descs {
    List {
        descs: Vec<Desc>,
        /// Per descriptor, its region's index in `side`.
        region_of: Vec<u32>,
    },
    /// An explicit list whose descriptors all have one length and device and lie in region 0
    /// of `side`: 8 bytes per descriptor (a KV cache's blocks), read once per index.
    Uniform {
        addrs: Vec<u64>,
        len: u64,
        dev_id: u64,
    },
    /// Every piece lies in region 0 of `side`.
    Strided(Strided),
}

/// The pieces of a uniform list.
enum UniformAt<'a> {
    Addrs(&'a [u64]),
    Strided(Strided),
}

/// The address of piece `i` of a uniform list (`None` past its end).
trait AddrAt {
    fn at(&self, i: u32) -> Option<u64>;
}

impl AddrAt for &[u64] {
    #[inline(always)]
    fn at(&self, i: u32) -> Option<u64> {
        self.get(i as usize).copied()
    }
}

impl AddrAt for Strided {
    #[inline(always)]
    fn at(&self, i: u32) -> Option<u64> {
        // In range, `addr + i·stride` lies inside the span checked at preparation.
        (u64::from(i) < self.count).then(|| self.addr + u64::from(i) * self.stride)
    }
}

/// Builds a request's runs from two uniform lists (pieces of `len` bytes): one pass over the
/// indices, every index checked against its list, runs contiguous on both sides merged.
fn uniform_runs<L: AddrAt, R: AddrAt>(
    l: L,
    local_idx: &[u32],
    r: R,
    remote_idx: &[u32],
    len: u64,
) -> std::result::Result<Vec<Run>, usize> {
    let mut runs: Vec<Run> = Vec::with_capacity(local_idx.len());
    let mut last = Run {
        local: 0,
        remote: 0,
        len: 0,
    };
    for (k, (&li, &ri)) in local_idx.iter().zip(remote_idx).enumerate() {
        let (Some(la), Some(ra)) = (l.at(li), r.at(ri)) else {
            return Err(k);
        };
        // `last` lies in the regions (checked at preparation), so the sums cannot overflow.
        if last.len != 0 && last.local + last.len == la && last.remote + last.len == ra {
            last.len += len;
            continue;
        }
        if last.len != 0 {
            runs.push(last);
        }
        last = Run {
            local: la,
            remote: ra,
            len,
        };
    }
    if last.len != 0 {
        runs.push(last);
    }
    Ok(runs)
}

impl Descs {
    /// The compact form when every descriptor has one length and device and there is one
    /// region; the explicit list otherwise.
    fn new(descs: &[Desc], region_of: Vec<u32>, regions: usize) -> Descs {
        let first = descs[0];
        if regions == 1
            && descs
                .iter()
                .all(|d| d.len == first.len && d.dev_id == first.dev_id)
        {
            return Descs::Uniform {
                addrs: descs.iter().map(|d| d.addr).collect(),
                len: first.len,
                dev_id: first.dev_id,
            };
        }
        Descs::List {
            descs: descs.to_vec(),
            region_of,
        }
    }

    /// `(addresses, length, device)` of a list whose pieces all have one length and device and
    /// lie in region 0.
    fn uniform(&self) -> Option<(UniformAt<'_>, u64, u64)> {
        match self {
            Descs::List { .. } => None,
            Descs::Uniform { addrs, len, dev_id } => Some((UniformAt::Addrs(addrs), *len, *dev_id)),
            Descs::Strided(s) => Some((UniformAt::Strided(*s), s.len, s.dev_id)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Descs::List { descs, .. } => descs.len(),
            Descs::Uniform { addrs, .. } => addrs.len(),
            Descs::Strided(s) => s.count as usize,
        }
    }

    #[inline]
    fn get(&self, i: usize) -> Option<(Desc, usize)> {
        match self {
            Descs::List { descs, region_of } => Some((*descs.get(i)?, *region_of.get(i)? as usize)),
            Descs::Uniform { addrs, len, dev_id } => {
                Some((Desc::new(*addrs.get(i)?, *len, *dev_id), 0))
            }
            Descs::Strided(s) => ((i as u64) < s.count)
                .then(|| (Desc::new(s.addr + i as u64 * s.stride, s.len, s.dev_id), 0)),
        }
    }

    fn first_with_region(&self, k: usize) -> usize {
        match self {
            Descs::List { region_of, .. } => {
                region_of.iter().position(|&x| x as usize == k).unwrap_or(0)
            }
            Descs::Uniform { .. } | Descs::Strided(_) => 0,
        }
    }
}

impl PreppedList {
    /// Number of descriptors (the valid indices are `0..len()`).
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether the list is empty (never, once prepared).
    pub fn is_empty(&self) -> bool {
        self.descs.len() == 0
    }

    /// The memory kind of the list.
    pub fn kind(&self) -> MemKind {
        self.kind
    }

    /// Descriptor `i`, if in range.
    pub fn desc(&self, i: usize) -> Option<Desc> {
        self.descs.get(i).map(|(d, _)| d)
    }

    /// The peer whose metadata it was checked against (`None`: this agent's registrations).
    pub fn peer(&self) -> Option<&str> {
        match &self.side {
            Side::Local(_) => None,
            Side::Remote { peer, .. } => Some(&peer.name),
        }
    }
}

fn check_len(list: &DescList) -> Result<()> {
    if list.is_empty() {
        return Err(Error::InvalidArgument("empty descriptor list".into()));
    }
    if list.len() as u64 > MAX_STRIDED_COUNT {
        return Err(Error::InvalidArgument(format!(
            "a prepared list of {} descriptors is over the limit of {MAX_STRIDED_COUNT}",
            list.len()
        )));
    }
    Ok(())
}

impl Agent {
    /// Prepares `list` against this agent's registrations: every descriptor must lie inside a
    /// region registered now. The list holds the regions (a later deregistration makes posts of
    /// its requests fail with `LocalNotRegistered`, never touch freed memory).
    pub fn prep_local(&self, list: &DescList) -> Result<PreppedList> {
        self.inner.check_live()?;
        check_len(list)?;
        let table = &self.inner.target.0.regions;
        let mut regions: Vec<Arc<Region>> = Vec::new();
        let mut region_of = Vec::with_capacity(list.len());
        for (index, d) in list.descs().iter().enumerate() {
            let i = table.find_held(&mut regions, list.kind(), d, index)?;
            region_of.push(i as u32);
        }
        Ok(PreppedList {
            kind: list.kind(),
            descs: Descs::new(list.descs(), region_of, regions.len()),
            side: Side::Local(regions),
        })
    }

    /// Prepares `list` against `peer`'s loaded metadata: every descriptor must lie inside a
    /// region the peer published. If the peer's metadata is reloaded later, requests made from
    /// the list check that its regions are still published (and fail with `RemoteNotRegistered`
    /// otherwise; a restarted peer needs the list prepared again).
    pub fn prep_remote(&self, peer: &str, list: &DescList) -> Result<PreppedList> {
        self.inner.check_live()?;
        check_len(list)?;
        let p = self.peer(peer)?;
        let mut idx: Vec<usize> = Vec::new();
        let mut region_of = Vec::with_capacity(list.len());
        for (index, d) in list.descs().iter().enumerate() {
            let i = p.find_held(&mut idx, list.kind(), d, index)?;
            region_of.push(i as u32);
        }
        let regions = idx.iter().map(|&i| p.md.regions[i].clone()).collect();
        let descs = Descs::new(list.descs(), region_of, idx.len());
        Ok(PreppedList {
            kind: list.kind(),
            descs,
            side: Side::Remote { peer: p, regions },
        })
    }

    /// Prepares one strided run against this agent's registrations: its whole span must lie in
    /// one registered region. Requests index its pieces (`0..count`) with no memory read per
    /// index.
    pub fn prep_local_strided(&self, kind: MemKind, s: Strided) -> Result<PreppedList> {
        self.inner.check_live()?;
        let span = s.span()?;
        let r = self
            .inner
            .target
            .0
            .regions
            .find(kind, &span)
            .ok_or(Error::LocalNotRegistered {
                index: 0,
                kind,
                desc: span,
            })?;
        Ok(PreppedList {
            kind,
            descs: Descs::Strided(s),
            side: Side::Local(vec![r]),
        })
    }

    /// Prepares one strided run against `peer`'s loaded metadata: its whole span must lie in
    /// one region the peer published.
    pub fn prep_remote_strided(
        &self,
        peer: &str,
        kind: MemKind,
        s: Strided,
    ) -> Result<PreppedList> {
        self.inner.check_live()?;
        let span = s.span()?;
        let p = self.peer(peer)?;
        let (_, r) = p
            .find(kind, &span)
            .ok_or_else(|| Error::RemoteNotRegistered {
                peer: peer.to_owned(),
                index: 0,
                kind,
                desc: span,
            })?;
        let regions = vec![r.clone()];
        Ok(PreppedList {
            kind,
            descs: Descs::Strided(s),
            side: Side::Remote { peer: p, regions },
        })
    }

    /// Creates a request from two prepared lists: segment `k` moves `local[local_idx[k]]` and
    /// `remote[remote_idx[k]]` (equal lengths). Runs that are contiguous on both sides (same
    /// regions) are merged into one segment. Costs one pass over the indices: no region lookup.
    ///
    /// Errors: index arrays of different lengths or empty, an index out of range, lengths that
    /// differ, a `local` list not prepared locally or a `remote` list not prepared against a
    /// peer, a local region deregistered since, or a peer whose reloaded metadata no longer
    /// publishes a region of the list.
    pub fn create_xfer_prepped(
        &self,
        op: XferOp,
        local: &PreppedList,
        local_idx: &[u32],
        remote: &PreppedList,
        remote_idx: &[u32],
        opts: XferOptions,
    ) -> Result<XferRequest> {
        self.inner.check_live()?;
        super::notif::check_notif_len(opts.notif.as_deref())?;
        if local_idx.len() != remote_idx.len() {
            return Err(Error::Mismatch(format!(
                "{} local indices, {} remote",
                local_idx.len(),
                remote_idx.len()
            )));
        }
        if local_idx.is_empty() {
            return Err(Error::InvalidArgument("empty transfer".into()));
        }
        let Side::Local(lregs) = &local.side else {
            return Err(Error::InvalidArgument(
                "the local list was prepared against a peer (use prep_local)".into(),
            ));
        };
        let Side::Remote {
            peer: prepped_peer,
            regions: rregs,
        } = &remote.side
        else {
            return Err(Error::InvalidArgument(
                "the remote list was prepared locally (use prep_remote)".into(),
            ));
        };
        let p = self.peer(&prepped_peer.name)?;
        // The peer's metadata may have been reloaded since: keep using the regions only if the
        // same instance still publishes each of them (with its current keys).
        let rregs: Vec<RegionInfo> = if Arc::ptr_eq(&p, prepped_peer) {
            rregs.clone()
        } else {
            if p.md.instance_id != prepped_peer.md.instance_id {
                return Err(Error::StaleMetadata {
                    peer: p.name.to_string(),
                    have: prepped_peer.md.generation,
                    got: p.md.generation,
                });
            }
            rregs
                .iter()
                .enumerate()
                .map(|(k, r)| match p.find(r.kind, &r.desc) {
                    Some((_, now)) if now.desc == r.desc => Ok(now.clone()),
                    _ => Err(Error::RemoteNotRegistered {
                        peer: p.name.to_string(),
                        index: remote.descs.first_with_region(k),
                        kind: r.kind,
                        desc: r.desc,
                    }),
                })
                .collect::<Result<_>>()?
        };
        for r in lregs {
            if r.gate.is_closed() {
                return Err(Error::LocalNotRegistered {
                    index: 0,
                    kind: r.kind,
                    desc: r.desc,
                });
            }
        }
        if let (Some((la, llen, ldev)), Some((ra, rlen, rdev))) =
            (local.descs.uniform(), remote.descs.uniform())
        {
            // One region per side, one length per side: runs, no region bookkeeping.
            let out_of_range = |k: usize| {
                Error::InvalidArgument(format!(
                    "pair {k}: index {} of {} local or {} of {} remote descriptors is out of range",
                    local_idx[k],
                    local.len(),
                    remote_idx[k],
                    remote.len()
                ))
            };
            if llen != rlen {
                // Every pair differs: report pair 0 (its range first, as the general path).
                if local.descs.get(local_idx[0] as usize).is_none()
                    || remote.descs.get(remote_idx[0] as usize).is_none()
                {
                    return Err(out_of_range(0));
                }
                return Err(Error::Mismatch(format!(
                    "pair 0: local length {llen} != remote length {rlen}"
                )));
            }
            let runs = match (la, ra) {
                (UniformAt::Addrs(l), UniformAt::Addrs(r)) => {
                    uniform_runs(l, local_idx, r, remote_idx, llen)
                }
                (UniformAt::Addrs(l), UniformAt::Strided(r)) => {
                    uniform_runs(l, local_idx, r, remote_idx, llen)
                }
                (UniformAt::Strided(l), UniformAt::Addrs(r)) => {
                    uniform_runs(l, local_idx, r, remote_idx, llen)
                }
                (UniformAt::Strided(l), UniformAt::Strided(r)) => {
                    uniform_runs(l, local_idx, r, remote_idx, llen)
                }
            }
            .map_err(out_of_range)?;
            return self.finish_xfer(
                &p,
                op,
                (local.kind, remote.kind),
                Pieces::Runs(Runs {
                    runs,
                    local_dev: ldev,
                    remote_dev: rdev,
                }),
                vec![Arc::clone(&lregs[0])],
                vec![rregs[0].clone()],
                opts,
            );
        }
        // Regions of the lists -> regions of this request, in order of first use.
        const UNUSED: u32 = u32::MAX;
        let mut lmap = vec![UNUSED; lregs.len()];
        let mut rmap = vec![UNUSED; rregs.len()];
        let mut plan_l: Vec<Arc<Region>> = Vec::new();
        let mut plan_r: Vec<RegionInfo> = Vec::new();
        let mut segments: Vec<Segment> = Vec::with_capacity(local_idx.len());
        for (k, (&li, &ri)) in local_idx.iter().zip(remote_idx).enumerate() {
            let (Some((l, lr)), Some((r, rr))) =
                (local.descs.get(li as usize), remote.descs.get(ri as usize))
            else {
                return Err(Error::InvalidArgument(format!(
                    "pair {k}: index {li} of {} local or {ri} of {} remote descriptors is out of range",
                    local.len(),
                    remote.len()
                )));
            };
            if l.len != r.len {
                return Err(Error::Mismatch(format!(
                    "pair {k}: local length {} != remote length {}",
                    l.len, r.len
                )));
            }
            if let Some(last) = segments.last_mut() {
                if lmap[lr] == last.local_region
                    && rmap[rr] == last.remote_region
                    && last.local.dev_id == l.dev_id
                    && last.remote.dev_id == r.dev_id
                    && last.local.addr + last.local.len == l.addr
                    && last.remote.addr + last.remote.len == r.addr
                {
                    // Both lie in the regions of `last`, so the sums cannot overflow.
                    last.local.len += l.len;
                    last.remote.len += r.len;
                    continue;
                }
            }
            if lmap[lr] == UNUSED {
                lmap[lr] = plan_l.len() as u32;
                plan_l.push(Arc::clone(&lregs[lr]));
            }
            if rmap[rr] == UNUSED {
                rmap[rr] = plan_r.len() as u32;
                plan_r.push(rregs[rr].clone());
            }
            segments.push(Segment {
                local: l,
                remote: r,
                local_region: lmap[lr],
                remote_region: rmap[rr],
            });
        }
        self.finish_xfer(
            &p,
            op,
            (local.kind, remote.kind),
            Pieces::Segments(segments),
            plan_l,
            plan_r,
            opts,
        )
    }
}
