//! The runtime the etcd clients run on, the connection to etcd, and the logging of trouble
//! with it.

use super::*;

/// The tokio runtime of a [`Registry`]; shut down without waiting, so that dropping it is
/// allowed anywhere (also inside another runtime).
pub(crate) struct Rt(pub(crate) Option<Runtime>);

impl Rt {
    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("runtime is present until drop")
            .handle()
    }

    /// Runs `f` on the runtime and waits for it on this thread. Every future given here is
    /// bounded by request deadlines.
    pub(crate) fn run<T: Send + 'static>(
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
    pub(crate) fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) -> mpsc::Receiver<()> {
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
pub(crate) struct Conn {
    pub(crate) kv: KvClient,
    pub(crate) lease: LeaseClient,
    pub(crate) watch: WatchClient,
    pub(crate) cfg: Arc<EtcdConfig>,
}

impl Conn {
    /// Bounds a request by the configured timeout.
    pub(crate) async fn timed<T>(
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

    pub(crate) async fn get_one(&self, key: String) -> Result<Option<Vec<u8>>> {
        let mut kv = self.kv.clone();
        let mut r = self.timed("get", &key, kv.get(key.clone(), None)).await?;
        Ok(r.take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.value().to_vec()))
    }

    /// Everything under the prefix at one revision, a page at a time; returns the revision.
    pub(crate) async fn list_all(&self, keys_only: bool) -> Result<(i64, Vec<KeyValue>)> {
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
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
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
pub(crate) fn trouble(failing: &mut bool, op: &'static str, what: &str, e: &DiscoveryError) {
    metrics::counter!("nixl_etcd_errors_total", "op" => op).increment(1);
    if *failing {
        tracing::debug!(%what, error = %e, "etcd {op} failed again; retrying");
    } else {
        tracing::warn!(%what, error = %e, "etcd {op} failed; retrying");
        *failing = true;
    }
}

pub(crate) fn recovered(failing: &mut bool, what: &str) {
    if std::mem::take(failing) {
        tracing::info!(%what, "etcd reachable again");
    }
}
