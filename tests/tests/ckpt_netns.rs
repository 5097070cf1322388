//! A checkpoint served from one "host" (network namespace) and restored on another over tcp:
//! the server process, in namespace `a`, holds the checkpoint in registered memory
//! (`nixl_checkpoint::serve`); the restoring process, in namespace `b`, restores every region
//! from `nixl://ADDR_A:PORT` and compares every byte. Skips visibly where namespaces cannot be
//! made (not root, no iproute2).
//!
//! The same with the checkpoint held by a node daemon: `nixl-agent serve` (in-process, in
//! namespace `a`) with a memory pool; this process places the checkpoint in the pool
//! (`nixl_checkpoint::daemon::serve_in_daemon`, over the daemon's local sockets) and the
//! restorer in `b` restores from the daemon's tcp listener, unchanged; then a second
//! checkpoint goes into the same daemon and each is restored by its name
//! (`nixl://HOST:PORT/NAME`).
//!
//! The tests run themselves again in each namespace (`current_exe`, a role in
//! `NIXL_CKPT_NETNS`).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use nixl_checkpoint::{restore_mapped, save, serve, Placement, Region, SaveOptions};
use nixl_core::{Agent, Desc, DescList, MemKind};
use nixl_tests::netns::{skip_reason, Lab};
use nixl_transports::config::Config;

const ROLE: &str = "NIXL_CKPT_NETNS";
const TEST: &str = "checkpoint_served_in_one_namespace_restores_in_another";

fn agent(toml: &str) -> Agent {
    let cfg = Config::from_toml(toml).unwrap();
    Agent::builder(format!("ckpt-netns-{}", std::process::id()))
        .backends(cfg.backends().unwrap())
        .build()
        .unwrap()
}

const SIZES: [usize; 3] = [(6 << 20) + 5, 12_345, 4096];

/// In namespace `a`: serves the checkpoint at `dir` on `listen`, prints the URI, waits for
/// stdin to close.
fn server(dir: &str, listen: &str) {
    let a = agent(&format!(
        "backends = [\"tcp\", \"uring\", \"posix\"]\n[tcp]\nlisten = \"{listen}\"\n"
    ));
    let _served = serve(&a, dir).unwrap();
    let at = nixl_transports::tcp::listen_addrs_in(&a.metadata())[0];
    // On stderr, which the harness never captures.
    let _ = writeln!(std::io::stderr(), "nixl://{at}");
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
}

/// The seed of the sample checkpoint a restorer compares with (`NIXL_CKPT_SEED`, default 1).
fn seed() -> u64 {
    std::env::var("NIXL_CKPT_SEED").map_or(1, |s| s.parse().unwrap())
}

/// In namespace `b`: restores every region from `uri` and compares it.
fn restorer(uri: &str) {
    let seed = seed();
    let a = agent("backends = [\"tcp\"]");
    let r = restore_mapped(&a, uri, None, Placement::Anywhere).unwrap();
    for (i, &n) in SIZES.iter().enumerate() {
        let x = r.region(&format!("r{i}")).unwrap();
        assert_eq!(x.len, n as u64);
        // SAFETY: mapped and written by the restore, which has returned.
        let b = unsafe { std::slice::from_raw_parts(x.addr as usize as *const u8, n) };
        assert!(
            b == nixl_tests::pattern(i as u64 + seed, n).as_slice(),
            "r{i} differs"
        );
    }
    let _ = writeln!(std::io::stderr(), "restored {} regions", SIZES.len());
    if std::env::var_os("NIXL_CKPT_ARTIFACT").is_some() {
        let dest = std::env::temp_dir().join(format!("nixl-ckpt-netns-art-{}", std::process::id()));
        let rep = nixl_checkpoint::restore_artifact_with(&a, uri, "cache", &dest).unwrap();
        let got = std::fs::read(dest.join("k/kernel.bin")).unwrap();
        let _ = std::fs::remove_dir_all(&dest);
        assert!(
            got == nixl_tests::pattern(seed, ARTIFACT_LEN),
            "the artifact differs"
        );
        let _ = writeln!(std::io::stderr(), "restored artifact: {} files", rep.files);
    }
}

/// The artifact directory of the second sample: one file of `pattern(seed, ARTIFACT_LEN)`.
const ARTIFACT_LEN: usize = (1 << 20) + 3;

