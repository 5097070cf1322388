//! An agent's presence in etcd ([`Publication`]) and the task that keeps its lease alive.

use super::*;

/// An agent's presence in etcd; see [`Registry::publish`]. Dropping it revokes the lease, which
/// deletes the key (or, if etcd is out of reach, the key goes when the lease runs out).
#[derive(Debug)]
pub struct Publication {
    pub(crate) key: String,
    pub(crate) timeout: Duration,
    pub(crate) cmds: tmpsc::UnboundedSender<Cmd>,
    /// Hears when the task has ended. (In a mutex only to make this `Sync`.)
    pub(crate) done: Option<std::sync::Mutex<mpsc::Receiver<()>>>,
    pub(crate) _shared: Arc<Shared>,
}

pub(crate) enum Cmd {
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
pub(crate) struct Publisher {
    pub(crate) conn: Conn,
    pub(crate) key: String,
    pub(crate) agent: Weak<Agent>,
    /// Current lease; 0 when there is none (it expired, or granting failed).
    pub(crate) lease: i64,
    /// Keepalive stream of `lease`; `None` when it must be opened again.
    pub(crate) keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// Generation last put under `lease`.
    pub(crate) published: Option<u64>,
    pub(crate) failing: bool,
}

impl Publisher {
    /// The first publication, done before [`Registry::publish`] returns.
    pub(crate) async fn start(&mut self) -> Result<()> {
        self.new_lease().await?;
        self.put(true).await?;
        self.open_keeper().await
    }

    pub(crate) async fn new_lease(&mut self) -> Result<()> {
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
    pub(crate) async fn open_keeper(&mut self) -> Result<()> {
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
    pub(crate) async fn beat(&mut self) -> Result<()> {
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
    pub(crate) fn lost(&mut self) {
        tracing::warn!(key = %self.key, lease = self.lease,
            "etcd lease expired; publishing under a new one");
        self.lease = 0;
        self.keeper = None;
    }

    /// A new lease and the metadata put again under it.
    pub(crate) async fn recreate(&mut self) -> Result<()> {
        self.new_lease().await?;
        metrics::counter!("nixl_etcd_leases_recreated_total").increment(1);
        self.put(true).await?;
        self.open_keeper().await
    }

    /// Puts the agent's metadata if its generation moved (or always, with `force`).
    pub(crate) async fn put(&mut self, force: bool) -> Result<()> {
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
    pub(crate) fn recreate_boxed(
        &mut self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(self.recreate())
    }

    pub(crate) async fn revoke(&mut self) {
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

    pub(crate) async fn run(mut self, mut cmds: tmpsc::UnboundedReceiver<Cmd>) {
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
