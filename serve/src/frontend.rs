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

/// A parsed generation request.
#[derive(Debug, Clone)]
struct Gen {
    prompt: Vec<u32>,
    max_tokens: u32,
    temperature: f32,
    seed: u64,
    stream: bool,
    include_usage: bool,
    stop: Vec<String>,
    logprobs: bool,
}

fn parse(fe: &Frontend, body: &[u8], chat: bool) -> Result<Gen, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
    })?;
    let Some(o) = v.as_object() else {
        return Err(ApiError::bad(
            "The request body must be a JSON object.",
            None,
        ));
    };
    let model = match o.get("model") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => {
            return Err(ApiError::bad(
                "you must provide a model parameter",
                Some("model"),
            ))
        }
        Some(_) => return Err(ApiError::bad("model must be a string", Some("model"))),
    };
    if model != fe.cfg.model {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        });
    }
    let get = |k: &str| o.get(k).filter(|v| !v.is_null());
    let mut prompt = vec![BOS];
    if chat {
        let Some(Value::Array(msgs)) = get("messages") else {
            return Err(ApiError::bad("messages must be an array", Some("messages")));
        };
        if msgs.is_empty() {
            return Err(ApiError::bad(
                "messages must not be empty",
                Some("messages"),
            ));
        }
        for m in msgs {
            let role = m.get("role").and_then(Value::as_str);
            let Some(role) =
                role.filter(|r| ["system", "developer", "user", "assistant", "tool"].contains(r))
            else {
                return Err(ApiError::bad(
                    "each message needs a role: system, developer, user, assistant or tool",
                    Some("messages"),
                ));
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => s.push_str(t),
                            _ => {
                                return Err(ApiError::bad(
                                    "only text content parts are supported",
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    s
                }
                _ => {
                    return Err(ApiError::bad(
                        "each message needs a string content",
                        Some("messages"),
                    ))
                }
            };
            prompt.extend(format!("{role}: {content}\n").bytes().map(u32::from));
        }
        prompt.extend(b"assistant: ".iter().map(|&b| b as u32));
    } else {
        match get("prompt") {
            Some(Value::String(s)) => prompt.extend(s.bytes().map(u32::from)),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                prompt.extend(a[0].as_str().unwrap_or("").bytes().map(u32::from))
            }
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => {
                prompt.clear();
                for t in a {
                    match t.as_u64() {
                        Some(x) if x <= BOS as u64 + 1 => prompt.push(x as u32),
                        _ => return Err(ApiError::bad("token ids are 0..=257", Some("prompt"))),
                    }
                }
            }
            Some(Value::Array(_)) => {
                return Err(ApiError::bad(
                    "prompt must be a string, a list of one string, or a list of token ids \
                     (batches of prompts are not supported)",
                    Some("prompt"),
                ))
            }
            None => return Err(ApiError::bad("you must provide a prompt", Some("prompt"))),
            Some(_) => return Err(ApiError::bad("prompt must be a string", Some("prompt"))),
        }
    }
    let int = |k: &'static str| -> Result<Option<u64>, ApiError> {
        match get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ApiError::bad(format!("{k} must be a non-negative integer"), Some(k))
            }),
        }
    };
    let max_key = if chat && get("max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = int(max_key)?.unwrap_or(if chat { 128 } else { 16 });
    if max_tokens == 0 || max_tokens > fe.cfg.max_tokens as u64 {
        return Err(ApiError::bad(
            format!("{max_key} must be in 1..={}", fe.cfg.max_tokens),
            Some(if chat && max_key == "max_completion_tokens" {
                "max_completion_tokens"
            } else {
                "max_tokens"
            }),
        ));
    }
    if prompt.len() as u64 + max_tokens > fe.cfg.max_seq as u64 {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's maximum context length is {} tokens. However, you requested {} \
                 tokens ({} in the prompt, {max_tokens} for the completion).",
                fe.cfg.max_seq,
                prompt.len() as u64 + max_tokens,
                prompt.len()
            ),
            kind: "invalid_request_error",
            param: Some("messages"),
            code: Some("context_length_exceeded"),
        });
    }
    let temperature = match get("temperature") {
        None => 1.0,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => t as f32,
            _ => {
                return Err(ApiError::bad(
                    "temperature must be a number in [0, 2]",
                    Some("temperature"),
                ))
            }
        },
    };
    if let Some(v) = get("top_p") {
        if v.as_f64() != Some(1.0) {
            return Err(ApiError::bad(
                "top_p other than 1 is not supported by this server",
                Some("top_p"),
            ));
        }
    }
    if let Some(n) = int("n")? {
        if n != 1 {
            return Err(ApiError::bad("only n = 1 is supported", Some("n")));
        }
    }
    // The chosen tokens' log-probabilities only (no alternatives).
    let logprobs = match (chat, get("logprobs")) {
        (_, None) | (true, Some(Value::Bool(false))) => false,
        (true, Some(Value::Bool(true))) => true,
        (false, Some(v)) if v.as_u64() == Some(0) => true,
        (true, _) => {
            return Err(ApiError::bad(
                "logprobs must be a boolean",
                Some("logprobs"),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::bad(
                "only logprobs = 0 (the chosen tokens' log-probabilities) is supported",
                Some("logprobs"),
            ))
        }
    };
    if int("top_logprobs")?.is_some_and(|n| n > 0) {
        return Err(ApiError::bad(
            "top_logprobs are not supported (only the chosen tokens')",
            Some("top_logprobs"),
        ));
    }
    let seed = match get("seed") {
        None => 0,
        Some(v) => v
            .as_i64()
            .map(|x| x as u64)
            .or_else(|| v.as_u64())
            .ok_or_else(|| ApiError::bad("seed must be an integer", Some("seed")))?,
    };
    let stream = match get("stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("stream must be a boolean", Some("stream"))),
    };
    let include_usage = get("stream_options")
        .and_then(|s| s.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let stop = match get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        Some(_) => {
            return Err(ApiError::bad(
                "stop must be a string or a list of at most 4 strings",
                Some("stop"),
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad(
            "stop strings must not be empty",
            Some("stop"),
        ));
    }
    Ok(Gen {
        prompt,
        max_tokens: max_tokens as u32,
        temperature,
        seed,
        stream,
        include_usage,
        stop,
        logprobs,
    })
}

/// What the driving task tells the answering side.
#[derive(Debug)]
enum Out {
    /// Text, and the log-probability of each of its characters (tokens).
    Text(String, Vec<f32>),
    Done {
        finish: &'static str,
        completion_tokens: usize,
        cached: u32,
    },
    Error(ApiError),
}

/// Why an attempt ended without finishing.
enum Fail {
    /// The client went away (cancels were sent).
    Gone,
    /// A worker failed: try again elsewhere.
    Retry(String),
    /// Give up with this error.
    Fatal(ApiError),
}

/// Collects tokens into text, holding back what may be the start of a stop string.
struct Emitter {
    tx: mpsc::UnboundedSender<Out>,
    stop: Vec<String>,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    text: String,
    sent: usize,
    start: Instant,
    last: Option<Instant>,
    fe: Arc<Frontend>,
}

impl Emitter {
    /// Adds a token and its log-probability; `true` when a stop string ended the text.
    fn push(&mut self, t: u32, lp: f32) -> bool {
        let now = Instant::now();
        {
            let mut m = self.fe.metrics.lock();
            match self.last {
                None => m.ttft.observe((now - self.start).as_secs_f64()),
                Some(l) => m.itl.observe((now - l).as_secs_f64()),
            }
        }
        self.last = Some(now);
        self.tokens.push(t);
        // Every token the model emits is one printable ASCII character (or newline), so
        // text offsets are token indices.
        if t < 128 {
            self.text.push(t as u8 as char);
            self.logprobs.push(lp);
        }
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            self.flush(at);
            return true;
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let hold = self
            .stop
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&k| self.text.ends_with(&s[..k])))
            .max()
            .unwrap_or(0);
        self.flush(self.text.len() - hold);
        false
    }

    fn flush(&mut self, upto: usize) {
        if upto > self.sent {
            let _ = self.tx.send(Out::Text(
                self.text[self.sent..upto].to_owned(),
                self.logprobs[self.sent..upto].to_vec(),
            ));
            self.sent = upto;
        }
    }
}

