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

/// Where etcd is and how agents are kept there: the `[etcd]` table of the agent's
/// configuration (see the [crate docs](crate) for the TOML keys).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "EtcdSection")]
pub struct EtcdConfig {
    /// Client URLs, such as `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix; an agent's key is the prefix followed by its name. End it with `/`.
    pub prefix: String,
    /// Lease time to live: how long a dead agent stays listed. etcd counts whole seconds; this
    /// is rounded up, and must be at least one second.
    pub ttl: Duration,
    /// How long connecting, and each request, may take.
    pub connect_timeout: Duration,
}

/// The TOML form of [`EtcdConfig`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdSection {
    endpoints: Vec<String>,
    prefix: Option<String>,
    ttl_s: Option<u64>,
    connect_timeout_ms: Option<u64>,
}

impl TryFrom<EtcdSection> for EtcdConfig {
    type Error = DiscoveryError;

    fn try_from(s: EtcdSection) -> Result<EtcdConfig> {
        let cfg = EtcdConfig {
            endpoints: s.endpoints,
            prefix: s.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned()),
            ttl: s.ttl_s.map_or(DEFAULT_TTL, Duration::from_secs),
            connect_timeout: s
                .connect_timeout_ms
                .map_or(DEFAULT_CONNECT_TIMEOUT, Duration::from_millis),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl EtcdConfig {
    /// These endpoints, with the defaults for the rest.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            ttl: DEFAULT_TTL,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Reads an `[etcd]` table (as the agent's configuration keeps it).
    pub fn from_table(table: &toml::Table) -> Result<EtcdConfig> {
        table
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| DiscoveryError::Config(e.message().to_owned()))
    }

    /// Reads the `[etcd]` table of a whole configuration document; other tables are ignored.
    pub fn from_toml(text: &str) -> Result<EtcdConfig> {
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| DiscoveryError::Config(e.message().to_owned()))?;
        match doc.get("etcd") {
            Some(toml::Value::Table(t)) => EtcdConfig::from_table(t),
            Some(_) => Err(DiscoveryError::Config("`etcd` is not a table".into())),
            None => Err(DiscoveryError::Config("no [etcd] table".into())),
        }
    }

    /// Checks the values (done by [`Registry::connect`] and when deserializing).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(DiscoveryError::Config(m.to_owned()));
        if self.endpoints.is_empty() {
            return bad("no endpoints");
        }
        if self.endpoints.iter().any(|e| e.trim().is_empty()) {
            return bad("an empty endpoint");
        }
        if self.prefix.is_empty() {
            return bad("empty prefix");
        }
        if self.ttl < Duration::from_secs(1) {
            return bad("ttl must be at least 1 s");
        }
        if self.ttl > Duration::from_secs(i64::MAX as u64 / 2) {
            return bad("ttl too large");
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout must not be zero");
        }
        Ok(())
    }

    /// The lease TTL in whole seconds, rounded up.
    fn ttl_secs(&self) -> i64 {
        let s = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        i64::try_from(s).unwrap_or(i64::MAX)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The agent name a key stands for, if it is under the prefix and valid UTF-8.
    fn name_of(&self, key: &[u8]) -> Option<String> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        let name = std::str::from_utf8(rest).ok()?;
        (!name.is_empty()).then(|| name.to_owned())
    }
}

/// The tokio runtime of a [`Registry`]; shut down without waiting, so that dropping it is
/// allowed anywhere (also inside another runtime).
struct Rt(Option<Runtime>);

impl Rt {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("runtime is present until drop")
            .handle()
    }

    /// Runs `f` on the runtime and waits for it on this thread. Every future given here is
    /// bounded by request deadlines.
    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(DiscoveryError::Runtime(std::io::Error::other(
                "etcd client runtime stopped",
            )))
        })
    }

    /// Runs `f` in the background; the receiver hears when it has ended.
    fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel();
        self.handle().spawn(async move {
            f.await;
            let _ = tx.send(());
        });
        rx
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The etcd clients and the configuration, cloned into each request and task.
#[derive(Clone)]
struct Conn {
    kv: KvClient,
    lease: LeaseClient,
    watch: WatchClient,
    cfg: Arc<EtcdConfig>,
}

