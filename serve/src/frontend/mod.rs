//! The OpenAI-compatible frontend: `POST /v1/completions`, `POST /v1/chat/completions`
//! (server-sent events or one JSON answer), `GET /v1/models`, `/health`, `/metrics`.
//!
//! Tokens are bytes: a completion's prompt is `BOS` then its UTF-8 bytes; a chat is `BOS`, then
//! `"{role}: {content}\n"` per message, then `"assistant: "` (the fixed byte-level template).
//! The model only ever produces printable ASCII and newlines, so every token is one character.
//!
//! Each request is driven by one task: it picks workers (a [`WorkerChoice`]: round-robin or
//! random here), and either streams from an aggregated worker, or asks a prefill worker for
//! the first token while it offers the KV to the chosen decode worker, then streams the rest
//! from that decode worker (which pulls the KV first). When a worker dies mid-request (its
//! connection breaks), the request is migrated: prompt plus the tokens generated so far are
//! prefilled again on other workers and the stream goes on; greedy decoding (and seeded
//! sampling, whose draws depend only on seed and position) gives the tokens an unbroken run
//! would have. A client that goes away cancels its request on every worker it used.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::client::{CallError, Http};
use crate::engine::{Ev, PeerInfo, PrefillOut};
use crate::metrics::{self, Histogram};
use crate::model::BOS;

/// Most attempts of one request (the first and its migrations).
pub const MAX_ATTEMPTS: usize = 4;
/// How long a worker that broke a connection is left out of choices.
pub const DEAD_FOR: Duration = Duration::from_secs(10);

/// A pool of workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pool {
    /// Prefill workers.
    Prefill,
    /// Decode workers.
    Decode,
    /// Aggregated workers.
    Aggregated,
}

/// How the frontend picks a worker of a pool: the seam where a router plugs in.
pub trait WorkerChoice: Send + Sync + std::fmt::Debug {
    /// One of `candidates` (indices into `urls`, never empty) for a request of `tokens`.
    fn choose(&self, pool: Pool, urls: &[String], candidates: &[usize], tokens: &[u32]) -> usize;
    /// Counts a request of `blocks` KV blocks on `url` until the returned guard is dropped.
    fn book(&self, _url: &str, _blocks: u64) -> Option<Box<dyn std::any::Any + Send>> {
        None
    }
}

/// The `nixl-router` [`Router`](nixl_router::Router) behind the seam (KV-aware, round-robin
/// or random), fed by a follower of every worker's `/kv/events` and `/load` (workers are
/// known by URL).
#[derive(Debug)]
pub struct RouterChoice {
    router: Arc<nixl_router::Router>,
    _followers: Vec<nixl_router::FollowerHandle>,
    tokens_per_block: usize,
}

impl RouterChoice {
    /// Follows `urls` (call inside a tokio runtime); `tokens_per_block` must be the workers'.
    pub fn new(
        mode: nixl_router::Mode,
        urls: &[String],
        tokens_per_block: usize,
    ) -> Result<RouterChoice, String> {
        let router = Arc::new(nixl_router::Router::new(mode));
        let mut followers = Vec::new();
        for u in urls {
            let src = nixl_router::HttpSource::new(u).map_err(|e| e.to_string())?;
            followers.push(router.follow(u, src, Duration::from_millis(50)));
        }
        Ok(RouterChoice {
            router,
            _followers: followers,
            tokens_per_block,
        })
    }
}

impl WorkerChoice for RouterChoice {
    fn choose(&self, pool: Pool, urls: &[String], c: &[usize], tokens: &[u32]) -> usize {
        let hashes = nixl_kv::events::seq_hashes(tokens, self.tokens_per_block);
        let names: Vec<&str> = c.iter().map(|&i| urls[i].as_str()).collect();
        let pick = match pool {
            Pool::Prefill => self.router.choose_prefill(&hashes, &names),
            Pool::Decode => self.router.choose_decode(&hashes, &names),
            Pool::Aggregated => self.router.choose(&hashes, &names),
        };
        pick.and_then(|p| c.iter().copied().find(|&i| urls[i] == p.worker))
            .unwrap_or(c[0])
    }

    fn book(&self, url: &str, blocks: u64) -> Option<Box<dyn std::any::Any + Send>> {
        Some(Box::new(self.router.book(url, blocks)))
    }
}

