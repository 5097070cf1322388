//! Shared by the weight-streamer tests: models written by Python's safetensors, `nixl-weights`
//! processes that are killed when dropped, their JSON lines.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_nixl-weights");
pub const SECRET: &str = "weights-test-secret";

/// The variable that turns the weight-streamer tests' skips into failures (`.ci/run` sets it,
/// and `NIXL_REQUIRE_ALL`): `nixl_testkit::require!(python_missing(), REQ)`.
pub const REQ: &str = "NIXL_REQUIRE_WEIGHTS_TESTS";

/// Why the tests cannot run here (no Python safetensors and numpy), or `None`.
pub fn python_missing() -> Option<String> {
    let ok = Command::new("python3")
        .args(["-c", "import safetensors.numpy, numpy"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| {
        "python3 with safetensors and numpy is missing (.ci/setup installs them)".to_owned()
    })
}

/// [`python_missing`], or no network namespaces (root).
pub fn netns_missing() -> Option<String> {
    python_missing().or_else(nixl_tests::netns::skip_reason)
}

/// [`python_missing`], or no etcd.
pub fn etcd_missing() -> Option<String> {
    python_missing().or_else(|| {
        nixl_testkit::missing_program("etcd")
            .map(|why| format!("{why} (Debian package etcd-server, from .ci/setup)"))
    })
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nixl-weights-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fresh temporary directory for test `tag` with a model of `kind` and `scale` made in its
/// `m`: (the directory, the model).
pub fn model_dir(tag: &str, kind: &str, scale: u32) -> (PathBuf, PathBuf) {
    let t = tmpdir(tag);
    let model = t.join("m");
    make_model(&model, kind, scale);
    (t, model)
}

/// Writes a model with Python's safetensors (see make_model.py).
pub fn make_model(dir: &Path, kind: &str, scale: u32) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make_model.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(dir)
        .arg(kind)
        .arg(scale.to_string())
        .output()
        .unwrap();
    nixl_testkit::child::assert_success(&out, "make_model");
}

/// Every file of `a` equals its namesake in `b` (`cmp`), and Python's safetensors loads equal
/// arrays from both.
pub fn assert_same_model(a: &Path, b: &Path) {
    let mut n = 0;
    for e in std::fs::read_dir(a).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let st = Command::new("cmp")
            .arg(e.path())
            .arg(b.join(&name))
            .status()
            .unwrap();
        assert!(st.success(), "cmp {:?} differs", name);
        n += 1;
    }
    assert!(n > 0);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make_model.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(a)
        .arg("check")
        .arg(b)
        .output()
        .unwrap();
    nixl_testkit::child::assert_success(&out, "safetensors.numpy.load_file comparison");
}

/// A child killed (SIGKILL) and reaped when dropped, with its stdout lines on a channel.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.env("NIXL_SECRET", SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap();
        let out: ChildStdout = child.stdout.take().unwrap();
        let lines = nixl_testkit::child::lines_of(out);
        Proc { child, lines }
    }

    /// The next stdout line parsed as JSON.
    pub fn json(&self, within: Duration) -> serde_json::Value {
        let l = self
            .lines
            .recv_timeout(within)
            .unwrap_or_else(|e| panic!("no output line within {within:?}: {e}"));
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `nixl-weights serve DIR --name NAME --listen LISTEN --json EXTRA...`, and the address it
/// serves on.
pub fn serve(
    mut cmd: Command,
    dir: &Path,
    name: &str,
    listen: &str,
    extra: &[&str],
) -> (Proc, String) {
    cmd.arg("serve")
        .arg(dir)
        .args(["--name", name, "--listen", listen, "--json"])
        .args(extra);
    let p = Proc::spawn(cmd);
    let v = p.json(Duration::from_secs(30));
    let addr = v["addrs"][0].as_str().unwrap().to_owned();
    (p, addr)
}

/// A pull of `model` into `out` from `sources`, on a fresh port, that must fail: its exit
/// code and stderr.
pub fn pull_err(model: &str, out: &Path, sources: &[&str]) -> (i32, String) {
    pull(cmd(), model, out, sources, &["--listen", "127.0.0.1:0"]).unwrap_err()
}

/// `nixl-weights pull NAME --out OUT --json` with each source, then `extra`; the JSON summary,
/// or the error text and exit code.
pub fn pull(
    mut cmd: Command,
    name: &str,
    out: &Path,
    sources: &[&str],
    extra: &[&str],
) -> Result<serde_json::Value, (i32, String)> {
    cmd.arg("pull")
        .arg(name)
        .arg("--out")
        .arg(out)
        .arg("--json");
    for s in sources {
        cmd.args(["--source", s]);
    }
    cmd.args(extra).env("NIXL_SECRET", SECRET);
    let o = cmd.output().unwrap();
    if !o.status.success() {
        return Err((
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ));
    }
    let s = String::from_utf8_lossy(&o.stdout);
    Ok(serde_json::from_str(s.lines().last().unwrap()).unwrap())
}

pub fn cmd() -> Command {
    Command::new(BIN)
}

/// A real etcd on free loopback ports (killed and its data removed on drop), or a skip.
pub struct Etcd {
    pub child: Child,
    pub url: String,
    dir: PathBuf,
}

impl Etcd {
    /// Starts one (check [`etcd_missing`] first).
    pub fn start(test: &str) -> Etcd {
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (c, p) = (port(), port());
        let url = format!("http://127.0.0.1:{c}");
        let peer = format!("http://127.0.0.1:{p}");
        let dir = tmpdir(&format!("etcd-{test}"));
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let e = Etcd { child, url, dir };
        let cfg = nixl_discovery::EtcdConfig::new([e.url.clone()]);
        let t = std::time::Instant::now();
        while nixl_discovery::Registry::connect(&cfg).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "etcd did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
        e
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
