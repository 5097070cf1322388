//! `nixl-loadgen`: an open-loop load generator for an OpenAI-compatible server.
//!
//! Requests arrive as a Poisson process (`--rate` per second, exponential gaps drawn from
//! `--seed`, so the same seed gives the same arrivals and prompts) and are sent as
//! `POST {url}/v1/completions` with `stream: true`, `temperature: 0`; the server-sent events
//! are read as they come. Each request's time to first token (from its scheduled arrival, so
//! client-side queueing counts) and the gaps between its later chunks (inter-token latency)
//! are recorded; the run prints p50/p99 of both, throughput (tokens/s, requests/s) and errors
//! (a failed status, a broken or unfinished stream, an `error` event, a timeout).
//!
//! Workloads (`--workload`):
//! - `shared`: `--prompts` long system prompts (`--prefix-tokens` each) shared by all requests,
//!   each followed by a request-unique question (`--suffix-tokens`): what a KV-aware router
//!   can exploit;
//! - `unique`: every prompt different, of the same total length.
//!
//! Prompts are ASCII text, one byte per token for a byte-level model. `--json` prints one JSON
//! object instead of the table.
//!
//! `--memcpy-bytes N` sends nothing: it times memcpy of N bytes in `--memcpy-chunk` pieces
//! taken from every other slot of a source twice as large (scattered like KV blocks), one
//! core, median of 51 runs, the peer of a KV handoff of N bytes (`scripts/serve-bench.sh`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "nixl-loadgen",
    about = "Poisson load against /v1/completions (streaming)"
)]
struct Args {
    /// Base URL of the server (e.g. http://127.0.0.1:8000).
    #[arg(long)]
    url: String,
    /// Mean arrivals per second.
    #[arg(long, default_value_t = 4.0)]
    rate: f64,
    /// Requests to send.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// `shared` (a few long system prompts) or `unique`.
    #[arg(long, default_value = "shared")]
    workload: String,
    /// Distinct system prompts of the shared workload.
    #[arg(long, default_value_t = 4)]
    prompts: usize,
    /// Tokens of each system prompt.
    #[arg(long, default_value_t = 512)]
    prefix_tokens: usize,
    /// Tokens of the request-unique part.
    #[arg(long, default_value_t = 32)]
    suffix_tokens: usize,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Model name sent.
    #[arg(long, default_value = "nixl-ref")]
    model: String,
    /// Seed of arrivals and prompts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Timeout of one request, seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Time memcpy of this many bytes instead of sending load.
    #[arg(long)]
    memcpy_bytes: Option<usize>,
    /// Piece size of --memcpy-bytes.
    #[arg(long, default_value_t = 4096)]
    memcpy_chunk: usize,
}

