//! Cost of [`KvIndex::overlap`] and [`Router::choose`]: a request of 1,000 blocks over 64
//! workers that each hold a different-length prefix of it; next to it, the peer: the naive
//! per-worker walk (each worker's blocks in its own hash set, walked until its first miss).

use criterion::{criterion_group, criterion_main, Criterion};
use nixl_kv::events::{seq_hashes, KvEvent, KvEventKind, StoredBlock};
use nixl_router::{KvIndex, Mode, Router};

fn setup(workers: usize, blocks: usize) -> (Router, Vec<u64>, Vec<String>) {
    let tokens: Vec<u32> = (0..(blocks * 16) as u32).collect();
    let h = seq_hashes(&tokens, 16);
    let r = Router::new(Mode::KvAware {
        overlap_weight: 1.0,
    });
    let names: Vec<String> = (0..workers).map(|w| format!("worker-{w}")).collect();
    {
        let mut idx = r.index().write();
        for (w, name) in names.iter().enumerate() {
            // Worker w holds the first (w + 1) * blocks / workers blocks, and some of its own.
            let n = (w + 1) * blocks / workers;
            let mut bl: Vec<StoredBlock> = (0..n)
                .map(|i| StoredBlock {
                    hash: h[i],
                    parent: i.checked_sub(1).map(|p| h[p]),
                })
                .collect();
            bl.extend((0..1000u64).map(|i| StoredBlock {
                hash: (w as u64) << 32 | i,
                parent: None,
            }));
            idx.apply(
                name,
                &KvEvent {
                    id: 1,
                    kind: KvEventKind::Stored {
                        blocks: bl,
                        tokens_per_block: 16,
                    },
                },
            );
        }
    }
    (r, h, names)
}

fn bench(c: &mut Criterion) {
    let (r, h, names) = setup(64, 1000);
    let idx: &parking_lot::RwLock<KvIndex> = r.index();
    c.bench_function("overlap 1000 blocks x 64 workers", |b| {
        b.iter(|| std::hint::black_box(idx.read().overlap(std::hint::black_box(&h))))
    });
    c.bench_function("choose 1000 blocks x 64 workers", |b| {
        b.iter(|| std::hint::black_box(r.choose(std::hint::black_box(&h), &names)))
    });
    // The peer: per-worker sets, each walked separately.
    let sets: Vec<std::collections::HashSet<u64>> = (0..64)
        .map(|w| {
            let n = (w + 1) * 1000 / 64;
            h[..n]
                .iter()
                .copied()
                .chain((0..1000u64).map(|i| (w as u64) << 32 | i))
                .collect()
        })
        .collect();
    c.bench_function("naive per-worker walk 1000 blocks x 64 workers", |b| {
        b.iter(|| {
            let h = std::hint::black_box(&h);
            std::hint::black_box(
                sets.iter()
                    .map(|s| h.iter().take_while(|x| s.contains(x)).count())
                    .collect::<Vec<_>>(),
            )
        })
    });
    let miss: Vec<u64> = (0..1000u64).map(|i| i ^ 0xdead_beef).collect();
    c.bench_function("overlap 1000 blocks, no worker holds the first", |b| {
        b.iter(|| std::hint::black_box(idx.read().overlap(std::hint::black_box(&miss))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
