//! Following a worker's KV events into the [`KvIndex`](crate::KvIndex), with recovery from
//! gaps, restarts and dead workers.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_kv::events::{Gap, KvEvent, KvEventLog, StoredBlock, MAX_EVENT_BLOCKS};

use crate::index::{Applied, SharedIndex};
use crate::router::{clear_polled, set_polled, Loads};
use crate::wire::WorkerLoad;

/// Events of one poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// Events after the id asked for, in id order.
    pub events: Vec<KvEvent>,
    /// The worker's last event id, if it says.
    pub last_id: Option<u64>,
    /// The worker's instance (new at each start), if it says.
    pub instance: Option<u64>,
}

/// Every block of a worker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Id of the last event the list reflects.
    pub last_id: u64,
    /// The blocks.
    pub blocks: Vec<StoredBlock>,
    /// The worker's instance, if it says.
    pub instance: Option<u64>,
}

/// Why a source could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The events asked for are no longer kept: start over from all blocks.
    #[error("events gap: the oldest event kept is {}", .0.oldest)]
    Gap(Gap),
    /// The worker did not answer (refused, timed out, failed status).
    #[error("worker down: {0}")]
    Down(String),
    /// The worker answered something malformed or over a limit.
    #[error("bad answer from worker: {0}")]
    Bad(String),
}

/// Where a worker's KV events come from: its HTTP endpoint ([`crate::HttpSource`]) or, in
/// process, its [`KvEventLog`] behind a mutex.
pub trait EventSource: Send + Sync + 'static {
    /// Events with id above `id`, or [`SourceError::Gap`] if some are gone.
    fn since(&self, id: u64) -> impl Future<Output = Result<Events, SourceError>> + Send;
    /// Every block held, as of the returned id.
    fn all_blocks(&self) -> impl Future<Output = Result<Snapshot, SourceError>> + Send;
    /// The worker's load, if the source knows it.
    fn load(&self) -> impl Future<Output = Result<Option<WorkerLoad>, SourceError>> + Send {
        async { Ok(None) }
    }
}

fn log_since(log: &KvEventLog, id: u64) -> Result<Events, SourceError> {
    log.since(id)
        .map(|events| Events {
            events,
            last_id: Some(log.last_id()),
            instance: None,
        })
        .map_err(SourceError::Gap)
}

fn log_all(log: &KvEventLog) -> Snapshot {
    let (last_id, blocks) = log.all_blocks();
    Snapshot {
        last_id,
        blocks,
        instance: None,
    }
}

impl EventSource for Arc<parking_lot::Mutex<KvEventLog>> {
    async fn since(&self, id: u64) -> Result<Events, SourceError> {
        log_since(&self.lock(), id)
    }
    async fn all_blocks(&self) -> Result<Snapshot, SourceError> {
        Ok(log_all(&self.lock()))
    }
}

impl EventSource for Arc<std::sync::Mutex<KvEventLog>> {
    async fn since(&self, id: u64) -> Result<Events, SourceError> {
        let log = self
            .lock()
            .map_err(|_| SourceError::Down("event log mutex poisoned".into()))?;
        log_since(&log, id)
    }
    async fn all_blocks(&self) -> Result<Snapshot, SourceError> {
        let log = self
            .lock()
            .map_err(|_| SourceError::Down("event log mutex poisoned".into()))?;
        Ok(log_all(&log))
    }
}

/// Why a follower started over from the worker's full block list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// First contact, or back after being down.
    Start,
    /// Events were missing.
    Gap,
    /// The worker restarted (its ids went backwards, or its instance changed).
    Restart,
    /// The periodic check ([`Follower::resync_every`]).
    Periodic,
}

/// What one [`Follower::step`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Applied this many events.
    Events(usize),
    /// Started over from the full list of this many blocks.
    Resynced {
        /// Why.
        reason: ResyncReason,
        /// Blocks the worker holds.
        blocks: usize,
    },
    /// The worker is down (its blocks were dropped from the index); the next step retries.
    Down(String),
}

/// A follower's view of its worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FollowStatus {
    /// Not synced yet.
    Starting,
    /// Following.
    Up,
    /// Unreachable or misbehaving, with the reason.
    Down(String),
}

