//! `nixl-bench`: transfer throughput and latency of a backend, with its ceiling or peer measured
//! in the same run and printed beside it as a ratio.
//!
//! Today it runs the `tcp` topology: two agents in two network namespaces joined by veth (on
//! loopback when namespaces cannot be made, which it says), each a process of its own; with
//! `--compare`, iperf3 and ucx_perftest (ucp_put_bw over TCP) run between the same namespaces
//! for the same sizes.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use clap::Parser;
use nixl_tests::netns::{skip_reason, Lab};
use nixl_tests::peers::{self, Measured};
use nixl_tests::Peer;

#[derive(Parser, Debug)]
#[command(name = "nixl-bench", about = "nixl-rs transfer benchmark")]
struct Args {
    /// Backend to measure (`tcp`; other topologies come with the full harness).
    #[arg(long, default_value = "tcp")]
    backend: String,
    /// `read`, `write`, or `both`.
    #[arg(long, default_value = "both")]
    op: String,
    /// Block sizes (descriptor length), comma separated: 4KiB,1MiB,64MiB.
    #[arg(long, default_value = "64KiB,1MiB,64MiB")]
    block_sizes: String,
    /// Descriptors per request.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Seconds per row (after one warm-up request).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Connections per peer (the tcp backend's `conns_per_peer`).
    #[arg(long)]
    conns: Option<usize>,
    /// Bytes per chunk (the tcp backend's `chunk_bytes`).
    #[arg(long)]
    chunk: Option<usize>,
    /// Measure iperf3 and ucx_perftest for the same sizes in the same run.
    #[arg(long)]
    compare: bool,
    /// One JSON object per row instead of a table.
    #[arg(long)]
    json: bool,
    /// Run as a benchmark peer (internal: the processes nixl-bench starts).
    #[arg(long, hide = true, num_args = 0.., allow_hyphen_values = true)]
    peer_mode: Option<Vec<String>>,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    let args = Args::parse();
    if let Some(peer_args) = &args.peer_mode {
        if let Err(e) = nixl_tests::peer::run(peer_args) {
            eprintln!("nixl-bench peer: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = run(&args) {
        eprintln!("nixl-bench: {e}");
        std::process::exit(1);
    }
}

fn parse_size(s: &str) -> Res<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: usize = n.parse().map_err(|_| format!("bad size {s:?}"))?;
    let m = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        u => return Err(format!("unknown unit {u:?} in {s:?}").into()),
    };
    Ok(n * m)
}

