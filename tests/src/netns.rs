//! Throwaway network namespaces joined by veth: separate "hosts" on one machine, for tests of
//! what crosses a network. Needs root (CAP_NET_ADMIN) and iproute2; [`skip_reason`] says why
//! not otherwise, and tests skip visibly with it (or fail, under `NIXL_REQUIRE_ALL=1`):
//!
//! ```no_run
//! # fn t() {
//! nixl_testkit::require!(nixl_tests::netns::skip_reason());
//! let lab = nixl_tests::netns::Lab::pair();
//! let out = lab.command(0, "true").output().unwrap(); // runs inside namespace "a"
//! # }
//! ```
//!
//! Names are `nx<pid>-<n>-<host>` (`<n>` counts the labs of this process, `<host>` is `a`, `b`,
//! `c`, ... or `hub`), so parallel tests and parallel test processes never collide. The first
//! lab of a process deletes the `nx<pid>-...` namespaces whose process is gone (a run that
//! crashed or was killed before its `Drop`), and a name that exists anyway is deleted and made
//! again.
//!
//! Addresses: host `i` of a lab has `10.<k_hi>.<k_lo>.<i+1>/24` and `fd00:0:<k>::<i+1>/64`
//! (no duplicate-address detection, so they work at once), where `k` is a 16-bit number per
//! lab. Every lab is its own set of
//! namespaces, so equal subnets in two labs could not clash anyway; `k` only keeps them
//! apart in `tcpdump` and logs.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

/// Counts this process's labs (and the probe): the `<n>` of `nx<pid>-<n>-<host>`.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// How long a veth end may take to report carrier after it is set up.
const CARRIER_WAIT: Duration = Duration::from_secs(3);

/// Runs `ip ARGS`, returning its stdout, or the command and its stderr as the error.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The effective user id, read from `/proc/self/status` (no `unsafe` needed).
fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Why namespaces cannot be used here, if they cannot: not root, `ip` missing, or
/// `ip netns add` refused. Probed once per process (adds and deletes one namespace), so tests
/// may call it freely and concurrently.
pub fn skip_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            match euid() {
                Some(0) => {}
                Some(uid) => {
                    return Some(format!(
                        "not root (euid {uid}): network namespaces need CAP_NET_ADMIN"
                    ))
                }
                None => return Some("cannot read the euid from /proc/self/status".into()),
            }
            let probe = format!("{}-probe", prefix(NEXT.fetch_add(1, Ordering::Relaxed)));
            match NetNs::create(&probe) {
                Ok(ns) => {
                    drop(ns);
                    None
                }
                Err(e) => Some(e),
            }
        })
        .clone()
}

/// `nx<pid>-<n>`, the start of every name of lab `n` of this process.
fn prefix(n: u32) -> String {
    format!("nx{}-{n}", std::process::id())
}

