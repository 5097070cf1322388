//! The `gds` backend: VRAM ↔ FILE with GPUDirect Storage (cuFile), loaded at run time.
//!
//! Registrations and requests are those of the other file backends ([`crate::posix`]): a FILE
//! region is `(offset, length, fd)`, the agent names itself as the remote, READ moves file →
//! VRAM and WRITE VRAM → file. What differs is the memory: the local side is VRAM, and the bytes
//! move with `cuFileRead`/`cuFileWrite`, by DMA between the storage and the GPU where the
//! platform has the nvidia-fs driver (or the kernel's P2P DMA), through cuFile's own bounce
//! buffers where it runs in compatibility mode.
//!
//! - The first request on a registered fd makes its cuFile handle (`cuFileHandleRegister`, one
//!   per fd, shared by its registrations, released with the last of them), so a FILE
//!   registration that only DRAM requests use costs nothing here, and a file cuFile refuses
//!   fails that request with cuFile's reason rather than the registration. Files opened with
//!   `O_DIRECT` take the direct path; others go through the page cache in cuFile's
//!   compatibility mode.
//! - A VRAM region is `cuFileBufRegister`ed (pinned for DMA once) by the first request that
//!   moves it to or from a file, so VRAM that never meets a file takes no BAR1 space; I/O into
//!   it names the registered base and the offset, as cuFile requires for registered buffers.
//!   Every cuFile call that needs one runs with the buffer's GPU context current, deregistration
//!   included. A buffer the
//!   driver refuses to register still works, through cuFile's bounce buffers (a `debug` log
//!   says so).
//! - Operations (consecutive file ranges, at most `max_io_bytes`) run on a small thread pool,
//!   each thread with the GPU's primary context current; the last one completes the request.
//!   Short reads, file ends, `errno` and cuFile status codes fail the request with the fd and
//!   offset. A request ends Done only when every byte has moved.
//!
//! # When it is unavailable
//!
//! The probe needs the CUDA driver (see `cuda::driver`) and `libcufile.so.0`, whose
//! symbols are resolved once into a table of function pointers (no code path calls into a
//! library that is not there, so nothing can panic). `cuFileDriverOpen` runs when the agent
//! starts the backend; its failure (no nvidia-fs and compatibility mode off in
//! `/etc/cufile.json`, an unsupported file system) makes the backend unavailable with the
//! reason. Without the nvidia-fs kernel module the backend also stands aside (cuFile would run
//! in compatibility mode, POSIX I/O through bounce buffers, no faster than the staged path),
//! unless `allow_compat_mode` asks for cuFile anyway. Without `gds`, VRAM ↔ FILE requests are staged through pinned host buffers by the
//! `cuda` backend's stager over `uring` or `posix` (see `nixl_core::staging`), and the request
//! says so.
//!
//! The cuFile bindings are in `cufile`; what every file backend shares (registrations,
//! connections, requests, posts) is [`crate::files`].

#![warn(unreachable_pub)]

mod cufile;

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nixl_core::{
    BackendName, Desc, Error, MemKind, Registered, Result, Unusable, XferOp, XferPlan,
};
use parking_lot::Mutex;

use crate::cuda::driver::{self, DeviceCtx};
use crate::files::{inspect_fd, FileBackend, FileEngine, IoOp, Post, Workers};
use cufile::{
    cufile, describe, op_error_text, CuFileDescr, CuFileDescrHandle, CuFileLib, HandleT,
    CU_FILE_HANDLE_TYPE_OPAQUE_FD, CU_FILE_SUCCESS,
};

/// Settings of the `gds` backend (`[gds]` in the agent's configuration).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GdsConfig {
    /// `false` turns the backend off (VRAM ↔ FILE is then staged through host memory).
    pub enabled: bool,
    /// Threads that run cuFile I/O.
    pub threads: usize,
    /// Largest single operation.
    pub max_io_bytes: usize,
    /// Whether VRAM registrations are `cuFileBufRegister`ed.
    pub register_buffers: bool,
    /// Run without the nvidia-fs kernel module, in cuFile's compatibility mode (POSIX I/O
    /// through cuFile's own bounce buffers). Off by default: that path is no faster than the
    /// `cuda` stager over `uring`, which then carries VRAM ↔ FILE instead.
    pub allow_compat_mode: bool,
}

