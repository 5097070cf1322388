//! Daemons under test: `nixl-agent serve` processes, inside network namespaces or on this host,
//! driven through their control socket (our client) and their HTTP endpoint (curl and Python's
//! prometheus_client, run inside the daemon's namespace).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nixl_agent::control::Client;
use nixl_tests::netns::Lab;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_nixl-agent");

/// Prints a visible skip naming `what` could not run, or panics when the tests are required
/// (`NIXL_REQUIRE_DAEMON_TESTS=1` or `NIXL_REQUIRE_ALL=1`, set by `.ci/run`).
pub fn skip(what: &str, why: &str) {
    nixl_testkit::skip(
        format!("{what}: {why}"),
        false,
        &["NIXL_REQUIRE_DAEMON_TESTS"],
    );
}

/// Why the namespace tests cannot run here, if they cannot.
pub fn netns_missing() -> Option<String> {
    if let Some(why) = nixl_tests::netns::skip_reason() {
        return Some(why);
    }
    for (prog, arg) in [("etcd", "--version"), ("curl", "--version")] {
        if Command::new(prog).arg(arg).output().is_err() {
            return Some(format!("{prog} not installed (.ci/setup installs it)"));
        }
    }
    python_missing()
}

pub fn python_missing() -> Option<String> {
    let ok = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then(|| "python3 with prometheus_client not installed (.ci/setup installs it)".into())
}

/// A scratch directory for one test, removed on drop. (The daemon bench includes this module
/// too and makes none.)
#[allow(unused_imports)]
pub use nixl_testkit::ScratchDir as Scratch;

/// One daemon process.
pub struct Daemon {
    pub name: String,
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `nixl-agent serve` with `toml` as its config, through `cmd` (a command that runs
    /// the binary, maybe inside a namespace).
    pub fn start(mut cmd: Command, dir: &std::path::Path, name: &str, toml: &str) -> Daemon {
        let cfg = dir.join(format!("{name}.toml"));
        let sock = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        assert!(toml.contains("[daemon]\n"), "a [daemon] section");
        let toml = toml.replacen(
            "[daemon]\n",
            &format!("[daemon]\ncontrol_socket = \"{}\"\n", sock.display()),
            1,
        );
        std::fs::write(&cfg, toml).unwrap();
        let child = cmd
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&cfg)
            .env("NIXL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nixl-agent serve");
        Daemon {
            name: name.into(),
            child: Some(child),
            sock,
            log,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.sock).with_timeout(Duration::from_secs(5))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits for the process to exit, at most `limit`; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let c = self.child.as_mut().expect("running");
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return st.code();
            }
            if t.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /v1/status`, or `None` while the daemon does not answer.
    pub fn status(&self) -> Option<Value> {
        self.client().get("/v1/status").ok()
    }

    /// Waits until `f(status)` holds; panics with the log after `limit`.
    pub fn until(&self, what: &str, limit: Duration, f: impl Fn(&Value) -> bool) -> Duration {
        let t = Instant::now();
        loop {
            if let Some(s) = self.status() {
                if f(&s) {
                    return t.elapsed();
                }
            }
            if t.elapsed() > limit {
                panic!(
                    "{}: {what}: not within {limit:?}; status {:#?}\nlog:\n{}",
                    self.name,
                    self.status(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The state ("up", "down", "unknown") of `peer` in a status, or `None` if it is not listed.
pub fn peer_state(s: &Value, peer: &str) -> Option<String> {
    s["peers"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == peer)
        .map(|p| p["state"].as_str().unwrap_or("").to_owned())
}

/// Runs a command to its end.
pub fn run(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run command")
}

/// `GET url` with curl (inside host `i` of `lab`, or here): status code and body.
pub fn curl(lab: Option<(&Lab, usize)>, url: &str) -> (u16, String) {
    let mut c = match lab {
        Some((l, i)) => l.command(i, "curl"),
        None => Command::new("curl"),
    };
    c.args(["-s", "-m", "5", "-w", "\n%{http_code}", url]);
    let out = run(c);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The Python program that scrapes a /metrics URL and parses it with prometheus_client's parser
/// (a parser nobody here wrote): prints `{"name{labels}": value}` as JSON, one key per sample.
const SCRAPE: &str = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
out = {}
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
print(json.dumps(out))
"#;

/// Scrapes `url` with prometheus_client (inside host `i` of `lab`, or here).
pub fn scrape(lab: Option<(&Lab, usize)>, url: &str) -> serde_json::Map<String, Value> {
    let mut c = match lab {
        Some((l, i)) => l.command(i, "python3"),
        None => Command::new("python3"),
    };
    c.args(["-c", SCRAPE, url]);
    let out = run(c);
    nixl_testkit::child::assert_success(&out, &format!("scraping {url}"));
    match serde_json::from_slice(&out.stdout).expect("scrape output is JSON") {
        Value::Object(m) => m,
        v => panic!("{v}"),
    }
}

/// A sample's value (0 when absent).
pub fn sample(m: &serde_json::Map<String, Value>, key: &str) -> f64 {
    m.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

/// Starts `etcd` through `cmd` (a command that runs the binary, maybe inside a namespace) with
/// its data in `data`, serving clients at `client` and its one-member cluster at `peer`
/// (`http://IP:PORT` both). It answers a moment later.
pub fn spawn_etcd(mut cmd: Command, data: &std::path::Path, client: &str, peer: &str) -> Child {
    cmd.args(["--name", "t", "--data-dir"])
        .arg(data)
        .args([
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
        ])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args(["--initial-cluster", &format!("t={peer}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd")
}

/// A loopback port free now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
