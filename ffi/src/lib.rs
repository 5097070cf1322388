//! The C ABI of nixl-rs: `libnixl.so`, `libnixl.a` and the header `include/nixl.h`.
//!
//! Engines written in C, C++ or Python (through ctypes/cffi) drive an agent through these
//! functions: create it, register memory, exchange metadata, create and post transfers, poll
//! them, and send and receive notifications, with the same backends as a Rust program.
//!
//! The names, signatures and status codes of the contract (issue 4) are fixed; see
//! `ffi/README.md` for the conventions (ownership, outputs, errors, threads). The header is
//! generated from this file by cbindgen (`NIXL_BLESS=1 cargo test -p nixl-ffi --test header`
//! rewrites it; the test fails when it is out of date).
//!
//! Every export catches panics (returning [`NIXL_ERR_PANIC`]), checks every pointer it is given
//! for NULL and alignment, and writes its outputs only on success.

#![allow(non_camel_case_types)]

mod ckpt;
pub use ckpt::{nixl_ckpt_region, nixl_ckpt_restore, nixl_ckpt_save};
mod kv;
pub use kv::{
    nixl_kv_decode, nixl_kv_decode_add_prefill, nixl_kv_decode_cancel, nixl_kv_decode_free,
    nixl_kv_decode_new, nixl_kv_decode_poll, nixl_kv_descs, nixl_kv_event, nixl_kv_layout,
    nixl_kv_layout_decode, nixl_kv_layout_encode, nixl_kv_layout_validate, nixl_kv_offer,
    nixl_kv_prefill, nixl_kv_prefill_cancel, nixl_kv_prefill_free, nixl_kv_prefill_held,
    nixl_kv_prefill_new, nixl_kv_prefill_poll, nixl_kv_pull, nixl_kv_renew,
    NIXL_KV_BLOCK_FIRST_HND, NIXL_KV_BLOCK_FIRST_NHD, NIXL_KV_CANCELLED, NIXL_KV_DONE,
    NIXL_KV_ENDED, NIXL_KV_FAILED, NIXL_KV_FREED, NIXL_KV_LAYER_FIRST_HND, NIXL_KV_LAYER_FIRST_NHD,
    NIXL_KV_LAYOUT_BYTES, NIXL_KV_MAX_BLOCKS, NIXL_KV_MLA, NIXL_KV_OFFERED, NIXL_KV_SPLIT,
};
mod weights;
pub use weights::{
    nixl_weights, nixl_weights_close, nixl_weights_model_id, nixl_weights_open,
    nixl_weights_pull_tensor, nixl_weights_tensor_count, nixl_weights_tensor_info,
    nixl_weights_tensor_name, NIXL_WEIGHTS_MAX_DIMS,
};

use std::any::Any;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use nixl_core::{
    Agent, AgentMetadata, BackendName, Desc, DescList, Error, ErrorClass, MemKind, Notification,
    XferOp, XferOptions, XferRequest, XferStatus,
};
use nixl_transports::config::Config;
use nixl_transports::tcp::{fetch_metadata, Auth};
use parking_lot::Mutex;

/// The result of every call: `NIXL_OK`, `NIXL_IN_PROGRESS`, `NIXL_EMPTY`, or a negative error.
pub type nixl_status = i32;

/// Success.
pub const NIXL_OK: nixl_status = 0;
/// The transfer is still moving bytes.
pub const NIXL_IN_PROGRESS: nixl_status = 1;
/// Nothing to return (no notification waiting).
pub const NIXL_EMPTY: nixl_status = 2;
/// A bad argument or malformed input (NULL pointer, bad descriptor, garbage metadata, a
/// request posted while still in flight).
pub const NIXL_ERR_INVALID: nixl_status = -1;
/// An unknown agent, region or backend.
pub const NIXL_ERR_NOT_FOUND: nixl_status = -2;
/// The backend failed (I/O error, protocol error).
pub const NIXL_ERR_BACKEND: nixl_status = -3;
/// The peer went away.
pub const NIXL_ERR_REMOTE_DISCONNECT: nixl_status = -4;
/// Cancelled by the caller or by the agent shutting down.
pub const NIXL_ERR_CANCELLED: nixl_status = -5;
/// No progress within the timeout.
pub const NIXL_ERR_TIMEOUT: nixl_status = -6;
/// The backend cannot run on this host (the reason is in `nixl_last_error`).
pub const NIXL_ERR_UNAVAILABLE: nixl_status = -7;
/// Refused: authentication, region key or bounds.
pub const NIXL_ERR_DENIED: nixl_status = -8;
/// An output buffer is too small; nothing was written or taken.
pub const NIXL_ERR_BUFFER_TOO_SMALL: nixl_status = -9;
/// A bug in the library: the call was aborted safely.
pub const NIXL_ERR_PANIC: nixl_status = -100;

/// Host memory: descriptors are (address, length, 0).
pub const NIXL_DRAM: i32 = 0;
/// GPU memory: descriptors are (device address, length, GPU ordinal).
pub const NIXL_VRAM: i32 = 1;
/// A block device: descriptors are (offset, length, volume id).
pub const NIXL_BLOCK: i32 = 2;
/// An object store: descriptors are (offset, length, object id).
pub const NIXL_OBJECT: i32 = 3;
/// A file: descriptors are (offset, length, fd), the fd opened and kept open by the caller.
pub const NIXL_FILE: i32 = 4;

/// `nixl_register_file`: open with `O_DIRECT` (transfers must then be aligned as the file
/// system requires; a misaligned one is refused at creation, naming the descriptor).
pub const NIXL_FILE_DIRECT: u32 = 1;
/// `nixl_register_file`: open read-only (WRITE requests into it are refused).
pub const NIXL_FILE_READ_ONLY: u32 = 2;
/// `nixl_register_file`: create the file if it does not exist.
pub const NIXL_FILE_CREATE: u32 = 4;

/// Remote to local.
pub const NIXL_READ: i32 = 0;
/// Local to remote.
pub const NIXL_WRITE: i32 = 1;

/// One contiguous piece of memory, file or object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct nixl_desc {
    /// Address (DRAM, VRAM) or byte offset (FILE, BLOCK, OBJECT).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// 0 for DRAM, the GPU ordinal for VRAM, the fd for FILE, the id for BLOCK and OBJECT.
    pub dev_id: u64,
}