/// Deletes `nx<pid>-<n>-<host>` namespaces left by processes that are gone. (One left by an
/// earlier process with this process's pid is deleted when its name comes up again.)
fn reap_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let mut parts = name.splitn(3, '-');
        let (Some(head), Some(n), Some(_host)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Some(pid) = head.strip_prefix("nx").and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if n.parse::<u32>().is_err() {
            continue;
        }
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            kill_inside(name);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// SIGKILLs every process inside namespace `name`.
fn kill_inside(name: &str) {
    let Ok(pids) = ip(&["netns", "pids", name]) else {
        return;
    };
    let pids: Vec<&str> = pids.split_whitespace().collect();
    if !pids.is_empty() {
        // The shell's `kill`: always there, where `/bin/kill` may not be.
        let _ = Command::new("sh")
            .args(["-c", "kill -9 \"$@\"", "sh"])
            .args(&pids)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One named network namespace with its loopback up. Dropping it kills what runs inside and
/// deletes it (errors are ignored: nothing panics in `Drop`).
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Makes namespace `name` (deleting one of that name first) and sets its loopback up.
    pub fn create(name: &str) -> Result<NetNs, String> {
        if ip(&["netns", "add", name]).is_err() {
            // Left over from an earlier run: delete and make it again.
            kill_inside(name);
            let _ = ip(&["netns", "del", name]);
            ip(&["netns", "add", name])?;
        }
        let ns = NetNs { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The name, for `ip netns exec` / `ip -n`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside this namespace (`ip netns exec NAME program`;
    /// `ip` execs the program, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `ip -n NAME ARGS`.
    fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Waits until `dev` reports carrier (`LOWER_UP`), which a veth end does a moment after
    /// both ends are up; until then the kernel and UCX treat it as down.
    fn wait_carrier(&self, dev: &str) -> Result<(), String> {
        let deadline = Instant::now() + CARRIER_WAIT;
        loop {
            let out = self.ip(&["-o", "link", "show", "dev", dev])?;
            if out.contains("LOWER_UP") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{dev} in {} has no carrier after {CARRIER_WAIT:?}: {}",
                    self.name,
                    out.trim()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        kill_inside(&self.name);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// One host of a lab: its namespace and its end of the link.
#[derive(Debug)]
struct Host {
    ns: NetNs,
    /// The interface name inside `ns` (`vx0`, `vx1`, ...).
    ifname: String,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

/// A set of namespaces ("hosts" `a`, `b`, `c`, ...) joined by veth. [`Lab::pair`]: two hosts
/// on one veth pair. [`Lab::star`] and [`Lab::triangle`]: every host has a veth to a Linux
/// bridge in a namespace of its own (`hub`), so all hosts share one /24 and reach each other
/// in one hop. Dropping it kills what runs inside and deletes the namespaces.
///
/// Host `i` has interface [`Lab::ifname`]`(i)`, which [`Lab::link_down`] cuts for everyone.
#[derive(Debug)]
pub struct Lab {
    hosts: Vec<Host>,
    /// The bridge's namespace (`None` for a pair). Dropped after the hosts.
    hub: Option<NetNs>,
}

impl Lab {
    /// Two namespaces `a` (0) and `b` (1) joined by one veth pair: `10.x.y.1/24` and
    /// `10.x.y.2/24`, `fd00:0:k::1/64` and `fd00:0:k::2/64`. Panics if they cannot be made
    /// (call [`skip_reason`] first).
    pub fn pair() -> Lab {
        Lab::try_pair().unwrap_or_else(|e| panic!("Lab::pair: {e}"))
    }

    /// [`Lab::pair`], or why it could not be made (what was made is deleted again).
    pub fn try_pair() -> Result<Lab, String> {
        Lab::build(2, false)
    }

    /// `n` namespaces (2..=26, named `a`, `b`, ...) on one bridge in a namespace of its own,
    /// addresses as in [`Lab::pair`] (`.1`, `.2`, `.3`, ...). Panics if they cannot be made.
    pub fn star(n: usize) -> Lab {
        Lab::try_star(n).unwrap_or_else(|e| panic!("Lab::star({n}): {e}"))
    }

    /// [`Lab::star`], or why it could not be made.
    pub fn try_star(n: usize) -> Result<Lab, String> {
        if !(2..=26).contains(&n) {
            return Err(format!("a star has 2..=26 hosts, not {n}"));
        }
        Lab::build(n, true)
    }

    /// Three namespaces `a`, `b`, `c` on one bridge: [`Lab::star`]`(3)`.
    pub fn triangle() -> Lab {
        Lab::star(3)
    }

    fn build(n: usize, bridged: bool) -> Result<Lab, String> {
        static REAP: Once = Once::new();
        REAP.call_once(reap_stale);

        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = prefix(id);
        // The per-lab 16-bit subnet number (see the module docs: uniqueness is cosmetic).
        let k = (std::process::id().wrapping_mul(1000).wrapping_add(id) & 0xffff) as u16;
        let [k_hi, k_lo] = k.to_be_bytes();
        let mut hosts = Vec::with_capacity(n);
        for i in 0..n {
            let host = (b'a' + i as u8) as char;
            hosts.push(Host {
                ns: NetNs::create(&format!("{tag}-{host}"))?,
                ifname: format!("vx{i}"),
                v4: Ipv4Addr::new(10, k_hi, k_lo, i as u8 + 1),
                v6: Ipv6Addr::new(0xfd00, 0, k, 0, 0, 0, 0, i as u16 + 1),
            });
        }
        let hub = if bridged {
            let hub = NetNs::create(&format!("{tag}-hub"))?;
            hub.ip(&["link", "add", "br0", "type", "bridge"])?;
            // No STP (ports forward at once) and no multicast snooping (IPv6 neighbour
            // discovery is flooded, never filtered while the bridge learns).
            hub.ip(&[
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "mcast_snooping",
                "0",
            ])?;
            hub.ip(&["link", "set", "br0", "up"])?;
            for (i, h) in hosts.iter().enumerate() {
                let port = format!("vb{i}");
                h.ns.ip(&[
                    "link", "add", &h.ifname, "type", "veth", "peer", "name", &port, "netns",
                    &hub.name,
                ])?;
                hub.ip(&["link", "set", &port, "master", "br0"])?;
                hub.ip(&["link", "set", &port, "up"])?;
            }
            Some(hub)
        } else {
            let (a, b) = (&hosts[0], &hosts[1]);
            a.ns.ip(&[
                "link", "add", &a.ifname, "type", "veth", "peer", "name", &b.ifname, "netns",
                &b.ns.name,
            ])?;
            None
        };
        for h in &hosts {
            // Admin-down flushes an interface's IPv6 addresses unless told otherwise, and
            // `link_up` would bring back IPv4 only (link_up also re-adds the address, for
            // kernels without this knob).
            let _ =
                h.ns.command("sh")
                    .args([
                        "-c",
                        &format!(
                            "echo 1 > /proc/sys/net/ipv6/conf/{}/keep_addr_on_down",
                            h.ifname
                        ),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            h.ns.ip(&["addr", "add", &format!("{}/24", h.v4), "dev", &h.ifname])?;
            h.ns.ip(&[
                "addr",
                "add",
                &format!("{}/64", h.v6),
                "dev",
                &h.ifname,
                "nodad",
            ])?;
            h.ns.ip(&["link", "set", &h.ifname, "up"])?;
        }
        for h in &hosts {
            h.ns.wait_carrier(&h.ifname)?;
        }
        Ok(Lab { hosts, hub })
    }

    /// How many hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Never: a lab has at least two hosts.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> &NetNs {
        &self.hosts[i].ns
    }

    /// The namespace of the bridge of a [`Lab::star`] (interface `br0`, ports `vb0`, `vb1`,
    /// ...: where `tcpdump -i br0` sees all traffic); `None` for a pair.
    pub fn hub(&self) -> Option<&NetNs> {
        self.hub.as_ref()
    }

    /// Host `i`'s namespace name (for `ip netns exec`); `ns(i).name()`.
    pub fn name(&self, i: usize) -> &str {
        &self.hosts[i].ns.name
    }

    /// The name of host `i`'s interface inside its namespace (for `UCX_NET_DEVICES`, `tc`).
    pub fn ifname(&self, i: usize) -> &str {
        &self.hosts[i].ifname
    }

    /// Host `i`'s IPv4 address.
    pub fn addr(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.hosts[i].v4)
    }

    /// Host `i`'s IPv6 address.
    pub fn addr6(&self, i: usize) -> IpAddr {
        IpAddr::V6(self.hosts[i].v6)
    }

    /// A command that runs `program` inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<OsStr>) -> Command {
        self.hosts[i].ns.command(program)
    }

    /// Sets host `i`'s interface down: a cut cable, as its peers see it (connects from `i`
    /// fail at once with "network unreachable"; packets to `i` are lost, so peers time out).
    /// Panics if `ip` fails.
    pub fn link_down(&self, i: usize) {
        let h = &self.hosts[i];
        h.ns.ip(&["link", "set", &h.ifname, "down"])
            .unwrap_or_else(|e| panic!("link_down({i}): {e}"));
    }

    /// Sets host `i`'s interface up again and waits for carrier. The IPv4 and IPv6 addresses
    /// and their routes come back with it. Panics if `ip` fails.
    pub fn link_up(&self, i: usize) {
        let h = &self.hosts[i];
        let v6 = format!("{}/64", h.v6);
        h.ns.ip(&["link", "set", &h.ifname, "up"])
            .and_then(|_| {
                h.ns.ip(&["addr", "replace", &v6, "dev", &h.ifname, "nodad"])
            })
            .and_then(|_| h.ns.wait_carrier(&h.ifname))
            .unwrap_or_else(|e| panic!("link_up({i}): {e}"));
    }

    /// Runs `tc ARGS` inside host `i`'s namespace.
    fn tc(&self, i: usize, args: &[&str]) -> Result<(), String> {
        let out = self
            .command(i, "tc")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run `tc`: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`tc {}` in {} failed: {}",
                args.join(" "),
                self.name(i),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Limits what host `i` sends to `bits_per_second` (a token bucket, `tc qdisc ... tbf`, on
    /// its interface's egress; what it receives is not limited).
    pub fn set_rate(&self, i: usize, bits_per_second: u64) -> Result<(), String> {
        let rate = format!("{bits_per_second}bit");
        // A burst of ~1 ms at the rate (at least 64 KiB, so one GSO segment always fits).
        let burst = (bits_per_second / 8 / 1000).max(64 << 10).to_string();
        self.tc(
            i,
            &[
                "qdisc",
                "replace",
                "dev",
                self.ifname(i),
                "root",
                "tbf",
                "rate",
                &rate,
                "burst",
                &burst,
                "latency",
                "50ms",
            ],
        )
    }

    /// Applies `tc qdisc replace dev IF root netem ARGS` on host `i`'s interface, e.g.
    /// `"delay 1ms loss 0.1%"`. Fails where the kernel has no `sch_netem` (as on some CI
    /// kernels): callers should skip what needs it.
    pub fn netem(&self, i: usize, args: &str) -> Result<(), String> {
        let mut all = vec!["qdisc", "replace", "dev", self.ifname(i), "root", "netem"];
        all.extend(args.split_whitespace());
        self.tc(i, &all)
    }

    /// Removes what [`Lab::set_rate`] or [`Lab::netem`] set on host `i`'s interface.
    pub fn clear_qdisc(&self, i: usize) -> Result<(), String> {
        self.tc(i, &["qdisc", "del", "dev", self.ifname(i), "root"])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Kill everything first, so no process outlives its peers' namespaces; the fields'
        // own `Drop`s then delete the namespaces (hosts, then the hub).
        for h in &self.hosts {
            kill_inside(&h.ns.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euid_is_read() {
        assert!(euid().is_some());
    }

    #[test]
    fn prefix_has_pid_and_counter() {
        assert_eq!(prefix(7), format!("nx{}-7", std::process::id()));
    }
}
