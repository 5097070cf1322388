//! Core overheads: what the engine's loop pays per request besides the copy.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nixl_core::metadata::{AgentMetadata, BackendInfo, RegionInfo};
use nixl_core::{BackendName, Desc, DescList, MemKind, XferOp, XferOptions};

fn dram(d: Vec<Desc>) -> DescList {
    DescList::from_descs(MemKind::Dram, d).expect("descs")
}

fn bench_core(c: &mut Criterion) {
    let (a, b) = nixl_benches::harness::local_agents();
    let src = vec![1u8; 4 << 20];
    let mut dst = vec![0u8; 4 << 20];
    let dd = Desc::from_mut_slice(&mut dst);
    // SAFETY: `src` and `dst` are declared before the registrations, so they outlive them, and
    // are not otherwise touched while the benches run.
    let (_ra, _rb) = unsafe {
        (
            a.register(&dram(vec![Desc::from_slice(&src)]))
                .expect("reg"),
            b.register(&dram(vec![dd])).expect("reg"),
        )
    };
    a.load_remote(&b.metadata_bytes()).expect("load");
    let base = src.as_ptr() as u64;

    let mut g = c.benchmark_group("descriptors");
    for n in [1usize, 1024] {
        let descs: Vec<Desc> = (0..n as u64)
            .map(|i| Desc::new(base + i * 4096, 4096, 0))
            .collect();
        g.bench_with_input(BenchmarkId::new("validate", n), &descs, |bch, d| {
            bch.iter(|| DescList::from_descs(MemKind::Dram, black_box(d.clone())).expect("ok"))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("request");
    for n in [1usize, 1024] {
        let l = dram(
            (0..n as u64)
                .map(|i| Desc::new(base + i * 4096, 4096, 0))
                .collect(),
        );
        let r = dram(
            (0..n as u64)
                .map(|i| Desc::new(dd.addr + i * 4096, 4096, 0))
                .collect(),
        );
        g.bench_with_input(BenchmarkId::new("create", n), &(l, r), |bch, (l, r)| {
            bch.iter(|| {
                a.create_xfer(XferOp::Write, l, r, "bench-b", XferOptions::default())
                    .expect("create")
            })
        });
    }
    let l = dram(vec![Desc::new(base, 4096, 0)]);
    let r = dram(vec![Desc::new(dd.addr, 4096, 0)]);
    g.bench_function("create+post+complete 4KiB", |bch| {
        bch.iter(|| {
            let x = a
                .create_xfer(XferOp::Write, &l, &r, "bench-b", XferOptions::default())
                .expect("create");
            x.run_blocking().expect("run");
        })
    });
    let x = a
        .create_xfer(XferOp::Write, &l, &r, "bench-b", XferOptions::default())
        .expect("create");
    g.bench_function("post+complete 4KiB", |bch| {
        bch.iter(|| x.run_blocking().expect("run"))
    });
    g.finish();

    // Scaling: each thread posts its own prepared 4 KiB request; nothing is shared but the
    // agents, so N threads should do about N times the posts of one (up to the core count).
    let mut g = c.benchmark_group("scaling");
    for threads in [1usize, 2] {
        let reqs: Vec<_> = (0..threads as u64)
            .map(|t| {
                let l = dram(vec![Desc::new(base + t * 8192, 4096, 0)]);
                let r = dram(vec![Desc::new(dd.addr + t * 8192, 4096, 0)]);
                a.create_xfer(XferOp::Write, &l, &r, "bench-b", XferOptions::default())
                    .expect("create")
            })
            .collect();
        g.throughput(criterion::Throughput::Elements(threads as u64));
        g.bench_with_input(
            BenchmarkId::new("post+complete 4KiB, threads", threads),
            &reqs,
            |bch, reqs| {
                bch.iter_custom(|iters| {
                    let start = std::time::Instant::now();
                    std::thread::scope(|s| {
                        for r in reqs {
                            s.spawn(move || {
                                for _ in 0..iters {
                                    r.run_blocking().expect("run");
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            },
        );
    }
    g.finish();

    let mut g = c.benchmark_group("metadata");
    for n in [1usize, 1000] {
        let md = AgentMetadata {
            name: "prefill-0".into(),
            instance_id: 42,
            generation: 7,
            partial: false,
            backends: vec![BackendInfo {
                name: BackendName::Shm,
                conn_info: vec![7; 96],
            }],
            regions: (0..n as u64)
                .map(|i| RegionInfo {
                    kind: MemKind::Dram,
                    desc: Desc::new(0x10000 + i * 4096, 4096, 0),
                    key: i,
                    backends: vec![(BackendName::Shm, vec![1; 17])],
                })
                .collect(),
        };
        let bytes = md.encode();
        g.bench_with_input(BenchmarkId::new("encode", n), &md, |bch, md| {
            bch.iter(|| black_box(md.encode()))
        });
        g.bench_with_input(BenchmarkId::new("decode", n), &bytes, |bch, bytes| {
            bch.iter(|| AgentMetadata::decode(black_box(bytes)).expect("decode"))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_core);
criterion_main!(benches);
