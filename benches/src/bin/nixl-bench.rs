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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topo {
    Local,
    Shm,
    Tcp,
}

impl Topo {
    fn as_str(self) -> &'static str {
        match self {
            Topo::Local => "local",
            Topo::Shm => "shm",
            Topo::Tcp => "tcp",
        }
    }
}

/// The network side of the `tcp` topology.
struct Net {
    lab: Option<Lab>,
    target_ip: IpAddr,
    initiator_ip: IpAddr,
    what: String,
}

impl Net {
    fn new() -> Net {
        match skip_reason() {
            None => {
                let lab = Lab::pair();
                Net {
                    target_ip: lab.addr(1),
                    initiator_ip: lab.addr(0),
                    what: format!(
                        "two network namespaces joined by veth ({} -> {})",
                        lab.addr(0),
                        lab.addr(1)
                    ),
                    lab: Some(lab),
                }
            }
            Some(why) => Net {
                lab: None,
                target_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                initiator_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                what: format!("loopback, one network namespace ({why})"),
            },
        }
    }

    /// iperf3 from the initiator's host to the target's, `streams` streams.
    fn iperf3(&self, block: usize, streams: usize, seconds: f64) -> Measured {
        match &self.lab {
            Some(l) => reference_tools::iperf3(l, 1, 0, block, seconds, streams),
            None => reference_tools::iperf3_loopback(block, seconds, streams),
        }
    }

    /// ucx_perftest's one-sided put from the initiator's host to the target's.
    fn ucx_put_bw(&self, block: usize, iters: usize) -> Measured {
        match &self.lab {
            Some(l) => reference_tools::ucx_put_bw(l, 1, 0, block, iters),
            None => reference_tools::ucx_put_bw_loopback(block, iters),
        }
    }

    fn command(&self, i: usize, exe: &str) -> Command {
        match &self.lab {
            Some(l) => l.command(i, exe),
            None => Command::new(exe),
        }
    }
}

/// The `local` topology: one agent, two registered buffers, transfers to itself.
struct LocalSide {
    // Dropped first: deregistration before the buffers go.
    _reg: Registration,
    agent: Agent,
    /// The initiator's buffer (WRITE's source, READ's destination).
    a: Vec<u8>,
    /// The "target's" buffer.
    b: Vec<u8>,
}

/// Two agent processes: `shm` and `tcp`.
struct Procs {
    // Dropped before `net` (whose namespaces they run in).
    init: Peer,
    target: Peer,
    target_name: String,
    net: Option<Net>,
    dir: std::path::PathBuf,
}

impl Drop for Procs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum Setup {
    Local(LocalSide),
    Procs(Box<Procs>),
}

/// Which buffer: the initiator's or the target's.
#[derive(Clone, Copy, Debug)]
enum Side {
    Init,
    Target,
}

impl Setup {
    fn what(&self) -> String {
        match self {
            Setup::Local(_) => "one process, transfers between two of its own buffers".into(),
            Setup::Procs(p) => match &p.net {
                Some(n) => format!("two processes, {}", n.what),
                None => "two processes on this node".into(),
            },
        }
    }

    fn fill(&mut self, side: Side, seed: u64, part: usize, n: usize) -> Res<()> {
        match (self, side) {
            (Setup::Local(l), Side::Init) => Ok(fill_parts(&mut l.a, seed, part, n)?),
            (Setup::Local(l), Side::Target) => Ok(fill_parts(&mut l.b, seed, part, n)?),
            (Setup::Procs(p), side) => {
                let peer = p.peer(side);
                let r = peer.cmd(&format!("fill {seed} {part} {n}"));
                if r == "ok" {
                    Ok(())
                } else {
                    Err(Fail::Other(format!("fill: {r}")))
                }
            }
        }
    }

    /// The first bad offset of the destination, if any.
    fn check(&mut self, side: Side, seed: u64, part: usize, n: usize) -> Res<Option<usize>> {
        match (self, side) {
            (Setup::Local(l), Side::Init) => Ok(check_parts(&l.a, seed, part, n)?),
            (Setup::Local(l), Side::Target) => Ok(check_parts(&l.b, seed, part, n)?),
            (Setup::Procs(p), side) => {
                let r = p.peer(side).cmd(&format!("check {seed} {part} {n}"));
                match r.split_whitespace().collect::<Vec<_>>().as_slice() {
                    ["ok"] => Ok(None),
                    ["bad", off] => Ok(Some(off.parse()?)),
                    _ => Err(Fail::Other(format!("check: {r}"))),
                }
            }
        }
    }

    fn poke(&mut self, side: Side, off: usize) -> Res<()> {
        let buf = match (self, side) {
            (Setup::Local(l), Side::Init) => &mut l.a,
            (Setup::Local(l), Side::Target) => &mut l.b,
            (Setup::Procs(p), side) => {
                let r = p.peer(side).cmd(&format!("poke {off}"));
                return if r == "ok" {
                    Ok(())
                } else {
                    Err(Fail::Other(format!("poke: {r}")))
                };
            }
        };
        let b = buf
            .get_mut(off)
            .ok_or_else(|| Fail::Other(format!("--test-corrupt-at {off}: past the buffer")))?;
        *b ^= 0xff;
        Ok(())
    }

