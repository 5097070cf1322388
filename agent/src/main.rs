//! `nixl-agent`: the nixl-rs agent binary.
//!
//! Today it runs the two-process demo (`nixl-agent demo`); the per-node daemon (etcd
//! registration, health checks, Prometheus metrics, service jobs) comes with later work and is
//! not here yet.

mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "nixl-agent", version, about = "nixl-rs agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a target agent process, move data to it and back one-sidedly, verify every byte,
    /// and report GB/s next to memcpy (the default command).
    Demo(demo::DemoArgs),
    /// The target side of the demo (started by `demo`).
    #[command(hide = true)]
    DemoTarget(demo::TargetArgs),
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
    let result = match cli.cmd {
        None => demo::run(&demo::DemoArgs::default()),
        Some(Cmd::Demo(args)) => demo::run(&args),
        Some(Cmd::DemoTarget(args)) => demo::target(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixl-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
