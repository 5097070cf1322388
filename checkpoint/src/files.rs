//! The data files of a checkpoint directory (opened buffered and `O_DIRECT`, registered with
//! the agent, moved by posted requests), chunk checksums, and the manifest written last.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use nixl_core::{
    Agent, BackendName, Desc, DescList, MemKind, Registration, XferOp, XferOptions, XferRequest,
};
use nixl_transports::files::{inspect_fd, FileInfo};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{CkptError, Result};
use crate::manifest::Manifest;
use crate::ops::{is_ours, MANIFEST};

use crate::dir::Progress;

/// A data file opened twice: buffered (any alignment) and, where possible, `O_DIRECT`.
pub(crate) struct DataFd {
    pub(crate) path: PathBuf,
    pub(crate) buffered: File,
    direct: Option<(File, FileInfo)>,
}

impl DataFd {
    pub(crate) fn open(path: &Path, write: bool, want_direct: bool) -> Result<DataFd> {
        let ctx = |what: &str| format!("{what} {}", path.display());
        let mut o = OpenOptions::new();
        if write {
            o.write(true).create_new(true);
        } else {
            o.read(true);
        }
        let buffered = o.open(path).map_err(|e| CkptError::io(ctx("open"), e))?;
        let direct = if want_direct {
            let mut o = OpenOptions::new();
            if write {
                o.write(true);
            } else {
                o.read(true);
            }
            match o.custom_flags(libc::O_DIRECT).open(path) {
                Ok(f) => {
                    let info =
                        inspect_fd(fd_of(&f)).map_err(|e| CkptError::agent(ctx("inspect"), e))?;
                    Some((f, info))
                }
                // The file system has no O_DIRECT (tmpfs): buffered it is.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
                Err(e) => return Err(CkptError::io(ctx("open (O_DIRECT)"), e)),
            }
        } else {
            None
        };
        Ok(DataFd {
            path: path.to_owned(),
            buffered,
            direct,
        })
    }

    /// Splits `len` bytes at memory `addr` ↔ file offset `off` into an `O_DIRECT` piece (the
    /// aligned part) and a buffered one (the rest).
    pub(crate) fn pieces(&self, addr: u64, off: u64, len: u64, out: &mut Vec<(Desc, Desc, bool)>) {
        let mut done = 0;
        if let Some((f, info)) = &self.direct {
            if addr % info.mem_align == 0 && off % info.offset_align == 0 {
                let aligned = len - len % info.offset_align;
                if aligned > 0 {
                    out.push((
                        Desc::new(addr, aligned, 0),
                        Desc::new(off, aligned, fd_of(f)),
                        true,
                    ));
                    done = aligned;
                }
            }
        }
        if done < len {
            out.push((
                Desc::new(addr + done, len - done, 0),
                Desc::new(off + done, len - done, fd_of(&self.buffered)),
                false,
            ));
        }
    }
}

pub(crate) fn fd_of(f: &File) -> u64 {
    use std::os::fd::AsRawFd as _;
    f.as_raw_fd() as u64
}

/// Registers both fds of every data file, `sizes[i]` bytes each.
pub(crate) fn register_files(
    agent: &Agent,
    fds: &[&DataFd],
    sizes: &[u64],
) -> Result<Vec<Registration>> {
    let mut descs = Vec::new();
    for (fd, &size) in fds.iter().zip(sizes) {
        let size = size.max(1);
        descs.push(Desc::new(0, size, fd_of(&fd.buffered)));
        if let Some((f, _)) = &fd.direct {
            descs.push(Desc::new(0, size, fd_of(f)));
        }
    }
    let list = DescList::from_descs(MemKind::File, descs)
        .map_err(|e| CkptError::agent("data file descriptors", e))?;
    // SAFETY: FILE descriptors carry no memory contract; the fds outlive the registration
    // (dropped before the files are closed).
    let reg = unsafe { agent.register(&list) }
        .map_err(|e| CkptError::agent("register the data files with the agent", e))?;
    Ok(vec![reg])
}

/// Creates and posts one request for the `O_DIRECT` pieces and one for the buffered ones, of
/// host memory.
pub(crate) fn transfers(
    agent: &Agent,
    op: XferOp,
    pieces: &[(Desc, Desc, bool)],
) -> Result<Posted> {
    transfers_of(agent, op, MemKind::Dram, None, pieces)
}

