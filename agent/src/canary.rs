//! Peer health: a canary (the `tcp` backend's authenticated ping, [`TcpControl::ping`]) to
//! every loaded peer that has not answered for `canary_interval`; no answer within
//! `canary_timeout` marks it down (`nixl_peer_up` 0, logged once), after which it is retried
//! after 1 s, 2 s, 4 s, ... up to `canary_backoff_max`, and the first answer brings it back up.
//!
//! The daemon does not see the transfers that other processes of the node make with a peer, so
//! "idle" means "no canary answer for `canary_interval`": every peer gets one per interval. A
//! canary opens a connection of its own (handshake included): it checks that the peer accepts
//! new connections, not only that an old one is still open.
//!
//! [`TcpControl::ping`]: nixl_transports::tcp::TcpControl::ping

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nixl_core::BackendName;
use parking_lot::Mutex;

use crate::serve::Daemon;

/// How often the table is looked at.
const TICK: Duration = Duration::from_millis(200);
/// Canaries in flight at once (each holds a blocking thread for up to `canary_timeout`).
const MAX_IN_FLIGHT: usize = 32;
/// First retry of a down peer.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// One peer's health.
#[derive(Clone, Debug)]
pub(crate) struct PeerHealth {
    /// `None` until the first canary ended.
    pub(crate) up: Option<bool>,
    /// When the last canary ended (wall clock, for the API).
    pub(crate) last_canary: Option<SystemTime>,
    /// Its round trip, when it was answered.
    pub(crate) last_rtt: Option<Duration>,
    /// Why the last one failed.
    pub(crate) last_error: Option<String>,
    /// Since when it is down.
    pub(crate) down_since: Option<SystemTime>,
    /// Failures in a row.
    failures: u32,
    next: Instant,
    in_flight: bool,
}

impl PeerHealth {
    fn new(now: Instant) -> PeerHealth {
        PeerHealth {
            up: None,
            last_canary: None,
            last_rtt: None,
            last_error: None,
            down_since: None,
            failures: 0,
            next: now,
            in_flight: false,
        }
    }
}

/// Every loaded peer's health, by name.
#[derive(Debug, Default)]
pub(crate) struct PeerTable(pub(crate) Mutex<BTreeMap<String, PeerHealth>>);

impl PeerTable {
    /// A copy of the table.
    pub(crate) fn snapshot(&self) -> BTreeMap<String, PeerHealth> {
        self.0.lock().clone()
    }
}

/// Runs until the process ends.
pub(crate) async fn run(d: Arc<Daemon>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if d.draining() {
            continue;
        }
        let now = Instant::now();
        let loaded = d.agent.peers();
        let mut due = Vec::new();
        {
            let mut t = d.peers.0.lock();
            // Peers gone from the agent (their etcd key went) leave the table.
            t.retain(|name, _| loaded.iter().any(|p| p == name));
            let busy = t.values().filter(|h| h.in_flight).count();
            for name in &loaded {
                let h = t
                    .entry(name.clone())
                    .or_insert_with(|| PeerHealth::new(now));
                if !h.in_flight && h.next <= now && busy + due.len() < MAX_IN_FLIGHT {
                    h.in_flight = true;
                    due.push(name.clone());
                }
            }
        }
        for name in due {
            let d = Arc::clone(&d);
            tokio::spawn(async move {
                let dd = Arc::clone(&d);
                let n = name.clone();
                let t0 = Instant::now();
                let r = tokio::task::spawn_blocking(move || ping(&dd, &n))
                    .await
                    .unwrap_or_else(|e| Err(format!("canary task: {e}")));
                record(&d, &name, r, t0.elapsed());
            });
        }
    }
}

/// One canary to `peer`.
fn ping(d: &Daemon, peer: &str) -> Result<(), String> {
    let Some(tcp) = &d.tcp else {
        return Err("this daemon runs no tcp backend to reach peers with".into());
    };
    let md = d
        .agent
        .peer_metadata(peer)
        .ok_or_else(|| "no longer loaded".to_owned())?;
    let info = md
        .backends
        .iter()
        .find(|b| b.name == BackendName::Tcp)
        .ok_or_else(|| "the peer runs no tcp listener".to_owned())?;
    tcp.ping(&info.conn_info, d.agent.name(), d.cfg.daemon.canary_timeout)
        .map_err(|e| e.to_string())
}

fn record(d: &Daemon, name: &str, r: Result<(), String>, rtt: Duration) {
    let cfg = &d.cfg.daemon;
    let mut t = d.peers.0.lock();
    let Some(h) = t.get_mut(name) else {
        return;
    };
    h.in_flight = false;
    h.last_canary = Some(SystemTime::now());
    let now = Instant::now();
    match r {
        Ok(()) => {
            metrics::histogram!("nixl_peer_canary_seconds").record(rtt.as_secs_f64());
            if h.up == Some(false) {
                tracing::info!(peer = name, down_for = ?h.down_since.and_then(|s| s.elapsed().ok()),
                    "peer answers again: up");
            } else if h.up.is_none() {
                tracing::debug!(peer = name, ?rtt, "peer up");
            }
            h.up = Some(true);
            h.last_rtt = Some(rtt);
            h.last_error = None;
            h.down_since = None;
            h.failures = 0;
            h.next = now + cfg.canary_interval;
        }
        Err(why) => {
            metrics::counter!("nixl_peer_canary_failures_total").increment(1);
            if h.up != Some(false) {
                tracing::warn!(peer = name, error = %why, "peer does not answer its canary: down");
                h.down_since = Some(SystemTime::now());
            }
            h.up = Some(false);
            h.last_error = Some(why);
            h.failures = h.failures.saturating_add(1);
            let backoff = FIRST_RETRY
                .saturating_mul(1 << (h.failures - 1).min(16))
                .min(cfg.canary_backoff_max);
            h.next = now + backoff;
        }
    }
}