/// The frontend's settings.
#[derive(Clone, Debug)]
pub struct FrontendConfig {
    /// Prefill worker URLs.
    pub prefill: Vec<String>,
    /// Decode worker URLs.
    pub decode: Vec<String>,
    /// Aggregated worker URLs.
    pub aggregated: Vec<String>,
    /// Model name served.
    pub model: String,
    /// Longest sequence of the model (prompt plus completion).
    pub max_seq: u32,
    /// Largest `max_tokens` accepted.
    pub max_tokens: u32,
    /// Tokens per KV block of the workers.
    pub tokens_per_block: u32,
}

#[derive(Debug, Default)]
struct FeMetrics {
    requests: BTreeMap<&'static str, u64>,
    ttft: Histogram,
    itl: Histogram,
    prompt_tokens: u64,
    cached_tokens: u64,
    migrations: u64,
}

/// The frontend's state.
#[derive(Debug)]
pub struct Frontend {
    cfg: FrontendConfig,
    http: Http,
    choice: Box<dyn WorkerChoice>,
    dead: Mutex<HashMap<String, Instant>>,
    meta: Mutex<HashMap<String, PeerInfo>>,
    peered: Mutex<HashSet<(String, String)>>,
    metrics: Mutex<FeMetrics>,
    next: AtomicUsize,
    instance: u64,
}

/// An OpenAI-style error.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }
    fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("service_unavailable"),
        }
    }
    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// The routes of a frontend.
pub fn router(cfg: FrontendConfig, choice: Box<dyn WorkerChoice>) -> Router {
    let fe = Arc::new(Frontend {
        cfg,
        http: Http::default(),
        choice,
        dead: Mutex::new(HashMap::new()),
        meta: Mutex::new(HashMap::new()),
        peered: Mutex::new(HashSet::new()),
        metrics: Mutex::new(FeMetrics::default()),
        next: AtomicUsize::new(0),
        instance: nanos() ^ (std::process::id() as u64) << 32,
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "Unknown path.".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("unknown_url"),
            }
        })
        .with_state(fe)
}

mod drive;
mod parse;
mod respond;
use drive::*;
use parse::*;
use respond::*;

async fn models(State(fe): State<Arc<Frontend>>) -> Response {
    Json(json!({"object": "list", "data": [
        {"id": fe.cfg.model, "object": "model", "created": 0, "owned_by": "nixl-rs"}
    ]}))
    .into_response()
}

async fn health(State(fe): State<Arc<Frontend>>) -> Response {
    let n = |u: &[String]| fe.alive(u).len();
    Json(json!({
        "status": "ok",
        "prefill": n(&fe.cfg.prefill),
        "decode": n(&fe.cfg.decode),
        "aggregated": n(&fe.cfg.aggregated),
    }))
    .into_response()
}

async fn metrics_text(State(fe): State<Arc<Frontend>>) -> Response {
    let mut out = String::new();
    let m = fe.metrics.lock();
    metrics::family(
        &mut out,
        "nixl_serve_frontend_requests_total",
        "Requests by status",
        "status",
        ["ok", "error", "cancelled", "invalid"]
            .map(|k| (k, m.requests.get(k).copied().unwrap_or(0))),
    );
    m.ttft.render(
        &mut out,
        "nixl_serve_time_to_first_token_seconds",
        "Time from request to first token",
    );
    m.itl.render(
        &mut out,
        "nixl_serve_inter_token_latency_seconds",
        "Time between consecutive tokens",
    );
    metrics::single(
        &mut out,
        "nixl_serve_frontend_prompt_tokens_total",
        "counter",
        "Prompt tokens of finished requests",
        m.prompt_tokens as f64,
    );
    metrics::single(
        &mut out,
        "nixl_serve_frontend_cached_tokens_total",
        "counter",
        "Prompt tokens served from a worker's prefix cache",
        m.cached_tokens as f64,
    );
    let rate = if m.prompt_tokens == 0 {
        0.0
    } else {
        m.cached_tokens as f64 / m.prompt_tokens as f64
    };
    metrics::single(
        &mut out,
        "nixl_serve_cache_hit_rate",
        "gauge",
        "Share of prompt tokens served from prefix caches",
        rate,
    );
    metrics::single(
        &mut out,
        "nixl_serve_migrations_total",
        "counter",
        "Request attempts moved to other workers after a failure",
        m.migrations as f64,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
