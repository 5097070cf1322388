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

pub mod admin;
pub mod s3;

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
    PeerInfo, PreparedXfer, Region, Result, TargetHandle, XferOp, XferPlan,
};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::files::OwnAgent;

pub use admin::ListedObject;
pub use s3::Secret;
use s3::{Creds, Endpoint, MemSource, ReqBody, S3Req, Scheme, S3};

/// Settings of the `object` backend (`[object]` in the agent's configuration). Values left
/// `None` come from the standard AWS environment variables.
#[derive(Clone)]
pub struct ObjectConfig {
    /// `http://host[:port]` or `https://host[:port]` of the S3-compatible server (default:
    /// `https://s3.{region}.amazonaws.com`).
    pub endpoint: Option<String>,
    /// PEM bundle of CA certificates trusted for `https://` endpoints, besides the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// Bucket in the host name (`bucket.host/key`) rather than in the path (`host/bucket/key`).
    pub virtual_host: bool,
    /// Signing region (default `us-east-1`).
    pub region: Option<String>,
    /// Bucket of objects named by id.
    pub bucket: Option<String>,
    /// Object `id` is key `{key_prefix}{id}` in `bucket`.
    pub key_prefix: String,
    /// Explicit names: object id → `"bucket/key"`.
    pub names: Vec<(u64, String)>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key (never printed).
    pub secret_access_key: Option<Secret>,
    /// Session token of temporary credentials (never printed).
    pub session_token: Option<Secret>,
    /// Size of multipart parts and of the ranges a long READ is split into.
    pub part_size: usize,
    /// WRITEs larger than this are multipart uploads.
    pub multipart_threshold: usize,
    /// HTTP requests in flight per posted request.
    pub max_concurrency: usize,
    /// Longest one HTTP request (a range, a part) may take, answer included.
    pub request_timeout: Duration,
    /// Longest a connection may take to open.
    pub connect_timeout: Duration,
    /// Threads of the backend's runtime.
    pub threads: usize,
    /// Whether unset values are taken from the `AWS_*` environment variables.
    pub use_env: bool,
}

impl Default for ObjectConfig {
    fn default() -> ObjectConfig {
        ObjectConfig {
            endpoint: None,
            ca_file: None,
            virtual_host: false,
            region: None,
            bucket: None,
            key_prefix: String::new(),
            names: Vec::new(),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            part_size: 8 << 20,
            multipart_threshold: 16 << 20,
            max_concurrency: 16,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            threads: 2,
            use_env: true,
        }
    }
}

impl fmt::Debug for ObjectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectConfig")
            .field("endpoint", &self.endpoint)
            .field("ca_file", &self.ca_file)
            .field("virtual_host", &self.virtual_host)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("key_prefix", &self.key_prefix)
            .field("names", &self.names.len())
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("session_token", &self.session_token)
            .field("part_size", &self.part_size)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("max_concurrency", &self.max_concurrency)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("threads", &self.threads)
            .field("use_env", &self.use_env)
            .finish()
    }
}

/// Bucket and key of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectName {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
}

