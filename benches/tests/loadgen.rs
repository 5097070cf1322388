//! nixl-loadgen against a tiny fake OpenAI server on a real socket: it streams server-sent
//! events with a known delay before the first token and between tokens, fails some requests
//! (a 500, a stream cut before `[DONE]`), and records the prompts it got.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const FIRST_MS: u64 = 30;
const GAP_MS: u64 = 5;
const TOKENS: usize = 8;

fn handle(s: TcpStream, seen: Arc<Mutex<Vec<serde_json::Value>>>) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut len = 0usize;
    let mut first = String::new();
    r.read_line(&mut first)?;
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            return Ok(());
        }
        if l == "\r\n" {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    seen.lock().unwrap().push(req.clone());
    let mut w = s;
    assert!(first.starts_with("POST /v1/completions "), "{first}");
    assert_eq!(req["stream"], true);
    let prompt = req["prompt"].as_str().unwrap_or("");
    let q: usize = prompt
        .rsplit_once('Q')
        .and_then(|(_, t)| t.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if q % 5 == 4 {
        let b = r#"{"error":{"message":"overloaded","type":"server_error"}}"#;
        write!(
            w,
            "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
            b.len()
        )?;
        return Ok(());
    }
    write!(
        w,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    )?;
    w.flush()?;
    thread::sleep(Duration::from_millis(FIRST_MS));
    for i in 0..TOKENS {
        if i > 0 {
            thread::sleep(Duration::from_millis(GAP_MS));
        }
        if q % 5 == 3 && i == 2 {
            return Ok(()); // cut: no [DONE]
        }
        write!(
            w,
            "data: {{\"id\":\"c\",\"object\":\"text_completion\",\"choices\":[{{\"index\":0,\"text\":\"t{i}\"}}]}}\n\n"
        )?;
        w.flush()?;
    }
    write!(w, "data: [DONE]\n\n")?;
    Ok(())
}

fn server() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            let s = s2.clone();
            thread::spawn(move || {
                let _ = handle(c, s);
            });
        }
    });
    (url, seen)
}

fn run(url: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_nixl-loadgen"))
        .args(["--url", url, "--json", "--requests", "20", "--rate", "200"])
        .args([
            "--prefix-tokens",
            "64",
            "--suffix-tokens",
            "8",
            "--timeout",
            "20",
        ])
        .args(extra)
        .output()
        .unwrap();
    nixl_testkit::child::assert_success(&out, "nixl-loadgen");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn prompts(seen: &[serde_json::Value]) -> Vec<String> {
    let mut p: Vec<String> = seen
        .iter()
        .map(|r| r["prompt"].as_str().unwrap().to_string())
        .collect();
    p.sort();
    p
}

#[test]
fn streams_are_measured_and_failures_counted() {
    let (url, seen) = server();
    let r = run(
        &url,
        &["--workload", "shared", "--prompts", "3", "--seed", "9"],
    );
    // Q0..Q19: 4, 9, 14, 19 get a 500; 3, 8, 13, 18 are cut before [DONE].
    assert_eq!(r["requests"], 20, "{r}");
    assert_eq!(r["errors"], 8, "{r}");
    assert_eq!(r["ok"], 12, "{r}");
    assert_eq!(r["tokens"], 12 * TOKENS as u64, "{r}");
    let samples = r["error_samples"].to_string();
    assert!(samples.contains("500") && samples.contains("[DONE]"), "{r}");
    // The server waits FIRST_MS before the first token and GAP_MS between tokens.
    assert!(
        r["ttft_ms"]["p50"].as_f64().unwrap() >= FIRST_MS as f64,
        "{r}"
    );
    assert!(r["itl_ms"]["p99"].as_f64().unwrap() >= GAP_MS as f64, "{r}");
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");

    let seen1 = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen1.len(), 20);
    assert!(seen1
        .iter()
        .all(|q| q["max_tokens"] == 32 && q["temperature"] == 0));
    // Shared: 3 system prompts of 64 tokens in all.
    let systems: std::collections::BTreeSet<&str> = seen1
        .iter()
        .map(|q| &q["prompt"].as_str().unwrap()[..64])
        .collect();
    assert!(systems.len() <= 3 && systems.len() >= 2, "{systems:?}");

    // Same seed: the same prompts again; unique workload: no shared prefixes.
    run(
        &url,
        &["--workload", "shared", "--prompts", "3", "--seed", "9"],
    );
    let seen2 = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(prompts(&seen1), prompts(&seen2));
    run(&url, &["--workload", "unique", "--seed", "9"]);
    let seen3 = std::mem::take(&mut *seen.lock().unwrap());
    let firsts: std::collections::BTreeSet<String> = seen3
        .iter()
        .map(|q| {
            let p = q["prompt"].as_str().unwrap();
            p[p.find(':').unwrap()..][..40].to_string()
        })
        .collect();
    assert_eq!(firsts.len(), 20);
}

#[test]
fn a_dead_server_is_an_error_not_a_hang() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let out = Command::new(env!("CARGO_BIN_EXE_nixl-loadgen"))
        .args(["--url", &dead, "--json", "--requests", "3", "--rate", "100"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["errors"], 3, "{r}");
    let bad = Command::new(env!("CARGO_BIN_EXE_nixl-loadgen"))
        .args(["--url", &dead, "--rate", "0"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let m = Command::new(env!("CARGO_BIN_EXE_nixl-loadgen"))
        .args([
            "--url",
            &dead,
            "--memcpy-bytes",
            "65536",
            "--memcpy-chunk",
            "4096",
        ])
        .output()
        .unwrap();
    assert!(m.status.success());
    let m: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap();
    assert_eq!(m["memcpy_bytes"], 65536, "{m}");
    assert!(m["median_ms"].as_f64().unwrap() > 0.0, "{m}");
}
