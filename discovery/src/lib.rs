//! Agent discovery through etcd.
//!
//! An agent publishes its metadata under `PREFIX + NAME` with a lease of `ttl`, kept alive for
//! as long as the [`Publication`] lives and republished whenever the agent's registrations
//! change (its generation moves). A peer fetches one agent by name ([`Registry::fetch`]) or
//! follows them all ([`Registry::watch`]): every agent under the prefix is loaded as it appears
//! or changes, and invalidated when its key goes, which is also what happens when an agent dies:
//! its lease is no longer kept alive and etcd deletes the key after `ttl`.
//!
//! The API is synchronous, like the agent's; a small tokio runtime inside the [`Registry`] runs
//! the etcd client (so call it from plain threads, not from inside another tokio runtime). Nothing here blocks longer than the configured timeouts, and values under the
//! prefix that are not valid metadata are logged and skipped.
//!
//! ```toml
//! [etcd]
//! endpoints = ["http://127.0.0.1:2379"]
//! prefix = "/nixl/agents/"
//! ttl_s = 10
//! connect_timeout_ms = 3000
//! ```

use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use nixl_core::{Agent, ErrorClass};
use serde::Deserialize;
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, Notify};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// etcd answered with an error or the connection failed.
    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    /// etcd did not answer in time.
    #[error("etcd {op}: no answer within {after:?} (endpoints {endpoints:?})")]
    Timeout {
        op: &'static str,
        after: Duration,
        endpoints: Vec<String>,
    },
    /// The configuration is wrong.
    #[error("etcd config: {0}")]
    Config(String),
    /// The runtime could not start.
    #[error("etcd client runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, DiscoveryError>;

/// `[etcd]` of the agent's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// Key prefix of the agents.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Lease time to live, seconds: how long a dead agent stays listed.
    #[serde(default = "default_ttl")]
    pub ttl_s: u64,
    /// How long connecting, and each request, may take.
    #[serde(default = "default_timeout")]
    pub connect_timeout_ms: u64,
}

fn default_prefix() -> String {
    "/nixl/agents/".into()
}
fn default_ttl() -> u64 {
    10
}
fn default_timeout() -> u64 {
    3000
}

impl EtcdConfig {
    /// Endpoints with the defaults for the rest.
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: default_prefix(),
            ttl_s: default_ttl(),
            connect_timeout_ms: default_timeout(),
        }
    }

    /// Reads the `[etcd]` table of a configuration file.
    pub fn from_table(t: &toml::Table) -> Result<EtcdConfig> {
        let cfg: EtcdConfig = t
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| DiscoveryError::Config(e.message().to_owned()))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(DiscoveryError::Config("no endpoints".into()));
        }
        if self.ttl_s < 1 {
            return Err(DiscoveryError::Config("ttl_s must be at least 1".into()));
        }
        if self.prefix.is_empty() {
            return Err(DiscoveryError::Config("empty prefix".into()));
        }
        Ok(())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(10))
    }
}

/// A connection to etcd.
pub struct Registry {
    rt: Arc<Runtime>,
    client: Client,
    cfg: EtcdConfig,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

async fn timed<T>(
    cfg: &EtcdConfig,
    op: &'static str,
    f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(cfg.timeout(), f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(DiscoveryError::Etcd { op, source }),
        Err(_) => Err(DiscoveryError::Timeout {
            op,
            after: cfg.timeout(),
            endpoints: cfg.endpoints.clone(),
        }),
    }
}

impl Registry {
    /// Connects, and checks that etcd answers, within the connect timeout.
    pub fn connect(cfg: &EtcdConfig) -> Result<Registry> {
        cfg.check()?;
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("nixl-etcd")
                .enable_all()
                .build()?,
        );
        let cfg = cfg.clone();
        let client = rt.block_on(async {
            let opts = ConnectOptions::new()
                .with_connect_timeout(cfg.timeout())
                .with_timeout(cfg.timeout());
            let mut c = timed(
                &cfg,
                "connect",
                Client::connect(cfg.endpoints.clone(), Some(opts)),
            )
            .await?;
            let probe = GetOptions::new().with_keys_only().with_limit(1);
            timed(&cfg, "status", c.get(cfg.prefix.clone(), Some(probe))).await?;
            Ok::<_, DiscoveryError>(c)
        })?;
        Ok(Registry { rt, client, cfg })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.cfg.prefix)
    }

    /// An agent's published metadata, if it is there.
    pub fn fetch(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let mut c = self.client.clone();
        let key = self.key(name);
        self.rt.block_on(async {
            let r = timed(&self.cfg, "get", c.get(key, None)).await?;
            Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
        })
    }

    /// Names of the agents published under the prefix.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut c = self.client.clone();
        let prefix = self.cfg.prefix.clone();
        self.rt.block_on(async {
            let opts = GetOptions::new().with_prefix().with_keys_only();
            let r = timed(&self.cfg, "list", c.get(prefix.clone(), Some(opts))).await?;
            Ok(r.kvs()
                .iter()
                .filter_map(|kv| name_of(&prefix, kv.key()))
                .collect())
        })
    }

    /// Publishes `agent` until the returned [`Publication`] is dropped.
    pub fn publish(&self, agent: &Arc<Agent>) -> Result<Publication> {
        let mut c = self.client.clone();
        let cfg = self.cfg.clone();
        let key = self.key(agent.name());
        // The first put happens here, so that the caller knows the agent is visible.
        let first = self.rt.block_on(async {
            let lease = timed(&cfg, "lease grant", c.lease_grant(cfg.ttl_s as i64, None)).await?;
            let gen = agent.generation();
            let opts = PutOptions::new().with_lease(lease.id());
            timed(
                &cfg,
                "put",
                c.put(key.clone(), agent.metadata_bytes(), Some(opts)),
            )
            .await?;
            Ok::<_, DiscoveryError>((lease.id(), gen))
        })?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let refresh = Arc::new(Notify::new());
        let task = spawn(
            &self.rt,
            keep_published(
                c,
                cfg,
                key,
                Arc::downgrade(agent),
                first,
                Arc::clone(&refresh),
                stop_rx,
            ),
        );
        Ok(Publication {
            _rt: Arc::clone(&self.rt),
            stop: Some(stop_tx),
            task: Some(task),
            refresh,
        })
    }

    /// Loads every other agent under the prefix into `agent` now, then follows changes until
    /// the returned [`Watcher`] is dropped.
    pub fn watch(&self, agent: &Arc<Agent>) -> Result<Watcher> {
        let mut c = self.client.clone();
        let cfg = self.cfg.clone();
        let rev = self
            .rt
            .block_on(load_all(&mut c, &cfg, &Arc::downgrade(agent)))?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = spawn(
            &self.rt,
            follow(c, cfg, Arc::downgrade(agent), rev, stop_rx),
        );
        Ok(Watcher {
            _rt: Arc::clone(&self.rt),
            stop: Some(stop_tx),
            task: Some(task),
        })
    }
}