const AGENT_MAGIC: u64 = 0x6e69_786c_6167_6e74; // "nixlagnt"
const XFER_MAGIC: u64 = 0x6e69_786c_7866_6572; // "nixlxfer"
const DEAD_MAGIC: u64 = 0xdead_dead_dead_dead;

/// An agent (opaque). Create with `nixl_agent_new`, free with `nixl_agent_free`.
#[derive(Debug)]
pub struct nixl_agent {
    _opaque: [u8; 0],
}

/// A transfer request (opaque): created once, posted many times. It keeps what it needs of its
/// agent alive, so it may outlive `nixl_agent_free` of its agent.
#[derive(Debug)]
pub struct nixl_xfer {
    _opaque: [u8; 0],
}

/// What a `nixl_agent *` points to. The tag says the type in a debugger; calls find out
/// whether a pointer is a live handle of theirs from [`LIVE`], without reading it.
#[repr(C)]
struct AgentHandle {
    magic: u64,
    shared: Arc<Shared>,
}

/// What a `nixl_xfer *` points to.
#[repr(C)]
struct XferHandle {
    magic: u64,
    req: XferRequest,
    _agent: Arc<Shared>,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("nixl_agent")
            .field("name", &self.shared.agent.name())
            .finish()
    }
}

impl std::fmt::Debug for XferHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("nixl_xfer").field("req", &self.req).finish()
    }
}

/// What an agent handle and its requests share.
struct Shared {
    /// Shared with the weight sources opened on it (`nixl_weights_open`).
    agent: Arc<Agent>,
    /// Notifications taken from the agent and not yet handed out by `nixl_notif_next`.
    notifs: Mutex<VecDeque<Notification>>,
    auth: Auth,
    /// Files the agent opened for `nixl_register_file`, by fd; closed on deregistration (and
    /// when the agent goes, after its backends stopped).
    files: Mutex<HashMap<u64, OwnedFd>>,
    /// KV sides open on the agent (`nixl_kv_prefill_new`, `nixl_kv_decode_new`): while any is,
    /// `nixl_notif_next` sets KV messages aside in `kv_pending` for them.
    kv_sides: std::sync::atomic::AtomicUsize,
    /// KV messages `nixl_notif_next` took from the agent, for the KV sides' next poll.
    kv_pending: Mutex<VecDeque<Notification>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let name = self.agent.name().to_owned();
        self.agent.shutdown();
        let mut names = NAMES.lock();
        if let Some(n) = names.get_mut(&name) {
            *n -= 1;
            if *n == 0 {
                names.remove(&name);
            }
        }
    }
}

/// Live agent names of this process and how many agents hold each.
static NAMES: std::sync::LazyLock<Mutex<HashMap<String, usize>>> =
    std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// A failed call: the code returned and the text `nixl_last_error` gives.
struct Fail {
    code: nixl_status,
    msg: String,
}

impl Fail {
    fn new(code: nixl_status, msg: impl Into<String>) -> Fail {
        Fail {
            code,
            msg: msg.into(),
        }
    }

    fn invalid(msg: impl Into<String>) -> Fail {
        Fail::new(NIXL_ERR_INVALID, msg)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::new(code_of(&e), e.to_string())
    }
}

fn code_of(e: &Error) -> nixl_status {
    match e.class() {
        ErrorClass::Invalid => NIXL_ERR_INVALID,
        ErrorClass::NotFound => NIXL_ERR_NOT_FOUND,
        ErrorClass::Backend => NIXL_ERR_BACKEND,
        ErrorClass::RemoteDisconnect => NIXL_ERR_REMOTE_DISCONNECT,
        ErrorClass::Cancelled => NIXL_ERR_CANCELLED,
        ErrorClass::TimedOut => NIXL_ERR_TIMEOUT,
        ErrorClass::Unavailable => NIXL_ERR_UNAVAILABLE,
        ErrorClass::Denied => NIXL_ERR_DENIED,
        // A class added to the core later still reaches C as an error.
        #[allow(unreachable_patterns)]
        _ => NIXL_ERR_BACKEND,
    }
}

type Res<T> = std::result::Result<T, Fail>;

fn set_last_error(msg: &str) {
    // Interior NULs cannot be shown in a C string: replace them.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

fn panic_text(p: &(dyn Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs the body of an export: its error becomes the thread's last error, a panic becomes
/// `NIXL_ERR_PANIC`.
fn guard(f: impl FnOnce() -> Res<nixl_status>) -> nixl_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => code,
        Ok(Err(fail)) => {
            set_last_error(&fail.msg);
            fail.code
        }
        Err(p) => {
            set_last_error(&format!(
                "internal error (a bug; the call was aborted): {}",
                panic_text(&*p)
            ));
            NIXL_ERR_PANIC
        }
    }
}

/// The handles this library has handed out and not freed yet: address -> type tag. Checked
/// before any handle is dereferenced, so a freed or foreign pointer is an error, never a read.
static LIVE: std::sync::LazyLock<parking_lot::RwLock<HashMap<usize, u64>>> =
    std::sync::LazyLock::new(Default::default);

fn not_live(what: &str, magic: u64) -> Fail {
    Fail::invalid(format!(
        "{what} is not a live {} (freed, or another object)",
        match magic {
            AGENT_MAGIC => "nixl_agent",
            weights::WEIGHTS_MAGIC => "nixl_weights",
            kv::PREFILL_MAGIC => "nixl_kv_prefill",
            kv::DECODE_MAGIC => "nixl_kv_decode",
            _ => "nixl_xfer",
        }
    ))
}

/// Records a handle just handed to C as live.
fn hand_out<T>(p: *mut T, magic: u64) {
    LIVE.write().insert(p as usize, magic);
}

/// Takes a handle out of the live set for freeing: `Err` unless it is a live handle of this
/// type, so that of two frees of one handle only the first gets to free it.
fn take_back(p: *const (), what: &str, magic: u64) -> Res<()> {
    let mut live = LIVE.write();
    if live.get(&(p as usize)) != Some(&magic) {
        return Err(not_live(what, magic));
    }
    live.remove(&(p as usize));
    Ok(())
}

/// A reference to a handle, once [`LIVE`] says it is a live handle of this type.
fn tagged<'a, T>(p: *const (), what: &str, magic: u64) -> Res<&'a T> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    if LIVE.read().get(&(p as usize)) != Some(&magic) {
        return Err(not_live(what, magic));
    }
    // SAFETY: a live handle of type T, made by Box::into_raw and not freed (freeing takes it
    // out of LIVE first); the caller does not free it during the call (the API's contract).
    Ok(unsafe { &*p.cast::<T>() })
}

