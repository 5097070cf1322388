//! The frontend's HTTP client to the workers (hyper), with timeouts and a line reader for the
//! workers' token streams.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// Why a call to a worker failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The worker could not be reached or its connection broke (it may be dead).
    #[error("worker unreachable: {0}")]
    Unreachable(String),
    /// The worker answered with an error status.
    #[error("worker answered {0}: {1}")]
    Status(u16, String),
    /// No answer in time.
    #[error("worker did not answer within {0:?}")]
    Timeout(Duration),
}

/// A client to the workers.
#[derive(Clone, Debug)]
pub struct Http {
    c: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(2)));
        Http {
            c: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(conn),
        }
    }
}

impl Http {
    async fn send(
        &self,
        method: hyper::Method,
        url: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<hyper::Response<Incoming>, CallError> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| CallError::Unreachable(format!("{url}: {e}")))?;
        match tokio::time::timeout(timeout, self.c.request(req)).await {
            Err(_) => Err(CallError::Timeout(timeout)),
            Ok(Err(e)) => Err(CallError::Unreachable(format!("{url}: {e}"))),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// A whole answer (status checked), within `timeout`.
    pub async fn call(
        &self,
        post: Option<&serde_json::Value>,
        url: &str,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let fut = async {
            let (m, b) = match post {
                Some(v) => (
                    hyper::Method::POST,
                    Some(serde_json::to_vec(v).unwrap_or_default()),
                ),
                None => (hyper::Method::GET, None),
            };
            let r = self.send(m, url, b, timeout).await?;
            let status = r.status();
            let body = r
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Unreachable(format!("{url}: {e}")))?
                .to_bytes();
            if !status.is_success() {
                return Err(CallError::Status(
                    status.as_u16(),
                    String::from_utf8_lossy(&body).into_owned(),
                ));
            }
            Ok(body)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or(Err(CallError::Timeout(timeout)))
    }

    /// A streamed answer: the status is checked, then lines are read with [`Lines::next`].
    pub async fn stream(
        &self,
        url: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<Lines, CallError> {
        let r = self
            .send(
                hyper::Method::POST,
                url,
                Some(serde_json::to_vec(body).unwrap_or_default()),
                timeout,
            )
            .await?;
        let status = r.status();
        if !status.is_success() {
            let b = r.into_body().collect().await.map(|c| c.to_bytes());
            return Err(CallError::Status(
                status.as_u16(),
                b.map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
            ));
        }
        Ok(Lines {
            body: r.into_body(),
            buf: BytesMut::new(),
            url: url.to_owned(),
        })
    }
}

/// Newline-delimited lines of a streamed body.
#[derive(Debug)]
pub struct Lines {
    body: Incoming,
    buf: BytesMut,
    url: String,
}

impl Lines {
    /// The next line (`None` at the end of the body), or why the stream broke. Waits at most
    /// `timeout` for it.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Bytes>, CallError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(i + 1).freeze();
                return Ok(Some(line.slice(..i)));
            }
            let frame = tokio::time::timeout(timeout, self.body.frame())
                .await
                .map_err(|_| CallError::Timeout(timeout))?;
            match frame {
                None => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let rest = self.buf.split().freeze();
                    return Ok(Some(rest));
                }
                Some(Err(e)) => return Err(CallError::Unreachable(format!("{}: {e}", self.url))),
                Some(Ok(f)) => {
                    if let Ok(mut d) = f.into_data() {
                        while d.has_remaining() {
                            let c = d.chunk().to_vec();
                            d.advance(c.len());
                            self.buf.extend_from_slice(&c);
                        }
                    }
                }
            }
        }
    }
}
