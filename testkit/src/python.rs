//! A Python virtual environment for the tests that drive Python (the wheel's pytest suite, the
//! `openai` client): made under the target directory, seeing the system's site-packages.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The python of the venv at `dir`, which sees the system's site-packages (made if it is not
/// there yet), or why there is none.
pub fn venv(dir: &Path) -> Result<PathBuf, String> {
    let py = dir.join("bin/python");
    if !py.exists() {
        let st = Command::new("python3")
            .args(["-m", "venv", "--system-site-packages"])
            .arg(dir)
            .status()
            .map_err(|e| format!("python3 -m venv could not start: {e}"))?;
        if !st.success() {
            return Err(format!("python3 -m venv {} failed: {st}", dir.display()));
        }
    }
    Ok(py)
}

/// `py -m pip install --quiet --disable-pip-version-check`, for the caller's arguments.
pub fn pip_install(py: &Path) -> Command {
    let mut c = Command::new(py);
    c.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]);
    c
}
