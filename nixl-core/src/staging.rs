//! The staged path: device memory carried by a backend that reaches only host memory.
//!
//! When no backend moves a request's local memory kind to the peer (VRAM to a peer over `tcp`,
//! VRAM to a file through `uring`), but a backend offers a [`Stager`] for that kind (the `cuda`
//! backend, through pinned host buffers), the agent builds the request through host memory:
//!
//! - at creation it cuts the request into chunks of at most [`Stager::chunk_bytes`], allocates a
//!   host buffer of [`Stager::slots`] chunks (the stager's pinned memory: bounded, whatever the
//!   request's size), registers it *privately* with every backend that moves DRAM (it never
//!   appears in the agent's metadata, so no peer can name it), and prepares one ordinary DRAM
//!   request per chunk on the best backend for it, by the same policy as any other request;
//! - each post runs on the agent's staging thread, pipelined over the slots: a WRITE copies
//!   chunk k device → host while the chunks before it are on their way; a READ copies each chunk
//!   host → device as soon as it has arrived, while the next ones are read. The notification, if
//!   any, goes with the last chunk, posted only after every other chunk has landed. The first
//!   failure cancels the chunks in flight and waits until no backend holds them before the
//!   post ends;
//! - the request says so: [`crate::XferInfo::staged`] names the stager, and
//!   [`crate::XferInfo::backend`] the backend that carried the bytes.
//!
//! A request is staged only when no backend can carry it directly; the reason the direct
//! backends were passed over stays in [`crate::XferInfo::reason`]. The staging thread runs one
//! staged post at a time.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, BackendName, Connection, PreparedXfer, Segment, XferPlan};
use crate::error::{Error, Result, Unusable};
use crate::mem::{Desc, MemKind};
use crate::metadata::RegionInfo;
use crate::region::Region;
use crate::xfer::{Choice, Completion, Watchdog, XferInfo, XferOp, XferRequest};

/// Host memory for staging, owned by the stager that allocated it (pinned where the device
/// needs it); freed on drop.
///
/// # Safety
/// The agent registers `addr()..addr() + len()` as DRAM and lets backends and the stager write
/// it with raw pointers, so an implementation guarantees that this range is memory it owns,
/// readable and writable, that nothing else (no Rust reference, no other buffer) uses, and that
/// both values stay the same and the memory stays valid until the buffer is dropped.
pub unsafe trait HostBuffer: Send + Sync + fmt::Debug {
    /// Its first byte.
    fn addr(&self) -> u64;
    /// Its length.
    fn len(&self) -> u64;
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Copies between a backend's device memory and host memory, for the staged path.
///
/// # Safety
/// An implementation guarantees that [`Stager::alloc`] returns a buffer that keeps the
/// [`HostBuffer`] contract for the length asked, and that [`Stager::to_host`] and
/// [`Stager::to_device`] touch no memory but the ranges they are given, and none of it after
/// they return.
pub unsafe trait Stager: Send + Sync + fmt::Debug {
    /// The backend that stages (named in the request's info).
    fn backend(&self) -> BackendName;
    /// The device memory kind it stages.
    fn kind(&self) -> MemKind;
    /// Allocates `len` bytes of host memory suited to copies with device `dev_id` (the
    /// request's device: a stager must not touch other devices, e.g. retain GPU 0's context in
    /// a process that only uses GPU 3).
    fn alloc(&self, len: u64, dev_id: u64) -> Result<Box<dyn HostBuffer>>;
    /// Copies each `(device range, host address)` pair from the device to the host; blocks
    /// until every byte has landed.
    ///
    /// # Safety
    /// Each device range lies in device memory of [`Stager::kind`] that the caller holds
    /// registered for the call, and each host range (`host .. host + range.len`) lies inside
    /// a live buffer from [`Stager::alloc`] of this stager, which nothing else reads or writes
    /// during the call.
    unsafe fn to_host(&self, pieces: &[(Desc, u64)]) -> Result<()>;
    /// Copies each `(device range, host address)` pair from the host to the device; blocks
    /// until every byte has landed.
    ///
    /// # Safety
    /// As for [`Stager::to_host`]; the device ranges are written, so nothing else may use them
    /// during the call.
    unsafe fn to_device(&self, pieces: &[(Desc, u64)]) -> Result<()>;
    /// Largest chunk a staged request is cut into.
    fn chunk_bytes(&self) -> u64 {
        8 << 20
    }
    /// Chunks in flight at once (the host buffer holds this many).
    fn slots(&self) -> usize {
        4
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// How a staged request of `total` bytes is cut: chunks of at most `chunk` bytes, carried
/// through `slots` slots of `slot_len` bytes of one host buffer (chunk k in slot `k % slots`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChunkLayout {
    pub(crate) chunk: u64,
    pub(crate) slot_len: u64,
    pub(crate) slots: u64,
}

impl ChunkLayout {
    /// The layout for `total` bytes with the stager's chunk size and slot count (each at
    /// least 1; no more slots than chunks, no slot longer than the request).
    pub(crate) fn new(total: u64, chunk_bytes: u64, slots: usize) -> ChunkLayout {
        let chunk = chunk_bytes.max(1);
        let chunks_n = total.div_ceil(chunk).max(1);
        ChunkLayout {
            chunk,
            slot_len: chunk.min(total).max(1),
            slots: (slots.max(1) as u64).min(chunks_n),
        }
    }

