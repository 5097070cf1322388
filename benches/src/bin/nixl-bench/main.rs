//! `nixl-bench`: transfer throughput and latency of a backend, with its ceiling and its peer
//! measured in the same run and printed beside it as ratios.
//!
//! Topologies (`--topology`, by default the backend's own):
//! - `local`: one process; the agent moves bytes between two of its own registered buffers,
//!   naming itself as the remote (backend `local`).
//! - `shm`: two agent processes on this node (backend `shm`); the target's buffer is a memfd the
//!   initiator maps, or malloc'd memory reached by cross-memory attach with `--plain`.
//! - `tcp`: two agent processes in two network namespaces joined by veth (on loopback when
//!   namespaces cannot be made, which it says), tcp only, authenticated.
//!
//! - storage (`--backend uring` or `posix`): one agent moving bytes between its memory and a
//!   file it registered, naming itself as the remote; `--depth` requests in flight, random
//!   block-aligned offsets, buffered and `O_DIRECT` (`--io`). `--compare` runs fio on the same
//!   file with the same block size, depth, pattern and direct flag (the ceiling), and, for
//!   `uring`, the same rows over `posix` (the peer). See `nixl_benches::storage`.
//!
//! - object (`--backend object`): one agent writing and reading whole objects of one block in
//!   an S3-compatible server that nixl-bench starts on loopback (moto), or `--endpoint
//!   HOST:PORT`; `--compare` runs the same PUTs/GETs as plain HTTP against the same server
//!   (the server's own ceiling). See `nixl_benches::object`.
//!
//! `--backend auto` lets the selection policy choose (the agents run every backend of this
//! build; the topology defaults to `shm`); every row says the backend the requests used.
//! Backends this build does not have (`rdma`, `cuda`, `gds`), or that cannot run here, end the
//! run with `nixl-bench: backend X unavailable: <reason>` and exit status 2, never a figure.
//!
//! `--compare` measures, in the same run: memcpy of the same block size and batch on every core of
//! this machine (its copy capacity for that pattern; with `--prepped`/`--stride`, a copy of the
//! same scattered blocks, `memcpy_scattered`) as the ceiling of `local` and `shm`; iperf3 at
//! its best (writes of 128 KiB, 512 KiB and 1 MiB, 1 and 2 streams, the best of the six, once for
//! all rows: the link's limit) as the ceiling of `tcp`;
//! ucx_perftest as the peer of `shm` (`UCX_TLS=sm`, `ucp_put_bw` for WRITE, `ucp_get` for READ,
//! on loopback) and of `tcp` (`ucp_put_bw` over `UCX_TLS=tcp`). A tool that is not installed or
//! fails is reported missing with the reason.
//!
//! `--verify` checks every byte of every row: the source is filled with a pattern that differs
//! per row and per thread, the destination with another, and after the row the side that owns
//! the destination checks it (the target for WRITE, the initiator for READ). A mismatch ends
//! the run with the first bad offset and exit status 1. Test hook: the hidden
//! `--test-corrupt-at OFFSET` flips the byte at OFFSET of the destination after each row's
//! transfers and before the check, so tests can see that `--verify` catches corruption.
//!
//! Exit status: 0 done; 1 failed (a transfer, a `--verify` mismatch, a bad value such as a
//! `--block-sizes` entry); 2 backend unavailable (clap also exits 2 on an unknown flag).

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;

use clap::Parser;
use nixl_benches::harness::{self, human, Progress, Sizing};
use nixl_core::{Agent, BackendName, Desc, DescList, MemKind, Registration, XferOp};
use nixl_tests::netns::{skip_reason, Lab};
use nixl_tests::reference_tools::{self, Measured, UcxOpts};
use nixl_tests::scripted_peer::{check_parts, fill_parts, BenchError, BenchMode, BenchSpec};
use nixl_tests::Peer;
use nixl_transports::config::Config;

