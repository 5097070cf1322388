//! [`Watcher`]: follows the prefix and loads (and forgets) the peers it finds.

use super::*;

/// Follows the agents under the prefix; see [`Registry::watch`]. Dropping it stops following
/// (peers already loaded stay loaded).
#[derive(Debug)]
pub struct Watcher {
    pub(crate) timeout: Duration,
    pub(crate) stop: Option<oneshot::Sender<()>>,
    /// Hears when the task has ended. (In a mutex only to make this `Sync`.)
    pub(crate) done: Option<std::sync::Mutex<mpsc::Receiver<()>>>,
    pub(crate) _shared: Arc<Shared>,
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
pub(crate) struct Follower {
    pub(crate) conn: Conn,
    pub(crate) agent: Weak<Agent>,
    pub(crate) own: String,
    /// Peers whose keys hold their metadata, as far as this watcher knows: the ones it may
    /// invalidate.
    pub(crate) known: HashSet<String>,
    /// Last revision seen.
    pub(crate) rev: i64,
    pub(crate) failing: bool,
}

impl Follower {
    /// Handles a value under the prefix; returns the peer's name when the value is valid
    /// metadata of the agent its key names (loaded now, or older than what is loaded).
    pub(crate) fn put(&self, agent: &Agent, key: &[u8], value: &[u8]) -> Option<String> {
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
    pub(crate) fn gone(&mut self, agent: &Agent, name: &str) {
        if self.known.remove(name) {
            self.invalidate(agent, name);
        }
    }

    pub(crate) fn invalidate(&self, agent: &Agent, name: &str) {
        if agent.invalidate_remote(name).is_ok() {
            metrics::counter!("nixl_etcd_invalidations_total").increment(1);
            tracing::info!(agent = %self.own, peer = %name, "peer left etcd; invalidated");
        }
    }

    /// Lists the prefix and loads it; peers this watcher loaded that are no longer there are
    /// invalidated.
    pub(crate) async fn resync(&mut self) -> Result<()> {
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
    pub(crate) async fn pause(stop: &mut oneshot::Receiver<()>, d: Duration) -> bool {
        tokio::select! {
            _ = stop => true,
            _ = tokio::time::sleep(d) => false,
        }
    }

    pub(crate) async fn run(mut self, mut stop: oneshot::Receiver<()>) {
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
