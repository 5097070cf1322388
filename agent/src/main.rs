//! `nixl-agent`: the nixl-rs agent binary.
//!
//! - `nixl-agent serve [--config FILE]`: the per-node daemon (see the `nixl_agent` library docs
//!   and the README). Exits 0 after a drain on SIGTERM/SIGINT, 2 for a configuration it cannot
//!   use (the message names the key), 1 when it cannot start (a port in use, an unusable socket
//!   path).
//! - `nixl-agent status [--socket PATH] [--json]`: what a running daemon reports.
//! - `nixl-agent demo`: the two-process demo (the default command).

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "nixl-agent", version, about = "nixl-rs agent")]
struct Cli {
    /// Log lines as text (default) or as JSON objects, one per line (for log pipelines).
    /// The filter is `NIXL_LOG` (default `warn`; `info` for `serve`).
    #[arg(long, value_enum, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a target agent process, move data to it and back one-sidedly, verify every byte,
    /// and report GB/s next to memcpy (the default command).
    Demo(demo::DemoArgs),
    /// Run the per-node daemon until SIGTERM or SIGINT.
    Serve {
        /// The agent's TOML configuration with its [daemon] section (default: built-in
        /// defaults, see the README).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Ask a running daemon for its status.
    Status {
        /// The daemon's control socket (default: as `serve` picks it).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the daemon's JSON as it is.
        #[arg(long)]
        json: bool,
    },
    /// The target side of the demo (started by `demo`).
    #[command(hide = true)]
    DemoTarget(demo::TargetArgs),
}

fn init_logs(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIXL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_serve = matches!(cli.cmd, Some(Cmd::Serve { .. }));
    init_logs(cli.log_format, if is_serve { "info" } else { "warn" });
    let result = match cli.cmd {
        None => demo::run(&demo::DemoArgs::default()),
        Some(Cmd::Demo(args)) => demo::run(&args),
        Some(Cmd::DemoTarget(args)) => demo::target(&args),
        Some(Cmd::Serve { config }) => {
            let r =
                nixl_agent::serve::load_config(config.as_deref()).and_then(nixl_agent::serve::run);
            return match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "nixl-agent serve stopped");
                    eprintln!("nixl-agent: {e}");
                    match e {
                        nixl_agent::ServeError::Config(_) => ExitCode::from(2),
                        _ => ExitCode::FAILURE,
                    }
                }
            };
        }
        Some(Cmd::Status { socket, json }) => status(socket, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixl-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(socket: Option<PathBuf>, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let path = socket.unwrap_or_else(nixl_agent::config::default_control_socket);
    let s = nixl_agent::control::Client::new(path).get("/v1/status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "agent {}  ready: {}{}",
        s["agent"].as_str().unwrap_or("?"),
        s["ready"],
        s["not_ready_reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    if let Some(b) = s["backends"].as_object() {
        for (name, state) in b {
            println!("  backend {name:<7} {}", state.as_str().unwrap_or("?"));
        }
    }
    println!("  etcd: {}", s["etcd"]["state"].as_str().unwrap_or("?"));
    for p in s["peers"].as_array().into_iter().flatten() {
        println!(
            "  peer {:<20} {}",
            p["name"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?")
        );
    }
    println!(
        "  registered: {} regions, {} bytes; in flight: {}; pool: {} of {} bytes lent",
        s["registered"]["regions"],
        s["registered"]["bytes"],
        s["in_flight_requests"],
        s["pool"]["used"],
        s["pool"]["size"]
    );
    Ok(())
}