impl ObjectName {
    /// Parses `"bucket/key"` (the key may hold further slashes).
    pub fn parse(s: &str) -> Result<ObjectName> {
        match s.split_once('/') {
            Some((b, k)) if !b.is_empty() && !k.is_empty() => Ok(ObjectName {
                bucket: b.to_owned(),
                key: k.to_owned(),
            }),
            _ => Err(Error::InvalidArgument(format!(
                "object name {s:?}: expected \"bucket/key\""
            ))),
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.bucket, self.key)
    }
}

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
/// answer that breaks the rules of a listing (see [`admin`]), is an error.
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
    let reason = || {
        agent
            .backends()
            .iter()
            .find(|s| s.name == BackendName::Object)
            .and_then(|s| s.unavailable.clone())
            .unwrap_or_else(|| format!("agent '{}' runs no object backend", agent.name()))
    };
    match inner {
        Some(i) => Ok(i),
        None => Err(Error::Unavailable {
            backend: BackendName::Object,
            reason: reason(),
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

    /// [`list_objects`] on this (started) backend.
    pub fn list_objects(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ListedObject>> {
        self.inner.list_objects(bucket, prefix, delimiter, limit)
    }

    /// [`delete_objects`] on this (started) backend.
    pub fn delete_objects(&self, bucket: &str, keys: &[String]) -> Result<usize> {
        self.inner.delete_objects(bucket, keys)
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
        Caps {
            local_kinds: KINDS,
            remote_kinds: OBJECT,
            notifications: false,
            locality: Locality::SameProcess,
        }
    }

    fn probe(&self) -> std::result::Result<(), String> {
        self.inner
            .settings
            .as_ref()
            .map(|_| ())
            .map_err(Clone::clone)
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        let settings = self
            .inner
            .settings
            .as_ref()
            .map_err(|r| Error::Unavailable {
                backend: BackendName::Object,
                reason: r.clone(),
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

    fn deregister(&self, _region: &Region) {}

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), String> {
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

struct ObjectConn {
    inner: Arc<Inner>,
    target: TargetHandle,
    rt: tokio::runtime::Handle,
    s3: Arc<S3>,
}

impl fmt::Debug for ObjectConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectConn")
            .field("agent", &self.target.name())
            .finish_non_exhaustive()
    }
}

/// One ranged GET: `len` bytes of object `obj` from `offset`, scattered into `pieces`
/// (address, length) of registered DRAM, in object order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RangeOp {
    obj: usize,
    offset: u64,
    len: u64,
    pieces: Vec<(u64, u64)>,
}

/// Most memory pieces one GET scatters into.
const MAX_PIECES: usize = 4096;

/// Cuts READ segments into GETs: consecutive ranges of one object are merged (up to
/// `max_range` bytes and [`MAX_PIECES`] pieces), long ones split. `segments` are (memory,
/// index of the object, offset in the object).
fn plan_ranges(segments: &[(Desc, usize, u64)], max_range: u64) -> Vec<RangeOp> {
    let mut ops: Vec<RangeOp> = Vec::new();
    for &(mem, obj, off) in segments {
        let mut done = 0u64;
        while done < mem.len {
            let (addr, o) = (mem.addr + done, off + done);
            let room = match ops.last() {
                Some(op)
                    if op.obj == obj
                        && op.offset + op.len == o
                        && op.pieces.len() < MAX_PIECES
                        && op.len < max_range =>
                {
                    max_range - op.len
                }
                _ => {
                    ops.push(RangeOp {
                        obj,
                        offset: o,
                        len: 0,
                        pieces: Vec::new(),
                    });
                    max_range
                }
            };
            let take = room.min(mem.len - done);
            let op = ops.last_mut().expect("pushed above");
            match op.pieces.last_mut() {
                Some(last) if last.0 + last.1 == addr => last.1 += take,
                _ => op.pieces.push((addr, take)),
            }
            op.len += take;
            done += take;
        }
    }
    ops
}

/// One object written by a WRITE: `len` bytes from `addr` in registered DRAM.
#[derive(Clone, Debug)]
struct WriteObj {
    name: ObjectName,
    addr: u64,
    len: u64,
    /// Number of multipart parts; 0 for a single PUT.
    parts: u64,
}

#[derive(Debug)]
enum Work {
    Read {
        names: Arc<[ObjectName]>,
        ops: Arc<[RangeOp]>,
    },
    Write(Arc<[WriteObj]>),
}

/// Settings a request runs with.
#[derive(Clone, Debug)]
struct Run {
    s3: Arc<S3>,
    conc: usize,
    timeout: Duration,
    part_size: u64,
}

struct ObjectXfer {
    work: Arc<Work>,
    run: Run,
    remote_regions: Arc<[Arc<Region>]>,
    rt: tokio::runtime::Handle,
    stop: watch::Receiver<bool>,
    current: Mutex<Weak<Post>>,
}

impl fmt::Debug for ObjectXfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectXfer")
            .field("work", &self.work)
            .finish_non_exhaustive()
    }
}

impl Connection for ObjectConn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        if plan.local_kind != MemKind::Dram || plan.remote_kind != MemKind::Object {
            return Err(Error::InvalidArgument(format!(
                "object moves DRAM <-> OBJECT, not {} <-> {}",
                plan.local_kind, plan.remote_kind
            )));
        }
        let mut remote_regions = Vec::with_capacity(plan.remote_regions.len());
        for (i, r) in plan.remote_regions.iter().enumerate() {
            let access = self
                .target
                .check(r.kind, &r.desc, r.key)
                .map_err(|denied| Error::Denied {
                    peer: self.target.name().to_owned(),
                    reason: format!("object region {i} {:?}: {denied}", r.desc),
                })?;
            remote_regions.push(Arc::clone(access.region()));
        }
        let cfg = &self.inner.cfg;
        let work = match plan.op {
            XferOp::Read => {
                let mut ids: Vec<u64> = Vec::new();
                let mut names: Vec<ObjectName> = Vec::new();
                let mut segs = Vec::with_capacity(plan.segments.len());
                for s in &plan.segments {
                    let id = s.remote.dev_id;
                    let obj = match ids.iter().rposition(|&x| x == id) {
                        Some(i) => i,
                        None => {
                            names.push(self.inner.name_or_err(id)?);
                            ids.push(id);
                            ids.len() - 1
                        }
                    };
                    segs.push((s.local, obj, s.remote.addr));
                }
                let ops = plan_ranges(&segs, cfg.part_size as u64);
                Work::Read {
                    names: names.into(),
                    ops: ops.into(),
                }
            }
            XferOp::Write => {
                let mut objs: Vec<WriteObj> = Vec::with_capacity(plan.segments.len());
                let mut seen: Vec<u64> = Vec::with_capacity(plan.segments.len());
                for (i, s) in plan.segments.iter().enumerate() {
                    let id = s.remote.dev_id;
                    let name = self.inner.name_or_err(id)?;
                    let size = plan.remote_regions[s.remote_region as usize].desc.len;
                    if s.remote.addr != 0 || s.remote.len != size {
                        return Err(Error::InvalidDesc {
                            index: i,
                            reason: format!(
                                "WRITE of object {id} ({name}) must cover the whole object \
                                 (offset 0, length {size} as registered): S3 cannot write part \
                                 of an object; this one is offset {} length {}",
                                s.remote.addr, s.remote.len
                            ),
                        });
                    }
                    if seen.contains(&id) {
                        return Err(Error::InvalidDesc {
                            index: i,
                            reason: format!(
                                "object {id} ({name}) is written by two descriptors of one \
                                 WRITE"
                            ),
                        });
                    }
                    seen.push(id);
                    let parts = if s.local.len > cfg.multipart_threshold as u64 {
                        s.local.len.div_ceil(cfg.part_size as u64)
                    } else {
                        0
                    };
                    if parts > 10_000 {
                        return Err(Error::InvalidDesc {
                            index: i,
                            reason: format!(
                                "object {id} ({name}) of {} bytes needs {parts} parts of \
                                 {} bytes; S3 allows 10000 (raise [object] part_size)",
                                s.local.len, cfg.part_size
                            ),
                        });
                    }
                    objs.push(WriteObj {
                        name,
                        addr: s.local.addr,
                        len: s.local.len,
                        parts,
                    });
                }
                Work::Write(objs.into())
            }
        };
        Ok(Box::new(ObjectXfer {
            work: Arc::new(work),
            run: Run {
                s3: Arc::clone(&self.s3),
                conc: cfg.max_concurrency,
                timeout: cfg.request_timeout,
                part_size: cfg.part_size as u64,
            },
            remote_regions: remote_regions.into(),
            rt: self.rt.clone(),
            stop: self.inner.stop.subscribe(),
            current: Mutex::new(Weak::new()),
        }))
    }

    fn send_notif(&self, _from: &str, _msg: &[u8]) -> Result<()> {
        Err(backend_err(
            "notification",
            "object carries no notifications",
        ))
    }

    fn close(&self) {}
}

