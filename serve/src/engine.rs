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

/// Hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes of hex, or why not.
pub fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return Err("bad hex".into());
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| "bad hex".to_owned()))
        .collect()
}

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

/// How long queued work may wait for KV blocks held by other requests.
const QUEUE_WAIT: Duration = Duration::from_secs(30);

/// Why a prefill found no room.
enum NoRoom {
    /// Not now: blocks held by other requests will come back.
    Now(String),
    /// Never (bad request, larger than the cache).
    Never(String),
}

#[derive(Debug)]
enum State {
    /// Decode: waiting for every rank's offer from this prefill agent.
    Waiting { prefill: String, since: Instant },
    /// Decode: pulling; (rank, prefill agent, handoff id) still running.
    Pulling {
        running: Vec<(usize, String, u64)>,
        since: Instant,
    },
    /// Generating.
    Decoding,
}

#[derive(Debug)]
struct Req {
    id: String,
    /// Tokens whose KV is in the cache.
    tokens: Vec<u32>,
    table: Vec<u32>,
    /// Full blocks committed to the prefix cache.
    hashed: usize,
    next: u32,
    left: u32,
    tx: UnboundedSender<Ev>,
    state: State,
    temperature: f32,
    seed: u64,
}

/// An offer held on the prefill side: its blocks, and the handoffs still open.
#[derive(Debug)]
struct Offered {
    table: Vec<u32>,
    handoffs: Vec<u64>,
    since: Instant,
}

struct Engine<'a> {
    cfg: EngineConfig,
    model: Model,
    agents: &'a [Agent],
    regions: &'a [KvRegion],
    shared: Arc<Shared>,
    pre: Option<PrefillSide<'a>>,
    decs: Vec<DecodeSide<'a>>,
    blocks: Blocks,
    reqs: Vec<Req>,
    /// Prefill work (aggregated generate or prefill), first come first served.
    queue: std::collections::VecDeque<(Cmd, Instant)>,
    /// The first queued work waits for blocks (retried each turn, without spinning).
    starved: bool,
    /// Decode: offers received, by request id: (rank, offer, arrival).
    offers: HashMap<String, Vec<(usize, Offer, Instant)>>,
    /// Prefill: offers held, by request id.
    offered: HashMap<String, Offered>,
    /// Ids cancelled before their work arrived (an offer, a generate), with when.
    cancelled: HashMap<String, Instant>,
    /// Peer metadata already loaded.
    loaded: HashSet<String>,
}

impl std::fmt::Debug for Engine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.cfg.name)
            .finish()
    }
}

