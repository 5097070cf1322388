//! A minimal verbs binding, loaded at run time, and a thin safe layer over it.
//!
//! Every `unsafe` of the `rdma` backend but one lives in this folder (the other is the
//! registration of agent memory in `mod.rs`, whose contract is the agent's). The raw layer
//! is hand-written `repr(C)` structs for exactly the fields the backend uses, checked against
//! `<infiniband/verbs.h>` by the `verbs_layout` test (a C program prints `sizeof`/`offsetof`
//! of each and the test compares them with [`layout`]). Structs the backend only reads through
//! pointers that libibverbs hands out (`ibv_context`, `ibv_cq`, `ibv_qp`) are declared as
//! their leading fields only; structs the backend allocates and passes in are complete.
//!
//! The data path (`ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`) is `static inline` in
//! verbs.h: it is called here through `context->ops`, exactly as the inline functions do.
//!
//! The safe layer follows the ownership of the verbs objects: each is an `Owned` pointer with
//! its destroy call, holding its parent ([`Mr`] and [`Qp`] hold the [`Pd`], the [`Pd`] and
//! [`Cq`] hold the [`Context`], a [`Qp`] holds its [`Cq`]), and is destroyed before the parent
//! is let go, so teardown runs in dependency order whatever the order of the last drops. `Drop`
//! never panics: a failing destroy is logged and counted.
//!
//! Files: `sys` (the raw layer), this file (loading the library, errors), `objects` (context,
//! PD, MR, buffers, CQ), `qp` (queue pairs and posting).

mod objects;
mod qp;
pub(crate) mod sys;
#[cfg(test)]
mod tests;

pub(crate) use objects::*;
pub(crate) use qp::*;
pub(crate) use sys::*;

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::fmt;
use std::sync::Arc;

use libloading::Library;

/// The library name loaded by [`Verbs::load`].
pub(crate) const LIBIBVERBS: &str = "libibverbs.so.1";

/// The entry points of libibverbs, resolved once.
struct Fns {
    get_device_list: GetDeviceList,
    free_device_list: FreeDeviceList,
    get_device_name: GetDeviceName,
    get_device_guid: GetDeviceGuid,
    open_device: OpenDevice,
    close_device: CloseDevice,
    query_device: QueryDevice,
    query_port: QueryPort,
    query_gid: QueryGid,
    alloc_pd: AllocPd,
    dealloc_pd: DeallocPd,
    reg_mr: RegMr,
    reg_dmabuf_mr: Option<RegDmabufMr>,
    dereg_mr: DeregMr,
    create_cq: CreateCq,
    destroy_cq: DestroyCq,
    create_qp: CreateQp,
    modify_qp: ModifyQp,
    destroy_qp: DestroyQp,
    wc_status_str: WcStatusStr,
}

/// libibverbs, loaded at run time.
pub(crate) struct Verbs {
    fns: Fns,
    // Last: the function pointers above point into it.
    _lib: Library,
}

impl fmt::Debug for Verbs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verbs")
            .field("dmabuf", &self.fns.reg_dmabuf_mr.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a verbs call failed: the call and errno.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VerbsError {
    /// The verbs function.
    pub call: &'static str,
    /// Its description of the failure.
    pub reason: String,
}

impl fmt::Display for VerbsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.call, self.reason)
    }
}

impl std::error::Error for VerbsError {}

fn errno_err(call: &'static str) -> VerbsError {
    let e = std::io::Error::last_os_error();
    let hint = e.raw_os_error().and_then(|n| {
        if call.starts_with("ibv_reg") {
            crate::limits::memlock_hint(n)
        } else {
            None
        }
    });
    VerbsError {
        call,
        reason: match hint {
            Some(h) => format!("{e}: {h}"),
            None => e.to_string(),
        },
    }
}

/// A failed `ibv_post_send` of a chain: how many work requests were posted before the refused
/// one (they are on the send queue and will complete), and why.
#[derive(Clone, Debug)]
pub(crate) struct PostError {
    /// Work requests at the head of the chain that were posted.
    pub posted: usize,
    /// The provider's error.
    pub err: VerbsError,
}

impl fmt::Display for PostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (after {} posted)", self.err, self.posted)
    }
}

impl std::error::Error for PostError {}

/// How many work requests of a chain of `n` starting at `base` come before `bad` (the
/// provider's `bad_wr`). A null or foreign `bad` counts as nothing posted (the safe reading:
/// the caller then fails every request and moves the QP to the error state, so whatever was in
/// fact posted completes with a flush).
pub(crate) fn posted_before(base: *const IbvSendWr, bad: *const IbvSendWr, n: usize) -> usize {
    let (b, x) = (base as usize, bad as usize);
    let size = std::mem::size_of::<IbvSendWr>();
    if bad.is_null() || x < b || (x - b) % size != 0 {
        return 0;
    }
    ((x - b) / size).min(n)
}

fn rc_err(call: &'static str, rc: c_int) -> VerbsError {
    // Verbs calls return either -1 with errno, or a positive errno value.
    let e = if rc > 0 {
        std::io::Error::from_raw_os_error(rc)
    } else {
        std::io::Error::last_os_error()
    };
    VerbsError {
        call,
        reason: e.to_string(),
    }
}

/// Result of a verbs call.
pub(crate) type VResult<T> = std::result::Result<T, VerbsError>;

