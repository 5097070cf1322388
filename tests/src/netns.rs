//! Throwaway network namespaces joined by veth: separate "hosts" on one machine, for tests of
//! what crosses a network. Needs root (CAP_NET_ADMIN) and iproute2; [`skip_reason`] says why
//! not otherwise, and tests print it as a visible skip.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why namespaces cannot be used here, if they cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need CAP_NET_ADMIN".into());
    }
    let probe = format!("nxprobe{}", std::process::id());
    match ip(&["netns", "add", &probe]) {
        Ok(()) => {
            let _ = ip(&["netns", "del", &probe]);
            None
        }
        Err(e) => Some(e),
    }
}

/// A set of namespaces joined by veth ([`Lab::pair`]) or by a bridge ([`Lab::star`]). Dropping
/// it kills what runs inside and deletes the namespaces.
#[derive(Debug)]
pub struct Lab {
    names: Vec<String>,
    /// (interface name, v4, v6) of each namespace's link.
    links: Vec<(String, IpAddr, IpAddr)>,
    bridge: Option<String>,
}

impl Lab {
    /// Two namespaces joined by one veth pair: `10.N.M.1/24` and `.2/24`, `fd00:N:M::1/64` and
    /// `::2/64`.
    pub fn pair() -> Lab {
        Lab::build(2, false)
    }

    /// `n` namespaces (2..=8) on one bridge in a namespace of its own, addresses as in
    /// [`Lab::pair`] (`.1`, `.2`, `.3`, ...).
    pub fn star(n: usize) -> Lab {
        assert!((2..=8).contains(&n));
        Lab::build(n, true)
    }

    fn build(n: usize, bridged: bool) -> Lab {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("nx{}{}", pid % 100_000, id);
        // A subnet per lab: 10.(pid)(id) so concurrent labs of concurrent processes differ.
        let (s1, s2) = (
            ((pid >> 8) & 0x7f) as u8 + 100,
            ((pid & 0xff) as u8) ^ (id as u8 * 37),
        );
        let mut lab = Lab {
            names: (0..n).map(|i| format!("{tag}-{i}")).collect(),
            links: Vec::new(),
            bridge: None,
        };
        for name in &lab.names {
            let _ = ip(&["netns", "del", name]);
            ip(&["netns", "add", name]).expect("ip netns add");
            ip(&["-n", name, "link", "set", "lo", "up"]).expect("lo up");
        }
        if bridged {
            let br = format!("{tag}-br");
            let _ = ip(&["netns", "del", &br]);
            ip(&["netns", "add", &br]).expect("ip netns add bridge");
            ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]).expect("bridge");
            ip(&["-n", &br, "link", "set", "br0", "up"]).expect("bridge up");
            lab.bridge = Some(br);
        }
        for i in 0..n {
            let v4 = IpAddr::V4(Ipv4Addr::new(10, s1, s2, i as u8 + 1));
            let v6 = IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                u16::from(s1),
                u16::from(s2),
                0,
                0,
                0,
                0,
                i as u16 + 1,
            ));
            let ifname = format!("vx{i}");
            lab.links.push((ifname.clone(), v4, v6));
        }
        if let Some(br) = lab.bridge.clone() {
            for i in 0..n {
                let (ifname, _, _) = &lab.links[i];
                let other = format!("vb{i}");
                ip(&[
                    "-n",
                    &lab.names[i],
                    "link",
                    "add",
                    ifname,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &other,
                    "netns",
                    &br,
                ])
                .expect("veth");
                ip(&["-n", &br, "link", "set", &other, "master", "br0"]).expect("enslave");
                ip(&["-n", &br, "link", "set", &other, "up"]).expect("bridge port up");
            }
        } else {
            ip(&[
                "-n",
                &lab.names[0],
                "link",
                "add",
                "vx0",
                "type",
                "veth",
                "peer",
                "name",
                "vx1",
                "netns",
                &lab.names[1],
            ])
            .expect("veth");
        }
        for i in 0..n {
            let (ifname, v4, v6) = lab.links[i].clone();
            let name = &lab.names[i];
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                &ifname,
            ])
            .expect("v4 addr");
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                &ifname,
                "nodad",
            ])
            .expect("v6 addr");
            ip(&["-n", name, "link", "set", &ifname, "up"]).expect("link up");
        }
        lab
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Namespace `i`'s IPv4 address.
    pub fn addr(&self, i: usize) -> IpAddr {
        self.links[i].1
    }

    /// Namespace `i`'s IPv6 address.
    pub fn addr6(&self, i: usize) -> IpAddr {
        self.links[i].2
    }

    /// A command that runs `program` inside namespace `i`.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[i], program]);
        c
    }

    /// Takes namespace `i`'s link down: a cut cable, as its peers see it.
    pub fn link_down(&self, i: usize) {
        ip(&[
            "-n",
            &self.names[i],
            "link",
            "set",
            &self.links[i].0,
            "down",
        ])
        .expect("link down");
    }

    /// Brings namespace `i`'s link back up.
    pub fn link_up(&self, i: usize) {
        ip(&["-n", &self.names[i], "link", "set", &self.links[i].0, "up"]).expect("link up");
    }

    fn kill_inside(name: &str) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill has no memory preconditions; the pid is inside our namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in self.names.iter().chain(self.bridge.iter()) {
            Lab::kill_inside(name);
            let _ = ip(&["netns", "del", name]);
        }
    }
}