/// One post in progress, shared by its tasks: holds the completion, so the local regions stay
/// held, and the object regions, until the last task is gone.
struct Post {
    done: Completion,
    ended: AtomicBool,
    failed: Mutex<Option<Error>>,
    stopped: AtomicBool,
    cancel: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
    regions: Arc<[Arc<Region>]>,
    ticket: Option<Ticket>,
}

impl fmt::Debug for Post {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Post")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Drop for Post {
    fn drop(&mut self) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            // The runtime dropped the tasks (shutdown).
            let e = self.failed.get_mut().take().unwrap_or(Error::Cancelled);
            self.done.end_early(Err(e));
        }
        leave_all(&self.regions, |r| &r.gate, self.ticket);
    }
}

impl Post {
    /// Records a failure (the first wins) and stops the other ranges or parts.
    fn fail(&self, e: Error) {
        {
            let mut f = self.failed.lock();
            if f.is_none() {
                *f = Some(e);
            }
        }
        self.stopped.store(true, Ordering::Release);
        self.cancel.send_replace(true);
    }

    /// Whether no further range or part should start.
    fn should_stop(&self) -> bool {
        if *self.stop.borrow() {
            self.fail(Error::Cancelled);
        }
        if self.done.is_abandoned() && !self.stopped.load(Ordering::Acquire) {
            // Cancelled or past its deadline: the state is set already.
            self.fail(Error::Cancelled);
        }
        self.stopped.load(Ordering::Acquire)
    }

