//! The `object` backend: DRAM ↔ OBJECT in S3-compatible object stores.
//!
//! As with files, an OBJECT registration belongs to the agent itself, and transfers name the
//! agent as the remote: READ moves object → memory, WRITE memory → object (as in NIXL). A
//! registration is the descriptor `(0, size, id)`: `id` (the `dev_id`) is the object's id and
//! `size` its size. Registering does not touch the store (the object need not exist: a WRITE
//! creates it).
//!
//! **Which object an id is.** By default object `id` is the key `{key_prefix}{id}` in the
//! configured bucket (`[object] bucket`, `key_prefix`). Any id can be named explicitly instead,
//! as `"bucket/key"`: in the configuration (`[object.names]`, `"7" = "weights/layer-7.bin"`),
//! with [`ObjectBackend::name_object`] on a backend built by hand, or, for a backend that an
//! agent was built with from a [`crate::config::Config`] (Rust or C callers alike), with
//! [`name_object`]`(&agent, id, "bucket/key")`: each started backend is recorded in a
//! process-wide table under its agent's instance id, and removed at shutdown. Names are
//! resolved when a request is created; an id without a name (no bucket configured, no explicit
//! name) is refused at registration.
//!
//! **Shapes.** READ may be any range inside the registered size: descriptors become ranged
//! GETs (consecutive ranges of one object are merged into one GET that scatters into memory,
//! long ones split at `part_size`) run `max_concurrency` at a time. S3 cannot write part of an
//! object, so a WRITE descriptor must cover the whole registered object (offset 0, the
//! registered size), and an object is written by one descriptor of a request; other WRITE
//! shapes are refused when the request is created, with the reason. A WRITE up to
//! `multipart_threshold` bytes is one PUT; a larger one is a multipart upload of `part_size`
//! parts sent in parallel. Bodies are copied out of the registered memory 256 KiB at a time as
//! the connection takes them, and only while their request lives: a connection blocked on a
//! server that stopped reading cannot keep the memory (nor deregistration) waiting.
//!
//! **Terminal states.** Posting hands the work to the backend's tokio runtime and returns; the
//! completion is called from there. Every HTTP request is bounded by `request_timeout_ms`, so a
//! dead or silent server ends the request Failed with the cause; the first failure stops the
//! others (in-flight requests are dropped). A GET that returns fewer or more bytes than asked
//! fails; a failed multipart upload is aborted, and nothing is reported Done unless every byte
//! was read, or the object written whole. Cancel and deadlines stop further ranges and parts.
//! The local regions stay held until no range or part in flight can touch them.
//!
//! **Configuration** (`[object]`, see [`crate::config`]): `endpoint`, `region`,
//! `access_key_id`, `secret_access_key`, `session_token`, or the standard environment
//! variables `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_REGION` / `AWS_DEFAULT_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` (the configuration wins).
//! Without credentials requests are sent unsigned. Without an endpoint, requests go to AWS S3
//! itself, `https://s3.{region}.amazonaws.com`. Secrets are never logged nor shown by `Debug`.
//! `ca_file` and `virtual_host` are below. The backend is available when something is
//! configured (a bucket, an endpoint, a name, or the AWS environment); otherwise it reports
//! `no object store configured ([object] endpoint/bucket or AWS_* environment)` and costs
//! nothing.
//!
//! **HTTPS.** `http://` and `https://` endpoints are both served (rustls with the ring
//! provider, TLS 1.2 and 1.3, HTTP/1.1). The server's certificate is verified against the
//! system's trust roots (as OpenSSL finds them; `SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured)
//! plus the certificates of a PEM bundle when one is given: `[object] ca_file`, or the standard
//! `AWS_CA_BUNDLE` (the configuration wins). Verification cannot be turned off. A `ca_file`
//! that cannot be read or holds no certificate is a configuration error naming the file (from
//! [`crate::config::Config`]; a backend built by hand is unavailable with that reason); an
//! `https://` endpoint with no trust root at all is unavailable with the reason. A TLS failure
//! (unknown issuer, a certificate for another name, a server that never finishes the handshake)
//! fails the request with rustls' own words (`invalid peer certificate: UnknownIssuer`) within
//! `request_timeout_ms`.
//!
//! **Addressing.** Requests are path-style by default (`{endpoint}/{bucket}/{key}`): every
//! S3-compatible server serves it, it needs no DNS name per bucket and works with IP
//! endpoints, one certificate for the endpoint's host covers every bucket, and AWS still serves
//! it. `[object] virtual_host = true` puts the bucket in the host name instead
//! (`{bucket}.{endpoint host}/{key}`, the Host header signed with it) for stores that require
//! that; it needs a host name endpoint (not an IP address) and DNS-compatible bucket names
//! (checked at registration and when a request is created).
//!
//! **Files.** `config.rs` the settings and object names; this file the backend, its settings
//! resolved against the environment and the registry of started backends; `conn.rs` the
//! connection and how a request is cut into ranges; `post.rs` a post in progress and its reads;
//! `upload.rs` writes (single PUT or multipart upload); `s3.rs` the signed HTTP client;
//! `admin.rs` listing and deleting; `tests.rs` the unit tests.