/// Saves the three regions of the test to `dir`, their bytes from `seed`, with an artifact
/// directory `cache` when `artifact`.
fn save_sample_with(dir: &Path, seed: u64, artifact: bool) {
    let mut artifacts = Vec::new();
    if artifact {
        let tree = dir.with_extension("tree");
        std::fs::create_dir_all(tree.join("k")).unwrap();
        std::fs::write(
            tree.join("k/kernel.bin"),
            nixl_tests::pattern(seed, ARTIFACT_LEN),
        )
        .unwrap();
        artifacts.push(("cache".to_owned(), tree));
    }
    save_opts(
        dir,
        seed,
        SaveOptions {
            artifacts,
            ..SaveOptions::default()
        },
    );
}

/// Saves the three regions of the test to `dir`, their bytes from `seed`.
fn save_sample(dir: &Path, seed: u64) {
    save_opts(dir, seed, SaveOptions::default());
}

fn save_opts(dir: &Path, seed: u64, opts: SaveOptions) {
    let a = agent("backends = [\"uring\", \"posix\"]");
    let mut bufs: Vec<Vec<u8>> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| nixl_tests::pattern(i as u64 + seed, n))
        .collect();
    let descs: Vec<Desc> = bufs.iter_mut().map(|b| Desc::from_mut_slice(b)).collect();
    // SAFETY: the buffers outlive the registration.
    let _reg = unsafe { a.register(&DescList::from_descs(MemKind::Dram, descs.clone()).unwrap()) }
        .unwrap();
    let regions: Vec<Region> = descs
        .iter()
        .enumerate()
        .map(|(i, d)| Region::dram(format!("r{i}"), d.addr, d.len))
        .collect();
    // SAFETY: the buffers are live and unchanged during the call.
    unsafe { save(&a, dir.to_str().unwrap(), &regions, &opts) }.unwrap();
}

const DAEMON_TEST: &str = "checkpoint_held_by_a_daemon_restores_in_another_namespace";