    /// Resolves when the post is stopped (failure, cancel, shutdown).
    async fn wait_stopped(&self) {
        let mut a = self.cancel.subscribe();
        let mut b = self.stop.clone();
        // A sender that is gone (never here while the post lives) means: never stopped.
        let gone = tokio::select! {
            r = a.wait_for(|v| *v) => r.is_err(),
            r = b.wait_for(|v| *v) => r.is_err(),
        };
        if gone {
            std::future::pending::<()>().await;
        }
    }

    /// Runs one HTTP exchange under the request timeout, dropped as soon as the post stops.
    async fn guarded<F>(&self, timeout: Duration, what: impl Fn() -> String, f: F) -> Result<()>
    where
        F: Future<Output = Result<()>>,
    {
        tokio::select! {
            r = tokio::time::timeout(timeout, f) => r.unwrap_or_else(|_| Err(backend_err(
                "request",
                format!("{}: no complete answer within {} ms ([object] request_timeout_ms)",
                    what(), timeout.as_millis()),
            ))),
            () = self.wait_stopped() => Err(Error::Cancelled),
        }
    }

    /// Ends the post with the first failure, or Done. The completion (and the regions) stay
    /// held until the last holder of the post is gone.
    fn end(&self) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            let outcome = match self.failed.lock().take() {
                Some(e) => Err(e),
                None if *self.stop.borrow() => Err(Error::Cancelled),
                None => Ok(()),
            };
            self.done.end_early(outcome);
        }
    }

    fn first_error(&self) -> bool {
        self.failed.lock().is_some() || self.stopped.load(Ordering::Acquire)
    }
}

impl PreparedXfer for ObjectXfer {
    fn post(&self, done: Completion) {
        let ticket = match enter_all(&self.remote_regions, |r| &r.gate) {
            Ok(t) => t,
            Err(i) => {
                let peer = done.info().peer.to_string();
                done.complete(Err(Error::Denied {
                    peer,
                    reason: format!(
                        "object region {:?} was deregistered",
                        self.remote_regions[i].desc
                    ),
                }));
                return;
            }
        };
        let post = Arc::new(Post {
            done,
            ended: AtomicBool::new(false),
            failed: Mutex::new(None),
            stopped: AtomicBool::new(false),
            cancel: watch::Sender::new(false),
            stop: self.stop.clone(),
            regions: Arc::clone(&self.remote_regions),
            ticket,
        });
        *self.current.lock() = Arc::downgrade(&post);
        let work = Arc::clone(&self.work);
        let run = self.run.clone();
        // A runtime that is shut down drops the task: the post then ends Cancelled.
        self.rt.spawn(async move {
            match &*work {
                Work::Read { names, ops } => read(&post, &run, names, ops).await,
                Work::Write(objs) => write(&post, &run, objs).await,
            }
            post.end();
        });
    }

    fn cancel(&self) {
        if let Some(p) = self.current.lock().upgrade() {
            p.fail(Error::Cancelled);
        }
    }
}

