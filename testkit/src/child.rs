//! Child processes of tests: their output, line by line, and whether they succeeded.

use std::io::{BufRead, BufReader, Read};
use std::process::Output;
use std::sync::mpsc;

/// The lines `out` (a child's stdout) gives, on a channel fed by a thread of their own: the
/// channel ends when `out` does (the child exited or closed it) or fails, and the thread ends
/// when the receiver is dropped and the next line comes.
pub fn lines_of(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    lines
}

/// Fails the test unless the child whose output `out` is exited 0; the message has `what`, the
/// exit status, and the child's stdout and stderr.
#[track_caller]
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