fn agent_ref<'a>(p: *const nixl_agent) -> Res<&'a AgentHandle> {
    let h: &AgentHandle = tagged(p.cast(), "agent", AGENT_MAGIC)?;
    debug_assert_eq!(h.magic, AGENT_MAGIC);
    Ok(h)
}

fn xfer_ref<'a>(p: *const nixl_xfer) -> Res<&'a XferHandle> {
    let h: &XferHandle = tagged(p.cast(), "xfer", XFER_MAGIC)?;
    debug_assert_eq!(h.magic, XFER_MAGIC);
    Ok(h)
}

/// A required C string argument, as UTF-8.
fn str_arg<'a>(p: *const c_char, what: &str) -> Res<&'a str> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL; the caller passes a NUL-terminated string that stays valid for the call.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|_| Fail::invalid(format!("{what} is not UTF-8")))
}

/// `len` bytes at `p`; NULL is accepted for an empty buffer only.
fn bytes_arg<'a>(p: *const u8, len: usize, what: &str) -> Res<&'a [u8]> {
    if p.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(Fail::invalid(format!("{what} is NULL with length {len}")))
        };
    }
    if len > isize::MAX as usize {
        return Err(Fail::invalid(format!("{what}: length {len} is too large")));
    }
    // SAFETY: non-NULL, length within isize::MAX; the caller passes `len` readable bytes that
    // stay valid and unchanged for the call.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A descriptor array: non-NULL, aligned, at least one element.
fn descs_arg(kind: i32, p: *const nixl_desc, count: usize, what: &str) -> Res<DescList> {
    let kind = kind_arg(kind)?;
    if count == 0 {
        return Err(Fail::invalid(format!(
            "{what}: no descriptors (count is 0)"
        )));
    }
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL with count {count}")));
    }
    if !p.is_aligned() {
        return Err(Fail::invalid(format!("{what} is misaligned")));
    }
    if count > isize::MAX as usize / std::mem::size_of::<nixl_desc>() {
        return Err(Fail::invalid(format!("{what}: count {count} is too large")));
    }
    // SAFETY: non-NULL, aligned, size within isize::MAX; the caller passes `count` descriptors
    // that stay valid for the call.
    let s = unsafe { std::slice::from_raw_parts(p, count) };
    let descs: Vec<Desc> = s
        .iter()
        .map(|d| Desc::new(d.addr, d.len, d.dev_id))
        .collect();
    DescList::from_descs(kind, descs).map_err(|e| Fail::new(code_of(&e), format!("{what}: {e}")))
}

fn kind_arg(kind: i32) -> Res<MemKind> {
    u8::try_from(kind)
        .ok()
        .and_then(MemKind::from_code)
        .ok_or_else(|| {
            Fail::invalid(format!(
                "memory kind {kind} is not one of NIXL_DRAM, NIXL_VRAM, NIXL_BLOCK, NIXL_OBJECT, \
                 NIXL_FILE"
            ))
        })
}

/// Checks that `s` and its NUL fit in `cap` bytes at `out`; the write happens in [`put_str`],
/// after everything else of the call succeeded.
fn check_str_out(out: *mut c_char, cap: usize, s: &str, what: &str) -> Res<()> {
    if out.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    if s.len() + 1 > cap {
        return Err(Fail::new(
            NIXL_ERR_BUFFER_TOO_SMALL,
            format!(
                "{what}: {} bytes needed (with the NUL), capacity is {cap}",
                s.len() + 1
            ),
        ));
    }
    Ok(())
}

/// Writes `s` and a NUL to `out`, checked by [`check_str_out`].
fn put_str(out: *mut c_char, s: &str) {
    // SAFETY: `check_str_out` found `out` non-NULL with room for `s.len() + 1` bytes (the
    // caller's `cap`), and `s` is a Rust string that cannot overlap the caller's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), out.cast::<u8>(), s.len());
        *out.add(s.len()) = 0;
    }
}

fn write_out<T>(out: *mut T, v: T, what: &str) -> Res<()> {
    if out.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    if !out.is_aligned() {
        return Err(Fail::invalid(format!("{what} is misaligned")));
    }
    // SAFETY: non-NULL and aligned; the caller passes a writable `T`. `write` does not drop
    // the (possibly uninitialised) old value.
    unsafe { out.write(v) };
    Ok(())
}

fn timeout_arg(ms: i64) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}

fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("NIXL_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
    });
}

/// Creates an agent named `name` (non-empty, UTF-8) and writes it to `*out`.
///
/// `config_toml` NULL means the defaults (backends `local`, `shm`, `tcp`); otherwise a TOML
/// document with the agent's configuration keys (`backends`, `[tcp]`, `[auth]`, `[shm]`,
/// `[agent]`); unknown keys are `NIXL_ERR_INVALID`. A second live agent with the same name in
/// this process is `NIXL_ERR_INVALID` unless `[agent] allow_duplicate_name = true`. Backends
/// that cannot run on this host are left out and reported by `nixl_backend_status`.
/// `NIXL_LOG` (e.g. `NIXL_LOG=info`) in the environment turns on logging to stderr.
///
/// # Safety
/// `name` and `config_toml` are NULL or NUL-terminated strings; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_agent_new(
    name: *const c_char,
    config_toml: *const c_char,
    out: *mut *mut nixl_agent,
) -> nixl_status {
    guard(|| {
        init_logging();
        if out.is_null() {
            return Err(Fail::invalid("out is NULL"));
        }
        let name = str_arg(name, "name")?;
        if name.is_empty() {
            return Err(Fail::invalid("name is empty"));
        }
        let config = if config_toml.is_null() {
            Config::default()
        } else {
            Config::from_toml(str_arg(config_toml, "config_toml")?)?
        };
        {
            let mut names = NAMES.lock();
            let n = names.entry(name.to_owned()).or_insert(0);
            if *n > 0 && !config.agent.allow_duplicate_name {
                return Err(Fail::invalid(format!(
                    "an agent named '{name}' is already live in this process (set [agent] \
                     allow_duplicate_name = true to allow it)"
                )));
            }
            *n += 1;
        }
        let built = config
            .backends()
            .and_then(|b| config.agent_builder(name).backends(b).build());
        let agent = match built {
            Ok(a) => a,
            Err(e) => {
                let mut names = NAMES.lock();
                if let Some(n) = names.get_mut(name) {
                    *n -= 1;
                    if *n == 0 {
                        names.remove(name);
                    }
                }
                return Err(e.into());
            }
        };
        let handle = Box::new(AgentHandle {
            magic: AGENT_MAGIC,
            shared: Arc::new(Shared {
                agent: Arc::new(agent),
                notifs: Mutex::new(VecDeque::new()),
                auth: config.auth(),
                files: Mutex::new(HashMap::new()),
                kv_sides: Default::default(),
                kv_pending: Mutex::new(VecDeque::new()),
            }),
        });
        let p = Box::into_raw(handle);
        write_out(out, p.cast::<nixl_agent>(), "out")?;
        hand_out(p, AGENT_MAGIC);
        Ok(NIXL_OK)
    })
}

