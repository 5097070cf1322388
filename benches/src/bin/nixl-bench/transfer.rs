//! The rows of the `local`, `shm` and `tcp` topologies, with their ceiling and peer.

use super::*;

pub(crate) fn run(args: &Args) -> Res<()> {
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
    let ops = args.ops()?;
    let blocks = args.block_sizes()?;
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
                        let peer = peer.as_ref().map(|(n, m)| (n.as_str(), m));
                        put_compared(&mut o, r.gbps, (baseline_name, &baseline), peer);
                    }
                    println!("{o}");
                } else {
                    let (c, cr) = compared_cells(r.gbps, Some(&baseline));
                    let (u, ur) = compared_cells(r.gbps, peer.as_ref().map(|p| &p.1));
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
pub(crate) fn ucx_iters(block: usize, iters: Option<u64>, batch: usize, threads: usize) -> usize {
    match iters {
        None => ((2usize << 30) / block).clamp(200, 100_000),
        Some(n) => (n as usize)
            .saturating_mul(batch)
            .saturating_mul(threads)
            .clamp(200, 100_000),
    }
}