/// [`transfers`] of memory of `kind` (VRAM pieces carry their device in `dev_id`), through
/// `backend` when one is named.
pub(crate) fn transfers_of(
    agent: &Agent,
    op: XferOp,
    kind: MemKind,
    backend: Option<BackendName>,
    pieces: &[(Desc, Desc, bool)],
) -> Result<Posted> {
    let mut reqs = Posted(Vec::new());
    for direct in [true, false] {
        let (mem, file): (Vec<Desc>, Vec<Desc>) = pieces
            .iter()
            .filter(|p| p.2 == direct)
            .map(|p| (p.0, p.1))
            .unzip();
        if mem.is_empty() {
            continue;
        }
        let ctx = if op == XferOp::Write {
            "write the regions to their data files"
        } else {
            "read the data files into the regions"
        };
        let local = DescList::from_descs(kind, mem).map_err(|e| CkptError::agent(ctx, e))?;
        let remote =
            DescList::from_descs(MemKind::File, file).map_err(|e| CkptError::agent(ctx, e))?;
        let req = agent
            .create_xfer(
                op,
                &local,
                &remote,
                agent.name(),
                XferOptions {
                    backend,
                    ..XferOptions::default()
                },
            )
            .map_err(|e| CkptError::agent(ctx, e))?;
        req.post().map_err(|e| CkptError::agent(ctx, e))?;
        reqs.0.push(req);
    }
    Ok(reqs)
}

/// Creates and posts the `gds` requests of VRAM pieces (their device in `dev_id`): one request
/// per device, in order of first use.
pub(crate) fn gds_transfers(
    agent: &Agent,
    op: XferOp,
    vpieces: &[(Desc, Desc, bool)],
) -> Result<Posted> {
    let mut devices: Vec<u64> = Vec::new();
    for p in vpieces {
        if !devices.contains(&p.0.dev_id) {
            devices.push(p.0.dev_id);
        }
    }
    let mut reqs = Posted(Vec::new());
    for dev in devices {
        let mine: Vec<_> = vpieces
            .iter()
            .filter(|p| p.0.dev_id == dev)
            .copied()
            .collect();
        let mut v = transfers_of(agent, op, MemKind::Vram, Some(BackendName::Gds), &mine)?;
        reqs.0.append(&mut v.0);
    }
    Ok(reqs)
}

/// Posted requests: dropping them cancels what is still in flight and waits until no backend
/// touches the memory or the files any more (so an early return cannot close fds under them).
pub(crate) struct Posted(pub(crate) Vec<XferRequest>);

impl Drop for Posted {
    fn drop(&mut self) {
        for r in &self.0 {
            r.release();
        }
    }
}

/// xxh3 of every `(region, chunk, addr, len)` chunk, on every core.
///
/// # Safety
/// Every chunk must be valid for reads for the call.
pub(crate) unsafe fn hash_all(
    chunks: &[(usize, usize, u64, u64)],
    progress: Option<&Progress>,
    phase: &str,
) -> Vec<u64> {
    let out: Vec<AtomicU64> = chunks.iter().map(|_| AtomicU64::new(0)).collect();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let total: u64 = chunks.iter().map(|c| c.3).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    std::thread::scope(|s| {
        for _ in 0..threads.min(chunks.len()) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(_, _, addr, len)) = chunks.get(k) else {
                    break;
                };
                // SAFETY: the caller guarantees every chunk is readable for the call.
                let bytes =
                    unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len as usize) };
                out[k].store(xxh3_64(bytes), Ordering::Relaxed);
                let d = done.fetch_add(len, Ordering::Relaxed) + len;
                if let Some(p) = progress {
                    p(phase, d, total);
                }
            });
        }
    });
    out.into_iter().map(AtomicU64::into_inner).collect()
}

pub(crate) fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let tmp = dir.join(format!("{MANIFEST}.tmp-{:016x}", m.save_id));
    let bytes = m.encode();
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| CkptError::io(format!("create {}", tmp.display()), e))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| CkptError::io(format!("write {}", tmp.display()), e))?;
    drop(f);
    let dst = dir.join(MANIFEST);
    std::fs::rename(&tmp, &dst).map_err(|e| {
        CkptError::io(
            format!("rename {} over {}", tmp.display(), dst.display()),
            e,
        )
    })?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CkptError::io(format!("fsync directory {}", dir.display()), e))
}

/// Removes what earlier saves left in `dir` that `m` does not reference: their data files and
/// temporary manifests (a save killed before its rename leaves both).
pub(crate) fn remove_stale(dir: &Path, m: &Manifest) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_ours(&name) && !m.files.iter().any(|f| f.name == name) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(file = %e.path().display(), "could not remove a stale file: {err}");
            }
        }
    }
}
