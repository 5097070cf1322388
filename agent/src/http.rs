//! The HTTP endpoint on `http_listen`: `GET /metrics`, `/healthz`, `/readyz`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use nixl_core::MemKind;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::serve::Daemon;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNS: usize = 64;
/// A request's head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long, whatever it does.
const CONN_LIFETIME: Duration = Duration::from_secs(60);

pub(crate) type Reply = Response<Full<Bytes>>;

pub(crate) fn reply(code: u16, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

pub(crate) fn json_reply(code: u16, v: &Value) -> Reply {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    reply(code, "application/json", body)
}

pub(crate) fn error_reply(code: u16, msg: &str) -> Reply {
    json_reply(code, &json!({ "error": msg }))
}

/// Serves one connection with `handle`, bounded in time.
pub(crate) async fn serve_conn<S, F, Fut>(io: S, handle: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let f = handle(req);
        async move { Ok::<_, Infallible>(f.await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 << 10)
        .serve_connection(TokioIo::new(io), svc);
    match tokio::time::timeout(CONN_LIFETIME, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "http connection ended with an error"),
        Err(_) => tracing::debug!("http connection closed after {CONN_LIFETIME:?}"),
    }
}

/// Accepts connections on `l` until the process ends.
pub(crate) async fn serve(d: Arc<Daemon>, l: tokio::net::TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (s, _) = match l.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let d = Arc::clone(&d);
        tokio::spawn(async move {
            serve_conn(s, move |req| {
                let d = Arc::clone(&d);
                async move { route(&d, &req) }
            })
            .await;
            drop(permit);
        });
    }
}

fn route(d: &Daemon, req: &Request<Incoming>) -> Reply {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error_reply(405, "only GET");
    }
    match req.uri().path() {
        "/metrics" => reply(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(d),
        ),
        "/healthz" => json_reply(200, &health(d)),
        "/readyz" => match d.not_ready() {
            None => json_reply(200, &json!({ "ready": true })),
            Some(why) => json_reply(503, &json!({ "ready": false, "reason": why })),
        },
        p => error_reply(404, &format!("no {p:?} here: /metrics, /healthz, /readyz")),
    }
}

/// The backends, running or unavailable with the reason.
pub(crate) fn backends_json(d: &Daemon) -> Value {
    d.agent
        .backends()
        .iter()
        .map(|b| {
            let state = match &b.unavailable {
                None => "running".to_owned(),
                Some(why) => format!("unavailable: {why}"),
            };
            (b.name.as_str().to_owned(), Value::String(state))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn health(d: &Daemon) -> Value {
    json!({
        "status": if d.draining() { "draining" } else { "serving" },
        "agent": d.agent.name(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": d.started.elapsed().as_secs(),
        "backends": backends_json(d),
    })
}

const KINDS: [MemKind; 5] = [
    MemKind::Dram,
    MemKind::Vram,
    MemKind::Block,
    MemKind::Object,
    MemKind::File,
];

fn kind_label(k: MemKind) -> &'static str {
    match k {
        MemKind::Dram => "dram",
        MemKind::Vram => "vram",
        MemKind::Block => "block",
        MemKind::Object => "object",
        MemKind::File => "file",
    }
}

/// Registered regions and bytes by kind.
pub(crate) fn registered(d: &Daemon) -> ([u64; 5], usize) {
    let md = d.agent.metadata();
    let mut bytes = [0u64; 5];
    for r in &md.regions {
        if let Some(i) = KINDS.iter().position(|k| *k == r.kind) {
            bytes[i] += r.desc.len;
        }
    }
    (bytes, md.regions.len())
}

/// Everything the `metrics` facade holds, plus the per-peer families the daemon renders itself
/// (so that a peer that left takes its series with it).
pub(crate) fn render_metrics(d: &Daemon) -> String {
    let (bytes, _) = registered(d);
    for (k, b) in KINDS.iter().zip(bytes) {
        metrics::gauge!("nixl_agent_registered_bytes", "kind" => kind_label(*k)).set(b as f64);
    }
    if let Some(p) = &d.pool {
        metrics::gauge!("nixl_pool_bytes").set(p.len() as f64);
        metrics::gauge!("nixl_pool_leased_bytes").set(p.used() as f64);
    }
    metrics::gauge!("nixl_agent_in_flight_requests").set(d.jobs.in_flight() as f64);
    d.prom.run_upkeep();
    let mut out = d.prom.render();
    // The canary table is pruned on its next tick; the loaded peers are the truth (a peer whose
    // etcd key went is gone from `/v1/status` and from here at the same moment).
    let loaded = d.agent.peers();
    let mut peers = d.peers.snapshot();
    peers.retain(|name, _| loaded.iter().any(|p| p == name));
    out.push_str("# HELP nixl_peer_up Whether the peer answered its last canary (1) or not (0).\n");
    out.push_str("# TYPE nixl_peer_up gauge\n");
    for (name, h) in &peers {
        if let Some(up) = h.up {
            let _ = writeln!(
                out,
                "nixl_peer_up{{peer=\"{}\"}} {}",
                escape_label(name),
                u8::from(up)
            );
        }
    }
    out
}

/// A label value in the text format: `\`, `"` and newlines escaped.
fn escape_label(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}
