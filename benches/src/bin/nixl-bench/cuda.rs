//! The `cuda` topology's rows.

use super::*;

/// The `cuda` topology: two processes, VRAM to VRAM, next to `cuMemcpyDtoDAsync` in one process
/// (see `nixl_benches::cuda`).
pub(crate) fn run_cuda(args: &Args) -> Res<()> {
    use nixl_benches::cuda::{buffer_bytes, ceiling, CudaPair, CudaRow};
    use nixl_transports::cuda::CudaConfig;
    let ops = args.ops()?;
    let legacy = match args.cuda_mem.as_str() {
        "vmm" => false,
        "legacy" => true,
        m => return Err(Fail::Other(format!("--cuda-mem {m:?}: vmm or legacy"))),
    };
    let blocks = args.block_sizes()?;
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
    let count = nixl_transports::cuda::device_count()
        .map_err(|why| Fail::Unavailable("cuda".into(), why.to_string()))?;
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
