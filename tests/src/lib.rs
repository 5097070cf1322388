//! Helpers shared by the multi-process tests: the byte pattern (from `nixl-testkit`), hex for
//! the metadata exchange over pipes, and a handle on a scripted peer process
//! (`nixl-test-peer`, in `src/bin`).
//!
//! - [`netns`]: throwaway network namespaces joined by veth (the "hosts" of a test lab).
//! - [`scripted_peer`]: the body of the `nixl-test-peer` process (one agent, line commands).
//! - [`reference_tools`]: `iperf3` and `ucx_perftest`, measured beside nixl-rs in one run.

pub mod netns;
pub mod reference_tools;
pub mod scripted_peer;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub use nixl_testkit::pattern::{fill, fill_at, first_mismatch, pattern, word};

pub use nixl_core::codec::{hex, unhex};

/// A scripted peer process: one agent with one registered buffer, driven by line commands.
#[derive(Debug)]
pub struct Peer {
    /// The process.
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The peer's metadata as it printed it at start.
    pub metadata: Vec<u8>,
}

impl Peer {
    /// Starts `exe` (the `nixl-test-peer` binary) with a buffer of `size` bytes, from a memfd
    /// (`memfd = true`, peers may map it) or the heap.
    pub fn start(exe: &str, name: &str, size: usize, memfd: bool) -> Peer {
        let mut cmd = Command::new(exe);
        cmd.args(memfd.then_some("--memfd"));
        Peer::spawn(cmd, name, size)
    }

    /// Starts a prepared command (the `nixl-test-peer` binary, perhaps wrapped in
    /// `ip netns exec`, with extra flags such as `--config`) with `--name` and `--size` added.
    pub fn spawn(mut cmd: Command, name: &str, size: usize) -> Peer {
        let mut child = cmd
            .args(["--name", name, "--size", &size.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start peer");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut p = Peer {
            child,
            stdin,
            stdout,
            metadata: Vec::new(),
        };
        let line = p.line();
        p.metadata = unhex(line.strip_prefix("MD ").expect("MD line")).expect("hex");
        p
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("read peer");
        assert!(!s.is_empty(), "peer exited");
        s.trim_end().to_owned()
    }

    /// Sends a command and returns the reply line.
    pub fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").expect("write peer");
        self.stdin.flush().expect("flush peer");
        self.line()
    }

    /// Sends a command without waiting for its reply.
    pub fn send(&mut self, c: &str) {
        writeln!(self.stdin, "{c}").expect("write peer");
        self.stdin.flush().expect("flush peer");
    }

    /// The next reply line, or `None` if none came within `timeout`.
    pub fn reply_within(&mut self, timeout: std::time::Duration) -> Option<String> {
        use std::os::fd::AsRawFd;
        if self.stdout.buffer().is_empty() {
            let mut pfd = libc::pollfd {
                fd: self.stdout.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n <= 0 {
                return None;
            }
        }
        Some(self.line())
    }

    /// Sends a command and returns its reply, failing the test if none comes within `timeout`
    /// (so a hang is a failure, not a stuck test run).
    pub fn cmd_within(&mut self, c: &str, timeout: std::time::Duration) -> String {
        self.send(c);
        self.reply_within(timeout)
            .unwrap_or_else(|| panic!("no reply to {c:?} within {timeout:?}"))
    }

    /// Kills the process (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_at_matches_fill() {
        let mut whole = vec![0u8; 1000];
        fill(&mut whole, 3);
        for start in [0, 1, 7, 8, 9, 500, 993] {
            let mut part = vec![0u8; 1000 - start];
            fill_at(&mut part, start, 3);
            assert_eq!(&part[..], &whole[start..], "start {start}");
        }
        assert_eq!(first_mismatch(&whole, 3), None);
        whole[999] ^= 1;
        assert_eq!(first_mismatch(&whole, 3), Some(999));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(unhex(&hex(&[0, 255, 16])).unwrap(), vec![0, 255, 16]);
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
    }
}

/// The README's example, compiled and run as a doctest so it cannot drift from the API.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
