//! Discovery counts what it does: a process-wide recorder (this file is its own test binary)
//! sees the counters of the client's runtime thread.

mod common;

use std::time::Duration;

use common::{agent, has, until, Etcd};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use nixl_discovery::Registry;

/// Counters by name, summed over labels. (A snapshot resets what it reads.)
fn counters(s: &Snapshotter) -> impl Fn(&str) -> u64 {
    let snap = s.snapshot().into_vec();
    move |name| {
        snap.iter()
            .filter(|(k, _, _, _)| k.key().name() == name)
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(c) => *c,
                _ => 0,
            })
            .sum()
    }
}

#[test]
fn loads_invalidations_and_bad_values_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let Some(e) = Etcd::start("metrics") else {
        return;
    };
    let cfg = e.cfg(10);
    e.raw(async |raw| {
        raw.put(format!("{}junk", cfg.prefix), b"garbage".to_vec(), None)
            .await
    });
    let r = Registry::connect(&cfg).unwrap();
    let a = agent("m-a");
    let b = agent("m-b");
    let pb = r.publish(&b).unwrap();
    let _w = r.watch(&a).unwrap();
    assert!(has(&a, "m-b"));
    // Longer than the 1 s request timeout: the watch stream is not cut by it.
    std::thread::sleep(Duration::from_millis(1500));
    drop(pb);
    until("m-b invalidated", Duration::from_secs(3), || {
        !has(&a, "m-b")
    });

    let counter = counters(&snap);
    assert!(counter("nixl_etcd_publishes_total") >= 1);
    assert!(counter("nixl_etcd_loads_total") >= 1);
    assert_eq!(counter("nixl_etcd_bad_values_total"), 1);
    assert_eq!(counter("nixl_etcd_invalidations_total"), 1);
    assert_eq!(counter("nixl_etcd_watch_restarts_total"), 0);
    assert_eq!(counter("nixl_etcd_errors_total"), 0);
}