impl Frontend {
    fn alive(&self, urls: &[String]) -> Vec<usize> {
        let mut dead = self.dead.lock();
        let now = Instant::now();
        dead.retain(|_, t| *t > now);
        (0..urls.len())
            .filter(|&i| !dead.contains_key(&urls[i]))
            .collect()
    }

    fn pick(&self, pool: Pool, tokens: &[u32]) -> Option<String> {
        let urls = match pool {
            Pool::Prefill => &self.cfg.prefill,
            Pool::Decode => &self.cfg.decode,
            Pool::Aggregated => &self.cfg.aggregated,
        };
        let c = self.alive(urls);
        if c.is_empty() {
            return None;
        }
        Some(urls[self.choice.choose(pool, urls, &c, tokens)].clone())
    }

    fn mark_dead(&self, url: &str) {
        self.dead
            .lock()
            .insert(url.to_owned(), Instant::now() + DEAD_FOR);
        self.meta.lock().remove(url);
        self.peered.lock().retain(|(p, d)| p != url && d != url);
    }

    async fn info(&self, url: &str) -> Result<PeerInfo, CallError> {
        if let Some(i) = self.meta.lock().get(url) {
            return Ok(i.clone());
        }
        let b = self
            .http
            .call(None, &format!("{url}/kv/meta"), Duration::from_secs(5))
            .await?;
        let i: PeerInfo = serde_json::from_slice(&b)
            .map_err(|e| CallError::Status(502, format!("{url}/kv/meta: {e}")))?;
        self.meta.lock().insert(url.to_owned(), i.clone());
        Ok(i)
    }

