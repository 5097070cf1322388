//! The storage (`uring`, `posix`) and `object` rows.

use super::*;

/// The storage topology: `uring` or `posix` against a file, next to fio (and posix).
pub(crate) fn run_storage(args: &Args) -> Res<()> {
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
    let ops = args.ops()?;
    let blocks = args.block_sizes()?;
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
    let file_size = nixl_transports::units::parse_size(&args.file_size)
        .map_err(|e| Fail::Other(format!("--file-size: {e}")))?;
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
                            let name = if is_object { "http" } else { "fio" };
                            let peer = peer.as_ref().map(|m| ("posix", m));
                            put_compared(&mut o, r.gbps, (name, &baseline), peer);
                        }
                        println!("{o}");
                    } else {
                        let (c, cr) = compared_cells(r.gbps, Some(&baseline));
                        let (u, ur) = compared_cells(r.gbps, peer.as_ref());
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