/// Runs `f(0..n)` with at most `conc` at a time, in order of index, until all are done or the
/// post stops; the first failure stops the rest.
async fn parallel<F, Fut>(post: &Arc<Post>, n: usize, conc: usize, f: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let f = Arc::new(f);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conc.min(n) {
        let (post, next, f) = (Arc::clone(post), Arc::clone(&next), Arc::clone(&f));
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || post.should_stop() {
                    return;
                }
                if let Err(e) = f(i).await {
                    post.fail(e);
                    return;
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok(()) => {}
            // The runtime is shutting down (the backend or its agent stopped): the post ends
            // Cancelled, as every other post cut short by shutdown does.
            Err(e) if e.is_cancelled() => post.fail(Error::Cancelled),
            Err(e) => post.fail(backend_err("task", format!("a transfer task failed: {e}"))),
        }
    }
}

async fn read(post: &Arc<Post>, run: &Run, names: &Arc<[ObjectName]>, ops: &Arc<[RangeOp]>) {
    let (p, r, nm, o) = (
        Arc::clone(post),
        run.clone(),
        Arc::clone(names),
        Arc::clone(ops),
    );
    parallel(post, ops.len(), run.conc, move |i| {
        let (p, r, nm, o) = (Arc::clone(&p), r.clone(), Arc::clone(&nm), Arc::clone(&o));
        async move {
            let op = &o[i];
            let name = &nm[op.obj];
            let what = || format!("GET {name} bytes {}-{}", op.offset, op.offset + op.len - 1);
            p.guarded(r.timeout, what, get_range(&r.s3, name, op)).await
        }
    })
    .await;
}

/// One ranged GET, scattered into registered memory as the body arrives.
async fn get_range(s3: &S3, name: &ObjectName, op: &RangeOp) -> Result<()> {
    let req = S3Req {
        method: Method::GET,
        bucket: &name.bucket,
        key: &name.key,
        query: Vec::new(),
        range: Some((op.offset, op.offset + op.len - 1)),
        body: ReqBody::Empty,
    };
    let what = req.what();
    let resp = s3.send(&req).await.map_err(|e| backend_err("get", e))?;
    let status = resp.status();
    let (parts, mut body) = resp.into_parts();
    let whole = status == StatusCode::OK
        && op.offset == 0
        && parts
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            == Some(op.len);
    if status != StatusCode::PARTIAL_CONTENT && !whole {
        let text = s3::read_limited(body, 64 << 10).await.unwrap_or_default();
        let mut e = s3::status_error(&what, status, &text);
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            e += " (the object is shorter than the range: shorter than its registration?)";
        } else if status.is_success() {
            e += " (the server did not answer with the range asked for)";
        }
        return Err(backend_err("get", e));
    }
    // A partial answer must be the range asked for: other bytes of the object would land, in
    // bounds, where these belong.
    if status == StatusCode::PARTIAL_CONTENT {
        let range = parts
            .headers
            .get("content-range")
            .and_then(|v| v.to_str().ok());
        let want = (op.offset, op.offset + op.len - 1);
        if range.and_then(content_range) != Some(want) {
            return Err(backend_err(
                "get",
                format!(
                    "{what}: the server answered with Content-Range {:?}, not bytes {}-{}",
                    range.unwrap_or("(none)"),
                    want.0,
                    want.1
                ),
            ));
        }
    }
    let mut got = 0u64;
    let (mut piece, mut in_piece) = (0usize, 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            backend_err(
                "get",
                format!(
                    "{what}: body broken after {got} of {} bytes: {}",
                    op.len,
                    s3::error_chain(&e)
                ),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if got + data.len() as u64 > op.len {
            return Err(backend_err(
                "get",
                format!(
                    "{what}: the server sent more than the {} bytes asked for",
                    op.len
                ),
            ));
        }
        let mut src = &data[..];
        while !src.is_empty() {
            let (addr, plen) = op.pieces[piece];
            let n = (plen - in_piece).min(src.len() as u64) as usize;
            // SAFETY: the piece lies in registered DRAM (checked inside its region when the
            // request was created) that the post's completion holds until the post is gone;
            // this future holds the post. `n` stays within the piece and within `src`.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), (addr + in_piece) as *mut u8, n);
            }
            src = &src[n..];
            in_piece += n as u64;
            if in_piece == plen {
                piece += 1;
                in_piece = 0;
            }
        }
        got += data.len() as u64;
    }
    if got != op.len {
        return Err(backend_err(
            "get",
            format!(
                "{what}: short body, {got} of {} bytes (object shorter than its registration?)",
                op.len
            ),
        ));
    }
    Ok(())
}

