//! A small S3 client for the `object` backend: requests over HTTP/1.1, plain or TLS (hyper's
//! pooled client on the backend's tokio runtime, with one connector that serves `http://` and
//! `https://` endpoints: rustls, ring provider, TLS 1.2 and 1.3), signed with AWS Signature
//! Version 4 (payload `UNSIGNED-PAYLOAD`, so parts are sent straight from registered memory
//! without hashing them).
//!
//! **Addressing.** Path-style by default (`{endpoint}/{bucket}/{key}`): every S3-compatible
//! server (MinIO, Ceph RGW, SeaweedFS, moto, ...) serves it, it needs no DNS name per bucket,
//! works with IP endpoints, and one certificate for the endpoint's host covers every bucket
//! (buckets with dots in their names break virtual-host TLS under a wildcard certificate); AWS
//! still serves it. Virtual-host style (`{bucket}.{endpoint host}/{key}`) is there for stores
//! that require it (`[object] virtual_host = true`); the Host header carries the bucket then, and
//! it is signed like every header.
//!
//! **Trust.** Server certificates are verified against the system's roots (found as OpenSSL
//! does, `SSL_CERT_FILE` / `SSL_CERT_DIR` included) plus, when configured, the certificates of
//! a PEM bundle (`[object] ca_file`, or `AWS_CA_BUNDLE`). There is no way to turn verification
//! off.
//!
//! Only what the backend needs: ranged GET, PUT, and the multipart calls (create, upload part,
//! complete, abort). Errors name the method, the bucket/key and what the server said (its
//! `<Code>` and `<Message>`), never the credentials.

use std::fmt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

/// A credential that is never printed: `Debug` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Secret, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Access key, secret key and (for temporary credentials) session token.
#[derive(Clone)]
pub(crate) struct Creds {
    pub(crate) access_key_id: String,
    pub(crate) secret: Secret,
    pub(crate) session_token: Option<Secret>,
}

impl fmt::Debug for Creds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Creds")
            .field("access_key_id", &self.access_key_id)
            .field("secret", &self.secret)
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// `http` or `https`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Where requests go: `http://host[:port]` or `https://host[:port]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) scheme: Scheme,
    /// `host[:port]`, as written (the Host header, signed).
    pub(crate) authority: String,
}

impl Endpoint {
    /// Parses `http://host[:port][/]` or `https://host[:port][/]`.
    pub(crate) fn parse(s: &str) -> Result<Endpoint, String> {
        let (scheme, rest) = if let Some(r) = s.strip_prefix("http://") {
            (Scheme::Http, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (Scheme::Https, r)
        } else {
            return Err(format!(
                "endpoint {s}: expected http://host[:port] or https://host[:port]"
            ));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "endpoint {s}: expected {}://host[:port] without a path",
                scheme.as_str()
            ));
        }
        let uri = hyper::Uri::try_from(format!("{}://{authority}/", scheme.as_str()))
            .map_err(|e| format!("endpoint {s}: {e}"))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("endpoint {s}: no host"));
        }
        Ok(Endpoint {
            scheme,
            authority: authority.to_owned(),
        })
    }

    /// The host, without the port.
    pub(crate) fn host(&self) -> &str {
        if self.authority.starts_with('[') {
            // An IPv6 literal: `[::1]:9000`.
            return self
                .authority
                .find(']')
                .map_or(self.authority.as_str(), |i| &self.authority[..=i]);
        }
        self.authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(h, _)| h)
    }

    /// Whether the host is an IP address (no bucket can be put in front of it).
    pub(crate) fn host_is_ip(&self) -> bool {
        let h = self.host();
        h.starts_with('[') || h.parse::<std::net::Ipv4Addr>().is_ok()
    }
}

/// Why `bucket` cannot be put in a host name (virtual-host addressing), if it cannot.
pub(crate) fn virtual_host_bucket_error(bucket: &str) -> Option<String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if bucket.len() < 3 || bucket.len() > 63 || !bucket.split('.').all(label_ok) {
        return Some(format!(
            "bucket {bucket:?} cannot be a host name (virtual_host = true needs 3 to 63 \
             lower-case letters, digits, hyphens and dots): use path-style addressing"
        ));
    }
    None
}