/// Follows one worker: polls its [`EventSource`] and applies the events to the index; on a
/// gap or a restart starts over from the worker's full block list; on a failure marks the
/// worker down (no overlap, no load) until it answers again.
#[derive(Debug)]
pub struct Follower<S> {
    worker: String,
    source: S,
    index: SharedIndex,
    loads: Option<Loads>,
    synced: bool,
    last_id: u64,
    instance: Option<u64>,
    status: Arc<parking_lot::Mutex<FollowStatus>>,
    resync_every: Option<Duration>,
    last_sync: Instant,
}

impl<S: EventSource> Follower<S> {
    /// A follower of `worker` feeding `index`.
    pub fn new(worker: &str, source: S, index: SharedIndex) -> Self {
        Follower {
            worker: worker.to_string(),
            source,
            index,
            loads: None,
            synced: false,
            last_id: 0,
            instance: None,
            status: Arc::new(parking_lot::Mutex::new(FollowStatus::Starting)),
            resync_every: Some(Duration::from_secs(10)),
            last_sync: Instant::now(),
        }
    }

    pub(crate) fn with_loads(mut self, loads: Loads) -> Self {
        self.loads = Some(loads);
        self
    }

    /// Starts over from the full block list at least this often (default 10 s; `None`:
    /// never), which catches a restarted worker that reports neither `last_id` nor `instance`.
    pub fn resync_every(mut self, every: Option<Duration>) -> Self {
        self.resync_every = every;
        self
    }

    /// Its worker.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Its status.
    pub fn status(&self) -> FollowStatus {
        self.status.lock().clone()
    }

    /// Id of the last event applied.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// One poll: applies new events, or resyncs, or marks the worker down; then polls the
    /// worker's load.
    pub async fn step(&mut self) -> Step {
        let step = match self.follow().await {
            Ok(s) => {
                *self.status.lock() = FollowStatus::Up;
                s
            }
            Err(e) => {
                let why = e.to_string();
                self.synced = false;
                self.index.write().mark_down(&self.worker);
                if let Some(l) = &self.loads {
                    clear_polled(l, &self.worker);
                }
                *self.status.lock() = FollowStatus::Down(why.clone());
                return Step::Down(why);
            }
        };
        if let Some(l) = &self.loads {
            match self.source.load().await {
                Ok(Some(load)) => set_polled(l, &self.worker, load),
                Ok(None) => {}
                Err(_) => clear_polled(l, &self.worker),
            }
        }
        step
    }

    async fn resync(&mut self, reason: ResyncReason) -> Result<Step, SourceError> {
        let snap = self.source.all_blocks().await?;
        let n = snap.blocks.len();
        self.index
            .write()
            .reset(&self.worker, snap.last_id, &snap.blocks);
        self.last_id = snap.last_id;
        self.instance = snap.instance;
        self.synced = true;
        self.last_sync = Instant::now();
        Ok(Step::Resynced { reason, blocks: n })
    }

    async fn follow(&mut self) -> Result<Step, SourceError> {
        if !self.synced {
            return self.resync(ResyncReason::Start).await;
        }
        if self
            .resync_every
            .is_some_and(|e| self.last_sync.elapsed() >= e)
        {
            return self.resync(ResyncReason::Periodic).await;
        }
        let got = match self.source.since(self.last_id).await {
            Ok(got) => got,
            Err(SourceError::Gap(_)) => return self.resync(ResyncReason::Gap).await,
            Err(e) => return Err(e),
        };
        if got.instance.is_some() && got.instance != self.instance {
            return self.resync(ResyncReason::Restart).await;
        }
        if got.last_id.is_some_and(|l| l < self.last_id) {
            return self.resync(ResyncReason::Restart).await;
        }
        for e in &got.events {
            e.check(MAX_EVENT_BLOCKS).map_err(SourceError::Bad)?;
        }
        let mut applied = 0;
        let broken = {
            let mut index = self.index.write();
            let mut broken = None;
            for e in &got.events {
                match index.apply(&self.worker, e) {
                    Applied::Applied => {
                        self.last_id = e.id;
                        applied += 1;
                    }
                    Applied::Stale { .. } => {
                        broken = Some(ResyncReason::Restart);
                        break;
                    }
                    Applied::Gap { .. } => {
                        broken = Some(ResyncReason::Gap);
                        break;
                    }
                }
            }
            broken
        };
        if let Some(reason) = broken {
            return self.resync(reason).await;
        }
        Ok(Step::Events(applied))
    }

