//! What the workspace's tests share: [`require!`] for tests that need something a machine may
//! lack (root, etcd, moto, a C compiler, hardware), [`pattern()`], the one generator of test
//! bytes, [`moto`], an S3 server on loopback, [`child`], the output of child processes, and [`python`], a virtual environment.
//!
//! # Skipping, visibly, or failing
//!
//! ```
//! fn etcd_missing() -> Option<String> {
//!     None // or Some("etcd not installed".into())
//! }
//!
//! // In a #[test] fn:
//! fn needs_etcd() {
//!     nixl_testkit::require!(etcd_missing(), "NIXL_REQUIRE_DAEMON_TESTS");
//!     // ... the test proper
//! }
//! # needs_etcd();
//! ```
//!
//! `require!(why_not)` does nothing when `why_not` is `None`. With `Some(reason)` it fails the
//! test when `NIXL_REQUIRE_ALL=1` (which `.ci/run` sets: CI can run everything but hardware) or
//! when one of the named variables is `1`; otherwise it writes `SKIPPED <test>: <reason>` to
//! the process's stderr and returns from the test. That line is written to the stderr handle,
//! not through `eprintln!`, so the test harness does not capture it: it shows in plain
//! `cargo test` output, beside `test <name> ... ok`.
//!
//! `require!(hardware: why_not, "NIXL_TEST_CUDA")` is for hardware CI does not have: it fails
//! only when a named variable is `1` (a host that says it has the hardware), never through
//! `NIXL_REQUIRE_ALL`.
//!
//! The returning form works in tests that return `()` or a `Result<(), E>` ([`Skip`]).
//!
//! # Child processes
//!
//! A test that runs its own binary again to play a second process calls a helper test marked
//! `#[ignore = "child process of <test>"]` with `--ignored --exact <name>`: so it never counts
//! as a pass in a normal run.

use std::fmt::Display;
use std::io::Write;

pub mod child;
pub mod moto;
pub mod pattern;
pub mod python;
pub use pattern::pattern;

/// The variable that turns every CI-runnable skip into a failure.
pub const REQUIRE_ALL: &str = "NIXL_REQUIRE_ALL";

/// Whether `var` is set to `1`.
pub fn env_is_1(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| v == "1")
}

/// Whether a test that cannot run must fail: `NIXL_REQUIRE_ALL=1` (unless `hardware`) or one
/// of `vars` set to `1`.
pub fn required(hardware: bool, vars: &[&str]) -> bool {
    (!hardware && env_is_1(REQUIRE_ALL)) || vars.iter().any(|v| env_is_1(v))
}

/// The running test's name: libtest names each test's thread after it (`main` when it runs
/// tests on the main thread, with `--test-threads=1`).
pub fn test_name() -> String {
    match std::thread::current().name() {
        Some(n) if n != "main" => n.to_string(),
        _ => std::env::args()
            .skip(1)
            .find(|a| !a.starts_with('-'))
            .unwrap_or_else(|| "test".to_string()),
    }
}

/// Reports that the running test cannot run because of `why`: panics (the test fails) when
/// [`required`], otherwise writes `SKIPPED <test>: <why>` where the test output shows it.
/// [`require!`] calls this and returns from the test.
pub fn skip(why: impl Display, hardware: bool, vars: &[&str]) {
    let test = test_name();
    if required(hardware, vars) {
        let mut names: Vec<&str> = vars.to_vec();
        if !hardware {
            names.insert(0, REQUIRE_ALL);
        }
        panic!(
            "{test}: cannot run: {why} (and {} asks that it run)",
            names.join(" or ")
        );
    }
    // The stderr handle, not `eprintln!`: libtest captures the print macros only.
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}

/// Says that a skipped test returns: `()`, or `Ok(())` for a test that returns a `Result`.
pub trait Skip {
    /// The value a skipped test returns.
    fn skipped() -> Self;
}

impl Skip for () {
    fn skipped() -> Self {}
}

impl<E> Skip for Result<(), E> {
    fn skipped() -> Self {
        Ok(())
    }
}

/// Runs the rest of the test only if `why_not` is `None`; see the [crate docs](crate).
#[macro_export]
macro_rules! require {
    (hardware: $why_not:expr $(, $var:expr)* $(,)?) => {
        if let Some(why) = $why_not {
            $crate::skip(why, true, &[$($var),*]);
            return $crate::Skip::skipped();
        }
    };
    ($why_not:expr $(, $var:expr)* $(,)?) => {
        if let Some(why) = $why_not {
            $crate::skip(why, false, &[$($var),*]);
            return $crate::Skip::skipped();
        }
    };
}

/// A test's own directory, `<temp dir>/nixl-<tag>-<pid>`: made empty, removed on drop.
#[derive(Debug)]
pub struct ScratchDir(pub std::path::PathBuf);

impl ScratchDir {
    /// Makes the directory of `tag` (unique within the test process), emptied first.
    pub fn new(tag: &str) -> ScratchDir {
        let p = std::env::temp_dir().join(format!("nixl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        ScratchDir(p)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `Some(reason)` unless `program --version` runs (`"<program> is not installed"`).
pub fn missing_program(program: &str) -> Option<String> {
    match std::process::Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(_) => None,
        Err(e) => Some(format!("{program} is not installed ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_missing_runs_the_rest() {
        fn t(ran: &mut bool) -> Result<(), ()> {
            require!(None::<String>);
            *ran = true;
            Ok(())
        }
        let mut ran = false;
        assert_eq!(t(&mut ran), Ok(()));
        assert!(ran);
    }

    #[test]
    fn a_named_variable_makes_it_required() {
        // Variables no one sets: required only through NIXL_REQUIRE_ALL.
        assert_eq!(
            required(false, &["NIXL_TESTKIT_UNSET"]),
            env_is_1(REQUIRE_ALL)
        );
        assert!(!required(true, &["NIXL_TESTKIT_UNSET"]));
    }

    #[test]
    fn the_test_name_is_the_threads() {
        assert!(
            test_name().ends_with("the_test_name_is_the_threads"),
            "{}",
            test_name()
        );
    }

    #[test]
    fn missing_programs_say_so() {
        assert!(missing_program("nixl-no-such-program").is_some());
    }
}
