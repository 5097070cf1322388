//! The JSON a worker serves to the router (both sides use these types):
//!
//! - `GET {base}/kv/events?since=N` → 200 [`EventsResponse`], or 410 [`GapResponse`] when
//!   events after `N` are no longer kept;
//! - `GET {base}/kv/blocks` → 200 [`BlocksResponse`];
//! - `GET {base}/load` → 200 [`WorkerLoad`].
//!
//! `last_id` and `instance` of the events and blocks answers are optional: with `last_id` the
//! router sees at once that a worker restarted with fewer events than it had seen; with
//! `instance` (any value new at each start of the worker) it sees every restart.

use nixl_kv::events::{Gap, KvEvent, KvEventLog, StoredBlock};

/// Answer of `GET /kv/events?since=N`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EventsResponse {
    /// The worker's name.
    pub worker: String,
    /// Events with id above `N`, in id order.
    pub events: Vec<KvEvent>,
    /// The worker's last event id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_id: Option<u64>,
    /// Changes at each start of the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u64>,
}

/// Answer (status 410) of `GET /kv/events?since=N` when events after `N` are gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GapResponse {
    /// Oldest event id still kept.
    pub oldest: u64,
}

/// Answer of `GET /kv/blocks`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlocksResponse {
    /// The worker's name.
    pub worker: String,
    /// Id of the last event the block list reflects.
    pub last_id: u64,
    /// Every block the worker holds.
    pub blocks: Vec<StoredBlock>,
    /// Changes at each start of the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u64>,
}

/// Answer of `GET /load`: the worker's decode load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerLoad {
    /// Requests running.
    pub active_requests: u64,
    /// KV blocks in use by running requests.
    pub active_blocks: u64,
    /// KV blocks of the worker in all.
    pub total_blocks: u64,
}

/// The events answer of a worker serving `log` (for worker-side handlers): `Ok` is the 200
/// body, `Err` the 410 body.
pub fn events_response(
    worker: &str,
    log: &KvEventLog,
    since: u64,
    instance: Option<u64>,
) -> Result<EventsResponse, GapResponse> {
    match log.since(since) {
        Ok(events) => Ok(EventsResponse {
            worker: worker.to_string(),
            events,
            last_id: Some(log.last_id()),
            instance,
        }),
        Err(Gap { oldest }) => Err(GapResponse { oldest }),
    }
}

/// The blocks answer of a worker serving `log`.
pub fn blocks_response(worker: &str, log: &KvEventLog, instance: Option<u64>) -> BlocksResponse {
    let (last_id, blocks) = log.all_blocks();
    BlocksResponse {
        worker: worker.to_string(),
        last_id,
        blocks,
        instance,
    }
}
