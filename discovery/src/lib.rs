//! Agent discovery through etcd.
//!
//! Each agent publishes its encoded metadata under `PREFIX + NAME` (default prefix
//! `/nixl/agents/`), attached to a lease of `ttl` that a background task keeps alive. Peers find
//! it by name or follow the whole prefix:
//!
//! - [`Registry::connect`] opens a client and checks that etcd answers, failing with
//!   [`DiscoveryError::Connect`] within [`EtcdConfig::connect_timeout`] when it does not.
//! - [`Registry::publish`] puts the agent's metadata and returns a [`Publication`] that keeps the
//!   lease alive, republishes whenever [`Agent::generation`] moves (checked every 200 ms, or at
//!   once with [`Publication::refresh`]), and on drop revokes the lease, which deletes the key.
//!   An agent that dies without dropping it (a crash, `SIGKILL`) stops renewing the lease, and
//!   etcd deletes the key after `ttl`. The publication holds the agent weakly: when the agent
//!   is dropped, it unpublishes itself.
//! - [`Registry::fetch`], [`Registry::list`] and [`Registry::load_peer`] read what is there now.
//! - [`Registry::watch`] loads every other agent under the prefix into an agent, then follows
//!   changes until the returned [`Watcher`] is dropped: a put is loaded with
//!   [`Agent::load_remote_md`] (an older generation than the one loaded is logged at debug level
//!   and skipped, since the newer one is already there), a delete or an expired lease
//!   invalidates the peer with [`Agent::invalidate_remote`]. The agent's own key is ignored,
//!   and only peers this watcher loaded from etcd are ever invalidated by it (peers loaded by
//!   other means are left alone).
//!
//! Values under the prefix that are not full metadata of the agent their key names (garbage,
//! partial metadata, metadata filed under another name, keys that are not UTF-8) are logged,
//! counted and skipped; no value read from etcd makes this crate panic. If a peer's key comes to
//! hold such a value, the peer is invalidated as if the key had gone.
//!
//! # Trust: etcd must be access-controlled
//!
//! Whoever can write under the prefix decides where peers connect and which instance they
//! expect: etcd is part of the control plane and must be protected like it (client TLS and
//! authentication, with write access to the prefix for the agents alone). What this crate
//! checks is limited to the value itself: it must be full metadata of the agent its key names.
//! The rest is the transport's job, and it does it: an entry is only *used* where the transport
//! authenticates that name when it connects. The `tcp` backend checks that the listener it
//! reaches proves, on that connection, the agent name and instance id the entry holds (and the
//! `shm` backend that the socket belongs to the process the entry names), so an entry that points
//! at another agent, or at a listener that cannot prove the name, fails with `Denied` and moves
//! no byte. A loaded peer replaced by an entry of another instance is logged at `warn` and
//! counted (`nixl_peer_instance_replaced_total`). Within one shared secret every holder is
//! trusted alike: the transport proves a peer holds the secret, not which agent it is entitled
//! to be, so protect etcd as well as the secret.
//!
//! # Threads and time
//!
//! The API is synchronous, like the agent's. Each [`Registry`] runs a one-thread tokio runtime
//! of its own (thread name `nixl-etcd`) for the etcd client and the background tasks, and the
//! calls hand their work to it, so they may be made from any thread, including from inside
//! another tokio runtime (they block the calling thread). Every request carries a deadline of
//! `connect_timeout`, so no call hangs when etcd goes away: a call fails with
//! [`DiscoveryError::Timeout`], and dropping a [`Publication`] or a [`Watcher`] returns within
//! about twice that. In the background, failed keepalives, puts and watches are logged (once
//! per outage at `warn`, then at `debug`) and retried; a publication whose lease expired while
//! etcd was out of reach takes a new lease and puts its metadata again, and a watcher resumes
//! from the last revision it saw (or lists the prefix again if that revision was compacted).
//! HTTP/2 keepalive pings on open streams notice an etcd that stopped answering without
//! closing its connections.
//!
//! # Configuration
//!
//! [`EtcdConfig`] deserializes from the `[etcd]` table of the agent's TOML configuration:
//!
//! ```toml
//! [etcd]
//! endpoints = ["http://127.0.0.1:2379"]   # required
//! prefix = "/nixl/agents/"                # default
//! ttl_s = 10                              # default: a dead agent stays listed this long
//! connect_timeout_ms = 3000               # default: connecting, and each request
//! ```
//!
//! # Metrics
//!
//! Counters, through the `metrics` crate: `nixl_etcd_loads_total` (peers loaded or updated from
//! etcd), `nixl_etcd_invalidations_total` (peers invalidated because their key went),
//! `nixl_etcd_stale_total` (values older than what was loaded), `nixl_etcd_bad_values_total`
//! (values skipped), `nixl_etcd_publishes_total` (puts of an agent's metadata),
//! `nixl_etcd_leases_recreated_total` (leases that had expired and were replaced),
//! `nixl_etcd_watch_restarts_total` (watch streams opened again after they ended), and
//! `nixl_etcd_errors_total` with label `op` (failed background requests).
//!
//! # Building and testing
//!
//! `etcd-client` compiles etcd's protobuf definitions at build time with `protoc`. Nothing
//! needs installing for that: the workspace's `.cargo/config.toml` sets `PROTOC` to
//! `scripts/protoc`, which runs the protoc shipped in the `protoc-bin-vendored` crates (this
//! crate's build dependency); a `PROTOC` set in the environment wins. The tests start real etcd servers
//! (Debian: `etcd-server`; `NIXL_ETCD_BIN` names another binary) and print
//! `SKIP: etcd not installed (...)` where there is none.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use nixl_discovery::{EtcdConfig, Registry};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let agent = Arc::new(nixl_core::Agent::builder("prefill-0").build()?);
//! let registry = Registry::connect(&EtcdConfig::new(["http://127.0.0.1:2379"]))?;
//! let _publication = registry.publish(&agent)?; // visible to peers until dropped
//! let _watcher = registry.watch(&agent)?; // peers loaded now and kept up to date
//! println!("peers: {:?}", agent.peers());
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::future::Future;
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, KvClient, LeaseClient,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchClient, WatchOptions,
};
use nixl_core::{Agent, AgentMetadata, Error as CoreError};
use serde::Deserialize;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc as tmpsc, oneshot};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/nixl/agents/";
/// Default lease time to live.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Default connect and request timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a publication compares the agent's generation with the one it published.
const POLL: Duration = Duration::from_millis(200);
/// HTTP/2 keepalive ping interval on open streams. etcd answers pings more frequent than its
/// `--grpc-keepalive-min-time` (5 s by default) with GOAWAY, so stay well above it.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// Keys per page when listing the prefix.
const PAGE: i64 = 64;
/// Largest response accepted (etcd's own limit on a value is 1.5 MiB by default).
const MAX_MESSAGE: usize = 256 << 20;
/// Longest pause between attempts to reopen a watch.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The configuration is wrong.
    #[error("etcd config: {0}")]
    Config(String),
    /// etcd could not be reached, or did not answer, when connecting.
    #[error("etcd unreachable at {endpoints:?}: {reason}")]
    Connect {
        /// The configured endpoints.
        endpoints: Vec<String>,
        /// What went wrong, and what a plain TCP connection to each endpoint did.
        reason: String,
    },
    /// etcd answered a request with an error, or the connection failed during it.
    #[error("etcd {op} '{key}': {source}")]
    Etcd {
        /// The request.
        op: &'static str,
        /// The key (or prefix) it was about.
        key: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// etcd did not answer a request in time.
    #[error("etcd {op} '{key}': no answer within {after:?} from {endpoints:?}")]
    Timeout {
        /// The request.
        op: &'static str,
        /// The key (or prefix) it was about.
        key: String,
        /// The deadline.
        after: Duration,
        /// The configured endpoints.
        endpoints: Vec<String>,
    },
    /// Metadata fetched from etcd could not be loaded into the agent.
    #[error("loading '{peer}' from etcd: {source}")]
    Load {
        /// The peer's name.
        peer: String,
        /// Why the agent refused it.
        #[source]
        source: CoreError,
    },
    /// The background task of a publication has ended (its agent was dropped).
    #[error("publication of '{0}' has ended")]
    Ended(String),
    /// The client's runtime could not start.
    #[error("etcd client runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Result of this crate.
pub type Result<T, E = DiscoveryError> = std::result::Result<T, E>;

mod config;
pub use config::EtcdConfig;
mod conn;
use conn::*;
mod publish;
pub use publish::Publication;
use publish::*;
mod registry;
pub use registry::Registry;
use registry::*;
mod watch;
pub use watch::Watcher;
use watch::*;

#[cfg(test)]
mod tests;
