//! The default secret of the `tcp` backend: one per user and host, in a file only that user can
//! read, created on first use.
//!
//! Agents that are given no shared secret authenticate with this one, so two agents of one user
//! on one host find each other with no configuration at all, while another local user (who cannot
//! read the file) is refused like any stranger. The file is `~/.config/nixl/secret`, where `~` is
//! the home directory of the effective uid in the password database (not `$HOME`, so that a
//! `sudo` without `-H` does not make root use, or create files in, another user's home). The
//! environment variable `NIXL_SECRET_FILE` or `[auth] secret_file` names another path.
//!
//! Before the file is used: its directory must belong to us and be writable by nobody else, and
//! the file must be a regular file (not a symbolic link) of ours that nobody else may read or
//! write (mode 0600 or stricter). A file that fails a check is refused with the reason, never
//! repaired. Creating it is race-free between agents starting at once: each writes a private
//! temporary file and links it into place; the first link wins and the others read the winner's.

use std::ffi::{CStr, OsStr};
use std::fs::DirBuilder;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Shortest and longest secret accepted from a file (after trimming whitespace).
const MIN_SECRET: usize = 16;
const MAX_FILE: u64 = 4096;

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The home directory of the effective uid, from the password database.
fn home() -> Result<PathBuf, String> {
    let uid = euid();
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: an all-zero passwd is a valid value for getpwuid_r to fill.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: `pw`, `buf` (with its length) and `out` are live for the call; getpwuid_r writes
    // the strings into `buf` and points `pw`'s fields into it.
    let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if r != 0 || out.is_null() || pw.pw_dir.is_null() {
        return Err(format!(
            "uid {uid} has no entry in the password database, so it has no home directory"
        ));
    }
    // SAFETY: pw_dir is a NUL-terminated string inside `buf`, which is still alive.
    let dir = unsafe { CStr::from_ptr(pw.pw_dir) };
    let dir = PathBuf::from(OsStr::from_bytes(dir.to_bytes()));
    if dir.as_os_str().is_empty() || !dir.is_absolute() {
        return Err(format!("uid {uid} has no usable home directory ({dir:?})"));
    }
    Ok(dir)
}

/// Where the per-user secret lives when nothing names another file.
pub(super) fn default_path() -> Result<PathBuf, String> {
    Ok(home()?.join(".config").join("nixl").join("secret"))
}

/// Checks that `dir` is a directory of ours that nobody else can write to.
fn check_dir(dir: &Path) -> Result<(), String> {
    let md = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !md.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if md.uid() != euid() {
        return Err(format!(
            "{} belongs to uid {}, not to us (uid {})",
            dir.display(),
            md.uid(),
            euid()
        ));
    }
    if md.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by other users (mode {:o}); make it 0700",
            dir.display(),
            md.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Reads the secret from `path` after checking owner, type and mode. `Ok(None)`: no such file.
fn read(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let md = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !md.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if md.uid() != euid() {
        return Err(format!(
            "{} belongs to uid {}, not to us (uid {})",
            path.display(),
            md.uid(),
            euid()
        ));
    }
    if md.mode() & 0o077 != 0 {
        return Err(format!(
            "{} may be read or written by other users (mode {:o}); it must be 0600",
            path.display(),
            md.mode() & 0o7777
        ));
    }
    if md.len() > MAX_FILE {
        return Err(format!(
            "{} is {} bytes, more than a secret ({MAX_FILE} at most)",
            path.display(),
            md.len()
        ));
    }
    let mut bytes = Vec::with_capacity(md.len() as usize);
    (&f).take(MAX_FILE)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = bytes.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET {
        return Err(format!(
            "{} holds {} bytes, fewer than the {MIN_SECRET} a secret needs",
            path.display(),
            secret.len()
        ));
    }
    Ok(Some(secret))
}

/// Writes a fresh secret to `path` unless a file is already there (then leaves it).
fn create(path: &Path) -> Result<(), String> {
    let dir = path
        .parent()
        .ok_or_else(|| format!("{} has no directory", path.display()))?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| format!("no randomness for a secret: {e}"))?;
    let text: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut tag = [0u8; 8];
    getrandom::fill(&mut tag).map_err(|e| format!("no randomness: {e}"))?;
    let tmp = dir.join(format!(
        ".secret.{}.{:016x}",
        std::process::id(),
        u64::from_le_bytes(tag)
    ));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    })();
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created this user's nixl secret");
            Ok(())
        }
        // Another agent made it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot create {}: {e}", path.display())),
    }
}

/// The secret in `path`, creating the file (and its directory, mode 0700) on first use.
pub(super) fn load_or_create(path: &Path) -> Result<Vec<u8>, String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| format!("{} has no directory", path.display()))?;
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    check_dir(dir)?;
    if let Some(s) = read(path)? {
        return Ok(s);
    }
    create(path)?;
    read(path)?.ok_or_else(|| format!("{} vanished after it was created", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("nixl-secret-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn created_once_private_and_shared_by_racing_agents() {
        let dir = scratch("race");
        let path = dir.join("sub").join("secret");
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create(&path).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|g| *g == got[0] && g.len() == 64));
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        // No temporary files left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        assert_eq!(load_or_create(&path).unwrap(), got[0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loose_modes_links_and_short_files_are_refused() {
        let dir = scratch("checks");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.join("secret");
        load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&path).unwrap_err();
        assert!(e.contains("0600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A symbolic link in place of the file.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(load_or_create(&link).is_err());
        // Too short.
        let short = dir.join("short");
        std::fs::write(&short, "abc\n").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_or_create(&short).unwrap_err().contains("fewer"));
        // A directory others may write to.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(load_or_create(&path).unwrap_err().contains("writable"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_default_is_under_the_password_database_home() {
        let p = default_path().unwrap();
        assert!(p.ends_with(".config/nixl/secret"), "{}", p.display());
    }
}