impl Conn {
    /// Bounds a request by the configured timeout.
    async fn timed<T>(
        &self,
        op: &'static str,
        key: &str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.cfg.connect_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(DiscoveryError::Etcd {
                op,
                key: key.to_owned(),
                source,
            }),
            Err(_) => Err(DiscoveryError::Timeout {
                op,
                key: key.to_owned(),
                after: self.cfg.connect_timeout,
                endpoints: self.cfg.endpoints.clone(),
            }),
        }
    }

    async fn get_one(&self, key: String) -> Result<Option<Vec<u8>>> {
        let mut kv = self.kv.clone();
        let mut r = self.timed("get", &key, kv.get(key.clone(), None)).await?;
        Ok(r.take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.value().to_vec()))
    }

    /// Everything under the prefix at one revision, a page at a time; returns the revision.
    async fn list_all(&self, keys_only: bool) -> Result<(i64, Vec<KeyValue>)> {
        let prefix = self.cfg.prefix.as_bytes();
        let end = prefix_end(prefix);
        let mut from = prefix.to_vec();
        let mut rev = 0;
        let mut out = Vec::new();
        loop {
            let mut o = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if keys_only {
                o = o.with_keys_only();
            }
            if rev > 0 {
                o = o.with_revision(rev);
            }
            let mut kv = self.kv.clone();
            let mut r = self
                .timed("list", &self.cfg.prefix, kv.get(from.clone(), Some(o)))
                .await?;
            if rev == 0 {
                rev = r.header().map_or(0, |h| h.revision());
            }
            let more = r.more();
            let page = r.take_kvs();
            match page.last() {
                Some(last) if more => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => {
                    out.extend(page);
                    return Ok((rev, out));
                }
            }
            out.extend(page);
        }
    }
}

/// The smallest key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the key space.
    vec![0]
}

/// Counts a failed background request and logs it: at `warn` for the first failure of an
/// outage, at `debug` for the retries after it.
fn trouble(failing: &mut bool, op: &'static str, what: &str, e: &DiscoveryError) {
    metrics::counter!("nixl_etcd_errors_total", "op" => op).increment(1);
    if *failing {
        tracing::debug!(%what, error = %e, "etcd {op} failed again; retrying");
    } else {
        tracing::warn!(%what, error = %e, "etcd {op} failed; retrying");
        *failing = true;
    }
}

fn recovered(failing: &mut bool, what: &str) {
    if std::mem::take(failing) {
        tracing::info!(%what, "etcd reachable again");
    }
}

struct Shared {
    conn: Conn,
    // Last: the clients above go before the runtime they run on.
    rt: Rt,
}