/// The TLS client settings: the system's roots plus the certificates of `ca_file` (`(label,
/// path)`, the label naming where the path came from in messages). Without any root, an https
/// endpoint (`https`) is refused, an http one is not.
pub(crate) fn tls_config(
    ca_file: Option<(&str, &Path)>,
    https: bool,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let system = rustls_native_certs::load_native_certs();
    let errors: Vec<String> = system.errors.iter().map(|e| e.to_string()).collect();
    tls_config_from(system.certs, &errors, ca_file, https)
}

fn tls_config_from(
    system: Vec<CertificateDer<'static>>,
    system_errors: &[String],
    ca_file: Option<(&str, &Path)>,
    https: bool,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    // The system store may hold a certificate webpki cannot use; it is skipped, as browsers do.
    let (_, ignored) = roots.add_parsable_certificates(system);
    if ignored > 0 {
        tracing::debug!(
            ignored,
            "object: system CA certificates skipped (unparsable)"
        );
    }
    if let Some((label, path)) = ca_file {
        for (i, cert) in read_ca_file(label, path)?.into_iter().enumerate() {
            roots.add(cert).map_err(|e| {
                format!(
                    "{label} {}: certificate {} cannot be a trust root: {e}",
                    path.display(),
                    i + 1
                )
            })?;
        }
    }
    if https && roots.is_empty() {
        let why = if system_errors.is_empty() {
            "the system has none".to_owned()
        } else {
            format!("the system store: {}", system_errors.join("; "))
        };
        return Err(format!(
            "https endpoint without any trusted CA certificate ({why}): install the system's \
             CA certificates (ca-certificates) or set [object] ca_file"
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The certificates of a PEM bundle; errors name `label` and the file.
pub(crate) fn read_ca_file(
    label: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let at = || format!("{label} {}", path.display());
    let pem = std::fs::read(path).map_err(|e| format!("{}: cannot read it: {e}", at()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate bundle: {e}", at()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected PEM \"-----BEGIN CERTIFICATE-----\" blocks)",
            at()
        ));
    }
    Ok(certs)
}

/// One request.
#[derive(Debug)]
pub(crate) struct S3Req<'a> {
    pub(crate) method: Method,
    pub(crate) bucket: &'a str,
    pub(crate) key: &'a str,
    /// Query parameters (`uploads` has an empty value).
    pub(crate) query: Vec<(&'static str, String)>,
    /// Inclusive byte range for a GET.
    pub(crate) range: Option<(u64, u64)>,
    pub(crate) body: ReqBody,
}

/// What a request sends.
#[derive(Clone, Debug)]
pub(crate) enum ReqBody {
    /// Nothing.
    Empty,
    /// Owned bytes (small documents).
    Bytes(Bytes),
    /// A range of registered memory, copied out a chunk at a time as the client sends it.
    Mem(Arc<MemSource>),
}

impl ReqBody {
    fn len(&self) -> u64 {
        match self {
            ReqBody::Empty => 0,
            ReqBody::Bytes(b) => b.len() as u64,
            ReqBody::Mem(m) => m.len,
        }
    }
}

/// Registered memory a PUT sends: `len` bytes at `addr`, readable while the [`MemLease`] that
/// came with it lives. The HTTP client may hold a body longer than the request that sent it (a
/// connection blocked on a server that stopped reading); once the lease is dropped, such a
/// body reads no more of the memory and ends in an error.
#[derive(Debug)]
pub(crate) struct MemSource {
    addr: u64,
    len: u64,
    /// Whether the memory may still be read; taken (with the copy) under this lock.
    alive: parking_lot::Mutex<bool>,
}

/// Ends the reads of a [`MemSource`] when dropped (waiting for a copy in progress).
#[derive(Debug)]
pub(crate) struct MemLease(Arc<MemSource>);

impl Drop for MemLease {
    fn drop(&mut self) {
        *self.0.alive.lock() = false;
    }
}

impl MemSource {
    /// A source for `len` bytes at `addr` and the lease that bounds its reads.
    ///
    /// # Safety
    /// `addr..addr + len` must stay valid for reads until the lease is dropped.
    pub(crate) unsafe fn lease(addr: u64, len: u64) -> (Arc<MemSource>, MemLease) {
        let m = Arc::new(MemSource {
            addr,
            len,
            alive: parking_lot::Mutex::new(true),
        });
        (Arc::clone(&m), MemLease(m))
    }
}

/// Bytes copied out of a [`MemSource`] per frame.
const CHUNK: u64 = 256 << 10;

/// The body hyper sends.
#[derive(Debug)]
pub(crate) struct SendBody {
    body: ReqBody,
    pos: u64,
}

impl HttpBody for SendBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let len = self.body.len();
        if self.pos >= len {
            return Poll::Ready(None);
        }
        let pos = self.pos;
        let chunk = match &self.body {
            ReqBody::Empty => return Poll::Ready(None),
            ReqBody::Bytes(b) => b.clone(),
            ReqBody::Mem(m) => {
                let alive = m.alive.lock();
                if !*alive {
                    return Poll::Ready(Some(Err(std::io::Error::other(
                        "the request this body belongs to has ended",
                    ))));
                }
                let n = CHUNK.min(len - pos) as usize;
                // SAFETY: the lease is alive (checked under the lock it takes to end), so the
                // memory is still valid for reads; `pos + n <= len`.
                let src = unsafe { std::slice::from_raw_parts((m.addr + pos) as *const u8, n) };
                let out = Bytes::copy_from_slice(src);
                drop(alive);
                out
            }
        };
        self.pos += chunk.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.body.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.body.len() - self.pos)
    }
}

