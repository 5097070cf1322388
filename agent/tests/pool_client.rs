//! The pool seam: a separate local process takes a lease of a running daemon's pool, maps it,
//! fills it and exits; the daemon's agent serves the bytes to a peer (found among its regions),
//! until the lease is released.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Daemon, Scratch, BIN};
use nixl_agent::pool_client::{MappedLease, PoolClient, PoolError};
use nixl_core::{Agent, Desc, DescList, MemKind, XferOp, XferOptions};
use nixl_transports::config::Config;

const SECRET: &str = "pool client secret";
/// The child role: fill the lease named in this variable at the daemon in POOL_TEST_SOCKET.
const ROLE: &str = "POOL_TEST_LEASE";

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2])
        .collect()
}

/// Run by the child process (the test binary again): takes the lease, fills it, exits.
#[test]
#[ignore = "child process of a_lease_filled_by_another_process_is_served_to_peers_until_released"]
fn child_fills_a_lease() {
    let name = std::env::var(ROLE).expect("run by the test named above");
    let sock = std::env::var("POOL_TEST_SOCKET").expect("run by the test named above");
    let pool = PoolClient::new(sock);
    let mut l = pool.lease(&name, 3 << 20).expect("lease");
    let want = pattern(3 << 20);
    // SAFETY: a new lease nobody else knows of yet.
    let bytes = unsafe { l.as_mut_slice() };
    bytes[..want.len()].copy_from_slice(&want);
    println!("LEASE {} {} {}", l.info().job, l.info().addr, l.info().len);
}

fn peer(name: &str) -> (Agent, Config) {
    let cfg = Config::from_toml(&format!(
        "backends = [\"tcp\"]\n[auth]\nsecret = \"{SECRET}\"\n[tcp]\nlisten = \"127.0.0.1:0\"\n"
    ))
    .unwrap();
    let a = cfg
        .agent_builder(name)
        .backends(cfg.backends().unwrap())
        .build()
        .unwrap();
    (a, cfg)
}

/// READs `len` bytes at `addr` of the daemon's agent, through its tcp listener.
fn read_from_daemon(
    a: &Agent,
    cfg: &Config,
    tcp: &str,
    addr: u64,
    len: u64,
) -> Result<Vec<u8>, String> {
    let md = nixl_transports::tcp::fetch_metadata(tcp, &cfg.auth(), Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let md = nixl_core::AgentMetadata::decode(&md).map_err(|e| e.to_string())?;
    if !md
        .regions
        .iter()
        .any(|r| r.kind == MemKind::Dram && r.desc == Desc::new(addr, len, 0))
    {
        return Err(format!("no region at {addr:#x}+{len} among the daemon's"));
    }
    let name = a.load_remote_md(md).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; len as usize];
    let local = DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(&mut buf)])
        .map_err(|e| e.to_string())?;
    // SAFETY: `buf` outlives the registration, dropped at the end of this function after the
    // READ ended; nothing else touches it meanwhile.
    let reg = unsafe { a.register(&local) }.map_err(|e| e.to_string())?;
    let remote = DescList::from_descs(MemKind::Dram, vec![Desc::new(addr, len, 0)]).unwrap();
    let x = a
        .create_xfer(XferOp::Read, &local, &remote, &name, XferOptions::default())
        .map_err(|e| e.to_string())?;
    x.post().map_err(|e| e.to_string())?;
    let r = x
        .wait_blocking(Some(Duration::from_secs(10)))
        .into_result()
        .map_err(|e| e.to_string());
    drop(x);
    drop(reg);
    r.map(|()| buf)
}