    /// Runs one row; returns what the initiator measured.
    fn bench(&mut self, spec: &BenchSpec, backend_arg: &str) -> Res<Row> {
        match self {
            Setup::Local(l) => {
                let a = Desc::new(l.a.as_ptr() as u64, l.a.len() as u64, 0);
                let b = Desc::new(l.b.as_ptr() as u64, l.b.len() as u64, 0);
                match nixl_tests::scripted_peer::bench(&l.agent, l.agent.name(), a, b, spec) {
                    Ok(r) => Ok(Row {
                        gbps: r.gbps,
                        posts: r.posts,
                        p50_us: r.p50_us,
                        p99_us: r.p99_us,
                        backend: r.backend.to_string(),
                        seconds: r.seconds,
                        create_us: r.create_us,
                    }),
                    Err(BenchError::Unavailable(e)) => {
                        Err(Fail::Unavailable(backend_arg.into(), e.to_string()))
                    }
                    Err(e) => Err(Fail::Other(e.to_string())),
                }
            }
            Setup::Procs(p) => {
                let mut c = format!(
                    "bench {} {} {} {} {} threads={} iters={} warmup={}",
                    p.target_name,
                    spec.op.as_str(),
                    spec.block,
                    spec.batch,
                    spec.seconds,
                    spec.threads,
                    spec.iters,
                    spec.warmup
                );
                if let Some(b) = spec.backend {
                    c += &format!(" backend={b}");
                }
                if spec.mode != BenchMode::Plain {
                    c += &format!(" mode={}", spec.mode.as_str());
                }
                let r = p.init.cmd(&c);
                if let Some(why) = r.strip_prefix("unavailable ") {
                    return Err(Fail::Unavailable(backend_arg.into(), why.into()));
                }
                let w: Vec<&str> = r.split_whitespace().collect();
                if w.first() != Some(&"ok") || w.len() < 8 {
                    return Err(Fail::Other(format!("bench: {r}")));
                }
                Ok(Row {
                    gbps: w[1].parse()?,
                    posts: w[2].parse()?,
                    p50_us: w[3].parse()?,
                    p99_us: w[4].parse()?,
                    backend: w[5].into(),
                    seconds: w[6].parse()?,
                    create_us: w[7].parse()?,
                })
            }
        }
    }
}

impl Procs {
    fn peer(&mut self, side: Side) -> &mut Peer {
        match side {
            Side::Init => &mut self.init,
            Side::Target => &mut self.target,
        }
    }
}

/// What the initiator measured for one row.
struct Row {
    gbps: f64,
    posts: u64,
    p50_us: f64,
    p99_us: f64,
    backend: String,
    seconds: f64,
    /// Median time to create one request, µs.
    create_us: f64,
}

/// Builds the `local` topology with buffers of `size` bytes.
fn local_setup(backends: &str, size: usize) -> Res<LocalSide> {
    let cfg = Config::from_toml(backends)?;
    let agent = Agent::builder("bench-local")
        .backends(cfg.backends()?)
        .build()?;
    // Filled, so every page is faulted in before timing.
    let mut a = vec![1u8; size];
    let mut b = vec![2u8; size];
    let list = DescList::from_descs(
        MemKind::Dram,
        vec![Desc::from_mut_slice(&mut a), Desc::from_mut_slice(&mut b)],
    )?;
    // SAFETY: `a` and `b` are moved into the `LocalSide` that also holds the registration,
    // which is dropped (deregistered) first; moving a Vec does not move its heap buffer. This
    // process touches the buffers (fill, check, poke) only between rows, when no transfer runs.
    let reg = unsafe { agent.register(&list)? };
    Ok(LocalSide {
        _reg: reg,
        agent,
        a,
        b,
    })
}

