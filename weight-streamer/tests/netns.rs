//! `nixl-weights` across hosts (network namespaces joined by a bridge, links rate-limited with
//! tbf so that transfers take long enough to interfere with): a source killed mid-pull, and one
//! origin fanning out to three replicas that serve what they have verified.

mod common;

use std::time::Duration;

use common::*;
use nixl_tests::netns::Lab;

/// `nixl-weights ARGS` inside host `i`.
fn on(lab: &Lab, i: usize) -> std::process::Command {
    let mut c = lab.command(i, BIN);
    c.env("NIXL_SECRET", SECRET);
    c
}

/// Model `m` of `model` served from host `i` on port `port`, in chunks of 1 MiB: the process
/// and its address.
fn source(lab: &Lab, i: usize, model: &std::path::Path, port: u16) -> (Proc, String) {
    let addr = format!("{}:{port}", lab.addr(i));
    serve(on(lab, i), model, "m", &addr, &["--chunk-size", "1048576"])
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn a_source_killed_mid_pull_is_replaced_by_the_others_and_the_fallback() {
    nixl_testkit::require!(netns_missing(), REQ);
    let (t, model) = model_dir("killed", "big", 16);
    let lab = Lab::star(3);
    // 150 Mbit/s out of each source: the 16 MiB model takes about half a second from both.
    lab.set_rate(0, 150_000_000).unwrap();
    lab.set_rate(1, 150_000_000).unwrap();
    let (mut a, aa) = source(&lab, 0, &model, 7000);
    let (_b, ab) = source(&lab, 1, &model, 7000);
    let out = t.join("out");
    let puller = {
        let (out, aa, ab) = (out.clone(), aa.clone(), ab.clone());
        let c = on(&lab, 2);
        std::thread::spawn(move || {
            pull(
                c,
                "m",
                &out,
                &[&aa, &ab],
                &["--listen", "0.0.0.0:0", "--streams", "2"],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(250));
    a.kill(); // SIGKILL mid-pull
    let r = puller.join().unwrap().unwrap();
    assert!(r["dropped"].to_string().contains(&aa), "{r}");
    assert!(
        u(&r["sources"][&aa]) > 0,
        "the killed source served nothing before it died: {r}"
    );
    assert!(u(&r["sources"][&ab]) > 0, "{r}");
    assert_eq!(
        u(&r["sources"][&aa]) + u(&r["sources"][&ab]),
        u(&r["bytes"]),
        "{r}"
    );
    assert_eq!(
        r["chunks_written"], r["chunks"],
        "nothing written twice: {r}"
    );
    assert_same_model(&model, &out);

    // One source killed mid-pull, no other: the storage fallback finishes the pull.
    let (mut a, aa) = source(&lab, 0, &model, 7001);
    let out2 = t.join("out2");
    let puller = {
        let (out2, aa) = (out2.clone(), aa.clone());
        let c = on(&lab, 2);
        let fb = model.to_str().unwrap().to_owned();
        std::thread::spawn(move || {
            pull(
                c,
                "m",
                &out2,
                &[&aa],
                &["--listen", "0.0.0.0:0", "--fallback", &fb],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    a.kill();
    let r = puller.join().unwrap().unwrap();
    assert!(u(&r["sources"][&aa]) > 0, "{r}");
    assert!(u(&r["fallback_bytes"]) > 0, "{r}");
    assert_eq!(
        u(&r["sources"][&aa]) + u(&r["fallback_bytes"]),
        u(&r["bytes"]),
        "{r}"
    );
    assert_eq!(r["chunks_written"], r["chunks"], "{r}");
    assert_same_model(&model, &out2);
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn one_origin_fans_out_to_three_serving_replicas() {
    nixl_testkit::require!(netns_missing(), REQ);
    let (t, model) = model_dir("fanout", "big", 16);
    let lab = Lab::star(4);
    // The origin's link is the bottleneck, as in a fleet where it is one NIC among many.
    lab.set_rate(0, 100_000_000).unwrap();
    let (_origin, oa) = source(&lab, 0, &model, 7000);
    let mut addrs = vec![oa.clone()];
    let mut replicas = Vec::new();
    for i in 1..4 {
        let mut c = on(&lab, i);
        let out = t.join(format!("r{i}"));
        c.args([
            "pull",
            "m",
            "--serve",
            "--json",
            "--streams",
            "2",
            "--listen",
        ])
        .arg(format!("{}:7000", lab.addr(i)))
        .arg("--out")
        .arg(&out);
        for a in &addrs {
            c.args(["--source", a]);
        }
        let p = Proc::spawn(c);
        // Its listener is up (serving what it verifies) before the next replica starts.
        let first = p.json(Duration::from_secs(10));
        addrs.push(first["serving_on"][0].as_str().unwrap().to_owned());
        replicas.push((p, out));
    }
    let mut from_origin = 0;
    let mut from_replicas = 0;
    let mut bytes = 0;
    for (p, out) in &replicas {
        let r = p.json(Duration::from_secs(60));
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["chunks_written"], r["chunks"], "{r}");
        bytes = u(&r["bytes"]);
        for (k, v) in r["sources"].as_object().unwrap() {
            if *k == oa {
                from_origin += u(v);
            } else {
                from_replicas += u(v);
            }
        }
        assert_same_model(&model, out);
    }
    assert_eq!(from_origin + from_replicas, 3 * bytes);
    // Replicas served one another: the origin sent less than one copy per replica.
    assert!(
        from_replicas > 0 && from_origin < 3 * bytes,
        "origin {from_origin}, replicas {from_replicas}, model {bytes}"
    );
    eprintln!(
        "fan-out: origin egress {:.2}x the model for 3 replicas",
        from_origin as f64 / bytes as f64
    );
    let _ = std::fs::remove_dir_all(&t);
}
