//! A real etcd server for tests: started on free loopback ports with a temporary data dir,
//! killed on drop. Where the binary is missing, [`Etcd::start`] prints a `SKIPPED` line and
//! returns `None` (or fails the test under `NIXL_REQUIRE_ALL=1`). `NIXL_ETCD_BIN` names another binary than `etcd` on the `PATH`.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixl_core::{Agent, Desc, DescList, MemKind, Registration};
use nixl_discovery::{EtcdConfig, Registry};
use nixl_transports::local::LocalBackend;

pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
    pub url: String,
    peer_url: String,
}

fn bin() -> String {
    std::env::var("NIXL_ETCD_BIN").unwrap_or_else(|_| "etcd".to_owned())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

impl Etcd {
    /// A fresh etcd that answers, or `None` (with a visible skip) where the binary is missing.
    pub fn start(test: &str) -> Option<Etcd> {
        init_tracing();
        if let Err(e) = Command::new(bin()).arg("--version").output() {
            let why = format!(
                "etcd not installed ({}: {e}; Debian package etcd-server) [{test}]",
                bin()
            );
            nixl_testkit::skip(why, false, &[]);
            return None;
        }
        let (client, peer) = (free_port(), free_port());
        let base =
            std::env::temp_dir().join(format!("nixl-etcd-{}-{client}-{test}", std::process::id()));
        let mut e = Etcd {
            child: None,
            dir: base.with_extension("data"),
            log: base.with_extension("log"),
            url: format!("http://127.0.0.1:{client}"),
            peer_url: format!("http://127.0.0.1:{peer}"),
        };
        e.spawn();
        Some(e)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log file");
        let child = Command::new(bin())
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("t={}", self.peer_url)])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let t = Instant::now();
        while Registry::connect(&self.cfg(10)).is_err() {
            if t.elapsed() > Duration::from_secs(20) {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("etcd did not answer within 20 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A configuration for this server: the given ttl, a 1 s timeout.
    pub fn cfg(&self, ttl_s: u64) -> EtcdConfig {
        EtcdConfig {
            ttl: Duration::from_secs(ttl_s),
            connect_timeout: Duration::from_secs(1),
            ..EtcdConfig::new([self.url.clone()])
        }
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .expect("kill(1)")
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Freezes the server: connections stay open and nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Kills the server and starts it again on the same ports and data.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    /// Runs `f` with a plain etcd client (to write what no agent would).
    pub fn raw<T>(
        &self,
        f: impl AsyncFnOnce(&mut etcd_client::Client) -> Result<T, etcd_client::Error>,
    ) -> T {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = etcd_client::Client::connect([self.url.clone()], None)
                .await
                .unwrap();
            f(&mut c).await.unwrap()
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A paused server dies of SIGKILL all the same.
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn agent(name: &str) -> Arc<Agent> {
    Arc::new(
        Agent::builder(name)
            .backend(Arc::new(LocalBackend::new()))
            .build()
            .unwrap(),
    )
}

pub fn list(buf: &[u8]) -> DescList {
    DescList::from_descs(MemKind::Dram, vec![Desc::from_slice(buf)]).unwrap()
}

/// Registers `buf` with `a`. The tests' buffers outlive their registrations and are touched
/// only by these tests' transfers, which end before the buffers are read or dropped.
pub fn reg(a: &Agent, buf: &mut [u8]) -> Registration {
    let l = DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(buf)]).unwrap();
    // SAFETY: see above.
    unsafe { a.register(&l) }.unwrap()
}

/// Polls `f` until it holds; fails the test after `limit`. Returns how long it took.
pub fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

pub fn has(a: &Agent, peer: &str) -> bool {
    a.peers().iter().any(|p| p == peer)
}