mod admin;
mod config;
mod conn;
mod post;
pub(crate) mod s3;
#[cfg(test)]
mod tests;
mod upload;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use nixl_core::region::{enter_all, leave_all, Ticket};
use nixl_core::{
    Agent, Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind,
    PeerInfo, PreparedXfer, Region, Registered, Result, TargetHandle, Unusable, XferOp, XferPlan,
};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::files::OwnAgent;
use crate::local::owner_check;

pub use admin::ListedObject;
pub use config::{ObjectConfig, ObjectName};
use conn::*;
use post::*;
pub use s3::Secret;
use s3::{Creds, Endpoint, MemSource, ReqBody, S3Req, Scheme, S3};
use upload::*;

/// What the configuration and environment resolve to.
#[derive(Debug)]
struct Settings {
    endpoint: Endpoint,
    region: String,
    creds: Option<Creds>,
    tls: Arc<rustls::ClientConfig>,
}

/// The `object` backend.
pub struct ObjectBackend {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ObjectConfig,
    settings: std::result::Result<Arc<Settings>, String>,
    names: RwLock<HashMap<u64, ObjectName>>,
    running: Mutex<Option<Running>>,
    /// The agent served (objects are reached by their own agent only).
    own: OwnAgent,
    /// Set (true) at shutdown: requests stop at once, as Cancelled.
    stop: watch::Sender<bool>,
}

struct Running {
    rt: tokio::runtime::Runtime,
    s3: Arc<S3>,
    target: TargetHandle,
}

impl fmt::Debug for ObjectBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectBackend")
            .field("cfg", &self.inner.cfg)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(r) = self.running.get_mut().take() {
            r.rt.shutdown_background();
        }
    }
}

/// Started backends by their agent's instance id, for [`name_object`].
static STARTED: Mutex<Vec<(u128, Weak<Inner>)>> = Mutex::new(Vec::new());

/// Names object `id` `"bucket/key"` in the `object` backend of `agent` (built from a
/// configuration, so the caller holds no handle on the backend). Errors if the agent runs no
/// `object` backend.
pub fn name_object(agent: &Agent, id: u64, name: &str) -> Result<()> {
    started(agent)?.name_object(id, name)
}

/// Lists the objects of `bucket` whose keys start with `prefix` through the `object` backend of
/// `agent` (`ListObjectsV2`, every page), in key order; with a `delimiter` (`"/"`), only those
/// with no delimiter past the prefix (its direct children). More than `limit` objects, or an
/// answer that breaks the rules of a listing (see `admin.rs`), is an error.
pub fn list_objects(
    agent: &Agent,
    bucket: &str,
    prefix: &str,
    delimiter: Option<&str>,
    limit: usize,
) -> Result<Vec<ListedObject>> {
    started(agent)?.list_objects(bucket, prefix, delimiter, limit)
}