#[derive(Parser, Debug, Clone)]
#[command(name = "nixl-bench", about = "nixl-rs transfer benchmark")]
struct Args {
    /// Backend to measure: local, shm, tcp, or auto (the selection policy chooses).
    #[arg(long, default_value = "tcp")]
    backend: String,
    /// local (one process), shm (two processes, one node) or tcp (two processes, two network
    /// namespaces). Default: the backend's own; shm for auto.
    #[arg(long)]
    topology: Option<String>,
    /// `read`, `write`, or `both`.
    #[arg(long, default_value = "both")]
    op: String,
    /// Block sizes (descriptor length), comma separated: 4KiB,1MiB,64MiB.
    #[arg(long, default_value = "64KiB,1MiB,64MiB")]
    block_sizes: String,
    /// Descriptors per request (a comma-separated list gives rows for each: 1,16).
    #[arg(long, default_value = "1")]
    batch: String,
    /// Timed posts per thread and row, after the warm-up (default: size rows by --seconds).
    #[arg(long)]
    iters: Option<u64>,
    /// Untimed posts per thread before each row.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Seconds per row when --iters is not given (also iperf3's duration).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Initiator threads, each with its own request over its own part of the buffers.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Check every byte of every row (see the crate docs).
    #[arg(long)]
    verify: bool,
    /// shm: the target's buffer is malloc'd (cross-memory attach) instead of a memfd.
    #[arg(long)]
    plain: bool,
    /// Connections per peer (the tcp backend's `conns_per_peer`).
    #[arg(long)]
    conns: Option<usize>,
    /// Bytes per chunk (the tcp backend's `chunk_bytes`).
    #[arg(long)]
    chunk: Option<usize>,
    /// Most unanswered chunks per connection (the tcp backend's `window`).
    #[arg(long)]
    window: Option<usize>,
    /// tcp topology: `on` (the agents share a secret, so every connection is TLS 1.3), `off`
    /// (no secret, `allow_open`: plain sockets, zero-copy), or `both` (off then on, one run).
    #[arg(long, default_value = "on")]
    tls: String,
    /// Make each request with `create_xfer_prepped` by index from lists prepared once on each
    /// side, of twice `--batch` blocks, taking every other block (so nothing merges).
    #[arg(long, conflicts_with = "stride")]
    prepped: bool,
    /// As `--prepped`, each side's list one strided descriptor (stride two blocks).
    #[arg(long)]
    stride: bool,
    /// Measure the ceiling (memcpy or iperf3) and the peer (ucx_perftest) in the same run.
    #[arg(long)]
    compare: bool,
    /// One JSON object per row instead of a table.
    #[arg(long)]
    json: bool,
    /// Test hook: flip the destination's byte at OFFSET after each row, before --verify checks.
    #[arg(long, hide = true)]
    test_corrupt_at: Option<usize>,
    /// Storage: requests in flight (comma-separated list).
    #[arg(long, default_value = "1,32")]
    depth: String,
    /// Storage: buffered, direct, or both (comma-separated).
    #[arg(long, default_value = "buffered,direct")]
    io: String,
    /// Storage: directory of the test file (default: the temp dir).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Storage: size of the test file.
    #[arg(long, default_value = "256MiB")]
    file_size: String,
    /// Object: an S3-compatible server already running (HOST:PORT, plain HTTP) instead of
    /// starting moto.
    #[arg(long)]
    endpoint: Option<String>,
    /// cuda: the GPUs of the initiator and the target (default: 0 and the last GPU).
    #[arg(long)]
    gpus: Option<String>,
    /// cuda: the target's VRAM: `vmm` (cuMemCreate, shared by VMM fds) or `legacy` (cuMemAlloc,
    /// shared by CUDA IPC handles).
    #[arg(long, default_value = "vmm")]
    cuda_mem: String,
    /// cuda: the initiator's streams per device (`[cuda] streams_per_device`).
    #[arg(long)]
    cuda_streams: Option<usize>,
    /// cuda: how long post polls a small request itself, microseconds (`[cuda] inline_wait_us`).
    #[arg(long)]
    cuda_inline_us: Option<u64>,
    /// cuda: one cuMemcpyDtoDAsync per copy instead of cuMemcpyBatchAsync (`[cuda]
    /// batch_copies = false`).
    #[arg(long)]
    cuda_single_copies: bool,
    /// cuda: no gather kernel for many small runs (`[cuda] gather_kernel = false`).
    #[arg(long)]
    cuda_no_gather: bool,
    /// Run as a benchmark peer (internal: the processes nixl-bench starts).
    #[arg(long, hide = true, num_args = 0.., allow_hyphen_values = true)]
    peer_mode: Option<Vec<String>>,
    /// Run as the cuda topology's target, writing its metadata to FILE (internal).
    #[arg(long, hide = true)]
    cuda_target: Option<std::path::PathBuf>,
    /// The cuda target's GPU (internal).
    #[arg(long, hide = true, default_value_t = 0)]
    cuda_target_gpu: i32,
    /// The cuda target's buffer size (internal).
    #[arg(long, hide = true, default_value_t = 0)]
    cuda_target_size: usize,
}

/// Why the run ended early.
enum Fail {
    /// The backend cannot run: exit 2.
    Unavailable(String, String),
    /// Anything else: exit 1.
    Other(String),
}

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Fail {
        Fail::Other(e.to_string())
    }
}

type Res<T> = Result<T, Fail>;

impl Args {
    /// `--op`: the operations of the rows.
    fn ops(&self) -> Res<Vec<XferOp>> {
        Ok(match self.op.as_str() {
            "both" => vec![XferOp::Write, XferOp::Read],
            "read" => vec![XferOp::Read],
            "write" => vec![XferOp::Write],
            o => return Err(Fail::Other(format!("--op {o:?}: read, write or both"))),
        })
    }

    /// `--block-sizes`: the block sizes of the rows.
    fn block_sizes(&self) -> Res<Vec<usize>> {
        nixl_transports::units::parse_lens(&self.block_sizes)
            .map_err(|e| Fail::Other(format!("--block-sizes: {e}")))
    }
}

mod cuda;
mod report;
mod setup;
mod storage;
mod transfer;
use cuda::*;
use report::*;
use setup::*;
use storage::*;
use transfer::*;

fn main() {
    let args = Args::parse();
    if let Some(peer_args) = &args.peer_mode {
        if let Err(e) = nixl_tests::scripted_peer::run(peer_args) {
            eprintln!("nixl-bench peer: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Some(meta) = &args.cuda_target {
        let legacy = args.cuda_mem == "legacy";
        if let Err(e) = nixl_benches::cuda::target_main(
            meta,
            args.cuda_target_gpu,
            args.cuda_target_size,
            legacy,
        ) {
            eprintln!("nixl-bench cuda target: {e}");
            std::process::exit(1);
        }
        return;
    }
    let res = match args.tls.as_str() {
        "on" | "off" => run(&args),
        "both" => ["off", "on"].iter().try_for_each(|m| {
            let mut a = args.clone();
            a.tls = (*m).to_owned();
            run(&a)
        }),
        t => Err(Fail::Other(format!("--tls {t:?}: on, off or both"))),
    };
    match res {
        Ok(()) => {}
        Err(Fail::Unavailable(b, why)) => {
            eprintln!("nixl-bench: backend {b} unavailable: {why}");
            std::process::exit(2);
        }
        Err(Fail::Other(e)) => {
            eprintln!("nixl-bench: {e}");
            std::process::exit(1);
        }
    }
}
