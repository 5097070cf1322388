//! Weight streaming from C (the `nixl-weight-streamer` crate): an engine's loader opens a
//! model's sources (`nixl-weights serve`, or `pull --serve` replicas) on its agent, asks each
//! tensor's dtype, shape and size, and pulls tensors by name straight into memory it owns and
//! registered (DRAM or VRAM), dtype and shape checked, DRAM verified against the manifest.

use super::*;

use nixl_core::BackendName;
use nixl_weight_streamer::manifest::{TensorEntry, MAX_DIMS};
use nixl_weight_streamer::tensors::TensorSource;
use nixl_weight_streamer::Error as WsError;

/// The most dimensions a tensor has (a `shape` array of this many always suffices).
pub const NIXL_WEIGHTS_MAX_DIMS: usize = 16;
const _: () = assert!(
    NIXL_WEIGHTS_MAX_DIMS == MAX_DIMS,
    "the manifest's limit changed"
);

pub(crate) const WEIGHTS_MAGIC: u64 = 0x6e69_786c_7767_6874; // "nixlwght"

/// A model's sources, opened for tensor pulls (opaque). Open with `nixl_weights_open`, free
/// with `nixl_weights_close`. It keeps what it needs of its agent alive.
#[derive(Debug)]
pub struct nixl_weights {
    _opaque: [u8; 0],
}

/// What a `nixl_weights *` points to.
#[repr(C)]
struct WeightsHandle {
    magic: u64,
    src: TensorSource,
    _agent: Arc<Shared>,
}

// The handle is used from any thread the C caller likes, several at once.
const _: fn() = || {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<TensorSource>();
};

impl std::fmt::Debug for WeightsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("nixl_weights")
            .field("model", &self.src.manifest().name)
            .finish()
    }
}

handle!(WeightsHandle, nixl_weights, WEIGHTS_MAGIC, "weights");

fn weights_fail(e: WsError) -> Fail {
    let code = match &e {
        WsError::Core { source, .. } => code_of(source),
        WsError::Io { .. } | WsError::Incomplete(_) => NIXL_ERR_BACKEND,
        _ => NIXL_ERR_INVALID,
    };
    Fail::new(code, e.to_string())
}

/// Checks an output pointer (non-NULL, aligned) before anything is written, so that a call
/// with several outputs writes all or none.
fn out_ok<T>(p: *mut T, what: &str) -> Res<()> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    if !p.is_aligned() {
        return Err(Fail::invalid(format!("{what} is misaligned")));
    }
    Ok(())
}

/// A comma-separated list: items trimmed, empty ones dropped; NULL is empty.
fn list_arg(p: *const c_char, what: &str) -> Res<Vec<String>> {
    if p.is_null() {
        return Ok(Vec::new());
    }
    Ok(str_arg(p, what)?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect())
}

fn tensor(w: &WeightsHandle, name: *const c_char) -> Res<&TensorEntry> {
    let name = str_arg(name, "name")?;
    w.src.manifest().tensor(name).ok_or_else(|| {
        Fail::new(
            NIXL_ERR_NOT_FOUND,
            format!(
                "no tensor {name:?} in model {}",
                w.src.manifest().model_id()
            ),
        )
    })
}

/// Opens model `model` on `agent` (which must run the `tcp` backend) from its sources and
/// writes the handle to `*out`.
///
/// `sources`: NULL or a comma-separated list of `HOST:PORT` addresses that
/// `nixl-weights serve` or `nixl-weights pull --serve` printed; `etcd`: NULL or a
/// comma-separated list of etcd endpoints (`http://10.0.0.1:2379`) where sources announce the
/// model. At least one source must be given; each gets one attempt bounded by `timeout_ms` (0:
/// 3000), and each tensor's READ ten times that. Sources whose manifests differ are
/// `NIXL_ERR_INVALID` naming the tensor; none answering is `NIXL_ERR_NOT_FOUND` with each
/// source's reason. Cross-host sources need the same `[auth] secret` as the agent's.
///
/// # Safety
/// `model`, `sources` and `etcd` are NULL or NUL-terminated strings; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_weights_open(
    agent: *mut nixl_agent,
    model: *const c_char,
    sources: *const c_char,
    etcd: *const c_char,
    timeout_ms: i64,
    out: *mut *mut nixl_weights,
) -> nixl_status {
    AgentHandle::with(agent, |a| {
        out_ok(out, "out")?;
        let model = str_arg(model, "model")?;
        let sources = list_arg(sources, "sources")?;
        let etcd = list_arg(etcd, "etcd")?;
        if sources.is_empty() && etcd.is_empty() {
            return Err(Fail::invalid(
                "no sources: give `sources` (HOST:PORT,...) or `etcd` (endpoints)",
            ));
        }
        let timeout = match timeout_ms {
            0 => Duration::from_secs(3),
            t if t > 0 => Duration::from_millis(t as u64),
            t => return Err(Fail::invalid(format!("timeout_ms is negative ({t})"))),
        };
        a.shared
            .agent
            .check_backend(BackendName::Tcp)
            .map_err(|e| Fail::new(code_of(&e), format!("weights need the tcp backend: {e}")))?;
        let etcd = (!etcd.is_empty()).then(|| nixl_discovery::EtcdConfig::new(etcd));
        let src = TensorSource::connect_with_timeout(
            &a.shared.agent,
            &a.shared.auth,
            etcd.as_ref(),
            model,
            &sources,
            timeout,
        )
        .map_err(|e| match e {
            WsError::Incomplete(m) => Fail::new(NIXL_ERR_NOT_FOUND, m),
            e => weights_fail(e),
        })?;
        let h = WeightsHandle {
            magic: WEIGHTS_MAGIC,
            src,
            _agent: Arc::clone(&a.shared),
        };
        publish(out, h)?;
        Ok(())
    })
}

