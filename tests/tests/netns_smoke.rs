//! The test lab itself: namespaces reach each other over IPv4 and IPv6, a cut link cuts and
//! comes back, the reference-tool runners give a figure (or say why not), and nothing is left
//! behind. Skips visibly where namespaces cannot be made (not root, no iproute2).
//!
//! `cargo test -p nixl-tests --release --test netns_smoke -- --ignored --nocapture` also runs
//! `reference_figures`, which prints the reference tools' figures on this machine.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixl_tests::netns::{skip_reason, Lab};
use nixl_tests::reference_tools::{self, Measured, UcxOpts};

const MIB: usize = 1 << 20;

/// Prints a line on stderr past the test harness's capture (which takes `eprintln!` only), so
/// a skip shows in a plain `cargo test`.
fn visible(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A TCP listener (`iperf3 -s`, which keeps serving after a bad client) inside host `i`,
/// killed on drop.
struct Listener(Child);

impl Listener {
    fn start(lab: &Lab, i: usize, port: u16) -> Listener {
        let child = lab
            .command(i, "iperf3")
            .args(["-s", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 -s");
        Listener(child)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Opens (and closes) a TCP connection from inside host `from` to `ip:port`, giving up after
/// `timeout`: `Ok` or the error bash printed (`timed out` when it took too long).
fn connect(lab: &Lab, from: usize, ip: IpAddr, port: u16, timeout: Duration) -> Result<(), String> {
    let out = lab
        .command(from, "timeout")
        .arg(format!("{}", timeout.as_secs_f64()))
        .args(["bash", "-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")])
        .stdin(Stdio::null())
        .output()
        .expect("run timeout bash");
    match out.status.code() {
        Some(0) => Ok(()),
        Some(124) => Err("timed out".into()),
        _ => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
    }
}

/// [`connect`], retried until it works or `within` passes (a listener just started).
fn connect_eventually(lab: &Lab, from: usize, ip: IpAddr, port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match connect(lab, from, ip, port, Duration::from_secs(1)) {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => {
                panic!("host {from} cannot reach {ip} port {port} within {within:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn netns_names() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pair_reaches_a_listener_over_v4_and_v6() {
    nixl_testkit::require!(skip_reason());
    nixl_testkit::require!(nixl_testkit::missing_program("iperf3"));
    let lab = Lab::pair();
    assert_ne!(lab.name(0), lab.name(1));
    assert_eq!(lab.ns(1).name(), lab.name(1));
    let _l = Listener::start(&lab, 1, 5201);
    let t = Duration::from_secs(5);
    connect_eventually(&lab, 0, lab.addr(1), 5201, t);
    connect_eventually(&lab, 0, lab.addr6(1), 5201, t);
    // Nothing listens on another port: refused at once, which also proves the route.
    let e = connect(&lab, 0, lab.addr(1), 5202, t).unwrap_err();
    assert!(e.contains("refused"), "{e}");
}

#[test]
fn triangle_hosts_reach_each_other() {
    nixl_testkit::require!(skip_reason());
    nixl_testkit::require!(nixl_testkit::missing_program("iperf3"));
    let lab = Lab::triangle();
    assert_eq!(lab.len(), 3);
    let listeners: Vec<Listener> = (0..3).map(|i| Listener::start(&lab, i, 5201)).collect();
    for from in 0..3 {
        for to in (0..3).filter(|&to| to != from) {
            connect_eventually(&lab, from, lab.addr(to), 5201, Duration::from_secs(5));
            connect_eventually(&lab, from, lab.addr6(to), 5201, Duration::from_secs(5));
        }
    }
    drop(listeners);
}

#[test]
fn link_down_cuts_and_link_up_restores() {
    nixl_testkit::require!(skip_reason());
    nixl_testkit::require!(nixl_testkit::missing_program("iperf3"));
    let lab = Lab::pair();
    let _l = Listener::start(&lab, 1, 5201);
    let t = Duration::from_secs(5);
    connect_eventually(&lab, 0, lab.addr(1), 5201, t);

    // Cut at a's own end: no route, so connects fail at once.
    lab.link_down(0);
    let e = connect(&lab, 0, lab.addr(1), 5201, t).unwrap_err();
    assert!(e.contains("unreachable"), "{e}");
    lab.link_up(0);
    connect_eventually(&lab, 0, lab.addr(1), 5201, t);
    // The IPv6 address survives the down/up too.
    connect_eventually(&lab, 0, lab.addr6(1), 5201, t);

    // Cut at b's end: a still has a route, its SYNs are lost, the connect times out.
    lab.link_down(1);
    let start = Instant::now();
    let e = connect(&lab, 0, lab.addr(1), 5201, Duration::from_millis(1500)).unwrap_err();
    assert!(
        e == "timed out" || e.contains("unreachable"),
        "{e} after {:?}",
        start.elapsed()
    );
    lab.link_up(1);
    connect_eventually(&lab, 0, lab.addr(1), 5201, t);
    connect_eventually(&lab, 0, lab.addr6(1), 5201, t);
}

#[test]
fn iperf3_runner_measures_between_namespaces() {
    nixl_testkit::require!(skip_reason());
    let lab = Lab::pair();
    match reference_tools::iperf3(&lab, 1, 0, MIB, 1.0, 1) {
        Measured::Gbps(g) => {
            eprintln!("iperf3 a -> b, 1 MiB writes, 1 stream: {g:.3} GB/s");
            assert!(g > 0.0);
        }
        Measured::Missing(why) if why.contains("not installed") => {
            nixl_testkit::skip(why, false, &[]);
            return;
        }
        Measured::Missing(why) => panic!("iperf3 installed but no figure: {why}"),
    }
    // A 2 Gbit/s token bucket on a's egress caps what b receives near 0.25 GB/s.
    match lab.set_rate(0, 2_000_000_000) {
        Ok(()) => {
            let g = reference_tools::iperf3(&lab, 1, 0, MIB, 1.0, 1);
            eprintln!("iperf3 a -> b at set_rate(2 Gbit/s): {g}");
            let g = g.gbps().expect("iperf3 figure under a rate limit");
            assert!(g < 0.4, "{g} GB/s through a 0.25 GB/s limit");
            lab.clear_qdisc(0).unwrap();
        }
        // A kernel without the token-bucket qdisc: a property of the host.
        Err(e) => nixl_testkit::skip(format!("rate limit: {e}"), true, &[]),
    }
    if let Err(e) = lab.netem(0, "delay 1ms") {
        visible(&format!("note: netem unavailable here: {e}"));
    }
}

#[test]
fn ucx_runner_gives_a_figure_or_a_reason() {
    nixl_testkit::require!(skip_reason());
    let lab = Lab::pair();
    let m = reference_tools::ucx_put_bw(&lab, 1, 0, MIB, 200);
    visible(&format!(
        "ucx_perftest ucp_put_bw a -> b, 1 MiB x 200, tcp: {m}"
    ));
    match m {
        Measured::Gbps(g) => assert!(g > 0.0),
        Measured::Missing(why) => assert!(!why.is_empty()),
    }
}

#[test]
fn runners_say_why_when_there_is_no_server() {
    nixl_testkit::require!(skip_reason());
    let lab = Lab::pair();
    // a's link is down: the server listens in b, but the client in a has no route to it.
    lab.link_down(0);
    let start = Instant::now();
    let m = reference_tools::iperf3(&lab, 1, 0, MIB, 1.0, 1);
    eprintln!("iperf3 to a cut host: {m}");
    assert!(matches!(m, Measured::Missing(_)), "{m}");
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn namespaces_and_their_processes_are_gone_after_drop() {
    nixl_testkit::require!(skip_reason());
    let (names, mut sleepers) = {
        let pair = Lab::pair();
        let star = Lab::star(3);
        let mut names = vec![pair.name(0).to_owned(), pair.name(1).to_owned()];
        names.extend((0..3).map(|i| star.name(i).to_owned()));
        let listed = netns_names();
        for n in &names {
            assert!(listed.contains(n.as_str()), "{n} not listed:\n{listed}");
        }
        let sleepers: Vec<Child> = [(&pair, 0), (&pair, 1), (&star, 2)]
            .iter()
            .map(|(lab, i)| {
                lab.command(*i, "sleep")
                    .arg("60")
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        (names, sleepers)
    };
    // No namespace of either lab (the star's hub included) is left.
    let labs: Vec<&str> = names.iter().map(|n| &n[..=n.rfind('-').unwrap()]).collect();
    let listed = netns_names();
    let kept: Vec<&str> = listed
        .lines()
        .filter(|l| labs.iter().any(|p| l.starts_with(p)))
        .collect();
    assert!(kept.is_empty(), "left behind: {kept:?}");
    for s in &mut sleepers {
        let status = s.wait().unwrap();
        assert!(!status.success(), "a process inside outlived its lab");
    }
}

/// The reference figures on this machine (run with `--ignored --nocapture`).
#[test]
#[ignore = "prints reference figures; takes a minute or two"]
fn reference_figures() {
    nixl_testkit::require!(skip_reason());
    let lab = Lab::pair();
    for streams in [1, 4] {
        let m = reference_tools::iperf3(&lab, 1, 0, MIB, 3.0, streams);
        eprintln!("iperf3 netns a -> b, 1 MiB writes, {streams} stream(s), 3 s: {m}");
    }
    for streams in [1, 4] {
        let m = reference_tools::iperf3_loopback(MIB, 3.0, streams);
        eprintln!("iperf3 loopback, 1 MiB writes, {streams} stream(s), 3 s: {m}");
    }
    let o1 = UcxOpts {
        args: &["-O", "1"],
        ..UcxOpts::default()
    };
    for (size, iters) in [(64 << 10, 20_000), (MIB, 2_000), (64 * MIB, 5)] {
        let m = reference_tools::ucx_put_bw(&lab, 1, 0, size, iters);
        eprintln!("ucx ucp_put_bw netns a -> b, {size} B x {iters}: {m}");
        let m = reference_tools::ucx_perftest(&lab, 1, 0, "ucp_put_bw", size, iters, o1);
        eprintln!("ucx ucp_put_bw -O 1 netns a -> b, {size} B x {iters}: {m}");
        let m = reference_tools::ucx_put_bw_loopback(size, iters);
        eprintln!("ucx ucp_put_bw loopback, {size} B x {iters}: {m}");
    }
}
