//! [`HttpSource`]: a worker's KV events over HTTP ([`crate::wire`]), with a timeout on every
//! request and bounded answers.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use nixl_kv::events::{Gap, MAX_EVENT_BLOCKS};

use crate::follow::{EventSource, Events, Snapshot, SourceError};
use crate::wire::{BlocksResponse, EventsResponse, GapResponse, WorkerLoad};

/// Largest events answer accepted (bytes).
pub const MAX_EVENTS_BYTES: usize = 16 << 20;
/// Largest blocks answer accepted (bytes).
pub const MAX_BLOCKS_BYTES: usize = 256 << 20;
/// Most events accepted in one answer.
pub const MAX_EVENTS_PER_ANSWER: usize = 100_000;
/// Default timeout of one request (connect to end of body).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// A worker's event endpoint at `http://HOST:PORT[/prefix]`.
#[derive(Debug, Clone)]
pub struct HttpSource {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
    worker: Option<String>,
}

impl HttpSource {
    /// A source for the worker at `base` (an `http://` URL; a trailing `/` is ignored).
    pub fn new(base: &str) -> Result<Self, SourceError> {
        let base = base.trim_end_matches('/').to_string();
        let uri: Uri = base
            .parse()
            .map_err(|e| SourceError::Bad(format!("bad worker URL {base:?}: {e}")))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(SourceError::Bad(format!(
                "bad worker URL {base:?}: expected http://HOST:PORT"
            )));
        }
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(DEFAULT_TIMEOUT));
        conn.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        Ok(HttpSource {
            base,
            client,
            timeout: DEFAULT_TIMEOUT,
            worker: None,
        })
    }

    /// Sets the timeout of one request (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Refuses answers from a worker of another name (say, another process now on the port).
    pub fn expect_worker(mut self, name: &str) -> Self {
        self.worker = Some(name.to_string());
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn get(&self, path: &str, limit: usize) -> Result<(StatusCode, Bytes), SourceError> {
        let url = format!("{}{path}", self.base);
        let req = Request::get(&url)
            .body(Empty::new())
            .map_err(|e| SourceError::Bad(format!("GET {url}: {e}")))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| SourceError::Down(format!("GET {url}: {e}")))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        SourceError::Bad(format!("GET {url}: answer over {limit} bytes"))
                    } else {
                        SourceError::Down(format!("GET {url}: reading the answer: {e}"))
                    }
                })?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| SourceError::Down(format!("GET {url}: no answer in {:?}", self.timeout)))?
    }

    fn check_worker(&self, name: &str) -> Result<(), SourceError> {
        match &self.worker {
            Some(w) if w != name => Err(SourceError::Bad(format!(
                "{} answers as worker {name:?}, expected {w:?}",
                self.base
            ))),
            _ => Ok(()),
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, SourceError> {
    serde_json::from_slice(body).map_err(|e| SourceError::Bad(format!("{what}: {e}")))
}

fn failed(url: &str, status: StatusCode) -> SourceError {
    SourceError::Down(format!("{url}: status {status}"))
}

impl EventSource for HttpSource {
    async fn since(&self, id: u64) -> Result<Events, SourceError> {
        let path = format!("/kv/events?since={id}");
        let (status, body) = self.get(&path, MAX_EVENTS_BYTES).await?;
        match status {
            StatusCode::OK => {
                let r: EventsResponse = decode(&path, &body)?;
                self.check_worker(&r.worker)?;
                if r.events.len() > MAX_EVENTS_PER_ANSWER {
                    return Err(SourceError::Bad(format!(
                        "{path}: {} events, more than {MAX_EVENTS_PER_ANSWER}",
                        r.events.len()
                    )));
                }
                for e in &r.events {
                    e.check(MAX_EVENT_BLOCKS).map_err(SourceError::Bad)?;
                }
                Ok(Events {
                    events: r.events,
                    last_id: r.last_id,
                    instance: r.instance,
                })
            }
            StatusCode::GONE => {
                let g: GapResponse = decode(&path, &body)?;
                Err(SourceError::Gap(Gap { oldest: g.oldest }))
            }
            s => Err(failed(&path, s)),
        }
    }

    async fn all_blocks(&self) -> Result<Snapshot, SourceError> {
        let path = "/kv/blocks";
        let (status, body) = self.get(path, MAX_BLOCKS_BYTES).await?;
        if status != StatusCode::OK {
            return Err(failed(path, status));
        }
        let r: BlocksResponse = decode(path, &body)?;
        self.check_worker(&r.worker)?;
        Ok(Snapshot {
            last_id: r.last_id,
            blocks: r.blocks,
            instance: r.instance,
        })
    }

    async fn load(&self) -> Result<Option<WorkerLoad>, SourceError> {
        let path = "/load";
        let (status, body) = self.get(path, 64 << 10).await?;
        match status {
            StatusCode::OK => decode(path, &body).map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(failed(path, s)),
        }
    }
}
