//! `nixl-weights serve` and `pull` on loopback: models written by Python's safetensors pulled
//! byte-identical, bad sources and bad files refused.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn single_and_sharded_models_pull_byte_identical_and_verify() {
    nixl_testkit::require!(python_missing(), REQ);
    let t = tmpdir("basic");
    for (kind, chunk) in [("single", "65536"), ("sharded", "4096")] {
        let model = t.join(kind);
        make_model(&model, kind, 20);
        let (_src, addr) = serve(cmd(), &model, kind, "127.0.0.1:0", &["--chunk-size", chunk]);
        let out = t.join(format!("{kind}-out"));
        let r = pull(cmd(), kind, &out, &[&addr], &["--listen", "127.0.0.1:0"]).unwrap();
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["chunks_written"], r["chunks"], "{r}");
        assert_eq!(r["sources"][&addr], r["bytes"], "{r}");
        assert_eq!(r["fallback_bytes"], 0);
        assert!(r["gbps"].as_f64().unwrap() > 0.0);
        assert_same_model(&model, &out);
        // verify: the pulled directory matches the manifest the pull left; one flipped byte
        // does not.
        let v = Command::new(BIN)
            .arg("verify")
            .arg(&out)
            .arg("--json")
            .output()
            .unwrap();
        assert!(v.status.success());
        let vj: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
        assert_eq!(vj["ok"], true, "{vj}");
        assert_eq!(vj["checked_against_manifest"], true);
        assert_eq!(vj["model_id"], r["model_id"]);
        let f = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .unwrap();
        let mut bytes = std::fs::read(&f).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&f, bytes).unwrap();
        let v = Command::new(BIN).arg("verify").arg(&out).output().unwrap();
        assert_eq!(
            v.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&v.stdout)
        );
        assert!(String::from_utf8_lossy(&v.stdout).contains("MISMATCH"));
    }
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn corrupt_chunks_are_refetched_elsewhere_and_the_offender_dropped() {
    nixl_testkit::require!(python_missing(), REQ);
    let (t, model) = model_dir("corrupt", "single", 20);
    let mut good_cmd = cmd();
    good_cmd
        .arg("serve")
        .arg(&model)
        .args(["--name", "m", "--listen", "127.0.0.1:0", "--json"]);
    good_cmd.args(["--chunk-size", "65536"]);
    let _good = Proc::spawn(good_cmd);
    let info = _good.json(Duration::from_secs(30));
    let good_addr = info["addrs"][0].as_str().unwrap().to_owned();
    let chunks = info["chunks"].as_u64().unwrap();
    assert!(chunks > 8, "{info}");
    // The bad source corrupts every chunk in its served memory (test-only fault hook).
    let all: Vec<String> = (0..chunks).map(|i| i.to_string()).collect();
    let mut extra = vec!["--chunk-size", "65536"];
    for a in &all {
        extra.extend(["--fault-corrupt-chunk", a]);
    }
    let (_bad, bad_addr) = serve(cmd(), &model, "m", "127.0.0.1:0", &extra);
    let out = t.join("out");
    // The good source is held back (test-only fault hook in the puller) until the bad one is
    // dropped: however loaded the machine, the bad one serves its corrupt chunks first.
    let r = pull(
        cmd(),
        "m",
        &out,
        &[&bad_addr, &good_addr],
        &[
            "--listen",
            "127.0.0.1:0",
            "--fault-hold-back-source",
            &good_addr,
        ],
    )
    .unwrap();
    assert!(r["corrupt_chunks"].as_u64().unwrap() >= 2, "{r}");
    let dropped = r["dropped"].to_string();
    assert!(
        dropped.contains(&bad_addr) && dropped.contains("checksum"),
        "{r}"
    );
    assert_eq!(r["sources"][&bad_addr], 0, "{r}");
    assert_eq!(r["sources"][&good_addr], r["bytes"], "{r}");
    assert_eq!(
        r["chunks_written"], r["chunks"],
        "nothing written twice: {r}"
    );
    assert_same_model(&model, &out);

    // Only the bad source, with a fallback directory: the fallback supplies what it spoils.
    let out2 = t.join("out2");
    let r = pull(
        cmd(),
        "m",
        &out2,
        &[&bad_addr],
        &[
            "--listen",
            "127.0.0.1:0",
            "--fallback",
            model.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert_eq!(r["fallback_bytes"], r["bytes"], "{r}");
    assert_same_model(&model, &out2);

    // Only the bad source and no fallback: a clear error, no output files.
    let out3 = t.join("out3");
    let (code, err) = pull_err("m", &out3, &[&bad_addr]);
    assert_eq!(code, 1);
    assert!(err.contains("every source is gone"), "{err}");
    assert!(!out3.join("model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn unreachable_and_silent_sources_are_skipped_within_a_bound() {
    nixl_testkit::require!(python_missing(), REQ);
    let (t, model) = model_dir("stale", "single", 5);
    let (_src, addr) = serve(cmd(), &model, "m", "127.0.0.1:0", &[]);
    // A port nobody listens on, and a listener that accepts and never answers (a hung host).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let start = Instant::now();
    let r = pull(
        cmd(),
        "m",
        &t.join("out"),
        &[&dead, &silent_addr, &addr],
        &["--listen", "127.0.0.1:0"],
    )
    .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    let skipped = r["skipped"].to_string();
    assert!(
        skipped.contains(&dead) && skipped.contains(&silent_addr),
        "{r}"
    );
    assert_eq!(r["sources"][&addr], r["bytes"]);
    assert_same_model(&model, &t.join("out"));
    // A source that serves another model is skipped too; none left is an error.
    let (code, err) = pull_err("other", &t.join("o2"), &[&addr]);
    assert_eq!(code, 1);
    assert!(err.contains("does not serve a model named"), "{err}");
    drop(silent);
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn manifest_mismatch_between_sources_names_the_tensor() {
    nixl_testkit::require!(python_missing(), REQ);
    let t = tmpdir("mismatch");
    let a = t.join("a");
    let b = t.join("b");
    make_model(&a, "single", 5);
    make_model(&b, "single", 6); // layer.N.w has another shape
    let (_sa, aa) = serve(cmd(), &a, "m", "127.0.0.1:0", &[]);
    let (_sb, ab) = serve(cmd(), &b, "m", "127.0.0.1:0", &[]);
    let (code, err) = pull_err("m", &t.join("out"), &[&aa, &ab]);
    assert_eq!(code, 1);
    assert!(
        err.contains("manifest mismatch at tensor \"layer.0.w\""),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn a_file_changed_on_disk_while_served_is_refused() {
    nixl_testkit::require!(python_missing(), REQ);
    let (t, model) = model_dir("changed", "single", 5);
    let (mut src, addr) = serve(cmd(), &model, "m", "127.0.0.1:0", &[]);
    let f = model.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[100] ^= 0xff;
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&f, &bytes).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = src.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "source still serving a changed file"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(3));
    let (code, _) = pull_err("m", &t.join("out"), &[&addr]);
    assert_eq!(code, 1);
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn bad_input_gets_clear_errors() {
    nixl_testkit::require!(python_missing(), REQ);
    let t = tmpdir("badinput");
    // A directory without safetensors, a truncated safetensors file.
    std::fs::write(t.join("x.bin"), b"hello").unwrap();
    // Serving `t` fails (exit 1) with `why` on stderr.
    let refused = |why: &str| {
        let o = Command::new(BIN)
            .arg("serve")
            .arg(&t)
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{err}");
    };
    refused("no *.safetensors file");
    std::fs::write(
        t.join("m.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\xff{",
    )
    .unwrap();
    refused("not a valid safetensors file");
    let _ = std::fs::remove_dir_all(&t);
}
