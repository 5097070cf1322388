//! `nixl-weights`: serve a model from registered memory, pull it from its sources, verify a
//! directory. See the crate docs and the README's "Weight streaming" section.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nixl_core::{Agent, Backend, BackendName};
use nixl_discovery::EtcdConfig;
use nixl_transports::config::Config;
use nixl_transports::tcp::TcpBackend;
use nixl_weight_streamer::pull::announce;
use nixl_weight_streamer::{
    manifest, pull, Error, Fallback, Manifest, PullOptions, Result, Source, SourceOptions,
};

#[derive(Parser, Debug)]
#[command(
    name = "nixl-weights",
    about = "Weight streaming across replicas",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Load a model directory into registered memory and serve it until killed.
    Serve {
        /// The model directory (`*.safetensors`, and any other files beside them).
        path: PathBuf,
        /// Model name (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
        /// Agent configuration (TOML; see nixl_transports::config).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address of the tcp backend (overrides the configuration's `[tcp] listen`).
        #[arg(long)]
        listen: Option<String>,
        /// Chunk size in bytes (the unit of transfer and verification).
        #[arg(long, default_value_t = manifest::DEFAULT_CHUNK)]
        chunk_size: u64,
        /// etcd endpoint to announce the model at (repeatable; default: the configuration's
        /// `[etcd]`).
        #[arg(long)]
        etcd: Vec<String>,
        /// Print one JSON object when serving starts.
        #[arg(long)]
        json: bool,
        /// TEST ONLY: corrupt this chunk in the served memory after the manifest is computed.
        #[arg(long, hide = true)]
        fault_corrupt_chunk: Vec<usize>,
        /// Load the model into the per-node daemon's pool (`nixl-agent serve`, at this control
        /// socket; default: the daemon's default socket) and exit: the daemon serves it on its
        /// own tcp listener until its leases are released (`nixl-weights unload NAME`).
        #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = "")]
        daemon: Option<PathBuf>,
    },
    /// Stop a daemon serving a model that `serve --daemon` loaded: its leases are released.
    Unload {
        /// Model name.
        name: String,
        /// The daemon's control socket (default: the daemon's default socket).
        #[arg(long, value_name = "SOCKET")]
        daemon: Option<PathBuf>,
    },
    /// Pull a model from its sources into a directory, verified.
    Pull {
        /// Model name.
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// A source's tcp listener (`HOST:PORT`); repeat for several.
        #[arg(long = "source")]
        sources: Vec<String>,
        /// Where chunks no live source can give are read from: a directory holding the model,
        /// or `s3://bucket/prefix` (the `[object]` configuration or `AWS_*` environment says
        /// which store).
        #[arg(long)]
        fallback: Option<String>,
        /// The manifest to pull by when no source answers (a pulled directory's
        /// `.nixl-weights-manifest`); needed with an S3 fallback alone.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Serve each chunk as soon as it is verified, and keep serving after the pull.
        #[arg(long)]
        serve: bool,
        /// Agent configuration (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address of the tcp backend.
        #[arg(long)]
        listen: Option<String>,
        /// READs in flight per source (1: each chunk turns around sooner on a busy replica
        /// link, and the have bytes queued behind it are fresher; see BENCHMARKS.md).
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// READs in flight per origin (a source complete from the start; at most --streams):
        /// fewer, so that replicas starting at once do not queue past the origin's link.
        #[arg(long, default_value_t = 1)]
        origin_streams: usize,
        /// etcd endpoint to find sources at (repeatable; default: the configuration's `[etcd]`).
        #[arg(long)]
        etcd: Vec<String>,
        /// Give up after this many seconds without progress.
        #[arg(long, default_value_t = 30)]
        stall_timeout: u64,
        /// TEST ONLY: read from this source only once every other source has been dropped.
        #[arg(long, hide = true)]
        fault_hold_back_source: Vec<String>,
        /// Print one JSON summary object on stdout at the end.
        #[arg(long)]
        json: bool,
    },
    /// List the models announced in etcd, their sources and how much each holds.
    Ls {
        /// etcd endpoint (repeatable; default: the configuration's `[etcd]`).
        #[arg(long)]
        etcd: Vec<String>,
        /// Agent configuration (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Recompute the checksums of a directory (against the manifest a pull left there).
    Verify {
        /// The directory.
        dir: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NIXL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nixl-weights: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The agent of the CLI: the configured backends (tcp only by default), with the tcp backend
/// kept by type so that its listen address can be printed; `object` adds the object backend
/// (an S3 fallback) to a configuration that does not list its backends.
fn agent(
    config: Option<&PathBuf>,
    listen: Option<String>,
    role: &str,
    object: bool,
) -> Result<(Arc<Agent>, Config, Vec<String>)> {
    let mut cfg = match config {
        Some(p) => {
            Config::from_file(p).map_err(|e| Error::core(format!("config {}", p.display()), e))?
        }
        None => Config::default(),
    };
    if cfg.backends.is_none() {
        cfg.backends = Some(vec!["tcp".into()]);
    }
    if let Some(b) = cfg
        .backends
        .as_mut()
        .filter(|b| object && !b.iter().any(|n| n == "object"))
    {
        b.push("object".into());
    }
    cfg.tcp.listen_on(
        listen
            .as_deref()
            .map(nixl_transports::tcp::parse_listen)
            .transpose()
            .map_err(|e| Error::core("--listen", e))?,
    );
    let tcp = Arc::new(TcpBackend::new(
        cfg.tcp_config()
            .map_err(|e| Error::core("config [tcp]", e))?,
    ));
    let mut backends: Vec<Arc<dyn Backend>> = vec![tcp.clone()];
    for b in cfg.backends().map_err(|e| Error::core("config", e))? {
        if b.name() != BackendName::Tcp {
            backends.push(b);
        }
    }
    let name = format!(
        "nixl-weights-{role}-{:016x}",
        nixl_core::random_u64().map_err(|e| Error::core("agent name", e))?
    );
    let agent = cfg
        .agent_builder(name)
        .backends(backends)
        .build()
        .map_err(|e| Error::core("starting the agent", e))?;
    agent
        .check_backend(BackendName::Tcp)
        .map_err(|e| Error::core("the tcp backend", e))?;
    let addrs = tcp.listen_addrs().iter().map(ToString::to_string).collect();
    Ok((Arc::new(agent), cfg, addrs))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Async-signal-safe: one atomic store.
    STOP.store(true, Ordering::Release);
}

/// SIGTERM and SIGINT set the returned flag (serving loops then leave etcd and stop cleanly).
fn stop_on_signals() -> &'static AtomicBool {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; installing
        // it replaces the default action (termination) for these two signals only.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    &STOP
}

/// etcd settings: the `--etcd` endpoints (with the configuration's other `[etcd]` values), else
/// the configuration's `[etcd]`, else none.
fn etcd_cfg(cfg: &Config, flags: Vec<String>) -> Result<Option<EtcdConfig>> {
    let from_cfg = cfg
        .etcd
        .as_ref()
        .map(EtcdConfig::from_table)
        .transpose()
        .map_err(|e| Error::Invalid(format!("config [etcd]: {e}")))?;
    Ok(match (flags.is_empty(), from_cfg) {
        (true, c) => c,
        (false, Some(c)) => Some(EtcdConfig {
            endpoints: flags,
            ..c
        }),
        (false, None) => Some(EtcdConfig::new(flags)),
    })
}

/// The daemon's control socket: as given, or the default when empty.
fn daemon_socket(p: PathBuf) -> PathBuf {
    if p.as_os_str().is_empty() {
        nixl_agent::config::default_control_socket()
    } else {
        p
    }
}

fn serve_in_daemon(
    sock: &std::path::Path,
    path: &std::path::Path,
    opts: &SourceOptions,
    json: bool,
) -> Result<ExitCode> {
    let d = nixl_weight_streamer::daemon::load(sock, path, opts)?;
    let m = &d.manifest;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "serving": m.name, "model_id": m.model_id(), "addrs": d.tcp_listen,
                "bytes": m.total_bytes(), "files": m.files.len(),
                "tensors": m.tensors.len(), "chunks": m.chunk_count(),
                "daemon": sock, "lease_jobs": [d.ctrl.job, d.data.job],
                "publish_job": d.publish_job, "read": d.read.json(),
            })
        );
    } else {
        println!(
            "the daemon at {} serves {} ({} files, {} tensors, {} bytes) on {} \
             (lease jobs {} and {}; `nixl-weights unload {}` stops it)",
            sock.display(),
            m.model_id(),
            m.files.len(),
            m.tensors.len(),
            m.total_bytes(),
            d.tcp_listen.join(" "),
            d.ctrl.job,
            d.data.job,
            m.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Serve {
            path,
            name,
            config,
            listen,
            chunk_size,
            etcd,
            json,
            fault_corrupt_chunk,
            daemon,
        } => {
            let opts = SourceOptions {
                name,
                chunk_size,
                corrupt_chunks: fault_corrupt_chunk,
            };
            if let Some(sock) = daemon {
                if !etcd.is_empty() || listen.is_some() || config.is_some() {
                    return Err(Error::Invalid(
                        "--daemon serves through the daemon's own agent: its configuration \
                         says where it listens and whether it is in etcd (--etcd, --listen and \
                         --config do not apply)"
                            .into(),
                    ));
                }
                return serve_in_daemon(&daemon_socket(sock), &path, &opts, json);
            }
            let (agent, cfg, addrs) = agent(config.as_ref(), listen, "src", false)?;
            let etcd = etcd_cfg(&cfg, etcd)?;
            let src = Source::load(&agent, &path, &opts)?;
            let m = src.manifest();
            let announced = match &etcd {
                Some(e) => announce(&agent, e, &m.name)?,
                None => Vec::new(),
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "serving": m.name, "model_id": m.model_id(), "addrs": addrs,
                        "bytes": m.total_bytes(), "files": m.files.len(),
                        "tensors": m.tensors.len(), "chunks": m.chunk_count(),
                        "read": src.read_modes().json(),
                    })
                );
            } else {
                println!(
                    "serving {} ({} files, {} tensors, {} bytes) on {}",
                    m.model_id(),
                    m.files.len(),
                    m.tensors.len(),
                    m.total_bytes(),
                    addrs.join(" ")
                );
            }
            let stop = stop_on_signals();
            loop {
                std::thread::sleep(Duration::from_millis(200));
                if stop.load(Ordering::Acquire) {
                    // Leave etcd at once (the lease is revoked), then stop serving.
                    drop(announced);
                    return src.withdraw().map(|()| ExitCode::SUCCESS);
                }
                if let Err(e) = src.check_unchanged() {
                    eprintln!("nixl-weights: error: {e}");
                    drop(announced);
                    // Peers' reads fail from now on; they fetch elsewhere.
                    if let Err(e) = src.withdraw() {
                        eprintln!("nixl-weights: withdrawing: {e}");
                    }
                    return Ok(ExitCode::from(3));
                }
            }
        }
        Cmd::Pull {
            name,
            out,
            sources,
            fallback,
            manifest,
            serve,
            config,
            listen,
            streams,
            origin_streams,
            etcd,
            stall_timeout,
            fault_hold_back_source,
            json,
        } => {
            let fallback = fallback.as_deref().map(Fallback::parse).transpose()?;
            let s3 = matches!(fallback, Some(Fallback::S3 { .. }));
            let (agent, cfg, addrs) = agent(config.as_ref(), listen, "pull", s3)?;
            let etcd = etcd_cfg(&cfg, etcd)?;
            let mut opts = PullOptions::new(name);
            opts.sources = sources;
            opts.fallback = fallback;
            opts.manifest = manifest;
            opts.serve = serve;
            opts.streams_per_source = streams;
            opts.origin_streams = origin_streams;
            opts.stall_timeout = Duration::from_secs(stall_timeout);
            opts.fault_hold_back = fault_hold_back_source;
            opts.progress = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
            if serve {
                if json {
                    println!("{}", serde_json::json!({ "serving_on": addrs }));
                } else {
                    eprintln!("nixl-weights: serving while pulling on {}", addrs.join(" "));
                }
            }
            let pulled = pull(&agent, &cfg.auth(), etcd.as_ref(), Some(&out), &opts)?;
            let r = &pulled.report;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "model_id": r.model_id, "bytes": r.bytes, "seconds": r.seconds,
                        "gbps": r.bytes as f64 * 8.0 / r.seconds.max(1e-9) / 1e9,
                        "sources": r.sources, "fallback_bytes": r.fallback_bytes,
                        "verified": r.verified, "corrupt_chunks": r.corrupt_chunks,
                        "dropped": r.dropped, "skipped": r.skipped,
                        "chunks_written": r.chunks_written,
                        "chunks": pulled.manifest.chunk_count(),
                    })
                );
            } else {
                println!(
                    "pulled {} ({} bytes) in {:.2} s, verified; from {}",
                    r.model_id,
                    r.bytes,
                    r.seconds,
                    r.sources
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .chain(
                            (r.fallback_bytes > 0)
                                .then(|| format!("fallback: {}", r.fallback_bytes))
                        )
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if serve {
                use std::io::Write;
                let _ = std::io::stdout().flush();
                eprintln!(
                    "nixl-weights: pull done, serving {} until killed",
                    r.model_id
                );
                let stop = stop_on_signals();
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                drop(pulled.announcements);
                return pulled.published.withdraw().map(|()| ExitCode::SUCCESS);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Unload { name, daemon } => {
            let sock = daemon_socket(daemon.unwrap_or_default());
            nixl_weight_streamer::daemon::release(&sock, &name)?;
            println!("unloaded {name} from the daemon at {}", sock.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ls { etcd, config, json } => {
            let (agent, cfg, _) = agent(config.as_ref(), None, "ls", false)?;
            let etcd = etcd_cfg(&cfg, etcd)?.ok_or_else(|| {
                Error::Invalid("ls needs etcd: --etcd URL or [etcd] in --config".into())
            })?;
            let models = nixl_weight_streamer::pull::list(&agent, &etcd, Duration::from_secs(3))?;
            if json {
                println!("{}", serde_json::json!({ "models": models }));
            } else if models.is_empty() {
                println!("no models announced in etcd");
            } else {
                for m in &models {
                    println!("{}", m["model"].as_str().unwrap_or("?"));
                    for s in m["sources"].as_array().into_iter().flatten() {
                        println!(
                            "  {:<48} {}",
                            s["agent"].as_str().unwrap_or("?"),
                            match s["error"].as_str() {
                                Some(e) => format!("unreachable: {e}"),
                                None => format!(
                                    "{} {}/{} chunks, {} bytes",
                                    s["model_id"].as_str().unwrap_or(""),
                                    s["chunks_held"],
                                    s["chunks"],
                                    s["bytes_held"]
                                ),
                            }
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify { dir, json } => {
            let mpath = dir.join(nixl_weight_streamer::MANIFEST_FILE);
            let stored = match std::fs::read(&mpath) {
                Ok(b) => Some(Manifest::decode(&b)?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(Error::Io {
                        what: format!("reading {}", mpath.display()),
                        source: e,
                    })
                }
            };
            let (name, chunk) = stored
                .as_ref()
                .map_or(("model".to_owned(), manifest::DEFAULT_CHUNK), |m| {
                    (m.name.clone(), m.chunk_size)
                });
            let now = nixl_weight_streamer::source::manifest_of_dir(&dir, &name, chunk)?;
            let diff = stored.as_ref().and_then(|m| m.difference(&now));
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "model_id": now.model_id(), "bytes": now.total_bytes(),
                        "files": now.files.len(), "tensors": now.tensors.len(),
                        "chunks": now.chunk_count(), "checked_against_manifest": stored.is_some(),
                        "ok": diff.is_none(), "difference": diff,
                    })
                );
            } else if let Some(d) = &diff {
                println!("MISMATCH {}: {d}", dir.display());
            } else {
                println!(
                    "{} {}: {} files, {} tensors, {} chunks{}",
                    if stored.is_some() { "OK" } else { "computed" },
                    now.model_id(),
                    now.files.len(),
                    now.tensors.len(),
                    now.chunk_count(),
                    if stored.is_some() {
                        " match the manifest"
                    } else {
                        " (no manifest to check against)"
                    }
                );
            }
            Ok(if diff.is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