impl Default for GdsConfig {
    fn default() -> GdsConfig {
        GdsConfig {
            enabled: true,
            threads: 4,
            max_io_bytes: 16 << 20,
            register_buffers: true,
            allow_compat_mode: false,
        }
    }
}

/// Whether the nvidia-fs kernel module (GPUDirect Storage's DMA path) is loaded.
fn nvidia_fs_loaded() -> bool {
    std::path::Path::new("/sys/module/nvidia_fs").exists()
        || std::path::Path::new("/proc/driver/nvidia-fs").exists()
}

/// Why the backend does not run without nvidia-fs, or `None` when it may.
fn compat_refusal(nvidia_fs: bool, allow_compat_mode: bool) -> Option<String> {
    if nvidia_fs || allow_compat_mode {
        return None;
    }
    Some(
        "the nvidia-fs kernel module is not loaded, so cuFile could only run in compatibility \
         mode (POSIX I/O through its own bounce buffers), no faster than the cuda stager over \
         uring, which carries VRAM <-> FILE instead (load nvidia-fs for GPUDirect Storage, or set \
         [gds] allow_compat_mode = true to use cuFile anyway)"
            .into(),
    )
}

/// Why `gds` cannot run here, or the libraries it runs on.
fn probe_all() -> std::result::Result<(&'static driver::Driver, &'static CuFileLib), String> {
    let drv = driver::driver().map_err(|r| format!("needs the CUDA driver: {r}"))?;
    let lib = cufile()?;
    Ok((drv, lib))
}

/// cuFile handles of registered fds, and registered VRAM buffers.
#[derive(Default)]
struct Tables {
    /// fd → (cuFile handle once a request needed it, registrations using it).
    files: HashMap<i32, (Option<usize>, usize)>,
    /// Registered buffers by base: (end, registrations using it).
    bufs: BTreeMap<u64, (u64, usize)>,
    /// VRAM registrations: (base, end) → (registrations, GPU, whether `cuFileBufRegister` was
    /// tried). Buffers are registered with cuFile lazily, by the first request that moves them
    /// to or from a file, so VRAM that never meets a file costs no BAR1 space.
    vram: HashMap<(u64, u64), (usize, i32, bool)>,
    /// Contexts by GPU ordinal.
    ctxs: HashMap<i32, Arc<DeviceCtx>>,
}

/// The `gds` backend: the file skeleton run by cuFile workers.
pub type GdsBackend = FileBackend<GdsEngine>;

impl GdsBackend {
    /// A backend with these settings (the cuFile driver opens with the agent).
    pub fn new(cfg: GdsConfig) -> GdsBackend {
        FileBackend::with_engine(GdsEngine { cfg })
    }
}

/// The `gds` engine: `cuFileRead`/`cuFileWrite` on a thread pool.
#[derive(Debug)]
pub struct GdsEngine {
    cfg: GdsConfig,
}

/// The running engine: the libraries, the cuFile tables, the workers.
pub(crate) struct Running {
    drv: &'static driver::Driver,
    lib: &'static CuFileLib,
    tables: Mutex<Tables>,
    workers: Workers<Job>,
    stopping: Arc<AtomicBool>,
    /// `[gds] register_buffers`.
    register_buffers: bool,
}

type Job = (Arc<Post>, usize, Arc<Resolved>);

/// A request's operations with their cuFile handles and buffer bases, resolved at creation.
pub(crate) struct Resolved {
    /// Per operation: the cuFile handle and, per piece, (registered base, offset in it).
    ops: Vec<(usize, Vec<(u64, u64)>)>,
    ctx: Arc<DeviceCtx>,
}

