//! The engine of a worker: one thread that owns the model, the rank agents and their KV
//! regions, the block allocator, the requests, and the handoff sides; the HTTP side talks to
//! it through [`Cmd`]s.
//!
//! Roles:
//! - `aggregated`: prefill (with prefix reuse) then decode, in this worker.
//! - `prefill`: prefill (with prefix reuse), answer the first token, and offer the request's
//!   blocks to the decode worker's rank agents ([`nixl_kv::handoff::PrefillSide::offer`], pull
//!   handoff under a lease); the blocks are released when every decode rank's READ is done (or
//!   the handoff ended otherwise).
//! - `decode`: wait for the offers of a request (one per own rank), pull them into freshly
//!   allocated blocks ([`nixl_kv::handoff::DecodeSide::pull`]), then decode.
//!
//! Under KV pressure work waits rather than fails: queued prefills wait (up to 30 s) for
//! blocks other requests hold; a decode admission waits (within half the lease) until its
//! blocks plus one block of headroom per running request are free; a running request that
//! finds no block waits too, and one is preempted (ends with an error, so its frontend
//! prefills it again elsewhere) only when none can step.
//!
//! Every request ends in one terminal status (`ok`, `cancelled`, `error`) and releases its
//! blocks. A request whose token stream is no longer read (the client went away) is cancelled
//! at its next step.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::Agent;
use nixl_kv::events::{seq_hashes, KvEventLog};
use nixl_kv::handoff::{DecodeEvent, DecodeSide, Offer, Outcome, PrefillSide};
use nixl_kv::{KvKind, KvLayout, Order};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc::UnboundedSender, oneshot};

use crate::cache::{Blocks, KvRegion, Paged};
use crate::metrics::Histogram;
use crate::model::{logprob, sample, Model};

/// What a worker does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Prefill only; hands KV to decode workers.
    Prefill,
    /// Decode only; pulls KV from prefill workers.
    Decode,
    /// Both, no handoff.
    Aggregated,
}

impl Role {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Aggregated => "aggregated",
        }
    }
}

/// How to build an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Worker name (agents are `NAME-rRANK`).
    pub name: String,
    /// Role.
    pub role: Role,
    /// Tensor-parallel size (rank agents and KV regions).
    pub tp: u32,
    /// KV blocks.
    pub blocks: u32,
    /// Tokens per block.
    pub tokens_per_block: u32,
    /// The agents' transport configuration (TOML, as `nixl_transports::config::Config`).
    pub transport: String,
    /// Lease of a handoff.
    pub lease: Duration,
    /// Events kept for `/kv/events`.
    pub event_capacity: usize,
    /// Pause after each decode step that produced tokens (simulates a larger model's step
    /// time, for tests and benchmarks; zero by default).
    pub step_delay: Duration,
}

/// One rank agent as peers see it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Agent name.
    pub name: String,
    /// Its metadata (hex).
    pub metadata: String,
    /// Its KV layout (hex of [`KvLayout::encode`]).
    pub layout: String,
}

/// A worker as peers see it (`GET /kv/meta`, `POST /kv/peer`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Worker name.
    pub worker: String,
    /// Role.
    pub role: Role,
    /// Rank agents, rank order.
    pub agents: Vec<AgentInfo>,
}

/// `POST /generate`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenReq {
    /// Request id (unique per attempt).
    pub id: String,
    /// Tokens whose KV the request starts from (prompt, and on a decode worker without the
    /// first token).
    pub tokens: Vec<u32>,
    /// Tokens to emit.
    pub max_tokens: u32,
    /// Decode worker: the first token (from prefill), fed first and not emitted.
    #[serde(default)]
    pub first_token: Option<u32>,
    /// Decode worker: the prefill agent (rank 0) whose offer carries the KV.
    #[serde(default)]
    pub prefill_agent: Option<String>,
    /// Sampling temperature (0: greedy).
    #[serde(default)]
    pub temperature: f32,
    /// Sampling seed.
    #[serde(default)]
    pub seed: u64,
}

/// `POST /prefill`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrefillReq {
    /// Request id.
    pub id: String,
    /// Prompt tokens.
    pub tokens: Vec<u32>,
    /// Decode rank agents to offer the KV to (empty: none, the blocks are released at once).
    #[serde(default)]
    pub decode_agents: Vec<String>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: f32,
    /// Sampling seed.
    #[serde(default)]
    pub seed: u64,
}

/// Answer of `POST /prefill`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrefillOut {
    /// The first generated token.
    pub first_token: u32,
    /// Its log-probability.
    pub first_logprob: f32,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: u32,
    /// The prefill agent (rank 0) that offered the KV.
    pub agent: String,
}

/// One line of a `/generate` stream (newline-delimited JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ev {
    /// The prompt is in the cache (aggregated workers), `cached_tokens` of it reused.
    Prefilled {
        /// Tokens reused from the prefix cache.
        cached_tokens: u32,
    },
    /// A generated token and its log-probability.
    Token(u32, f32),
    /// The end, with the finish reason.
    Done(String),
    /// Failed, with the reason.
    Error(String),
}

/// What the HTTP side asks.
#[derive(Debug)]
pub enum Cmd {
    /// Generate (stream of [`Ev`]).
    Generate(GenReq, UnboundedSender<Ev>),
    /// Prefill and offer.
    Prefill(PrefillReq, oneshot::Sender<Result<PrefillOut, String>>),
    /// Cancel a request (generation, pull or offer) by id.
    Cancel(String),
    /// Load a peer worker's agents (and, on decode, accept its offers).
    Peer(PeerInfo, oneshot::Sender<Result<(), String>>),
}