/// The first and last byte of a `Content-Range: bytes FIRST-LAST/SIZE` header.
fn content_range(v: &str) -> Option<(u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, _size) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

/// The upload id and part ETags of one multipart upload.
#[derive(Debug, Default)]
struct Upload {
    id: Mutex<Option<String>>,
    etags: Mutex<Vec<Option<String>>>,
}

async fn write(post: &Arc<Post>, run: &Run, objs: &Arc<[WriteObj]>) {
    let multi: Arc<[usize]> = (0..objs.len()).filter(|&i| objs[i].parts > 0).collect();
    let uploads: Arc<[Upload]> = objs.iter().map(|_| Upload::default()).collect();

    // 1. Start the multipart uploads.
    {
        let (p, r, o, m, u) = (
            Arc::clone(post),
            run.clone(),
            Arc::clone(objs),
            Arc::clone(&multi),
            Arc::clone(&uploads),
        );
        parallel(post, multi.len(), run.conc, move |i| {
            let (p, r, o, m, u) = (
                Arc::clone(&p),
                r.clone(),
                Arc::clone(&o),
                Arc::clone(&m),
                Arc::clone(&u),
            );
            async move {
                let k = m[i];
                let name = &o[k].name;
                let what = || format!("POST {name}?uploads");
                p.guarded(r.timeout, what, async {
                    let req = S3Req {
                        method: Method::POST,
                        bucket: &name.bucket,
                        key: &name.key,
                        query: vec![("uploads", String::new())],
                        range: None,
                        body: ReqBody::Empty,
                    };
                    let (_, body) = r.s3.call(&req).await.map_err(|e| backend_err("put", e))?;
                    let text = String::from_utf8_lossy(&body);
                    let id = s3::xml_text(&text, "UploadId").ok_or_else(|| {
                        backend_err("put", format!("{}: no UploadId in the answer", req.what()))
                    })?;
                    *u[k].id.lock() = Some(id);
                    *u[k].etags.lock() = vec![None; o[k].parts as usize];
                    Ok(())
                })
                .await
            }
        })
        .await;
    }

    // 2. The single PUTs and all parts, in parallel.
    if !post.first_error() {
        let mut jobs: Vec<(usize, u64)> = Vec::new();
        for (k, o) in objs.iter().enumerate() {
            if o.parts == 0 {
                jobs.push((k, 0));
            } else {
                jobs.extend((1..=o.parts).map(|n| (k, n)));
            }
        }
        let jobs: Arc<[(usize, u64)]> = jobs.into();
        let (p, r, o, u, j) = (
            Arc::clone(post),
            run.clone(),
            Arc::clone(objs),
            Arc::clone(&uploads),
            Arc::clone(&jobs),
        );
        parallel(post, jobs.len(), run.conc, move |i| {
            let (p, r, o, u, j) = (
                Arc::clone(&p),
                r.clone(),
                Arc::clone(&o),
                Arc::clone(&u),
                Arc::clone(&j),
            );
            async move {
                let (k, part) = j[i];
                put_one(&p, &r, &o[k], &u[k], part).await
            }
        })
        .await;
    }

    // 3. Complete the uploads.
    if !post.first_error() {
        let (p, r, o, m, u) = (
            Arc::clone(post),
            run.clone(),
            Arc::clone(objs),
            Arc::clone(&multi),
            Arc::clone(&uploads),
        );
        parallel(post, multi.len(), run.conc, move |i| {
            let (p, r, o, m, u) = (
                Arc::clone(&p),
                r.clone(),
                Arc::clone(&o),
                Arc::clone(&m),
                Arc::clone(&u),
            );
            async move {
                let k = m[i];
                complete_upload(&p, &r, &o[k], &u[k]).await
            }
        })
        .await;
    }

    // 4. On failure, abort every upload that was started (best effort, bounded).
    if post.first_error() {
        let mut aborts = tokio::task::JoinSet::new();
        for &k in multi.iter() {
            let Some(id) = uploads[k].id.lock().take() else {
                continue;
            };
            let (s3, name, t) = (Arc::clone(&run.s3), objs[k].name.clone(), run.timeout);
            aborts.spawn(async move {
                let req = S3Req {
                    method: Method::DELETE,
                    bucket: &name.bucket,
                    key: &name.key,
                    query: vec![("uploadId", id)],
                    range: None,
                    body: ReqBody::Empty,
                };
                match tokio::time::timeout(t.min(Duration::from_secs(5)), s3.call(&req)).await {
                    Ok(Ok(_)) => tracing::debug!(object = %name, "multipart upload aborted"),
                    Ok(Err(e)) => tracing::warn!(object = %name, "aborting a failed multipart upload: {e}"),
                    Err(_) => tracing::warn!(object = %name, "aborting a failed multipart upload: no answer"),
                }
            });
        }
        while aborts.join_next().await.is_some() {}
    }
}