/// Starts the two agent processes of `shm` or `tcp`, with buffers of `size` bytes.
fn procs_setup(topo: Topo, args: &Args, backends: &str, size: usize) -> Res<Procs> {
    let dir = std::env::temp_dir().join(format!("nixl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let write_cfg = |name: &str, body: &str| -> Res<String> {
        let p = dir.join(name);
        std::fs::write(&p, format!("{backends}{body}"))?;
        Ok(p.to_string_lossy().into_owned())
    };
    match topo {
        Topo::Shm => {
            let tcfg = write_cfg("target.toml", "")?;
            let icfg = write_cfg("initiator.toml", "")?;
            let mut t = Command::new(&exe);
            t.args(["--peer-mode", "--config", &tcfg]);
            if !args.plain {
                t.arg("--memfd");
            }
            let target = Peer::spawn(t, "bench-target", size);
            let mut i = Command::new(&exe);
            i.args(["--peer-mode", "--config", &icfg]);
            let mut init = Peer::spawn(i, "bench-initiator", size);
            let r = init.cmd(&format!("load {}", nixl_tests::hex(&target.metadata)));
            if !r.starts_with("ok") {
                return Err(Fail::Other(format!(
                    "initiator could not load the target: {r}"
                )));
            }
            Ok(Procs {
                init,
                target,
                target_name: "bench-target".into(),
                net: None,
                dir,
            })
        }
        Topo::Tcp | Topo::Local => {
            let net = Net::new();
            let secret = format!("{:016x}", nixl_core::random_u64()?);
            let mut tuning = String::new();
            if let Some(c) = args.conns {
                tuning += &format!("conns_per_peer = {c}\n");
            }
            if let Some(c) = args.chunk {
                tuning += &format!("chunk_bytes = {c}\n");
            }
            let target_addr =
                SocketAddr::new(net.target_ip, 17000 + (std::process::id() % 1000) as u16);
            let auth = if args.tls == "off" {
                "allow_open = true\n".to_owned()
            } else {
                format!("secret = \"{secret}\"\n")
            };
            let body =
                |listen: String| format!("[tcp]\nlisten = \"{listen}\"\n{tuning}[auth]\n{auth}");
            let tcfg = write_cfg("target.toml", &body(target_addr.to_string()))?;
            let icfg = write_cfg(
                "initiator.toml",
                &body(SocketAddr::new(net.initiator_ip, 0).to_string()),
            )?;
            let start = |i: usize, name: &str, cfg: &str| {
                let mut c = net.command(i, &exe);
                c.args(["--peer-mode", "--config", cfg]);
                Peer::spawn(c, name, size)
            };
            let target = start(1, "bench-target", &tcfg);
            let mut init = start(0, "bench-initiator", &icfg);
            let r = init.cmd(&format!("fetch {target_addr}"));
            if !r.starts_with("ok") {
                return Err(Fail::Other(format!(
                    "initiator could not reach the target: {r}"
                )));
            }
            Ok(Procs {
                init,
                target,
                target_name: "bench-target".into(),
                net: Some(net),
                dir,
            })
        }
    }
}

/// Why backend `b` cannot run on this host (its own probe), or `None` when it can.
fn probe_reason(b: &str) -> Option<String> {
    let cfg = Config::from_toml(&format!("backends = [\"{b}\"]\n")).ok()?;
    let backends = cfg.backends().ok()?;
    backends
        .iter()
        .find_map(|x| x.probe().err().map(|e| e.to_string()))
}

fn run(args: &Args) -> Res<()> {
    let backend = args.backend.as_str();
    if matches!(backend, "uring" | "posix" | "object") && args.topology.is_none() {
        return run_storage(args);
    }
    let named = match backend {
        "auto" => None,
        b => match BackendName::parse(b) {
            // Built in this build? The configuration knows (and says which are).
            Some(name) => match Config::from_toml(&format!("backends = [\"{b}\"]\n")) {
                Ok(_) => Some(name),
                Err(e) => {
                    return Err(Fail::Unavailable(
                        b.into(),
                        format!("not implemented in this build: {e}"),
                    ))
                }
            },
            None => {
                return Err(Fail::Other(format!(
                    "--backend {b:?}: unknown (auto, or one of {})",
                    BackendName::ALL.map(|n| n.as_str()).join(", ")
                )))
            }
        },
    };
    let topo = match args.topology.as_deref() {
        Some(t) => t,
        None => match backend {
            "auto" => "shm",
            b @ ("local" | "shm" | "tcp") => b,
            b => {
                // The backend's own probe says why it cannot run on this host.
                if let Some(why) = probe_reason(b) {
                    return Err(Fail::Unavailable(b.into(), why));
                }
                match b {
                    // Two agents in two network namespaces, the bytes over the RDMA device.
                    "rdma" => "tcp",
                    // Two processes of this node, VRAM to VRAM.
                    "cuda" => return run_cuda(args),
                    _ => {
                        return Err(Fail::Unavailable(
                            b.into(),
                            "it runs on this host, but nixl-bench has no topology for it yet \
                             (local, shm and tcp move DRAM to DRAM between agents; --topology \
                             names one to try)"
                                .into(),
                        ))
                    }
                }
            }
        },
    };
    let topo = match topo {
        "local" => Topo::Local,
        "shm" => Topo::Shm,
        "tcp" => Topo::Tcp,
        t => return Err(Fail::Other(format!("--topology {t:?}: local, shm or tcp"))),
    };
    let ops: Vec<XferOp> = match args.op.as_str() {
        "both" => vec![XferOp::Write, XferOp::Read],
        "read" => vec![XferOp::Read],
        "write" => vec![XferOp::Write],
        o => return Err(Fail::Other(format!("--op {o:?}: read, write or both"))),
    };
    let blocks = harness::parse_sizes(&args.block_sizes)
        .map_err(|e| Fail::Other(format!("--block-sizes: {e}")))?;
    let batches =
        harness::parse_counts(&args.batch).map_err(|e| Fail::Other(format!("--batch: {e}")))?;
    if args.threads == 0 {
        return Err(Fail::Other("--threads must be at least 1".into()));
    }
    if args.iters == Some(0) {
        return Err(Fail::Other("--iters must be at least 1".into()));
    }
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err(Fail::Other("--seconds must be a positive number".into()));
    }
    let threads = args.threads;
    let mode = match (args.prepped, args.stride) {
        (true, _) => BenchMode::Prepped,
        (_, true) => BenchMode::Stride,
        _ => BenchMode::Plain,
    };
    if mode != BenchMode::Plain && args.verify {
        return Err(Fail::Other(
            "--verify checks whole parts: not with --prepped or --stride (their bytes are \
             checked by transports/tests/prepped.rs)"
                .into(),
        ));
    }
    let size = blocks
        .iter()
        .max()
        .copied()
        .unwrap_or(1)
        .checked_mul(*batches.iter().max().unwrap_or(&1))
        .and_then(|v| v.checked_mul(threads))
        .and_then(|v| v.checked_mul(mode.spread()))
        .ok_or_else(|| Fail::Other("block size × batch × threads overflows".into()))?;
    let sizing = Sizing {
        warmup: args.warmup,
        iters: args.iters.unwrap_or(0),
        seconds: args.seconds,
    };

    let backends = match named {
        Some(b) => format!("backends = [\"{b}\"]\n"),
        None => String::new(),
    };
    let mut setup = match topo {
        Topo::Local => Setup::Local(local_setup(&backends, size)?),
        _ => Setup::Procs(Box::new(procs_setup(topo, args, &backends, size)?)),
    };
    // A named backend that the agents could not start is unavailable (with their reason).
    if let Some(b) = named {
        match &mut setup {
            Setup::Local(l) => match l.agent.backends().iter().find(|s| s.name == b) {
                None => return Err(Fail::Unavailable(backend.into(), "not running".into())),
                Some(s) => {
                    if let Some(why) = &s.unavailable {
                        return Err(Fail::Unavailable(backend.into(), why.clone()));
                    }
                }
            },
            Setup::Procs(p) => {
                for (who, side) in [("target", Side::Target), ("initiator", Side::Init)] {
                    let r = p.peer(side).cmd(&format!("backend {b}"));
                    if r != "ok" {
                        return Err(Fail::Unavailable(backend.into(), format!("{who}: {r}")));
                    }
                }
            }
        }
    }
    if !args.verify {
        setup.fill(Side::Target, 1, size, 1)?;
        setup.fill(Side::Init, 2, size, 1)?;
    }

    let sized = match args.iters {
        Some(n) => format!("{n} posts per thread after {} warm-up", args.warmup),
        None => format!(
            "{} s per row after {} warm-up posts",
            args.seconds, args.warmup
        ),
    };
    // With --prepped or --stride, the ceiling copies the same scattered blocks.
    let copy_name = if mode == BenchMode::Plain {
        "memcpy"
    } else {
        "memcpy_scattered"
    };
    let (baseline_name, peer_name) = match topo {
        Topo::Local => (copy_name, None),
        Topo::Shm => (copy_name, Some("ucx_perftest UCX_TLS=sm")),
        Topo::Tcp => ("iperf3", Some("ucx_perftest ucp_put_bw UCX_TLS=tcp")),
    };
    if !args.json {
        println!(
            "nixl-bench {} (topology {}): {}",
            backend,
            topo.as_str(),
            setup.what()
        );
        if topo == Topo::Tcp {
            println!(
                "  tcp connections: {}",
                if args.tls == "off" {
                    "plain (no secret, allow_open; zero-copy readv/writev)"
                } else {
                    "TLS 1.3 (shared secret; rustls, AES-128-GCM)"
                }
            );
        }
        println!(
            "  {sized}; {threads} thread(s){}{}",
            if args.verify {
                "; every byte verified"
            } else {
                ""
            },
            match (&setup, args.plain) {
                (Setup::Procs(p), true) if p.net.is_none() => "; target buffer malloc'd",
                (Setup::Procs(p), false) if p.net.is_none() => "; target buffer a memfd",
                _ => "",
            }
        );
        if args.compare {
            println!(
                "  ceiling: {baseline_name}{}; peer: {}",
                match topo {
                    Topo::Tcp => " at its best (writes of 128 KiB, 512 KiB, 1 MiB; 1 and 2 streams), once for all rows",
                    _ if mode != BenchMode::Plain => " of the same scattered blocks (every other block, same block and batch; on every core, this process)",
                    _ => " (same block and batch, on every core, this process)",
                },
                match topo {
                    Topo::Local => "none",
                    Topo::Shm => "ucx_perftest UCX_TLS=sm on loopback (ucp_put_bw for write, ucp_get for read; one block per message)",
                    Topo::Tcp => "ucx_perftest ucp_put_bw, UCX_TLS=tcp",
                }
            );
        } else {
            println!("  ceiling and peer not measured (add --compare)");
        }
        println!();
        println!(
            "{:>7} {:>5} {:>5} {:>3} {:>8} {:>9} {:>8} {:>8} {:>9} {:>7} | {:>8} {:>6} | {:>8} {:>6}",
            "block",
            "batch",
            "op",
            "thr",
            "GB/s",
            "req/s",
            "p50 us",
            "p99 us",
            "create us",
            "backend",
            baseline_name,
            "ratio",
            "peer",
            "ratio"
        );
    }

    let mut progress = Progress::new(
        std::io::stderr().is_terminal() && !args.json,
        blocks.len() * batches.len() * ops.len(),
    );
    let mut row_index: u64 = 0;
    // The link's ceiling (tcp): measured once, at iperf3's best.
    let mut link_ceiling: Option<Measured> = None;
    for &block in &blocks {
        // Per block: ucx over tcp does not depend on the op or the batch.
        let mut tcp_peer = None;
        for &batch in &batches {
            let mut copy_ceiling = None;
            for &op in &ops {
                row_index += 1;
                let label = format!("{} x{batch} {}", human(block), op.as_str());
                progress.next(&label);
                let spec = BenchSpec {
                    op,
                    block,
                    batch,
                    threads,
                    iters: sizing.iters,
                    warmup: sizing.warmup,
                    seconds: sizing.seconds,
                    backend: named,
                    mode,
                };
                let part = block * batch;
                let (src, dst) = match op {
                    XferOp::Write => (Side::Init, Side::Target),
                    XferOp::Read => (Side::Target, Side::Init),
                };
                // Seeds: per row; fill_parts adds the thread index.
                let seed = row_index << 16;
                let other = seed + (1 << 12);
                if args.verify {
                    setup.fill(src, seed, part, threads)?;
                    setup.fill(dst, other, part, threads)?;
                }
                let r = setup.bench(&spec, backend)?;
                if args.verify {
                    progress.step(&format!("{label}: verifying"));
                    if let Some(off) = args.test_corrupt_at {
                        setup.poke(dst, off)?;
                    }
                    if let Some(off) = setup.check(dst, seed, part, threads)? {
                        progress.clear();
                        return Err(Fail::Other(format!(
                            "--verify: {label}: the destination ({}) differs from the source \
                             at offset {off} (first bad byte)",
                            match dst {
                                Side::Init => "initiator",
                                Side::Target => "target",
                            }
                        )));
                    }
                }

                let (baseline, peer) = if args.compare {
                    match topo {
                        Topo::Local | Topo::Shm => {
                            progress.step(&format!("{label}: memcpy"));
                            // The machine's copy capacity for this pattern: the same blocks and
                            // batch, on every core (one thread would be no ceiling for a
                            // backend that copies with several); with --prepped or --stride the
                            // same scattered blocks (every other one).
                            let c = copy_ceiling
                                .get_or_insert_with(|| {
                                    let all = harness::cores().max(threads);
                                    let spread = mode.spread();
                                    let buf = size.max(block * batch * spread * all);
                                    let m = harness::memcpy_spread(
                                        block, batch, spread, all, buf, sizing,
                                    );
                                    Measured::Gbps(m.gbps)
                                })
                                .clone();
                            let p = if topo == Topo::Shm {
                                progress.step(&format!("{label}: ucx_perftest"));
                                let test = match op {
                                    XferOp::Write => "ucp_put_bw",
                                    XferOp::Read => "ucp_get",
                                };
                                let opts = UcxOpts {
                                    args: &[],
                                    env: &[("UCX_TLS", "sm")],
                                };
                                let m = reference_tools::ucx_perftest_loopback(
                                    test,
                                    block,
                                    ucx_iters(block, args.iters, batch, threads),
                                    opts,
                                );
                                Some((format!("ucx_perftest {test} UCX_TLS=sm"), m))
                            } else {
                                None
                            };
                            (c, p)
                        }
                        Topo::Tcp => {
                            let Some(net) = (match &setup {
                                Setup::Procs(p) => p.net.as_ref(),
                                Setup::Local(_) => None,
                            }) else {
                                unreachable!("the tcp topology has a network")
                            };
                            // The link's limit: iperf3 at its best write size and stream count,
                            // measured once for every row (iperf3 refuses writes over 1 MiB, and
                            // its 4 KiB writes are no ceiling for a batched request).
                            let c = link_ceiling
                                .get_or_insert_with(|| {
                                    progress.step(&format!("{label}: iperf3 (best of 6)"));
                                    let secs = args.seconds.max(1.0);
                                    let mut best: Option<f64> = None;
                                    let mut last = Measured::Missing("not run".into());
                                    for b in [128 << 10, 512 << 10, 1 << 20] {
                                        for streams in [1, 2] {
                                            let m = net.iperf3(b, streams, secs);
                                            if let Some(g) = m.gbps() {
                                                best = Some(best.map_or(g, |x: f64| x.max(g)));
                                            }
                                            last = m;
                                        }
                                    }
                                    best.map_or(last, Measured::Gbps)
                                })
                                .clone();
                            let p = tcp_peer
                                .get_or_insert_with(|| {
                                    progress.step(&format!("{label}: ucx_perftest"));
                                    net.ucx_put_bw(block, ucx_iters(block, args.iters, batch, 1))
                                })
                                .clone();
                            (c, Some((peer_name.unwrap_or_default().to_owned(), p)))
                        }
                    }
                } else {
                    (Measured::Missing("not run".into()), None)
                };

                progress.clear();
                let rps = r.posts as f64 / r.seconds.max(1e-9);
                let ratio = |m: &Measured| m.gbps().map(|c| r.gbps / c);
                if args.json {
                    let mut o = serde_json::json!({
                        "topology": topo.as_str(),
                        "backend": r.backend,
                        "backend_requested": backend,
                        "op": op.as_str(),
                        "block_size": block,
                        "batch": batch,
                        "threads": threads,
                        "iters": r.posts / threads as u64,
                        "warmup": args.warmup,
                        "posts": r.posts,
                        "seconds": r.seconds,
                        "gbps": r.gbps,
                        "req_per_s": rps,
                        "p50_us": r.p50_us,
                        "p99_us": r.p99_us,
                        "create_us": r.create_us,
                        "mode": mode.as_str(),
                        "verified": args.verify,
                    });
                    if args.compare {
                        o["baseline"] = baseline_name.into();
                        o["baseline_gbps"] = baseline.gbps().into();
                        o["ratio"] = ratio(&baseline).into();
                        if let Measured::Missing(why) = &baseline {
                            o["baseline_missing"] = why.clone().into();
                        }
                        if let Some((name, m)) = &peer {
                            o["peer"] = name.clone().into();
                            o["peer_gbps"] = m.gbps().into();
                            o["peer_ratio"] = ratio(m).into();
                            if let Measured::Missing(why) = m {
                                o["peer_missing"] = why.clone().into();
                            }
                        }
                    }
                    println!("{o}");
                } else {
                    let fmt = |m: Option<&Measured>| match m.and_then(Measured::gbps) {
                        Some(g) => (format!("{g:.2}"), format!("{:.2}", r.gbps / g)),
                        None => ("-".into(), "-".into()),
                    };
                    let (c, cr) = fmt(Some(&baseline));
                    let (u, ur) = fmt(peer.as_ref().map(|p| &p.1));
                    println!(
                        "{:>7} {:>5} {:>5} {:>3} {:>8.2} {:>9.0} {:>8.1} {:>8.1} {:>9.1} {:>7} | {:>8} {:>6} | {:>8} {:>6}",
                        human(block), batch, op.as_str(), threads, r.gbps, rps, r.p50_us,
                        r.p99_us, r.create_us, r.backend, c, cr, u, ur
                    );
                    if args.compare {
                        if let Measured::Missing(why) = &baseline {
                            println!("        {baseline_name} missing: {why}");
                        }
                        if let Some((name, Measured::Missing(why))) = &peer {
                            println!("        {name} missing: {why}");
                        }
                    }
                }
            }
        }
    }
    progress.clear();
    drop(setup);
    Ok(())
}

