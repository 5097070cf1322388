//! The reference tools, measured in the same run as nixl-rs so a comparison never mixes
//! machines or days: `iperf3` (plain TCP streams) and `ucx_perftest` (UCX's one-sided
//! `ucp_put_bw` over its `tcp` transport), between two hosts of a [`Lab`] or on loopback.
//!
//! Every runner returns [`Measured::Missing`] with the reason (tool not installed, failed,
//! timed out, output not understood) rather than a made-up figure, and none hangs: the client
//! is killed at its deadline and the server right after the client ends.
//!
//! Units: [`Measured::Gbps`] is 10^9 **bytes** per second (GB/s). iperf3 reports
//! bits per second (`end.sum_received.bits_per_second`, divided by 8·10^9 here). ucx_perftest
//! prints "MB/s" that are MiB/s: its `print_progress` divides bytes per second by
//! 1024·1024 (checked against its own per-iteration time: 1 MiB at 1861 µs/iteration
//! prints 537.34 "MB/s" = 1048576 / 1861e-6 / 2^20), so the figure is multiplied by
//! 1048576 / 10^9 here.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::Lab;

/// How long a server may take to listen.
const LISTEN_WAIT: Duration = Duration::from_secs(10);
/// How long a server may take to exit after its client ended.
const SERVER_EXIT_WAIT: Duration = Duration::from_secs(5);
/// The base deadline of one ucx_perftest client run (more is added per byte to move).
const UCX_DEADLINE: Duration = Duration::from_secs(60);

/// A bandwidth a reference tool measured, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum Measured {
    /// Gigabytes (10^9 bytes, not bits) per second.
    Gbps(f64),
    /// Why no figure: the tool is not installed, failed, timed out, or printed something
    /// that could not be parsed.
    Missing(String),
}

impl Measured {
    /// The figure in GB/s (10^9 bytes per second), if there is one.
    pub fn gbps(&self) -> Option<f64> {
        match self {
            Measured::Gbps(g) => Some(*g),
            Measured::Missing(_) => None,
        }
    }
}

impl std::fmt::Display for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Measured::Gbps(g) => write!(f, "{g:.3} GB/s"),
            Measured::Missing(why) => write!(f, "missing ({why})"),
        }
    }
}

/// Where a tool's server and client run.
#[derive(Debug, Clone, Copy)]
enum Site<'a> {
    /// Server in host `server` of the lab, client in host `client`.
    Lab {
        lab: &'a Lab,
        server: usize,
        client: usize,
    },
    /// Both in this process's namespace, over 127.0.0.1.
    Loopback,
}

impl Site<'_> {
    fn server_cmd(&self, program: &Path) -> Command {
        match *self {
            Site::Lab { lab, server, .. } => lab.command(server, program),
            Site::Loopback => Command::new(program),
        }
    }

    fn client_cmd(&self, program: &Path) -> Command {
        match *self {
            Site::Lab { lab, client, .. } => lab.command(client, program),
            Site::Loopback => Command::new(program),
        }
    }

    /// The server's address as the client dials it.
    fn server_addr(&self) -> String {
        match *self {
            Site::Lab { lab, server, .. } => lab.addr(server).to_string(),
            Site::Loopback => "127.0.0.1".into(),
        }
    }

    /// A port for the server: fresh per call in a lab (whose namespaces hold nothing else), a
    /// currently free one on loopback.
    fn port(&self) -> Result<u16, String> {
        static NEXT: AtomicU16 = AtomicU16::new(0);
        match self {
            Site::Lab { .. } => Ok(20_000 + NEXT.fetch_add(1, Ordering::Relaxed) % 20_000),
            Site::Loopback => std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| format!("no free port: {e}")),
        }
    }
}

/// The full path of `name` on `PATH` (so that a missing tool is told apart from a failing
/// one even behind `ip netns exec`).
fn tool(name: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .ok_or_else(|| format!("{name} is not installed (not on PATH)"))
}

/// A child process with its output collected by two threads; killed (and reaped) on drop.
#[derive(Debug)]
struct Running {
    what: String,
    child: Child,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
}

/// What a finished process printed.
#[derive(Debug)]
struct Done {
    status: ExitStatus,
    out: String,
    err: String,
}

impl Done {
    /// The status and the last lines of the output, for a `Missing` reason.
    fn describe(&self) -> String {
        let text = format!("{}\n{}", self.out, self.err);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(4)..].join(" | ");
        format!("{}: {}", self.status, tail)
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<String>> {
    let mut pipe = pipe?;
    Some(std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }))
}