/// A connection to etcd. Cheap to clone; the runtime stops when the last clone, publication
/// and watcher are gone.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("cfg", &*self.shared.conn.cfg)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Connects and checks that etcd answers, all within `cfg.connect_timeout`; otherwise
    /// fails with [`DiscoveryError::Connect`], which says what each endpoint did.
    pub fn connect(cfg: &EtcdConfig) -> Result<Registry> {
        cfg.validate()?;
        let rt = Rt(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("nixl-etcd")
                .enable_all()
                .build()?,
        ));
        let cfg = Arc::new(cfg.clone());
        let conn = rt.run(connect(cfg))?;
        Ok(Registry {
            shared: Arc::new(Shared { conn, rt }),
        })
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &EtcdConfig {
        &self.shared.conn.cfg
    }

    /// An agent's published metadata (encoded, as [`Agent::metadata_bytes`] makes it), if its
    /// key is there. The bytes are returned as stored, unchecked.
    pub fn fetch(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let key = self.config().key(name);
        let c = self.shared.conn.clone();
        self.shared.rt.run(async move { c.get_one(key).await })
    }

    /// Fetches `name` and loads it into `agent`: `Ok(false)` when it is not published,
    /// [`DiscoveryError::Load`] when the agent refuses it (garbage, another agent's name, an
    /// older generation than the one loaded).
    pub fn load_peer(&self, agent: &Agent, name: &str) -> Result<bool> {
        let Some(bytes) = self.fetch(name)? else {
            return Ok(false);
        };
        let load = |source| DiscoveryError::Load {
            peer: name.to_owned(),
            source,
        };
        let md = AgentMetadata::decode(&bytes).map_err(|e| load(e.into()))?;
        if md.name != name {
            return Err(load(CoreError::InvalidArgument(format!(
                "the value is the metadata of '{}'",
                md.name
            ))));
        }
        agent.load_remote_md(md).map_err(load)?;
        Ok(true)
    }

    /// Names under the prefix now (every key, whether or not its value is valid metadata).
    pub fn list(&self) -> Result<Vec<String>> {
        let c = self.shared.conn.clone();
        self.shared.rt.run(async move {
            let (_, kvs) = c.list_all(true).await?;
            Ok(kvs
                .iter()
                .filter_map(|kv| c.cfg.name_of(kv.key()))
                .collect())
        })
    }

    /// Publishes `agent` under `PREFIX + agent.name()`: the key is there when this returns, and
    /// stays, kept up to date, until the [`Publication`] (or the agent) is dropped. Publishing
    /// the same name twice at once, from here or from another process, makes the two overwrite
    /// each other; give agents unique names.
    pub fn publish(&self, agent: &Arc<Agent>) -> Result<Publication> {
        let key = self.config().key(agent.name());
        let mut p = Publisher {
            conn: self.shared.conn.clone(),
            key: key.clone(),
            agent: Arc::downgrade(agent),
            lease: 0,
            keeper: None,
            published: None,
            failing: false,
        };
        let p = self.shared.rt.run(async move {
            match p.start().await {
                Ok(()) => Ok(p),
                Err(e) => {
                    p.revoke().await;
                    Err(e)
                }
            }
        })?;
        let (tx, rx) = tmpsc::unbounded_channel();
        let done = self.shared.rt.spawn(p.run(rx));
        Ok(Publication {
            key,
            timeout: self.config().connect_timeout,
            cmds: tx,
            done: Some(std::sync::Mutex::new(done)),
            _shared: Arc::clone(&self.shared),
        })
    }

    /// Loads every other agent under the prefix into `agent` now, then follows changes until the
    /// returned [`Watcher`] (or the agent) is dropped; see the [crate docs](crate).
    pub fn watch(&self, agent: &Arc<Agent>) -> Result<Watcher> {
        let mut f = Follower {
            conn: self.shared.conn.clone(),
            agent: Arc::downgrade(agent),
            own: agent.name().to_owned(),
            known: HashSet::new(),
            rev: 0,
            failing: false,
        };
        let f = self.shared.rt.run(async move {
            f.resync().await?;
            Ok(f)
        })?;
        let (tx, rx) = oneshot::channel();
        let done = self.shared.rt.spawn(f.run(rx));
        Ok(Watcher {
            timeout: self.config().connect_timeout,
            stop: Some(tx),
            done: Some(std::sync::Mutex::new(done)),
            _shared: Arc::clone(&self.shared),
        })
    }
}