    /// Cuts `segments` into chunks of at most `chunk` bytes (a segment may straddle two), each
    /// piece paired with its range in the host buffer at `base`. Always at least one chunk.
    pub(crate) fn cut(&self, segments: &[Segment], base: u64) -> Vec<Vec<(Segment, Desc)>> {
        let mut cut: Vec<Vec<(Segment, Desc)>> = vec![Vec::new()];
        let mut used = 0u64;
        for s in segments {
            let mut off = 0u64;
            while off < s.local.len {
                if used == self.chunk {
                    cut.push(Vec::new());
                    used = 0;
                }
                let n = (s.local.len - off).min(self.chunk - used);
                let k = (cut.len() - 1) as u64;
                let host = base + (k % self.slots) * self.slot_len + used;
                let piece = Segment {
                    local: Desc::new(s.local.addr + off, n, s.local.dev_id),
                    remote: Desc::new(s.remote.addr + off, n, s.remote.dev_id),
                    local_region: s.local_region,
                    remote_region: s.remote_region,
                };
                if let Some(c) = cut.last_mut() {
                    c.push((piece, Desc::new(host, n, 0)));
                }
                used += n;
                off += n;
            }
        }
        cut
    }
}

/// A staged request's host side: its buffer, registered privately, and the request cut into
/// chunks of it.
pub(crate) struct StagedCut {
    /// The request's length.
    pub(crate) total: u64,
    pub(crate) bounce: Bounce,
    /// Each chunk's pieces (see [`ChunkLayout::cut`]).
    pub(crate) cut: Vec<Vec<(Segment, Desc)>>,
}

impl StagedCut {
    /// Allocates the host buffer for `segments` from `stager`, registers it as region number
    /// `ids` gives (the agent's region counter) with `dram` (the backends that move DRAM), and
    /// cuts `segments` into chunks of it.
    pub(crate) fn new(
        stager: &dyn Stager,
        segments: &[Segment],
        dram: Vec<Arc<dyn Backend>>,
        ids: &AtomicU64,
    ) -> std::result::Result<StagedCut, Unusable> {
        let total = segments
            .iter()
            .try_fold(0u64, |a, s| a.checked_add(s.local.len))
            .ok_or_else(|| Unusable::from("request length overflows"))?;
        let layout = ChunkLayout::new(total, stager.chunk_bytes(), stager.slots());
        let (slot_len, slots) = (layout.slot_len, layout.slots);
        let dev_id = segments.first().map_or(0, |s| s.local.dev_id);
        let host = stager.alloc(slot_len * slots, dev_id).map_err(|e| {
            let what = format!(
                "{} could not allocate {} host bytes",
                stager.backend(),
                slot_len * slots
            );
            Unusable::failed(what, e)
        })?;
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let bounce = Bounce::register(id, host, dram).map_err(Unusable::from_error)?;
        let base = bounce.region.desc.addr;
        let cut = layout.cut(segments, base);
        Ok(StagedCut { total, bounce, cut })
    }
}

/// What the DRAM requests of a staged request's chunks share: everything of their plans and
/// infos but the chunk's segments.
pub(crate) struct ChunkPlan<'a> {
    pub(crate) op: XferOp,
    pub(crate) remote_kind: MemKind,
    pub(crate) remote_regions: &'a [RegionInfo],
    /// The request's notification, sent with the last chunk.
    pub(crate) notif: Option<&'a Vec<u8>>,
    pub(crate) initiator: &'a Arc<str>,
    /// The backend that carries the chunks (chosen for host memory).
    pub(crate) backend: BackendName,
    pub(crate) peer: &'a Arc<str>,
    pub(crate) watchdog: &'a Arc<Watchdog>,
}

impl ChunkPlan<'_> {
    /// Prepares one DRAM request over `conn` per chunk of `cut`, from its slot of `bounce`.
    pub(crate) fn prepare(
        &self,
        conn: &dyn Connection,
        cut: Vec<Vec<(Segment, Desc)>>,
        bounce: &Bounce,
    ) -> std::result::Result<Vec<Chunk>, Unusable> {
        let op = self.op;
        let silent = Arc::new(crate::xfer::Telemetry::silent());
        let last = cut.len() - 1;
        let mut chunks = Vec::with_capacity(cut.len());
        for (k, pieces) in cut.into_iter().enumerate() {
            let plan = XferPlan {
                op,
                local_kind: MemKind::Dram,
                remote_kind: self.remote_kind,
                segments: pieces
                    .iter()
                    .map(|(s, h)| Segment {
                        local: *h,
                        remote: s.remote,
                        local_region: 0,
                        remote_region: s.remote_region,
                    })
                    .collect(),
                local_regions: vec![Arc::clone(&bounce.region)],
                remote_regions: self.remote_regions.to_vec(),
                notif: if k == last { self.notif.cloned() } else { None },
                initiator: Arc::clone(self.initiator),
            };
            let bytes = plan.total_bytes();
            let descs = plan.segments.len();
            let prepared = conn.prepare(plan).map_err(Unusable::from_error)?;
            let req = XferRequest::new(
                prepared,
                vec![Arc::clone(&bounce.region)],
                XferInfo {
                    op,
                    backend: self.backend,
                    peer: Arc::clone(self.peer),
                    bytes,
                    descs,
                    reason: Choice::Best,
                    staged: None,
                },
                None,
                Arc::clone(self.watchdog),
                // Counted once, as the staged request.
                Arc::clone(&silent),
            );
            chunks.push(Chunk {
                req,
                pieces: pieces.iter().map(|(s, h)| (s.local, h.addr)).collect(),
            });
        }
        Ok(chunks)
    }
}