/// Deletes the objects `keys` of `bucket` through the `object` backend of `agent`
/// (`max_concurrency` DELETEs at a time; an object already gone is not an error). Returns the
/// number deleted; the first failure is the error (some may have been deleted then).
pub fn delete_objects(agent: &Agent, bucket: &str, keys: &[String]) -> Result<usize> {
    started(agent)?.delete_objects(bucket, keys)
}

/// The started `object` backend of `agent`.
fn started(agent: &Agent) -> Result<Arc<Inner>> {
    let inner = {
        let mut t = STARTED.lock();
        t.retain(|(_, w)| w.strong_count() > 0);
        t.iter()
            .find(|(i, _)| *i == agent.instance_id())
            .and_then(|(_, w)| w.upgrade())
    };
    match inner {
        Some(i) => Ok(i),
        // Not given, or given and unavailable (with the probe's reason as the source).
        None => Err(match agent.check_backend(BackendName::Object) {
            Err(e) => e,
            Ok(()) => Error::Unavailable {
                backend: BackendName::Object,
                reason: format!("agent '{}' runs no object backend", agent.name()).into(),
            },
        }),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

const UNCONFIGURED: &str =
    "no object store configured ([object] endpoint/bucket or AWS_* environment)";

fn resolve(cfg: &ObjectConfig) -> std::result::Result<Settings, String> {
    let e = |n: &str| if cfg.use_env { env(n) } else { None };
    let env_endpoint = e("AWS_ENDPOINT_URL_S3").or_else(|| e("AWS_ENDPOINT_URL"));
    let env_key = e("AWS_ACCESS_KEY_ID");
    let configured = cfg.bucket.is_some()
        || cfg.endpoint.is_some()
        || !cfg.names.is_empty()
        || env_endpoint.is_some()
        || env_key.is_some();
    if !configured {
        return Err(UNCONFIGURED.into());
    }
    if cfg.part_size == 0 {
        return Err("[object] part_size is 0".into());
    }
    if cfg.max_concurrency == 0 {
        return Err("[object] max_concurrency is 0".into());
    }
    if cfg.threads == 0 {
        return Err("[object] threads is 0".into());
    }
    if cfg.request_timeout.is_zero() {
        return Err("[object] request_timeout_ms is 0".into());
    }
    let region = cfg
        .region
        .clone()
        .or_else(|| e("AWS_REGION"))
        .or_else(|| e("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".into());
    let endpoint = cfg
        .endpoint
        .clone()
        .or(env_endpoint)
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let endpoint = Endpoint::parse(&endpoint)?;
    if cfg.virtual_host && endpoint.host_is_ip() {
        return Err(format!(
            "[object] virtual_host = true needs a host name endpoint; {} is an IP address \
             (use path-style addressing)",
            endpoint.host()
        ));
    }
    if cfg.virtual_host {
        if let Some(b) = &cfg.bucket {
            if let Some(e) = s3::virtual_host_bucket_error(b) {
                return Err(format!("[object] {e}"));
            }
        }
    }
    let ca_file = match &cfg.ca_file {
        Some(p) => Some(("[object] ca_file", p.clone())),
        None => e("AWS_CA_BUNDLE").map(|p| ("AWS_CA_BUNDLE", std::path::PathBuf::from(p))),
    };
    let tls = s3::tls_config(
        ca_file.as_ref().map(|(l, p)| (*l, p.as_path())),
        endpoint.scheme == Scheme::Https,
    )?;
    let (key, secret) = match (&cfg.access_key_id, &cfg.secret_access_key) {
        (Some(k), Some(s)) => (Some(k.clone()), Some(s.clone())),
        (Some(_), None) => return Err("[object] access_key_id without secret_access_key".into()),
        (None, Some(_)) => return Err("[object] secret_access_key without access_key_id".into()),
        (None, None) => (env_key, e("AWS_SECRET_ACCESS_KEY").map(Secret::new)),
    };
    let creds = match (key, secret) {
        (Some(access_key_id), Some(secret)) => Some(Creds {
            access_key_id,
            secret,
            session_token: cfg
                .session_token
                .clone()
                .or_else(|| e("AWS_SESSION_TOKEN").map(Secret::new)),
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err("AWS_ACCESS_KEY_ID is set without AWS_SECRET_ACCESS_KEY".into())
        }
        (None, Some(_)) => {
            return Err("AWS_SECRET_ACCESS_KEY is set without AWS_ACCESS_KEY_ID".into())
        }
    };
    Ok(Settings {
        endpoint,
        region,
        creds,
        tls,
    })
}

impl ObjectBackend {
    /// A backend with these settings (the runtime starts with the agent; nothing starts when
    /// the backend is unavailable).
    pub fn new(cfg: ObjectConfig) -> ObjectBackend {
        let settings = resolve(&cfg).map(Arc::new);
        let mut names = HashMap::new();
        let mut bad = None;
        for (id, n) in &cfg.names {
            match ObjectName::parse(n) {
                Ok(n) => {
                    names.insert(*id, n);
                }
                Err(e) => bad = Some(e.to_string()),
            }
        }
        let settings = match bad {
            Some(e) => Err(format!("[object.names] {e}")),
            None => settings,
        };
        ObjectBackend {
            inner: Arc::new(Inner {
                cfg,
                settings,
                names: RwLock::new(names),
                running: Mutex::new(None),
                own: OwnAgent::default(),
                stop: watch::Sender::new(false),
            }),
        }
    }

    /// Names object `id` `"bucket/key"` (replacing its default or earlier name). Takes effect
    /// for requests created from now on.
    pub fn name_object(&self, id: u64, name: &str) -> Result<()> {
        self.inner.name_object(id, name)
    }

    /// The bucket and key object `id` stands for, if it has any.
    pub fn object_name(&self, id: u64) -> Option<ObjectName> {
        self.inner.object_name(id)
    }
}

impl Inner {
    /// Runs `f` (given the client) on the backend's runtime and waits for it, from any thread.
    fn block<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<S3>) -> Fut,
        Fut: Future<Output = std::result::Result<T, String>> + Send + 'static,
    {
        let (rt, s3) = {
            let r = self.running.lock();
            let r = r
                .as_ref()
                .ok_or_else(|| Error::Shutdown("object backend not running".into()))?;
            (r.rt.handle().clone(), Arc::clone(&r.s3))
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = f(s3);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        match rx.recv() {
            Ok(r) => r.map_err(|e| backend_err(op, e)),
            Err(_) => Err(Error::Shutdown(
                "the object backend stopped during the request".into(),
            )),
        }
    }

    fn list_objects(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ListedObject>> {
        let (b, p, d, t) = (
            bucket.to_owned(),
            prefix.to_owned(),
            delimiter.map(str::to_owned),
            self.cfg.request_timeout,
        );
        self.block("list", move |s3| async move {
            admin::list_all(&s3, &b, &p, d.as_deref(), limit, t).await
        })
    }

    fn delete_objects(&self, bucket: &str, keys: &[String]) -> Result<usize> {
        let (b, k, c, t) = (
            bucket.to_owned(),
            keys.to_vec(),
            self.cfg.max_concurrency,
            self.cfg.request_timeout,
        );
        self.block("delete", move |s3| async move {
            admin::delete_all(&s3, &b, &k, c, t).await
        })
    }

    fn name_object(&self, id: u64, name: &str) -> Result<()> {
        let n = ObjectName::parse(name)?;
        self.names.write().insert(id, n);
        Ok(())
    }

    fn object_name(&self, id: u64) -> Option<ObjectName> {
        if let Some(n) = self.names.read().get(&id) {
            return Some(n.clone());
        }
        self.cfg.bucket.as_ref().map(|b| ObjectName {
            bucket: b.clone(),
            key: format!("{}{id}", self.cfg.key_prefix),
        })
    }

    fn name_or_err(&self, id: u64) -> Result<ObjectName> {
        let name = self.object_name(id).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "object {id} has no name: set [object] bucket (object id N is key \
                 {{key_prefix}}N there), or name it with [object.names] or \
                 nixl_transports::object::name_object"
            ))
        })?;
        if self.cfg.virtual_host {
            if let Some(e) = s3::virtual_host_bucket_error(&name.bucket) {
                return Err(Error::InvalidArgument(format!("object {id} ({name}): {e}")));
            }
        }
        Ok(name)
    }
}

const KINDS: &[MemKind] = &[MemKind::Dram, MemKind::Object];
const OBJECT: &[MemKind] = &[MemKind::Object];

fn backend_err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BackendName::Object,
        op,
        reason: reason.into(),
    }
}

