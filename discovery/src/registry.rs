//! [`Registry`]: a connection to etcd, which publishes agents and watches the prefix.

use super::*;

pub(crate) struct Shared {
    pub(crate) conn: Conn,
    // Last: the clients above go before the runtime they run on.
    pub(crate) rt: Rt,
}

/// A connection to etcd. Cheap to clone; the runtime stops when the last clone, publication
/// and watcher are gone.
#[derive(Clone)]
pub struct Registry {
    pub(crate) shared: Arc<Shared>,
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

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}