/// The agent's staging thread: runs the copies of staged posts in order.
#[derive(Debug)]
pub(crate) struct StageThread {
    tx: mpsc::Sender<Job>,
}

impl StageThread {
    pub(crate) fn start(agent: &str) -> Result<StageThread> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("nixl-stage-{agent}"))
            .spawn(move || {
                // Ends when the agent and every staged request are gone.
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|e| Error::io("spawning the staging thread", e))?;
        Ok(StageThread { tx })
    }

    pub(crate) fn sender(&self) -> mpsc::Sender<Job> {
        self.tx.clone()
    }
}

/// The host buffer of a staged request, registered privately with the DRAM backends.
#[derive(Debug)]
pub(crate) struct Bounce {
    pub(crate) region: Arc<Region>,
    backends: Vec<Arc<dyn Backend>>,
    host: Option<Box<dyn HostBuffer>>,
}

impl Bounce {
    /// Registers `host` (as DRAM region `id`) with every backend in `backends`.
    pub(crate) fn register(
        id: u64,
        host: Box<dyn HostBuffer>,
        backends: Vec<Arc<dyn Backend>>,
    ) -> Result<Bounce> {
        let desc = Desc::new(host.addr(), host.len(), 0);
        let key = crate::random_u64()?;
        let mut publics = Vec::with_capacity(backends.len());
        let mut done: Vec<Arc<dyn Backend>> = Vec::with_capacity(backends.len());
        for b in &backends {
            match b.register(MemKind::Dram, &desc) {
                Ok(p) => {
                    publics.push((b.name(), p));
                    done.push(Arc::clone(b));
                }
                Err(e) => {
                    for (d, (_, public)) in done.iter().zip(&publics) {
                        d.deregister(crate::backend::Registered {
                            kind: MemKind::Dram,
                            desc,
                            key,
                            public,
                        });
                    }
                    return Err(e);
                }
            }
        }
        Ok(Bounce {
            region: Arc::new(Region {
                id,
                kind: MemKind::Dram,
                desc,
                key,
                backends: publics,
                gate: Default::default(),
            }),
            backends: done,
            host: Some(host),
        })
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // The request holding this buffer is gone, and with it every post (completions hold the
        // request); the drain only guards against a backend that kept a hold by mistake.
        if !self.region.gate.close_and_drain(Duration::from_secs(30)) {
            tracing::error!(region = ?self.region.desc,
                "staging buffer still held after 30 s; leaking it rather than freeing memory in use");
            std::mem::forget(self.host.take());
            return;
        }
        for b in &self.backends {
            b.deregister(self.region.registered(b.name()));
        }
    }
}