impl S3Req<'_> {
    /// `GET bucket/key` and the like, for messages.
    pub(crate) fn what(&self) -> String {
        let mut s = format!("{} {}/{}", self.method, self.bucket, self.key);
        if let Some((a, b)) = self.range {
            s += &format!(" bytes {a}-{b}");
        }
        if let Some((_, n)) = self.query.iter().find(|(k, _)| *k == "partNumber") {
            s += &format!(" part {n}");
        }
        s
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, SendBody>;

/// The client: one pool of keep-alive connections to the endpoint.
pub(crate) struct S3 {
    client: HttpClient,
    endpoint: Endpoint,
    /// Bucket in the host name rather than in the path.
    virtual_host: bool,
    region: String,
    creds: Option<Creds>,
}

impl fmt::Debug for S3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3")
            .field("endpoint", &self.endpoint)
            .field("virtual_host", &self.virtual_host)
            .field("region", &self.region)
            .field("creds", &self.creds)
            .finish_non_exhaustive()
    }
}

/// Longest answer read whole (error documents, multipart answers).
const MAX_ANSWER: usize = 1 << 20;

impl S3 {
    /// A client for `endpoint`; `tls` verifies the servers of `https://` endpoints.
    pub(crate) fn new(
        endpoint: Endpoint,
        virtual_host: bool,
        region: String,
        creds: Option<Creds>,
        tls: &rustls::ClientConfig,
        connect_timeout: Duration,
        max_idle: usize,
    ) -> S3 {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(connect_timeout));
        conn.set_nodelay(true);
        conn.enforce_http(false); // the TLS layer above takes https:// URIs
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(conn);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(max_idle)
            .build(conn);
        S3 {
            client,
            endpoint,
            virtual_host,
            region,
            creds,
        }
    }

    /// The authority (the Host header) and the path (as signed: encoded) of an object.
    fn target(&self, bucket: &str, key: &str) -> (String, String) {
        let (authority, mut path) = if self.virtual_host {
            (
                format!("{bucket}.{}", self.endpoint.authority),
                String::from("/"),
            )
        } else {
            (
                self.endpoint.authority.clone(),
                format!("/{}", uri_encode(bucket, false)),
            )
        };
        if !key.is_empty() {
            if !path.ends_with('/') {
                path.push('/');
            }
            path += &uri_encode(key, false);
        }
        (authority, path)
    }

    fn build(&self, r: &S3Req<'_>, now: SystemTime) -> Result<Request<SendBody>, String> {
        if self.virtual_host {
            if let Some(e) = virtual_host_bucket_error(r.bucket) {
                return Err(format!("{}: {e}", r.what()));
            }
        }
        let (authority, path) = self.target(r.bucket, r.key);
        let query = canonical_query(&r.query);
        let scheme = self.endpoint.scheme.as_str();
        let uri = if query.is_empty() {
            format!("{scheme}://{authority}{path}")
        } else {
            format!("{scheme}://{authority}{path}?{query}")
        };
        let mut headers: Vec<(&'static str, String)> = vec![("host", authority)];
        if let Some((a, b)) = r.range {
            headers.push(("range", format!("bytes={a}-{b}")));
        }
        let (amz_date, day) = amz_date(now);
        headers.push(("x-amz-content-sha256", "UNSIGNED-PAYLOAD".into()));
        headers.push(("x-amz-date", amz_date.clone()));
        if let Some(c) = &self.creds {
            if let Some(t) = &c.session_token {
                headers.push(("x-amz-security-token", t.expose().to_owned()));
            }
            headers.sort_by(|a, b| a.0.cmp(b.0));
            let auth = authorization(
                c,
                &self.region,
                r.method.as_str(),
                &path,
                &query,
                &headers,
                "UNSIGNED-PAYLOAD",
                &amz_date,
                &day,
            );
            headers.push(("authorization", auth));
        }
        let mut b = Request::builder().method(r.method.clone()).uri(uri);
        for (k, v) in &headers {
            b = b.header(*k, v.as_str());
        }
        if r.method == Method::PUT || r.method == Method::POST {
            b = b.header("content-length", r.body.len());
        }
        b.body(SendBody {
            body: r.body.clone(),
            pos: 0,
        })
        .map_err(|e| format!("{}: bad request: {e}", r.what()))
    }

    /// Sends a request; `Err` only when no response came (connection refused, reset, ...).
    /// GETs and PUTs (idempotent) that got no answer are sent once more on a new connection,
    /// since a keep-alive connection the server has just closed fails the same way.
    pub(crate) async fn send(&self, r: &S3Req<'_>) -> Result<Response<Incoming>, String> {
        let tries = if r.method == Method::GET || r.method == Method::PUT {
            2
        } else {
            1
        };
        let mut last = String::new();
        for _ in 0..tries {
            let req = self.build(r, SystemTime::now())?;
            match self.client.request(req).await {
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    last = format!("{}: {}", r.what(), error_chain(&e));
                    if let Some(hint) = tls_hint(&last) {
                        last += hint;
                    }
                    if e.is_connect() {
                        break; // refused or unreachable: no use trying again at once
                    }
                }
            }
        }
        Err(last)
    }

    /// Sends a request and reads a small answer whole; a status other than 2xx is an error
    /// with the server's code and message.
    pub(crate) async fn call(&self, r: &S3Req<'_>) -> Result<(Response<()>, Bytes), String> {
        let resp = self.send(r).await?;
        let (parts, body) = resp.into_parts();
        let bytes = read_limited(body, MAX_ANSWER)
            .await
            .map_err(|e| format!("{}: reading the answer: {e}", r.what()))?;
        if !parts.status.is_success() {
            return Err(status_error(&r.what(), parts.status, &bytes));
        }
        Ok((Response::from_parts(parts, ()), bytes))
    }
}