    /// Makes `p` and `d` know each other's agents (once per pair).
    async fn peer(&self, p: &str, d: &str) -> Result<PeerInfo, (String, CallError)> {
        let di = self.info(d).await.map_err(|e| (d.to_owned(), e))?;
        if self.peered.lock().contains(&(p.to_owned(), d.to_owned())) {
            return Ok(di);
        }
        let pi = self.info(p).await.map_err(|e| (p.to_owned(), e))?;
        let t = Duration::from_secs(5);
        let pv = serde_json::to_value(&pi).unwrap_or_default();
        let dv = serde_json::to_value(&di).unwrap_or_default();
        self.http
            .call(Some(&pv), &format!("{d}/kv/peer"), t)
            .await
            .map_err(|e| (d.to_owned(), e))?;
        self.http
            .call(Some(&dv), &format!("{p}/kv/peer"), t)
            .await
            .map_err(|e| (p.to_owned(), e))?;
        self.peered.lock().insert((p.to_owned(), d.to_owned()));
        Ok(di)
    }

    fn cancel(self: &Arc<Self>, urls: Vec<String>, id: String) {
        let fe = Arc::clone(self);
        tokio::spawn(async move {
            for u in urls {
                let _ = fe
                    .http
                    .call(
                        Some(&json!({"id": id})),
                        &format!("{u}/cancel"),
                        Duration::from_secs(2),
                    )
                    .await;
            }
        });
    }

    fn fail(&self, url: &str, e: &CallError) -> Fail {
        if matches!(e, CallError::Unreachable(_)) {
            self.mark_dead(url);
        }
        Fail::Retry(format!("{e}"))
    }
}

const STREAM_GAP: Duration = Duration::from_secs(30);
const PREFILL_TIMEOUT: Duration = Duration::from_secs(60);

