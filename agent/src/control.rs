//! A client of the daemon's control API, for the CLIs and services of this workspace.
//!
//! The API is JSON over HTTP/1.1 on the daemon's Unix socket (`[daemon] control_socket`), so
//! any HTTP client speaks it too:
//!
//! ```text
//! curl --unix-socket /run/nixl/agent.sock http://nixl/v1/status
//! curl --unix-socket /run/nixl/agent.sock http://nixl/v1/jobs \
//!      -d '{"kind": "lease", "name": "llama-70b", "size": "64GiB"}'
//! ```
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/status` | agent name, backends, etcd state, peers (up/down, last canary), registered regions and bytes, in-flight requests, pool, job count |
//! | `GET /v1/peers` | the peers with their health |
//! | `GET /v1/pool` | the host memory pool and its leases |
//! | `GET /v1/jobs`, `GET /v1/jobs/ID` | jobs and their state (`running`, `done`, `failed` with `error`, `cancelled`) |
//! | `POST /v1/jobs` | a new job: `{"kind": "lease", "name", "size"}`, `{"kind": "transfer", "op": "read"/"write", "lease", "offset", "len", "peer", "remote_addr", "notif"}`, or `{"kind": "publish", "prefix"}` (the agent's metadata under another etcd prefix too) |
//! | `DELETE /v1/jobs/ID` | release a lease / cancel a transfer / unpublish |
//!
//! Errors are a status code with `{"error": "..."}`; a draining daemon answers 503.
//!
//! ```no_run
//! let c = nixl_agent::control::Client::new(nixl_agent::config::default_control_socket());
//! let status = c.get("/v1/status")?;
//! println!("{} has {} peers", status["agent"], status["peers"].as_array().map_or(0, Vec::len));
//! let lease = c.post("/v1/jobs", &serde_json::json!({"kind": "lease", "name": "w", "size": "1GiB"}))?;
//! println!("lease at {:#x}", lease["detail"]["addr"].as_u64().unwrap_or(0));
//! # Ok::<(), nixl_agent::control::ControlError>(())
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

pub use crate::api::{MAX_BODY, MAX_CONNS};

/// Largest answer read.
const MAX_ANSWER: u64 = 64 << 20;

/// What went wrong talking to the daemon.
#[derive(Debug)]
#[non_exhaustive]
pub enum ControlError {
    /// The socket could not be reached (no daemon, or no permission).
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed during the exchange.
    Io(std::io::Error),
    /// The daemon refused the request: its status and message.
    Refused {
        /// The HTTP status.
        status: u16,
        /// The daemon's `error`.
        message: String,
    },
    /// The answer was not HTTP with a JSON body.
    Malformed(String),
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::Connect { path, source } => write!(
                f,
                "cannot reach the nixl-agent daemon at {}: {source} (is `nixl-agent serve` running, \
                 and may this user open its socket?)",
                path.display()
            ),
            ControlError::Io(e) => write!(f, "control connection: {e}"),
            ControlError::Refused { status, message } => write!(f, "daemon answered {status}: {message}"),
            ControlError::Malformed(m) => write!(f, "bad answer from the daemon: {m}"),
        }
    }
}

impl std::error::Error for ControlError {}

/// A client (one connection per request).
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the daemon at `path`, with a 10 s timeout per request.
    pub fn new(path: impl Into<PathBuf>) -> Client {
        Client {
            path: path.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Sets the timeout of each request.
    pub fn with_timeout(mut self, t: Duration) -> Client {
        self.timeout = t;
        self
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Value, ControlError> {
        self.request("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ControlError> {
        self.request("POST", path, Some(body))
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Value, ControlError> {
        self.request("DELETE", path, None)
    }

    /// One request; a status other than 2xx is [`ControlError::Refused`].
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ControlError> {
        let (status, v) = self.raw(method, path, body)?;
        if (200..300).contains(&status) {
            Ok(v)
        } else {
            Err(ControlError::Refused {
                status,
                message: v["error"].as_str().unwrap_or("").to_owned(),
            })
        }
    }

    /// One request; returns the status and the JSON body whatever the status.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), ControlError> {
        let mut s = UnixStream::connect(&self.path).map_err(|source| ControlError::Connect {
            path: self.path.clone(),
            source,
        })?;
        s.set_read_timeout(Some(self.timeout))
            .map_err(ControlError::Io)?;
        s.set_write_timeout(Some(self.timeout))
            .map_err(ControlError::Io)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: nixl\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).map_err(ControlError::Io)?;
        s.write_all(body.as_bytes()).map_err(ControlError::Io)?;
        let mut raw = Vec::new();
        s.take(MAX_ANSWER)
            .read_to_end(&mut raw)
            .map_err(ControlError::Io)?;
        parse_answer(&raw)
    }
}

/// Status and JSON body of an HTTP/1.1 answer read to its end (the request said
/// `Connection: close`).
fn parse_answer(raw: &[u8]) -> Result<(u16, Value), ControlError> {
    let bad = |m: &str| ControlError::Malformed(m.to_owned());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(&format!("status line {status_line:?}")))?;
    let mut body = &raw[end + 4..];
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                let n: usize = v.parse().map_err(|_| bad("content-length"))?;
                body = body
                    .get(..n)
                    .ok_or_else(|| bad("body shorter than its content-length"))?;
            } else if k.eq_ignore_ascii_case("transfer-encoding")
                && v.eq_ignore_ascii_case("chunked")
            {
                chunked = true;
            }
        }
    }
    let owned;
    if chunked {
        owned = dechunk(body).ok_or_else(|| bad("bad chunked body"))?;
        body = &owned;
    }
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| bad(&format!("body is not JSON: {e}")))?
    };
    Ok((status, v))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&b[..nl]).ok()?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        b = &b[nl + 2..];
        if n == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..n)?);
        b = b.get(n + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_garbage_is_an_error() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{\"a\": 1}\nXX";
        assert_eq!(
            parse_answer(ok).unwrap(),
            (200, serde_json::json!({"a": 1}))
        );
        let ch = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n: 2\r\n1\r\n}\r\n0\r\n\r\n";
        assert_eq!(
            parse_answer(ch).unwrap(),
            (404, serde_json::json!({"a": 2}))
        );
        for bad in [
            &b""[..],
            b"HTTP/1.1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\n\r\nnot json",
        ] {
            assert!(parse_answer(bad).is_err());
        }
    }
}
