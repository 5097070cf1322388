//! The reference tools measured in the same run as nixl-rs: iperf3 and ucx_perftest, run
//! between the same network namespaces (or on loopback). A tool that is missing or fails is
//! reported as missing with the reason, never replaced by a made-up figure.

use std::io::Read;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A reference figure.
#[derive(Clone, Debug, PartialEq)]
pub enum Measured {
    /// GB/s (10^9 bytes per second).
    Gbps(f64),
    /// Why there is no figure.
    Missing(String),
}

impl Measured {
    /// The figure, if any.
    pub fn gbps(&self) -> Option<f64> {
        match self {
            Measured::Gbps(g) => Some(*g),
            Measured::Missing(_) => None,
        }
    }
}

/// Where a tool runs: `None` is the root namespace (loopback runs), else an `ip netns` name.
pub type Ns<'a> = Option<&'a str>;

fn cmd(ns: Ns<'_>, program: &str) -> Command {
    match ns {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n, program]);
            c
        }
        None => Command::new(program),
    }
}

fn installed(program: &str) -> Result<(), String> {
    match Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{program} not installed ({e})")),
    }
}

/// Kills a server on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_client(mut c: Command, timeout: Duration) -> Result<String, String> {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                let mut err = String::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = o.read_to_string(&mut out);
                }
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return if status.success() {
                    Ok(out)
                } else {
                    Err(format!("{status}: {}", err.trim()))
                };
            }
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no result within {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// iperf3 from `client` to a server in `server` listening on `addr`, `len` bytes per write
/// (iperf3 caps a write at 1 MiB, so larger blocks are written 1 MiB at a time), `streams`
/// parallel streams, for `seconds`: the receiver's rate.
pub fn iperf3(
    server: Ns<'_>,
    client: Ns<'_>,
    addr: IpAddr,
    len: usize,
    streams: usize,
    seconds: f64,
) -> Measured {
    if let Err(e) = installed("iperf3") {
        return Measured::Missing(e);
    }
    let port = 15201 + (std::process::id() % 1000) as u16;
    let srv = match cmd(server, "iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => Server(c),
        Err(e) => return Measured::Missing(format!("iperf3 server: {e}")),
    };
    let mut last = String::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let mut c = cmd(client, "iperf3");
        c.args(["-c", &addr.to_string(), "-p", &port.to_string(), "-J"])
            .args([
                "-t",
                &format!("{seconds}"),
                "-l",
                &len.min(1 << 20).to_string(),
            ])
            .args(["-P", &streams.to_string()]);
        match run_client(c, Duration::from_secs_f64(seconds + 30.0)) {
            Ok(json) => {
                drop(srv);
                return parse_iperf3(&json);
            }
            Err(e) => last = e,
        }
        if !last.contains("connect") {
            break;
        }
    }
    Measured::Missing(format!("iperf3 failed: {last}"))
}

fn parse_iperf3(json: &str) -> Measured {
    let v: serde_json::Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(e) => return Measured::Missing(format!("iperf3 output unparsable: {e}")),
    };
    match v["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(bps) => Measured::Gbps(bps / 8.0 / 1e9),
        None => Measured::Missing(format!(
            "iperf3 gave no receiver rate: {}",
            v["error"].as_str().unwrap_or("unknown")
        )),
    }
}

/// ucx_perftest `ucp_put_bw` over TCP (UCX_TLS=tcp) with messages of `size` bytes, server in
/// `server`, client in `client` connecting to `addr`. UCX prints MB/s in units of 2^20 bytes;
/// the result is converted to 10^9 bytes per second.
pub fn ucx_put_bw(
    server: Ns<'_>,
    client: Ns<'_>,
    addr: IpAddr,
    size: usize,
    iters: usize,
) -> Measured {
    if Command::new("ucx_perftest")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Measured::Missing("ucx_perftest not installed (Debian: ucx-utils)".into());
    }
    let port = 13337 + (std::process::id() % 1000) as u16;
    let srv = match cmd(server, "ucx_perftest")
        .env("UCX_TLS", "tcp")
        .args(["-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => Server(c),
        Err(e) => return Measured::Missing(format!("ucx_perftest server: {e}")),
    };
    let mut last = String::new();
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(200));
        let mut c = cmd(client, "ucx_perftest");
        c.env("UCX_TLS", "tcp")
            .args([
                &addr.to_string(),
                "-p",
                &port.to_string(),
                "-t",
                "ucp_put_bw",
            ])
            .args(["-s", &size.to_string(), "-n", &iters.to_string()]);
        match run_client(c, Duration::from_secs(120)) {
            Ok(out) => {
                drop(srv);
                return parse_ucx(&out);
            }
            Err(e) => last = e,
        }
    }
    Measured::Missing(format!("ucx_perftest failed: {last}"))
}

fn parse_ucx(out: &str) -> Measured {
    // "Final:  ITERS  p50  avg  overall  bw_avg  bw_overall  rate_avg  rate_overall"
    let Some(line) = out.lines().find(|l| l.trim_start().starts_with("Final:")) else {
        return Measured::Missing("ucx_perftest printed no Final line".into());
    };
    let cols: Vec<&str> = line.split_whitespace().collect();
    match cols.get(6).and_then(|c| c.parse::<f64>().ok()) {
        Some(mib_s) => Measured::Gbps(mib_s * 1048576.0 / 1e9),
        None => Measured::Missing(format!("ucx_perftest Final line unparsable: {line}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_read_real_output_and_refuse_garbage() {
        let ucx = "Final:                  2000   1480.104 40102.643  2122.821       24.94     471.07          25         471\n";
        let g = parse_ucx(ucx).gbps().unwrap();
        assert!((g - 471.07 * 1048576.0 / 1e9).abs() < 1e-9);
        assert!(parse_ucx("nothing").gbps().is_none());
        let j = r#"{"end":{"sum_received":{"bits_per_second":8e9}}}"#;
        assert_eq!(parse_iperf3(j), Measured::Gbps(1.0));
        assert!(parse_iperf3("{").gbps().is_none());
        assert!(parse_iperf3(r#"{"error":"x"}"#).gbps().is_none());
    }
}
