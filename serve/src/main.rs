//! `nixl-serve`: the serving stack's command line (see the crate docs of `nixl_serve`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nixl_serve::engine::{self, EngineConfig, Role};
use nixl_serve::frontend::{self, FrontendConfig, RouterChoice};
use nixl_serve::model::{Model, ModelConfig, Weights, MODEL_NAME};

#[derive(Parser, Debug)]
#[command(
    name = "nixl-serve",
    version,
    about = "A disaggregated serving stack over nixl-rs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Writes the reference model (model.safetensors) into DIR.
    Model {
        /// Directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Runs one worker.
    Worker(WorkerArgs),
    /// Runs the OpenAI-compatible frontend.
    Frontend(FrontendArgs),
    /// Runs a whole deployment on this host: workers and a frontend as child processes.
    Up(nixl_serve::up::UpArgs),
}

#[derive(clap::Args, Debug)]
struct WorkerArgs {
    /// prefill, decode or aggregated.
    #[arg(long, value_enum)]
    role: Role,
    /// Tensor-parallel size (rank agents and KV regions).
    #[arg(long, default_value_t = 1)]
    tp: u32,
    /// Model directory (from `nixl-serve model`).
    #[arg(long)]
    model: PathBuf,
    /// HTTP address of the worker API.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Worker name (agents are NAME-rRANK); default ROLE-PID.
    #[arg(long)]
    name: Option<String>,
    /// KV blocks.
    #[arg(long, default_value_t = 512)]
    blocks: u32,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    tokens_per_block: u32,
    /// Transport backend of the agents: shm (this host) or tcp.
    #[arg(long, default_value = "shm")]
    backend: String,
    /// Listen address of the tcp backend (with --backend tcp).
    #[arg(long, default_value = "127.0.0.1:0")]
    tcp_listen: String,
    /// Handoff lease, milliseconds.
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u64,
    /// Pause after each decode step, milliseconds (simulates a larger model's step time).
    #[arg(long, default_value_t = 0)]
    step_delay_ms: u64,
    /// KV events kept for `/kv/events` (older ones answer 410 with the oldest kept).
    #[arg(long, default_value_t = 4096)]
    event_capacity: usize,
}

#[derive(clap::Args, Debug)]
struct FrontendArgs {
    /// HTTP address.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// Prefill worker URLs.
    #[arg(long, num_args = 1..)]
    prefill: Vec<String>,
    /// Decode worker URLs.
    #[arg(long, num_args = 1..)]
    decode: Vec<String>,
    /// Aggregated worker URLs.
    #[arg(long, num_args = 1..)]
    aggregated: Vec<String>,
    /// How workers are chosen: kv (KV-aware: overlap and load, Dynamo's cost), kv:WEIGHT,
    /// round-robin, random.
    #[arg(long, default_value = "kv")]
    router: String,
    /// Tokens per KV block of the workers (for the router's block hashes).
    #[arg(long, default_value_t = 16)]
    tokens_per_block: u32,
    /// Largest max_tokens accepted.
    #[arg(long, default_value_t = 1024)]
    max_tokens: u32,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Model { out } => Weights::generate(ModelConfig::default())
            .save(&out)
            .map(|p| println!("{}", p.display())),
        Cmd::Worker(a) => worker(a),
        Cmd::Frontend(a) => run_frontend(a),
        Cmd::Up(a) => nixl_serve::up::up(a),
    };
    if let Err(e) = r {
        eprintln!("nixl-serve: {e}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio: {e}"))
}

/// Binds, prints `NIXL-SERVE-READY <url>` on stdout, serves.
async fn serve(listen: &str, app: axum::Router) -> Result<(), String> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listen {listen}: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    println!("NIXL-SERVE-READY http://{addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    axum::serve(l, app).await.map_err(|e| format!("serve: {e}"))
}

fn worker(a: WorkerArgs) -> Result<(), String> {
    let model = Model::load(&a.model)?;
    if a.tp == 0 || model.cfg.kv_heads % a.tp != 0 {
        return Err(format!(
            "--tp {} must divide the model's {} KV heads",
            a.tp, model.cfg.kv_heads
        ));
    }
    let transport = match a.backend.as_str() {
        "shm" => "backends = [\"shm\"]\n".to_owned(),
        "tcp" => format!(
            "backends = [\"tcp\"]\n[tcp]\nlisten = \"{}\"\n",
            a.tcp_listen
        ),
        b => return Err(format!("--backend {b}: shm or tcp")),
    };
    let name = a
        .name
        .unwrap_or_else(|| format!("{}-{}", a.role.as_str(), std::process::id()));
    let (tx, shared) = engine::spawn(
        EngineConfig {
            name,
            role: a.role,
            tp: a.tp,
            blocks: a.blocks,
            tokens_per_block: a.tokens_per_block,
            transport,
            lease: Duration::from_millis(a.lease_ms),
            event_capacity: a.event_capacity,
            step_delay: Duration::from_millis(a.step_delay_ms),
        },
        model,
    )?;
    runtime()?.block_on(serve(&a.listen, nixl_serve::worker::router(tx, shared)))
}

fn run_frontend(a: FrontendArgs) -> Result<(), String> {
    let disagg = !a.prefill.is_empty() || !a.decode.is_empty();
    if disagg != a.aggregated.is_empty()
        || (disagg && (a.prefill.is_empty() || a.decode.is_empty()))
    {
        return Err("give --prefill and --decode workers, or --aggregated workers".into());
    }
    let trim = |v: Vec<String>| {
        v.into_iter()
            .map(|u| u.trim_end_matches('/').to_owned())
            .collect()
    };
    let cfg = FrontendConfig {
        prefill: trim(a.prefill),
        decode: trim(a.decode),
        aggregated: trim(a.aggregated),
        model: MODEL_NAME.to_owned(),
        max_seq: ModelConfig::default().max_seq,
        max_tokens: a.max_tokens,
        tokens_per_block: a.tokens_per_block,
    };
    let mode = nixl_router::Mode::parse(&a.router)?;
    runtime()?.block_on(async move {
        let urls: Vec<String> = [&cfg.prefill, &cfg.decode, &cfg.aggregated]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let choice = RouterChoice::new(mode, &urls, a.tokens_per_block as usize)?;
        serve(&a.listen, frontend::router(cfg, Box::new(choice))).await
    })
}
