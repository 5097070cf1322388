//! `nixl-weights serve --daemon`: the model goes into leases of a running `nixl-agent serve`
//! pool, the CLI exits, and the daemon's agent serves it to pullers (unchanged) until
//! `nixl-weights unload`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_same_model, cmd, etcd_missing, make_model, pull, pull_err, python_missing, tmpdir, Etcd,
    REQ, SECRET,
};

/// The `nixl-agent` binary beside this test's own target directory (built by
/// `cargo build -p nixl-agent`, and by any workspace build or test run).
fn agent_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("nixl-agent");
    p.exists().then_some(p)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(bin: &Path, dir: &Path, etcd: Option<&str>) -> (Daemon, PathBuf) {
    let sock = dir.join("agent.sock");
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "backends = [\"tcp\"]\n[auth]\nsecret = \"{SECRET}\"\n[tcp]\nlisten = \"127.0.0.1:0\"\n\
             [daemon]\nname = \"weights-daemon\"\ncontrol_socket = \"{}\"\n\
             http_listen = \"127.0.0.1:0\"\npool_size = \"64MiB\"\n{}",
            sock.display(),
            etcd.map(|u| format!("[etcd]\nendpoints = [\"{u}\"]\n"))
                .unwrap_or_default()
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon(child);
    let c = nixl_agent::control::Client::new(&sock);
    let t = Instant::now();
    while !c.get("/v1/status").is_ok_and(|s| s["ready"] == true) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "daemon not ready: {}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    (d, sock)
}

fn run(c: &mut Command) -> (i32, String, String) {
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_model_loaded_into_the_daemon_is_served_after_the_cli_exits_until_unloaded() {
    nixl_testkit::require!(python_missing(), REQ);
    nixl_testkit::require!(
        agent_bin().is_none().then_some(
            "the nixl-agent binary is not built (cargo build --release -p nixl-agent; any \
             workspace build or test run builds it)"
        ),
        REQ
    );
    let bin = agent_bin().expect("checked above");
    let t = tmpdir("daemon");
    let model = t.join("sharded");
    make_model(&model, "sharded", 20);
    let (_d, sock) = start_daemon(&bin, &t, None);

    // Loaded; the CLI exits at once.
    let (code, out, err) = run(cmd()
        .arg("serve")
        .arg(&model)
        .args(["--name", "m", "--chunk-size", "4096", "--json", "--daemon"])
        .arg(&sock));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let addr = v["addrs"][0].as_str().unwrap().to_owned();
    // Each of the 5 files read once, through io_uring where the kernel allows it.
    let read = &v["read"];
    let n = |k: &str| read[k].as_u64().unwrap();
    assert_eq!(
        n("uring_direct") + n("uring_buffered") + n("pread"),
        5,
        "{v}"
    );
    if std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|s| s.trim() == "0")
    {
        assert_eq!(n("pread"), 0, "{v}");
    }
    let pool = nixl_agent::control::Client::new(&sock)
        .get("/v1/pool")
        .unwrap();
    let names: Vec<&str> = pool["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["nixl-weights/m/data", "nixl-weights/m/ctrl"],
        "{pool}"
    );

    // Pullers (other processes) get it from the daemon's agent, byte-identical, twice.
    for round in 0..2 {
        let out = t.join(format!("out{round}"));
        let r = pull(cmd(), "m", &out, &[&addr], &["--listen", "127.0.0.1:0"]).unwrap();
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["sources"][&addr], r["bytes"], "{r}");
        assert_eq!(r["fallback_bytes"], 0, "{r}");
        assert_same_model(&model, &out);
    }

    // A second load of the same name is refused, and leaves the first served.
    let (code, _, err) = run(cmd()
        .arg("serve")
        .arg(&model)
        .args(["--name", "m", "--daemon"])
        .arg(&sock));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("exists"), "{err}");
    let r = pull(
        cmd(),
        "m",
        &t.join("out2"),
        &[&addr],
        &["--listen", "127.0.0.1:0"],
    )
    .unwrap();
    assert_eq!(r["verified"], true, "{r}");

    // Unloaded: the daemon holds no lease and pullers find no model there.
    let (code, _, err) = run(cmd().args(["unload", "m", "--daemon"]).arg(&sock));
    assert_eq!(code, 0, "{err}");
    let pool = nixl_agent::control::Client::new(&sock)
        .get("/v1/pool")
        .unwrap();
    assert_eq!(pool["used"], 0, "{pool}");
    let (code, e) = pull_err("m", &t.join("out3"), &[&addr]);
    assert_ne!(code, 0);
    assert!(e.contains("does not serve a model named"), "{e}");
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn a_model_loaded_into_the_daemon_is_announced_in_etcd_until_unloaded() {
    nixl_testkit::require!(etcd_missing(), REQ);
    nixl_testkit::require!(
        agent_bin()
            .is_none()
            .then_some("the nixl-agent binary is not built (cargo build --release -p nixl-agent)"),
        REQ
    );
    let bin = agent_bin().expect("checked above");
    let etcd = Etcd::start("daemon-etcd");
    let t = tmpdir("daemon-etcd");
    let model = t.join("single");
    make_model(&model, "single", 5);
    let (_d, sock) = start_daemon(&bin, &t, Some(&etcd.url));
    let (code, out, err) = run(cmd()
        .arg("serve")
        .arg(&model)
        .args(["--name", "e", "--json", "--daemon"])
        .arg(&sock));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(v["publish_job"].as_u64().is_some(), "{v}");
    // The CLI is gone; a puller finds the daemon in etcd alone.
    let r = pull(
        cmd(),
        "e",
        &t.join("out"),
        &[],
        &["--listen", "127.0.0.1:0", "--etcd", &etcd.url],
    )
    .unwrap();
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["fallback_bytes"], 0, "{r}");
    assert_same_model(&model, &t.join("out"));
    // Unloaded: the announcement goes with the leases.
    let (code, _, err) = run(cmd().args(["unload", "e", "--daemon"]).arg(&sock));
    assert_eq!(code, 0, "{err}");
    let ls = std::process::Command::new(common::BIN)
        .args(["ls", "--json", "--etcd", &etcd.url])
        .env("NIXL_SECRET", SECRET)
        .output()
        .unwrap();
    let ls: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(ls["models"].as_array().map(Vec::len), Some(0), "{ls}");
    let _ = std::fs::remove_dir_all(&t);
}