/// What to do about a certificate the client refused, going by rustls' words in `err`.
fn tls_hint(err: &str) -> Option<&'static str> {
    if !err.contains("invalid peer certificate") {
        None
    } else if err.contains("UnknownIssuer") {
        Some(
            " (the server's certificate is not signed by a trusted CA: set [object] ca_file \
             (or AWS_CA_BUNDLE) to the PEM certificate of the CA that signed it)",
        )
    } else if err.contains("not valid for name") || err.contains("NotValidForName") {
        Some(
            " (the server's certificate does not name the endpoint's host: use an endpoint \
             with a name the certificate holds)",
        )
    } else {
        Some(" (the server's certificate was refused)")
    }
}

/// Reads a body up to `limit` bytes (the rest is dropped).
pub(crate) async fn read_limited(mut body: Incoming, limit: usize) -> Result<Bytes, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| error_chain(&e))?;
        if let Ok(data) = frame.into_data() {
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
            if room == 0 {
                break;
            }
        }
    }
    Ok(out.into())
}

/// `what: 404 Not Found: NoSuchKey: The specified key does not exist.`
pub(crate) fn status_error(what: &str, status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s = format!("{what}: HTTP {status}");
    if let Some(code) = xml_text(&text, "Code") {
        s += ": ";
        s += &code;
    }
    if let Some(msg) = xml_text(&text, "Message") {
        s += ": ";
        s += &msg;
    }
    s
}