/// One chunk of a staged request: its DRAM request over one slot of the host buffer, and the
/// device ranges it copies.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) req: XferRequest,
    /// (device range, host address), in the request's order.
    pub(crate) pieces: Vec<(Desc, u64)>,
}

/// A staged request's prepared form: the chunks, pipelined over the slots on each post.
#[derive(Debug)]
pub(crate) struct StagedXfer {
    inner: Arc<StagedInner>,
    jobs: mpsc::Sender<Job>,
}

#[derive(Debug)]
struct StagedInner {
    op: XferOp,
    stager: Arc<dyn Stager>,
    /// Dropped before `_bounce` (field order): their requests use its region.
    chunks: Vec<Chunk>,
    slots: usize,
    /// Whether the last chunk carries a notification (then it goes after all the others).
    notif: bool,
    _bounce: Bounce,
}

impl StagedXfer {
    pub(crate) fn new(
        op: XferOp,
        stager: Arc<dyn Stager>,
        chunks: Vec<Chunk>,
        notif: bool,
        bounce: Bounce,
        jobs: mpsc::Sender<Job>,
    ) -> StagedXfer {
        let slots = stager.slots().max(1);
        StagedXfer {
            inner: Arc::new(StagedInner {
                op,
                stager,
                chunks,
                slots,
                notif,
                _bounce: bounce,
            }),
            jobs,
        }
    }
}

impl StagedInner {
    /// Waits for chunk `i`'s request to end.
    fn wait(&self, i: usize) -> Result<()> {
        self.chunks[i].req.wait_blocking(None).into_result()
    }

    /// Cancels the chunks in flight and waits until no backend holds them.
    fn stop(&self, inflight: &VecDeque<usize>) {
        for &i in inflight {
            self.chunks[i].req.release();
        }
    }

    /// One post: the chunks through the slots, the first failure ending it.
    fn run(&self, done: &Completion) -> Result<()> {
        let mut inflight: VecDeque<usize> = VecDeque::with_capacity(self.slots);
        let r = self.pump(done, &mut inflight);
        if r.is_err() {
            self.stop(&inflight);
        }
        r
    }