/// Frees a handle from `nixl_weights_open`. NULL is a no-op.
///
/// # Safety
/// `weights` is NULL or a handle from `nixl_weights_open` not yet closed; no other thread uses
/// it during or after this call.
#[no_mangle]
pub unsafe extern "C" fn nixl_weights_close(weights: *mut nixl_weights) {
    // SAFETY: the caller's contract (above) is `free_handle`'s.
    guard(|| unsafe { free_handle::<WeightsHandle>(weights, |_| {}) });
}

/// Writes the model's id (its name, `@`, and 16 hex digits of its manifest's digest: equal ids
/// are equal models) to `out` (`cap` bytes with the NUL).
///
/// # Safety
/// `out` is NULL or has `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_weights_model_id(
    weights: *const nixl_weights,
    out: *mut c_char,
    cap: usize,
) -> nixl_status {
    WeightsHandle::with(weights, |w| {
        let id = w.src.manifest().model_id();
        str_out(out, cap, &id, "out")?;
        Ok(())
    })
}

/// Writes how many tensors the model has to `*count`.
///
/// # Safety
/// `count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_weights_tensor_count(
    weights: *const nixl_weights,
    count: *mut usize,
) -> nixl_status {
    WeightsHandle::with(weights, |w| {
        write_out(count, w.src.manifest().tensors.len(), "count")?;
        Ok(())
    })
}

/// Writes the name of tensor `index` (0 .. count - 1, in file then offset order) to `out`
/// (`cap` bytes with the NUL), so that a loader can list the model.
///
/// # Safety
/// `out` is NULL or has `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_weights_tensor_name(
    weights: *const nixl_weights,
    index: usize,
    out: *mut c_char,
    cap: usize,
) -> nixl_status {
    WeightsHandle::with(weights, |w| {
        let ts = &w.src.manifest().tensors;
        let t = ts.get(index).ok_or_else(|| {
            Fail::invalid(format!(
                "index {index} is past the model's {} tensors",
                ts.len()
            ))
        })?;
        str_out(out, cap, &t.name, "out")?;
        Ok(())
    })
}

/// Describes tensor `name`: its dtype as safetensors writes it (`"F32"`, `"BF16"`, ...) in
/// `dtype` (`dtype_cap` bytes with the NUL), its shape in `shape` (`shape_cap` elements;
/// `NIXL_WEIGHTS_MAX_DIMS` always suffice; NULL with `shape_cap` 0 for a scalar), its number
/// of dimensions in `*ndim` and its size in bytes in `*len`. An unknown name is
/// `NIXL_ERR_NOT_FOUND`; a dtype or shape that does not fit is `NIXL_ERR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string; `dtype` is NULL or has `dtype_cap` writable
/// bytes; `shape` is NULL or has `shape_cap` writable elements; `ndim` and `len` are NULL or
/// writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn nixl_weights_tensor_info(
    weights: *const nixl_weights,
    name: *const c_char,
    dtype: *mut c_char,
    dtype_cap: usize,
    shape: *mut u64,
    shape_cap: usize,
    ndim: *mut usize,
    len: *mut u64,
) -> nixl_status {
    WeightsHandle::with(weights, |w| {
        let t = tensor(w, name)?;
        out_ok(ndim, "ndim")?;
        out_ok(len, "len")?;
        check_str_out(dtype, dtype_cap, &t.dtype, "dtype")?;
        if shape.is_null() && shape_cap > 0 {
            return Err(Fail::invalid(format!(
                "shape is NULL with shape_cap {shape_cap}"
            )));
        }
        if !shape.is_null() && !shape.is_aligned() {
            return Err(Fail::invalid("shape is misaligned"));
        }
        if t.shape.len() > shape_cap {
            return Err(Fail::new(
                NIXL_ERR_BUFFER_TOO_SMALL,
                format!(
                    "shape: tensor {:?} has {} dimensions, shape_cap is {shape_cap}",
                    t.name,
                    t.shape.len()
                ),
            ));
        }
        put_str(dtype, &t.dtype);
        if !t.shape.is_empty() {
            // SAFETY: non-NULL and aligned (checked above), with room for `shape_cap` >=
            // `t.shape.len()` elements (the caller's contract); a Rust vector cannot overlap it.
            unsafe { std::ptr::copy_nonoverlapping(t.shape.as_ptr(), shape, t.shape.len()) };
        }
        write_out(ndim, t.shape.len(), "ndim")?;
        write_out(len, t.end - t.begin, "len")?;
        Ok(())
    })
}