    /// Runs the follower on the current tokio runtime, one [`Follower::step`] every
    /// `interval`, until the handle is dropped.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn`).
    pub fn spawn(mut self, interval: Duration) -> FollowerHandle {
        let status = self.status.clone();
        let worker = self.worker.clone();
        let task = tokio::spawn(async move {
            loop {
                self.step().await;
                tokio::time::sleep(interval).await;
            }
        });
        FollowerHandle {
            worker,
            status,
            task,
        }
    }
}

/// A running follower; dropping it stops it.
#[derive(Debug)]
pub struct FollowerHandle {
    worker: String,
    status: Arc<parking_lot::Mutex<FollowStatus>>,
    task: tokio::task::JoinHandle<()>,
}

impl FollowerHandle {
    /// Its worker.
    pub fn worker(&self) -> &str {
        &self.worker
    }
    /// Its status.
    pub fn status(&self) -> FollowStatus {
        self.status.lock().clone()
    }
}

impl Drop for FollowerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::KvIndex;
    use nixl_kv::events::seq_hashes;
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn blocks(h: &[u64]) -> Vec<StoredBlock> {
        h.iter()
            .enumerate()
            .map(|(i, &hash)| StoredBlock {
                hash,
                parent: i.checked_sub(1).map(|p| h[p]),
            })
            .collect()
    }

    fn chain(start: u32, n: usize) -> Vec<u64> {
        seq_hashes(&(start..start + 4 * n as u32).collect::<Vec<_>>(), 4)
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// The step that resynced from `blocks` blocks for `reason`.
    fn resynced(reason: ResyncReason, blocks: usize) -> Step {
        Step::Resynced { reason, blocks }
    }

    #[test]
    fn follows_and_recovers_from_a_gap() {
        block_on(async {
            let log = Arc::new(Mutex::new(KvEventLog::new(4)));
            let index = KvIndex::shared();
            let mut f = Follower::new("w", log.clone(), index.clone());
            let a = chain(0, 20);
            log.lock().stored(blocks(&a[..2]), 4);
            assert_eq!(f.step().await, resynced(ResyncReason::Start, 2));
            log.lock().stored(blocks(&a[..4])[2..].to_vec(), 4);
            log.lock().removed(vec![a[3]]);
            assert_eq!(f.step().await, Step::Events(2));
            assert_eq!(index.read().overlap(&a).get("w"), 3);
            assert_eq!(f.status(), FollowStatus::Up);
            // Ten events while the follower sleeps: the log keeps 4, so a gap.
            for i in 3..13 {
                log.lock().stored(blocks(&a[..=i])[i..].to_vec(), 4);
            }
            assert_eq!(f.step().await, resynced(ResyncReason::Gap, 13));
            assert_eq!(f.last_id(), 13);
            assert_eq!(index.read().overlap(&a).get("w"), 13);
            // Cleared is an ordinary event.
            log.lock().cleared();
            assert_eq!(f.step().await, Step::Events(1));
            assert!(index.read().overlap(&a).is_empty());
            assert_eq!(f.step().await, Step::Events(0));
        });
    }

    #[test]
    fn worker_restart_with_ids_backwards() {
        block_on(async {
            let log = Arc::new(Mutex::new(KvEventLog::new(64)));
            let index = KvIndex::shared();
            let mut f = Follower::new("w", log.clone(), index.clone());
            let a = chain(0, 8);
            let b = chain(500, 8);
            for i in 0..8 {
                log.lock().stored(blocks(&a[..=i])[i..].to_vec(), 4);
            }
            f.step().await;
            assert_eq!(index.read().overlap(&a).get("w"), 8);
            // The worker restarts: a fresh log with 2 events; its last id (2) is below 8.
            *log.lock() = KvEventLog::new(64);
            log.lock().stored(blocks(&b[..2]), 4);
            log.lock().stored(blocks(&b[..3])[2..].to_vec(), 4);
            assert_eq!(f.step().await, resynced(ResyncReason::Restart, 3));
            assert!(index.read().overlap(&a).is_empty());
            assert_eq!(index.read().overlap(&b).get("w"), 3);
        });
    }

    /// A source that can be switched off, and that reports an instance.
    struct Flaky {
        log: Arc<Mutex<KvEventLog>>,
        up: AtomicBool,
        instance: Mutex<u64>,
    }

    impl EventSource for Arc<Flaky> {
        async fn since(&self, id: u64) -> Result<Events, SourceError> {
            if !self.up.load(Ordering::SeqCst) {
                return Err(SourceError::Down("switched off".into()));
            }
            let mut e = log_since(&self.log.lock(), id)?;
            e.instance = Some(*self.instance.lock());
            Ok(e)
        }
        async fn all_blocks(&self) -> Result<Snapshot, SourceError> {
            if !self.up.load(Ordering::SeqCst) {
                return Err(SourceError::Down("switched off".into()));
            }
            let mut s = log_all(&self.log.lock());
            s.instance = Some(*self.instance.lock());
            Ok(s)
        }
        async fn load(&self) -> Result<Option<WorkerLoad>, SourceError> {
            Ok(Some(WorkerLoad {
                active_requests: 1,
                active_blocks: 5,
                total_blocks: 10,
            }))
        }
    }

    #[test]
    fn down_then_back_and_instance_change() {
        block_on(async {
            let src = Arc::new(Flaky {
                log: Arc::new(Mutex::new(KvEventLog::new(64))),
                up: AtomicBool::new(true),
                instance: Mutex::new(1),
            });
            let router = crate::Router::new(crate::Mode::KvAware {
                overlap_weight: 1.0,
            });
            let mut f = Follower::new("w", src.clone(), router.index().clone())
                .with_loads(router.loads().clone());
            let a = chain(0, 6);
            src.log.lock().stored(blocks(&a[..4]), 4);
            f.step().await;
            assert_eq!(router.overlaps(&a).get("w"), 4);
            assert_eq!(router.load("w").active_blocks, 5);
            src.up.store(false, Ordering::SeqCst);
            assert!(matches!(f.step().await, Step::Down(_)));
            assert!(matches!(f.status(), FollowStatus::Down(r) if r.contains("switched off")));
            assert!(router.overlaps(&a).is_empty());
            assert_eq!(router.load("w").active_blocks, 0);
            assert!(!router.index().read().worker("w").unwrap().up);
            src.up.store(true, Ordering::SeqCst);
            assert_eq!(f.step().await, resynced(ResyncReason::Start, 4));
            assert_eq!(router.overlaps(&a).get("w"), 4);
            // A restart with as many events as before, told by the instance alone.
            {
                let mut log = src.log.lock();
                *log = KvEventLog::new(64);
                log.stored(blocks(&a[..1]), 4);
                log.stored(vec![], 4);
            }
            *src.instance.lock() = 2;
            assert_eq!(f.step().await, resynced(ResyncReason::Restart, 1));
            assert_eq!(router.overlaps(&a).get("w"), 1);
        });
    }

    #[test]
    fn periodic_resync_catches_a_silent_restart() {
        block_on(async {
            let log = Arc::new(Mutex::new(KvEventLog::new(64)));
            let index = KvIndex::shared();
            let mut f = Follower::new("w", log.clone(), index.clone())
                .resync_every(Some(Duration::from_millis(1)));
            let a = chain(0, 3);
            log.lock().stored(blocks(&a), 4);
            f.step().await;
            // Restart to a log that reached the same id with other blocks.
            *log.lock() = KvEventLog::new(64);
            log.lock().stored(blocks(&a[..1]), 4);
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(f.step().await, resynced(ResyncReason::Periodic, 1));
            assert_eq!(index.read().overlap(&a).get("w"), 1);
        });
    }
}
