//! A worker process: the engine thread behind an internal HTTP API that the frontend (and the
//! router) call.
//!
//! | method, path | body / answer |
//! |---|---|
//! | `POST /generate` | [`GenReq`] → newline-delimited JSON [`Ev`]s (`{"token":N}`, ..., `{"done":"length"}` or `{"error":..}`) |
//! | `POST /prefill` | [`PrefillReq`] → [`PrefillOut`](crate::engine::PrefillOut) (prefill role) |
//! | `POST /cancel` | `{"id": ..}` → 200 |
//! | `GET /kv/meta`, `POST /kv/peer` | [`PeerInfo`]: agents, metadata, layouts |
//! | `GET /kv/events?since=N` | 200 `{"worker", "events": [KvEvent..]}` or 410 `{"oldest": N}` |
//! | `GET /kv/blocks` | `{"worker", "last_id", "blocks": [StoredBlock..]}` |
//! | `GET /load` | `{"active_requests", "active_blocks", "total_blocks"}` |
//! | `GET /health`, `GET /metrics` | status; Prometheus text |
//!
//! A `/generate` stream that its reader drops cancels the request (blocks released).

use std::sync::mpsc::Sender;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Cmd, Ev, GenReq, PeerInfo, PrefillReq, Shared};
use crate::metrics;
use nixl_router::wire;

#[derive(Clone, Debug)]
struct W {
    tx: Sender<Cmd>,
    shared: Arc<Shared>,
}

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

fn parse<T: for<'de> Deserialize<'de>>(b: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(b)
        .map_err(|e| Box::new(err(StatusCode::BAD_REQUEST, format!("body: {e}"))))
}

/// The worker's HTTP routes over a running engine.
pub fn router(tx: Sender<Cmd>, shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/generate", post(generate))
        .route("/prefill", post(prefill))
        .route("/cancel", post(cancel))
        .route("/kv/meta", get(meta))
        .route("/kv/peer", post(peer))
        .route("/kv/events", get(events))
        .route("/kv/blocks", get(blocks))
        .route("/load", get(load))
        .route("/metrics", get(metrics_text))
        .with_state(W { tx, shared })
}

async fn health(State(w): State<W>) -> Response {
    Json(json!({"status": "ok", "worker": w.shared.info.worker, "role": w.shared.info.role}))
        .into_response()
}

