//! `nixl-agent serve`: the per-node daemon (see the [crate docs](crate)).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use nixl_core::{Agent, BackendName};
use nixl_discovery::{Publication, Registry, Watcher};
use nixl_transports::tcp::TcpControl;
use parking_lot::Mutex;

use crate::canary::PeerTable;
use crate::config::ServeConfig;
use crate::jobs::Jobs;
use crate::pool::Pool;

/// Why the daemon stopped (or never started). `nixl-agent serve` exits 2 for
/// [`ServeError::Config`] and 1 for the rest.
#[derive(Debug)]
pub enum ServeError {
    /// The configuration cannot be used.
    Config(String),
    /// Starting failed (a port in use, an unwritable socket path, no memory for the pool).
    Start(String),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Config(m) | ServeError::Start(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ServeError {}

/// Where the daemon stands with etcd.
#[derive(Clone, Debug)]
pub(crate) enum EtcdState {
    /// No `[etcd]` section.
    Off,
    /// Not published yet, with the reason.
    Waiting(String),
    /// Published under this key.
    Published(String),
    /// Unpublished by a drain.
    Withdrawn,
}

/// What the daemon's tasks share.
pub(crate) struct Daemon {
    pub(crate) agent: Arc<Agent>,
    pub(crate) cfg: ServeConfig,
    pub(crate) prom: PrometheusHandle,
    pub(crate) draining: AtomicBool,
    pub(crate) etcd: Mutex<EtcdState>,
    pub(crate) discovery: Mutex<Option<(Registry, Publication, Watcher)>>,
    pub(crate) peers: PeerTable,
    pub(crate) pool: Option<Pool>,
    pub(crate) jobs: Jobs,
    pub(crate) tcp: Option<Arc<TcpControl>>,
    pub(crate) started: Instant,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("agent", &self.agent.name())
            .finish_non_exhaustive()
    }
}

impl Daemon {
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// `None` when ready, else why not.
    pub(crate) fn not_ready(&self) -> Option<String> {
        if self.draining() {
            return Some("draining".into());
        }
        if let Some(b) = self
            .agent
            .backends()
            .iter()
            .find(|b| b.name == BackendName::Tcp)
        {
            if let Some(why) = &b.unavailable {
                return Some(format!("tcp listener not up: {why}"));
            }
        }
        match &*self.etcd.lock() {
            EtcdState::Off | EtcdState::Published(_) => None,
            EtcdState::Waiting(why) => Some(format!("not published in etcd: {why}")),
            EtcdState::Withdrawn => Some("unpublished from etcd".into()),
        }
    }
}

/// Loads the configuration (`None`: the embedded defaults).
pub fn load_config(path: Option<&Path>) -> Result<ServeConfig, ServeError> {
    match path {
        Some(p) => ServeConfig::from_file(p),
        None => ServeConfig::defaults(),
    }
    .map_err(|e| ServeError::Config(e.to_string()))
}

/// Histogram buckets of the exported histograms, in seconds: 10 µs to 60 s.
const BUCKETS: &[f64] = &[
    1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0,
];

/// Runs the daemon until SIGTERM or SIGINT, then drains; `Ok` after a clean drain.
pub fn run(cfg: ServeConfig) -> Result<(), ServeError> {
    let start = |m: String| ServeError::Start(m);
    let prom = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| start(format!("metrics: {e}")))?
        .install_recorder()
        .map_err(|e| start(format!("metrics recorder: {e}")))?;
    metrics::gauge!("nixl_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);

    let d = &cfg.daemon;
    // Bind what can fail for a reason outside this process first, before anything is started.
    let http = std::net::TcpListener::bind(d.http_listen)
        .map_err(|e| start(format!("[daemon] http_listen {}: {e}", d.http_listen)))?;
    http.set_nonblocking(true)
        .map_err(|e| start(format!("http listener: {e}")))?;
    let control = crate::api::bind(&d.control_socket, d.socket_mode).map_err(start)?;
    // The pool socket lends memory: the daemon's own user only, whatever `socket_mode` says.
    let pool_socket = crate::config::pool_socket_for(&d.control_socket);
    let pool_listener = match d.pool_size {
        0 => None,
        _ => Some(crate::api::bind(&pool_socket, 0o600).map_err(start)?),
    };

    let built = cfg
        .agent
        .backends_and_control()
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let (backends, tcp) = (built.backends, built.tcp_control);
    let agent = Arc::new(
        cfg.agent
            .agent_builder(d.name.clone())
            .backends(backends)
            .build()
            .map_err(|e| start(format!("agent '{}': {e}", d.name)))?,
    );
    for b in agent.backends() {
        match &b.unavailable {
            None => tracing::info!(backend = %b.name, "backend running"),
            Some(why) => tracing::info!(backend = %b.name, reason = %why, "backend unavailable"),
        }
    }
    let pool = match d.pool_size {
        0 => None,
        n => {
            let p = Pool::new(&agent, n).map_err(|e| start(format!("[daemon] pool_size: {e}")))?;
            tracing::info!(
                bytes = p.len(),
                huge_pages = p.huge_pages(),
                "host memory pool registered"
            );
            Some(p)
        }
    };
    let etcd = match &cfg.etcd {
        None => EtcdState::Off,
        Some(_) => EtcdState::Waiting("connecting".into()),
    };
    let daemon = Arc::new(Daemon {
        agent,
        prom,
        draining: AtomicBool::new(false),
        etcd: Mutex::new(etcd),
        discovery: Mutex::new(None),
        peers: PeerTable::default(),
        pool,
        jobs: Jobs::default(),
        tcp,
        started: Instant::now(),
        cfg,
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .thread_name("nixl-daemon")
        .enable_all()
        .build()
        .map_err(|e| start(format!("runtime: {e}")))?;
    let result = rt.block_on(async {
        let http = tokio::net::TcpListener::from_std(http)
            .map_err(|e| start(format!("http listener: {e}")))?;
        let control = tokio::net::UnixListener::from_std(control)
            .map_err(|e| start(format!("control socket: {e}")))?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| start(format!("SIGTERM handler: {e}")))?;
        tokio::spawn(crate::http::serve(Arc::clone(&daemon), http));
        tokio::spawn(crate::api::serve(Arc::clone(&daemon), control));
        tokio::spawn(crate::canary::run(Arc::clone(&daemon)));
        if let Some(l) = pool_listener {
            let d = Arc::clone(&daemon);
            std::thread::Builder::new()
                .name("nixl-pool-sock".into())
                .spawn(move || crate::poolsock::serve(d, l))
                .map_err(|e| start(format!("pool socket thread: {e}")))?;
        }
        if daemon.cfg.etcd.is_some() {
            let d = Arc::clone(&daemon);
            std::thread::Builder::new()
                .name("nixl-etcd-join".into())
                .spawn(move || join_etcd(&d))
                .map_err(|e| start(format!("etcd thread: {e}")))?;
        }
        tracing::info!(agent = %daemon.agent.name(), http = %daemon.cfg.daemon.http_listen,
            control = %daemon.cfg.daemon.control_socket.display(), "serving");
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        };
        drain(&daemon, why).await;
        Ok(())
    });
    let _ = std::fs::remove_file(&daemon.cfg.daemon.control_socket);
    if daemon.pool.is_some() {
        let _ = std::fs::remove_file(&pool_socket);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Connects to etcd (retrying with backoff while it is down), publishes the agent and watches
/// its peers. Returns once published, or when a drain starts first.
fn join_etcd(d: &Daemon) {
    let Some(cfg) = d.cfg.etcd.clone() else {
        return;
    };
    let mut pause = Duration::from_millis(250);
    let mut logged = false;
    loop {
        if d.draining() {
            return;
        }
        let attempt = Registry::connect(&cfg).and_then(|r| {
            let p = r.publish(&d.agent)?;
            let w = r.watch(&d.agent)?;
            Ok((r, p, w))
        });
        match attempt {
            Ok((r, p, w)) => {
                let key = p.key().to_owned();
                let mut slot = d.discovery.lock();
                if d.draining() {
                    // Drain started meanwhile: unpublish at once (outside the lock).
                    drop(slot);
                    drop((w, p, r));
                    return;
                }
                *slot = Some((r, p, w));
                drop(slot);
                tracing::info!(%key, "published in etcd; watching peers");
                *d.etcd.lock() = EtcdState::Published(key);
                return;
            }
            Err(e) => {
                let why = e.to_string();
                if !logged {
                    tracing::warn!(error = %why, "etcd not reachable; serving locally and retrying");
                    logged = true;
                } else {
                    tracing::debug!(error = %why, "etcd still not reachable");
                }
                *d.etcd.lock() = EtcdState::Waiting(why);
            }
        }
        let until = Instant::now() + pause;
        while Instant::now() < until && !d.draining() {
            std::thread::sleep(Duration::from_millis(50));
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// The drain: not ready, unpublished, control requests refused, transfers finished or
/// cancelled within `drain_timeout`, agent shut down.
async fn drain(d: &Arc<Daemon>, why: &str) {
    let t0 = Instant::now();
    d.draining.store(true, Ordering::Release);
    tracing::info!(signal = why, timeout = ?d.cfg.daemon.drain_timeout, "draining");
    // Revoke the lease at once, beside waiting for transfers.
    let dd = Arc::clone(d);
    let unpublish = tokio::task::spawn_blocking(move || {
        let taken = dd.discovery.lock().take();
        if let Some((r, p, w)) = taken {
            drop(p);
            *dd.etcd.lock() = EtcdState::Withdrawn;
            tracing::info!("unpublished from etcd");
            drop(w);
            drop(r);
        }
    });
    let deadline = tokio::time::Instant::now() + d.cfg.daemon.drain_timeout;
    if !d.jobs.wait_idle(deadline).await {
        let n = d.jobs.cancel_all();
        tracing::warn!(
            cancelled = n,
            "drain timeout: cancelling transfers still in flight"
        );
        // A cancelled post ends at once; give the backends a moment to let go of the memory.
        let _ = d
            .jobs
            .wait_idle(tokio::time::Instant::now() + Duration::from_secs(2))
            .await;
    }
    let _ = unpublish.await;
    let a = Arc::clone(&d.agent);
    let _ = tokio::task::spawn_blocking(move || a.shutdown()).await;
    tracing::info!(took = ?t0.elapsed(), "drained");
}
