//! What the daemon does with bad input: a garbage configuration, an unusable socket path, a
//! port in use, malformed control requests, and an etcd that is down when it starts.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{curl, free_port, skip, Daemon, Scratch, BIN};
use nixl_agent::control::ControlError;
use serde_json::json;

fn base(name: &str, http_port: u16) -> String {
    format!(
        r#"
backends = ["local", "tcp"]
[auth]
secret = "bad input secret"
[tcp]
listen = "127.0.0.1:0"
[daemon]
name = "{name}"
http_listen = "127.0.0.1:{http_port}"
pool_size = "8MiB"
"#
    )
}

/// Runs `serve` with `toml` to its end (it must fail): exit code and stderr.
fn fails(dir: &std::path::Path, toml: &str) -> (Option<i32>, String) {
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, toml).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.code(), err);
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("serve with a bad config did not exit:\n{toml}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_garbage_config_exits_2_naming_the_key() {
    let dir = Scratch::new("garbage");
    for (doc, key) in [
        ("[daemon]\nnmae = \"x\"\n", "nmae"),
        ("[tcp]\nlisen = \"127.0.0.1:0\"\n", "lisen"),
        ("[daemon]\npool_size = \"lots\"\n", "pool_size"),
        ("[daemon]\nhttp_listen = \"everywhere\"\n", "http_listen"),
        ("[etcd]\nendpoints = []\n", "etcd"),
        ("[[[", "config"),
        ("\u{0}\u{1}garbage", "config"),
    ] {
        let (code, err) = fails(&dir.0, doc);
        assert_eq!(code, Some(2), "{doc:?}: {err}");
        assert!(err.contains(key), "{doc:?}: the error names {key}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // A file that is not there is a configuration error too.
    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/nixl.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/nixl.toml"));
}

#[test]
fn an_unusable_socket_path_or_a_port_in_use_is_a_clear_error() {
    let dir = Scratch::new("unusable");
    let port = free_port();
    // A directory that cannot be made.
    let (code, err) = fails(
        &dir.0,
        &format!(
            "{}control_socket = \"/proc/nixl/agent.sock\"\n",
            base("u1", port)
        ),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("control_socket /proc/nixl/agent.sock"),
        "{err}"
    );
    // Something else at the path is left alone.
    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, "precious").unwrap();
    let (code, err) = fails(
        &dir.0,
        &format!(
            "{}control_socket = \"{}\"\n",
            base("u2", port),
            file.display()
        ),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    // The metrics port in use.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let sock = dir.0.join("u3.sock");
    let (code, err) = fails(
        &dir.0,
        &format!(
            "{}control_socket = \"{}\"\n",
            base("u3", busy),
            sock.display()
        ),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("http_listen 127.0.0.1:{busy}")) && err.contains("in use"),
        "{err}"
    );
    // A live daemon's socket is not taken over by a second one.
    let live = Daemon::start(Command::new(BIN), &dir.0, "live", &base("live", port));
    live.until("serving", Duration::from_secs(10), |_| true);
    let (code, err) = fails(
        &dir.0,
        &format!(
            "{}control_socket = \"{}\"\n",
            base("u4", free_port()),
            live.sock.display()
        ),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another daemon is serving there"), "{err}");
    live.until("still serving", Duration::from_secs(2), |s| {
        s["agent"] == "live"
    });
}

/// Sends raw bytes on a new control connection; returns what came back (until close or 3 s).
fn raw(sock: &std::path::Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn malformed_control_requests_are_refused_and_the_daemon_serves_on() {
    let dir = Scratch::new("malformed");
    let port = free_port();
    let d = Daemon::start(Command::new(BIN), &dir.0, "m", &base("m", port));
    d.until("serving", Duration::from_secs(10), |s| s["ready"] == true);
    let mode = std::fs::metadata(&d.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");

    // Not HTTP at all; a request line without a version; a header section past the limit.
    for junk in [
        &b"GARBAGE\r\n\r\n"[..],
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET /v1/status\r\n\r\n",
    ] {
        let got = raw(&d.sock, junk);
        assert!(got.is_empty() || got.starts_with("HTTP/1.1 400"), "{got:?}");
    }
    let mut huge = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 200_000));
    huge.extend_from_slice(b"\r\n\r\n");
    let got = raw(&d.sock, &huge);
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 431"),
        "{:?}",
        &got[..got.len().min(80)]
    );

    // Bodies: too large, not JSON, unknown kind, unknown field, wrong type, bad values.
    let c = d.client();
    let mut big = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'{', 1_000_000));
    let got = raw(&d.sock, &big);
    assert!(
        got.starts_with("HTTP/1.1 413"),
        "{:?}",
        &got[..got.len().min(200)]
    );
    for (body, want) in [
        (json!("just a string"), "job:"),
        (json!({"kind": "format-disk"}), "unknown variant"),
        (
            json!({"kind": "lease", "name": "x", "size": 1, "color": "red"}),
            "unknown field",
        ),
        (
            json!({"kind": "lease", "name": 7, "size": 1}),
            "invalid type",
        ),
        (
            json!({"kind": "lease", "name": "x", "size": "12 parsecs"}),
            "unit",
        ),
        (
            json!({"kind": "lease", "name": "x", "size": 1u64 << 50}),
            "exceeds the pool",
        ),
        (
            json!({"kind": "transfer", "op": "swap", "lease": "x", "peer": "p", "remote_addr": 0}),
            "read",
        ),
        (
            json!({"kind": "transfer", "op": "read", "lease": "nope", "peer": "p", "remote_addr": 0}),
            "no lease",
        ),
    ] {
        match c.post("/v1/jobs", &body) {
            Err(ControlError::Refused { status, message }) => {
                assert!(
                    (400..500).contains(&status) || status == 507,
                    "{body}: {status}"
                );
                assert!(message.contains(want), "{body}: {message}");
            }
            other => panic!("{body}: {other:?}"),
        }
    }
    // A lease, a transfer to a peer nobody loaded, unknown routes and methods, through curl.
    c.post(
        "/v1/jobs",
        &json!({"kind": "lease", "name": "x", "size": "1MiB"}),
    )
    .unwrap();
    let e = c
        .post("/v1/jobs", &json!({"kind": "transfer", "op": "read", "lease": "x", "peer": "ghost", "remote_addr": 4096}))
        .unwrap_err();
    assert!(e.to_string().contains("ghost"), "{e}");
    let sock = d.sock.to_str().unwrap();
    for (args, code) in [
        (vec!["http://x/v1/nothing"], "404"),
        (vec!["-X", "PATCH", "http://x/v1/status"], "405"),
        (vec!["http://x/v1/jobs/abc"], "400"),
        (vec!["-X", "DELETE", "http://x/v1/jobs/999"], "404"),
    ] {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--unix-socket",
                sock,
            ])
            .args(&args)
            .output();
        match out {
            Ok(o) => assert_eq!(String::from_utf8_lossy(&o.stdout), code, "{args:?}"),
            Err(e) => skip("curl checks", &format!("curl: {e}")),
        }
    }

    // Connections past the limit are closed at once and the others still served; idle ones
    // do not keep their slot forever.
    let idle: Vec<UnixStream> = (0..nixl_agent::control::MAX_CONNS + 8)
        .map(|_| UnixStream::connect(&d.sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    drop(idle);
    d.until("serving after the flood", Duration::from_secs(10), |s| {
        s["pool"]["leases"].as_array().map(Vec::len) == Some(1)
    });
    // And the HTTP side never saw any of it.
    let (code, _) = curl(None, &format!("http://127.0.0.1:{port}/healthz"));
    assert_eq!(code, 200);
}

#[test]
fn an_etcd_down_at_start_is_waited_for_and_published_to_when_it_comes() {
    if Command::new("etcd").arg("--version").output().is_err() {
        return skip(
            "etcd_down_at_start",
            "etcd not installed (.ci/setup installs it)",
        );
    }
    let dir = Scratch::new("etcd-late");
    let (client, peer, http) = (free_port(), free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let toml = format!(
        "{}[etcd]\nendpoints = [\"{url}\"]\nttl_s = 5\nconnect_timeout_ms = 500\n",
        base("late", http).replace("[daemon]", "[daemon]\ndrain_timeout = \"2s\"")
    );
    let d = Daemon::start(Command::new(BIN), &dir.0, "late", &toml);
    // Serving locally, not ready, and saying why.
    d.until("serving, waiting for etcd", Duration::from_secs(10), |s| {
        s["etcd"]["state"] == "waiting"
    });
    let (code, body) = curl(None, &format!("http://127.0.0.1:{http}/readyz"));
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("etcd"), "{body}");
    // etcd comes up: the daemon publishes and turns ready.
    let data = dir.0.join("etcd-data");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut etcd = common::spawn_etcd(Command::new("etcd"), &data, &url, &peer_url);
    let took = d.until("published once etcd is up", Duration::from_secs(25), |s| {
        s["etcd"]["state"] == "published" && s["ready"] == true
    });
    eprintln!("published {took:?} after etcd was started");
    assert_eq!(
        curl(None, &format!("http://127.0.0.1:{http}/readyz")).0,
        200
    );
    let r =
        nixl_discovery::Registry::connect(&nixl_discovery::EtcdConfig::new([url.clone()])).unwrap();
    assert!(r.fetch("late").unwrap().is_some(), "the key is there");
    let mut d = d;
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(r.fetch("late").unwrap().is_none(), "revoked by the drain");
    let _ = etcd.kill();
    let _ = etcd.wait();
}