#[test]
fn checkpoint_held_by_a_daemon_restores_in_another_namespace() {
    match std::env::var(ROLE).as_deref() {
        Ok("daemon") => {
            let cfg = std::env::var("NIXL_CKPT_DAEMON_CONFIG").unwrap();
            let cfg = nixl_agent::serve::load_config(Some(Path::new(&cfg))).unwrap();
            nixl_agent::serve::run(cfg).unwrap();
            return;
        }
        Ok("restore") => return restorer(&std::env::var("NIXL_CKPT_URI").unwrap()),
        Ok("restore-none") => {
            let a = agent("backends = [\"tcp\"]");
            let uri = std::env::var("NIXL_CKPT_URI").unwrap();
            let e = restore_mapped(&a, &uri, None, Placement::Anywhere).unwrap_err();
            let _ = writeln!(std::io::stderr(), "refused: {e}");
            return;
        }
        _ => {}
    }
    nixl_testkit::require!(skip_reason());
    let dir = std::env::temp_dir().join(format!("nixl-ckpt-netnsd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("ck");
    save_sample(&ck, 1);
    let ck2 = dir.join("ck2");
    save_sample_with(&ck2, 40, true);
    let lab = Lab::pair();
    let secret = format!("ckpt-netnsd-{:032x}", nixl_core::random_u64().unwrap());
    let sock = dir.join("agent.sock");
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "backends = [\"tcp\"]\n[auth]\nsecret = \"{secret}\"\n[tcp]\nlisten = \"{a}:0\"\n\
             [daemon]\ncontrol_socket = \"{}\"\nhttp_listen = \"{a}:0\"\npool_size = \"64MiB\"\n",
            sock.display(),
            a = lab.addr(0)
        ),
    )
    .unwrap();
    let exe = std::env::current_exe().unwrap();
    let child = |i: usize, role: &str| -> Command {
        let mut c = lab.command(i, &exe);
        c.args([DAEMON_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env("NIXL_CKPT_DAEMON_CONFIG", &cfg)
            .env("NIXL_SECRET", &secret);
        c
    };
    let mut daemon = child(0, "daemon")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let control = nixl_agent::control::Client::new(&sock);
    let t0 = std::time::Instant::now();
    while !control.get("/v1/status").is_ok_and(|s| s["ready"] == true) {
        if t0.elapsed() > std::time::Duration::from_secs(30) {
            let _ = daemon.kill();
            panic!("the daemon did not get ready");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Placed from this process (the daemon's sockets are files; no network involved).
    let a = agent("backends = [\"uring\", \"posix\"]");
    let placed =
        nixl_checkpoint::daemon::serve_in_daemon(&a, ck.to_str().unwrap(), &sock, "w").unwrap();
    assert_eq!(placed.leases.len(), 1 + SIZES.len());
    let at = placed
        .tcp_listen
        .first()
        .expect("the daemon's tcp listener")
        .clone();
    assert!(at.starts_with(&lab.addr(0).to_string()), "{at}");
    let e =
        nixl_checkpoint::daemon::serve_in_daemon(&a, ck.to_str().unwrap(), &sock, "w").unwrap_err();
    assert!(e.to_string().contains("already holds"), "{e}");
    let uri = format!("nixl://{at}");
    let out = child(1, "restore")
        .env("NIXL_CKPT_URI", &uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    // A second checkpoint in the same daemon: each restores by its name, and a restorer that
    // names none is refused with both names.
    // It holds an artifact directory, served from a lease of its own and restored by the peer.
    let placed_v =
        nixl_checkpoint::daemon::serve_in_daemon(&a, ck2.to_str().unwrap(), &sock, "v").unwrap();
    assert_eq!(placed_v.leases.len(), 2 + SIZES.len());
    let by_name = |name: &str, seed: u64| {
        let mut c = child(1, "restore");
        c.env("NIXL_CKPT_URI", format!("{uri}/{name}"))
            .env("NIXL_CKPT_SEED", seed.to_string());
        if name == "v" {
            c.env("NIXL_CKPT_ARTIFACT", "1");
        }
        let o = c.output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (w_ok, w_text) = by_name("w", 1);
    let (v_ok, v_text) = by_name("v", 40);
    let ambiguous = child(1, "restore-none")
        .env("NIXL_CKPT_URI", &uri)
        .output()
        .unwrap();
    let ambiguous = String::from_utf8_lossy(&ambiguous.stderr).into_owned();
    let released_v = nixl_checkpoint::daemon::release_from_daemon(&sock, "v");
    let released = nixl_checkpoint::daemon::release_from_daemon(&sock, "w");
    let after = child(1, "restore-none")
        .env("NIXL_CKPT_URI", &uri)
        .output()
        .unwrap();
    let after = String::from_utf8_lossy(&after.stderr).into_owned();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && text.contains("restored 3 regions"),
        "restorer: {text}"
    );
    assert!(w_ok && w_text.contains("restored 3 regions"), "w: {w_text}");
    assert!(
        v_ok && v_text.contains("restored 3 regions") && v_text.contains("restored artifact: 1"),
        "v: {v_text}"
    );
    assert!(
        ambiguous.contains("refused") && ambiguous.contains("several") && ambiguous.contains("v"),
        "{ambiguous}"
    );
    assert_eq!(released_v.unwrap(), 2 + SIZES.len());
    assert_eq!(released.unwrap(), 1 + SIZES.len());
    assert!(
        after.contains("refused") && after.contains("no control region"),
        "{after}"
    );
}

#[test]
fn checkpoint_served_in_one_namespace_restores_in_another() {
    match std::env::var(ROLE).as_deref() {
        Ok("serve") => {
            return server(
                &std::env::var("NIXL_CKPT_DIR").unwrap(),
                &std::env::var("NIXL_CKPT_LISTEN").unwrap(),
            )
        }
        Ok("restore") => return restorer(&std::env::var("NIXL_CKPT_URI").unwrap()),
        _ => {}
    }
    nixl_testkit::require!(skip_reason());
    let dir = std::env::temp_dir().join(format!("nixl-ckpt-netns-{}", std::process::id()));
    save_sample(&dir, 1);
    let lab = Lab::pair();
    let secret = format!("ckpt-netns-{:032x}", nixl_core::random_u64().unwrap());
    let exe = std::env::current_exe().unwrap();
    let child = |i: usize, role: &str| -> Command {
        let mut c = lab.command(i, &exe);
        c.args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env("NIXL_CKPT_DIR", &dir)
            // Two "hosts": the per-user secret admits only this host, a shared one both.
            .env("NIXL_SECRET", &secret);
        c
    };
    let mut srv = child(0, "serve")
        .env("NIXL_CKPT_LISTEN", format!("{}:0", lab.addr(0)))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut uri = None;
    for line in BufReader::new(srv.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("nixl://") {
            uri = Some(line);
            break;
        }
    }
    let uri = uri.expect("the server printed its URI");
    assert!(uri.contains(&lab.addr(0).to_string()), "{uri}");
    let out = child(1, "restore")
        .env("NIXL_CKPT_URI", &uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    drop(srv.stdin.take());
    let _ = srv.wait();
    let _ = std::fs::remove_dir_all(Path::new(&dir));
    assert!(
        out.status.success() && text.contains("restored 3 regions"),
        "restorer: {text}"
    );
}