async fn connect(cfg: Arc<EtcdConfig>) -> Result<Conn> {
    let t = cfg.connect_timeout;
    // Plain TCP probes alongside, to say why when etcd does not answer.
    let probes: Vec<_> = cfg
        .endpoints
        .iter()
        .map(|e| tokio::spawn(tcp_probe(e.clone(), t)))
        .collect();
    // Requests are bounded by `Conn::timed` (not by the client's own timeout, whose error
    // would not say it is one).
    let opts = ConnectOptions::new()
        .with_connect_timeout(t)
        .with_keep_alive(PING_INTERVAL, t)
        .with_keep_alive_while_idle(false);
    let attempt = async {
        let client = Client::connect(&cfg.endpoints, Some(opts)).await?;
        let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let probe = GetOptions::new().with_keys_only().with_limit(1);
        kv.get(cfg.prefix.clone(), Some(probe)).await?;
        Ok::<_, etcd_client::Error>(client)
    };
    match tokio::time::timeout(t, attempt).await {
        Ok(Ok(client)) => {
            for p in &probes {
                p.abort();
            }
            Ok(Conn {
                kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
                lease: client.lease_client(),
                watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
                cfg: Arc::clone(&cfg),
            })
        }
        Ok(Err(e)) => Err(connect_failed(&cfg, e.to_string(), probes).await),
        Err(_) => {
            let what = format!("no answer within {t:?}");
            Err(connect_failed(&cfg, what, probes).await)
        }
    }
}

/// The error of a failed connect, with what the TCP probes found out so far.
async fn connect_failed(
    cfg: &EtcdConfig,
    what: String,
    probes: Vec<tokio::task::JoinHandle<String>>,
) -> DiscoveryError {
    let mut reason = what;
    for p in probes {
        if p.is_finished() {
            if let Ok(s) = p.await {
                reason.push_str("; ");
                reason.push_str(&s);
            }
        } else {
            p.abort();
        }
    }
    DiscoveryError::Connect {
        endpoints: cfg.endpoints.clone(),
        reason,
    }
}

/// What a plain TCP connection to an endpoint does.
async fn tcp_probe(endpoint: String, t: Duration) -> String {
    let rest = endpoint.split_once("://").map_or(&*endpoint, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let r = tokio::time::timeout(t, tokio::net::TcpStream::connect(authority)).await;
    match r {
        Ok(Ok(_)) => format!("{authority}: TCP connects, etcd does not answer"),
        Ok(Err(e)) => format!("{authority}: {e}"),
        Err(_) => format!("{authority}: no TCP answer"),
    }
}

/// An agent's presence in etcd; see [`Registry::publish`]. Dropping it revokes the lease, which
/// deletes the key (or, if etcd is out of reach, the key goes when the lease runs out).
#[derive(Debug)]
pub struct Publication {
    key: String,
    timeout: Duration,
    cmds: tmpsc::UnboundedSender<Cmd>,
    /// Hears when the task has ended. (In a mutex only to make this `Sync`.)
    done: Option<std::sync::Mutex<mpsc::Receiver<()>>>,
    _shared: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

enum Cmd {
    Refresh(mpsc::SyncSender<Result<()>>),
    Stop,
}

impl Publication {
    /// The key it publishes under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Puts the agent's current metadata now, whether or not its generation moved (so it also
    /// restores a key deleted by hand), and waits until etcd has stored it; watchers receive it
    /// right after. Without this, a new generation goes out within 200 ms.
    pub fn refresh(&self) -> Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.cmds.send(Cmd::Refresh(tx)).is_err() {
            return Err(DiscoveryError::Ended(self.key.clone()));
        }
        // The task may be busy with a keepalive first, then takes a new lease at worst.
        match rx.recv_timeout(self.timeout * 4 + Duration::from_millis(500)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(DiscoveryError::Ended(self.key.clone()))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(DiscoveryError::Timeout {
                op: "refresh",
                key: self.key.clone(),
                after: self.timeout * 4,
                endpoints: self._shared.conn.cfg.endpoints.clone(),
            }),
        }
    }
}

impl Drop for Publication {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Stop);
        if let Some(done) = self.done.take() {
            let done = done.into_inner().unwrap_or_else(|e| e.into_inner());
            // A request in flight, then the revocation, each bounded by the timeout.
            let _ = done.recv_timeout(self.timeout * 2 + Duration::from_millis(500));
        }
    }
}

