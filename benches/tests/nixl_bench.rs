//! Runs the built `nixl-bench` binary: the `local` and `shm` topologies with tiny sizes, every
//! JSON row checked; the storage (uring, posix next to fio) and object (moto next to plain HTTP)
//! topologies; backends this build lacks exit 2; bad values are clear errors; `--verify`
//! catches a corrupted destination (through the hidden `--test-corrupt-at` hook).

use std::process::{Command, Output};

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_nixl-bench");

fn run(args: &[&str]) -> Output {
    Command::new(BENCH)
        .args(args)
        .output()
        .expect("start nixl-bench")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs, requires success, and parses every stdout line as a JSON row.
fn rows(args: &[&str]) -> Vec<Value> {
    let out = run(args);
    nixl_testkit::child::assert_success(&out, &format!("nixl-bench {args:?}"));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn f(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {row}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// The fields every row has, with `--compare` and a memcpy ceiling.
fn check_row(row: &Value, backend: &str, threads: u64, iters: u64) {
    assert_eq!(row["backend"], backend, "{row}");
    assert!(
        matches!(row["op"].as_str(), Some("read" | "write")),
        "{row}"
    );
    assert_eq!(row["threads"], threads, "{row}");
    assert_eq!(row["iters"], iters, "{row}");
    assert_eq!(row["posts"], iters * threads, "{row}");
    assert_eq!(row["verified"], true, "{row}");
    assert!(row["block_size"].as_u64().unwrap() > 0, "{row}");
    assert!(row["batch"].as_u64().unwrap() > 0, "{row}");
    let gbps = f(row, "gbps");
    assert!(gbps > 0.0, "{row}");
    assert!(f(row, "req_per_s") > 0.0, "{row}");
    let (p50, p99) = (f(row, "p50_us"), f(row, "p99_us"));
    assert!(p50 > 0.0 && p99 >= p50, "{row}");
    // GB/s is bytes over time: block × batch × posts / seconds.
    let bytes = f(row, "block_size") * f(row, "batch") * f(row, "posts");
    assert!(
        (gbps - bytes / f(row, "seconds") / 1e9).abs() <= 1e-3 * gbps + 1e-5,
        "{row}"
    );
    assert_eq!(row["baseline"], "memcpy", "{row}");
    let base = f(row, "baseline_gbps");
    assert!(base > 0.0, "{row}");
    assert!(
        close(f(row, "ratio"), gbps / base),
        "ratio is not gbps / baseline_gbps: {row}"
    );
}

#[test]
fn local_rows_with_threads_and_batches() {
    let rows = rows(&[
        "--backend",
        "local",
        "--block-sizes",
        "4KiB,64KiB",
        "--batch",
        "1,4",
        "--threads",
        "2",
        "--iters",
        "20",
        "--verify",
        "--json",
        "--compare",
    ]);
    assert_eq!(rows.len(), 2 * 2 * 2, "block × batch × op");
    for r in &rows {
        check_row(r, "local", 2, 20);
        assert_eq!(r["topology"], "local");
        assert!(r.get("peer").is_none(), "local has no peer tool: {r}");
    }
    let shapes: Vec<(u64, u64, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["block_size"].as_u64().unwrap(),
                r["batch"].as_u64().unwrap(),
                r["op"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(shapes[0], (4096, 1, "write"));
    assert_eq!(shapes[3], (4096, 4, "read"));
    assert_eq!(shapes[7], (65536, 4, "read"));
}

#[test]
fn shm_rows_with_peer_tool() {
    let rows = rows(&[
        "--backend",
        "shm",
        "--block-sizes",
        "4KiB,64KiB",
        "--iters",
        "20",
        "--verify",
        "--json",
        "--compare",
    ]);
    assert_eq!(rows.len(), 2 * 2);
    for r in &rows {
        check_row(r, "shm", 1, 20);
        assert_eq!(r["topology"], "shm");
        assert!(r["peer"].as_str().unwrap().contains("ucx_perftest"), "{r}");
        match r["peer_gbps"].as_f64() {
            Some(p) => assert!(close(f(r, "peer_ratio"), f(r, "gbps") / p), "{r}"),
            None => {
                assert!(r["peer_ratio"].is_null(), "{r}");
                assert!(!r["peer_missing"].as_str().unwrap().is_empty(), "{r}");
            }
        }
    }
}

#[test]
fn shm_plain_and_auto_report_the_backend_used() {
    // malloc'd target buffer: the cross-memory-attach path, two threads.
    let rows1 = rows(&[
        "--backend",
        "shm",
        "--plain",
        "--threads",
        "2",
        "--block-sizes",
        "8KiB",
        "--iters",
        "10",
        "--verify",
        "--json",
        "--compare",
    ]);
    assert_eq!(rows1.len(), 2);
    for r in &rows1 {
        check_row(r, "shm", 2, 10);
    }
    // auto: two processes on one node, so the policy picks shm, and the row says so.
    let rows2 = rows(&[
        "--backend",
        "auto",
        "--op",
        "read",
        "--block-sizes",
        "4KiB",
        "--iters",
        "10",
        "--verify",
        "--json",
    ]);
    assert_eq!(rows2.len(), 1);
    assert_eq!(rows2[0]["backend"], "shm", "{}", rows2[0]);
    assert_eq!(rows2[0]["backend_requested"], "auto");
    assert!(rows2[0].get("ratio").is_none(), "no --compare, no ratio");
}

/// Whether this host has what `b` needs (then the test below does not apply to it).
fn hardware_present(b: &str) -> bool {
    match b {
        "rdma" => std::path::Path::new("/sys/class/infiniband").exists(),
        _ => std::path::Path::new("/dev/nvidiactl").exists(),
    }
}

#[test]
fn backends_without_their_hardware_exit_2_with_the_reason_and_no_figures() {
    for (b, why) in [
        ("gds", "needs the CUDA driver"),
        ("rdma", "ibv"),
        ("cuda", "libcuda"),
    ] {
        if hardware_present(b) {
            eprintln!("SKIP: {b}: this host has the hardware");
            continue;
        }
        let out = run(&["--backend", b, "--iters", "1", "--json"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{b}: {err}");
        assert!(
            err.contains(&format!("nixl-bench: backend {b} unavailable:")) && err.contains(why),
            "{b}: {err}"
        );
        assert!(out.stdout.is_empty(), "{b}: printed {}", text(&out.stdout));
    }
    let out = run(&["--backend", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("unknown"));
}

#[test]
fn bad_values_are_clear_errors() {
    for (flag, value, says) in [
        ("--block-sizes", "4KiB,4XB", "unknown unit"),
        ("--block-sizes", "0KiB", "more than 0"),
        ("--block-sizes", "big", "bad size"),
        ("--batch", "0", "bad count"),
    ] {
        let out = run(&["--backend", "local", flag, value, "--iters", "1"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {err}");
        assert!(
            err.contains(flag) && err.contains(says),
            "{flag} {value}: {err}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn verify_catches_a_corrupted_destination() {
    // (backend, op, offset, who checks): WRITE is checked by the target, READ by the
    // initiator; offset 5000 lies in the second thread's part (4 KiB each).
    for (backend, op, off, side) in [
        ("local", "write", "100", "target"),
        ("local", "read", "5000", "initiator"),
        ("shm", "write", "5000", "target"),
        ("shm", "read", "7", "initiator"),
    ] {
        let args = [
            "--backend",
            backend,
            "--op",
            op,
            "--threads",
            "2",
            "--block-sizes",
            "4KiB",
            "--iters",
            "3",
            "--verify",
            "--json",
        ];
        // Clean: passes.
        assert_eq!(self::rows(&args).len(), 1);
        // One flipped byte: fails with its offset.
        let mut bad = args.to_vec();
        bad.extend(["--test-corrupt-at", off]);
        let out = run(&bad);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{backend} {op}: {err}");
        assert!(
            err.contains("--verify") && err.contains(&format!("offset {off} ")),
            "{backend} {op}: {err}"
        );
        assert!(err.contains(side), "{backend} {op}: {err}");
    }
}

#[test]
fn table_output() {
    let out = run(&[
        "--backend",
        "local",
        "--block-sizes",
        "4KiB",
        "--iters",
        "5",
        "--compare",
    ]);
    let s = text(&out.stdout);
    assert!(out.status.success(), "{s}{}", text(&out.stderr));
    assert!(s.contains("memcpy") && s.contains("ratio"), "{s}");
    let rows: Vec<&str> = s.lines().filter(|l| l.contains("  local |")).collect();
    assert_eq!(rows.len(), 2, "{s}");
}

/// The fields of a storage or object row with `--compare`: the baseline is measured, or
/// missing with the reason (fio not installed), never made up.
fn check_storage_row(row: &Value, backend: &str, baseline: &str) {
    assert_eq!(row["backend"], backend, "{row}");
    assert!(f(row, "gbps") > 0.0 && f(row, "req_per_s") > 0.0, "{row}");
    assert!(f(row, "p50_us") <= f(row, "p99_us"), "{row}");
    assert!(row["depth"].as_u64().unwrap() > 0, "{row}");
    assert_eq!(row["baseline"], baseline, "{row}");
    match row["baseline_gbps"].as_f64() {
        Some(b) => assert!(close(f(row, "ratio"), f(row, "gbps") / b), "{row}"),
        None => assert!(
            row["ratio"].is_null() && row["baseline_missing"].as_str().is_some(),
            "{row}"
        ),
    }
}

#[test]
fn storage_rows_next_to_fio_and_posix() {
    let r = rows(&[
        "--backend",
        "uring",
        "--compare",
        "--json",
        "--block-sizes",
        "64KiB",
        "--depth",
        "1,4",
        "--io",
        "buffered,direct",
        "--seconds",
        "0.1",
        "--file-size",
        "8MiB",
    ]);
    // 1 size × 2 depths × 2 modes × 2 ops.
    assert_eq!(r.len(), 8, "{r:?}");
    for row in &r {
        check_storage_row(row, "uring", "fio");
        assert_eq!(row["peer"], "posix", "{row}");
        assert!(f(row, "peer_gbps") > 0.0, "{row}");
        assert!(
            close(f(row, "peer_ratio"), f(row, "gbps") / f(row, "peer_gbps")),
            "{row}"
        );
    }
    let r = rows(&[
        "--backend",
        "posix",
        "--json",
        "--block-sizes",
        "4KiB",
        "--depth",
        "2",
        "--io",
        "buffered",
        "--op",
        "read",
        "--seconds",
        "0.1",
        "--file-size",
        "1MiB",
    ]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["backend"], "posix");
}

#[test]
fn object_rows_against_moto_next_to_plain_http() {
    let out = run(&[
        "--backend",
        "object",
        "--compare",
        "--json",
        "--block-sizes",
        "256KiB",
        "--depth",
        "2",
        "--seconds",
        "0.2",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let moto_missing = (out.status.code() == Some(2) && stderr.contains("moto not installed"))
        .then(|| stderr.trim().to_owned());
    nixl_testkit::require!(moto_missing, "NIXL_REQUIRE_OBJECT_TESTS");
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    let r: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(r.len(), 2, "{stdout}");
    for row in &r {
        check_storage_row(row, "object", "http");
        assert_eq!(row["topology"], "object", "{row}");
        assert!(
            row["baseline_gbps"].as_f64().is_some(),
            "the server's ceiling: {row}"
        );
    }
}

#[test]
fn prepped_and_stride_rows_report_create_time() {
    for (mode, flag) in [
        ("plain", None),
        ("prepped", Some("--prepped")),
        ("stride", Some("--stride")),
    ] {
        let mut args = vec![
            "--backend",
            "shm",
            "--op",
            "read",
            "--block-sizes",
            "4KiB",
            "--batch",
            "2000",
            "--iters",
            "3",
            "--json",
        ];
        args.extend(flag);
        let r = rows(&args);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0]["mode"], mode, "{}", r[0]);
        assert_eq!(r[0]["backend"], "shm", "{}", r[0]);
        assert!(f(&r[0], "create_us") > 0.0, "{}", r[0]);
        assert!(f(&r[0], "gbps") > 0.0, "{}", r[0]);
    }
    // --verify checks whole parts: refused with these modes, with the reason.
    let out = run(&[
        "--backend",
        "local",
        "--prepped",
        "--verify",
        "--iters",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--verify"),
        "{}",
        text(&out.stderr)
    );
}
