//! A moto S3 server (`python3 -m moto.server`) on a free loopback port, for the tests that need
//! an S3-compatible store (and `nixl-bench`'s object rows).

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server has to accept connections.
const START_WITHIN: Duration = Duration::from_secs(30);

/// Why moto cannot run here, or `None`: `python3 -c "import moto.server, <also>"` must work
/// (`also`: the other modules the test needs, such as `boto3`).
pub fn missing(also: &[&str]) -> Option<String> {
    let modules = std::iter::once("moto.server")
        .chain(also.iter().copied())
        .collect::<Vec<_>>()
        .join(", ");
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| {
        format!(
            "moto not installed (python3 cannot import {modules}; python3 -m pip install \
             'moto[server]'; .ci/setup does)"
        )
    })
}

/// A moto server on 127.0.0.1, killed when dropped, and when this process dies.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    /// Starts moto on a free loopback port with these extra arguments (`--ssl-cert ...`) and
    /// environment (`S3_UPLOAD_PART_MIN_SIZE`, ...), and waits until it accepts connections.
    /// Check [`missing`] first.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Result<Moto, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let mut cmd = Command::new("python3");
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches only the child's own state: if this
        // process dies without dropping the guard, the server dies with it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("starting moto: {e}"))?;
        let m = Moto { child, port };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if t.elapsed() > START_WITHIN {
                return Err(format!(
                    "moto did not listen within {} s",
                    START_WITHIN.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(m)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
