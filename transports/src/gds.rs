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
//! The probe needs the CUDA driver (see [`crate::cuda::driver`]) and `libcufile.so.0`, whose
//! symbols are resolved once into a table of function pointers (no code path calls into a
//! library that is not there, so nothing can panic). `cuFileDriverOpen` runs when the agent
//! starts the backend; its failure (no nvidia-fs and compatibility mode off in
//! `/etc/cufile.json`, an unsupported file system) makes the backend unavailable with the
//! reason. Without the nvidia-fs kernel module the backend also stands aside (cuFile would run
//! in compatibility mode, POSIX I/O through bounce buffers, no faster than the staged path),
//! unless `allow_compat_mode` asks for cuFile anyway. Without `gds`, VRAM ↔ FILE requests are staged through pinned host buffers by the
//! `cuda` backend's stager over `uring` or `posix` (see `nixl_core::staging`), and the request
//! says so.

#![allow(non_snake_case)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_int, c_void};
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use libloading::Library;
use nixl_core::{
    Backend, BackendName, Caps, Completion, Connection, Desc, Error, Locality, MemKind, PeerInfo,
    PreparedXfer, Region, Result, TargetHandle, XferOp, XferPlan,
};
use parking_lot::Mutex;

use crate::cuda::driver::{self, DeviceCtx};
use crate::files::{inspect_fd, OwnAgent};
use crate::files::{prepare_files, IoOp, Post};

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

/// `CUfileError_t`: plain integers (a value the library returns that is not a variant of a
/// Rust enum must not be read as one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CuFileError {
    err: c_int,
    cu_err: c_int,
}

/// `CUfileDescr_t` with an fd handle.
#[repr(C)]
struct CuFileDescr {
    type_: c_int,
    /// The union `{ int fd; void *handle; }`: the fd in its first four bytes.
    handle: CuFileDescrHandle,
    fs_ops: *const c_void,
}

#[repr(C)]
#[derive(Clone, Copy)]
union CuFileDescrHandle {
    fd: c_int,
    handle: *mut c_void,
}

// The layouts above are cudarc's generated ones (which use Rust enums for the integer fields).
const _: () = {
    use cudarc::cufile::sys as s;
    assert!(std::mem::size_of::<CuFileError>() == std::mem::size_of::<s::CUfileError_t>());
    assert!(std::mem::size_of::<CuFileDescr>() == std::mem::size_of::<s::CUfileDescr_t>());
    assert!(
        std::mem::offset_of!(CuFileDescr, handle) == std::mem::offset_of!(s::CUfileDescr_t, handle)
    );
    assert!(
        std::mem::offset_of!(CuFileDescr, fs_ops) == std::mem::offset_of!(s::CUfileDescr_t, fs_ops)
    );
};

const CU_FILE_SUCCESS: c_int = cudarc::cufile::sys::CUfileOpError::CU_FILE_SUCCESS as c_int;
const CU_FILE_HANDLE_TYPE_OPAQUE_FD: c_int =
    cudarc::cufile::sys::CUfileFileHandleType::CU_FILE_HANDLE_TYPE_OPAQUE_FD as c_int;