impl Running {
    fn spawn(what: &str, mut cmd: Command) -> Result<Running, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        Ok(Running {
            what: what.into(),
            child,
            out,
            err,
        })
    }

    /// Waits until the process exits or `timeout` passes (then kills it: an error).
    fn finish(mut self, timeout: Duration) -> Result<Done, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    let join = |h: Option<JoinHandle<String>>| {
                        h.and_then(|h| h.join().ok()).unwrap_or_default()
                    };
                    return Ok(Done {
                        status,
                        out: join(self.out.take()),
                        err: join(self.err.take()),
                    });
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    return Err(format!("{} timed out after {timeout:?}", self.what));
                }
                Err(e) => return Err(format!("waiting for {}: {e}", self.what)),
            }
        }
    }

    /// Waits until the process listens on TCP `port` in its own network namespace (read from
    /// `/proc/PID/net/tcp{,6}`: `ip netns exec` execs the tool, so PID is the tool's).
    fn wait_listen(mut self, port: u16) -> Result<Running, String> {
        let deadline = Instant::now() + LISTEN_WAIT;
        let local = format!(":{port:04X}");
        let pid = self.child.id();
        loop {
            for table in ["tcp", "tcp6"] {
                let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
                    continue;
                };
                // Columns: sl local_address rem_address st ...; st 0A is LISTEN.
                let listening = text.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
                });
                if listening {
                    return Ok(self);
                }
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                let what = self.what.clone();
                return Err(match self.finish(LISTEN_WAIT) {
                    Ok(d) => format!("{what} exited before listening: {}", d.describe()),
                    Err(e) => e,
                });
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not listen on port {port} within {LISTEN_WAIT:?}",
                    self.what
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Kill if still running, always reap; errors (already exited) do not matter.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one server/client pair: starts the server, waits until it listens on `port`, runs
/// the client to completion (or `deadline`), then gives the server [`SERVER_EXIT_WAIT`] to
/// exit before killing it. Returns what the client printed.
fn server_client(
    server: (&str, Command),
    port: u16,
    client: (&str, Command),
    deadline: Duration,
) -> Result<Done, String> {
    let srv = Running::spawn(server.0, server.1)?.wait_listen(port)?;
    let done = Running::spawn(client.0, client.1)?.finish(deadline);
    // Ignored: a server that does not exit by itself is killed by `Running::drop`, and a
    // client failure says more than the server's.
    let _ = srv.finish(SERVER_EXIT_WAIT);
    done
}

/// iperf3 between two hosts of `lab`: `iperf3 -s -1 -p PORT` in host `server`, then
/// `iperf3 -c ADDR -p PORT -J -t SECONDS -l BYTES -P STREAMS` in host `client` (the client
/// sends). Returns what the server received per second (`end.sum_received`, all streams).
/// `seconds` is rounded up to whole seconds (iperf3 takes an integer; 0 would mean forever).
pub fn iperf3(
    lab: &Lab,
    server: usize,
    client: usize,
    bytes_per_write: usize,
    seconds: f64,
    streams: usize,
) -> Measured {
    let site = Site::Lab {
        lab,
        server,
        client,
    };
    run_iperf3(site, bytes_per_write, seconds, streams).unwrap_or_else(Measured::Missing)
}

/// [`iperf3`] with server and client in this process's namespace, over 127.0.0.1.
pub fn iperf3_loopback(bytes_per_write: usize, seconds: f64, streams: usize) -> Measured {
    run_iperf3(Site::Loopback, bytes_per_write, seconds, streams).unwrap_or_else(Measured::Missing)
}

fn run_iperf3(
    site: Site<'_>,
    bytes_per_write: usize,
    seconds: f64,
    streams: usize,
) -> Result<Measured, String> {
    let exe = tool("iperf3")?;
    let port = site.port()?;
    let secs = if seconds.is_finite() {
        seconds.ceil().max(1.0) as u64
    } else {
        1
    };
    let mut srv = site.server_cmd(&exe);
    srv.args(["-s", "-1", "-p", &port.to_string()]);
    let mut cli = site.client_cmd(&exe);
    cli.args(["-c", &site.server_addr(), "-p", &port.to_string(), "-J"])
        .args(["-t", &secs.to_string()])
        .args(["-l", &bytes_per_write.to_string()])
        .args(["-P", &streams.max(1).to_string()])
        .args(["--connect-timeout", "5000"]);
    let done = server_client(
        ("iperf3 server", srv),
        port,
        ("iperf3 client", cli),
        Duration::from_secs(secs + 30),
    )?;
    parse_iperf3(&done.out).map_err(|e| match e {
        Iperf3Error::Reported(e) => format!("iperf3: {e}"),
        Iperf3Error::Output(e) => format!("iperf3 client {}: {e}", done.describe()),
    })
}

