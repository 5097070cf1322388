//! The `tcp` backend between hosts: agents in separate network namespaces joined by veth,
//! each a `nixl-test-peer` process. Every byte is checked; faults (a killed peer, a cut link)
//! must end requests in bounded time. Skips visibly where namespaces cannot be made.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use nixl_testkit::ScratchDir;
use nixl_tests::netns::{skip_reason, Lab};
use nixl_tests::{hex, Peer};

const EXE: &str = env!("CARGO_BIN_EXE_nixl-test-peer");
const MIB: usize = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn sock(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// Writes a config file for one agent: tcp only, listening on `listen`.
fn config(dir: &ScratchDir, name: &str, listen: &str, extra: &str) -> String {
    let path = dir.0.join(name).to_string_lossy().into_owned();
    std::fs::write(
        &path,
        format!(
            "backends = [\"tcp\"]\n{extra}\n[tcp]\nlisten = \"{listen}\"\nio_timeout_ms = 1500\n"
        ),
    )
    .unwrap();
    path
}

/// `a` fills its buffer with pattern `seed` and WRITEs it to peer `name` (`b`), which checks it.
fn write_checked(a: &mut Peer, b: &mut Peer, name: &str, seed: u32) {
    assert_eq!(a.cmd_within(&format!("fill {seed}"), T), "ok");
    let r = a.cmd_within(&format!("xfer {name} write 1 -"), T);
    assert!(r.starts_with("ok "), "{r}");
    assert_eq!(b.cmd_within(&format!("check {seed}"), T), "ok");
}

fn peer(lab: &Lab, ns: usize, name: &str, size: usize, cfg: &str) -> Peer {
    let mut cmd = lab.command(ns, EXE);
    cmd.args(["--config", cfg]);
    Peer::spawn(cmd, name, size)
}

const SECRET: &str = "[auth]\nsecret = \"fleet-secret\"";

/// Two hosts and the configs of their agents (with [`SECRET`]) in a scratch directory: (the
/// lab, the directory, B's address, A's config listening on any port of host 0, B's listening
/// on B's address, port 17000 of host 1).
fn two_hosts(tag: &str) -> (Lab, ScratchDir, String, String, String) {
    let lab = Lab::pair();
    let dir = ScratchDir::new(tag);
    let b_addr = sock(lab.addr(1), 17000);
    let ca = config(&dir, "a.toml", &sock(lab.addr(0), 0), SECRET);
    let cb = config(&dir, "b.toml", &b_addr, SECRET);
    (lab, dir, b_addr, ca, cb)
}

#[test]
fn bytes_cross_namespaces_both_ways_over_v4_and_v6_with_notifications() {
    nixl_testkit::require!(skip_reason());
    let (lab, dir, b_addr, ca, cb) = two_hosts("tcp-bytes");
    // B loads the metadata A pushes (off by default); [tcp] is the file's last table.
    let mut f = std::fs::OpenOptions::new().append(true).open(&cb).unwrap();
    std::io::Write::write_all(&mut f, b"accept_pushes = true\n").unwrap();
    drop(f);
    let mut a = peer(&lab, 0, "A", 48 * MIB + 12345, &ca);
    let mut b = peer(&lab, 1, "B", 48 * MIB + 12345, &cb);

    // Direct metadata exchange: A fetches B's from its listener, B gets A's pushed.
    assert_eq!(a.cmd_within(&format!("fetch {b_addr}"), T), "ok B");
    assert_eq!(a.cmd_within(&format!("push {b_addr}"), T), "ok A");

    assert_eq!(a.cmd_within("fill 11", T), "ok");
    let r = a.cmd_within(&format!("xfer B write 2 {}", hex(b"landed")), T);
    assert!(r.starts_with("ok "), "{r}");
    assert_eq!(
        b.cmd_within("notif-check 5000 11", T),
        format!("ok {}", hex(b"landed"))
    );
    assert_eq!(b.cmd_within("fill 12", T), "ok");
    let r = a.cmd_within("xfer B read 1 -", T);
    assert!(r.starts_with("ok "), "{r}");
    assert_eq!(a.cmd_within("check 12", T), "ok");
    // B notifies A on its own.
    assert_eq!(b.cmd_within(&format!("send A {}", hex(b"hi")), T), "ok");
    assert_eq!(
        a.cmd_within("notif 5000", T),
        format!("notif B {}", hex(b"hi"))
    );

    // IPv6: a third agent listening on B's v6 address.
    let c6 = sock(lab.addr6(1), 17001);
    let cc = config(&dir, "c.toml", &c6, SECRET);
    let mut c = peer(&lab, 1, "C", 4 * MIB, &cc);
    assert_eq!(a.cmd_within(&format!("fetch {c6}"), T), "ok C");
    write_checked(&mut a, &mut c, "C", 13);
}

#[test]
fn wrong_or_missing_secret_and_foreign_hosts_without_secret_are_refused() {
    nixl_testkit::require!(skip_reason());
    let lab = Lab::pair();
    let dir = ScratchDir::new("tcp-auth");
    let b_addr = sock(lab.addr(1), 17000);
    let open_addr = sock(lab.addr(1), 17001);
    let cb = config(&dir, "b.toml", &b_addr, SECRET);
    let copen = config(&dir, "open.toml", &open_addr, "");
    let _b = peer(&lab, 1, "B", MIB, &cb);
    let _o = peer(&lab, 1, "O", MIB, &copen);
    let wrong = config(
        &dir,
        "w.toml",
        &sock(lab.addr(0), 0),
        "[auth]\nsecret = \"guess\"",
    );
    let none = config(&dir, "n.toml", &sock(lab.addr(0), 0), "");
    let mut w = peer(&lab, 0, "W", MIB, &wrong);
    let mut n = peer(&lab, 0, "N", MIB, &none);
    let r = w.cmd_within(&format!("fetch {b_addr}"), T);
    assert!(
        r.starts_with("err denied") && r.contains("wrong shared secret"),
        "{r}"
    );
    let r = n.cmd_within(&format!("fetch {b_addr}"), T);
    assert!(
        r.starts_with("err denied") && r.contains("requires the shared secret"),
        "{r}"
    );
    // No secret on the listener: a connection from another host is refused.
    let r = n.cmd_within(&format!("fetch {open_addr}"), T);
    assert!(
        r.starts_with("err denied") && r.contains("only connections from this host"),
        "{r}"
    );
}

#[test]
fn killed_peer_fails_requests_fast_others_keep_working_and_a_restart_reconnects() {
    nixl_testkit::require!(skip_reason());
    let (lab, _dir, b_addr, ca, cb) = two_hosts("tcp-kill");
    let size = 64 * MIB;
    let mut a = peer(&lab, 0, "A", size, &ca);
    let mut c = peer(&lab, 0, "C", size, &ca);
    let mut b = peer(&lab, 1, "B", size, &cb);
    assert_eq!(a.cmd_within(&format!("fetch {b_addr}"), T), "ok B");
    assert_eq!(c.cmd_within(&format!("fetch {b_addr}"), T), "ok B");

    // The initiator dies mid-transfer: the target keeps serving its other peer.
    c.send("xfer B write 1000 -");
    std::thread::sleep(Duration::from_millis(300));
    c.kill();
    let r = a.cmd_within("xfer B write 3 -", T);
    assert!(r.starts_with("ok "), "{r}");

    // The target dies mid-transfer: the request ends as a remote disconnect, quickly.
    a.send("xfer B write 1000 -");
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    b.kill();
    let r = a
        .reply_within(Duration::from_secs(10))
        .expect("no answer within 10 s of the kill");
    let after = killed.elapsed();
    assert!(r.starts_with("err remote_disconnect"), "{r}");
    assert!(after < Duration::from_secs(3), "took {after:?}");

    // It comes back (a new instance, same name and address): the old metadata is refused,
    // the new one works.
    let mut b = peer(&lab, 1, "B", size, &cb);
    let r = a.cmd_within("xfer B write 1 -", T);
    assert!(
        r.starts_with("err remote_disconnect") && r.contains("restarted"),
        "{r}"
    );
    assert_eq!(a.cmd_within(&format!("fetch {b_addr}"), T), "ok B");
    write_checked(&mut a, &mut b, "B", 21);
}

#[test]
fn cut_link_times_out_in_bounded_time_and_recovers() {
    nixl_testkit::require!(skip_reason());
    let (lab, _dir, b_addr, ca, cb) = two_hosts("tcp-cut");
    let size = 64 * MIB;
    let mut a = peer(&lab, 0, "A", size, &ca);
    let mut b = peer(&lab, 1, "B", size, &cb);
    assert_eq!(a.cmd_within(&format!("fetch {b_addr}"), T), "ok B");
    // Cut at the target's end during a WRITE, at the initiator's end during a READ.
    for (op, side) in [("write", 1), ("read", 0)] {
        a.send(&format!("xfer B {op} 1000 -"));
        std::thread::sleep(Duration::from_millis(300));
        let cut = Instant::now();
        lab.link_down(side);
        let r = a
            .reply_within(Duration::from_secs(15))
            .expect("no answer within 15 s of the cut");
        let after = cut.elapsed();
        assert!(r.starts_with("err timed_out"), "{op}: {r}");
        // io_timeout is 1.5 s; allow for the tick and a loaded machine.
        assert!(after < Duration::from_secs(5), "{op}: took {after:?}");
        lab.link_up(side);
        // The same peer instance: the next request reconnects and works.
        write_checked(&mut a, &mut b, "B", 31);
    }
}

#[test]
fn three_hosts_on_a_bridge_each_initiator_reaches_both_others() {
    nixl_testkit::require!(skip_reason());
    let lab = Lab::star(3);
    let dir = ScratchDir::new("tcp-star");
    let names = ["A", "B", "C"];
    let mut peers: Vec<Peer> = (0..3)
        .map(|i| {
            let c = config(
                &dir,
                &format!("{i}.toml"),
                &sock(lab.addr(i), 17000),
                SECRET,
            );
            peer(&lab, i, names[i], 8 * MIB, &c)
        })
        .collect();
    for (i, p) in peers.iter_mut().enumerate() {
        for (j, name) in names.iter().enumerate().filter(|&(j, _)| j != i) {
            let r = p.cmd_within(&format!("fetch {}", sock(lab.addr(j), 17000)), T);
            assert_eq!(r, format!("ok {name}"));
        }
    }
    // Each agent writes a fresh pattern into the next one, which checks it; then reads it back
    // from there into a buffer it has just cleared with another pattern.
    for i in 0..3 {
        let n = (i + 1) % 3;
        assert_eq!(peers[i].cmd_within(&format!("fill {}", 40 + i), T), "ok");
        let r = peers[i].cmd_within(&format!("xfer {} write 1 -", names[n]), T);
        assert!(r.starts_with("ok "), "{r}");
        assert_eq!(peers[n].cmd_within(&format!("check {}", 40 + i), T), "ok");
        assert_eq!(peers[i].cmd_within("fill 99", T), "ok");
        let r = peers[i].cmd_within(&format!("xfer {} read 1 -", names[n]), T);
        assert!(r.starts_with("ok "), "{r}");
        assert_eq!(peers[i].cmd_within(&format!("check {}", 40 + i), T), "ok");
    }
}