/// What a cuFile status code means, for messages.
fn op_error_text(code: c_int) -> String {
    use cudarc::cufile::sys::CUfileOpError as E;
    let known: &[(E, &str)] = &[
        (
            E::CU_FILE_DRIVER_NOT_INITIALIZED,
            "cuFile driver not initialised",
        ),
        (
            E::CU_FILE_DRIVER_INVALID_PROPS,
            "invalid cuFile driver properties",
        ),
        (
            E::CU_FILE_DRIVER_VERSION_MISMATCH,
            "cuFile driver version mismatch",
        ),
        (
            E::CU_FILE_PLATFORM_NOT_SUPPORTED,
            "platform not supported by GDS",
        ),
        (
            E::CU_FILE_IO_NOT_SUPPORTED,
            "I/O not supported on this file (file system or mount)",
        ),
        (E::CU_FILE_DEVICE_NOT_SUPPORTED, "GPU not supported by GDS"),
        (
            E::CU_FILE_NVFS_DRIVER_ERROR,
            "nvidia-fs driver error (is the module loaded?)",
        ),
        (E::CU_FILE_CUDA_DRIVER_ERROR, "CUDA driver error"),
        (E::CU_FILE_CUDA_POINTER_INVALID, "invalid device pointer"),
        (
            E::CU_FILE_CUDA_MEMORY_TYPE_INVALID,
            "memory is not device memory",
        ),
        (
            E::CU_FILE_CUDA_POINTER_RANGE_ERROR,
            "device pointer range out of the allocation",
        ),
        (E::CU_FILE_CUDA_CONTEXT_MISMATCH, "CUDA context mismatch"),
        (E::CU_FILE_INVALID_MAPPING_SIZE, "invalid mapping size"),
        (E::CU_FILE_INVALID_FILE_TYPE, "invalid file type"),
        (
            E::CU_FILE_INVALID_FILE_OPEN_FLAG,
            "file opened with unsupported flags",
        ),
        (
            E::CU_FILE_HANDLE_ALREADY_REGISTERED,
            "file handle already registered",
        ),
        (
            E::CU_FILE_HANDLE_NOT_REGISTERED,
            "file handle not registered",
        ),
        (
            E::CU_FILE_MEMORY_ALREADY_REGISTERED,
            "buffer already registered",
        ),
        (E::CU_FILE_MEMORY_NOT_REGISTERED, "buffer not registered"),
        (E::CU_FILE_PERMISSION_DENIED, "permission denied"),
        (E::CU_FILE_IO_DISABLED, "I/O disabled by configuration"),
        (E::CU_FILE_INTERNAL_ERROR, "internal cuFile error"),
    ];
    known.iter().find(|(e, _)| *e as c_int == code).map_or_else(
        || format!("cuFile status {code}"),
        |(_, t)| format!("{t} (cuFile status {code})"),
    )
}

fn describe(e: CuFileError) -> String {
    if e.cu_err != 0 {
        format!("{}; CUDA error {}", op_error_text(e.err), e.cu_err)
    } else {
        op_error_text(e.err)
    }
}

type HandleT = *mut c_void;

/// libcufile's entry points, resolved once.
struct CuFileLib {
    _lib: Library,
    driver_open: unsafe extern "C" fn() -> CuFileError,
    handle_register: unsafe extern "C" fn(*mut HandleT, *mut CuFileDescr) -> CuFileError,
    handle_deregister: unsafe extern "C" fn(HandleT),
    buf_register: unsafe extern "C" fn(*const c_void, usize, c_int) -> CuFileError,
    buf_deregister: unsafe extern "C" fn(*const c_void) -> CuFileError,
    read: unsafe extern "C" fn(HandleT, *mut c_void, usize, i64, i64) -> isize,
    write: unsafe extern "C" fn(HandleT, *const c_void, usize, i64, i64) -> isize,
}

impl fmt::Debug for CuFileLib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CuFileLib")
    }
}

/// Loads the first of `names` that opens and has every symbol.
fn load_cufile(names: &[&str]) -> std::result::Result<CuFileLib, String> {
    let mut why = Vec::new();
    for name in names {
        // SAFETY: loading libcufile runs its initialisers, which only set up the library's own
        // state; it is NVIDIA's documented way to use it.
        let lib = match unsafe { Library::new(*name) } {
            Ok(l) => l,
            Err(e) => {
                why.push(format!("{name}: {e}"));
                continue;
            }
        };
        macro_rules! sym {
            ($n:literal) => {
                // SAFETY: the symbol's type is the one declared in cufile.h for this name; the
                // pointer stays valid while `lib` (kept in the table) is loaded.
                match unsafe { lib.get($n) } {
                    Ok(s) => *s,
                    Err(e) => {
                        why.push(format!("{name}: {e}"));
                        continue;
                    }
                }
            };
        }
        let t = CuFileLib {
            driver_open: sym!(b"cuFileDriverOpen\0"),
            handle_register: sym!(b"cuFileHandleRegister\0"),
            handle_deregister: sym!(b"cuFileHandleDeregister\0"),
            buf_register: sym!(b"cuFileBufRegister\0"),
            buf_deregister: sym!(b"cuFileBufDeregister\0"),
            read: sym!(b"cuFileRead\0"),
            write: sym!(b"cuFileWrite\0"),
            _lib: lib,
        };
        return Ok(t);
    }
    Err(format!("libcufile not found ({})", why.join("; ")))
}

