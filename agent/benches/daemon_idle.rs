//! The daemon's own cost at idle: `nixl-agent serve` watching 100 peers (agents of this process,
//! each with a live tcp listener, published in a real etcd), all answering canaries. Measured
//! over a window: the daemon's CPU (utime + stime from /proc) as a share of one core, its RSS,
//! and the time to scrape /metrics next to a /healthz of the same endpoint; etcd's CPU and RSS in
//! the same window as the peer figure.
//!
//! `cargo bench -p nixl-agent --bench daemon_idle` (`-- --peers N --secs S --interval-ms MS`);
//! with `--dead` the peers are etcd entries only (their listeners shut down after publishing), so
//! every canary is refused and the daemon backs off to `canary_backoff_max`. Needs `etcd` on
//! the PATH.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::Agent;
use nixl_discovery::{EtcdConfig, Registry};
use nixl_transports::tcp::{Auth, TcpBackend, TcpConfig};

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state field (3).
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kb / 1024.0
}

/// One HTTP GET on a new connection; (seconds, body bytes).
fn get(port: u16, path: &str) -> (f64, usize) {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"), "{path}");
    (t.elapsed().as_secs_f64(), out.len())
}

fn median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)])
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list" || a == "--test") {
        // `cargo test --benches` runs benches in test mode: nothing to smoke-test here.
        return;
    }
    let peers = arg(&args, "--peers", 100) as usize;
    let secs = arg(&args, "--secs", 30);
    let interval_ms = arg(&args, "--interval-ms", 10_000);
    let dead = args.iter().any(|a| a == "--dead");
    let dir = std::env::temp_dir().join(format!("nixl-daemon-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let (cp, pp, http) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let url = format!("http://127.0.0.1:{cp}");
    let peer_url = format!("http://127.0.0.1:{pp}");
    let etcd = Kill(common::spawn_etcd(
        Command::new("etcd"),
        &dir.join("etcd"),
        &url,
        &peer_url,
    ));
    let ecfg = EtcdConfig::new([url.clone()]);
    let t = Instant::now();
    let reg = loop {
        match Registry::connect(&ecfg) {
            Ok(r) => break r,
            Err(e) if t.elapsed() > Duration::from_secs(20) => panic!("etcd: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let secret = "bench secret";
    let mut agents = Vec::new();
    let mut pubs = Vec::new();
    for i in 0..peers {
        let cfg = TcpConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            auth: Auth::with_secret(secret.as_bytes().to_vec()),
            ..TcpConfig::default()
        };
        let a = Arc::new(
            Agent::builder(format!("peer-{i:03}"))
                .backend(Arc::new(TcpBackend::new(cfg)))
                .build()
                .unwrap(),
        );
        pubs.push(reg.publish(&a).unwrap());
        if dead {
            // The entry stays (the publication holds the agent), the listener goes.
            a.shutdown();
        }
        agents.push(a);
    }
    let toml = format!(
        r#"backends = ["local", "shm", "tcp"]
[auth]
secret = "{secret}"
[tcp]
listen = "127.0.0.1:0"
[etcd]
endpoints = ["{url}"]
[daemon]
name = "bench-daemon"
http_listen = "127.0.0.1:{http}"
control_socket = "{}"
canary_interval = "{interval_ms}ms"
"#,
        dir.join("agent.sock").display()
    );
    std::fs::write(dir.join("agent.toml"), toml).unwrap();
    let daemon = Kill(
        Command::new(env!("CARGO_BIN_EXE_nixl-agent"))
            .args(["serve", "--config"])
            .arg(dir.join("agent.toml"))
            .env("NIXL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let client = nixl_agent::control::Client::new(dir.join("agent.sock"));
    let t = Instant::now();
    loop {
        let want = if dead { "down" } else { "up" };
        let up = client
            .get("/v1/peers")
            .ok()
            .and_then(|v| v["peers"].as_array().cloned())
            .map_or(0, |p| p.iter().filter(|p| p["state"] == want).count());
        if up == peers {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{up} of {peers} peers up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "{peers} peers {} after {:?}; measuring {secs} s",
        if dead { "down" } else { "up" },
        t.elapsed()
    );
    // Settle (startup canaries, first scrapes), then measure.
    std::thread::sleep(Duration::from_secs(2));
    let (dpid, epid) = (daemon.0.id(), etcd.0.id());
    let (d0, e0, w0) = (cpu_secs(dpid), cpu_secs(epid), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let wall = w0.elapsed().as_secs_f64();
    let (d_cpu, e_cpu) = ((cpu_secs(dpid) - d0) / wall, (cpu_secs(epid) - e0) / wall);
    let (d_rss, e_rss) = (rss_mib(dpid), rss_mib(epid));

    let mut scrape = Vec::new();
    let mut health = Vec::new();
    let mut size = 0;
    for _ in 0..200 {
        let (s, n) = get(http, "/metrics");
        scrape.push(s);
        size = n;
        health.push(get(http, "/healthz").0);
    }
    let (sm, s99) = median(scrape);
    let (hm, _) = median(health);

    let what = if dead {
        "etcd entries only (canaries refused, backing off to 60 s)"
    } else {
        "live and answering"
    };
    println!("## daemon idle, {peers} watched peers {what}, canary every {interval_ms} ms, {secs} s window");
    println!("| what | daemon | peer in the same run | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| CPU, share of one core | {:.2} % | etcd: {:.2} % | {:.2} |",
        d_cpu * 100.0,
        e_cpu * 100.0,
        d_cpu / e_cpu
    );
    println!(
        "| RSS | {d_rss:.1} MiB | etcd: {e_rss:.1} MiB | {:.2} |",
        d_rss / e_rss
    );
    println!(
        "| GET /metrics ({size} bytes), median (p99) | {:.0} µs ({:.0} µs) | GET /healthz: {:.0} µs | {:.1} |",
        sm * 1e6,
        s99 * 1e6,
        hm * 1e6,
        sm / hm
    );
    drop(daemon);
    drop(pubs);
    drop(agents);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}