/// Counters the HTTP side reads.
#[derive(Debug, Default)]
pub struct Stats {
    /// Blocks in use.
    pub blocks_used: usize,
    /// All blocks.
    pub blocks_total: usize,
    /// Requests holding blocks or running.
    pub active_requests: usize,
    /// Finished requests by status.
    pub requests: BTreeMap<&'static str, u64>,
    /// Handoff durations (offer to done on prefill, pull start to landed on decode).
    pub handoff_seconds: Histogram,
    /// Handoffs by outcome.
    pub handoffs: BTreeMap<&'static str, u64>,
    /// Prompt tokens prefilled.
    pub prompt_tokens: u64,
    /// Of which reused from the prefix cache.
    pub cached_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
}

/// State shared between the engine and the HTTP side.
#[derive(Debug)]
pub struct Shared {
    /// This worker as peers see it.
    pub info: PeerInfo,
    /// KV events.
    pub log: Mutex<KvEventLog>,
    /// Counters.
    pub stats: Mutex<Stats>,
    /// Tokens per block.
    pub tokens_per_block: u32,
    /// Longest sequence.
    pub max_seq: u32,
    /// Vocabulary size.
    pub vocab: u32,
    /// New at each start of the worker (lets a router see restarts).
    pub instance: u64,
}

pub use nixl_core::codec::{hex, unhex};

/// Starts the engine thread; returns its command channel and shared state once the agents and
/// regions are up.
pub fn spawn(cfg: EngineConfig, model: Model) -> Result<(Sender<Cmd>, Arc<Shared>), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("nixl-serve-engine".into())
        .spawn(move || run(cfg, model, rx, ready_tx))
        .map_err(|e| format!("engine thread: {e}"))?;
    let shared = ready_rx
        .recv()
        .map_err(|_| "the engine thread ended before it was up".to_owned())??;
    Ok((tx, shared))
}

fn run(
    cfg: EngineConfig,
    model: Model,
    rx: Receiver<Cmd>,
    ready: Sender<Result<Arc<Shared>, String>>,
) {
    let built = (|| -> Result<(Vec<Agent>, Vec<KvRegion>), String> {
        let tc = nixl_transports::config::Config::from_toml(&cfg.transport)
            .map_err(|e| e.to_string())?;
        let mut agents = Vec::new();
        let mut regions = Vec::new();
        let order = match cfg.role {
            // Different orders on the two sides: the handoff's plan maps them for real.
            Role::Prefill => Order::LayerFirstNhd,
            Role::Decode => Order::BlockFirstHnd,
            Role::Aggregated => Order::BlockFirstNhd,
        };
        for r in 0..cfg.tp {
            let a = tc
                .agent_builder(format!("{}-r{r}", cfg.name))
                .backends(tc.backends().map_err(|e| e.to_string())?)
                .build()
                .map_err(|e| format!("agent: {e}"))?;
            let layout = KvLayout {
                layers: model.cfg.layers,
                blocks: cfg.blocks,
                tokens_per_block: cfg.tokens_per_block,
                total_heads: model.cfg.kv_heads,
                head_dim: model.cfg.head_dim,
                dtype_bytes: 4,
                kind: KvKind::Split,
                order,
                tp_rank: r,
                tp_size: cfg.tp,
                base: 0,
                dev_id: 0,
            };
            regions.push(KvRegion::new(&a, layout)?);
            agents.push(a);
        }
        Ok((agents, regions))
    })();
    let (agents, regions) = match built {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let info = PeerInfo {
        worker: cfg.name.clone(),
        role: cfg.role,
        agents: agents
            .iter()
            .zip(&regions)
            .map(|(a, r)| AgentInfo {
                name: a.name().to_owned(),
                metadata: hex(&a.metadata_bytes()),
                layout: hex(&r.layout.encode()),
            })
            .collect(),
    };
    let shared = Arc::new(Shared {
        info,
        log: Mutex::new(KvEventLog::new(cfg.event_capacity)),
        stats: Mutex::new(Stats {
            blocks_total: cfg.blocks as usize,
            ..Stats::default()
        }),
        tokens_per_block: cfg.tokens_per_block,
        max_seq: model.cfg.max_seq,
        vocab: model.cfg.vocab,
        instance: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 40,
    });
    let decs = if cfg.role == Role::Decode {
        let mut v = Vec::new();
        for (a, r) in agents.iter().zip(&regions) {
            match DecodeSide::new(a, r.layout) {
                Ok(d) => v.push(d),
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return;
                }
            }
        }
        v
    } else {
        Vec::new()
    };
    let pre = (cfg.role == Role::Prefill).then(|| PrefillSide::new(&agents[0]));
    let _ = ready.send(Ok(Arc::clone(&shared)));
    let mut e = Engine {
        blocks: Blocks::new(cfg.blocks, cfg.tokens_per_block),
        cfg,
        model,
        agents: &agents,
        regions: &regions,
        shared,
        pre,
        decs,
        reqs: Vec::new(),
        queue: Default::default(),
        starved: false,
        offers: HashMap::new(),
        offered: HashMap::new(),
        cancelled: HashMap::new(),
        loaded: HashSet::new(),
    };
    e.run(rx);
}

mod decode;
mod prefill;
mod state;
use state::*;