impl Verbs {
    /// Loads the library of that name (tests point it at a name that does not exist).
    pub(crate) fn load_from(name: &str) -> std::result::Result<Arc<Verbs>, String> {
        // SAFETY: loading libibverbs runs its constructors, which only initialise the library's
        // own state (no requirement on the caller); a library of another name is the caller's
        // (test's) choice and is only looked up, never called, unless it exports these symbols.
        let lib = unsafe { Library::new(name) }.map_err(|e| format!("{name} not found: {e}"))?;
        macro_rules! sym {
            ($name:literal) => {{
                // SAFETY: the symbol is declared with the C prototype from verbs.h (checked by the
                // layout test); the copied pointer is used only while `_lib` is alive (same struct).
                let s = unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("{name} lacks {}: {e}", $name))?;
                *s
            }};
        }
        // SAFETY: as for `sym!`; the symbol is optional (rdma-core 34+).
        let dmabuf = unsafe { lib.get::<RegDmabufMr>(b"ibv_reg_dmabuf_mr\0") }
            .ok()
            .map(|s| *s);
        let fns = Fns {
            get_device_list: sym!("ibv_get_device_list"),
            free_device_list: sym!("ibv_free_device_list"),
            get_device_name: sym!("ibv_get_device_name"),
            get_device_guid: sym!("ibv_get_device_guid"),
            open_device: sym!("ibv_open_device"),
            close_device: sym!("ibv_close_device"),
            query_device: sym!("ibv_query_device"),
            query_port: sym!("ibv_query_port"),
            query_gid: sym!("ibv_query_gid"),
            alloc_pd: sym!("ibv_alloc_pd"),
            dealloc_pd: sym!("ibv_dealloc_pd"),
            reg_mr: sym!("ibv_reg_mr"),
            reg_dmabuf_mr: dmabuf,
            dereg_mr: sym!("ibv_dereg_mr"),
            create_cq: sym!("ibv_create_cq"),
            destroy_cq: sym!("ibv_destroy_cq"),
            create_qp: sym!("ibv_create_qp"),
            modify_qp: sym!("ibv_modify_qp"),
            destroy_qp: sym!("ibv_destroy_qp"),
            wc_status_str: sym!("ibv_wc_status_str"),
        };
        Ok(Arc::new(Verbs { fns, _lib: lib }))
    }

    /// Whether `ibv_reg_dmabuf_mr` is available.
    pub(crate) fn has_dmabuf(&self) -> bool {
        self.fns.reg_dmabuf_mr.is_some()
    }

    /// The devices: (name, node GUID in host order).
    pub(crate) fn devices(&self) -> VResult<Vec<(String, u64)>> {
        self.with_list(|list| {
            list.iter()
                .map(|&d| (self.dev_name(d), u64::from_be(self.dev_guid(d))))
                .collect()
        })
    }

    fn dev_name(&self, d: *mut IbvDevice) -> String {
        // SAFETY: `d` comes from a live device list; the returned string is owned by the device
        // and valid while the list is; it is copied out at once.
        let p = unsafe { (self.fns.get_device_name)(d) };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: non-null, NUL-terminated (the device's kernel name).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn dev_guid(&self, d: *mut IbvDevice) -> u64 {
        // SAFETY: `d` comes from a live device list.
        unsafe { (self.fns.get_device_guid)(d) }
    }

    /// Runs `f` over the device list, then frees it.
    fn with_list<T>(&self, f: impl FnOnce(&[*mut IbvDevice]) -> T) -> VResult<T> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer.
        let list = unsafe { (self.fns.get_device_list)(&mut n) };
        if list.is_null() {
            return Err(errno_err("ibv_get_device_list"));
        }
        let len = usize::try_from(n).unwrap_or(0);
        // SAFETY: the list holds `n` device pointers (and a NULL after them).
        let devs = unsafe { std::slice::from_raw_parts(list, len) };
        let out = f(devs);
        // SAFETY: `list` came from ibv_get_device_list and is freed once; contexts opened from
        // it stay valid (verbs API).
        unsafe { (self.fns.free_device_list)(list) };
        Ok(out)
    }

    /// Opens the device `name`.
    pub(crate) fn open(self: &Arc<Self>, name: &str) -> VResult<Context> {
        let ctx = self.with_list(|list| {
            list.iter()
                .copied()
                .find(|&d| self.dev_name(d) == name)
                .map(|d| {
                    // SAFETY: `d` is a device of the live list.
                    unsafe { (self.fns.open_device)(d) }
                })
        })?;
        match ctx {
            None => Err(VerbsError {
                call: "ibv_open_device",
                reason: format!("no device named '{name}'"),
            }),
            Some(p) if p.is_null() => Err(errno_err("ibv_open_device")),
            // SAFETY: a context just opened.
            Some(p) => Ok(Context(Arc::new(unsafe {
                Owned::new(
                    p,
                    Opened {
                        verbs: Arc::clone(self),
                        name: name.to_owned(),
                    },
                )
            }))),
        }
    }

    /// The text of a work completion status.
    pub(crate) fn wc_status_str(&self, status: c_uint) -> String {
        // SAFETY: ibv_wc_status_str accepts any value and returns a static string.
        let p = unsafe { (self.fns.wc_status_str)(status) };
        if p.is_null() {
            return format!("status {status}");
        }
        // SAFETY: a static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}