/// The background side of a [`Publication`].
struct Publisher {
    conn: Conn,
    key: String,
    agent: Weak<Agent>,
    /// Current lease; 0 when there is none (it expired, or granting failed).
    lease: i64,
    /// Keepalive stream of `lease`; `None` when it must be opened again.
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// Generation last put under `lease`.
    published: Option<u64>,
    failing: bool,
}

impl Publisher {
    /// The first publication, done before [`Registry::publish`] returns.
    async fn start(&mut self) -> Result<()> {
        self.new_lease().await?;
        self.put(true).await?;
        self.open_keeper().await
    }

    async fn new_lease(&mut self) -> Result<()> {
        let mut lc = self.conn.lease.clone();
        let ttl = self.conn.cfg.ttl_secs();
        let l = self
            .conn
            .timed("lease grant", &self.key, lc.grant(ttl, None))
            .await?;
        self.lease = l.id();
        self.keeper = None;
        self.published = None;
        Ok(())
    }

    /// Opens the keepalive stream; the first answer says whether the lease is still alive.
    async fn open_keeper(&mut self) -> Result<()> {
        let mut lc = self.conn.lease.clone();
        match self
            .conn
            .timed("lease keepalive", &self.key, lc.keep_alive(self.lease))
            .await
        {
            Ok(k) => {
                self.keeper = Some(k);
                Ok(())
            }
            Err(e) => {
                if matches!(
                    &e,
                    DiscoveryError::Etcd {
                        source: etcd_client::Error::LeaseKeepAliveError(_),
                        ..
                    }
                ) {
                    // etcd answered: the lease is gone (expired while etcd was out of reach).
                    self.lost();
                }
                Err(e)
            }
        }
    }

    /// Renews the lease once; on failure the stream is dropped and reopened on the next beat.
    async fn beat(&mut self) -> Result<()> {
        if self.lease == 0 {
            return self.recreate().await;
        }
        let Some((k, s)) = self.keeper.as_mut() else {
            return self.open_keeper().await;
        };
        let renewed = self
            .conn
            .timed("lease keepalive", &self.key, async {
                k.keep_alive().await?;
                s.message().await
            })
            .await;
        match renewed {
            Ok(Some(r)) if r.ttl() > 0 => Ok(()),
            Ok(Some(_)) => {
                self.lost();
                self.recreate().await
            }
            Ok(None) => {
                self.keeper = None;
                // Try again on a fresh stream at once.
                self.open_keeper().await
            }
            Err(e) => {
                self.keeper = None;
                Err(e)
            }
        }
    }

    /// The lease expired: the key is gone from etcd.
    fn lost(&mut self) {
        tracing::warn!(key = %self.key, lease = self.lease,
            "etcd lease expired; publishing under a new one");
        self.lease = 0;
        self.keeper = None;
    }

    /// A new lease and the metadata put again under it.
    async fn recreate(&mut self) -> Result<()> {
        self.new_lease().await?;
        metrics::counter!("nixl_etcd_leases_recreated_total").increment(1);
        self.put(true).await?;
        self.open_keeper().await
    }

    /// Puts the agent's metadata if its generation moved (or always, with `force`).
    async fn put(&mut self, force: bool) -> Result<()> {
        if self.lease == 0 {
            return self.recreate_boxed().await;
        }
        let Some(agent) = self.agent.upgrade() else {
            return Err(DiscoveryError::Ended(self.key.clone()));
        };
        // Cheap check first: metadata lists every region.
        if !force && self.published == Some(agent.generation()) {
            return Ok(());
        }
        let md = agent.metadata();
        drop(agent);
        let mut kv = self.conn.kv.clone();
        let opts = PutOptions::new().with_lease(self.lease);
        let r = self
            .conn
            .timed(
                "put",
                &self.key,
                kv.put(self.key.clone(), md.encode(), Some(opts)),
            )
            .await;
        match r {
            Ok(_) => {
                metrics::counter!("nixl_etcd_publishes_total").increment(1);
                tracing::debug!(key = %self.key, generation = md.generation, "published");
                self.published = Some(md.generation);
                Ok(())
            }
            Err(e) => {
                // Perhaps the lease is gone: check it on the next beat.
                self.keeper = None;
                Err(e)
            }
        }
    }

