//! The `tcp` backend counts what it refuses: denied accesses, failed authentications and
//! malformed frames. A process-wide recorder (this file is its own test binary) sees the counters
//! of the listener's threads.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use nixl_core::*;
use nixl_transports::tcp::{fetch_metadata, push_metadata, Auth, TcpBackend, TcpConfig};

/// A counter's total so far. A snapshot drains every counter, so the totals are kept here: a
/// wait for one counter does not lose another's counts.
fn counter(s: &Snapshotter, name: &str) -> u64 {
    static TOTALS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    for (k, _, _, v) in s.snapshot().into_vec() {
        if let DebugValue::Counter(c) = v {
            *totals.entry(k.key().name().to_owned()).or_default() += c;
        }
    }
    totals.get(name).copied().unwrap_or(0)
}

fn wait_for(s: &Snapshotter, name: &str, at_least: u64) -> u64 {
    let t = Instant::now();
    loop {
        let v = counter(s, name);
        if v >= at_least || t.elapsed() > Duration::from_secs(5) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn refusals_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let cfg = |auth: Auth| TcpConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        auth,
        ..TcpConfig::default()
    };
    let tb = Arc::new(TcpBackend::new(cfg(Auth::with_secret("k"))));
    let b = Agent::builder("m-b").backend(tb.clone()).build().unwrap();
    let a = Agent::builder("m-a")
        .backend(Arc::new(TcpBackend::new(cfg(Auth::with_secret("k")))))
        .build()
        .unwrap();
    let src = vec![1u8; 4096];
    let dst = vec![0u8; 4096];
    let one =
        |buf: &[u8]| DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(buf)]).unwrap();
    // SAFETY: both buffers outlive their registrations and are read only after transfers end.
    let _ra = unsafe { a.register(&one(&src)) }.unwrap();
    // SAFETY: as above.
    let _rb = unsafe { b.register(&one(&dst)) }.unwrap();
    let addr = tb.listen_addrs()[0].to_string();

    // A wrong key: denied at the target, counted there.
    let mut md = b.metadata();
    md.regions[0].key ^= 1;
    a.load_remote_md(md).unwrap();
    let x = a
        .create_xfer(
            XferOp::Write,
            &one(&src),
            &one(&dst),
            "m-b",
            XferOptions::default(),
        )
        .unwrap();
    assert_eq!(x.run_blocking().unwrap_err().class(), ErrorClass::Denied);
    assert!(wait_for(&snap, "nixl_tcp_denied_total", 1) >= 1);

    // A wrong secret.
    assert!(fetch_metadata(&addr, &Auth::with_secret("x"), Duration::from_secs(2)).is_err());
    assert!(wait_for(&snap, "nixl_tcp_auth_failures_total", 1) >= 1);

    // A malformed frame after authentication.
    let mut s = nixl_transports::fuzzing::raw_data_connection(
        tb.listen_addrs()[0],
        &Auth::with_secret("k"),
        "junk",
    )
    .unwrap();
    s.write_all(&[3, 0, 0, 0, 99, 1, 2]).unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    assert!(wait_for(&snap, "nixl_tcp_bad_frames_total", 1) >= 1);

    // Pushed metadata: refused while pushes are off, counted; with pushes on, a new instance of
    // an agent replaces the loaded one, logged and counted.
    let t = Duration::from_secs(2);
    let k = || Auth::with_secret("k");
    assert!(push_metadata(&addr, &k(), &a.metadata_bytes(), t).is_err());
    assert!(wait_for(&snap, "nixl_tcp_pushes_refused_total", 1) >= 1);
    let pb = Arc::new(TcpBackend::new(TcpConfig {
        accept_pushes: true,
        ..cfg(k())
    }));
    let p = Agent::builder("m-p").backend(pb.clone()).build().unwrap();
    let paddr = pb.listen_addrs()[0].to_string();
    let before = counter(&snap, "nixl_peer_instance_replaced_total");
    assert_eq!(
        push_metadata(&paddr, &k(), &a.metadata_bytes(), t).unwrap(),
        "m-a"
    );
    let a2 = Agent::builder("m-a")
        .backend(Arc::new(TcpBackend::new(cfg(k()))))
        .build()
        .unwrap();
    assert_eq!(
        push_metadata(&paddr, &k(), &a2.metadata_bytes(), t).unwrap(),
        "m-a"
    );
    assert_eq!(
        wait_for(&snap, "nixl_peer_instance_replaced_total", before + 1),
        before + 1
    );
    drop(p);
}