async fn generate(State(w): State<W>, body: Bytes) -> Response {
    let g: GenReq = match parse(&body) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let first = g.first_token.iter().copied();
    if let Err(e) = check(
        &w.shared,
        &g.id,
        &g.tokens,
        first,
        g.max_tokens,
        g.temperature,
    ) {
        return err(StatusCode::BAD_REQUEST, e);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    if w.tx.send(Cmd::Generate(g, tx)).is_err() {
        return err(StatusCode::SERVICE_UNAVAILABLE, "engine stopped");
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| err(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

/// Bounds of a request from the frontend (it is a peer: checked, never trusted).
fn check(
    sh: &Shared,
    id: &str,
    tokens: &[u32],
    first: impl IntoIterator<Item = u32>,
    max_tokens: u32,
    temperature: f32,
) -> Result<(), String> {
    if id.is_empty() || id.len() > nixl_kv::handoff::MAX_REQUEST_ID {
        return Err(format!(
            "id of 1..={} bytes",
            nixl_kv::handoff::MAX_REQUEST_ID
        ));
    }
    if tokens.is_empty() {
        return Err("no tokens".into());
    }
    let first: Vec<u32> = first.into_iter().collect();
    if let Some(t) = tokens
        .iter()
        .chain(&first)
        .copied()
        .find(|&t| t >= sh.vocab)
    {
        return Err(format!(
            "token {t} is not below the vocabulary size {}",
            sh.vocab
        ));
    }
    // The sequence at its end: the tokens, a decode worker's first token, the new ones.
    if tokens.len() as u64 + first.len() as u64 + max_tokens as u64 > sh.max_seq as u64 {
        return Err(format!(
            "{} tokens and {max_tokens} more exceed the context of {}",
            tokens.len(),
            sh.max_seq
        ));
    }
    if !(0.0..=100.0).contains(&temperature) {
        return Err("temperature out of range".into());
    }
    Ok(())
}

async fn prefill(State(w): State<W>, body: Bytes) -> Response {
    let p: PrefillReq = match parse(&body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    if let Err(e) = check(&w.shared, &p.id, &p.tokens, None, 0, p.temperature) {
        return err(StatusCode::BAD_REQUEST, e);
    }
    if p.decode_agents.len() > 256 {
        return err(StatusCode::BAD_REQUEST, "at most 256 decode agents");
    }
    let (tx, rx) = oneshot::channel();
    if w.tx.send(Cmd::Prefill(p, tx)).is_err() {
        return err(StatusCode::SERVICE_UNAVAILABLE, "engine stopped");
    }
    match rx.await {
        Ok(Ok(out)) => Json(out).into_response(),
        Ok(Err(e)) => err(StatusCode::UNPROCESSABLE_ENTITY, e),
        Err(_) => err(StatusCode::SERVICE_UNAVAILABLE, "engine stopped"),
    }
}

#[derive(Deserialize)]
struct Id {
    id: String,
}

async fn cancel(State(w): State<W>, body: Bytes) -> Response {
    match parse::<Id>(&body) {
        Ok(i) => {
            let _ = w.tx.send(Cmd::Cancel(i.id));
            Json(json!({})).into_response()
        }
        Err(r) => *r,
    }
}

async fn meta(State(w): State<W>) -> Response {
    Json(w.shared.info.clone()).into_response()
}

async fn peer(State(w): State<W>, body: Bytes) -> Response {
    let p: PeerInfo = match parse(&body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let (tx, rx) = oneshot::channel();
    if w.tx.send(Cmd::Peer(p, tx)).is_err() {
        return err(StatusCode::SERVICE_UNAVAILABLE, "engine stopped");
    }
    match rx.await {
        Ok(Ok(())) => Json(json!({})).into_response(),
        Ok(Err(e)) => err(StatusCode::UNPROCESSABLE_ENTITY, e),
        Err(_) => err(StatusCode::SERVICE_UNAVAILABLE, "engine stopped"),
    }
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
}

async fn events(
    State(w): State<W>,
    q: Result<Query<Since>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return err(StatusCode::BAD_REQUEST, "since must be an unsigned integer");
    };
    let log = w.shared.log.lock();
    match wire::events_response(
        &w.shared.info.worker,
        &log,
        q.since,
        Some(w.shared.instance),
    ) {
        Ok(ev) => Json(ev).into_response(),
        Err(gap) => (StatusCode::GONE, Json(gap)).into_response(),
    }
}

async fn blocks(State(w): State<W>) -> Response {
    let log = w.shared.log.lock();
    Json(wire::blocks_response(
        &w.shared.info.worker,
        &log,
        Some(w.shared.instance),
    ))
    .into_response()
}

async fn load(State(w): State<W>) -> Response {
    let s = w.shared.stats.lock();
    Json(wire::WorkerLoad {
        active_requests: s.active_requests as u64,
        active_blocks: s.blocks_used as u64,
        total_blocks: s.blocks_total as u64,
    })
    .into_response()
}

async fn metrics_text(State(w): State<W>) -> Response {
    let mut out = String::new();
    {
        let s = w.shared.stats.lock();
        metrics::single(
            &mut out,
            "nixl_serve_kv_blocks_used",
            "gauge",
            "KV blocks in use",
            s.blocks_used as f64,
        );
        metrics::single(
            &mut out,
            "nixl_serve_kv_blocks_total",
            "gauge",
            "KV blocks of this worker",
            s.blocks_total as f64,
        );
        metrics::single(
            &mut out,
            "nixl_serve_active_requests",
            "gauge",
            "Requests running or holding blocks",
            s.active_requests as f64,
        );
        metrics::family(
            &mut out,
            "nixl_serve_requests_total",
            "Requests finished, by status",
            "status",
            ["ok", "cancelled", "error"].map(|k| (k, s.requests.get(k).copied().unwrap_or(0))),
        );
        metrics::family(
            &mut out,
            "nixl_serve_handoffs_total",
            "KV handoffs ended, by outcome",
            "outcome",
            ["done", "failed", "cancelled"].map(|k| (k, s.handoffs.get(k).copied().unwrap_or(0))),
        );
        s.handoff_seconds.render(
            &mut out,
            "nixl_serve_handoff_seconds",
            "KV handoff time (prefill: offer to done; decode: pull to landed)",
        );
        metrics::single(
            &mut out,
            "nixl_serve_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled",
            s.prompt_tokens as f64,
        );
        metrics::single(
            &mut out,
            "nixl_serve_cached_tokens_total",
            "counter",
            "Prompt tokens reused from the prefix cache",
            s.cached_tokens as f64,
        );
        metrics::single(
            &mut out,
            "nixl_serve_generated_tokens_total",
            "counter",
            "Tokens generated",
            s.generated_tokens as f64,
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Converts an engine event for tests and the frontend.
pub fn parse_line(line: &[u8]) -> Result<Ev, String> {
    serde_json::from_slice(line).map_err(|e| format!("worker stream: {e}"))
}