/// Runs a background task; the receiver hears when it has ended (so that a drop can wait for
/// it without entering the runtime).
fn spawn(
    rt: &Runtime,
    f: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::sync::mpsc::Receiver<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        f.await;
        let _ = tx.send(());
    });
    rx
}

/// Asks a background task to stop and waits (bounded) until it has.
fn stop_task(
    stop: &mut Option<oneshot::Sender<bool>>,
    task: &mut Option<std::sync::mpsc::Receiver<()>>,
    revoke: bool,
) {
    if let Some(stop) = stop.take() {
        let _ = stop.send(revoke);
    }
    if let Some(task) = task.take() {
        let _ = task.recv_timeout(Duration::from_secs(5));
    }
}

fn name_of(prefix: &str, key: &[u8]) -> Option<String> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix(prefix)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

/// An agent's presence in etcd. Dropping it deletes the key (revokes the lease).
#[derive(Debug)]
pub struct Publication {
    _rt: Arc<Runtime>,
    stop: Option<oneshot::Sender<bool>>,
    task: Option<std::sync::mpsc::Receiver<()>>,
    refresh: Arc<Notify>,
}

impl Publication {
    /// Republishes now (registrations changed and peers should know at once).
    pub fn refresh(&self) {
        self.refresh.notify_one();
    }

    /// Stops keeping the lease alive without revoking it, as a crashed agent would: the key
    /// disappears when the lease runs out. For tests and for handing over to another process.
    pub fn abandon(mut self) {
        self.finish(false);
    }

    fn finish(&mut self, revoke: bool) {
        stop_task(&mut self.stop, &mut self.task, revoke);
    }
}

impl Drop for Publication {
    fn drop(&mut self) {
        self.finish(true);
    }
}