/// An error and its causes, `a: b: c`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s += ": ";
            s += &t;
        }
        cur = c.source();
    }
    s
}

/// The text of the first `<tag>...</tag>` (entities decoded), if any.
pub(crate) fn xml_text(doc: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = doc.find(&open)? + open.len();
    let end = start + doc[start..].find(&close)?;
    Some(
        doc[start..end]
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// Escapes text for an XML element.
pub(crate) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// SigV4 `UriEncode`: everything but unreserved characters percent-encoded; `/` kept in paths.
pub(crate) fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out += &format!("%{b:02X}"),
        }
    }
    out
}

fn canonical_query(q: &[(&'static str, String)]) -> String {
    let mut parts: Vec<(String, String)> = q
        .iter()
        .map(|(k, v)| (uri_encode(k, true), uri_encode(v, true)))
        .collect();
    parts.sort();
    parts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// (`20130524T000000Z`, `20130524`) for a time.
pub(crate) fn amz_date(t: SystemTime) -> (String, String) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let day = format!("{y:04}{m:02}{d:02}");
    let full = format!(
        "{day}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
    (full, day)
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The `Authorization` header of AWS Signature Version 4. `headers` are lower-case and sorted
/// by name; all of them are signed.
#[allow(clippy::too_many_arguments)]
fn authorization(
    c: &Creds,
    region: &str,
    method: &str,
    path: &str,
    query: &str,
    headers: &[(&'static str, String)],
    payload_hash: &str,
    amz_date: &str,
    day: &str,
) -> String {
    let canonical_headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}:{}\n", v.trim()))
        .collect();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| *k).collect();
    let signed = signed.join(";");
    let canonical =
        format!("{method}\n{path}\n{query}\n{canonical_headers}\n{signed}\n{payload_hash}");
    let scope = format!("{day}/{region}/s3/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let k = hmac(
        format!("AWS4{}", c.secret.expose()).as_bytes(),
        day.as_bytes(),
    );
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, b"s3");
    let k = hmac(&k, b"aws4_request");
    let sig = hex(&hmac(&k, to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={sig}",
        c.access_key_id
    )
}

/// A client for tests of this module's callers: no trust roots (plain http), test credentials.
#[cfg(test)]
pub(crate) fn test_client(endpoint: &str) -> S3 {
    let tls = tls_config_from(Vec::new(), &[], None, false).expect("tls settings");
    S3::new(
        Endpoint::parse(endpoint).expect("endpoint"),
        false,
        "us-east-1".into(),
        Some(Creds {
            access_key_id: "testing".into(),
            secret: Secret::new("testing"),
            session_token: None,
        }),
        &tls,
        Duration::from_secs(1),
        1,
    )
}

#[cfg(test)]
mod tests;