/// One PUT: the whole object (`part` 0) or part `part` (from 1) of a multipart upload.
async fn put_one(post: &Arc<Post>, run: &Run, o: &WriteObj, up: &Upload, part: u64) -> Result<()> {
    let (off, len, query) = if part == 0 {
        (0, o.len, Vec::new())
    } else {
        let off = (part - 1) * run.part_size;
        let id = up.id.lock().clone().unwrap_or_default();
        (
            off,
            run.part_size.min(o.len - off),
            vec![("partNumber", part.to_string()), ("uploadId", id)],
        )
    };
    // SAFETY: the range lies in registered DRAM checked when the request was created; the
    // post (held by the caller) keeps the completion, and so the registration, alive until
    // after this future, which holds the lease, is gone.
    let (src, _lease) = unsafe { MemSource::lease(o.addr + off, len) };
    let req = S3Req {
        method: Method::PUT,
        bucket: &o.name.bucket,
        key: &o.name.key,
        query,
        range: None,
        body: ReqBody::Mem(src),
    };
    let what = req.what();
    post.guarded(run.timeout, || what.clone(), async {
        let (resp, _) = run.s3.call(&req).await.map_err(|e| backend_err("put", e))?;
        if part > 0 {
            let etag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| backend_err("put", format!("{what}: no ETag in the answer")))?;
            up.etags.lock()[(part - 1) as usize] = Some(etag.to_owned());
        }
        Ok(())
    })
    .await
}