fn cufile() -> std::result::Result<&'static CuFileLib, String> {
    static LIB: OnceLock<std::result::Result<CuFileLib, String>> = OnceLock::new();
    LIB.get_or_init(|| load_cufile(&["libcufile.so.0", "libcufile.so"]))
        .as_ref()
        .map_err(Clone::clone)
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

/// The `gds` backend.
pub struct GdsBackend {
    cfg: GdsConfig,
    own: OwnAgent,
    running: Mutex<Option<Arc<Running>>>,
}

impl fmt::Debug for GdsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GdsBackend")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

struct Running {
    drv: &'static driver::Driver,
    lib: &'static CuFileLib,
    tables: Mutex<Tables>,
    jobs: crossbeam_channel::Sender<Job>,
    stopping: Arc<AtomicBool>,
}

type Job = (Arc<Post>, usize, Arc<Resolved>);

/// A request's operations with their cuFile handles and buffer bases, resolved at creation.
struct Resolved {
    /// Per operation: the cuFile handle and, per piece, (registered base, offset in it).
    ops: Vec<(usize, Vec<(u64, u64)>)>,
    ctx: Arc<DeviceCtx>,
}

impl GdsBackend {
    /// A backend with these settings (the cuFile driver opens with the agent).
    pub fn new(cfg: GdsConfig) -> GdsBackend {
        GdsBackend {
            cfg,
            own: OwnAgent::default(),
            running: Mutex::new(None),
        }
    }

    fn running(&self) -> Result<Arc<Running>> {
        self.running
            .lock()
            .clone()
            .ok_or_else(|| Error::Shutdown("gds backend not running".into()))
    }
}

fn err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BackendName::Gds,
        op,
        reason: reason.into(),
    }
}

const VRAM_FILE: &[MemKind] = &[MemKind::Vram, MemKind::File];
const FILE: &[MemKind] = &[MemKind::File];

impl Backend for GdsBackend {
    fn name(&self) -> BackendName {
        BackendName::Gds
    }

    fn caps(&self) -> Caps {
        Caps {
            local_kinds: VRAM_FILE,
            remote_kinds: FILE,
            notifications: false,
            locality: Locality::SameProcess,
        }
    }