async fn keep_published(
    mut c: Client,
    cfg: EtcdConfig,
    key: String,
    agent: Weak<Agent>,
    first: (i64, u64),
    refresh: Arc<Notify>,
    mut stop: oneshot::Receiver<bool>,
) {
    let (mut lease, mut gen) = first;
    let ttl = Duration::from_secs(cfg.ttl_s);
    let beat = (ttl / 3).max(Duration::from_millis(300));
    let poll = Duration::from_millis(200).min(beat);
    let mut keeper = match c.lease_keep_alive(lease).await {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(%key, error = %e, "etcd keepalive stream");
            None
        }
    };
    let mut last_beat = tokio::time::Instant::now();
    loop {
        tokio::select! {
            revoke = &mut stop => {
                if revoke.unwrap_or(true) {
                    let _ = timed(&cfg, "lease revoke", c.lease_revoke(lease)).await;
                }
                return;
            }
            _ = refresh.notified() => { gen = 0; }
            _ = tokio::time::sleep(poll) => {}
        }
        let Some(agent) = agent.upgrade() else {
            let _ = timed(&cfg, "lease revoke", c.lease_revoke(lease)).await;
            return;
        };
        let mut healthy = true;
        if last_beat.elapsed() >= beat {
            last_beat = tokio::time::Instant::now();
            healthy = match keeper.as_mut() {
                Some((k, stream)) => match k.keep_alive().await {
                    Ok(()) => matches!(
                        tokio::time::timeout(cfg.timeout(), stream.message()).await,
                        Ok(Ok(Some(r))) if r.ttl() > 0
                    ),
                    Err(_) => false,
                },
                None => false,
            };
        }
        let now = agent.generation();
        if healthy && now == gen {
            continue;
        }
        if !healthy {
            // The lease expired (etcd was away longer than the ttl) or the stream broke: a new
            // lease, and the metadata put again under it.
            tracing::warn!(%key, "etcd lease lost; publishing again");
            metrics::counter!("nixl_etcd_republish_total").increment(1);
            match timed(&cfg, "lease grant", c.lease_grant(cfg.ttl_s as i64, None)).await {
                Ok(l) => {
                    lease = l.id();
                    keeper = c.lease_keep_alive(lease).await.ok();
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "etcd lease grant failed; will retry");
                    continue;
                }
            }
        }
        let opts = PutOptions::new().with_lease(lease);
        match timed(
            &cfg,
            "put",
            c.put(key.clone(), agent.metadata_bytes(), Some(opts)),
        )
        .await
        {
            Ok(_) => gen = now,
            Err(e) => tracing::warn!(%key, error = %e, "etcd put failed; will retry"),
        }
    }
}

/// Follows the agents under the prefix for as long as it lives.
#[derive(Debug)]
pub struct Watcher {
    _rt: Arc<Runtime>,
    stop: Option<oneshot::Sender<bool>>,
    task: Option<std::sync::mpsc::Receiver<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        stop_task(&mut self.stop, &mut self.task, true);
    }
}

fn apply_put(agent: &Agent, key: &str, value: &[u8]) {
    match agent.load_remote(value) {
        Ok(name) => {
            metrics::counter!("nixl_etcd_loads_total").increment(1);
            tracing::debug!(agent = %agent.name(), peer = %name, "loaded from etcd");
        }
        Err(e) if e.class() == ErrorClass::Invalid && key.ends_with(agent.name()) => {}
        Err(e) => {
            metrics::counter!("nixl_etcd_bad_values_total").increment(1);
            tracing::warn!(agent = %agent.name(), %key, error = %e, "skipping etcd value");
        }
    }
}

/// Loads everything under the prefix; returns the revision to watch from.
async fn load_all(c: &mut Client, cfg: &EtcdConfig, agent: &Weak<Agent>) -> Result<i64> {
    let r = timed(
        cfg,
        "list",
        c.get(cfg.prefix.clone(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let rev = r.header().map_or(0, |h| h.revision());
    if let Some(agent) = agent.upgrade() {
        let listed: Vec<String> = r
            .kvs()
            .iter()
            .filter_map(|kv| name_of(&cfg.prefix, kv.key()))
            .collect();
        for kv in r.kvs() {
            if name_of(&cfg.prefix, kv.key()).as_deref() == Some(agent.name()) {
                continue;
            }
            apply_put(&agent, &String::from_utf8_lossy(kv.key()), kv.value());
        }
        // Peers that vanished while nobody watched.
        for p in agent.peers() {
            if !listed.contains(&p) {
                let _ = agent.invalidate_remote(&p);
            }
        }
    }
    Ok(rev)
}

async fn follow(
    mut c: Client,
    cfg: EtcdConfig,
    agent: Weak<Agent>,
    mut rev: i64,
    mut stop: oneshot::Receiver<bool>,
) {
    loop {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        let mut stream = match timed(&cfg, "watch", c.watch(cfg.prefix.clone(), Some(opts))).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "etcd watch failed; retrying");
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                _ = &mut stop => return,
                m = stream.message() => m,
            };
            let Some(agent) = agent.upgrade() else {
                return;
            };
            match msg {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        break;
                    }
                    if let Some(h) = resp.header() {
                        rev = rev.max(h.revision());
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let Some(name) = name_of(&cfg.prefix, kv.key()) else {
                            continue;
                        };
                        if name == agent.name() {
                            continue;
                        }
                        rev = rev.max(kv.mod_revision());
                        match ev.event_type() {
                            EventType::Put => {
                                apply_put(&agent, &String::from_utf8_lossy(kv.key()), kv.value())
                            }
                            EventType::Delete => {
                                if agent.invalidate_remote(&name).is_ok() {
                                    metrics::counter!("nixl_etcd_invalidations_total").increment(1);
                                    tracing::info!(agent = %agent.name(), peer = %name,
                                        "peer left etcd; invalidated");
                                }
                            }
                        }
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        // The stream ended: catch up with a full listing, then watch again.
        tracing::warn!("etcd watch stream ended; resynchronising");
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        match load_all(&mut c, &cfg, &agent).await {
            Ok(r) => rev = r,
            Err(e) => tracing::warn!(error = %e, "etcd resync failed; retrying"),
        }
    }
}