/// Frees an agent handle. Transfers still in flight end `NIXL_ERR_CANCELLED`, and the agent
/// shuts down, once its last request (`nixl_xfer`) is freed too. NULL is a no-op.
///
/// # Safety
/// `agent` is NULL or a handle from `nixl_agent_new` not yet freed; no other thread uses it
/// during or after this call.
#[no_mangle]
pub unsafe extern "C" fn nixl_agent_free(agent: *mut nixl_agent) {
    guard(|| {
        if agent.is_null() {
            return Ok(NIXL_OK);
        }
        take_back(agent.cast(), "agent", AGENT_MAGIC)?;
        // SAFETY: a live handle made by `Box::into_raw` in `nixl_agent_new`, given up by the
        // caller, and now out of LIVE, so no later call (a second free included) touches it.
        let mut b = unsafe { Box::from_raw(agent.cast::<AgentHandle>()) };
        b.magic = DEAD_MAGIC;
        drop(b);
        Ok(NIXL_OK)
    });
}

/// Registers `count` descriptors of memory `kind` with every running backend that handles
/// that kind. DRAM descriptors are (address, length, 0); FILE descriptors are (offset, length,
/// fd). The memory must stay allocated until deregistered (or the agent is freed).
///
/// # Safety
/// `descs` points to `count` descriptors; DRAM and VRAM descriptors name memory that stays
/// allocated, readable and writable until it is deregistered, and that peers may read and
/// write at any time while it is registered.
#[no_mangle]
pub unsafe extern "C" fn nixl_register(
    agent: *mut nixl_agent,
    kind: i32,
    descs: *const nixl_desc,
    count: usize,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let list = descs_arg(kind, descs, count, "descs")?;
        // SAFETY: the caller's contract (above) is `Agent::register`'s.
        let reg = unsafe { a.shared.agent.register(&list) }?;
        // Regions stay registered until nixl_deregister or the agent goes.
        reg.forget();
        Ok(NIXL_OK)
    })
}

/// Deregisters regions by the exact descriptors they were registered with, waiting for
/// transfers that still use them. A descriptor not registered is `NIXL_ERR_NOT_FOUND` (the
/// ones before it in the array are deregistered).
///
/// # Safety
/// `descs` points to `count` descriptors.
#[no_mangle]
pub unsafe extern "C" fn nixl_deregister(
    agent: *mut nixl_agent,
    kind: i32,
    descs: *const nixl_desc,
    count: usize,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let list = descs_arg(kind, descs, count, "descs")?;
        for d in list.descs() {
            a.shared
                .agent
                .deregister(list.kind(), std::slice::from_ref(d))?;
            if list.kind() == MemKind::File {
                // A file this library opened (nixl_register_file) is closed with its region.
                a.shared.files.lock().remove(&d.dev_id);
            }
        }
        Ok(NIXL_OK)
    })
}

/// Opens the file at `path` and registers `[offset, offset + len)` of it as a FILE region
/// (`len` 0: up to the file's current end, which must then be past `offset`). `flags` is a
/// combination of `NIXL_FILE_DIRECT`, `NIXL_FILE_READ_ONLY` and `NIXL_FILE_CREATE` (0: an
/// existing file, read-write, buffered). Writes the descriptor to use in transfers,
/// `(offset, len, fd)`, to `*out`. The agent owns the fd: `nixl_deregister` of that descriptor
/// closes it. A missing file is `NIXL_ERR_NOT_FOUND`; a file the process may not open is
/// `NIXL_ERR_DENIED`.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_register_file(
    agent: *mut nixl_agent,
    path: *const c_char,
    offset: u64,
    len: u64,
    flags: u32,
    out: *mut nixl_desc,
) -> nixl_status {
    guard(|| {
        use std::os::unix::fs::OpenOptionsExt;
        let a = agent_ref(agent)?;
        let path = str_arg(path, "path")?;
        if out.is_null() || !out.is_aligned() {
            return Err(Fail::invalid("out is NULL or misaligned"));
        }
        let known = NIXL_FILE_DIRECT | NIXL_FILE_READ_ONLY | NIXL_FILE_CREATE;
        if flags & !known != 0 {
            return Err(Fail::invalid(format!(
                "flags {flags:#x}: unknown bits {:#x}",
                flags & !known
            )));
        }
        let read_only = flags & NIXL_FILE_READ_ONLY != 0;
        let mut o = std::fs::OpenOptions::new();
        o.read(true)
            .write(!read_only)
            .create(!read_only && flags & NIXL_FILE_CREATE != 0);
        if flags & NIXL_FILE_DIRECT != 0 {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path).map_err(|e| {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => NIXL_ERR_NOT_FOUND,
                std::io::ErrorKind::PermissionDenied => NIXL_ERR_DENIED,
                _ => NIXL_ERR_INVALID,
            };
            Fail::new(code, format!("opening {path}: {e}"))
        })?;
        let len = if len == 0 {
            let size = file
                .metadata()
                .map_err(|e| Fail::new(NIXL_ERR_BACKEND, format!("stat {path}: {e}")))?
                .len();
            if size <= offset {
                return Err(Fail::invalid(format!(
                    "{path} is {size} bytes: nothing past offset {offset} to register (give a \
                     length to register a range to be written)"
                )));
            }
            size - offset
        } else {
            len
        };
        let fd: OwnedFd = file.into();
        let desc = Desc::new(offset, len, fd.as_raw_fd() as u64);
        let list = DescList::from_descs(MemKind::File, vec![desc])
            .map_err(|e| Fail::new(code_of(&e), e.to_string()))?;
        // SAFETY: FILE descriptors carry no memory contract.
        let reg = unsafe { a.shared.agent.register(&list) }?;
        reg.forget();
        a.shared.files.lock().insert(desc.dev_id, fd);
        write_out(
            out,
            nixl_desc {
                addr: desc.addr,
                len: desc.len,
                dev_id: desc.dev_id,
            },
            "out",
        )?;
        Ok(NIXL_OK)
    })
}