fn err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BackendName::Gds,
        op,
        reason: reason.into(),
    }
}

impl FileEngine for GdsEngine {
    type Running = Running;
    type Resolved = Resolved;
    const NAME: BackendName = BackendName::Gds;
    const LOCAL_KINDS: &'static [MemKind] = &[MemKind::Vram, MemKind::File];
    const PREFERENCE: u8 = 2;
    const REMOTE_KINDS: &'static [MemKind] = &[MemKind::File];
    const MEM: MemKind = MemKind::Vram;

    fn max_io(&self) -> usize {
        self.cfg.max_io_bytes
    }

    fn probe(&self) -> std::result::Result<(), Unusable> {
        if !self.cfg.enabled {
            return Err("turned off by configuration ([gds] enabled = false)".into());
        }
        if self.cfg.threads == 0 || self.cfg.max_io_bytes == 0 {
            return Err("[gds] threads and max_io_bytes must be positive".into());
        }
        probe_all()?;
        match compat_refusal(nvidia_fs_loaded(), self.cfg.allow_compat_mode) {
            Some(why) => Err(Unusable::Reason(why)),
            None => Ok(()),
        }
    }

    fn start(&self) -> Result<Running> {
        let unavailable = |reason: String| Error::Unavailable {
            backend: BackendName::Gds,
            reason: reason.into(),
        };
        let (drv, lib) = probe_all().map_err(unavailable)?;
        if let Some(why) = compat_refusal(nvidia_fs_loaded(), self.cfg.allow_compat_mode) {
            return Err(unavailable(why));
        }
        // SAFETY: cuFileDriverOpen takes no arguments; the library is loaded and stays loaded.
        let r = unsafe { (lib.driver_open)() };
        if r.err != CU_FILE_SUCCESS {
            return Err(unavailable(format!(
                "cuFileDriverOpen failed: {} (load nvidia-fs, or allow compatibility mode in \
                 /etc/cufile.json)",
                describe(r)
            )));
        }
        let workers = Workers::start("gds", self.cfg.threads, move |(post, i, res): Job| {
            if !post.should_skip() {
                post.record(run_op(lib, post.op, &post.ops[i], &res, i));
            }
            post.finish_one();
        })?;
        Ok(Running {
            drv,
            lib,
            tables: Mutex::new(Tables::default()),
            workers,
            stopping: Arc::new(AtomicBool::new(false)),
            register_buffers: self.cfg.register_buffers,
        })
    }

    fn register(&self, run: Option<&Running>, kind: MemKind, desc: &Desc) -> Result<()> {
        let run = run.ok_or_else(|| Error::Shutdown("gds backend not running".into()))?;
        let mut t = run.tables.lock();
        match kind {
            MemKind::File => {
                let fd = i32::try_from(desc.dev_id).map_err(|_| {
                    Error::InvalidArgument(format!("fd {} out of range", desc.dev_id))
                })?;
                inspect_fd(desc.dev_id)?;
                t.files.entry(fd).or_insert((None, 0)).1 += 1;
            }
            MemKind::Vram => {
                let ordinal = i32::try_from(desc.dev_id).map_err(|_| {
                    Error::InvalidArgument(format!("GPU ordinal {} out of range", desc.dev_id))
                })?;
                if let std::collections::hash_map::Entry::Vacant(v) = t.ctxs.entry(ordinal) {
                    let ctx = DeviceCtx::open(run.drv, ordinal)
                        .map_err(|e| err("open GPU context", format!("GPU {ordinal}: {e}")))?;
                    v.insert(ctx);
                }
                let end = desc
                    .addr
                    .checked_add(desc.len)
                    .ok_or_else(|| Error::InvalidArgument("VRAM descriptor wraps around".into()))?;
                t.vram
                    .entry((desc.addr, end))
                    .or_insert((0, ordinal, false))
                    .0 += 1;
            }
            _ => {}
        }
        Ok(())
    }