/// Why iperf3's output gave no figure.
#[derive(Debug)]
enum Iperf3Error {
    /// The JSON's own `error` (cannot connect, ...).
    Reported(String),
    /// The output is not what `-J` prints.
    Output(String),
}

/// GB/s from iperf3's `-J` output: `end.sum_received.bits_per_second` / 8·10^9.
fn parse_iperf3(json: &str) -> Result<Measured, Iperf3Error> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| Iperf3Error::Output(format!("output is not JSON: {e}")))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(Iperf3Error::Reported(err.into()));
    }
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(|b| b.as_f64())
        .ok_or_else(|| Iperf3Error::Output("no end.sum_received.bits_per_second".into()))?;
    if bps > 0.0 {
        Ok(Measured::Gbps(bps / 8e9))
    } else {
        Err(Iperf3Error::Output(format!(
            "received {bps} bits per second"
        )))
    }
}

/// Extra command-line arguments and UCX variables for an `ucx_perftest` client (the variables
/// go to the server too), e.g. `args: &["-O", "1"]` (one put in flight) or
/// `env: &[("UCX_TCP_TX_SEG_SIZE", "64K")]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct UcxOpts<'a> {
    /// Appended to the client's command line.
    pub args: &'a [&'a str],
    /// Set for both processes, after (so possibly over) `UCX_TLS` and `UCX_NET_DEVICES`.
    pub env: &'a [(&'a str, &'a str)],
}

/// `ucx_perftest -t ucp_put_bw` between two hosts of `lab`, UCX over TCP only, ucx_perftest's
/// defaults otherwise: see [`ucx_perftest`] for the command lines.
///
/// Over tcp, ucx 1.13's put collapses for messages past a few MiB with its default window of
/// outstanding puts (tens of MB/s at 16 and 64 MiB, against ~1 GB/s at 1–4 MiB); `-O 1`
/// through [`ucx_perftest`] avoids most of that.
pub fn ucx_put_bw(lab: &Lab, server: usize, client: usize, size: usize, iters: usize) -> Measured {
    let opts = UcxOpts::default();
    ucx_perftest(lab, server, client, "ucp_put_bw", size, iters, opts)
}

/// [`ucx_put_bw`] with server and client in this process's namespace, over 127.0.0.1 and
/// `UCX_NET_DEVICES=lo`.
pub fn ucx_put_bw_loopback(size: usize, iters: usize) -> Measured {
    ucx_perftest_loopback("ucp_put_bw", size, iters, UcxOpts::default())
}

/// Any bandwidth test of `ucx_perftest` (`ucp_put_bw`, `ucp_get`, `tag_bw`, ...) between two
/// hosts of `lab`, over UCX's tcp transport.
///
/// Server, in host `server`: `UCX_TLS=tcp UCX_NET_DEVICES=<its veth> ucx_perftest -p PORT`.
/// Client, in host `client`: `UCX_TLS=tcp UCX_NET_DEVICES=<its veth> ucx_perftest ADDR -p PORT
/// -t TEST -s SIZE -n ITERS -w WARMUP -f [opts.args]`, with WARMUP = ITERS/10 (at least 1;
/// ucx's default of 10000 warm-up iterations would dominate large sizes). `UCX_NET_DEVICES`
/// keeps UCX to the veth: it would otherwise also offer `lo` as a lane. The figure is the
/// "overall" bandwidth. The client is killed after 60 s plus 1 s per 20 MB to move.
///
/// Both processes busy-poll: on a machine with few cores they take CPU from the kernel's TCP
/// stack, and the figure drops (iperf3, which sleeps in the kernel, is not affected).
pub fn ucx_perftest(
    lab: &Lab,
    server: usize,
    client: usize,
    test: &str,
    size: usize,
    iters: usize,
    opts: UcxOpts<'_>,
) -> Measured {
    let site = Site::Lab {
        lab,
        server,
        client,
    };
    run_ucx(site, test, size, iters, opts).unwrap_or_else(Measured::Missing)
}

/// [`ucx_perftest`] with server and client in this process's namespace, over 127.0.0.1 and
/// `UCX_NET_DEVICES=lo`.
pub fn ucx_perftest_loopback(test: &str, size: usize, iters: usize, opts: UcxOpts<'_>) -> Measured {
    run_ucx(Site::Loopback, test, size, iters, opts).unwrap_or_else(Measured::Missing)
}