/// Writes a copy of the agent's metadata (its backends' connection info and its registered
/// regions) to `*md` and `*md_len`. Free it with `nixl_bytes_free`.
///
/// # Safety
/// `md` and `md_len` are writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_local_md(
    agent: *mut nixl_agent,
    md: *mut *mut u8,
    md_len: *mut usize,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        if md.is_null() || md_len.is_null() {
            return Err(Fail::invalid("md or md_len is NULL"));
        }
        let bytes = a.shared.agent.metadata_bytes();
        // SAFETY: plain allocation of at least one byte; checked for NULL below.
        let p = unsafe { libc::malloc(bytes.len().max(1)) }.cast::<u8>();
        if p.is_null() {
            return Err(Fail::new(
                NIXL_ERR_BACKEND,
                format!("out of memory for {} bytes of metadata", bytes.len()),
            ));
        }
        // SAFETY: `p` was just allocated with room for `bytes.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
        if let Err(e) = write_out(md_len, bytes.len(), "md_len").and(write_out(md, p, "md")) {
            // SAFETY: allocated above with malloc and not handed out.
            unsafe { libc::free(p.cast()) };
            return Err(e);
        }
        Ok(NIXL_OK)
    })
}

/// Frees bytes returned by this library (`nixl_local_md`). NULL is a no-op; `len` is not used.
///
/// # Safety
/// `bytes` is NULL or came from this library and was not freed yet.
#[no_mangle]
pub unsafe extern "C" fn nixl_bytes_free(bytes: *mut u8, len: usize) {
    let _ = len;
    // SAFETY: the caller passes NULL or a pointer this library allocated with malloc.
    unsafe { libc::free(bytes.cast()) };
}

/// Loads a peer's metadata (from its `nixl_local_md`) and writes the peer's name,
/// NUL-terminated, to `name_out`. Garbage or truncated metadata is `NIXL_ERR_INVALID`; a
/// `name_out` too small is `NIXL_ERR_BUFFER_TOO_SMALL`, and then nothing is loaded. A newer
/// instance or generation of the peer replaces what was loaded; an older one is refused.
///
/// # Safety
/// `md` points to `md_len` readable bytes; `name_out` to `name_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_load_remote_md(
    agent: *mut nixl_agent,
    md: *const u8,
    md_len: usize,
    name_out: *mut c_char,
    name_cap: usize,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let bytes = bytes_arg(md, md_len, "md")?;
        load_md(a, bytes, name_out, name_cap)
    })
}

fn load_md(a: &AgentHandle, bytes: &[u8], name_out: *mut c_char, name_cap: usize) -> Res<i32> {
    let md = AgentMetadata::decode(bytes).map_err(|e| Fail::invalid(format!("metadata: {e}")))?;
    let name = md.name.clone();
    check_str_out(name_out, name_cap, &name, "name_out")?;
    a.shared.agent.load_remote_md(md)?;
    put_str(name_out, &name);
    Ok(NIXL_OK)
}

/// Fetches a peer's metadata from its `tcp` listener at `addr` ("HOST:PORT", as in its
/// `[tcp] listen`), authenticated with this agent's `[auth]` settings, and loads it as
/// `nixl_load_remote_md` does. `timeout_ms` < 0 means 5 seconds.
///
/// # Safety
/// `addr` is a NUL-terminated string; `name_out` points to `name_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_fetch_remote_md(
    agent: *mut nixl_agent,
    addr: *const c_char,
    timeout_ms: i64,
    name_out: *mut c_char,
    name_cap: usize,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let addr = str_arg(addr, "addr")?;
        if name_out.is_null() {
            return Err(Fail::invalid("name_out is NULL"));
        }
        let timeout = timeout_arg(timeout_ms).unwrap_or(Duration::from_secs(5));
        let bytes = fetch_metadata(addr, &a.shared.auth, timeout)?;
        load_md(a, &bytes, name_out, name_cap)
    })
}

/// Names object `id` of the `object` backend: OBJECT descriptors `(offset, len, id)` then
/// stand for `name` ("bucket/key"), for requests created from now on. (Without a name, `id`
/// is `{key_prefix}{id}` in the configured `[object] bucket`.) `NIXL_ERR_UNAVAILABLE` if the
/// agent runs no `object` backend.
///
/// # Safety
/// `name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nixl_object_name(
    agent: *mut nixl_agent,
    id: u64,
    name: *const c_char,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let name = str_arg(name, "name")?;
        nixl_transports::object::name_object(&a.shared.agent, id, name)?;
        Ok(NIXL_OK)
    })
}

/// Forgets a peer: its connections close and its transfers fail from then on.
/// `NIXL_ERR_NOT_FOUND` if no such peer is loaded.
///
/// # Safety
/// `remote_name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nixl_invalidate_remote(
    agent: *mut nixl_agent,
    remote_name: *const c_char,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let name = str_arg(remote_name, "remote_name")?;
        a.shared.agent.invalidate_remote(name)?;
        Ok(NIXL_OK)
    })
}

/// A backend name from C: unknown is NOT_FOUND (the core decides about known ones).
fn backend_arg(name: &str) -> Res<BackendName> {
    BackendName::parse(name).ok_or_else(|| {
        let known: Vec<&str> = BackendName::ALL.iter().map(|b| b.as_str()).collect();
        Fail::new(
            NIXL_ERR_NOT_FOUND,
            format!("unknown backend '{name}' (known: {})", known.join(", ")),
        )
    })
}

