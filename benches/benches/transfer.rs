//! The `local` backend's READ and WRITE next to memcpy of the same sizes, in the same group.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nixl_core::{Desc, DescList, MemKind, XferOp, XferOptions};

const SIZES: [usize; 3] = [64 << 10, 1 << 20, 64 << 20];

fn dram(d: Desc) -> DescList {
    DescList::from_descs(MemKind::Dram, vec![d]).expect("descs")
}

fn bench_local(c: &mut Criterion) {
    let (a, b) = nixl_benches::harness::local_agents();
    let max = SIZES[2];
    // Filled, so every page is faulted in before timing.
    let mut ours = vec![1u8; max];
    let mut theirs = vec![2u8; max];
    let (od, td) = (
        Desc::from_mut_slice(&mut ours),
        Desc::from_mut_slice(&mut theirs),
    );
    // SAFETY: `ours` and `theirs` are declared before the registrations, so they outlive them,
    // and are only touched by the transfers while registered.
    let (_ra, _rb) = unsafe {
        (
            a.register(&dram(od)).expect("reg"),
            b.register(&dram(td)).expect("reg"),
        )
    };
    a.load_remote(&b.metadata_bytes()).expect("load");
    let src = vec![3u8; max];
    let mut dst = vec![4u8; max];

    let mut g = c.benchmark_group("local");
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g.sample_size(20);
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("memcpy", size), &size, |bch, &n| {
            bch.iter(|| dst[..n].copy_from_slice(std::hint::black_box(&src[..n])))
        });
        for op in [XferOp::Write, XferOp::Read] {
            let x = a
                .create_xfer(
                    op,
                    &dram(Desc::new(od.addr, size as u64, 0)),
                    &dram(Desc::new(td.addr, size as u64, 0)),
                    "bench-b",
                    XferOptions::default(),
                )
                .expect("create");
            g.bench_with_input(BenchmarkId::new(op.as_str(), size), &x, |bch, x| {
                bch.iter(|| x.run_blocking().expect("run"))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_local);
criterion_main!(benches);