    /// `put` and `recreate` call each other; one of them goes through a box.
    fn recreate_boxed(
        &mut self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(self.recreate())
    }

    async fn revoke(&mut self) {
        if self.lease == 0 {
            return;
        }
        let mut lc = self.conn.lease.clone();
        if let Err(e) = self
            .conn
            .timed("lease revoke", &self.key, lc.revoke(self.lease))
            .await
        {
            tracing::debug!(key = %self.key, error = %e, "etcd lease revoke failed; the key goes at its ttl");
        }
        self.lease = 0;
    }

    async fn run(mut self, mut cmds: tmpsc::UnboundedReceiver<Cmd>) {
        let ttl = self.conn.cfg.ttl;
        let beat_every = ttl / 3;
        let tick = POLL.min(ttl / 4);
        let mut next_beat = tokio::time::Instant::now() + beat_every;
        loop {
            let mut reply = None;
            tokio::select! {
                biased;
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Refresh(tx)) => reply = Some(tx),
                    Some(Cmd::Stop) | None => {
                        self.revoke().await;
                        return;
                    }
                },
                _ = tokio::time::sleep(tick) => {}
            }
            if self.agent.strong_count() == 0 {
                tracing::debug!(key = %self.key, "agent dropped; unpublishing");
                self.revoke().await;
                return;
            }
            let now = tokio::time::Instant::now();
            let mut r = Ok(());
            if now >= next_beat || self.keeper.is_none() {
                r = self.beat().await;
                // After a failure, try again on the next tick.
                next_beat = if r.is_ok() { now + beat_every } else { now };
            }
            if r.is_ok() || reply.is_some() {
                r = self.put(reply.is_some()).await;
            }
            match &r {
                Ok(()) => recovered(&mut self.failing, &self.key),
                Err(DiscoveryError::Ended(_)) => {}
                Err(e) => trouble(&mut self.failing, "publish", &self.key, e),
            }
            if let Some(tx) = reply {
                let _ = tx.send(r);
            }
        }
    }
}

/// Follows the agents under the prefix; see [`Registry::watch`]. Dropping it stops following
/// (peers already loaded stay loaded).
#[derive(Debug)]
pub struct Watcher {
    timeout: Duration,
    stop: Option<oneshot::Sender<()>>,
    /// Hears when the task has ended. (In a mutex only to make this `Sync`.)
    done: Option<std::sync::Mutex<mpsc::Receiver<()>>>,
    _shared: Arc<Shared>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let done = done.into_inner().unwrap_or_else(|e| e.into_inner());
            let _ = done.recv_timeout(self.timeout * 2 + Duration::from_millis(500));
        }
    }
}

/// The background side of a [`Watcher`].
struct Follower {
    conn: Conn,
    agent: Weak<Agent>,
    own: String,
    /// Peers whose keys hold their metadata, as far as this watcher knows: the ones it may
    /// invalidate.
    known: HashSet<String>,
    /// Last revision seen.
    rev: i64,
    failing: bool,
}