/// Creates a transfer request of `op` (`NIXL_READ`: remote to local, `NIXL_WRITE`: local to
/// remote) between `local` and `remote` descriptors (same count, same lengths pairwise) of the
/// peer `remote_name` (the agent's own name for storage and local copies). Every descriptor is
/// checked here against the registrations of both sides. `notif` (NULL for none) is delivered
/// to the peer after the data of each post has landed. `backend` NULL lets the policy choose;
/// a name forces that backend (`NIXL_ERR_NOT_FOUND` if unknown, `NIXL_ERR_UNAVAILABLE` if it
/// cannot run). Free the request with `nixl_xfer_free`.
///
/// # Safety
/// `local` and `remote` point to their counts of descriptors; `remote_name` and `backend` are
/// NUL-terminated strings (`backend` may be NULL); `notif` points to `notif_len` bytes or is
/// NULL; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_create(
    agent: *mut nixl_agent,
    op: i32,
    local_kind: i32,
    local: *const nixl_desc,
    local_count: usize,
    remote_kind: i32,
    remote: *const nixl_desc,
    remote_count: usize,
    remote_name: *const c_char,
    notif: *const u8,
    notif_len: usize,
    backend: *const c_char,
    out: *mut *mut nixl_xfer,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        if out.is_null() {
            return Err(Fail::invalid("out is NULL"));
        }
        let op = match op {
            NIXL_READ => XferOp::Read,
            NIXL_WRITE => XferOp::Write,
            o => {
                return Err(Fail::invalid(format!(
                    "op {o} is not NIXL_READ or NIXL_WRITE"
                )))
            }
        };
        let local = descs_arg(local_kind, local, local_count, "local")?;
        let remote = descs_arg(remote_kind, remote, remote_count, "remote")?;
        let peer = str_arg(remote_name, "remote_name")?;
        let notif = if notif.is_null() {
            if notif_len > 0 {
                return Err(Fail::invalid(format!(
                    "notif is NULL with length {notif_len}"
                )));
            }
            None
        } else {
            Some(bytes_arg(notif, notif_len, "notif")?.to_vec())
        };
        let backend = if backend.is_null() {
            None
        } else {
            Some(backend_arg(str_arg(backend, "backend")?)?)
        };
        let opts = XferOptions {
            notif,
            backend,
            deadline: None,
        };
        let req = a
            .shared
            .agent
            .create_xfer(op, &local, &remote, peer, opts)?;
        let x = Box::new(XferHandle {
            magic: XFER_MAGIC,
            req,
            _agent: Arc::clone(&a.shared),
        });
        let p = Box::into_raw(x);
        write_out(out, p.cast::<nixl_xfer>(), "out")?;
        hand_out(p, XFER_MAGIC);
        Ok(NIXL_OK)
    })
}

fn status_code(st: XferStatus) -> Res<nixl_status> {
    match st {
        XferStatus::Idle => Err(Fail::invalid("the request was never posted")),
        XferStatus::InProgress => Ok(NIXL_IN_PROGRESS),
        XferStatus::Done => Ok(NIXL_OK),
        XferStatus::Failed(e) => Err(e.into()),
        XferStatus::Cancelled => Err(Fail::new(NIXL_ERR_CANCELLED, "the transfer was cancelled")),
        XferStatus::TimedOut => Err(Fail::new(NIXL_ERR_TIMEOUT, "the transfer timed out")),
    }
}

/// Starts one execution of the request: `NIXL_OK` if it completed inline, `NIXL_IN_PROGRESS`
/// if not (poll `nixl_xfer_status` or block in `nixl_xfer_wait`), or the error. Posting a
/// request still in flight is `NIXL_ERR_INVALID`; a request that ended may be posted again.
///
/// # Safety
/// `xfer` is NULL or a live request.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_post(xfer: *mut nixl_xfer) -> nixl_status {
    guard(|| {
        let x = xfer_ref(xfer)?;
        x.req.post()?;
        status_code(x.req.status())
    })
}

/// Where the request's last post stands: `NIXL_IN_PROGRESS`, `NIXL_OK`, or its terminal
/// error (`NIXL_ERR_INVALID` if it was never posted).
///
/// # Safety
/// `xfer` is NULL or a live request.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_status(xfer: *mut nixl_xfer) -> nixl_status {
    guard(|| status_code(xfer_ref(xfer)?.req.status()))
}

/// Blocks until the post in flight ends or `timeout_ms` passes (< 0: no limit), then returns
/// what `nixl_xfer_status` would (`NIXL_IN_PROGRESS` if the time ran out first).
///
/// # Safety
/// `xfer` is NULL or a live request.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_wait(xfer: *mut nixl_xfer, timeout_ms: i64) -> nixl_status {
    guard(|| {
        let x = xfer_ref(xfer)?;
        status_code(x.req.wait_blocking(timeout_arg(timeout_ms)))
    })
}

/// Cancels the post in flight: it ends `NIXL_ERR_CANCELLED` unless it had already ended.
/// Returns at once; `nixl_xfer_free` is what waits until no backend touches the memory.
///
/// # Safety
/// `xfer` is NULL or a live request.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_cancel(xfer: *mut nixl_xfer) -> nixl_status {
    guard(|| {
        xfer_ref(xfer)?.req.cancel();
        Ok(NIXL_OK)
    })
}

/// Writes the name of the backend that carries the request ("shm", "tcp", ...) to `out`.
///
/// # Safety
/// `xfer` is NULL or a live request; `out` points to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_backend(
    xfer: *const nixl_xfer,
    out: *mut c_char,
    cap: usize,
) -> nixl_status {
    guard(|| {
        let x = xfer_ref(xfer)?;
        let name = x.req.backend().as_str();
        check_str_out(out, cap, name, "out")?;
        put_str(out, name);
        Ok(NIXL_OK)
    })
}

/// Writes the name of the backend whose stager copies the request's device memory through
/// host memory ("cuda") to `out`, or an empty string when the request moves its memory directly.
/// A staged request is slower than a direct one: engines that must not fall back silently check
/// this after `nixl_xfer_create`.
///
/// # Safety
/// `xfer` is NULL or a live request; `out` points to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_staged(
    xfer: *const nixl_xfer,
    out: *mut c_char,
    cap: usize,
) -> nixl_status {
    guard(|| {
        let x = xfer_ref(xfer)?;
        let name = x.req.info().staged.map_or("", |b| b.as_str());
        check_str_out(out, cap, name, "out")?;
        put_str(out, name);
        Ok(NIXL_OK)
    })
}

/// Frees a request. A post still in flight is cancelled, and the call returns only when no
/// backend will touch the request's memory again (a backend that cannot stop at once lets go
/// within its own timeouts). NULL is a no-op.
///
/// # Safety
/// `xfer` is NULL or a live request that no other thread uses during or after this call.
#[no_mangle]
pub unsafe extern "C" fn nixl_xfer_free(xfer: *mut nixl_xfer) -> nixl_status {
    guard(|| {
        if xfer.is_null() {
            return Ok(NIXL_OK);
        }
        take_back(xfer.cast(), "xfer", XFER_MAGIC)?;
        // SAFETY: a live handle made by `Box::into_raw` in `nixl_xfer_create`, given up by the
        // caller, and now out of LIVE, so no later call (a second free included) touches it.
        let mut b = unsafe { Box::from_raw(xfer.cast::<XferHandle>()) };
        b.magic = DEAD_MAGIC;
        b.req.release();
        drop(b);
        Ok(NIXL_OK)
    })
}

