//! Runs the pytest suite of `serve/tests/python/` (the official `openai` client against
//! `nixl-serve up` deployments) with the `nixl-serve` binary cargo built for this test.
//!
//! Needs `python3` with `venv`, and `openai` and `pytest` (installed by `.ci/setup`; else they
//! are installed into a venv under the target directory from PyPI). Without them the test
//! skips visibly (`nixl_testkit::require!`), unless `NIXL_REQUIRE_SERVE_TESTS=1` or
//! `NIXL_REQUIRE_ALL=1` (set by `.ci/run`) makes it fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn ok(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// The venv's python with `openai` and `pytest` (made, and filled from PyPI, if need be), or
/// why there is none.
fn python_env() -> Result<PathBuf, String> {
    if !ok(Command::new("python3").args(["-c", "import venv, ensurepip"])) {
        return Err("python3 with venv is missing (see .ci/setup)".into());
    }
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nixl-serve-venv");
    let py = nixl_testkit::python::venv(&venv)?;
    let have = || ok(Command::new(&py).args(["-c", "import openai, pytest"]));
    let install = || ok(nixl_testkit::python::pip_install(&py).args(["openai", "pytest"]));
    if !(have() || install() && have()) {
        return Err("the venv lacks openai or pytest and pip could not install them".into());
    }
    Ok(py)
}

#[test]
fn openai_client_against_nixl_serve_up() {
    let py = python_env();
    nixl_testkit::require!(py.as_ref().err(), "NIXL_REQUIRE_SERVE_TESTS");
    let py = py.unwrap_or_default();
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let mut child = Command::new(&py)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-x"])
        .arg(&tests)
        .current_dir(&tests)
        .env("NIXL_SERVE_BIN", env!("CARGO_BIN_EXE_nixl-serve"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .spawn()
        .expect("pytest starts");
    // Bounded: the suite takes well under a minute; a hang fails here.
    let end = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pytest ran past 240 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "pytest failed: {status}");
}