fn human(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

struct Topology {
    lab: Option<Lab>,
    target_ip: IpAddr,
    initiator_ip: IpAddr,
    what: String,
}

impl Topology {
    /// iperf3 from the initiator's host to the target's, `streams` streams.
    fn iperf3(&self, block: usize, streams: usize, seconds: f64) -> Measured {
        match &self.lab {
            Some(l) => peers::iperf3(l, 1, 0, block, seconds, streams),
            None => peers::iperf3_loopback(block, seconds, streams),
        }
    }

    /// ucx_perftest's one-sided put from the initiator's host to the target's.
    fn ucx_put_bw(&self, block: usize, iters: usize) -> Measured {
        match &self.lab {
            Some(l) => peers::ucx_put_bw(l, 1, 0, block, iters),
            None => peers::ucx_put_bw_loopback(block, iters),
        }
    }

    fn command(&self, i: usize, exe: &str) -> Command {
        match &self.lab {
            Some(l) => l.command(i, exe),
            None => Command::new(exe),
        }
    }
}

fn run(args: &Args) -> Res<()> {
    if args.backend != "tcp" {
        return Err(format!(
            "backend {:?}: this harness measures tcp so far (shm: `nixl-agent demo`; local: \
             `cargo bench -p nixl-benches --bench transfer`)",
            args.backend
        )
        .into());
    }
    let ops: Vec<&str> = match args.op.as_str() {
        "both" => vec!["write", "read"],
        "read" | "write" => vec![args.op.as_str()],
        o => return Err(format!("--op {o:?}: read, write or both").into()),
    };
    let blocks = args
        .block_sizes
        .split(',')
        .map(parse_size)
        .collect::<Res<Vec<_>>>()?;
    let batch = args.batch.max(1);
    let size = blocks.iter().max().copied().unwrap_or(1 << 20) * batch;

    let topo = match skip_reason() {
        None => {
            let lab = Lab::pair();
            Topology {
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
        Some(why) => Topology {
            lab: None,
            target_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            initiator_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            what: format!("loopback, one network namespace ({why})"),
        },
    };
    let dir = std::env::temp_dir().join(format!("nixl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let secret = format!("{:016x}", nixl_core::random_u64());
    let mut tuning = String::new();
    if let Some(c) = args.conns {
        tuning += &format!("conns_per_peer = {c}\n");
    }
    if let Some(c) = args.chunk {
        tuning += &format!("chunk_bytes = {c}\n");
    }
    let target_addr =
        std::net::SocketAddr::new(topo.target_ip, 17000 + (std::process::id() % 1000) as u16);
    let write_cfg = |name: &str, listen: String| -> Res<String> {
        let p = dir.join(name);
        std::fs::write(
            &p,
            format!(
                "backends = [\"tcp\"]\n[tcp]\nlisten = \"{listen}\"\n{tuning}[auth]\nsecret = \"{secret}\"\n"
            ),
        )?;
        Ok(p.to_string_lossy().into_owned())
    };
    let tcfg = write_cfg("target.toml", target_addr.to_string())?;
    let icfg = write_cfg(
        "initiator.toml",
        std::net::SocketAddr::new(topo.initiator_ip, 0).to_string(),
    )?;
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let start = |i: usize, name: &str, cfg: &str| {
        let mut c = topo.command(i, &exe);
        c.args(["--peer-mode", "--config", cfg]);
        Peer::spawn(c, name, size)
    };
    let mut target = start(1, "bench-target", &tcfg);
    let mut init = start(0, "bench-initiator", &icfg);
    let r = init.cmd(&format!("fetch {target_addr}"));
    if !r.starts_with("ok") {
        return Err(format!("initiator could not reach the target: {r}").into());
    }
    let _ = target.cmd("fill 1");
    let _ = init.cmd("fill 2");

    if !args.json {
        println!("nixl-bench tcp: {}", topo.what);
        println!(
            "  agents: two processes, tcp only, shared secret; {} s per row; batch {batch}{}",
            args.seconds,
            if tuning.is_empty() {
                String::new()
            } else {
                format!("; {}", tuning.trim().replace('\n', ", "))
            }
        );
        println!(
            "  ceiling: iperf3 (best of 1 and 2 streams, same write size){}",
            if args.compare {
                "; peer: ucx_perftest ucp_put_bw, UCX_TLS=tcp"
            } else {
                " (not run: add --compare)"
            }
        );
        println!();
        println!(
            "{:>7} {:>5} {:>5} {:>8} {:>9} {:>8} {:>8} {:>7} | {:>8} {:>6} | {:>8} {:>6}",
            "block",
            "batch",
            "op",
            "GB/s",
            "req/s",
            "p50 us",
            "p99 us",
            "backend",
            "iperf3",
            "ratio",
            "ucx",
            "ratio"
        );
    }
    let interactive = std::io::stderr().is_terminal();
    for &block in &blocks {
        let ceiling = if args.compare {
            let one = topo.iperf3(block, 1, args.seconds.max(1.0));
            let two = topo.iperf3(block, 2, args.seconds.max(1.0));
            match (one.gbps(), two.gbps()) {
                (Some(a), Some(b)) => Measured::Gbps(a.max(b)),
                (Some(a), None) | (None, Some(a)) => Measured::Gbps(a),
                _ => one,
            }
        } else {
            Measured::Missing("not run".into())
        };
        let ucx = if args.compare {
            let iters = ((2usize << 30) / block).clamp(200, 100_000);
            topo.ucx_put_bw(block, iters)
        } else {
            Measured::Missing("not run".into())
        };
        for op in &ops {
            if interactive && !args.json {
                eprint!("  measuring {} {op}...\r", human(block));
            }
            let r = init.cmd(&format!(
                "bench bench-target {op} {block} {batch} {}",
                args.seconds
            ));
            let w: Vec<&str> = r.split_whitespace().collect();
            if w.first() != Some(&"ok") || w.len() < 5 {
                return Err(format!("{op} {}: {r}", human(block)).into());
            }
            let gbps: f64 = w[1].parse()?;
            let posts: f64 = w[2].parse()?;
            let (p50, p99): (f64, f64) = (w[3].parse()?, w[4].parse()?);
            let rps = posts / args.seconds;
            let ratio = |m: &Measured| m.gbps().map(|c| gbps / c);
            if args.json {
                let mut o = serde_json::json!({
                    "backend": "tcp", "op": op, "block_size": block, "batch": batch,
                    "gbps": gbps, "requests_per_s": rps, "p50_us": p50, "p99_us": p99,
                    "topology": topo.what,
                });
                if args.compare {
                    o["baseline"] = "iperf3".into();
                    o["baseline_gbps"] = ceiling.gbps().into();
                    o["ratio"] = ratio(&ceiling).into();
                    o["peer"] = "ucx_perftest ucp_put_bw tcp".into();
                    o["peer_gbps"] = ucx.gbps().into();
                    o["peer_ratio"] = ratio(&ucx).into();
                    if let Measured::Missing(why) = &ceiling {
                        o["baseline_missing"] = why.clone().into();
                    }
                    if let Measured::Missing(why) = &ucx {
                        o["peer_missing"] = why.clone().into();
                    }
                }
                println!("{o}");
            } else {
                let fmt = |m: &Measured| match m.gbps() {
                    Some(g) => (format!("{g:.2}"), format!("{:.2}", gbps / g)),
                    None => ("-".into(), "-".into()),
                };
                let (c, cr) = fmt(&ceiling);
                let (u, ur) = fmt(&ucx);
                println!(
                    "{:>7} {:>5} {:>5} {:>8.2} {:>9.0} {:>8.1} {:>8.1} {:>7} | {:>8} {:>6} | {:>8} {:>6}",
                    human(block), batch, op, gbps, rps, p50, p99, "tcp", c, cr, u, ur
                );
            }
        }
        if !args.json && args.compare {
            for (what, m) in [("iperf3", &ceiling), ("ucx_perftest", &ucx)] {
                if let Measured::Missing(why) = m {
                    println!("        {what} missing: {why}");
                }
            }
        }
    }
    drop(init);
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