    fn deregister(&self, run: &Running, region: Registered<'_>) {
        let mut t = run.tables.lock();
        match region.kind {
            MemKind::File => {
                let fd = region.desc.dev_id as i32;
                if let Some(e) = t.files.get_mut(&fd) {
                    e.1 -= 1;
                    if e.1 == 0 {
                        let h = e.0;
                        t.files.remove(&fd);
                        if let Some(h) = h {
                            let _cur = t.ctxs.values().next().and_then(|c| c.enter().ok());
                            // SAFETY: `h` came from cuFileHandleRegister and no request uses
                            // it (the core drained the region's users, and requests hold them).
                            unsafe { (run.lib.handle_deregister)(h as HandleT) };
                        }
                    }
                }
            }
            MemKind::Vram => {
                let end = region.desc.addr.wrapping_add(region.desc.len);
                let key = (region.desc.addr, end);
                let Some(e) = t.vram.get_mut(&key) else {
                    return;
                };
                e.0 -= 1;
                if e.0 > 0 {
                    return;
                }
                let ordinal = e.1;
                t.vram.remove(&key);
                if t.bufs.get(&region.desc.addr).is_some_and(|b| b.0 == end) {
                    t.bufs.remove(&region.desc.addr);
                    // cuFile calls need the buffer's context current.
                    let _cur = t.ctxs.get(&ordinal).and_then(|c| c.enter().ok());
                    // SAFETY: the base was registered with cuFileBufRegister and no request
                    // uses it any more (the core drained the region's users).
                    let r = unsafe { (run.lib.buf_deregister)(region.desc.addr as *const c_void) };
                    if r.err != CU_FILE_SUCCESS {
                        tracing::warn!(error = %describe(r), "gds: cuFileBufDeregister failed");
                    }
                }
            }
            _ => {}
        }
    }

    fn resolve(run: &Running, plan: &XferPlan, ops: &[IoOp]) -> Result<Resolved> {
        let ordinal = plan
            .segments
            .first()
            .map(|s| s.local.dev_id)
            .unwrap_or_default();
        if plan.segments.iter().any(|s| s.local.dev_id != ordinal) {
            return Err(Error::InvalidArgument(
                "gds: one request moves the memory of one GPU; split it by device".into(),
            ));
        }
        let mut t = run.tables.lock();
        let ctx = t
            .ctxs
            .get(&(ordinal as i32))
            .cloned()
            .ok_or_else(|| err("prepare", format!("GPU {ordinal} has no registration")))?;
        if run.register_buffers {
            for r in plan
                .local_regions
                .iter()
                .filter(|r| r.kind == MemKind::Vram)
            {
                register_buffer(run.lib, &mut t, &ctx, &r.desc);
            }
        }
        let mut resolved = Vec::with_capacity(ops.len());
        for (op, pieces) in ops.iter().zip(resolve_pieces(ops, &t.bufs)) {
            let h = file_handle(run.lib, &mut t, op.fd)?;
            resolved.push((h, pieces));
        }
        Ok(Resolved { ops: resolved, ctx })
    }

    fn stopping(run: &Running) -> &Arc<AtomicBool> {
        &run.stopping
    }

    fn submit(run: &Running, post: Arc<Post>, resolved: &Arc<Resolved>) {
        for i in 0..post.ops.len() {
            if run
                .workers
                .send((Arc::clone(&post), i, Arc::clone(resolved)))
                .is_err()
            {
                post.record(Err(Error::Shutdown("gds backend stopped".into())));
                post.finish_one();
            }
        }
    }

    fn stop(run: &Running) {
        run.stopping.store(true, Ordering::Release);
        run.workers.stop();
    }
}

