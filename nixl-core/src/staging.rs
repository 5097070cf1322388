//! The staged path: device memory carried by a backend that reaches only host memory.
//!
//! When no backend moves a request's local memory kind to the peer (VRAM to a peer over `tcp`,
//! VRAM to a file through `uring`), but a backend offers a [`Stager`] for that kind (the `cuda`
//! backend, through pinned host buffers), the agent builds the request through host memory:
//!
//! - at creation it allocates one host buffer for the request (the stager's pinned memory),
//!   registers it *privately* with every backend that moves DRAM (it never appears in the
//!   agent's metadata, so no peer can name it), and prepares an ordinary DRAM request on the
//!   best backend for it, by the same policy as any other request;
//! - each WRITE post copies the device ranges into the buffer and then posts the DRAM request;
//!   each READ post runs the DRAM request and then copies the buffer into the device ranges.
//!   The copies run on the agent's staging thread, never on a backend's thread;
//! - the request says so: [`crate::XferInfo::staged`] names the stager, and
//!   [`crate::XferInfo::backend`] the backend that carried the bytes.
//!
//! A request is staged only when no backend can carry it directly; the reason the direct
//! backends were passed over stays in [`crate::XferInfo::reason`]. One request stages at most
//! [`MAX_STAGED_BYTES`].

use std::fmt;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, BackendName, PreparedXfer};
use crate::error::{Error, Result};
use crate::mem::{Desc, MemKind};
use crate::region::Region;
use crate::xfer::{Completion, XferOp};

/// Largest request the staged path carries (its host buffer is allocated whole).
pub const MAX_STAGED_BYTES: u64 = 16 << 30;

/// Host memory for staging, owned by the stager that allocated it (pinned where the device
/// needs it); freed on drop.
pub trait HostBuffer: Send + Sync + fmt::Debug {
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
pub trait Stager: Send + Sync + fmt::Debug {
    /// The backend that stages (named in the request's info).
    fn backend(&self) -> BackendName;
    /// The device memory kind it stages.
    fn kind(&self) -> MemKind;
    /// Allocates `len` bytes of host memory suited to its copies.
    fn alloc(&self, len: u64) -> Result<Box<dyn HostBuffer>>;
    /// Copies each `(device range, host address)` pair from the device to the host; blocks
    /// until every byte has landed.
    fn to_host(&self, pieces: &[(Desc, u64)]) -> Result<()>;
    /// Copies each `(device range, host address)` pair from the host to the device; blocks
    /// until every byte has landed.
    fn to_device(&self, pieces: &[(Desc, u64)]) -> Result<()>;
}

type Job = Box<dyn FnOnce() + Send>;

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
        let mut publics = Vec::with_capacity(backends.len());
        let mut done: Vec<Arc<dyn Backend>> = Vec::with_capacity(backends.len());
        for b in &backends {
            match b.register(MemKind::Dram, &desc) {
                Ok(p) => {
                    publics.push((b.name(), p));
                    done.push(Arc::clone(b));
                }
                Err(e) => {
                    let placeholder = Region {
                        id,
                        kind: MemKind::Dram,
                        desc,
                        key: 0,
                        backends: Vec::new(),
                        gate: Default::default(),
                    };
                    for d in &done {
                        d.deregister(&placeholder);
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
                key: crate::random_u64(),
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
            b.deregister(&self.region);
        }
    }
}

/// A staged request's prepared form: copies around the prepared DRAM request.
#[derive(Debug)]
pub(crate) struct StagedXfer {
    inner: Arc<StagedInner>,
    jobs: mpsc::Sender<Job>,
}

#[derive(Debug)]
struct StagedInner {
    op: XferOp,
    prepared: Box<dyn PreparedXfer>,
    stager: Arc<dyn Stager>,
    /// (device range, host address), in the request's order.
    pieces: Vec<(Desc, u64)>,
    /// Dropped after `prepared` (field order), which may refer to its region.
    _bounce: Bounce,
}

impl StagedXfer {
    pub(crate) fn new(
        op: XferOp,
        prepared: Box<dyn PreparedXfer>,
        stager: Arc<dyn Stager>,
        pieces: Vec<(Desc, u64)>,
        bounce: Bounce,
        jobs: mpsc::Sender<Job>,
    ) -> StagedXfer {
        StagedXfer {
            inner: Arc::new(StagedInner {
                op,
                prepared,
                stager,
                pieces,
                _bounce: bounce,
            }),
            jobs,
        }
    }
}

fn stopped() -> Error {
    Error::Shutdown("the agent's staging thread has stopped".into())
}

impl PreparedXfer for StagedXfer {
    fn post(&self, done: Completion) {
        let inner = Arc::clone(&self.inner);
        match self.inner.op {
            XferOp::Write => {
                let job: Job = Box::new(move || {
                    if done.is_abandoned() {
                        done.complete(Err(Error::Cancelled));
                        return;
                    }
                    match inner.stager.to_host(&inner.pieces) {
                        Ok(()) => inner.prepared.post(done),
                        Err(e) => {
                            done.complete(Err(e));
                        }
                    }
                });
                if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
                    // The job owns the completion: dropping it ends the post as failed, but
                    // say why.
                    drop(job);
                    tracing::warn!(
                        "staged post after the staging thread stopped: {}",
                        stopped()
                    );
                }
            }
            XferOp::Read => {
                let jobs = self.jobs.clone();
                let relay = Box::new(move |outcome: Result<()>, done: Completion| {
                    if outcome.is_err() || done.is_abandoned() {
                        done.complete(outcome);
                        return;
                    }
                    let i2 = Arc::clone(&inner);
                    let job: Job = Box::new(move || {
                        let r = i2.stager.to_device(&i2.pieces);
                        done.complete(r);
                    });
                    if let Err(mpsc::SendError(job)) = jobs.send(job) {
                        drop(job);
                        tracing::warn!("staged read ended without its copy: {}", stopped());
                    }
                });
                self.inner.prepared.post(done.relay(relay));
            }
        }
    }

    fn cancel(&self) {
        self.inner.prepared.cancel();
    }
}
