//! The frontend and a worker as real processes, over raw HTTP/1.1: bad requests get the right
//! status and OpenAI-style error JSON; the worker's KV events, blocks, load and gap answer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid before it is reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Starts `nixl-serve ARGS`; returns it and the first stdout line.
fn start(args: &[&str]) -> (Proc, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nixl-serve"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = c.stdout.take().unwrap();
    let p = Proc(c);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut l = String::new();
        let _ = BufReader::new(out).read_line(&mut l);
        let _ = tx.send(l);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("ready line");
    (p, line.trim().to_owned())
}

/// (status, body) of one request.
fn http(url: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let status = r[9..12].parse().unwrap();
    let body = r.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    // Chunked bodies: keep the JSON object only.
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => body[a..=b].to_owned(),
        _ => body.to_owned(),
    };
    (status, body)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[test]
fn bad_requests_get_openai_errors() {
    let (_up, line) = start(&["up", "--aggregated", "--listen", "127.0.0.1:0", "--json"]);
    let url = json(&line)["url"].as_str().unwrap().to_owned();
    // (path, body, status, error.param, error.code)
    type Case<'a> = (&'a str, &'a str, u16, Option<&'a str>, Option<&'a str>);
    let cases: &[Case] = &[
        ("/v1/completions", "{not json", 400, None, None),
        ("/v1/completions", "[1,2]", 400, None, None),
        (
            "/v1/completions",
            r#"{"prompt":"x"}"#,
            400,
            Some("model"),
            None,
        ),
        (
            "/v1/completions",
            r#"{"model":"nope","prompt":"x"}"#,
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            "/v1/completions",
            r#"{"model":"nixl-ref"}"#,
            400,
            Some("prompt"),
            None,
        ),
        (
            "/v1/completions",
            r#"{"model":"nixl-ref","prompt":"x","max_tokens":0}"#,
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "/v1/completions",
            r#"{"model":"nixl-ref","prompt":"x","max_tokens":"7"}"#,
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "/v1/completions",
            r#"{"model":"nixl-ref","prompt":"x","temperature":5}"#,
            400,
            Some("temperature"),
            None,
        ),
        (
            "/v1/completions",
            r#"{"model":"nixl-ref","prompt":"x","n":2}"#,
            400,
            Some("n"),
            None,
        ),
        (
            "/v1/completions",
            r#"{"model":"nixl-ref","prompt":["a","b"]}"#,
            400,
            Some("prompt"),
            None,
        ),
        (
            "/v1/completions",
            r#"{"model":"nixl-ref","prompt":"x","stop":5}"#,
            400,
            Some("stop"),
            None,
        ),
        (
            "/v1/completions",
            r#"{"model":"nixl-ref","prompt":"x","logprobs":3}"#,
            400,
            Some("logprobs"),
            None,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"nixl-ref","messages":[]}"#,
            400,
            Some("messages"),
            None,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"nixl-ref","messages":[{"role":"robot","content":"x"}]}"#,
            400,
            Some("messages"),
            None,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"nixl-ref","messages":[{"role":"user"}]}"#,
            400,
            Some("messages"),
            None,
        ),
        ("/v1/nothing", "{}", 404, None, Some("unknown_url")),
    ];
    for (path, body, status, param, code) in cases {
        let (s, b) = http(&url, "POST", path, body);
        assert_eq!(s, *status, "{path} {body}: {b}");
        let e = &json(&b)["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{b}");
        assert!(e["type"].is_string(), "{b}");
        assert_eq!(e["param"].as_str(), *param, "{body}: {b}");
        assert_eq!(e["code"].as_str(), *code, "{body}: {b}");
    }
    let long = format!(
        r#"{{"model":"nixl-ref","prompt":"{}","max_tokens":100}}"#,
        "y".repeat(2000)
    );
    let (s, b) = http(&url, "POST", "/v1/completions", &long);
    assert_eq!(s, 400);
    assert_eq!(json(&b)["error"]["code"], "context_length_exceeded");
    // And a good one, with the usage.
    let (s, b) = http(
        &url,
        "POST",
        "/v1/completions",
        r#"{"model":"nixl-ref","prompt":"hello","max_tokens":5,"temperature":0}"#,
    );
    assert_eq!(s, 200, "{b}");
    let v = json(&b);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap().len(), 5);
    let (s, b) = http(&url, "GET", "/v1/models", "");
    assert_eq!(
        (s, json(&b)["data"][0]["id"].as_str()),
        (200, Some("nixl-ref"))
    );
}