/// One attempt on one set of workers.
async fn attempt(
    fe: &Arc<Frontend>,
    g: &Gen,
    id: &str,
    em: &mut Emitter,
    cached: &mut u32,
) -> Result<&'static str, Fail> {
    let mut tokens = g.prompt.clone();
    tokens.extend(&em.tokens);
    let remaining = g.max_tokens - em.tokens.len() as u32;
    let blocks = (tokens.len() + remaining as usize)
        .div_ceil(fe.cfg.tokens_per_block.max(1) as usize) as u64;
    let closed = em.tx.clone();
    if !fe.cfg.aggregated.is_empty() {
        let Some(a) = fe.pick(Pool::Aggregated, &tokens) else {
            return Err(Fail::Fatal(ApiError::unavailable(
                "no aggregated worker is available",
            )));
        };
        let _booked = fe.choice.book(&a, blocks);
        let body = json!({"id": id, "tokens": tokens, "max_tokens": remaining,
                          "temperature": g.temperature, "seed": g.seed});
        let url = format!("{a}/generate");
        let mut lines = tokio::select! {
            r = fe.http.stream(&url, &body, PREFILL_TIMEOUT) => r.map_err(|e| fe.fail(&a, &e))?,
            _ = closed.closed() => { fe.cancel(vec![a], id.into()); return Err(Fail::Gone) }
        };
        return follow(fe, &a, id, &mut lines, em, cached, true).await;
    }
    let Some(p) = fe.pick(Pool::Prefill, &tokens) else {
        return Err(Fail::Fatal(ApiError::unavailable(
            "no prefill worker is available",
        )));
    };
    let d = if remaining > 1 {
        match fe.pick(Pool::Decode, &tokens) {
            Some(d) => Some(d),
            None => {
                return Err(Fail::Fatal(ApiError::unavailable(
                    "no decode worker is available",
                )))
            }
        }
    } else {
        None
    };
    let _booked = (
        fe.choice.book(&p, blocks),
        d.as_ref().map(|d| fe.choice.book(d, blocks)),
    );
    let mut agents = Vec::new();
    if let Some(d) = &d {
        let di = fe.peer(&p, d).await.map_err(|(u, e)| fe.fail(&u, &e))?;
        agents = di.agents.iter().map(|a| a.name.clone()).collect();
    }
    let body = json!({"id": id, "tokens": tokens, "decode_agents": agents,
                      "temperature": g.temperature, "seed": g.seed});
    let everyone: Vec<String> = std::iter::once(p.clone()).chain(d.clone()).collect();
    let purl = format!("{p}/prefill");
    let r = tokio::select! {
        r = fe.http.call(Some(&body), &purl, PREFILL_TIMEOUT) => r,
        _ = closed.closed() => { fe.cancel(everyone, id.into()); return Err(Fail::Gone) }
    };
    let po: PrefillOut = match r {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| Fail::Retry(format!("{p}/prefill answered: {e}")))?,
        Err(e) => {
            fe.cancel(everyone, id.into());
            return Err(fe.fail(&p, &e));
        }
    };
    *cached = po.cached_tokens;
    if em.push(po.first_token, po.first_logprob) {
        fe.cancel(everyone, id.into());
        return Ok("stop");
    }
    let Some(d) = d else {
        return Ok("length");
    };
    let body = json!({"id": id, "tokens": tokens, "max_tokens": remaining - 1,
                      "first_token": po.first_token, "prefill_agent": po.agent,
                      "temperature": g.temperature, "seed": g.seed});
    let url = format!("{d}/generate");
    let mut lines = tokio::select! {
        r = fe.http.stream(&url, &body, PREFILL_TIMEOUT) => match r {
            Ok(l) => l,
            Err(e) => { fe.cancel(everyone, id.into()); return Err(fe.fail(&d, &e)) }
        },
        _ = closed.closed() => { fe.cancel(everyone, id.into()); return Err(Fail::Gone) }
    };
    let r = follow(fe, &d, id, &mut lines, em, cached, false).await;
    if r.is_err() {
        // The prefill worker may still hold the offer.
        fe.cancel(vec![p], id.into());
    }
    r
}

/// Reads a worker's token stream into the emitter.
async fn follow(
    fe: &Arc<Frontend>,
    url: &str,
    id: &str,
    lines: &mut crate::client::Lines,
    em: &mut Emitter,
    cached: &mut u32,
    aggregated: bool,
) -> Result<&'static str, Fail> {
    let closed = em.tx.clone();
    loop {
        let line = tokio::select! {
            l = lines.next(STREAM_GAP) => l,
            _ = closed.closed() => { fe.cancel(vec![url.to_owned()], id.into()); return Err(Fail::Gone) }
        };
        let line = match line {
            Ok(Some(l)) => l,
            Ok(None) => {
                fe.mark_dead(url);
                return Err(Fail::Retry(format!("{url}: the token stream ended early")));
            }
            Err(e) => {
                fe.cancel(vec![url.to_owned()], id.into());
                return Err(fe.fail(url, &e));
            }
        };
        match crate::worker::parse_line(&line) {
            Ok(Ev::Prefilled { cached_tokens }) if aggregated => *cached = cached_tokens,
            Ok(Ev::Prefilled { .. }) => {}
            Ok(Ev::Token(t, lp)) => {
                if em.push(t, lp) {
                    fe.cancel(vec![url.to_owned()], id.into());
                    return Ok("stop");
                }
            }
            Ok(Ev::Done(_)) => return Ok("length"),
            Ok(Ev::Error(e)) => return Err(Fail::Retry(format!("{url}: {e}"))),
            Err(e) => {
                fe.cancel(vec![url.to_owned()], id.into());
                return Err(Fail::Retry(e));
            }
        }
    }
}