impl Follower {
    /// Handles a value under the prefix; returns the peer's name when the value is valid
    /// metadata of the agent its key names (loaded now, or older than what is loaded).
    fn put(&self, agent: &Agent, key: &[u8], value: &[u8]) -> Option<String> {
        let cfg = &self.conn.cfg;
        let skip = |why: &dyn std::fmt::Display| {
            metrics::counter!("nixl_etcd_bad_values_total").increment(1);
            tracing::warn!(agent = %self.own, key = %String::from_utf8_lossy(key), "skipping etcd value: {why}");
            None
        };
        let Some(name) = cfg.name_of(key) else {
            return skip(&"key is not UTF-8");
        };
        if name == self.own {
            return None;
        }
        let md = match AgentMetadata::decode(value) {
            Ok(md) => md,
            Err(e) => return skip(&e),
        };
        if md.name != name {
            return skip(&format_args!("it is the metadata of '{}'", md.name));
        }
        if md.partial {
            return skip(&"partial metadata");
        }
        let generation = md.generation;
        match agent.load_remote_md(md) {
            Ok(_) => {
                metrics::counter!("nixl_etcd_loads_total").increment(1);
                tracing::debug!(agent = %self.own, peer = %name, generation, "loaded from etcd");
                Some(name)
            }
            Err(CoreError::StaleMetadata { have, got, .. }) => {
                metrics::counter!("nixl_etcd_stale_total").increment(1);
                tracing::debug!(agent = %self.own, peer = %name, have, got,
                    "etcd has an older generation than the one loaded; kept the newer");
                Some(name)
            }
            Err(e) => skip(&e),
        }
    }

    /// A key went (or no longer holds its peer's metadata): the peer is invalidated if this
    /// watcher had it from etcd.
    fn gone(&mut self, agent: &Agent, name: &str) {
        if self.known.remove(name) {
            self.invalidate(agent, name);
        }
    }

    fn invalidate(&self, agent: &Agent, name: &str) {
        if agent.invalidate_remote(name).is_ok() {
            metrics::counter!("nixl_etcd_invalidations_total").increment(1);
            tracing::info!(agent = %self.own, peer = %name, "peer left etcd; invalidated");
        }
    }

    /// Lists the prefix and loads it; peers this watcher loaded that are no longer there are
    /// invalidated.
    async fn resync(&mut self) -> Result<()> {
        let (rev, kvs) = self.conn.list_all(false).await?;
        let Some(agent) = self.agent.upgrade() else {
            return Ok(());
        };
        let mut now = HashSet::new();
        for kv in &kvs {
            if let Some(name) = self.put(&agent, kv.key(), kv.value()) {
                now.insert(name);
            }
        }
        for name in self.known.difference(&now) {
            self.invalidate(&agent, name);
        }
        self.known = now;
        self.rev = rev;
        Ok(())
    }