/// Sends `len` bytes to the peer as a standalone notification, over the best backend that
/// carries notifications to it.
///
/// # Safety
/// `remote_name` is a NUL-terminated string; `msg` points to `len` bytes (NULL if `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn nixl_notif_send(
    agent: *mut nixl_agent,
    remote_name: *const c_char,
    msg: *const u8,
    len: usize,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let peer = str_arg(remote_name, "remote_name")?;
        let msg = bytes_arg(msg, len, "msg")?;
        a.shared.agent.send_notif(peer, msg)?;
        Ok(NIXL_OK)
    })
}

/// Takes the oldest notification received: writes the sender's name (NUL-terminated) to
/// `from`, the message to `msg` and its length to `*msg_len`, and returns `NIXL_OK`; or
/// returns `NIXL_EMPTY` when there is none. When `from` or `msg` is too small it returns
/// `NIXL_ERR_BUFFER_TOO_SMALL`, sets `*msg_len` to the message's length, and keeps the
/// message. `msg` may be NULL when `msg_cap` is 0 (to learn the length).
///
/// # Safety
/// `from` points to `from_cap` writable bytes, `msg` to `msg_cap`, `msg_len` to a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn nixl_notif_next(
    agent: *mut nixl_agent,
    from: *mut c_char,
    from_cap: usize,
    msg: *mut u8,
    msg_cap: usize,
    msg_len: *mut usize,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        if msg_len.is_null() || !msg_len.is_aligned() {
            return Err(Fail::invalid("msg_len is NULL or misaligned"));
        }
        if msg.is_null() && msg_cap > 0 {
            return Err(Fail::invalid(format!(
                "msg is NULL with capacity {msg_cap}"
            )));
        }
        if from.is_null() {
            return Err(Fail::invalid("from is NULL"));
        }
        let mut q = a.shared.notifs.lock();
        if q.is_empty() {
            let got = a.shared.agent.take_notifs();
            q.extend(not_kv(&a.shared, got));
        }
        let Some(n) = q.front() else {
            return Ok(NIXL_EMPTY);
        };
        let need = n.msg.len();
        let too_small = if n.from.len() + 1 > from_cap {
            Some(format!(
                "from: {} bytes needed for the sender's name, capacity is {from_cap}",
                n.from.len() + 1
            ))
        } else if need > msg_cap {
            Some(format!("msg: {need} bytes needed, capacity is {msg_cap}"))
        } else {
            None
        };
        if let Some(why) = too_small {
            // SAFETY: checked non-NULL and aligned above; the caller passes a writable size_t.
            unsafe { msg_len.write(need) };
            return Err(Fail::new(NIXL_ERR_BUFFER_TOO_SMALL, why));
        }
        let Some(n) = q.pop_front() else {
            return Ok(NIXL_EMPTY);
        };
        drop(q);
        put_str(from, &n.from);
        if need > 0 {
            // SAFETY: `msg` is non-NULL (need > 0 and need <= msg_cap, and NULL only goes with
            // a capacity of 0) with room for `msg_cap >= need` bytes.
            unsafe { std::ptr::copy_nonoverlapping(n.msg.as_ptr(), msg, need) };
        }
        // SAFETY: checked non-NULL and aligned above.
        unsafe { msg_len.write(need) };
        Ok(NIXL_OK)
    })
}

/// The notifications of `got` that are not KV messages; while a KV side is open on the agent,
/// its messages are set aside in `kv_pending` for it (it reads them at its next poll).
fn not_kv(s: &Shared, got: Vec<Notification>) -> Vec<Notification> {
    if got.is_empty() || s.kv_sides.load(std::sync::atomic::Ordering::Acquire) == 0 {
        return got;
    }
    let (kv, other): (Vec<_>, Vec<_>) = got
        .into_iter()
        .partition(|n| n.msg.starts_with(nixl_kv::handoff::MAGIC));
    if !kv.is_empty() {
        s.kv_pending.lock().extend(kv);
    }
    other
}

/// Waits up to `timeout_ms` (< 0: no limit) for a notification: `NIXL_OK` when one is ready
/// for `nixl_notif_next`, `NIXL_EMPTY` when the time ran out. While a KV side is open on the
/// agent, its messages do not count (`nixl_notif_next` would not hand them out).
///
/// # Safety
/// `agent` is NULL or a live agent.
#[no_mangle]
pub unsafe extern "C" fn nixl_notif_wait(agent: *mut nixl_agent, timeout_ms: i64) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let start = Instant::now();
        let limit = timeout_arg(timeout_ms);
        loop {
            {
                let mut q = a.shared.notifs.lock();
                if q.is_empty() {
                    let got = a.shared.agent.take_notifs();
                    q.extend(not_kv(&a.shared, got));
                }
                if !q.is_empty() {
                    return Ok(NIXL_OK);
                }
            }
            let left = match limit {
                Some(l) => l.saturating_sub(start.elapsed()),
                None => Duration::from_secs(1),
            };
            if left.is_zero() {
                return Ok(NIXL_EMPTY);
            }
            // Taken without the queue's lock, so nixl_notif_next is not held up meanwhile.
            let got = a.shared.agent.wait_notifs(left.min(Duration::from_secs(1)));
            // Ready only for what nixl_notif_next will hand out: not a KV side's message.
            let got = not_kv(&a.shared, got);
            if !got.is_empty() {
                a.shared.notifs.lock().extend(got);
                return Ok(NIXL_OK);
            }
        }
    })
}

/// Writes the agent's name (NUL-terminated) to `out`.
///
/// # Safety
/// `out` points to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_agent_name(
    agent: *const nixl_agent,
    out: *mut c_char,
    cap: usize,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let name = a.shared.agent.name();
        check_str_out(out, cap, name, "out")?;
        put_str(out, name);
        Ok(NIXL_OK)
    })
}

/// Whether the agent runs `backend`: `NIXL_OK`; `NIXL_ERR_UNAVAILABLE` with the reason in
/// `nixl_last_error` (no GPU, no RDMA device, not configured); `NIXL_ERR_NOT_FOUND` for a name
/// this library does not know.
///
/// # Safety
/// `backend` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nixl_backend_status(
    agent: *const nixl_agent,
    backend: *const c_char,
) -> nixl_status {
    guard(|| {
        let a = agent_ref(agent)?;
        let name = str_arg(backend, "backend")?;
        a.shared.agent.check_backend(backend_arg(name)?)?;
        Ok(NIXL_OK)
    })
}