impl Backend for ObjectBackend {
    fn name(&self) -> BackendName {
        BackendName::Object
    }

    fn caps(&self) -> Caps {
        Caps::new(KINDS, Locality::SameProcess, 7)
            .remote(OBJECT)
            .without_notifications()
    }

    fn probe(&self) -> std::result::Result<(), Unusable> {
        self.inner
            .settings
            .as_ref()
            .map(|_| ())
            .map_err(|r| Unusable::Reason(r.clone()))
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        let settings = self
            .inner
            .settings
            .as_ref()
            .map_err(|r| Error::Unavailable {
                backend: BackendName::Object,
                reason: r.clone().into(),
            })?;
        let cfg = &self.inner.cfg;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads)
            .thread_name("nixl-object")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the object backend's runtime", e))?;
        let s3 = Arc::new(S3::new(
            settings.endpoint.clone(),
            cfg.virtual_host,
            settings.region.clone(),
            settings.creds.clone(),
            &settings.tls,
            cfg.connect_timeout,
            cfg.max_concurrency * 2,
        ));
        tracing::debug!(agent = target.name(), scheme = settings.endpoint.scheme.as_str(),
            endpoint = %settings.endpoint.authority, virtual_host = cfg.virtual_host,
            region = %settings.region, bucket = ?cfg.bucket, signed = settings.creds.is_some(),
            "object backend started");
        let id = target.instance_id();
        self.inner.own.set(target.clone());
        *self.inner.running.lock() = Some(Running { rt, s3, target });
        let mut t = STARTED.lock();
        t.retain(|(_, w)| w.strong_count() > 0);
        t.push((id, Arc::downgrade(&self.inner)));
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        self.inner.own.conn_info()
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        if kind == MemKind::Object {
            if desc.addr != 0 {
                return Err(Error::InvalidArgument(format!(
                    "OBJECT registration {desc:?}: an object is registered as (0, size, object \
                     id); offset {} is not 0",
                    desc.addr
                )));
            }
            self.inner.name_or_err(desc.dev_id)?;
        }
        Ok(Vec::new())
    }

    fn deregister(&self, _region: Registered<'_>) {}

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), Unusable> {
        self.inner.own.can_reach(conn_info, "objects")
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let target = self.inner.own.connect(BackendName::Object, peer)?;
        let r = self.inner.running.lock();
        let r = r
            .as_ref()
            .ok_or_else(|| Error::Shutdown("object backend not running".into()))?;
        Ok(Arc::new(ObjectConn {
            inner: Arc::clone(&self.inner),
            target,
            rt: r.rt.handle().clone(),
            s3: Arc::clone(&r.s3),
        }))
    }

    fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        self.inner.own.clear();
        let r = self.inner.running.lock().take();
        if let Some(r) = r {
            STARTED
                .lock()
                .retain(|(i, w)| *i != r.target.instance_id() && w.strong_count() > 0);
            // Tasks are dropped as they yield; their posts end Cancelled.
            r.rt.shutdown_background();
        }
    }
}