#[test]
fn a_lease_filled_by_another_process_is_served_to_peers_until_released() {
    let dir = Scratch::new("pool-client");
    let d = Daemon::start(
        Command::new(BIN),
        &dir.0,
        "poolnode",
        &format!(
            "backends = [\"local\", \"tcp\"]\n[auth]\nsecret = \"{SECRET}\"\n[tcp]\n\
             listen = \"127.0.0.1:0\"\n[daemon]\nhttp_listen = \"127.0.0.1:0\"\n\
             pool_size = \"16MiB\"\n"
        ),
    );
    d.until("ready", Duration::from_secs(20), |s| s["ready"] == true);
    let s = d.status().unwrap();
    let tcp = s["tcp_listen"][0].as_str().expect("tcp_listen").to_owned();
    assert_eq!(
        s["pool"]["socket"].as_str(),
        Some(dir.0.join("poolnode.pool.sock").to_str().unwrap())
    );

    // Another process takes the lease, fills it and exits.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_fills_a_lease",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, "weights")
        .env("POOL_TEST_SOCKET", &d.sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    nixl_testkit::child::assert_success(&out, "the child test");
    let line = text
        .split("LEASE ")
        .nth(1)
        .and_then(|t| t.lines().next())
        .expect(&text);
    let v: Vec<u64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
    let (job, addr, len) = (v[0], v[1], v[2]);
    assert!(job > 0 && len >= 3 << 20);

    // The lease outlived its client; a peer finds it among the daemon's regions and reads it.
    let (a, cfg) = peer("pool-peer");
    let got = read_from_daemon(&a, &cfg, &tcp, addr, len).unwrap();
    assert!(
        got[..3 << 20] == pattern(3 << 20)[..],
        "the bytes the client wrote"
    );

    // Refusals are clear: a second lease of the name, mapping a lease that does not exist.
    let pool = PoolClient::new(&d.sock);
    match pool.create("weights", 4096) {
        Err(PoolError::Control(e)) => assert!(e.to_string().contains("exists"), "{e}"),
        other => panic!("a taken name: {other:?}"),
    }
    match pool.map("nope") {
        Err(PoolError::Refused(m)) => assert!(m.contains("no lease named"), "{m}"),
        other => panic!("no such lease: {other:?}"),
    }
    // A client maps the same lease again and sees the bytes (shared, not a copy).
    let again = pool.map("weights").unwrap();
    assert_eq!((again.info().job, again.info().addr), (job, addr));
    // SAFETY: nothing writes the lease meanwhile (no peer has been told to, the client exited).
    assert!(unsafe { again.as_slice() }[..3 << 20] == pattern(3 << 20)[..]);
    drop(again);

    // Released: gone from the daemon's regions, peers' reads refused.
    pool.release("weights").unwrap();
    assert_eq!(pool.find("weights").unwrap(), None);
    let e = read_from_daemon(&a, &cfg, &tcp, addr, len).unwrap_err();
    assert!(e.contains("no region"), "{e}");
    // Its room is lent again.
    let l = pool.lease("next", len).unwrap();
    assert_eq!(l.info().addr, addr);
}

/// Run by the child process as another uid: asks the pool socket for a lease and prints the
/// answer.
#[test]
#[ignore = "child process of another_uid_is_refused_by_the_pool_socket_even_when_it_can_connect"]
fn child_maps_as_another_uid() {
    let sock = std::env::var("POOL_TEST_SOCKET").expect("run by the test named above");
    match PoolClient::new(sock).map("weights") {
        Err(PoolError::Refused(m)) => println!("REFUSED {m}"),
        Err(e) => println!("ERROR {e}"),
        Ok(l) => println!("MAPPED {} {}", l.info().addr, l.info().len),
    }
}

/// A daemon `node` with a 4 MiB pool in `dir`, and its lease "weights" (1 MiB) starting with
/// the bytes "mine", kept mapped by the caller.
fn pool_daemon(dir: &Scratch, node: &str) -> (Daemon, PoolClient, MappedLease) {
    let d = Daemon::start(
        Command::new(BIN),
        &dir.0,
        node,
        "backends = [\"local\"]\n[daemon]\nhttp_listen = \"127.0.0.1:0\"\npool_size = \"4MiB\"\n",
    );
    d.until("ready", Duration::from_secs(20), |s| s["ready"] == true);
    let pool = PoolClient::new(&d.sock);
    let mut l = pool.lease("weights", 1 << 20).unwrap();
    // SAFETY: a new lease nobody else knows of yet.
    let bytes = unsafe { l.as_mut_slice() };
    bytes[..4].copy_from_slice(b"mine");
    (d, pool, l)
}

/// The pool socket lends memory to the daemon's own uid only, by the caller's credentials
/// (SO_PEERCRED), not only by the socket file's mode: with the socket opened to everyone
/// (mode 0666), a process of another uid connects and is still refused, and the lease it asked
/// for stays the owner's.
#[test]
fn another_uid_is_refused_by_the_pool_socket_even_when_it_can_connect() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    nixl_testkit::require!(
        (!root).then_some("not root: cannot run a process under another uid"),
        "NIXL_REQUIRE_DAEMON_TESTS"
    );
    let dir = Scratch::new("pool-uid");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (d, pool, _lease) = pool_daemon(&dir, "uidnode");
    let pool_sock = dir.0.join("uidnode.pool.sock");
    std::fs::set_permissions(&pool_sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    // The test binary where uid 65534 can run it (the build directory may not be reachable).
    let exe_dir = Scratch::new("pool-uid-exe");
    std::fs::set_permissions(&exe_dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = exe_dir.0.join("pool_client");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(&exe)
        .args([
            "--ignored",
            "--exact",
            "child_maps_as_another_uid",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("POOL_TEST_SOCKET", &d.sock)
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    nixl_testkit::child::assert_success(&out, "the child test");
    assert!(
        text.contains("REFUSED uid 65534 may not map the pool"),
        "another uid was not refused by its credentials: {text}"
    );
    // The owner still maps it, unchanged.
    let again = pool.map("weights").unwrap();
    // SAFETY: nothing writes the lease meanwhile.
    let bytes = unsafe { again.as_slice() };
    assert_eq!(&bytes[..4], b"mine");
}

/// A local client that connects to the pool socket and says nothing delays no other: each
/// connection is served on its own, so the owner maps its lease while four silent connections
/// are still open (served one after another, it would wait for each one's 2 s timeout).
#[test]
fn silent_connections_to_the_pool_socket_delay_no_other_client() {
    use std::os::unix::net::UnixStream;
    use std::time::Instant;
    let dir = Scratch::new("pool-silent");
    let (_daemon, pool, _lease) = pool_daemon(&dir, "silentnode");
    let pool_sock = dir.0.join("silentnode.pool.sock");
    let silent: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&pool_sock).unwrap())
        .collect();
    let t = Instant::now();
    let again = pool.map("weights").unwrap();
    let waited = t.elapsed();
    // SAFETY: nothing writes the lease meanwhile.
    assert_eq!(unsafe { &again.as_slice()[..4] }, b"mine");
    assert!(
        waited < Duration::from_millis(1500),
        "the map waited {waited:?} behind four silent connections"
    );
    drop(silent);
}
