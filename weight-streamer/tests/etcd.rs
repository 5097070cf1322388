//! Sources found through a real etcd: `ls`, a pull with no `--source`, an entry left behind by
//! a SIGKILLed source skipped after one bounded attempt.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn sources_found_in_etcd_and_a_stale_entry_skipped() {
    let test = "sources_found_in_etcd_and_a_stale_entry_skipped";
    nixl_testkit::require!(etcd_missing(), REQ);
    let etcd = Etcd::start(test);
    let (t, model) = model_dir("etcd", "sharded", 10);
    let (live, live_addr) = serve(cmd(), &model, "m", "127.0.0.1:0", &["--etcd", &etcd.url]);
    let (mut dead, _) = serve(cmd(), &model, "m", "127.0.0.1:0", &["--etcd", &etcd.url]);

    // ls: one model, two sources, each holding every chunk.
    let o = cmd()
        .args(["ls", "--json", "--etcd", &etcd.url])
        .env("NIXL_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), 1, "{v}");
    assert_eq!(models[0]["model"], "m");
    let srcs = models[0]["sources"].as_array().unwrap();
    assert_eq!(srcs.len(), 2, "{v}");
    for s in srcs {
        assert_eq!(s["chunks_held"], s["chunks"], "{v}");
        assert!(s["bytes_held"].as_u64().unwrap() > 1_000_000, "{v}");
    }

    // SIGKILL one source: its entry stays in etcd until its lease (10 s) runs out.
    dead.kill();
    let start = Instant::now();
    let out = t.join("out");
    let r = pull(
        cmd(),
        "m",
        &out,
        &[],
        &["--listen", "127.0.0.1:0", "--etcd", &etcd.url],
    )
    .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        r["skipped"].as_array().unwrap().len(),
        1,
        "the stale entry: {r}"
    );
    let srcs = r["sources"].as_object().unwrap();
    assert_eq!(srcs.len(), 1, "{r}");
    assert_eq!(srcs.values().next().unwrap(), &r["bytes"]);
    assert_same_model(&model, &out);
    let _ = live_addr;

    // ls reports the stale entry as unreachable rather than failing.
    let o = cmd()
        .args(["ls", "--json", "--etcd", &etcd.url])
        .env("NIXL_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.to_string().contains("\"error\""), "{v}");

    // SIGTERM: the source leaves etcd at once (its lease revoked) and exits 0.
    let mut live = live;
    let st = std::process::Command::new("kill")
        .args(["-TERM", &live.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let st = live.child.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    let o = cmd()
        .args(["ls", "--json", "--etcd", &etcd.url])
        .env("NIXL_SECRET", SECRET)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let left = v["models"][0]["sources"].as_array().map_or(0, Vec::len);
    assert_eq!(left, 1, "only the SIGKILLed source's entry is left: {v}");
    let _ = std::fs::remove_dir_all(&t);
}