/// Median seconds of copying `bytes` in `chunk` pieces from every other slot of a source.
fn memcpy_median(bytes: usize, chunk: usize) -> f64 {
    let chunk = chunk.max(1);
    let n = bytes.div_ceil(chunk);
    let src: Vec<u8> = (0..2 * n * chunk).map(|i| i as u8).collect();
    let mut dst = vec![0u8; n * chunk];
    let mut times = Vec::with_capacity(51);
    for rep in 0..56 {
        let t = Instant::now();
        for i in 0..n {
            dst[i * chunk..(i + 1) * chunk]
                .copy_from_slice(&src[2 * i * chunk..(2 * i + 1) * chunk]);
        }
        std::hint::black_box(&mut dst);
        if rep >= 5 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    if n > 0 {
        assert_eq!(dst[chunk - 1], src[chunk - 1]);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Seeded, the same everywhere ([`nixl_router::splitmix64`]).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        nixl_router::splitmix64(&mut self.0)
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

const WORDS: &[&str] = &[
    "the", "cache", "block", "token", "router", "prefill", "decode", "worker", "memory", "layer",
    "head", "value", "key", "stream", "model", "batch", "queue", "lease", "page", "tensor",
];

fn text(rng: &mut Rng, len: usize) -> String {
    let mut s = String::with_capacity(len + 8);
    while s.len() < len {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[(rng.next() % WORDS.len() as u64) as usize]);
    }
    s.truncate(len);
    s
}

/// One planned request: when (seconds after start) and what.
struct Planned {
    at: f64,
    prompt: String,
}

fn plan(a: &Args) -> Result<Vec<Planned>, String> {
    if !(a.rate.is_finite() && a.rate > 0.0) {
        return Err(format!("--rate {} must be a positive number", a.rate));
    }
    let mut rng = Rng(a.seed);
    let systems: Vec<String> = (0..a.prompts.max(1))
        .map(|_| text(&mut rng, a.prefix_tokens))
        .collect();
    let mut t = 0.0;
    let mut out = Vec::with_capacity(a.requests);
    for i in 0..a.requests {
        t += -rng.unit().ln() / a.rate;
        let prompt = match a.workload.as_str() {
            "shared" => {
                let s = &systems[(rng.next() % systems.len() as u64) as usize];
                format!("{s}\nQ{i}: {}", text(&mut rng, a.suffix_tokens))
            }
            "unique" => format!(
                "Q{i}: {}",
                text(&mut rng, a.prefix_tokens + 1 + a.suffix_tokens)
            ),
            w => return Err(format!("unknown --workload {w:?} (shared, unique)")),
        };
        out.push(Planned { at: t, prompt });
    }
    Ok(out)
}

#[derive(Debug, Default)]
struct Outcome {
    ttft: Option<f64>,
    itl: Vec<f64>,
    tokens: usize,
    error: Option<String>,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn one(client: &HttpClient, a: &Args, prompt: String, start: Instant) -> Outcome {
    let mut out = Outcome::default();
    let body = json!({
        "model": a.model,
        "prompt": prompt,
        "max_tokens": a.max_tokens,
        "temperature": 0,
        "stream": true,
    });
    let url = format!("{}/v1/completions", a.url.trim_end_matches('/'));
    let req = match Request::post(&url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
    {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!("request: {e}"));
            return out;
        }
    };
    let run = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("connect/send: {e}"))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            let text = body
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(format!(
                "status {status}: {}",
                text.chars().take(200).collect::<String>()
            ));
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut last: Option<Instant> = None;
        let mut chunks = 0usize;
        let mut usage_tokens: Option<usize> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("stream: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let now = Instant::now();
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\r', '\n']);
                let Some(payload) = line.strip_prefix("data:") else {
                    continue;
                };
                let payload = payload.trim_start();
                if payload == "[DONE]" {
                    out.tokens = usage_tokens.unwrap_or(chunks);
                    return Ok(());
                }
                let v: Value = serde_json::from_str(payload)
                    .map_err(|e| format!("bad event {payload:?}: {e}"))?;
                if let Some(err) = v.get("error") {
                    return Err(format!("error event: {err}"));
                }
                if let Some(n) = v
                    .pointer("/usage/completion_tokens")
                    .and_then(Value::as_u64)
                {
                    usage_tokens = Some(n as usize);
                }
                let text = v
                    .pointer("/choices/0/text")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if text.is_empty() {
                    continue;
                }
                chunks += 1;
                match last {
                    None => out.ttft = Some(now.duration_since(start).as_secs_f64()),
                    Some(l) => out.itl.push(now.duration_since(l).as_secs_f64()),
                }
                last = Some(now);
            }
        }
        Err("stream ended without [DONE]".to_string())
    };
    match tokio::time::timeout(Duration::from_secs_f64(a.timeout), run).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => out.error = Some(e),
        Err(_) => out.error = Some(format!("no end in {} s", a.timeout)),
    }
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1e5).round() / 1e2)
    } else {
        Value::Null
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = Args::parse();
    if let Some(bytes) = a.memcpy_bytes {
        let t = memcpy_median(bytes, a.memcpy_chunk);
        println!(
            "{}",
            json!({"memcpy_bytes": bytes, "memcpy_chunk": a.memcpy_chunk, "median_ms": t * 1e3,
                   "gb_per_s": bytes as f64 / t / 1e9})
        );
        return;
    }
    let planned = match plan(&a) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nixl-loadgen: {e}");
            std::process::exit(2);
        }
    };
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(5)));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(conn);
    let args = Arc::new(a.clone());
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(planned.len());
    for p in planned {
        let at = t0 + Duration::from_secs_f64(p.at);
        tokio::time::sleep_until(at.into()).await;
        let client = client.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            one(&client, &args, p.prompt, at).await
        }));
    }
    let mut outs = Vec::with_capacity(tasks.len());
    for t in tasks {
        outs.push(t.await.unwrap_or_else(|e| Outcome {
            error: Some(format!("task: {e}")),
            ..Outcome::default()
        }));
    }
    let wall = t0.elapsed().as_secs_f64();
    let mut ttft: Vec<f64> = outs.iter().filter_map(|o| o.ttft).collect();
    let mut itl: Vec<f64> = outs.iter().flat_map(|o| o.itl.iter().copied()).collect();
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    let errors: Vec<&String> = outs.iter().filter_map(|o| o.error.as_ref()).collect();
    let ok = outs.len() - errors.len();
    let tokens: usize = outs
        .iter()
        .filter(|o| o.error.is_none())
        .map(|o| o.tokens)
        .sum();
    let mut samples: Vec<&String> = errors.clone();
    samples.sort();
    samples.dedup();
    samples.truncate(5);
    let report = json!({
        "url": a.url,
        "workload": a.workload,
        "rate": a.rate,
        "seed": a.seed,
        "requests": outs.len(),
        "ok": ok,
        "errors": errors.len(),
        "error_samples": samples,
        "duration_s": (wall * 1e3).round() / 1e3,
        "requests_per_s": (ok as f64 / wall * 1e3).round() / 1e3,
        "tokens": tokens,
        "tokens_per_s": (tokens as f64 / wall * 10.0).round() / 10.0,
        "ttft_ms": { "p50": ms(pct(&ttft, 50.0)), "p99": ms(pct(&ttft, 99.0)) },
        "itl_ms": { "p50": ms(pct(&itl, 50.0)), "p99": ms(pct(&itl, 99.0)) },
        "prompt_tokens": a.prefix_tokens + a.suffix_tokens,
        "max_tokens": a.max_tokens,
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "nixl-loadgen {} workload={} rate={}/s seed={} requests={} ok={} errors={}",
            a.url,
            a.workload,
            a.rate,
            a.seed,
            outs.len(),
            ok,
            errors.len()
        );
        println!(
            "  TTFT ms p50 {} p99 {} | ITL ms p50 {} p99 {}",
            report["ttft_ms"]["p50"],
            report["ttft_ms"]["p99"],
            report["itl_ms"]["p50"],
            report["itl_ms"]["p99"]
        );
        println!(
            "  throughput {} tokens/s, {} requests/s over {} s",
            report["tokens_per_s"], report["requests_per_s"], report["duration_s"]
        );
        for e in &samples {
            println!("  error: {e}");
        }
    }
    if ok == 0 && !outs.is_empty() {
        std::process::exit(1);
    }
}