/// The calling thread's last error text: never NULL, "" before any error. Valid until this
/// thread's next call into the library. Successful calls leave it as it was.
#[no_mangle]
pub extern "C" fn nixl_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|l| l.borrow().as_ptr())
        .unwrap_or(c"(thread is exiting)".as_ptr())
}

/// The name of a status code ("NIXL_OK", "NIXL_ERR_INVALID", ...), or "NIXL_UNKNOWN_STATUS".
/// The string is static.
#[no_mangle]
pub extern "C" fn nixl_status_str(status: nixl_status) -> *const c_char {
    let s = match status {
        NIXL_OK => c"NIXL_OK",
        NIXL_IN_PROGRESS => c"NIXL_IN_PROGRESS",
        NIXL_EMPTY => c"NIXL_EMPTY",
        NIXL_ERR_INVALID => c"NIXL_ERR_INVALID",
        NIXL_ERR_NOT_FOUND => c"NIXL_ERR_NOT_FOUND",
        NIXL_ERR_BACKEND => c"NIXL_ERR_BACKEND",
        NIXL_ERR_REMOTE_DISCONNECT => c"NIXL_ERR_REMOTE_DISCONNECT",
        NIXL_ERR_CANCELLED => c"NIXL_ERR_CANCELLED",
        NIXL_ERR_TIMEOUT => c"NIXL_ERR_TIMEOUT",
        NIXL_ERR_UNAVAILABLE => c"NIXL_ERR_UNAVAILABLE",
        NIXL_ERR_DENIED => c"NIXL_ERR_DENIED",
        NIXL_ERR_BUFFER_TOO_SMALL => c"NIXL_ERR_BUFFER_TOO_SMALL",
        NIXL_ERR_PANIC => c"NIXL_ERR_PANIC",
        _ => c"NIXL_UNKNOWN_STATUS",
    };
    s.as_ptr()
}

/// The library's version ("0.1.0"), static.
#[no_mangle]
pub extern "C" fn nixl_version() -> *const c_char {
    static V: std::sync::LazyLock<CString> =
        std::sync::LazyLock::new(|| CString::new(env!("CARGO_PKG_VERSION")).unwrap_or_default());
    V.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: nixl_last_error never returns NULL, and the string lives until this thread's
        // next call into the library.
        unsafe { CStr::from_ptr(nixl_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_is_a_status_and_a_message() {
        let code = guard(|| panic!("boom {}", 42));
        assert_eq!(code, NIXL_ERR_PANIC);
        assert!(last_error().contains("boom 42"), "{}", last_error());
        let code = guard(|| std::panic::panic_any(7u32));
        assert_eq!(code, NIXL_ERR_PANIC);
        assert!(last_error().contains("no message"));
    }

    #[test]
    fn last_error_is_per_thread_and_kept_across_successes() {
        assert_eq!(guard(|| Err(Fail::invalid("mine"))), NIXL_ERR_INVALID);
        std::thread::spawn(|| {
            assert_eq!(last_error(), "");
            assert_eq!(guard(|| Err(Fail::invalid("theirs\0x"))), NIXL_ERR_INVALID);
            assert_eq!(last_error(), "theirs\\0x");
        })
        .join()
        .unwrap();
        assert_eq!(guard(|| Ok(NIXL_OK)), NIXL_OK);
        assert_eq!(last_error(), "mine");
    }

    #[test]
    fn every_status_has_its_name() {
        for (code, name) in [
            (NIXL_OK, "NIXL_OK"),
            (NIXL_IN_PROGRESS, "NIXL_IN_PROGRESS"),
            (NIXL_EMPTY, "NIXL_EMPTY"),
            (NIXL_ERR_INVALID, "NIXL_ERR_INVALID"),
            (NIXL_ERR_NOT_FOUND, "NIXL_ERR_NOT_FOUND"),
            (NIXL_ERR_BACKEND, "NIXL_ERR_BACKEND"),
            (NIXL_ERR_REMOTE_DISCONNECT, "NIXL_ERR_REMOTE_DISCONNECT"),
            (NIXL_ERR_CANCELLED, "NIXL_ERR_CANCELLED"),
            (NIXL_ERR_TIMEOUT, "NIXL_ERR_TIMEOUT"),
            (NIXL_ERR_UNAVAILABLE, "NIXL_ERR_UNAVAILABLE"),
            (NIXL_ERR_DENIED, "NIXL_ERR_DENIED"),
            (NIXL_ERR_BUFFER_TOO_SMALL, "NIXL_ERR_BUFFER_TOO_SMALL"),
            (NIXL_ERR_PANIC, "NIXL_ERR_PANIC"),
            (12345, "NIXL_UNKNOWN_STATUS"),
        ] {
            // SAFETY: static NUL-terminated strings.
            let got = unsafe { CStr::from_ptr(nixl_status_str(code)) };
            assert_eq!(got.to_str().unwrap(), name);
        }
    }

    #[test]
    fn error_classes_map_to_the_contract_codes() {
        let cases: [(Error, nixl_status); 9] = [
            (Error::InvalidArgument("x".into()), NIXL_ERR_INVALID),
            (Error::UnknownPeer("p".into()), NIXL_ERR_NOT_FOUND),
            (Error::TimedOut, NIXL_ERR_TIMEOUT),
            (Error::Cancelled, NIXL_ERR_CANCELLED),
            (
                Error::Unavailable {
                    backend: BackendName::Cuda,
                    reason: "no libcuda".into(),
                },
                NIXL_ERR_UNAVAILABLE,
            ),
            (
                Error::RemoteDisconnect {
                    peer: "p".into(),
                    reason: "gone".into(),
                },
                NIXL_ERR_REMOTE_DISCONNECT,
            ),
            (
                Error::Backend {
                    backend: BackendName::Tcp,
                    op: "write",
                    reason: "x".into(),
                },
                NIXL_ERR_BACKEND,
            ),
            (Error::InFlight, NIXL_ERR_INVALID),
            (
                Error::Denied {
                    peer: "p".into(),
                    reason: "bounds".into(),
                },
                NIXL_ERR_DENIED,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(code_of(&e), code, "{e}");
        }
    }
}