#[test]
fn worker_kv_events_blocks_load_and_gap() {
    let dir = std::env::temp_dir().join(format!("nixl-serve-http-{}", std::process::id()));
    let st = Command::new(env!("CARGO_BIN_EXE_nixl-serve"))
        .args(["model", "--out"])
        .arg(&dir)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let (_w, line) = start(&[
        "worker",
        "--role",
        "aggregated",
        "--model",
        dir.to_str().unwrap(),
        "--tokens-per-block",
        "4",
        "--event-capacity",
        "2",
        "--blocks",
        "64",
        "--name",
        "wtest",
    ]);
    let url = line.trim_start_matches("NIXL-SERVE-READY ").to_owned();
    let (s, b) = http(&url, "GET", "/kv/events?since=0", "");
    assert_eq!((s, json(&b)["events"].as_array().unwrap().len()), (200, 0));
    let gen = |toks: &str| {
        let (s, b) = http(
            &url,
            "POST",
            "/generate",
            &format!(r#"{{"id":"g{toks}","tokens":[{toks}],"max_tokens":3}}"#),
        );
        assert_eq!(s, 200, "{b}");
        b
    };
    gen("256,1,2,3,4,5,6,7,8");
    let (_, b) = http(&url, "GET", "/kv/events?since=0", "");
    let ev = json(&b);
    assert_eq!(ev["worker"], "wtest");
    assert_eq!(ev["events"][0]["kind"]["type"], "stored");
    assert_eq!(
        ev["events"][0]["kind"]["blocks"].as_array().unwrap().len(),
        2
    );
    // The same prefix again: reused (a hit), no new stored event for those blocks.
    let (_, b) = http(
        &url,
        "POST",
        "/generate",
        r#"{"id":"again","tokens":[256,1,2,3,4,5,6,7,8,9],"max_tokens":1}"#,
    );
    assert!(
        b.contains("\"cached_tokens\":8") || b.contains("\"cached_tokens\": 8"),
        "{b}"
    );
    gen("256,9,9,9,9");
    gen("256,8,8,8,8");
    gen("256,7,7,7,7");
    let (s, b) = http(&url, "GET", "/kv/events?since=0", "");
    assert_eq!(s, 410, "{b}");
    let oldest = json(&b)["oldest"].as_u64().unwrap();
    assert!(oldest > 1);
    let (s, b) = http(&url, "GET", &format!("/kv/events?since={}", oldest - 1), "");
    assert_eq!(s, 200, "{b}");
    let (s, b) = http(&url, "GET", "/kv/events?since=x", "");
    assert_eq!(s, 400, "{b}");
    let (_, b) = http(&url, "GET", "/kv/blocks", "");
    let v = json(&b);
    assert!(v["blocks"].as_array().unwrap().len() >= 5, "{b}");
    assert!(v["last_id"].as_u64().unwrap() >= oldest);
    let (_, b) = http(&url, "GET", "/load", "");
    assert_eq!(
        json(&b),
        serde_json::json!({"active_requests": 0, "active_blocks": 0, "total_blocks": 64})
    );
    for bad in [
        "{bad",
        r#"{"id":"x","tokens":[],"max_tokens":3}"#,
        r#"{"id":"x","tokens":[999],"max_tokens":3}"#,
        r#"{"id":"x","tokens":[1],"max_tokens":4000000000}"#,
        r#"{"id":"","tokens":[1],"max_tokens":3}"#,
        r#"{"id":"x","tokens":[1],"max_tokens":3,"temperature":-1}"#,
    ] {
        let (s, b) = http(&url, "POST", "/generate", bad);
        assert_eq!(s, 400, "{bad}: {b}");
    }
    let (s, _) = http(
        &url,
        "POST",
        "/kv/peer",
        r#"{"worker":"w","role":"prefill","agents":[{"name":"a","metadata":"00ff","layout":"zz"}]}"#,
    );
    assert_eq!(s, 422);
    // Still serving.
    gen("256,3,3,3,3");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The heart of the stack without Python: the same greedy completion (text and the exact
/// log-probability of every token) from an aggregated worker and from prefill TP 2 handing KV
/// to decode TP 1, and from prefill TP 1 to decode TP 2.
#[test]
fn disaggregated_equals_aggregated_over_raw_http() {
    let body = r#"{"model":"nixl-ref","prompt":"Disaggregated serving moves the KV cache from prefill to decode.","max_tokens":40,"temperature":0,"logprobs":0}"#;
    let mut answers = Vec::new();
    for args in [
        &["--aggregated"][..],
        &["--prefill-tp", "2", "--decode-tp", "1"][..],
        &["--prefill-tp", "1", "--decode-tp", "2"][..],
    ] {
        let mut a = vec!["up", "--listen", "127.0.0.1:0", "--json"];
        a.extend(args);
        let (_up, line) = start(&a);
        let url = json(&line)["url"].as_str().unwrap().to_owned();
        let (s, b) = http(&url, "POST", "/v1/completions", body);
        assert_eq!(s, 200, "{args:?}: {b}");
        let v = json(&b);
        let c = &v["choices"][0];
        assert_eq!(c["text"].as_str().unwrap().len(), 40);
        assert_eq!(
            c["logprobs"]["token_logprobs"].as_array().unwrap().len(),
            40
        );
        answers.push((c["text"].clone(), c["logprobs"]["token_logprobs"].clone()));
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0], answers[2]);
}
