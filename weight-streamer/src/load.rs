//! Reading a model file into memory once, with io_uring, `O_DIRECT` where the filesystem
//! allows it.
//!
//! A file is opened with `O_DIRECT` (no copy through the page cache, and no cache left behind
//! full of a model that now lives in registered memory); where the filesystem refuses it (tmpfs,
//! some FUSE and network filesystems: `EINVAL` at open or at the first read), or the buffer is
//! not block-aligned, it is read buffered, and a debug line says so. Reads of up to
//! [`MAX_OP`] bytes are kept [`DEPTH`] in flight on a ring of the loading thread; a short read
//! is resubmitted for the rest. Where io_uring cannot be used (the `kernel.io_uring_disabled`
//! sysctl, a seccomp filter), positioned `pread`s do the same, again with a debug line. Each
//! file is read once (an `O_DIRECT` refusal comes at open or with the first read, before the
//! buffered read starts over; at most the reads then in flight were read twice).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// Reads kept in flight.
pub const DEPTH: u32 = 16;
/// Largest single read.
pub const MAX_OP: usize = 1 << 20;
/// Alignment `O_DIRECT` needs of the buffer, the offsets and the lengths (the largest logical
/// block size in use).
pub const BLOCK: usize = 4096;

/// How a file was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// io_uring, `O_DIRECT`.
    UringDirect,
    /// io_uring through the page cache.
    UringBuffered,
    /// `pread` through the page cache (io_uring unavailable).
    Pread,
}

impl ReadMode {
    /// A short name (`uring_direct`, `uring_buffered`, `pread`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReadMode::UringDirect => "uring_direct",
            ReadMode::UringBuffered => "uring_buffered",
            ReadMode::Pread => "pread",
        }
    }
}

/// Why a direct read gave up (the file is then read buffered from the start).
enum Direct {
    Refused(String),
    Failed(Error),
}

/// Reads the `size`-byte file at `path` into `slot[..size]`. `slot` may be longer (up to the
/// next [`BLOCK`] multiple is used by `O_DIRECT` reads, which stop at the end of the file).
pub fn read_file(path: &Path, slot: &mut [u8], size: u64) -> Result<ReadMode> {
    let size_us = usize::try_from(size)
        .map_err(|_| Error::Invalid(format!("{}: {size} bytes", path.display())))?;
    if slot.len() < size_us {
        return Err(Error::Invalid(format!(
            "{}: a slot of {} bytes for {size} bytes",
            path.display(),
            slot.len()
        )));
    }
    let ring = match io_uring::IoUring::new(DEPTH) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::debug!(path = %path.display(), "io_uring unavailable ({e}): reading with pread");
            None
        }
    };
    let Some(mut ring) = ring else {
        let f = open(path, false)?;
        pread_all(path, &f, &mut slot[..size_us])?;
        return Ok(ReadMode::Pread);
    };
    let direct_len = size_us.next_multiple_of(BLOCK);
    let why_not = if slot.as_ptr() as usize % BLOCK != 0 || slot.len() < direct_len {
        Some("the buffer is not block-aligned".to_owned())
    } else {
        match open(path, true) {
            Ok(f) => {
                match uring_read(&mut ring, path, &f, &mut slot[..direct_len], size_us, true) {
                    Ok(()) => return Ok(ReadMode::UringDirect),
                    Err(Direct::Failed(e)) => return Err(e),
                    Err(Direct::Refused(why)) => Some(why),
                }
            }
            Err(e) => Some(format!("open with O_DIRECT: {e}")),
        }
    };
    tracing::debug!(path = %path.display(), reason = why_not.as_deref().unwrap_or(""),
        "O_DIRECT not possible here: reading buffered");
    let f = open(path, false)?;
    match uring_read(&mut ring, path, &f, &mut slot[..size_us], size_us, false) {
        Ok(()) => Ok(ReadMode::UringBuffered),
        Err(Direct::Failed(e)) => Err(e),
        Err(Direct::Refused(why)) => Err(Error::Invalid(format!("{}: {why}", path.display()))),
    }
}

fn open(path: &Path, direct: bool) -> Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))
}

fn shrank(path: &Path, at: usize, size: usize) -> Error {
    Error::Changed {
        path: path.display().to_string(),
        detail: format!("ended at {at} of {size} bytes"),
    }
}

fn pread_all(path: &Path, f: &File, buf: &mut [u8]) -> Result<()> {
    let mut at = 0usize;
    while at < buf.len() {
        let n = f
            .read_at(&mut buf[at..], at as u64)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            return Err(shrank(path, at, buf.len()));
        }
        at += n;
    }
    Ok(())
}

