//! Discovery counts what it does: a process-wide recorder (this file is its own test binary)
//! sees the counters of the client's runtime thread.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{agent, has, until, Etcd};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use nixl_discovery::Registry;

/// Counters by name, summed over labels, accumulated over snapshots (a snapshot resets what
/// it reads).
#[derive(Default)]
struct Counts(HashMap<String, u64>);

impl Counts {
    fn take(&mut self, s: &Snapshotter) {
        for (k, _, _, v) in s.snapshot().into_vec() {
            if let DebugValue::Counter(c) = v {
                *self.0.entry(k.key().name().to_owned()).or_default() += c;
            }
        }
    }

    fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
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

    // The counter is bumped on the client's thread just after the peer is dropped: wait for it
    // (bounded) rather than race it.
    let mut c = Counts::default();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        c.take(&snap);
        if c.get("nixl_etcd_invalidations_total") >= 1 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(c.get("nixl_etcd_publishes_total") >= 1);
    assert!(c.get("nixl_etcd_loads_total") >= 1);
    assert_eq!(c.get("nixl_etcd_bad_values_total"), 1);
    assert_eq!(c.get("nixl_etcd_invalidations_total"), 1);
    assert_eq!(c.get("nixl_etcd_watch_restarts_total"), 0);
    assert_eq!(c.get("nixl_etcd_errors_total"), 0);
}