/// Where each piece of each operation goes: (registered base, offset in it), or (address, 0)
/// for memory cuFile does not have registered.
pub(crate) fn resolve_pieces(
    ops: &[IoOp],
    bufs: &BTreeMap<u64, (u64, usize)>,
) -> Vec<Vec<(u64, u64)>> {
    ops.iter()
        .map(|op| {
            op.pieces
                .iter()
                .map(|&(addr, len)| match bufs.range(..=addr).next_back() {
                    Some((&base, &(end, _))) if addr.checked_add(len).is_some_and(|e| e <= end) => {
                        (base, addr - base)
                    }
                    _ => (addr, 0),
                })
                .collect()
        })
        .collect()
}

/// Registers a VRAM region's buffer with cuFile the first time a request needs it (once: a
/// buffer the driver refuses keeps going through cuFile's bounce buffers).
fn register_buffer(lib: &CuFileLib, t: &mut Tables, ctx: &DeviceCtx, desc: &Desc) {
    let end = desc.addr.wrapping_add(desc.len);
    let Some(e) = t.vram.get_mut(&(desc.addr, end)) else {
        return;
    };
    if e.2 {
        return;
    }
    e.2 = true;
    let Ok(_cur) = ctx.enter() else {
        return;
    };
    // SAFETY: the range is device memory registered with the agent (valid until its
    // deregistration, which deregisters it from cuFile first).
    let r = unsafe { (lib.buf_register)(desc.addr as *const c_void, desc.len as usize, 0) };
    if r.err == CU_FILE_SUCCESS {
        t.bufs.insert(desc.addr, (end, 1));
    } else {
        tracing::debug!(addr = desc.addr, len = desc.len, error = %describe(r),
            "gds: buffer not registered with cuFile; its I/O goes through bounce buffers");
    }
}

/// The cuFile handle of a registered fd, made on first use.
fn file_handle(lib: &CuFileLib, t: &mut Tables, fd: i32) -> Result<usize> {
    let e = t
        .files
        .get_mut(&fd)
        .ok_or_else(|| err("prepare", format!("fd {fd} is not registered with gds")))?;
    if let Some(h) = e.0 {
        return Ok(h);
    }
    let mut d = CuFileDescr {
        type_: CU_FILE_HANDLE_TYPE_OPAQUE_FD,
        handle: CuFileDescrHandle {
            handle: std::ptr::null_mut(),
        },
        fs_ops: std::ptr::null(),
    };
    d.handle.fd = fd;
    let mut h: HandleT = std::ptr::null_mut();
    // SAFETY: `h` and `d` are valid for the call; the descriptor names an fd registered with
    // the agent, which the caller keeps open while it is registered.
    let r = unsafe { (lib.handle_register)(&mut h, &mut d) };
    if r.err != CU_FILE_SUCCESS {
        // SAFETY: F_GETFL on an fd number only reads its flags (or fails with EBADF).
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        let hint = if flags >= 0 && flags & libc::O_DIRECT == 0 {
            " (the fd was opened without O_DIRECT: cuFile takes files opened with O_DIRECT on a \
             file system GDS supports, such as ext4 or xfs on local NVMe)"
        } else {
            " (cuFile takes files on a file system GDS supports, such as ext4 or xfs on local \
             NVMe; tmpfs and overlay are not)"
        };
        return Err(err(
            "cuFileHandleRegister",
            format!("fd {fd}: {}{hint}", describe(r)),
        ));
    }
    e.0 = Some(h as usize);
    Ok(h as usize)
}

