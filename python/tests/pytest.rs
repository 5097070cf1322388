//! Builds the `nixl` wheel with maturin, installs it into a fresh virtual environment, and runs
//! the pytest suite of `python/tests/*.py` against it (two agents in one process, two processes
//! over the listen thread, a dead peer).
//!
//! Needs `python3` with `maturin`, `pytest` and `numpy` (installed by `.ci/setup`). Without them
//! the test skips visibly (`nixl_testkit::require!`), unless `NIXL_REQUIRE_PYTHON=1` or
//! `NIXL_REQUIRE_ALL=1` (set by `.ci/run`) makes it fail. The venv sees the system's site-packages (numpy, pytest, and torch where installed: the
//! torch tests run only where torch imports).

use std::path::{Path, PathBuf};
use std::process::Command;

fn have(args: &[&str]) -> bool {
    Command::new("python3")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command, what: &str) {
    let st = cmd
        .status()
        .unwrap_or_else(|e| panic!("{what}: could not start: {e}"));
    assert!(st.success(), "{what} failed: {st}");
}

#[test]
fn pytest_suite_against_the_built_wheel() {
    let missing: Vec<&str> = [
        ("maturin", &["-m", "maturin", "--version"][..]),
        ("pytest", &["-m", "pytest", "--version"][..]),
        ("numpy", &["-c", "import numpy"][..]),
        ("venv", &["-c", "import venv, ensurepip"][..]),
    ]
    .into_iter()
    .filter(|(_, args)| !have(args))
    .map(|(n, _)| n)
    .collect();
    let why = (!missing.is_empty())
        .then(|| format!("python3 lacks {} (see .ci/setup)", missing.join(", ")));
    nixl_testkit::require!(why, "NIXL_REQUIRE_PYTHON");

    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let wheels = tmp.join("nixl-wheel");
    let venv = tmp.join("nixl-venv");
    let _ = std::fs::remove_dir_all(&wheels);

    // One release build of the extension, into the workspace's target directory (shared with
    // `cargo build --release`, so mostly up to date already).
    let target = tmp.parent().expect("target/tmp has a parent").to_path_buf();
    run(
        Command::new("python3")
            .args(["-m", "maturin", "build", "--release", "--quiet", "--out"])
            .arg(&wheels)
            .current_dir(crate_dir)
            .env("CARGO_TARGET_DIR", &target),
        "maturin build",
    );
    let wheel = std::fs::read_dir(&wheels)
        .expect("wheel directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .expect("maturin wrote no wheel");

    let py = nixl_testkit::python::venv(&venv).unwrap_or_else(|e| panic!("{e}"));
    run(
        nixl_testkit::python::pip_install(&py)
            .args(["--no-index", "--no-deps", "--force-reinstall"])
            .arg(&wheel),
        "pip install of the wheel",
    );

    // Run from an empty directory, so that `import nixl` finds the installed package and not
    // the source tree (which lacks the compiled module).
    let work = tmp.join("nixl-pytest");
    let _ = std::fs::create_dir_all(&work);
    let tests = crate_dir.join("tests");
    run(
        Command::new(&py)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"])
            .arg(&tests)
            .current_dir(&work)
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        "pytest",
    );
}
