//! nixl-agent: the per-node agent daemon (`nixl-agent serve`) and a client of its control API.
//!
//! One daemon runs on every node of a fleet. It hosts one agent with every backend the node can
//! run (a backend that cannot run says why in `/healthz`), serves peers through the backends'
//! listeners, publishes itself in etcd under a lease and loads its peers from there, checks
//! their health with canaries, exports Prometheus metrics, lends a host memory pool to jobs, and
//! answers local clients on a Unix socket. See the README's daemon section for operation, and:
//!
//! - [`config`]: the `[daemon]` section and the defaults;
//! - [`serve::run`]: the daemon itself, its drain on SIGTERM/SIGINT;
//! - [`control`]: the control API's routes and a client;
//! - [`pool`]: the host memory pool;
//! - [`pool_client`]: a local process takes a lease of the pool, maps it and fills it; the
//!   daemon serves it to peers until the lease is released.
//!
//! # Metrics
//!
//! `GET /metrics` on `http_listen` renders, in the Prometheus text format, every metric of the
//! process through `metrics-exporter-prometheus`: the core's `nixl_xfer_*`, the backends'
//! `nixl_tcp_*` and others, discovery's `nixl_etcd_*`, and NIXL's telemetry names with our prefix
//! and base units:
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `nixl_agent_tx_bytes_total` | counter | bytes that left this agent: its WRITEs that ended Done, and (where the target's own threads move the bytes, the `tcp` listener) bytes peers READ from it |
//! | `nixl_agent_rx_bytes_total` | counter | bytes that arrived at this agent: its READs that ended Done, and bytes peers WROTE into it through its `tcp` listener |
//! | `nixl_agent_tx_requests_total`, `nixl_agent_rx_requests_total` | counter | this agent's WRITE / READ posts that ended Done (counted at the initiator only: a target sees chunks, not requests) |
//! | `nixl_agent_errors_total{status}` | counter | posts that did not end Done, by the C ABI's status name (`remote_disconnect`, `cancelled`, `timeout`, `denied`, ...) |
//! | `nixl_agent_xfer_seconds` | histogram | post to terminal state, every post |
//! | `nixl_agent_registered_bytes{kind}` | gauge | registered bytes by memory kind (`dram`, `vram`, `block`, `object`, `file`) |
//! | `nixl_agent_in_flight_requests` | gauge | transfers of the daemon's jobs in flight |
//! | `nixl_peer_up{peer}` | gauge | 1 when the peer answered its last canary, 0 when not; gone when the peer leaves etcd |
//! | `nixl_peer_canary_seconds` | histogram | round trip of answered canaries (a new authenticated connection and a ping) |
//! | `nixl_build_info{version}` | gauge | 1 |
//! | `nixl_pool_bytes`, `nixl_pool_leased_bytes` | gauge | the host memory pool and what is lent |
//!
//! One-sided hardware paths (`shm` mapped copies, `rdma`, CUDA IPC) move bytes without the
//! target's CPU, so their bytes count at the initiator only. Labels are bounded: backend, op,
//! kind, status, and the peer's name (one series per peer of the fleet); never a request id or
//! an address.

pub mod config;
pub mod control;
pub mod pool;
pub mod pool_client;
pub mod serve;

mod api;
mod canary;
mod fdpass;
mod http;
mod jobs;
mod poolsock;

pub use config::{DaemonConfig, ServeConfig};
pub use jobs::{JobSpec, JobState, SizeArg};
pub use serve::ServeError;