/// Reads the file into `buf` (its `size` bytes, and for `direct` up to the block multiple
/// `buf.len()`) with reads kept in flight on `ring`.
fn uring_read(
    ring: &mut io_uring::IoUring,
    path: &Path,
    f: &File,
    buf: &mut [u8],
    size: usize,
    direct: bool,
) -> std::result::Result<(), Direct> {
    let fail = |what: &str, e: std::io::Error| {
        Direct::Failed(Error::io(format!("{what} {}", path.display()), e))
    };
    let base = buf.as_mut_ptr();
    let end = buf.len();
    // Pending reads by offset: their length.
    let mut pending: HashMap<u64, usize> = HashMap::new();
    let mut queue: Vec<(usize, usize)> = Vec::new();
    let mut next = 0usize;
    let mut got = 0usize;
    let mut first = true;
    loop {
        // Fill the ring: retries first, then new reads.
        while pending.len() < DEPTH as usize {
            let (off, len) = match queue.pop() {
                Some(r) => r,
                None if next < end => {
                    let len = MAX_OP.min(end - next);
                    let r = (next, len);
                    next += len;
                    r
                }
                None => break,
            };
            // SAFETY: `off + len <= buf.len()`: the read lands inside `buf`, which this function
            // borrows mutably until every submitted read has completed (the loop below waits for
            // all of them before returning, on every path).
            let sqe = io_uring::opcode::Read::new(
                io_uring::types::Fd(f.as_raw_fd()),
                unsafe { base.add(off) },
                len as u32,
            )
            .offset(off as u64)
            .build()
            .user_data(off as u64);
            // SAFETY: as above; the entry refers to memory valid until its completion is reaped.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                queue.push((off, len));
                break;
            }
            pending.insert(off as u64, len);
        }
        if pending.is_empty() {
            break;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                drain(ring, &mut pending);
                return Err(fail("io_uring_enter for", e));
            }
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (off, res) in done {
            let Some(len) = pending.remove(&off) else {
                continue;
            };
            let off = off as usize;
            if res < 0 {
                let e = std::io::Error::from_raw_os_error(-res);
                if res == -libc::EINTR || res == -libc::EAGAIN {
                    queue.push((off, len));
                    continue;
                }
                drain(ring, &mut pending);
                if direct && first && res == -libc::EINVAL {
                    return Err(Direct::Refused(format!("an O_DIRECT read: {e}")));
                }
                return Err(fail("read", e));
            }
            first = false;
            let n = res as usize;
            let stop = off + n;
            if n == len || stop >= size {
                got += n.min(size.saturating_sub(off));
                continue;
            }
            if n == 0 {
                drain(ring, &mut pending);
                return Err(Direct::Failed(shrank(path, off, size)));
            }
            got += n;
            if direct && stop % BLOCK != 0 {
                // O_DIRECT returns part of a block only at the end of the file.
                drain(ring, &mut pending);
                return Err(Direct::Failed(shrank(path, stop, size)));
            }
            queue.push((stop, len - n));
        }
    }
    if got < size {
        return Err(Direct::Failed(shrank(path, got, size)));
    }
    Ok(())
}

/// Waits for every read still in flight (their memory must not be given back before).
fn drain(ring: &mut io_uring::IoUring, pending: &mut HashMap<u64, usize>) {
    while !pending.is_empty() {
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // The kernel cannot wait: the ring is dropped by the caller, which waits for its
            // requests in io_uring's own teardown.
            tracing::error!("waiting for reads in flight: {e}");
            return;
        }
        for c in ring.completion() {
            pending.remove(&c.user_data());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_sized_files_read_whole_direct_where_possible_and_buffered_elsewhere() {
        // Under the target directory (a disk filesystem, where O_DIRECT works) and in /dev/shm
        // (tmpfs: O_DIRECT since Linux 6.6, the buffered fallback before).
        let dirs = [
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
            std::path::PathBuf::from("/dev/shm"),
        ];
        for dir in dirs.iter().filter(|d| d.is_dir()) {
            let p = dir.join(format!("nixl-load-test-{}", std::process::id()));
            for size in [1usize, 4095, 4096, 3 * 4096 + 123, (5 << 20) + 7] {
                let want: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
                std::fs::write(&p, &want).unwrap();
                let mut mem = crate::mem::HostMem::new(size.next_multiple_of(4096)).unwrap();
                let slot = mem.as_mut_slice();
                let mode = read_file(&p, slot, size as u64).unwrap();
                assert!(
                    slot[..size] == want[..],
                    "{} {size}: {mode:?}",
                    dir.display()
                );
                eprintln!("{}: {size} bytes read {}", dir.display(), mode.as_str());
                // A slot that is not block-aligned is read buffered.
                let mut v = vec![0u8; size + 1];
                let m2 = read_file(&p, &mut v[1..], size as u64).unwrap();
                assert_ne!(m2, ReadMode::UringDirect);
                assert!(v[1..] == want[..]);
                // A file shorter than its stamp said is refused, not padded.
                let mut short =
                    crate::mem::HostMem::new((size + 4096).next_multiple_of(4096)).unwrap();
                let e = read_file(&p, short.as_mut_slice(), size as u64 + 1).unwrap_err();
                assert!(matches!(e, Error::Changed { .. }), "{e}");
            }
            let _ = std::fs::remove_file(&p);
        }
    }
}
