//! Three daemons in three network namespaces with a real etcd: presence, canaries, metrics
//! parsed by prometheus_client, a SIGKILLed daemon and a daemon SIGTERMed mid-transfer.

mod common;

use std::time::{Duration, Instant};

use common::{curl, peer_state, run, sample, scrape, skip, spawn_etcd, Daemon, Scratch, BIN};
use nixl_agent::control::ControlError;
use nixl_tests::netns::Lab;
use serde_json::json;

const TTL_S: u64 = 3;
const CANARY: Duration = Duration::from_secs(1);
const CANARY_TIMEOUT: Duration = Duration::from_secs(1);
const DRAIN: Duration = Duration::from_secs(3);

/// etcd inside host 0 of `lab`, answering on its address.
struct Etcd {
    child: std::process::Child,
    url: String,
    _dir: Scratch,
}

impl Etcd {
    fn start(lab: &Lab) -> Etcd {
        let dir = Scratch::new("fleet-etcd");
        let ip = lab.addr(0);
        let url = format!("http://{ip}:2379");
        let peer = format!("http://{ip}:2380");
        let child = spawn_etcd(lab.command(0, "etcd"), &dir.0.join("data"), &url, &peer);
        let e = Etcd {
            child,
            url,
            _dir: dir,
        };
        let t = Instant::now();
        while curl(Some((lab, 0)), &format!("{}/health", e.url)).0 != 200 {
            assert!(t.elapsed() < Duration::from_secs(20), "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        e
    }

    /// Whether `key` is in etcd now (etcd's own JSON gateway, through curl).
    fn has(&self, lab: &Lab, key: &str) -> bool {
        let mut c = lab.command(0, "curl");
        let b64 = base64(key.as_bytes());
        c.args(["-s", "-m", "2", "-X", "POST", "-d"])
            .arg(json!({ "key": b64 }).to_string())
            .arg(format!("{}/v3/kv/range", self.url));
        let out = run(c);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("etcd answers JSON");
        v["kvs"].as_array().is_some_and(|k| !k.is_empty())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64(b: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut o = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                o.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                o.push('=');
            }
        }
    }
    o
}

fn config(lab: &Lab, i: usize, etcd: &str) -> String {
    format!(
        r#"
backends = ["local", "tcp"]
[auth]
secret = "fleet test secret"
[tcp]
listen = "{addr}:0"
[etcd]
endpoints = ["{etcd}"]
ttl_s = {TTL_S}
connect_timeout_ms = 1000
[daemon]
name = "{name}"
http_listen = "{addr}:9464"
pool_size = "64MiB"
drain_timeout = "{drain}ms"
canary_interval = "{ci}ms"
canary_timeout = "{ct}ms"
canary_backoff_max = "1s"
"#,
        addr = lab.addr(i),
        name = lab.name(i),
        drain = DRAIN.as_millis(),
        ci = CANARY.as_millis(),
        ct = CANARY_TIMEOUT.as_millis(),
    )
}

fn lease(d: &Daemon, name: &str, size: &str) -> u64 {
    let j = d
        .client()
        .post(
            "/v1/jobs",
            &json!({"kind": "lease", "name": name, "size": size}),
        )
        .unwrap();
    j["detail"]["addr"].as_u64().unwrap()
}

fn transfer(d: &Daemon, op: &str, lease: &str, len: u64, peer: &str, addr: u64) -> u64 {
    let j = d
        .client()
        .post(
            "/v1/jobs",
            &json!({"kind": "transfer", "op": op, "lease": lease, "len": len,
                    "peer": peer, "remote_addr": addr}),
        )
        .unwrap_or_else(|e| panic!("{}: transfer: {e}", d.name));
    j["id"].as_u64().unwrap()
}

fn job_state(d: &Daemon, id: u64) -> (String, String) {
    let j = d.client().get(&format!("/v1/jobs/{id}")).unwrap();
    (
        j["state"].as_str().unwrap().to_owned(),
        j["error"].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn three_daemons_find_watch_measure_and_drain() {
    if let Some(why) = common::netns_missing() {
        return skip("three_daemons_find_watch_measure_and_drain", &why);
    }
    let lab = Lab::triangle();
    let etcd = Etcd::start(&lab);
    let dir = Scratch::new("fleet");
    let mut d: Vec<Daemon> = (0..3)
        .map(|i| {
            Daemon::start(
                lab.command(i, BIN),
                &dir.0,
                lab.name(i),
                &config(&lab, i, &etcd.url),
            )
        })
        .collect();
    let names: Vec<String> = (0..3).map(|i| lab.name(i).to_owned()).collect();

    // Each publishes itself, loads the other two, and sees them up.
    for (i, x) in d.iter().enumerate() {
        let others: Vec<&String> = names.iter().filter(|n| **n != names[i]).collect();
        let took = x.until("ready, both peers up", Duration::from_secs(20), |s| {
            s["ready"] == true
                && others
                    .iter()
                    .all(|p| peer_state(s, p).as_deref() == Some("up"))
        });
        eprintln!("{}: ready with both peers up after {took:?}", x.name);
        let (code, body) = curl(
            Some((&lab, i)),
            &format!("http://{}:9464/readyz", lab.addr(i)),
        );
        assert_eq!(code, 200, "{body}");
        assert!(etcd.has(&lab, &format!("/nixl/agents/{}", names[i])));
    }

    // A transfer between a and b through their pools moves the byte counters on both sides,
    // as prometheus_client parses them.
    let a_url = format!("http://{}:9464/metrics", lab.addr(0));
    let b_url = format!("http://{}:9464/metrics", lab.addr(1));
    let before_a = scrape(Some((&lab, 0)), &a_url);
    let before_b = scrape(Some((&lab, 1)), &b_url);
    lease(&d[0], "src", "16MiB");
    let b_dst = lease(&d[1], "dst", "16MiB");
    let n: u64 = 8 << 20;
    let id = transfer(&d[0], "write", "src", n, &names[1], b_dst);
    let t = Instant::now();
    while job_state(&d[0], id).0 == "running" {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "transfer did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(job_state(&d[0], id), ("done".into(), String::new()));
    let after_a = scrape(Some((&lab, 0)), &a_url);
    let after_b = scrape(Some((&lab, 1)), &b_url);
    let delta =
        |a: &serde_json::Map<_, _>, b: &serde_json::Map<_, _>, k: &str| sample(b, k) - sample(a, k);
    assert_eq!(
        delta(&before_a, &after_a, "nixl_agent_tx_bytes_total"),
        n as f64
    );
    assert_eq!(
        delta(&before_a, &after_a, "nixl_agent_tx_requests_total"),
        1.0
    );
    assert_eq!(
        delta(&before_b, &after_b, "nixl_agent_rx_bytes_total"),
        n as f64
    );
    assert!(
        sample(&after_a, "nixl_agent_xfer_seconds_count") >= 1.0,
        "{after_a:?}"
    );
    assert_eq!(sample(&after_a, "nixl_build_info{version=\"0.1.0\"}"), 1.0);
    assert_eq!(
        sample(&after_a, &format!("nixl_peer_up{{peer=\"{}\"}}", names[1])),
        1.0
    );
    // Each lease is registered as its own region: b registers its one 16 MiB lease.
    assert_eq!(
        sample(&after_b, "nixl_agent_registered_bytes{kind=\"dram\"}"),
        (16u64 << 20) as f64
    );
    assert!(sample(&after_a, "nixl_peer_canary_seconds_count") >= 1.0);

    // c is SIGKILLed: a and b mark it down within canary interval + timeout, and drop it when
    // its lease ends.
    let killed = Instant::now();
    d[2].signal(libc::SIGKILL);
    assert_eq!(
        d[2].wait_exit(Duration::from_secs(5)),
        None,
        "killed, no exit code"
    );
    let c = names[2].clone();
    for x in &d[..2] {
        x.until(
            "c down",
            CANARY + CANARY_TIMEOUT + Duration::from_millis(1500),
            |s| peer_state(s, &c).as_deref() == Some("down"),
        );
    }
    eprintln!("c marked down after {:?}", killed.elapsed());
    let m = scrape(Some((&lab, 0)), &a_url);
    let up = m.get(&format!("nixl_peer_up{{peer=\"{c}\"}}"));
    assert_eq!(up.and_then(|v| v.as_f64()), Some(0.0), "{m:?}");
    for x in &d[..2] {
        x.until("c dropped", Duration::from_secs(TTL_S + 3), |s| {
            peer_state(s, &c).is_none()
        });
    }
    eprintln!("c dropped after {:?} (ttl {TTL_S} s)", killed.elapsed());
    let m = scrape(Some((&lab, 0)), &a_url);
    assert!(!m.keys().any(|k| k.contains(&c)), "c's series went: {m:?}");

    // b is SIGTERMed mid-transfer: a writes to b and b reads from a, both slowed to ~8 MB/s.
    lab.set_rate(0, 64_000_000).unwrap();
    lab.set_rate(1, 64_000_000).unwrap();
    let a_src2 = lease(&d[0], "big", "48MiB");
    let b_dst2 = lease(&d[1], "big", "40MiB");
    let to_b = transfer(&d[0], "write", "big", 40 << 20, &names[1], b_dst2);
    let from_a = transfer(&d[1], "read", "big", 40 << 20, &names[0], a_src2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        job_state(&d[0], to_b).0,
        "running",
        "still moving when b is told to stop"
    );
    assert_eq!(job_state(&d[1], from_a).0, "running");
    let term = Instant::now();
    d[1].signal(libc::SIGTERM);
    // /readyz turns 503 at once; new control requests are refused with the reason.
    let b_ready = format!("http://{}:9464/readyz", lab.addr(1));
    let (code, body) = curl(Some((&lab, 1)), &b_ready);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    match d[1].client().get("/v1/status") {
        Err(ControlError::Refused {
            status: 503,
            message,
        }) => {
            assert!(message.contains("draining"), "{message}")
        }
        other => panic!("control request during drain: {other:?}"),
    }
    eprintln!("b: /readyz 503 after {:?}", term.elapsed());
    // Its etcd key is gone within 1 s (the lease revoked, not expired).
    let key = format!("/nixl/agents/{}", names[1]);
    while etcd.has(&lab, &key) {
        assert!(
            term.elapsed() < Duration::from_secs(1),
            "b's key still in etcd"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("b: etcd key gone after {:?}", term.elapsed());
    // It exits 0 within drain_timeout (its own READ cancelled at the deadline).
    let code = d[1].wait_exit(DRAIN + Duration::from_secs(3));
    eprintln!("b: exited {code:?} after {:?}", term.elapsed());
    assert_eq!(code, Some(0), "log:\n{}", d[1].log_text());
    let log = d[1].log_text();
    assert!(log.contains("drain timeout: cancelling"), "{log}");
    assert!(
        log.contains("\"state\":\"cancelled\""),
        "b's READ was cancelled: {log}"
    );
    assert!(
        log.lines().all(|l| l.starts_with('{')),
        "--log-format json: every line is an object"
    );
    // a's WRITE into b ended in a terminal state, and a serves on.
    let t = Instant::now();
    let (st, err) = loop {
        let s = job_state(&d[0], to_b);
        if s.0 != "running" {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a's transfer to b never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("a's transfer to b: {st} {err}");
    assert!(st == "failed" || st == "done", "{st}: {err}");
    d[0].until("b gone from a's peers", Duration::from_secs(3), |s| {
        peer_state(s, &names[1]).is_none()
    });
    assert_eq!(
        curl(
            Some((&lab, 0)),
            &format!("http://{}:9464/readyz", lab.addr(0))
        )
        .0,
        200
    );
}