    /// Sleeps, unless stopped (then `true`).
    async fn pause(stop: &mut oneshot::Receiver<()>, d: Duration) -> bool {
        tokio::select! {
            _ = stop => true,
            _ = tokio::time::sleep(d) => false,
        }
    }

    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let prefix = self.conn.cfg.prefix.clone();
        let mut backoff = Duration::from_millis(100);
        let mut must_resync = false;
        let mut opened = false;
        loop {
            if must_resync {
                if let Err(e) = self.resync().await {
                    trouble(&mut self.failing, "resync", &prefix, &e);
                    if Self::pause(&mut stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                must_resync = false;
            }
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(self.rev + 1);
            let mut wc = self.conn.watch.clone();
            let mut stream = match self
                .conn
                .timed("watch", &prefix, wc.watch(prefix.clone(), Some(opts)))
                .await
            {
                Ok(s) => {
                    if opened {
                        metrics::counter!("nixl_etcd_watch_restarts_total").increment(1);
                    }
                    opened = true;
                    s
                }
                Err(e) => {
                    trouble(&mut self.failing, "watch", &prefix, &e);
                    if Self::pause(&mut stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            loop {
                let msg = tokio::select! {
                    biased;
                    _ = &mut stop => return,
                    m = stream.message() => m,
                };
                let Some(agent) = self.agent.upgrade() else {
                    return;
                };
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => {
                        let e = DiscoveryError::Etcd {
                            op: "watch",
                            key: prefix.clone(),
                            source: etcd_client::Error::WatchError("stream ended".into()),
                        };
                        trouble(&mut self.failing, "watch", &prefix, &e);
                        break;
                    }
                    Err(source) => {
                        let e = DiscoveryError::Etcd {
                            op: "watch",
                            key: prefix.clone(),
                            source,
                        };
                        trouble(&mut self.failing, "watch", &prefix, &e);
                        break;
                    }
                };
                if resp.created() {
                    recovered(&mut self.failing, &prefix);
                    backoff = Duration::from_millis(100);
                }
                if resp.canceled() || resp.compact_revision() > 0 {
                    // History from `rev` is gone (compacted): list everything again.
                    tracing::info!(prefix = %prefix, reason = %resp.cancel_reason(),
                        compact_revision = resp.compact_revision(), "etcd watch cancelled; listing again");
                    must_resync = true;
                    break;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    self.rev = self.rev.max(kv.mod_revision());
                    let Some(name) = self.conn.cfg.name_of(kv.key()) else {
                        if ev.event_type() == EventType::Put {
                            self.put(&agent, kv.key(), kv.value());
                        }
                        continue;
                    };
                    if name == self.own {
                        continue;
                    }
                    match ev.event_type() {
                        EventType::Put => match self.put(&agent, kv.key(), kv.value()) {
                            Some(n) => {
                                self.known.insert(n);
                            }
                            // The key no longer holds that peer's metadata.
                            None => self.gone(&agent, &name),
                        },
                        EventType::Delete => self.gone(&agent, &name),
                    }
                }
            }
            // Stream ended: open it again from the last revision seen.
            if Self::pause(&mut stop, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_from_toml() {
        let c = EtcdConfig::from_toml(
            "backends = [\"local\"]\n[etcd]\nendpoints = [\"http://h:2379\"]\nttl_s = 3\n",
        )
        .unwrap();
        assert_eq!(c.endpoints, vec!["http://h:2379".to_owned()]);
        assert_eq!(c.prefix, DEFAULT_PREFIX);
        assert_eq!(c.ttl, Duration::from_secs(3));
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        let c = EtcdConfig::from_toml(
            "[etcd]\nendpoints = [\"a:1\", \"b:2\"]\nprefix = \"/x/\"\nconnect_timeout_ms = 250\n",
        )
        .unwrap();
        assert_eq!(c.prefix, "/x/");
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.ttl, DEFAULT_TTL);
        for bad in [
            "",
            "etcd = 1",
            "[etcd]\n",
            "[etcd]\nendpoints = []\n",
            "[etcd]\nendpoints = [\"a:1\"]\nttl_s = 0\n",
            "[etcd]\nendpoints = [\"a:1\"]\nprefix = \"\"\n",
            "[etcd]\nendpoints = [\"a:1\"]\nconnect_timeout_ms = 0\n",
            "[etcd]\nendpoints = [\"a:1\"]\nttl = 3\n",
        ] {
            let e = EtcdConfig::from_toml(bad).unwrap_err();
            assert!(matches!(e, DiscoveryError::Config(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Registry>();
        check::<Publication>();
        check::<Watcher>();
        check::<DiscoveryError>();
    }

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        let mut c = EtcdConfig::new(["a:1"]);
        c.ttl = Duration::from_millis(1500);
        assert_eq!(c.ttl_secs(), 2);
        c.ttl = Duration::from_secs(2);
        assert_eq!(c.ttl_secs(), 2);
        c.ttl = Duration::from_millis(999);
        assert!(c.validate().is_err());
    }

    #[test]
    fn keys_and_names() {
        let c = EtcdConfig::new(["a:1"]);
        assert_eq!(c.key("x"), "/nixl/agents/x");
        assert_eq!(c.name_of(b"/nixl/agents/x/y"), Some("x/y".to_owned()));
        assert_eq!(c.name_of(b"/nixl/agents/"), None);
        assert_eq!(c.name_of(b"/nixl/other/x"), None);
        assert_eq!(c.name_of(b"/nixl/agents/\xff"), None);
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
