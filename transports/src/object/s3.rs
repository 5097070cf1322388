//! A small S3 client for the `object` backend: path-style requests over HTTP/1.1 (hyper's
//! pooled client on the backend's tokio runtime), signed with AWS Signature Version 4 (payload
//! `UNSIGNED-PAYLOAD`, so parts are sent straight from registered memory without hashing them).
//!
//! Only what the backend needs: ranged GET, PUT, and the multipart calls (create, upload part,
//! complete, abort). Errors name the method, the bucket/key and what the server said (its
//! `<Code>` and `<Message>`), never the credentials.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::{Digest, Sha256};

/// A credential that is never printed: `Debug` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

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

/// Where requests go: `http://host[:port]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// `host[:port]`, as written (the Host header, signed).
    pub(crate) authority: String,
}

impl Endpoint {
    /// Parses `http://host[:port][/]`; `https://` is refused with what to do instead.
    pub(crate) fn parse(s: &str) -> Result<Endpoint, String> {
        let rest = if let Some(r) = s.strip_prefix("http://") {
            r
        } else if s.starts_with("https://") {
            return Err(format!(
                "endpoint {s}: https needs TLS, which this build does not include; use an \
                 http:// endpoint (an S3-compatible server or gateway on a trusted network)"
            ));
        } else {
            return Err(format!("endpoint {s}: expected http://host[:port]"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "endpoint {s}: expected http://host[:port] without a path"
            ));
        }
        hyper::Uri::try_from(format!("http://{authority}/"))
            .map_err(|e| format!("endpoint {s}: {e}"))?;
        Ok(Endpoint {
            authority: authority.to_owned(),
        })
    }
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

type HttpClient = Client<HttpConnector, SendBody>;

/// The client: one pool of keep-alive connections to the endpoint.
pub(crate) struct S3 {
    client: HttpClient,
    endpoint: Endpoint,
    region: String,
    creds: Option<Creds>,
}

impl fmt::Debug for S3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("creds", &self.creds)
            .finish_non_exhaustive()
    }
}

/// Longest answer read whole (error documents, multipart answers).
const MAX_ANSWER: usize = 1 << 20;

impl S3 {
    pub(crate) fn new(
        endpoint: Endpoint,
        region: String,
        creds: Option<Creds>,
        connect_timeout: Duration,
        max_idle: usize,
    ) -> S3 {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(connect_timeout));
        conn.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(max_idle)
            .build(conn);
        S3 {
            client,
            endpoint,
            region,
            creds,
        }
    }

    fn build(&self, r: &S3Req<'_>, now: SystemTime) -> Result<Request<SendBody>, String> {
        let mut path = String::from("/");
        path += &uri_encode(r.bucket, false);
        if !r.key.is_empty() {
            path.push('/');
            path += &uri_encode(r.key, false);
        }
        let query = canonical_query(&r.query);
        let uri = if query.is_empty() {
            format!("http://{}{path}", self.endpoint.authority)
        } else {
            format!("http://{}{path}?{query}", self.endpoint.authority)
        };
        let mut headers: Vec<(&'static str, String)> =
            vec![("host", self.endpoint.authority.clone())];
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The "GET Object" example of the SigV4 documentation for S3.
    #[test]
    fn signature_matches_the_documented_example() {
        let c = Creds {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret: Secret::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
            session_token: None,
        };
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let headers = vec![
            ("host", "examplebucket.s3.amazonaws.com".to_owned()),
            ("range", "bytes=0-9".to_owned()),
            ("x-amz-content-sha256", empty.to_owned()),
            ("x-amz-date", "20130524T000000Z".to_owned()),
        ];
        let a = authorization(
            &c,
            "us-east-1",
            "GET",
            "/test.txt",
            "",
            &headers,
            empty,
            "20130524T000000Z",
            "20130524",
        );
        assert_eq!(
            a,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        // The secret never shows in Debug.
        let d = format!("{c:?}");
        assert!(!d.contains("EXAMPLEKEY") && d.contains("<redacted>"), "{d}");
    }

    #[test]
    fn dates_encoding_and_xml() {
        let t = UNIX_EPOCH + Duration::from_secs(1_369_353_600);
        assert_eq!(amz_date(t).0, "20130524T000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3723); // 2000-02-29 01:02:03
        assert_eq!(amz_date(t), ("20000229T010203Z".into(), "20000229".into()));
        assert_eq!(uri_encode("a b/c~d+é", false), "a%20b/c~d%2B%C3%A9");
        assert_eq!(uri_encode("a/b", true), "a%2Fb");
        assert_eq!(
            canonical_query(&[("uploadId", "x/y".into()), ("partNumber", "2".into())]),
            "partNumber=2&uploadId=x%2Fy"
        );
        let doc = "<Error><Code>NoSuchKey</Code><Message>a &amp; b</Message></Error>";
        assert_eq!(xml_text(doc, "Code").as_deref(), Some("NoSuchKey"));
        assert_eq!(
            status_error("GET b/k", StatusCode::NOT_FOUND, doc.as_bytes()),
            "GET b/k: HTTP 404 Not Found: NoSuchKey: a & b"
        );
        assert!(Endpoint::parse("https://s3.amazonaws.com")
            .unwrap_err()
            .contains("TLS"));
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:9000/").unwrap().authority,
            "127.0.0.1:9000"
        );
        assert!(Endpoint::parse("http://h/path").is_err());
        assert!(Endpoint::parse("ftp://h").is_err());
    }
}
