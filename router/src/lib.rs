//! nixl-router: the KV-aware router of the serving stack, a thin client over the workers' KV
//! events ([`nixl_kv::events`]).
//!
//! - [`KvIndex`]: a prefix index of chained block hashes per worker; [`KvIndex::overlap`]
//!   tells, for a request's block hashes, how many leading blocks each worker holds.
//! - [`Follower`]: follows one worker's events ([`EventSource`]: over HTTP with
//!   [`HttpSource`], or in process) into the index, recovering from gaps and restarts, and
//!   marks a dead worker down.
//! - [`Router`]: picks a worker by Dynamo's cost (prefill blocks left after the overlap × a
//!   weight + decode load), or round-robin, or at random; prefill and decode pools apart.
//! - [`wire`]: the JSON of the worker endpoints `/kv/events?since=N`, `/kv/blocks`, `/load`.
//!
//! ```no_run
//! # async fn run() -> Result<(), nixl_router::SourceError> {
//! use std::{sync::Arc, time::Duration};
//! use nixl_router::{HttpSource, Mode, Router};
//! let router = Arc::new(Router::new(Mode::KvAware { overlap_weight: 1.0 }));
//! let src = HttpSource::new("http://127.0.0.1:9001")?.expect_worker("prefill-0");
//! let _follower = router.follow("prefill-0", src, Duration::from_millis(20));
//! let hashes = nixl_kv::events::seq_hashes(&[1, 2, 3, 4], 2);
//! let pick = router.choose_prefill(&hashes, &["prefill-0"]);
//! # Ok(()) }
//! ```

pub mod follow;
pub mod http;
pub mod index;
pub mod router;
pub mod wire;

pub use follow::{
    EventSource, Events, FollowStatus, Follower, FollowerHandle, ResyncReason, Snapshot,
    SourceError, Step,
};
pub use http::HttpSource;
pub use index::{Applied, KvIndex, Overlaps, SharedIndex, WorkerInfo};
pub use router::{cost, splitmix64, Booking, Choice, Mode, Router};
pub use wire::WorkerLoad;

impl Router {
    /// Follows `worker`'s events from `source` into this router's index (and its load into the
    /// router's loads), polling every `interval` on the current tokio runtime, until the handle
    /// is dropped.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn`).
    pub fn follow<S: EventSource>(
        &self,
        worker: &str,
        source: S,
        interval: std::time::Duration,
    ) -> FollowerHandle {
        Follower::new(worker, source, self.index().clone())
            .with_loads(self.loads().clone())
            .spawn(interval)
    }
}