/// Runs operation `i` to the end with cuFile, resuming short transfers.
fn run_op(lib: &CuFileLib, op: XferOp, io: &IoOp, res: &Resolved, i: usize) -> Result<()> {
    let _cur = res
        .ctx
        .enter()
        .map_err(|e| err("make GPU context current", e.to_string()))?;
    let (h, pieces) = &res.ops[i];
    let h = *h as HandleT;
    let mut file_off = io.offset;
    for (&(addr, len), &(base, off)) in io.pieces.iter().zip(pieces) {
        let mut done = 0u64;
        while done < len {
            let n = (len - done) as usize;
            let (fo, bo) = ((file_off + done) as i64, (off + done) as i64);
            // SAFETY: `base + bo .. + n` lies in device memory registered with the agent and
            // held by this post (checked against its region when the request was created);
            // `h` is the cuFile handle of the registered fd, alive while the region is.
            let r = unsafe {
                match op {
                    XferOp::Read => (lib.read)(h, base as *mut c_void, n, fo, bo),
                    XferOp::Write => (lib.write)(h, base as *const c_void, n, fo, bo),
                }
            };
            let verb = if op == XferOp::Read {
                "cuFileRead"
            } else {
                "cuFileWrite"
            };
            if r > 0 {
                done += r as u64;
                continue;
            }
            let what = format!(
                "{verb} fd {} at offset {} into {:#x} ({} bytes left)",
                io.fd,
                file_off + done,
                addr + done,
                len - done
            );
            return Err(match r {
                0 => err(
                    verb,
                    format!(
                        "{what}: end of file (file shorter than its registration, or truncated)"
                    ),
                ),
                -1 => Error::io(what, std::io::Error::last_os_error()),
                c => err(verb, format!("{what}: {}", op_error_text(-(c as c_int)))),
            });
        }
        file_off += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_nvidia_fs_gds_stands_aside_unless_compat_mode_is_allowed() {
        let why = super::compat_refusal(false, false).expect("refused");
        assert!(
            why.contains("nvidia-fs") && why.contains("allow_compat_mode"),
            "{why}"
        );
        assert_eq!(super::compat_refusal(false, true), None);
        assert_eq!(super::compat_refusal(true, false), None);
    }

    use super::cufile::{load_cufile, CuFileError};
    use super::*;
    use nixl_core::Backend;

    #[test]
    fn without_the_libraries_the_probe_says_what_is_missing() {
        let r = load_cufile(&["libnixl-no-such-cufile.so.0"]).unwrap_err();
        assert!(
            r.contains("libcufile not found") && r.contains("libnixl-no-such-cufile"),
            "{r}"
        );
        // This host: the CUDA driver (or libcufile) is missing, and the backend says which.
        if let Err(why) = GdsBackend::new(GdsConfig::default()).probe() {
            let why = why.to_string();
            assert!(
                why.contains("CUDA driver") || why.contains("libcufile"),
                "{why}"
            );
        }
        let off = GdsBackend::new(GdsConfig {
            enabled: false,
            ..GdsConfig::default()
        });
        assert!(off
            .probe()
            .unwrap_err()
            .to_string()
            .contains("enabled = false"));
    }

    #[test]
    fn status_codes_become_words() {
        use cudarc::cufile::sys::CUfileOpError as E;
        let t = op_error_text(E::CU_FILE_NVFS_DRIVER_ERROR as c_int);
        assert!(t.contains("nvidia-fs") && t.contains("5010"), "{t}");
        assert_eq!(op_error_text(4242), "cuFile status 4242");
        let d = describe(CuFileError {
            err: E::CU_FILE_CUDA_DRIVER_ERROR as c_int,
            cu_err: 2,
        });
        assert!(d.contains("CUDA error 2"), "{d}");
    }

    #[test]
    fn pieces_in_registered_buffers_name_the_base_and_offset() {
        let mut bufs = BTreeMap::new();
        bufs.insert(0x1000, (0x3000, 1));
        bufs.insert(0x8000, (0x9000, 1));
        let ops = vec![
            IoOp {
                fd: 3,
                offset: 0,
                pieces: vec![(0x1000, 0x100), (0x2f00, 0x100), (0x2f00, 0x101)],
            },
            IoOp {
                fd: 3,
                offset: 0,
                pieces: vec![(0x8800, 0x800), (0x5000, 1), (0x7fff, 2)],
            },
        ];
        let r = resolve_pieces(&ops, &bufs);
        assert_eq!(r[0], vec![(0x1000, 0), (0x1000, 0x1f00), (0x2f00, 0)]);
        assert_eq!(r[1], vec![(0x8000, 0x800), (0x5000, 0), (0x7fff, 0)]);
    }
}