/// Pulls tensor `name` into memory of `kind` (`NIXL_DRAM`, or `NIXL_VRAM` with `dev_id` the GPU
/// ordinal) at `addr`, `len` bytes, which the caller registered with the handle's agent. The
/// model's dtype and shape must be `dtype` and `shape` (`ndim` elements; NULL with 0 for a
/// scalar), else `NIXL_ERR_INVALID` naming both; an unknown name is `NIXL_ERR_NOT_FOUND`;
/// `len` below the tensor's size is `NIXL_ERR_BUFFER_TOO_SMALL` (only the tensor's bytes are
/// written when `len` is larger); memory outside every registration is `NIXL_ERR_INVALID`.
/// The sources are tried in turn (a different first one per tensor); a DRAM copy is checked
/// against the manifest's checksum and fetched again from the next source when it fails.
/// `NIXL_ERR_BACKEND` when no source delivered, with each one's reason. Several threads may
/// pull different tensors through one handle at once.
///
/// # Safety
/// `name` and `dtype` are NULL or NUL-terminated strings; `shape` is NULL or has `ndim`
/// readable elements; `addr .. addr + len` is memory of `kind` registered with the agent that
/// stays allocated for the call, and nothing else reads or writes it meanwhile.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn nixl_weights_pull_tensor(
    weights: *const nixl_weights,
    name: *const c_char,
    dtype: *const c_char,
    shape: *const u64,
    ndim: usize,
    kind: i32,
    addr: u64,
    len: u64,
    dev_id: u64,
) -> nixl_status {
    WeightsHandle::with(weights, |w| {
        let t = tensor(w, name)?;
        let dtype = str_arg(dtype, "dtype")?;
        let shape: &[u64] = if ndim == 0 {
            &[]
        } else if shape.is_null() {
            return Err(Fail::invalid(format!("shape is NULL with ndim {ndim}")));
        } else if !shape.is_aligned() {
            return Err(Fail::invalid("shape is misaligned"));
        } else if ndim > MAX_DIMS {
            return Err(Fail::invalid(format!(
                "ndim {ndim} is over NIXL_WEIGHTS_MAX_DIMS ({MAX_DIMS})"
            )));
        } else {
            // SAFETY: non-NULL, aligned, `ndim` bounded; the caller passes `ndim` readable
            // elements that stay valid for the call.
            unsafe { std::slice::from_raw_parts(shape, ndim) }
        };
        if t.dtype != dtype || t.shape != shape {
            return Err(Fail::invalid(format!(
                "tensor {:?}: the model has {} {:?}, the caller expects {dtype} {shape:?}",
                t.name, t.dtype, t.shape
            )));
        }
        let kind = kind_arg(kind)?;
        if !matches!(kind, MemKind::Dram | MemKind::Vram) {
            return Err(Fail::invalid(format!(
                "kind {kind:?}: tensors are pulled into NIXL_DRAM or NIXL_VRAM"
            )));
        }
        let size = t.end - t.begin;
        if len < size {
            return Err(Fail::new(
                NIXL_ERR_BUFFER_TOO_SMALL,
                format!("tensor {:?} is {size} bytes, the destination {len}", t.name),
            ));
        }
        let dst = Desc::new(addr, size, dev_id);
        // SAFETY: the caller's contract (above) is `pull_tensor`'s: `dst` lies in registered
        // memory of `kind` that nothing else touches during the call.
        unsafe { w.src.pull_tensor(&t.name, &t.dtype, &t.shape, kind, dst) }
            .map_err(weights_fail)?;
        Ok(())
    })
}