    fn pump(&self, done: &Completion, inflight: &mut VecDeque<usize>) -> Result<()> {
        let n = self.chunks.len();
        let abandoned = || {
            if done.is_abandoned() {
                Err(Error::Cancelled)
            } else {
                Ok(())
            }
        };
        match self.op {
            XferOp::Write => {
                for k in 0..n {
                    abandoned()?;
                    // Chunk k reuses the slot of chunk k - slots; the notification's chunk
                    // waits for every other one.
                    let room = if self.notif && k + 1 == n {
                        0
                    } else {
                        self.slots - 1
                    };
                    while inflight.len() > room {
                        let j = inflight.pop_front().unwrap_or_default();
                        if let Err(e) = self.wait(j) {
                            inflight.push_front(j);
                            return Err(e);
                        }
                    }
                    // SAFETY: the pieces were cut from the request's device descriptors, checked
                    // against registered regions that the request holds while it runs, and
                    // point into slot k % slots of the bounce buffer this stager allocated,
                    // which the chunk that used it before is done with (waited above).
                    unsafe { self.stager.to_host(&self.chunks[k].pieces)? };
                    self.chunks[k].req.post()?;
                    inflight.push_back(k);
                }
                while let Some(j) = inflight.pop_front() {
                    if let Err(e) = self.wait(j) {
                        inflight.push_front(j);
                        return Err(e);
                    }
                }
            }
            XferOp::Read => {
                let mut next = 0;
                while next < n || !inflight.is_empty() {
                    abandoned()?;
                    let last_waits = self.notif && next + 1 == n;
                    if next < n
                        && inflight.len() < self.slots
                        && (!last_waits || inflight.is_empty())
                    {
                        self.chunks[next].req.post()?;
                        inflight.push_back(next);
                        next += 1;
                        continue;
                    }
                    let j = inflight.pop_front().unwrap_or_default();
                    if let Err(e) = self.wait(j) {
                        inflight.push_front(j);
                        return Err(e);
                    }
                    // SAFETY: as for `to_host` above; chunk j has arrived (waited just before),
                    // so no backend writes its slot any more.
                    unsafe { self.stager.to_device(&self.chunks[j].pieces)? };
                }
            }
        }
        Ok(())
    }
}

fn stopped() -> Error {
    Error::Shutdown("the agent's staging thread has stopped".into())
}

impl PreparedXfer for StagedXfer {
    fn post(&self, done: Completion) {
        let inner = Arc::clone(&self.inner);
        let job: Job = Box::new(move || {
            let r = inner.run(&done);
            done.complete(r);
        });
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            // The job owns the completion: dropping it ends the post as failed; say why.
            drop(job);
            tracing::warn!(
                "staged post after the staging thread stopped: {}",
                stopped()
            );
        }
    }

    fn cancel(&self) {
        // The staging thread sees the post abandoned between chunks; the chunks in flight are
        // stopped now.
        for c in &self.inner.chunks {
            c.req.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(local: u64, remote: u64, len: u64) -> Segment {
        Segment {
            local: Desc::new(local, len, 1),
            remote: Desc::new(remote, len, 2),
            local_region: 0,
            remote_region: 3,
        }
    }

    #[test]
    fn chunks_cover_every_byte_once_in_their_slots() {
        let segs = [
            seg(1000, 50_000, 25),
            seg(9000, 70_000, 3),
            seg(20_000, 90_000, 40),
        ];
        let l = ChunkLayout::new(68, 16, 2);
        assert_eq!((l.chunk, l.slot_len, l.slots), (16, 16, 2));
        let cut = l.cut(&segs, 4096);
        assert_eq!(cut.len(), 5); // 68 bytes in chunks of 16
        let mut next = 0usize; // (segment, offset) walked in order
        let mut off = 0u64;
        for (k, pieces) in cut.iter().enumerate() {
            let bytes: u64 = pieces.iter().map(|(p, _)| p.local.len).sum();
            assert!(
                bytes <= 16 && (bytes == 16 || k == cut.len() - 1),
                "chunk {k}: {bytes}"
            );
            let mut used = 0;
            for (p, host) in pieces {
                let s = segs[next];
                assert_eq!(p.local.addr, s.local.addr + off);
                assert_eq!(p.remote.addr, s.remote.addr + off);
                assert_eq!(
                    (p.local.dev_id, p.remote.dev_id, p.remote_region),
                    (1, 2, 3)
                );
                assert_eq!(host.addr, 4096 + (k as u64 % 2) * 16 + used);
                assert_eq!(host.len, p.local.len);
                used += p.local.len;
                off += p.local.len;
                if off == s.local.len {
                    next += 1;
                    off = 0;
                }
            }
        }
        assert_eq!(next, segs.len());
    }

    #[test]
    fn a_small_request_has_one_short_slot() {
        let l = ChunkLayout::new(10, 1 << 20, 4);
        assert_eq!((l.slot_len, l.slots), (10, 1));
        assert_eq!(l.cut(&[seg(0, 0, 10)], 0).len(), 1);
        // Nothing to move still gives one (empty) chunk, and no zero sizes.
        let l = ChunkLayout::new(0, 0, 0);
        assert_eq!((l.chunk, l.slot_len, l.slots), (1, 1, 1));
        assert_eq!(l.cut(&[], 0), vec![Vec::new()]);
    }
}