    fn probe(&self) -> std::result::Result<(), String> {
        if !self.cfg.enabled {
            return Err("turned off by configuration ([gds] enabled = false)".into());
        }
        if self.cfg.threads == 0 || self.cfg.max_io_bytes == 0 {
            return Err("[gds] threads and max_io_bytes must be positive".into());
        }
        probe_all()?;
        match compat_refusal(nvidia_fs_loaded(), self.cfg.allow_compat_mode) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    fn start(&self, target: TargetHandle) -> Result<()> {
        let unavailable = |reason: String| Error::Unavailable {
            backend: BackendName::Gds,
            reason,
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
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let stopping = Arc::new(AtomicBool::new(false));
        let running = Arc::new(Running {
            drv,
            lib,
            tables: Mutex::new(Tables::default()),
            jobs: tx,
            stopping,
        });
        for i in 0..self.cfg.threads {
            let rx = rx.clone();
            let lib = running.lib;
            std::thread::Builder::new()
                .name(format!("nixl-gds-{i}"))
                .spawn(move || {
                    while let Ok((post, i, res)) = rx.recv() {
                        if !post.should_skip() {
                            post.record(run_op(lib, post.op, &post.ops[i], &res, i));
                        }
                        post.finish_one();
                    }
                })
                .map_err(|e| Error::io("spawning a gds thread", e))?;
        }
        *self.running.lock() = Some(running);
        self.own.set(target);
        Ok(())
    }

    fn conn_info(&self) -> Vec<u8> {
        self.own.conn_info()
    }

    fn register(&self, kind: MemKind, desc: &Desc) -> Result<Vec<u8>> {
        let run = self.running()?;
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
        Ok(Vec::new())
    }

    fn deregister(&self, region: &Region) {
        let Ok(run) = self.running() else {
            return;
        };
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

    fn can_reach(&self, conn_info: &[u8]) -> std::result::Result<(), String> {
        self.own.can_reach(conn_info, "files")
    }

    fn connect(&self, peer: &PeerInfo<'_>) -> Result<Arc<dyn Connection>> {
        let target = self.own.connect(BackendName::Gds, peer)?;
        Ok(Arc::new(GdsConn {
            target,
            run: self.running()?,
            max_io: self.cfg.max_io_bytes,
            register_buffers: self.cfg.register_buffers,
        }))
    }

    fn shutdown(&self) {
        if let Some(r) = self.running.lock().take() {
            r.stopping.store(true, std::sync::atomic::Ordering::Release);
        }
        self.own.clear();
    }
}

struct GdsConn {
    target: TargetHandle,
    run: Arc<Running>,
    max_io: usize,
    register_buffers: bool,
}

impl fmt::Debug for GdsConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GdsConn").finish_non_exhaustive()
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

impl Connection for GdsConn {
    fn prepare(&self, plan: XferPlan) -> Result<Box<dyn PreparedXfer>> {
        let (ops, remote_regions) = prepare_files(
            BackendName::Gds,
            &self.target,
            &plan,
            self.max_io,
            MemKind::Vram,
        )?;
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
        let mut t = self.run.tables.lock();
        let ctx = t
            .ctxs
            .get(&(ordinal as i32))
            .cloned()
            .ok_or_else(|| err("prepare", format!("GPU {ordinal} has no registration")))?;
        if self.register_buffers {
            for r in plan
                .local_regions
                .iter()
                .filter(|r| r.kind == MemKind::Vram)
            {
                register_buffer(self.run.lib, &mut t, &ctx, &r.desc);
            }
        }
        let mut resolved = Vec::with_capacity(ops.len());
        for (op, pieces) in ops.iter().zip(resolve_pieces(&ops, &t.bufs)) {
            let h = file_handle(self.run.lib, &mut t, op.fd)?;
            resolved.push((h, pieces));
        }
        drop(t);
        Ok(Box::new(GdsXfer {
            op: plan.op,
            ops,
            remote_regions,
            resolved: Arc::new(Resolved { ops: resolved, ctx }),
            run: Arc::clone(&self.run),
        }))
    }

    fn send_notif(&self, _from: &str, _msg: &[u8]) -> Result<()> {
        Err(err("notification", "gds carries no notifications"))
    }

    fn close(&self) {}
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

struct GdsXfer {
    op: XferOp,
    ops: Arc<[IoOp]>,
    remote_regions: Arc<[Arc<Region>]>,
    resolved: Arc<Resolved>,
    run: Arc<Running>,
}

impl fmt::Debug for GdsXfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GdsXfer")
            .field("ops", &self.ops.len())
            .finish_non_exhaustive()
    }
}

impl PreparedXfer for GdsXfer {
    fn post(&self, done: Completion) {
        let Some(post) = Post::start(
            self.op,
            &self.ops,
            &self.remote_regions,
            done,
            &self.run.stopping,
        ) else {
            return;
        };
        for i in 0..self.ops.len() {
            if self
                .run
                .jobs
                .send((Arc::clone(&post), i, Arc::clone(&self.resolved)))
                .is_err()
            {
                post.record(Err(Error::Shutdown("gds backend stopped".into())));
                post.finish_one();
            }
        }
    }
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

    use super::*;

    #[test]
    fn without_the_libraries_the_probe_says_what_is_missing() {
        let r = load_cufile(&["libnixl-no-such-cufile.so.0"]).unwrap_err();
        assert!(
            r.contains("libcufile not found") && r.contains("libnixl-no-such-cufile"),
            "{r}"
        );
        // This host: the CUDA driver (or libcufile) is missing, and the backend says which.
        if let Err(why) = GdsBackend::new(GdsConfig::default()).probe() {
            assert!(
                why.contains("CUDA driver") || why.contains("libcufile"),
                "{why}"
            );
        }
        let off = GdsBackend::new(GdsConfig {
            enabled: false,
            ..GdsConfig::default()
        });
        assert!(off.probe().unwrap_err().contains("enabled = false"));
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