fn run_ucx(
    site: Site<'_>,
    test: &str,
    size: usize,
    iters: usize,
    opts: UcxOpts<'_>,
) -> Result<Measured, String> {
    let exe = tool("ucx_perftest")?;
    let port = site.port()?;
    let (srv_dev, cli_dev) = match site {
        Site::Lab {
            lab,
            server,
            client,
        } => (lab.ifname(server), lab.ifname(client)),
        Site::Loopback => ("lo", "lo"),
    };
    let iters = iters.max(1);
    let warmup = (iters / 10).max(1);
    let ucx_env = |cmd: &mut Command, dev: &str| {
        cmd.env("UCX_TLS", "tcp").env("UCX_NET_DEVICES", dev);
        for (k, v) in opts.env {
            cmd.env(k, v);
        }
    };
    let mut srv = site.server_cmd(&exe);
    srv.args(["-p", &port.to_string()]);
    ucx_env(&mut srv, srv_dev);
    let mut cli = site.client_cmd(&exe);
    cli.args([&site.server_addr(), "-p", &port.to_string(), "-t", test])
        .args(["-s", &size.to_string(), "-n", &iters.to_string()])
        .args(["-w", &warmup.to_string(), "-f"])
        .args(opts.args);
    ucx_env(&mut cli, cli_dev);
    // ucx over tcp can crawl (see `ucx_put_bw`): allow 20 MB/s before calling it hung.
    let bytes = (size as u64).saturating_mul((iters + warmup) as u64);
    let deadline = UCX_DEADLINE + Duration::from_secs(bytes / 20_000_000);
    let done = server_client(
        ("ucx_perftest server", srv),
        port,
        ("ucx_perftest client", cli),
        deadline,
    )?;
    if !done.status.success() {
        return Err(format!("ucx_perftest client failed: {}", done.describe()));
    }
    parse_ucx(&done.out).map_err(|e| format!("ucx_perftest client {}: {e}", done.describe()))
}

/// GB/s from ucx_perftest's output: the last result line (`Final:` and 8 numbers, or the 8
/// numbers alone with `-f`): iterations, latency typical/average/overall (µs), bandwidth
/// average/overall (MiB/s, though printed as "MB/s"), message rate average/overall. Takes the
/// overall bandwidth × 2^20 / 10^9.
fn parse_ucx(out: &str) -> Result<Measured, String> {
    let row = out
        .lines()
        .rev()
        .find_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("Final:").unwrap_or(l);
            let nums: Result<Vec<f64>, _> = l.split_whitespace().map(str::parse::<f64>).collect();
            nums.ok().filter(|n| n.len() == 8)
        })
        .ok_or("no result line (8 numbers) in the output")?;
    let mib_per_s = row[5];
    if mib_per_s > 0.0 {
        Ok(Measured::Gbps(mib_per_s * 1_048_576.0 / 1e9))
    } else {
        Err(format!("bandwidth {mib_per_s} MiB/s"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ucx_final_line_is_mib_per_second() {
        // ucx_perftest 1.13 without -f, and with -f (no "Final:"), 1 MiB messages.
        let plain = "\
| # iterations | 50.0%ile | average | overall |  average |  overall |  average  |  overall  |
+--------------+--------------+----------+---------+---------+----------+----------+-----------+
Final:                  1000      0.180  1861.022  1861.022      537.34     537.34         537         537
";
        let g = parse_ucx(plain).unwrap().gbps().unwrap();
        assert!((g - 0.563_441).abs() < 1e-5, "{g}");
        // The same figure from the overall latency: 1 MiB per 1861.022 µs.
        assert!((g - 1_048_576.0 / 1861.022e-6 / 1e9).abs() < 1e-4);
        let final_only =
            "                        1000   1456.303  1554.443  1502.443      643.32     665.58         643         666\n";
        let g = parse_ucx(final_only).unwrap().gbps().unwrap();
        assert!((g - 665.58 * 1_048_576.0 / 1e9).abs() < 1e-9);
        assert!(parse_ucx("Waiting for connection...\n").is_err());
    }

    #[test]
    fn iperf3_json_is_bits_per_second() {
        let j = r#"{"start":{},"end":{"sum_received":{"bytes":1,"bits_per_second":24.0e9}}}"#;
        assert_eq!(parse_iperf3(j).unwrap(), Measured::Gbps(3.0));
        let e = r#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server"}"#;
        assert!(matches!(parse_iperf3(e), Err(Iperf3Error::Reported(m)) if m.contains("unable")));
        assert!(matches!(
            parse_iperf3("iperf3: error"),
            Err(Iperf3Error::Output(_))
        ));
    }

    #[test]
    fn missing_tool_is_reported() {
        assert!(tool("no-such-tool-nixl")
            .unwrap_err()
            .contains("not installed"));
        assert!(tool("sh").is_ok());
    }
}