impl Engine<'_> {
    fn run(&mut self, rx: Receiver<Cmd>) {
        loop {
            let busy = (!self.queue.is_empty() && !self.starved)
                || self.reqs.iter().any(|r| matches!(r.state, State::Decoding));
            let first = if busy {
                rx.try_recv().ok()
            } else {
                match rx.recv_timeout(Duration::from_millis(1)) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            if let Some(c) = first {
                self.command(c);
                while let Ok(c) = rx.try_recv() {
                    self.command(c);
                }
            }
            self.poll_handoffs();
            if let Some((c, since)) = self.queue.pop_front() {
                match self.prefill_work(c, since) {
                    Some(c) => {
                        self.queue.push_front((c, since));
                        self.starved = true;
                    }
                    None => self.starved = false,
                }
            }
            let stepped = self.decode_step();
            self.publish();
            if stepped && !self.cfg.step_delay.is_zero() {
                std::thread::sleep(self.cfg.step_delay);
            }
        }
    }

    fn publish(&self) {
        let mut s = self.shared.stats.lock();
        s.blocks_used = self.blocks.used();
        s.active_requests = self.reqs.len() + self.offered.len() + self.queue.len();
    }

    fn finish(&self, status: &'static str) {
        *self.shared.stats.lock().requests.entry(status).or_default() += 1;
        self.publish();
    }

    /// Ends a request that generated all its tokens: blocks released and counted before the
    /// client hears the end.
    fn complete(&mut self, r: Req) {
        self.blocks.release(&r.table);
        self.finish("ok");
        let _ = r.tx.send(Ev::Done("length".into()));
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Peer(p, reply) => {
                let _ = reply.send(self.peer(&p));
            }
            Cmd::Cancel(id) => self.cancel(&id),
            Cmd::Generate(g, tx) if self.cfg.role == Role::Decode => self.decode_request(g, tx),
            c @ (Cmd::Generate(..) | Cmd::Prefill(..)) => self.queue.push_back((c, Instant::now())),
        }
    }

    fn peer(&mut self, p: &PeerInfo) -> Result<(), String> {
        if p.agents.is_empty() {
            return Err("peer has no agents".into());
        }
        for a in &p.agents {
            if self.loaded.contains(&a.metadata) {
                continue;
            }
            let md = unhex(&a.metadata)?;
            for own in self.agents {
                own.load_remote(&md)
                    .map_err(|e| format!("loading {}: {e}", a.name))?;
            }
            self.loaded.insert(a.metadata.clone());
        }
        if self.cfg.role == Role::Decode && p.role == Role::Prefill {
            let layouts = p
                .agents
                .iter()
                .map(|a| KvLayout::decode(&unhex(&a.layout)?).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, String>>()?;
            let names: Vec<String> = p.agents.iter().map(|a| a.name.clone()).collect();
            for d in &mut self.decs {
                d.add_prefill(&names[0], layouts.clone(), names.clone())
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    fn cancel(&mut self, id: &str) {
        let mut found = false;
        if let Some(i) = self.reqs.iter().position(|r| r.id == id) {
            let r = self.reqs.swap_remove(i);
            self.drop_req(r, "cancelled", None);
            found = true;
        }
        let before = self.queue.len();
        self.queue.retain(|(c, _)| match c {
            Cmd::Generate(g, _) => g.id != id,
            Cmd::Prefill(p, _) => p.id != id,
            _ => true,
        });
        found |= self.queue.len() != before;
        if let (Some(o), Some(pre)) = (self.offered.get(id), self.pre.as_mut()) {
            for &h in &o.handoffs {
                pre.cancel(h, "cancelled by the frontend");
            }
            found = true;
        }
        if let Some(os) = self.offers.remove(id) {
            for (rank, o, _) in os {
                self.decs[rank].cancel(&o.from, o.id, "cancelled by the frontend");
            }
            found = true;
        }
        if !found {
            self.cancelled.insert(id.to_owned(), Instant::now());
        }
    }

    /// Ends a request: stops its pulls, releases its blocks, counts it.
    fn drop_req(&mut self, r: Req, status: &'static str, err: Option<String>) {
        if let State::Pulling { running, .. } = &r.state {
            for (rank, from, h) in running {
                self.decs[*rank].cancel(from, *h, "request ended");
            }
        }
        // Offers that came for it are declined at once (prefill frees on the acknowledgement).
        for (rank, o, _) in self.offers.remove(&r.id).unwrap_or_default() {
            self.decs[rank].cancel(&o.from, o.id, "request ended");
        }
        self.blocks.release(&r.table);
        self.finish(status);
        if let Some(e) = err {
            eprintln!("nixl-serve worker {}: request {}: {e}", self.cfg.name, r.id);
            let _ = r.tx.send(Ev::Error(e));
        }
    }

    /// Allocates blocks for `tokens` reusing cached prefix blocks; computes the rest. Returns
    /// (block table, logits after the last token, tokens reused).
    fn prefill(&mut self, tokens: &[u32]) -> Result<(Vec<u32>, Vec<f32>, u32), NoRoom> {
        let n = tokens.len();
        if n == 0 {
            return Err(NoRoom::Never("empty prompt".into()));
        }
        if n as u32 >= self.model.cfg.max_seq {
            return Err(NoRoom::Never(format!(
                "{n} tokens: the model's context is {}",
                self.model.cfg.max_seq
            )));
        }
        let tpb = self.cfg.tokens_per_block as usize;
        let hashes = seq_hashes(tokens, tpb);
        // The last token is always computed (its logits are needed).
        let reuse_max = (n - 1) / tpb;
        let mut table = self.blocks.lookup(&hashes[..hashes.len().min(reuse_max)]);
        let reused = table.len();
        let need = n.div_ceil(tpb) - reused;
        let running = self
            .reqs
            .iter()
            .filter(|r| matches!(r.state, State::Decoding))
            .count();
        // One block of headroom per running request, so admissions do not starve growth.
        let short =
            self.blocks.available() < need + running && need + running <= self.blocks.total();
        let mut log = self.shared.log.lock();
        match (!short)
            .then(|| self.blocks.alloc_n(need, &mut log))
            .flatten()
        {
            Some(b) => table.extend(b),
            None => {
                self.blocks.release(&table);
                let why = format!(
                    "out of KV blocks ({need} needed, {} free)",
                    self.blocks.available()
                );
                // Blocks held by others come back; a prompt larger than the cache never fits.
                return Err(if need <= self.blocks.total() {
                    NoRoom::Now(why)
                } else {
                    NoRoom::Never(why)
                });
            }
        }
        drop(log);
        let mut kv = Paged {
            regions: self.regions,
            table: &table,
        };
        let start = reused * tpb;
        for (i, &t) in tokens.iter().enumerate().take(n - 1).skip(start) {
            self.model.advance(t, i as u32, &mut kv);
        }
        let logits = self.model.step(tokens[n - 1], n as u32 - 1, &mut kv);
        let full = n / tpb;
        self.blocks
            .commit(&table[..full], &hashes[..full], &mut self.shared.log.lock());
        let mut s = self.shared.stats.lock();
        s.prompt_tokens += n as u64;
        s.cached_tokens += start as u64;
        Ok((table, logits, start as u32))
    }

    /// Runs queued work; gives it back if it must wait for blocks.
    fn prefill_work(&mut self, c: Cmd, since: Instant) -> Option<Cmd> {
        let may_wait = since.elapsed() < QUEUE_WAIT;
        match c {
            Cmd::Generate(g, tx) => {
                if self.cancelled.remove(&g.id).is_some() || tx.is_closed() {
                    self.finish("cancelled");
                    return None;
                }
                if g.max_tokens == 0 {
                    let _ = tx.send(Ev::Done("length".into()));
                    self.finish("ok");
                    return None;
                }
                let (table, logits, cached) = match self.prefill(&g.tokens) {
                    Ok(x) => x,
                    Err(NoRoom::Now(_)) if may_wait => return Some(Cmd::Generate(g, tx)),
                    Err(NoRoom::Now(e) | NoRoom::Never(e)) => {
                        let _ = tx.send(Ev::Error(e));
                        self.finish("error");
                        return None;
                    }
                };
                let n = g.tokens.len();
                let t = sample(&logits, g.temperature, g.seed, n as u32);
                let _ = tx.send(Ev::Prefilled {
                    cached_tokens: cached,
                });
                let _ = tx.send(Ev::Token(t, logprob(&logits, t)));
                self.shared.stats.lock().generated_tokens += 1;
                let r = Req {
                    id: g.id,
                    hashed: n / self.cfg.tokens_per_block as usize,
                    tokens: g.tokens,
                    table,
                    next: t,
                    left: g.max_tokens - 1,
                    tx,
                    state: State::Decoding,
                    temperature: g.temperature,
                    seed: g.seed,
                };
                if r.left == 0 {
                    self.complete(r);
                } else {
                    self.reqs.push(r);
                }
            }
            Cmd::Prefill(p, reply) => {
                if self.cancelled.remove(&p.id).is_some() || reply.is_closed() {
                    let _ = reply.send(Err("cancelled".into()));
                    self.finish("cancelled");
                    return None;
                }
                let (table, logits, cached) = match self.prefill(&p.tokens) {
                    Ok(x) => x,
                    Err(NoRoom::Now(_)) if may_wait => return Some(Cmd::Prefill(p, reply)),
                    Err(NoRoom::Now(e) | NoRoom::Never(e)) => {
                        let _ = reply.send(Err(e));
                        self.finish("error");
                        return None;
                    }
                };
                let first = sample(&logits, p.temperature, p.seed, p.tokens.len() as u32);
                let mut handoffs = Vec::new();
                let mut err = None;
                if let Some(pre) = self.pre.as_mut() {
                    for d in &p.decode_agents {
                        match pre.offer(d, &p.id, &table, self.cfg.lease) {
                            Ok(h) => handoffs.push(h),
                            Err(e) => {
                                err = Some(format!("offer to {d}: {e}"));
                                break;
                            }
                        }
                    }
                    if err.is_some() {
                        for &h in &handoffs {
                            pre.cancel(h, "offer to another rank failed");
                        }
                    }
                }
                let out = PrefillOut {
                    first_token: first,
                    first_logprob: logprob(&logits, first),
                    cached_tokens: cached,
                    agent: self.agents[0].name().to_owned(),
                };
                if handoffs.is_empty() {
                    self.blocks.release(&table);
                } else {
                    self.offered.insert(
                        p.id.clone(),
                        Offered {
                            table,
                            handoffs,
                            since: Instant::now(),
                        },
                    );
                }
                match err {
                    Some(e) => {
                        let _ = reply.send(Err(e));
                        self.finish("error");
                    }
                    None => {
                        if reply.send(Ok(out)).is_err() {
                            // The frontend went away: nobody will pull.
                            self.cancel(&p.id);
                        }
                        self.finish("ok");
                    }
                }
            }
            _ => {}
        }
        None
    }

    fn decode_request(&mut self, g: GenReq, tx: UnboundedSender<Ev>) {
        if self.cancelled.remove(&g.id).is_some() {
            self.finish("cancelled");
            return;
        }
        let (Some(first), Some(prefill)) = (g.first_token, g.prefill_agent.clone()) else {
            let _ = tx.send(Ev::Error(
                "a decode worker needs first_token and prefill_agent".into(),
            ));
            self.finish("error");
            return;
        };
        if g.tokens.is_empty() || g.max_tokens == 0 {
            let _ = tx.send(Ev::Error("empty prompt or max_tokens 0".into()));
            self.finish("error");
            return;
        }
        self.reqs.push(Req {
            id: g.id,
            tokens: g.tokens,
            table: Vec::new(),
            hashed: 0,
            next: first,
            left: g.max_tokens,
            tx,
            state: State::Waiting {
                prefill,
                since: Instant::now(),
            },
            temperature: g.temperature,
            seed: g.seed,
        });
    }

    fn poll_handoffs(&mut self) {
        let now = Instant::now();
        self.cancelled
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        if let Some(pre) = self.pre.as_mut() {
            let (freed, _) = pre.poll();
            for f in freed {
                let outcome = match &f.outcome {
                    Outcome::Done => "done",
                    Outcome::Failed(_) => "failed",
                    Outcome::Cancelled(_) => "cancelled",
                };
                let mut end = None;
                if let Some(o) = self.offered.get_mut(&f.request) {
                    o.handoffs.retain(|&h| h != f.id);
                    if o.handoffs.is_empty() {
                        end = self.offered.remove(&f.request);
                    }
                }
                let mut s = self.shared.stats.lock();
                *s.handoffs.entry(outcome).or_default() += 1;
                if let Some(o) = end {
                    if f.outcome == Outcome::Done {
                        s.handoff_seconds.observe(o.since.elapsed().as_secs_f64());
                    }
                    drop(s);
                    self.blocks.release(&o.table);
                }
            }
            for a in &self.agents[1..] {
                let _ = a.take_notifs();
            }
        }
        if self.decs.is_empty() {
            return;
        }
        let mut ended = Vec::new();
        for (rank, d) in self.decs.iter_mut().enumerate() {
            let (ev, _) = d.poll();
            for e in ev {
                match e {
                    DecodeEvent::Offered(o) => {
                        if self.cancelled.contains_key(&o.request) {
                            d.cancel(&o.from, o.id, "cancelled by the frontend");
                        } else {
                            self.offers
                                .entry(o.request.clone())
                                .or_default()
                                .push((rank, o, now));
                        }
                    }
                    DecodeEvent::Ended {
                        id,
                        request,
                        outcome,
                        ..
                    } => ended.push((rank, id, request, outcome)),
                }
            }
        }
        for (rank, id, request, outcome) in ended {
            let Some(i) = self.reqs.iter().position(|r| r.id == request) else {
                continue;
            };
            let r = &mut self.reqs[i];
            let State::Pulling { running, since } = &mut r.state else {
                continue;
            };
            running.retain(|(k, _, h)| !(*k == rank && *h == id));
            let since = *since;
            let tag = match &outcome {
                Outcome::Done => "done",
                Outcome::Failed(_) => "failed",
                Outcome::Cancelled(_) => "cancelled",
            };
            *self.shared.stats.lock().handoffs.entry(tag).or_default() += 1;
            match outcome {
                Outcome::Done => {
                    if running.is_empty() {
                        self.shared
                            .stats
                            .lock()
                            .handoff_seconds
                            .observe(since.elapsed().as_secs_f64());
                        r.state = State::Decoding;
                        let tpb = self.cfg.tokens_per_block as usize;
                        let full = r.tokens.len() / tpb;
                        let hashes = seq_hashes(&r.tokens, tpb);
                        r.hashed = full;
                        let table = r.table[..full].to_vec();
                        self.blocks
                            .commit(&table, &hashes[..full], &mut self.shared.log.lock());
                    }
                }
                Outcome::Failed(why) | Outcome::Cancelled(why) => {
                    let r = self.reqs.swap_remove(i);
                    self.drop_req(r, "error", Some(format!("KV handoff failed: {why}")));
                }
            }
        }
        // Waiting requests whose offers are all here start pulling.
        let tp = self.decs.len();
        let mut i = 0;
        while i < self.reqs.len() {
            let r = &self.reqs[i];
            let State::Waiting { prefill, since } = &r.state else {
                i += 1;
                continue;
            };
            if r.tx.is_closed() {
                let r = self.reqs.swap_remove(i);
                self.drop_req(r, "cancelled", None);
                continue;
            }
            let ready = self.offers.get(&r.id).is_some_and(|os| {
                (0..tp).all(|k| os.iter().any(|(rk, o, _)| *rk == k && o.from == *prefill))
            });
            if !ready {
                if since.elapsed() > self.cfg.lease {
                    let r = self.reqs.swap_remove(i);
                    self.drop_req(r, "error", Some("no KV offer from prefill in time".into()));
                } else {
                    i += 1;
                }
                continue;
            }
            let n = r.tokens.len();
            let nblocks = n.div_ceil(self.cfg.tokens_per_block as usize);
            // Blocks held by running requests come back: wait for them within half the
            // lease (the offer's READ must still fit in it), then give up.
            // One block of headroom per running request, so admissions do not starve growth.
            let running = self
                .reqs
                .iter()
                .filter(|r| matches!(r.state, State::Decoding))
                .count();
            if self.blocks.available() < nblocks + running
                && nblocks + running <= self.blocks.total()
                && since.elapsed() < self.cfg.lease / 2
            {
                i += 1;
                continue;
            }
            let os = self.offers.remove(&r.id).unwrap_or_default();
            let got = self.blocks.alloc_n(nblocks, &mut self.shared.log.lock());
            let table = match got {
                Some(t) => t,
                None => {
                    for (rank, o, _) in &os {
                        self.decs[*rank].cancel(&o.from, o.id, "decode is out of KV blocks");
                    }
                    let r = self.reqs.swap_remove(i);
                    self.drop_req(r, "error", Some("decode worker is out of KV blocks".into()));
                    continue;
                }
            };
            let mut running = Vec::new();
            let mut err = None;
            for (rank, o, _) in &os {
                if o.blocks.len() != nblocks {
                    err = Some(format!("offer of {} blocks for {n} tokens", o.blocks.len()));
                    self.decs[*rank].cancel(&o.from, o.id, "wrong block count");
                    continue;
                }
                if running.iter().any(|(k, _, _)| k == rank) || err.is_some() {
                    self.decs[*rank].cancel(&o.from, o.id, "duplicate offer");
                    continue;
                }
                match self.decs[*rank].pull(o, &table) {
                    Ok(()) => running.push((*rank, o.from.clone(), o.id)),
                    Err(e) => err = Some(format!("pull: {e}")),
                }
            }
            let r = &mut self.reqs[i];
            r.table = table;
            r.state = State::Pulling {
                running,
                since: Instant::now(),
            };
            if let Some(e) = err {
                let r = self.reqs.swap_remove(i);
                self.drop_req(r, "error", Some(e));
                continue;
            }
            i += 1;
        }
        // Offers nobody claimed within half a lease are declined (the frontend went away).
        let lease = self.cfg.lease;
        let waiting: HashSet<String> = self.reqs.iter().map(|r| r.id.clone()).collect();
        let decs = &mut self.decs;
        self.offers.retain(|req, os| {
            let stale = os
                .iter()
                .all(|(_, _, t)| now.duration_since(*t) > lease / 2);
            if stale && !waiting.contains(req) {
                for (rank, o, _) in os.iter() {
                    decs[*rank].cancel(&o.from, o.id, "offer not claimed");
                }
                false
            } else {
                true
            }
        });
    }

    /// One token for every decoding request; whether any ran.
    fn decode_step(&mut self) -> bool {
        let tpb = self.cfg.tokens_per_block as usize;
        let mut stepped = false;
        let mut starved = None;
        let mut i = 0;
        while i < self.reqs.len() {
            if !matches!(self.reqs[i].state, State::Decoding) {
                i += 1;
                continue;
            }
            if self.reqs[i].tx.is_closed() {
                let r = self.reqs.swap_remove(i);
                self.drop_req(r, "cancelled", None);
                continue;
            }
            let pos = self.reqs[i].tokens.len();
            if pos as u32 >= self.model.cfg.max_seq {
                let r = self.reqs.swap_remove(i);
                self.complete(r);
                continue;
            }
            if pos / tpb >= self.reqs[i].table.len() {
                let got = self.blocks.alloc(&mut self.shared.log.lock());
                match got {
                    Some(b) => self.reqs[i].table.push(b),
                    None => {
                        // Waits for a block another request frees (see below).
                        starved = Some(i);
                        i += 1;
                        continue;
                    }
                }
            }
            let r = &mut self.reqs[i];
            let mut kv = Paged {
                regions: self.regions,
                table: &r.table,
            };
            let logits = self.model.step(r.next, pos as u32, &mut kv);
            stepped = true;
            r.tokens.push(r.next);
            if r.tokens.len() / tpb > r.hashed {
                let hashes = seq_hashes(&r.tokens, tpb);
                let full = r.tokens.len() / tpb;
                let (blocks, hs) = (r.table[r.hashed..full].to_vec(), &hashes[..full]);
                let start = r.hashed;
                r.hashed = full;
                let mut log = self.shared.log.lock();
                // Parents of the first new block are already known.
                let mut all: Vec<u32> = r.table[..start].to_vec();
                all.extend(blocks);
                self.blocks.commit(&all, hs, &mut log);
            }
            let r = &mut self.reqs[i];
            let t = sample(&logits, r.temperature, r.seed, r.tokens.len() as u32);
            let _ = r.tx.send(Ev::Token(t, logprob(&logits, t)));
            self.shared.stats.lock().generated_tokens += 1;
            r.left -= 1;
            r.next = t;
            if r.left == 0 {
                let r = self.reqs.swap_remove(i);
                self.complete(r);
                continue;
            }
            i += 1;
        }
        if let (false, Some(k)) = (stepped, starved) {
            // Every running request needs a block and none is free: preempt one (its
            // frontend prefills it again elsewhere, with the same tokens) so the others go on.
            let r = self.reqs.swap_remove(k);
            self.drop_req(r, "error", Some("preempted: out of KV blocks".into()));
        }
        stepped
    }
}