async fn complete_upload(post: &Arc<Post>, run: &Run, o: &WriteObj, up: &Upload) -> Result<()> {
    let id = up.id.lock().clone().unwrap_or_default();
    let mut xml = String::from("<CompleteMultipartUpload>");
    for (i, e) in up.etags.lock().iter().enumerate() {
        let e = e
            .as_deref()
            .ok_or_else(|| backend_err("put", format!("{}: part {} missing", o.name, i + 1)))?;
        xml += &format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
            i + 1,
            s3::xml_escape(e)
        );
    }
    xml += "</CompleteMultipartUpload>";
    let req = S3Req {
        method: Method::POST,
        bucket: &o.name.bucket,
        key: &o.name.key,
        query: vec![("uploadId", id)],
        range: None,
        body: ReqBody::Bytes(Bytes::from(xml)),
    };
    let what = req.what();
    post.guarded(run.timeout, || what.clone(), async {
        let (_, body) = run.s3.call(&req).await.map_err(|e| backend_err("put", e))?;
        // S3 may answer 200 and still fail the completion in the body.
        let text = String::from_utf8_lossy(&body);
        if text.contains("<Error>") {
            return Err(backend_err(
                "put",
                s3::status_error(&format!("{what} (complete)"), StatusCode::OK, &body),
            ));
        }
        Ok(())
    })
    .await?;
    // Completed: nothing to abort any more.
    up.id.lock().take();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse_strictly() {
        assert_eq!(content_range("bytes 0-99/1000"), Some((0, 99)));
        assert_eq!(content_range("bytes 5-5/*"), Some((5, 5)));
        for bad in [
            "bytes 9-5/10",
            "bytes */10",
            "items 0-1/2",
            "bytes 0-x/2",
            "",
            "bytes 1/2",
        ] {
            assert_eq!(content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn ranges_merge_scatter_and_split() {
        let segs = [
            (Desc::new(1000, 10, 0), 0, 0),
            (Desc::new(5000, 20, 0), 0, 10), // follows in the object: merged, scattered
            (Desc::new(5020, 5, 0), 0, 30),  // follows in memory too: same piece
            (Desc::new(9000, 5, 0), 0, 100), // a jump
            (Desc::new(9005, 5, 0), 1, 105), // another object
        ];
        let ops = plan_ranges(&segs, 1 << 20);
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[0].pieces, vec![(1000, 10), (5000, 25)]);
        assert_eq!((ops[0].offset, ops[0].len), (0, 35));
        assert_eq!((ops[1].obj, ops[1].offset, ops[1].len), (0, 100, 5));
        assert_eq!(ops[2].obj, 1);
        let ops = plan_ranges(&[(Desc::new(0, 25, 0), 0, 7)], 10);
        let v: Vec<(u64, u64)> = ops.iter().map(|o| (o.offset, o.len)).collect();
        assert_eq!(v, vec![(7, 10), (17, 10), (27, 5)]);
        assert_eq!(ops[2].pieces, vec![(20, 5)]);
    }

    #[test]
    fn unconfigured_is_unavailable_and_secrets_stay_hidden() {
        let b = ObjectBackend::new(ObjectConfig {
            use_env: false,
            ..ObjectConfig::default()
        });
        assert_eq!(b.probe().unwrap_err(), UNCONFIGURED);
        // A bucket alone means AWS S3 itself, over https (trusting the CA file here, so that
        // the test does not depend on this host's CA store).
        let dir = std::env::temp_dir().join(format!("nixl-object-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let aws = ObjectConfig {
            use_env: false,
            bucket: Some("bkt".into()),
            region: Some("eu-west-3".into()),
            ca_file: Some(ca.clone()),
            ..ObjectConfig::default()
        };
        let b = ObjectBackend::new(aws.clone());
        b.probe().unwrap();
        let st = b.inner.settings.as_ref().unwrap();
        assert_eq!(st.endpoint.scheme, Scheme::Https);
        assert_eq!(st.endpoint.authority, "s3.eu-west-3.amazonaws.com");
        // A CA file that is not there: unavailable, naming it.
        let b = ObjectBackend::new(ObjectConfig {
            ca_file: Some(dir.join("nope.pem")),
            ..aws.clone()
        });
        let e = b.probe().unwrap_err();
        assert!(
            e.contains("[object] ca_file") && e.contains("nope.pem"),
            "{e}"
        );
        // Virtual-host addressing needs a host name and DNS-compatible buckets.
        let b = ObjectBackend::new(ObjectConfig {
            virtual_host: true,
            endpoint: Some("https://10.0.0.1:9000".into()),
            ..aws.clone()
        });
        let e = b.probe().unwrap_err();
        assert!(e.contains("virtual_host") && e.contains("10.0.0.1"), "{e}");
        let b = ObjectBackend::new(ObjectConfig {
            virtual_host: true,
            bucket: Some("Not_A_Host".into()),
            ..aws.clone()
        });
        let e = b.probe().unwrap_err();
        assert!(e.contains("Not_A_Host") && e.contains("host name"), "{e}");
        let b = ObjectBackend::new(ObjectConfig {
            virtual_host: true,
            ..aws
        });
        b.probe().unwrap();
        b.name_object(3, "Bad_Bucket/k").unwrap();
        let e = b.inner.name_or_err(3).unwrap_err().to_string();
        assert!(e.contains("Bad_Bucket") && e.contains("host name"), "{e}");
        assert_eq!(b.inner.name_or_err(4).unwrap().to_string(), "bkt/4");
        std::fs::remove_dir_all(&dir).unwrap();
        let cfg = ObjectConfig {
            use_env: false,
            endpoint: Some("http://127.0.0.1:1".into()),
            bucket: Some("b".into()),
            key_prefix: "kv/".into(),
            access_key_id: Some("AKID".into()),
            secret_access_key: Some(Secret::new("very-secret")),
            ..ObjectConfig::default()
        };
        let b = ObjectBackend::new(cfg);
        assert!(b.probe().is_ok());
        let d = format!("{b:?}");
        assert!(!d.contains("very-secret") && d.contains("AKID"), "{d}");
        assert_eq!(b.object_name(7).unwrap().to_string(), "b/kv/7");
        b.name_object(7, "other/x/y").unwrap();
        assert_eq!(b.object_name(7).unwrap().key, "x/y");
        assert!(b.name_object(8, "nokey").is_err());
    }
}