/// Drives a request to its end, migrating it when a worker fails.
async fn drive(fe: Arc<Frontend>, g: Gen, tx: mpsc::UnboundedSender<Out>) {
    let base = format!(
        "{:x}-{}",
        fe.instance,
        fe.next.fetch_add(1, Ordering::Relaxed)
    );
    let mut em = Emitter {
        tx: tx.clone(),
        stop: g.stop.clone(),
        tokens: Vec::new(),
        logprobs: Vec::new(),
        text: String::new(),
        sent: 0,
        start: Instant::now(),
        last: None,
        fe: Arc::clone(&fe),
    };
    let mut cached = 0u32;
    let mut first_cached = None;
    let mut last_err = String::new();
    let status;
    let mut attempts = 0;
    loop {
        if attempts == MAX_ATTEMPTS {
            let _ = tx.send(Out::Error(ApiError::unavailable(format!(
                "the request failed on {MAX_ATTEMPTS} workers; last: {last_err}"
            ))));
            status = "error";
            break;
        }
        if attempts > 0 {
            fe.metrics.lock().migrations += 1;
        }
        let id = format!("{base}-{attempts}");
        attempts += 1;
        let r = attempt(&fe, &g, &id, &mut em, &mut cached).await;
        if first_cached.is_none() && !em.tokens.is_empty() {
            first_cached = Some(cached);
        }
        match r {
            Ok(finish) => {
                if finish == "length" {
                    let n = em.text.len();
                    em.flush(n);
                }
                let _ = tx.send(Out::Done {
                    finish,
                    completion_tokens: em.tokens.len(),
                    cached: first_cached.unwrap_or(cached),
                });
                status = "ok";
                break;
            }
            Err(Fail::Gone) => {
                status = "cancelled";
                break;
            }
            Err(Fail::Fatal(e)) => {
                let _ = tx.send(Out::Error(e));
                status = "error";
                break;
            }
            Err(Fail::Retry(why)) => {
                last_err = why;
                if em.tokens.len() as u32 >= g.max_tokens {
                    let _ = tx.send(Out::Done {
                        finish: "length",
                        completion_tokens: em.tokens.len(),
                        cached: first_cached.unwrap_or(cached),
                    });
                    status = "ok";
                    break;
                }
                // A short pause before trying elsewhere (a dying worker's peers settle).
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut m = fe.metrics.lock();
    *m.requests.entry(status).or_default() += 1;
    m.prompt_tokens += g.prompt.len() as u64;
    m.cached_tokens += first_cached.unwrap_or(0) as u64;
}

fn nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn completions(State(fe): State<Arc<Frontend>>, body: Bytes) -> Response {
    serve(fe, &body, false).await
}

async fn chat(State(fe): State<Arc<Frontend>>, body: Bytes) -> Response {
    serve(fe, &body, true).await
}

async fn serve(fe: Arc<Frontend>, body: &[u8], chat: bool) -> Response {
    let g = match parse(&fe, body, chat) {
        Ok(g) => g,
        Err(e) => {
            *fe.metrics.lock().requests.entry("invalid").or_default() += 1;
            return e.into_response();
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(drive(Arc::clone(&fe), g.clone(), tx));
    let id = format!(
        "{}-{:x}{:x}",
        if chat { "chatcmpl" } else { "cmpl" },
        fe.instance,
        nanos()
    );
    let created = now_s();
    let model = fe.cfg.model.clone();
    let prompt_tokens = g.prompt.len();
    let usage = move |n: usize, cached: u32| {
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": n,
               "total_tokens": prompt_tokens + n,
               "prompt_tokens_details": {"cached_tokens": cached}})
    };
    let want_lp = g.logprobs;
    // OpenAI's logprobs object for `text` (its characters are its tokens) starting at `offset`.
    let lp_json = move |text: &str, lps: &[f32], offset: usize| -> Value {
        if !want_lp {
            return Value::Null;
        }
        let toks: Vec<String> = text.chars().map(String::from).collect();
        if chat {
            let content: Vec<Value> = toks
                .iter()
                .zip(lps)
                .map(|(t, lp)| {
                    json!({"token": t, "logprob": lp, "bytes": t.as_bytes(), "top_logprobs": []})
                })
                .collect();
            json!({"content": content})
        } else {
            json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": null,
                   "text_offset": (offset..offset + toks.len()).collect::<Vec<_>>()})
        }
    };
    if !g.stream {
        let mut text = String::new();
        let mut lps = Vec::new();
        loop {
            match rx.recv().await {
                Some(Out::Text(t, l)) => {
                    text.push_str(&t);
                    lps.extend(l);
                }
                Some(Out::Done {
                    finish,
                    completion_tokens,
                    cached,
                }) => {
                    let lp = lp_json(&text, &lps, 0);
                    let choice = if chat {
                        json!({"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": finish, "logprobs": lp})
                    } else {
                        json!({"index": 0, "text": text, "finish_reason": finish,
                               "logprobs": lp})
                    };
                    return Json(json!({
                        "id": id,
                        "object": if chat { "chat.completion" } else { "text_completion" },
                        "created": created,
                        "model": model,
                        "choices": [choice],
                        "usage": usage(completion_tokens, cached),
                    }))
                    .into_response();
                }
                Some(Out::Error(e)) => return e.into_response(),
                None => {
                    return ApiError::unavailable("the request ended without an answer")
                        .into_response()
                }
            }
        }
    }
    let include_usage = g.include_usage;
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choice: Value| {
        json!({"id": id, "object": object, "created": created, "model": model,
               "choices": [choice]})
    };
    let sse = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
    // (channel, first chunk pending, finished, characters sent)
    let state = (rx, chat, false, 0usize);
    let stream = futures_util::stream::unfold(state, move |(mut rx, mut first, done, sent)| {
        let chunk = chunk.clone();
        async move {
            if done {
                return None;
            }
            if first {
                first = false;
                let c = chunk(
                    json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": null, "logprobs": null}),
                );
                return Some((
                    Ok::<_, std::convert::Infallible>(sse(&c)),
                    (rx, first, false, sent),
                ));
            }
            match rx.recv().await {
                Some(Out::Text(t, l)) => {
                    let lp = lp_json(&t, &l, sent);
                    let n = t.len();
                    let c = if chat {
                        chunk(json!({"index": 0, "delta": {"content": t},
                                     "finish_reason": null, "logprobs": lp}))
                    } else {
                        chunk(json!({"index": 0, "text": t, "finish_reason": null,
                                     "logprobs": lp}))
                    };
                    Some((Ok(sse(&c)), (rx, first, false, sent + n)))
                }
                Some(Out::Done {
                    finish,
                    completion_tokens,
                    cached,
                }) => {
                    let c = if chat {
                        chunk(json!({"index": 0, "delta": {}, "finish_reason": finish,
                                     "logprobs": null}))
                    } else {
                        chunk(json!({"index": 0, "text": "", "finish_reason": finish,
                                     "logprobs": null}))
                    };
                    let mut out = format!("data: {c}\n\n");
                    if include_usage {
                        let mut u = chunk(Value::Null);
                        u["choices"] = json!([]);
                        u["usage"] = usage(completion_tokens, cached);
                        out.push_str(&format!("data: {u}\n\n"));
                    }
                    out.push_str("data: [DONE]\n\n");
                    Some((Ok(Bytes::from(out)), (rx, first, true, sent)))
                }
                Some(Out::Error(e)) => {
                    let out = format!("data: {}\n\n", e.body());
                    Some((Ok(Bytes::from(out)), (rx, first, true, sent)))
                }
                None => None,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| ApiError::unavailable("response").into_response())
}

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
