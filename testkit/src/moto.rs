//! moto's S3 server (`python3 -m moto.server`, installed by `.ci/setup`) for tests of `s3://`
//! paths: started on a free port of 127.0.0.1, killed when dropped (or when the test process
//! dies).
//!
//! ```no_run
//! use nixl_testkit::moto::Moto;
//! # fn t() {
//! nixl_testkit::require!(Moto::missing(), "NIXL_REQUIRE_OBJECT_TESTS");
//! let m = Moto::start(&[("S3_UPLOAD_PART_MIN_SIZE", "65536")]);
//! m.make_bucket("my-bucket");
//! let endpoint = m.endpoint(); // http://127.0.0.1:PORT, for AWS_ENDPOINT_URL
//! # }
//! ```

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An `Authorization` header moto accepts (it does not check signatures).
pub const AUTH: &str = "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/s3/aws4_request, \
                        SignedHeaders=host, Signature=0";

/// A running moto server.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Moto {
    /// Why moto cannot run here, if it cannot (for [`crate::require!`]).
    pub fn missing() -> Option<String> {
        let have = Command::new("python3")
            .args(["-c", "import moto.server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (!have).then(|| {
            "moto not installed (python3 -m pip install 'moto[server]'; .ci/setup does)".into()
        })
    }

    /// Starts moto with the environment `env` added, and waits until it answers (30 s at
    /// most, else a panic).
    pub fn start(env: &[(&str, &str)]) -> Moto {
        Moto::start_with(&[], env)
    }

    /// [`Moto::start`] with more arguments for the server (`--ssl-cert FILE --ssl-key FILE`
    /// for HTTPS). It is up when it accepts connections (plain or TLS alike); a server that
    /// exits first is a panic.
    pub fn start_with(args: &[&OsStr], env: &[(&str, &str)]) -> Moto {
        Moto::try_start_with(args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Moto::start_with`] for programs (benchmarks) that report a server that does not come
    /// up as an error instead of a panic: it could not be started, exited at start, or did
    /// not accept a connection within 30 s (then it is killed).
    pub fn try_start_with(args: &[&OsStr], env: &[(&str, &str)]) -> std::io::Result<Moto> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches only the child: the server dies with
        // the test process, even one killed without unwinding.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("start moto (python3 -m moto.server): {e}"),
            )
        })?;
        // Dropped on every early return below: the server is killed.
        let mut m = Moto { child, port };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = m.child.try_wait() {
                return Err(std::io::Error::other(format!("moto exited at start: {st}")));
            }
            if t0.elapsed() >= Duration::from_secs(30) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "moto did not accept a connection within 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(m)
    }

    /// Kills the server now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Makes `bucket` (a panic if moto refuses).
    pub fn make_bucket(&self, bucket: &str) {
        let r = self.http("PUT", &format!("/{bucket}"), b"");
        assert!(
            r.as_ref().is_ok_and(|(s, _)| *s == 200),
            "make bucket {bucket}: {r:?}"
        );
    }

    /// One HTTP/1.0 exchange: (status, body).
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u32, Vec<u8>)> {
        let s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        exchange(s, self.port, method, path, body)
    }
}

/// One HTTP/1.0 exchange with the moto on `port` over `s` (a TCP stream, or TLS over one):
/// (status, body). The request carries [`AUTH`]: moto checks no signature, but treats a request
/// without one as anonymous (refused on private objects).
pub fn exchange(
    mut s: impl Read + Write,
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u32, Vec<u8>)> {
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\
         Authorization: {AUTH}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    s.flush()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A TLS server may close without close_notify: HTTP/1.0 ends at the close.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    let head_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |i| i + 4);
    let status = String::from_utf8_lossy(&out[..head_end])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, out[head_end..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that cannot come up is an error for `try_start_with`, not a panic, and the
    /// process is gone (the bench reports it and goes on).
    #[test]
    fn a_moto_that_exits_at_start_is_an_error() {
        crate::require!(Moto::missing(), "NIXL_REQUIRE_OBJECT_TESTS");
        let bad: &OsStr = "--no-such-moto-flag".as_ref();
        let Err(e) = Moto::try_start_with(&[bad], &[]) else {
            panic!("moto came up with an unknown flag");
        };
        assert!(e.to_string().contains("moto exited at start"), "{e}");
    }
}
