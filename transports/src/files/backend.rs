//! The skeleton the file backends share: [`FileBackend`] answers the agent (caps, the own-agent
//! check, registration checks, connections, request preparation and posting) and leaves to its
//! engine only what differs: how the operations run (a thread pool for `posix`, a ring for
//! `uring`, cuFile workers for `gds`), what a registration sets up, and what a request resolves
//! besides its operations.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, Registered, Result, TargetHandle, Unusable, XferOp, XferPlan,
};
use parking_lot::Mutex;

use super::ops::{prepare_files, IoOp, Post};
use super::OwnAgent;

/// What runs a file backend's operations.
pub(crate) trait FileEngine: fmt::Debug + Send + Sync + 'static {
    /// The engine once started (its threads or ring), shared by connections and requests.
    type Running: Send + Sync + 'static;
    /// What a request resolves when it is created besides its operations (`gds`: the cuFile
    /// handles and buffer bases).
    type Resolved: Send + Sync + 'static;
    /// The backend's name.
    const NAME: BackendName;
    /// Memory kinds registered with it.
    const LOCAL_KINDS: &'static [MemKind];
    /// Memory kinds it reaches (files, block devices).
    const REMOTE_KINDS: &'static [MemKind];
    /// Its [`Caps::preference`].
    const PREFERENCE: u8;
    /// The memory it moves to and from files.
    const MEM: MemKind;

    /// Largest single operation.
    fn max_io(&self) -> usize;
    /// Why the engine cannot run here, if it cannot.
    fn probe(&self) -> std::result::Result<(), Unusable>;
    /// Starts the engine.
    fn start(&self) -> Result<Self::Running>;
    /// Checks and records a registration (`run` is `None` before start).
    fn register(&self, run: Option<&Self::Running>, kind: MemKind, desc: &Desc) -> Result<()>;
    /// Forgets a registration.
    fn deregister(&self, run: &Self::Running, region: Registered<'_>);
    /// Resolves what the request needs besides its operations.
    fn resolve(run: &Self::Running, plan: &XferPlan, ops: &[IoOp]) -> Result<Self::Resolved>;
    /// Set when the engine stops: operations not yet started end their requests Cancelled.
    fn stopping(run: &Self::Running) -> &Arc<AtomicBool>;
    /// Runs the operations of a started post.
    fn submit(run: &Self::Running, post: Arc<Post>, resolved: &Arc<Self::Resolved>);
    /// Stops the engine (operations in flight are waited for or cancelled).
    fn stop(run: &Self::Running);
}

/// A file backend: storage reached by its own agent, run by engine `E` (see
/// [`crate::posix`], [`crate::uring`], [`crate::gds`]).
// The engine trait is sealed (crate-private): the three engines of this crate are the only ones.
#[allow(private_bounds)]
pub struct FileBackend<E: FileEngine> {
    engine: E,
    own: OwnAgent,
    running: Mutex<Option<Arc<E::Running>>>,
}

#[allow(private_bounds)] // as above
impl<E: FileEngine> FileBackend<E> {
    /// A backend run by `engine` (which starts with the agent).
    pub(crate) fn with_engine(engine: E) -> FileBackend<E> {
        FileBackend {
            engine,
            own: OwnAgent::default(),
            running: Mutex::new(None),
        }
    }

    /// The running engine, if started.
    pub(crate) fn running(&self) -> Option<Arc<E::Running>> {
        self.running.lock().clone()
    }
}

impl<E: FileEngine> fmt::Debug for FileBackend<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileBackend")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl<E: FileEngine> Backend for FileBackend<E> {
    fn name(&self) -> BackendName {
        E::NAME
    }

    fn caps(&self) -> Caps {
        Caps::new(E::LOCAL_KINDS, Locality::SameProcess, E::PREFERENCE)
            .remote(E::REMOTE_KINDS)
            .without_notifications()
    }

    fn probe(&self) -> std::result::Result<(), Unusable> {
        self.engine.probe()
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        *self.running.lock() = Some(Arc::new(self.engine.start()?));
        self.own.set(target);
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        self.own.conn_info()
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        let run = self.running();
        self.engine.register(run.as_deref(), kind, desc)?;
        Ok(Vec::new())
    }

    fn deregister(&self, region: Registered<'_>) {
        if let Some(run) = self.running() {
            self.engine.deregister(&run, region);
        }
    }

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), Unusable> {
        self.own.can_reach(conn_info, "files")
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let target = self.own.connect(E::NAME, peer)?;
        let run = self
            .running()
            .ok_or_else(|| Error::Shutdown(format!("{} backend shut down", E::NAME)))?;
        Ok(Arc::new(FileConn::<E> {
            target,
            run,
            max_io: self.engine.max_io(),
        }))
    }

    fn shutdown(&self) {
        if let Some(run) = self.running.lock().take() {
            E::stop(&run);
        }
        self.own.clear();
    }
}

/// A connection of a file backend to its own agent.
struct FileConn<E: FileEngine> {
    target: TargetHandle,
    run: Arc<E::Running>,
    max_io: usize,
}

impl<E: FileEngine> fmt::Debug for FileConn<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileConn")
            .field("backend", &E::NAME)
            .finish_non_exhaustive()
    }
}

impl<E: FileEngine> Connection for FileConn<E> {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        let (ops, remote_regions) =
            prepare_files(E::NAME, &self.target, &plan, self.max_io, E::MEM)?;
        let resolved = Arc::new(E::resolve(&self.run, &plan, &ops)?);
        Ok(Box::new(FileXfer::<E> {
            op: plan.op,
            ops,
            remote_regions,
            resolved,
            run: Arc::clone(&self.run),
        }))
    }

    fn send_notif(&self, _from: &str, _msg: &[u8]) -> Result<()> {
        Err(Error::Backend {
            backend: E::NAME,
            op: "notification",
            reason: format!("{} carries no notifications", E::NAME),
        })
    }

    fn close(&self) {}
}

/// A prepared request of a file backend.
struct FileXfer<E: FileEngine> {
    op: XferOp,
    ops: Arc<[IoOp]>,
    remote_regions: Arc<[Arc<Region>]>,
    resolved: Arc<E::Resolved>,
    run: Arc<E::Running>,
}

impl<E: FileEngine> fmt::Debug for FileXfer<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileXfer")
            .field("backend", &E::NAME)
            .field("ops", &self.ops.len())
            .finish_non_exhaustive()
    }
}

impl<E: FileEngine> PreparedXfer for FileXfer<E> {
    fn post(&self, done: Completion) {
        let stopping = E::stopping(&self.run);
        if let Some(post) = Post::start(self.op, &self.ops, &self.remote_regions, done, stopping) {
            E::submit(&self.run, post, &self.resolved);
        }
    }
}