/// Iterations for ucx_perftest: about 2 GiB per row when rows are sized by time, else as many
/// messages as the row's blocks; at least 200, at most 100 000.
fn ucx_iters(block: usize, iters: Option<u64>, batch: usize, threads: usize) -> usize {
    match iters {
        None => ((2usize << 30) / block).clamp(200, 100_000),
        Some(n) => (n as usize)
            .saturating_mul(batch)
            .saturating_mul(threads)
            .clamp(200, 100_000),
    }
}

/// The `cuda` topology: two processes, VRAM to VRAM, next to `cuMemcpyDtoDAsync` in one process
/// (see `nixl_benches::cuda`).
fn run_cuda(args: &Args) -> Res<()> {
    use nixl_benches::cuda::{buffer_bytes, ceiling, CudaPair, CudaRow};
    use nixl_transports::cuda::CudaConfig;
    let ops: Vec<XferOp> = match args.op.as_str() {
        "both" => vec![XferOp::Write, XferOp::Read],
        "read" => vec![XferOp::Read],
        "write" => vec![XferOp::Write],
        o => return Err(Fail::Other(format!("--op {o:?}: read, write or both"))),
    };
    let legacy = match args.cuda_mem.as_str() {
        "vmm" => false,
        "legacy" => true,
        m => return Err(Fail::Other(format!("--cuda-mem {m:?}: vmm or legacy"))),
    };
    let blocks = harness::parse_sizes(&args.block_sizes)
        .map_err(|e| Fail::Other(format!("--block-sizes: {e}")))?;
    let batches =
        harness::parse_counts(&args.batch).map_err(|e| Fail::Other(format!("--batch: {e}")))?;
    if args.threads != 1 {
        return Err(Fail::Other(
            "the cuda topology posts from one thread (--threads 1)".into(),
        ));
    }
    let mut cfg = CudaConfig::default();
    if let Some(n) = args.cuda_streams {
        cfg.streams_per_device = n.max(1);
    }
    if let Some(us) = args.cuda_inline_us {
        cfg.inline_wait = std::time::Duration::from_micros(us);
    }
    cfg.batch_copies = !args.cuda_single_copies;
    cfg.gather_kernel = !args.cuda_no_gather;
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err(Fail::Other("--seconds must be a positive number".into()));
    }
    let count = nixl_transports::cuda::driver::driver()
        .map_err(|e| Fail::Unavailable("cuda".into(), e))?
        .device_count();
    let (init_dev, target_dev) = match &args.gpus {
        None => (0, (count - 1).max(0)),
        Some(g) => {
            let v: Vec<i32> = g
                .split(',')
                .map(|x| x.trim().parse::<i32>())
                .collect::<Result<_, _>>()
                .map_err(|e| Fail::Other(format!("--gpus {g:?}: {e}")))?;
            match v.as_slice() {
                [a, b] if (0..count).contains(a) && (0..count).contains(b) => (*a, *b),
                _ => {
                    return Err(Fail::Other(format!(
                        "--gpus {g:?}: two GPU ordinals below {count}, e.g. 0,1"
                    )))
                }
            }
        }
    };
    let mut size = 1usize;
    for &b in &blocks {
        for &n in &batches {
            size = size.max(
                buffer_bytes(b, n)
                    .ok_or_else(|| Fail::Other("block size × batch overflows".into()))?,
            );
        }
    }
    let (streams, inline, batched, gather) = (
        cfg.streams_per_device,
        cfg.inline_wait,
        cfg.batch_copies,
        cfg.gather_kernel,
    );
    let exe = std::env::current_exe()?;
    let pair = CudaPair::start(&exe, init_dev, target_dev, size, legacy, cfg)
        .map_err(|e| Fail::Unavailable("cuda".into(), e))?;
    if args.verify {
        pair.verify().map_err(Fail::Other)?;
    }
    let mem = if legacy {
        "cuMemAlloc (CUDA IPC handle)"
    } else {
        "cuMemCreate (VMM fd)"
    };
    if !args.json {
        println!(
            "nixl-bench cuda: two processes on this node, GPU {init_dev} -> GPU {target_dev}, \
             target VRAM from {mem}; {} s per row; {streams} stream(s), inline wait {} us, {}{}",
            args.seconds,
            inline.as_micros(),
            match (gather, batched) {
                (true, true) => "gather kernel or batched copies",
                (true, false) => "gather kernel or single copies",
                (false, true) => "batched copies",
                (false, false) => "single copies",
            },
            if args.verify {
                "; WRITE+READ of the whole buffer verified first"
            } else {
                ""
            }
        );
        if args.compare {
            println!(
                "  ceiling: cuMemcpyDtoDAsync of the same block between two buffers of GPU \
                 {init_dev} in one process, one copy at a time"
            );
        } else {
            println!("  ceiling not measured (add --compare)");
        }
        println!();
        println!(
            "{:>5} {:>7} {:>5} {:>9} {:>9} {:>9} {:>7} | {:>9} {:>9} {:>6}",
            "op",
            "block",
            "batch",
            "GB/s",
            "p50 us",
            "p99 us",
            "backend",
            "ceiling",
            "p50 us",
            "ratio"
        );
    }
    for &batch in &batches {
        for &block in &blocks {
            let ceil: Option<CudaRow> = if args.compare {
                Some(
                    ceiling(init_dev, block, batch, args.warmup, args.seconds)
                        .map_err(Fail::Other)?,
                )
            } else {
                None
            };
            for &op in &ops {
                let r = pair
                    .row(op, block, batch, args.warmup, args.seconds)
                    .map_err(Fail::Other)?;
                let ratio = ceil.as_ref().map(|c| r.gbps / c.gbps.max(1e-12));
                if args.json {
                    let j = serde_json::json!({
                        "backend": r.backend, "topology": "cuda", "op": op.as_str(),
                        "block": block, "batch": batch, "gbps": r.gbps, "posts": r.posts,
                        "seconds": r.seconds, "streams": streams,
                        "inline_wait_us": inline.as_micros() as u64, "batched_copies": batched, "gather_kernel": gather,
                        "p50_us": r.p50_us, "p99_us": r.p99_us,
                        "init_gpu": init_dev, "target_gpu": target_dev,
                        "target_mem": if legacy { "legacy" } else { "vmm" },
                        "ceiling": ceil.as_ref().map(|c| serde_json::json!({
                            "name": "cuMemcpyDtoDAsync", "gbps": c.gbps, "p50_us": c.p50_us,
                        })),
                        "ratio": ratio,
                    });
                    println!("{j}");
                } else {
                    println!(
                        "{:>5} {:>7} {:>5} {:>9.2} {:>9.1} {:>9.1} {:>7} | {:>9} {:>9} {:>6}",
                        op.as_str(),
                        human(block),
                        batch,
                        r.gbps,
                        r.p50_us,
                        r.p99_us,
                        r.backend,
                        ceil.as_ref()
                            .map(|c| format!("{:.2}", c.gbps))
                            .unwrap_or_else(|| "-".into()),
                        ceil.as_ref()
                            .map(|c| format!("{:.1}", c.p50_us))
                            .unwrap_or_else(|| "-".into()),
                        ratio
                            .map(|x| format!("{x:.2}x"))
                            .unwrap_or_else(|| "-".into()),
                    );
                }
            }
        }
    }
    Ok(())
}

/// The storage topology: `uring` or `posix` against a file, next to fio (and posix).
fn run_storage(args: &Args) -> Res<()> {
    use nixl_benches::storage::{fio, nixl_row, StorageSpec, TestFile};
    let backend = match args.backend.as_str() {
        "uring" => BackendName::Uring,
        "object" => BackendName::Object,
        _ => BackendName::Posix,
    };
    if args.verify {
        return Err(Fail::Other(
            "--verify is not implemented for the storage topology yet (the file backends' \
             byte-exact tests are in transports/tests/files.rs)"
                .into(),
        ));
    }
    let ops: Vec<XferOp> = match args.op.as_str() {
        "both" => vec![XferOp::Write, XferOp::Read],
        "read" => vec![XferOp::Read],
        "write" => vec![XferOp::Write],
        o => return Err(Fail::Other(format!("--op {o:?}: read, write or both"))),
    };
    let blocks = harness::parse_sizes(&args.block_sizes)
        .map_err(|e| Fail::Other(format!("--block-sizes: {e}")))?;
    let depths =
        harness::parse_counts(&args.depth).map_err(|e| Fail::Other(format!("--depth: {e}")))?;
    let modes: Vec<bool> = args
        .io
        .split(',')
        .map(|m| match m.trim() {
            "buffered" => Ok(false),
            "direct" => Ok(true),
            m => Err(Fail::Other(format!("--io {m:?}: buffered or direct"))),
        })
        .collect::<Res<_>>()?;
    let file_size = harness::parse_size(&args.file_size)
        .map_err(|e| Fail::Other(format!("--file-size: {e}")))? as u64;
    let is_object = backend == BackendName::Object;
    let server = if is_object {
        let s = match &args.endpoint {
            Some(a) => nixl_benches::object::Server::existing(a),
            None => nixl_benches::object::Server::start_moto(),
        };
        Some(s.map_err(|e| Fail::Unavailable("object".into(), e))?)
    } else {
        None
    };
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let file = TestFile::create(&dir, if is_object { 0 } else { file_size })
        .map_err(|e| Fail::Other(format!("creating the test file in {}: {e}", dir.display())))?;
    if let Some(srv) = &server {
        if !args.json {
            println!(
                "nixl-bench object: one agent, whole objects of one block in bucket {} at \
                 http://{}{}, {} s per row",
                nixl_benches::object::BUCKET,
                srv.addr,
                if args.endpoint.is_some() {
                    ""
                } else {
                    " (moto, started here)"
                },
                args.seconds
            );
            if args.compare {
                println!(
                    "  ceiling: the same server over plain HTTP (depth threads, PUT or GET of \
                     the same size, a connection per request)"
                );
            } else {
                println!("  ceiling not measured (add --compare)");
            }
            println!();
            println!(
                "{:>7} {:>5} {:>5} {:>8} {:>9} {:>8} {:>8} {:>7} | {:>8} {:>6}",
                "block",
                "depth",
                "op",
                "GB/s",
                "req/s",
                "p50 us",
                "p99 us",
                "backend",
                "http",
                "ratio"
            );
        }
    } else if !args.json {
        println!(
            "nixl-bench {backend} (storage): one agent, file {} ({} MiB), random block-aligned \
             offsets, {} s per row",
            file.path().display(),
            file_size >> 20,
            args.seconds
        );
        if args.compare {
            println!(
                "  ceiling: fio (ioengine=io_uring, same file, block, depth, rand pattern, direct \
                 flag){}",
                if backend == BackendName::Uring {
                    "; peer: the same rows over posix"
                } else {
                    ""
                }
            );
        } else {
            println!("  ceiling and peer not measured (add --compare)");
        }
        println!();
        println!(
            "{:>7} {:>5} {:>5} {:>8} {:>8} {:>9} {:>8} {:>8} {:>7} | {:>8} {:>6} | {:>8} {:>6}",
            "block",
            "depth",
            "op",
            "io",
            "GB/s",
            "req/s",
            "p50 us",
            "p99 us",
            "backend",
            "fio",
            "ratio",
            "posix",
            "ratio"
        );
    }
    let total = blocks.len() * depths.len() * modes.len() * ops.len();
    let mut progress = Progress::new(std::io::stderr().is_terminal() && !args.json, total);
    for &block in &blocks {
        for &depth in &depths {
            for &direct in &modes {
                for &op in &ops {
                    let io = if direct { "direct" } else { "buffered" };
                    let label = format!("{} qd{depth} {} {io}", human(block), op.as_str());
                    progress.next(&label);
                    let spec = StorageSpec {
                        op,
                        block,
                        depth,
                        direct,
                        seconds: args.seconds,
                    };
                    if is_object && direct {
                        continue;
                    }
                    let r = match match &server {
                        Some(srv) => nixl_benches::object::nixl_row(srv, &spec),
                        None => nixl_row(backend, &file, &spec),
                    } {
                        Ok(r) => r,
                        Err(e) => {
                            progress.clear();
                            return Err(match e.strip_prefix("unavailable: ") {
                                Some(why) => Fail::Unavailable(backend.to_string(), why.into()),
                                None => Fail::Other(format!("{label}: {e}")),
                            });
                        }
                    };
                    let (baseline, peer) = if let (true, Some(srv)) = (args.compare, &server) {
                        progress.step(&format!("{label}: plain HTTP"));
                        (nixl_benches::object::ceiling(srv, &spec), None)
                    } else if args.compare {
                        progress.step(&format!("{label}: fio"));
                        let f = fio(&file, &spec);
                        let p = (backend == BackendName::Uring).then(|| {
                            progress.step(&format!("{label}: posix"));
                            match nixl_row(BackendName::Posix, &file, &spec) {
                                Ok(p) => Measured::Gbps(p.gbps),
                                Err(e) => Measured::Missing(e),
                            }
                        });
                        (f, p)
                    } else {
                        (Measured::Missing("not run".into()), None)
                    };
                    progress.clear();
                    let rps = r.posts as f64 / r.seconds.max(1e-9);
                    let ratio = |m: &Measured| m.gbps().map(|c| r.gbps / c);
                    if args.json {
                        let mut o = serde_json::json!({
                            "topology": "storage",
                            "backend": r.backend.as_str(),
                            "backend_requested": args.backend,
                            "op": op.as_str(),
                            "block_size": block,
                            "batch": 1,
                            "depth": depth,
                            "direct": direct,
                            "threads": 1,
                            "posts": r.posts,
                            "seconds": r.seconds,
                            "gbps": r.gbps,
                            "req_per_s": rps,
                            "p50_us": r.p50_us,
                            "p99_us": r.p99_us,
                        });
                        if is_object {
                            o["topology"] = "object".into();
                            o.as_object_mut().map(|m| m.remove("direct"));
                        }
                        if args.compare {
                            o["baseline"] = if is_object { "http" } else { "fio" }.into();
                            o["baseline_gbps"] = baseline.gbps().into();
                            o["ratio"] = ratio(&baseline).into();
                            if let Measured::Missing(why) = &baseline {
                                o["baseline_missing"] = why.clone().into();
                            }
                            if let Some(m) = &peer {
                                o["peer"] = "posix".into();
                                o["peer_gbps"] = m.gbps().into();
                                o["peer_ratio"] = ratio(m).into();
                                if let Measured::Missing(why) = m {
                                    o["peer_missing"] = why.clone().into();
                                }
                            }
                        }
                        println!("{o}");
                    } else {
                        let fmt = |m: Option<&Measured>| match m.and_then(Measured::gbps) {
                            Some(g) => (format!("{g:.2}"), format!("{:.2}", r.gbps / g)),
                            None => ("-".into(), "-".into()),
                        };
                        let (c, cr) = fmt(Some(&baseline));
                        let (u, ur) = fmt(peer.as_ref());
                        if is_object {
                            println!(
                                "{:>7} {:>5} {:>5} {:>8.3} {:>9.0} {:>8.1} {:>8.1} {:>7} | {:>8} {:>6}",
                                human(block), depth, op.as_str(), r.gbps, rps, r.p50_us,
                                r.p99_us, r.backend, c, cr
                            );
                            if let Measured::Missing(why) = &baseline {
                                if args.compare {
                                    println!("        http ceiling missing: {why}");
                                }
                            }
                            continue;
                        }
                        println!(
                            "{:>7} {:>5} {:>5} {:>8} {:>8.3} {:>9.0} {:>8.1} {:>8.1} {:>7} | {:>8} {:>6} | {:>8} {:>6}",
                            human(block), depth, op.as_str(), io, r.gbps, rps, r.p50_us,
                            r.p99_us, r.backend, c, cr, u, ur
                        );
                        if let Measured::Missing(why) = &baseline {
                            if args.compare {
                                println!("        fio missing: {why}");
                            }
                        }
                    }
                }
            }
        }
    }
    progress.clear();
    Ok(())
}
