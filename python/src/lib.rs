//! `nixl._bindings`: the Rust half of the `nixl` Python package.
//!
//! The Python half (`nixl/_api.py`) offers NIXL's Python API; this module gives it an agent, the
//! descriptor lists, transfer requests and NIXL's exception classes, on top of
//! [`nixl_core::Agent`] and the backends of `nixl-transports`, with the C ABI's semantics:
//! registrations live until deregistered by descriptor (or the agent goes), a request keeps
//! what it needs of its agent alive (so handles may be dropped in any order), every error of
//! the core reaches Python as the exception class of its kind, and no panic crosses into
//! Python (PyO3 turns one into a `PanicException`).
//!
//! The GIL is released around every call that waits, copies or talks to a peer.

#![allow(non_camel_case_types)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nixl_core::{
    Agent, BackendName, Desc, DescList, Error, MemKind, PreppedList, XferOp, XferOptions,
    XferRequest, XferStatus,
};
use nixl_discovery::{DiscoveryError, EtcdConfig, Publication, Registry};
use nixl_transports::config::Config;
use nixl_transports::tcp::{
    fetch_metadata, invalidate_metadata, listen_addrs_in, push_metadata, Auth, PeerIdentity,
};
use parking_lot::Mutex;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyIndexError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

create_exception!(
    nixl._bindings,
    nixlNotPostedError,
    PyException,
    "The request was never posted."
);
create_exception!(
    nixl._bindings,
    nixlInvalidParamError,
    PyException,
    "A bad argument or malformed input."
);
create_exception!(
    nixl._bindings,
    nixlBackendError,
    PyException,
    "A backend failed."
);
create_exception!(
    nixl._bindings,
    nixlNotFoundError,
    PyException,
    "An unknown agent, region, descriptor or backend."
);
create_exception!(
    nixl._bindings,
    nixlMismatchError,
    PyException,
    "Local and remote descriptor lists do not pair up."
);
create_exception!(
    nixl._bindings,
    nixlNotAllowedError,
    PyException,
    "Refused: authentication, region key or bounds."
);
create_exception!(
    nixl._bindings,
    nixlRepostActiveError,
    PyException,
    "The request is still in flight."
);
create_exception!(
    nixl._bindings,
    nixlUnknownError,
    PyException,
    "An error of no other class."
);
create_exception!(
    nixl._bindings,
    nixlNotSupportedError,
    PyException,
    "Not supported here (a backend that cannot run on this host, say)."
);
create_exception!(
    nixl._bindings,
    nixlRemoteDisconnectError,
    PyException,
    "The peer went away."
);
create_exception!(
    nixl._bindings,
    nixlCancelledError,
    PyException,
    "The request was cancelled (or its agent shut down)."
);
create_exception!(
    nixl._bindings,
    nixlNoTelemetryError,
    PyException,
    "Telemetry was not enabled (capture_telemetry)."
);
create_exception!(
    nixl._bindings,
    nixlTimeoutError,
    nixlBackendError,
    "nixl-rs: the request ran past its deadline (a nixlBackendError)."
);

/// The Python exception for a core error, by its kind.
fn err(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidDesc { .. }
        | Error::InvalidArgument(_)
        | Error::Overlap { .. }
        | Error::Metadata(_)
        | Error::StaleMetadata { .. } => nixlInvalidParamError::new_err(msg),
        Error::Mismatch(_) => nixlMismatchError::new_err(msg),
        Error::InFlight => nixlRepostActiveError::new_err(msg),
        Error::NotRegistered { .. }
        | Error::LocalNotRegistered { .. }
        | Error::RemoteNotRegistered { .. }
        | Error::UnknownPeer(_)
        | Error::UnknownBackend(_)
        | Error::NoBackend { .. } => nixlNotFoundError::new_err(msg),
        Error::Unavailable { .. } => nixlNotSupportedError::new_err(msg),
        Error::Denied { .. } => nixlNotAllowedError::new_err(msg),
        Error::RemoteDisconnect { .. } => nixlRemoteDisconnectError::new_err(msg),
        Error::Cancelled | Error::Shutdown(_) => nixlCancelledError::new_err(msg),
        Error::TimedOut => nixlTimeoutError::new_err(msg),
        Error::Backend { .. } | Error::Io { .. } => nixlBackendError::new_err(msg),
        _ => nixlUnknownError::new_err(msg),
    }
}

/// The central metadata store from the environment, as NIXL configures it:
/// `NIXL_ETCD_ENDPOINTS` (comma-separated URLs) and `NIXL_ETCD_NAMESPACE` (the key prefix,
/// default `/nixl/agents/`).
fn etcd_env() -> Option<EtcdConfig> {
    let eps = std::env::var("NIXL_ETCD_ENDPOINTS").ok()?;
    let eps: Vec<String> = eps
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.contains("://") {
                e.to_owned()
            } else {
                format!("http://{e}")
            }
        })
        .collect();
    if eps.is_empty() {
        return None;
    }
    let mut cfg = EtcdConfig::new(eps);
    if let Ok(ns) = std::env::var("NIXL_ETCD_NAMESPACE") {
        if !ns.is_empty() {
            cfg.prefix = if ns.ends_with('/') { ns } else { ns + "/" };
        }
    }
    Some(cfg)
}

/// The etcd connection (made now if it is not yet) and the publication slot.
fn etcd_state(
    slot: &mut Option<(Registry, Option<Publication>)>,
) -> PyResult<&mut (Registry, Option<Publication>)> {
    if slot.is_none() {
        let cfg = etcd_env().ok_or_else(|| {
            nixlNotSupportedError::new_err(
                "no metadata server: give ip_addr (and port) to reach a peer's listen thread, \
                 or set NIXL_ETCD_ENDPOINTS (e.g. http://127.0.0.1:2379) to use etcd",
            )
        })?;
        *slot = Some((Registry::connect(&cfg).map_err(etcd_err)?, None));
    }
    Ok(slot.as_mut().expect("just set"))
}

fn etcd_err(e: DiscoveryError) -> PyErr {
    match e {
        DiscoveryError::Load { source, .. } => err(source),
        DiscoveryError::Config(_) => invalid(format!("etcd: {e}")),
        e => nixlBackendError::new_err(format!("etcd: {e}")),
    }
}

fn invalid(msg: impl Into<String>) -> PyErr {
    nixlInvalidParamError::new_err(msg.into())
}

fn kind_of(code: i64) -> PyResult<MemKind> {
    u8::try_from(code)
        .ok()
        .and_then(MemKind::from_code)
        .ok_or_else(|| {
            invalid(format!(
                "memory type {code} is not one of DRAM_SEG..FILE_SEG"
            ))
        })
}

/// Most bytes of a meta string of a registration descriptor (a file path, an object key).
const MAX_META: usize = 4096;

/// Descriptors from Python: packed native-endian u64 triplets (what `_api.py` makes of an Nx3
/// numpy array), or a sequence of `(addr, len, dev)` / `(addr, len, dev, meta)` tuples.
fn descs_from(obj: &Bound<'_, PyAny>, with_meta: bool) -> PyResult<(Vec<Desc>, Vec<String>)> {
    if let Ok(b) = obj.downcast::<PyBytes>() {
        let raw = b.as_bytes();
        if raw.len() % 24 != 0 {
            return Err(invalid(format!(
                "packed descriptors: {} bytes is not a whole number of (addr, len, dev) rows",
                raw.len()
            )));
        }
        let u = |c: &[u8]| u64::from_ne_bytes(c.try_into().expect("8 bytes"));
        let descs = raw
            .chunks_exact(24)
            .map(|r| Desc::new(u(&r[0..8]), u(&r[8..16]), u(&r[16..24])))
            .collect::<Vec<_>>();
        let metas = vec![String::new(); descs.len()];
        return Ok((descs, metas));
    }
    let mut descs = Vec::new();
    let mut metas = Vec::new();
    for (i, item) in obj.try_iter()?.enumerate() {
        let item = item?;
        let t = item
            .downcast::<PyTuple>()
            .map_err(|_| invalid(format!("descriptor {i}: not a tuple")))?;
        let n = t.len();
        let ok = n == 3 || (with_meta && n == 4);
        if !ok {
            return Err(invalid(format!(
                "descriptor {i}: {n} elements, expected (addr, len, dev){}",
                if with_meta {
                    " or (addr, len, dev, meta)"
                } else {
                    ""
                }
            )));
        }
        let num = |j: usize, what: &str| -> PyResult<u64> {
            t.get_item(j)?.extract::<u64>().map_err(|_| {
                invalid(format!(
                    "descriptor {i}: {what} is not an integer in 0..2^64"
                ))
            })
        };
        descs.push(Desc::new(num(0, "addr")?, num(1, "len")?, num(2, "dev")?));
        let meta = if n == 4 {
            let m = t.get_item(3)?;
            let s: String = if let Ok(b) = m.downcast::<PyBytes>() {
                String::from_utf8_lossy(b.as_bytes()).into_owned()
            } else {
                m.extract::<String>()
                    .map_err(|_| invalid(format!("descriptor {i}: meta is not str or bytes")))?
            };
            if s.len() > MAX_META {
                return Err(invalid(format!(
                    "descriptor {i}: meta of {} bytes (at most {MAX_META})",
                    s.len()
                )));
            }
            s
        } else {
            String::new()
        };
        metas.push(meta);
    }
    Ok((descs, metas))
}

fn list_of(kind: MemKind, descs: &[Desc]) -> PyResult<DescList> {
    DescList::from_descs(kind, descs.to_vec()).map_err(err)
}

/// The safe serialized form of a descriptor list: magic, kind, flags, count, rows.
const SAFE_MAGIC: &[u8; 8] = b"NIXLRSD1";
/// Most descriptors a serialized list may hold (a 64 MiB document at 24 bytes a row, or so).
const MAX_SERIAL_DESCS: usize = 1 << 22;

fn encode_descs(kind: MemKind, reg: bool, descs: &[Desc], metas: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + descs.len() * 24);
    out.extend_from_slice(SAFE_MAGIC);
    out.push(kind.code());
    out.push(u8::from(reg));
    out.extend_from_slice(&(descs.len() as u32).to_le_bytes());
    for (i, d) in descs.iter().enumerate() {
        out.extend_from_slice(&d.addr.to_le_bytes());
        out.extend_from_slice(&d.len.to_le_bytes());
        out.extend_from_slice(&d.dev_id.to_le_bytes());
        if reg {
            let m = metas.get(i).map(String::as_bytes).unwrap_or_default();
            out.extend_from_slice(&(m.len() as u32).to_le_bytes());
            out.extend_from_slice(m);
        }
    }
    out
}

type Decoded = (MemKind, bool, Vec<Desc>, Vec<String>);

fn decode_descs(b: &[u8]) -> Result<Decoded, String> {
    let mut r = nixl_core::codec::Reader::new(b);
    let e = |e: nixl_core::DecodeError| e.to_string();
    if r.array::<8>("magic").map_err(e)? != *SAFE_MAGIC {
        return Err("not a nixl-rs descriptor list (bad magic)".into());
    }
    let kind = MemKind::from_code(r.u8("kind").map_err(e)?).ok_or("unknown memory type")?;
    let reg = match r.u8("flags").map_err(e)? {
        0 => false,
        1 => true,
        f => return Err(format!("unknown flags {f:#x}")),
    };
    let n = r.u32("count").map_err(e)? as usize;
    // Every row takes at least 24 bytes: a count past what the input can hold is a lie.
    if n > MAX_SERIAL_DESCS || n > b.len() / 24 {
        return Err(format!("count {n} exceeds what {} bytes can hold", b.len()));
    }
    let mut descs = Vec::with_capacity(n);
    let mut metas = Vec::with_capacity(n);
    for _ in 0..n {
        let addr = r.u64("addr").map_err(e)?;
        let len = r.u64("len").map_err(e)?;
        let dev = r.u64("dev").map_err(e)?;
        descs.push(Desc::new(addr, len, dev));
        metas.push(if reg {
            let m = r.blob_max("meta", MAX_META).map_err(e)?;
            String::from_utf8(m.to_vec()).map_err(|_| "meta is not UTF-8".to_owned())?
        } else {
            String::new()
        });
    }
    if !r.is_empty() {
        return Err("trailing bytes after the descriptors".into());
    }
    Ok((kind, reg, descs, metas))
}

/// A list of transfer descriptors `(addr, len, dev)` of one memory type.
#[pyclass(module = "nixl._bindings", name = "nixlXferDList", frozen)]
#[derive(Debug)]
struct XferDList {
    kind: MemKind,
    descs: Vec<Desc>,
}

/// A list of registration descriptors `(addr, len, dev, meta)` of one memory type.
#[pyclass(module = "nixl._bindings", name = "nixlRegDList", frozen)]
#[derive(Debug)]
struct RegDList {
    kind: MemKind,
    descs: Vec<Desc>,
    metas: Vec<String>,
}

/// The position of row `i` (negative: from the end) of a list of `n`.
fn row(n: usize, i: isize) -> PyResult<usize> {
    let j = if i < 0 { i + n as isize } else { i };
    usize::try_from(j)
        .ok()
        .filter(|&j| j < n)
        .ok_or_else(|| PyIndexError::new_err("descriptor index out of range"))
}

/// What pickling stores of a list: its class and `(mem_type, rows)`.
fn reduce<'py>(
    obj: &Bound<'py, PyAny>,
    kind: MemKind,
    rows: Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyTuple>> {
    let args = (kind.code(), rows).into_pyobject(obj.py())?;
    PyTuple::new(obj.py(), [obj.get_type().into_any(), args.into_any()])
}

fn desc_tuple<'py>(py: Python<'py>, d: &Desc) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(py, [d.addr, d.len, d.dev_id])
}

#[pymethods]
impl XferDList {
    #[new]
    #[pyo3(signature = (mem_type, descs = None))]
    fn new(mem_type: i64, descs: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let kind = kind_of(mem_type)?;
        let descs = match descs {
            Some(d) => descs_from(d, false)?.0,
            None => Vec::new(),
        };
        Ok(XferDList { kind, descs })
    }
    fn __len__(&self) -> usize {
        self.descs.len()
    }
    fn __getitem__<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Bound<'py, PyTuple>> {
        desc_tuple(py, &self.descs[row(self.descs.len(), i)?])
    }
    #[pyo3(name = "getType")]
    fn get_type(&self) -> u8 {
        self.kind.code()
    }
    #[pyo3(name = "descCount")]
    fn desc_count(&self) -> usize {
        self.descs.len()
    }
    #[pyo3(name = "isEmpty")]
    fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .downcast::<XferDList>()
            .is_ok_and(|o| o.get().kind == self.kind && o.get().descs == self.descs)
    }
    fn __repr__(&self) -> String {
        format!(
            "nixlXferDList({}, {} descriptors)",
            self.kind,
            self.descs.len()
        )
    }
    /// Pickling (what NIXL's `get_serialized_descs` does) rebuilds the list from its rows.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let rows = PyList::empty(slf.py());
        for d in &slf.get().descs {
            rows.append(desc_tuple(slf.py(), d)?)?;
        }
        reduce(slf.as_any(), slf.get().kind, rows)
    }
    /// The safe serialized form (see `deserialize_descs_safe`).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &encode_descs(self.kind, false, &self.descs, &[]))
    }
}

#[pymethods]
impl RegDList {
    #[new]
    #[pyo3(signature = (mem_type, descs = None))]
    fn new(mem_type: i64, descs: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let kind = kind_of(mem_type)?;
        let (descs, metas) = match descs {
            Some(d) => descs_from(d, true)?,
            None => (Vec::new(), Vec::new()),
        };
        Ok(RegDList { kind, descs, metas })
    }
    fn __len__(&self) -> usize {
        self.descs.len()
    }
    fn __getitem__<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Bound<'py, PyTuple>> {
        let j = row(self.descs.len(), i)?;
        let d = &self.descs[j];
        (d.addr, d.len, d.dev_id, self.metas[j].clone()).into_pyobject(py)
    }
    #[pyo3(name = "getType")]
    fn get_type(&self) -> u8 {
        self.kind.code()
    }
    #[pyo3(name = "descCount")]
    fn desc_count(&self) -> usize {
        self.descs.len()
    }
    #[pyo3(name = "isEmpty")]
    fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }
    /// The transfer descriptors of the same memory (what `trim()` gives in NIXL).
    fn trim(&self) -> XferDList {
        XferDList {
            kind: self.kind,
            descs: self.descs.clone(),
        }
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.downcast::<RegDList>().is_ok_and(|o| {
            let o = o.get();
            o.kind == self.kind && o.descs == self.descs && o.metas == self.metas
        })
    }
    fn __repr__(&self) -> String {
        format!(
            "nixlRegDList({}, {} descriptors)",
            self.kind,
            self.descs.len()
        )
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let me = slf.get();
        let rows = PyList::empty(slf.py());
        for (d, m) in me.descs.iter().zip(&me.metas) {
            rows.append((d.addr, d.len, d.dev_id, m.clone()).into_pyobject(slf.py())?)?;
        }
        reduce(slf.as_any(), me.kind, rows)
    }
    /// The safe serialized form (see `deserialize_descs_safe`).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &encode_descs(self.kind, true, &self.descs, &self.metas))
    }
}

/// Decodes the safe serialized form of a descriptor list (bounded, never runs code): the list,
/// or `nixlInvalidParamError` for anything else.
#[pyfunction]
fn deserialize_descs_safe(py: Python<'_>, data: &[u8]) -> PyResult<PyObject> {
    let (kind, reg, descs, metas) =
        decode_descs(data).map_err(|e| invalid(format!("serialized descriptors: {e}")))?;
    Ok(if reg {
        RegDList { kind, descs, metas }
            .into_pyobject(py)?
            .into_any()
            .unbind()
    } else {
        XferDList { kind, descs }
            .into_pyobject(py)?
            .into_any()
            .unbind()
    })
}

/// What an agent handle and its requests share; the agent shuts down when the last goes.
#[derive(Debug)]
struct Shared {
    agent: Arc<Agent>,
    auth: Auth,
    /// The central metadata store (etcd), connected on first use; this agent's publication.
    etcd: Mutex<Option<(Registry, Option<Publication>)>>,
    telemetry: bool,
    /// Per backend: what its transfers have taken in this agent (for `estimate_xfer_cost`).
    costs: Mutex<HashMap<BackendName, CostFit>>,
}

/// Durations of the posts a backend completed, fitted to `µs = latency + bytes × per_byte` by
/// exponentially weighted least squares (recent posts weigh most).
#[derive(Clone, Copy, Debug, Default)]
struct CostFit {
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    syy: f64,
    count: u64,
}

/// Weight left to a sample after each newer one.
const COST_DECAY: f64 = 0.98;
/// Durations kept per request.
const OWN_SAMPLES: usize = 16;

impl CostFit {
    fn add(&mut self, bytes: u64, us: u64) {
        let (x, y) = (bytes as f64, us as f64);
        for v in [
            &mut self.n,
            &mut self.sx,
            &mut self.sy,
            &mut self.sxx,
            &mut self.sxy,
            &mut self.syy,
        ] {
            *v *= COST_DECAY;
        }
        self.n += 1.0;
        self.sx += x;
        self.sy += y;
        self.sxx += x * x;
        self.sxy += x * y;
        self.syy += y * y;
        self.count += 1;
    }

    /// `(latency µs, µs per byte, rms residual µs)`, once posts of different sizes were seen.
    fn line(&self) -> Option<(f64, f64, f64)> {
        if self.count < 2 {
            return None;
        }
        let det = self.n * self.sxx - self.sx * self.sx;
        // Sizes must differ by more than rounding: a spread of at least 1 KiB.
        if det.is_nan() || det <= self.n * self.n * 1e6 {
            return None;
        }
        let b = ((self.n * self.sxy - self.sx * self.sy) / det).max(0.0);
        let a = ((self.sy - b * self.sx) / self.n).max(0.0);
        let rss = self.syy - 2.0 * a * self.sy - 2.0 * b * self.sxy
            + a * a * self.n
            + 2.0 * a * b * self.sx
            + b * b * self.sxx;
        Some((a, b, (rss.max(0.0) / self.n).sqrt()))
    }
}

/// What a backend is configured to take before it has been measured here: `(latency µs,
/// bytes per µs)` (bytes per µs is MB/s).
fn cost_prior(b: BackendName) -> (f64, f64) {
    match b {
        BackendName::Local => (1.0, 10_000.0),
        BackendName::Shm => (5.0, 8_000.0),
        BackendName::Tcp => (30.0, 2_000.0),
        BackendName::Rdma => (5.0, 12_000.0),
        BackendName::Cuda => (10.0, 20_000.0),
        BackendName::Gds => (50.0, 5_000.0),
        BackendName::Uring | BackendName::Posix => (50.0, 2_000.0),
        BackendName::Object => (20_000.0, 200.0),
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Unpublished first (the lease is revoked, the key deleted), then shut down.
        drop(self.etcd.lock().take());
        self.agent.shutdown();
    }
}

/// Turns on logging to stderr once, when `NIXL_LOG` (e.g. `NIXL_LOG=info`) is set.
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

fn op_of(op: &str) -> PyResult<XferOp> {
    match op {
        "READ" => Ok(XferOp::Read),
        "WRITE" => Ok(XferOp::Write),
        o => Err(invalid(format!(
            "operation {o:?} is not \"READ\" or \"WRITE\""
        ))),
    }
}

fn backend_of(name: Option<&str>) -> PyResult<Option<BackendName>> {
    name.map(|n| {
        BackendName::parse(n).ok_or_else(|| {
            let known: Vec<&str> = BackendName::ALL.iter().map(|b| b.as_str()).collect();
            nixlNotFoundError::new_err(format!(
                "unknown backend '{n}' (known: {})",
                known.join(", ")
            ))
        })
    })
    .transpose()
}

/// Indices from Python: packed native-endian int32 (a numpy array) or a sequence of ints.
/// Indices into a list of `n` entries, as `u32`: packed int32 (`bytes`, what `_api.py` makes of
/// a numpy array) or any iterable of ints. One pass, no intermediate list: a 56,000-entry array
/// is read straight into its final vector (a larger one costs page faults on first touch).
fn indices_from(obj: &Bound<'_, PyAny>, n: usize, side: &str) -> PyResult<Vec<u32>> {
    let check = |v: i64| -> PyResult<u32> {
        if v < 0 {
            return Err(invalid(format!("{side} index {v} is negative")));
        }
        // In range of the list, so it fits in u32 unless the list is longer than the core
        // prepares (then the descriptors are used, and `u32::MAX` is never looked up).
        usize::try_from(v)
            .ok()
            .filter(|&i| i < n)
            .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
            .ok_or_else(|| {
                invalid(format!(
                    "{side} index {v} out of range (the prepared list has {n})"
                ))
            })
    };
    if let Ok(b) = obj.downcast::<PyBytes>() {
        let raw = b.as_bytes();
        if raw.len() % 4 != 0 {
            return Err(invalid("packed indices: not a whole number of int32"));
        }
        let mut out = Vec::with_capacity(raw.len() / 4);
        for c in raw.chunks_exact(4) {
            out.push(check(i64::from(i32::from_ne_bytes(
                c.try_into().expect("4 bytes"),
            )))?);
        }
        return Ok(out);
    }
    obj.try_iter()?.map(|x| check(x?.extract()?)).collect()
}

fn port_addr(ip: &str, port: u16) -> String {
    if ip.contains(':') && !ip.starts_with('[') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Whether an error means the peer's listener is not up (yet): worth another try. A refusal
/// by a listener that is up (a wrong secret, say) is not.
fn not_listening(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => source.kind() == std::io::ErrorKind::ConnectionRefused,
        Error::RemoteDisconnect { reason, .. } => reason.contains("os error 111"),
        _ => false,
    }
}

/// An agent: NIXL's `nixlAgent`, with the calls `_api.py` needs.
#[pyclass(module = "nixl._bindings", name = "nixlAgent", frozen)]
#[derive(Debug)]
struct PyAgent {
    shared: Arc<Shared>,
}

#[pymethods]
impl PyAgent {
    /// Builds an agent from a nixl-rs configuration (TOML, as `nixl-agent` reads it). With
    /// `listen_port` set, the `tcp` backend listens there (0: any free port) and loads the
    /// metadata peers push (`send_local_metadata`): NIXL's listen thread.
    #[new]
    #[pyo3(signature = (name, config_toml = "", listen_port = None, telemetry = false))]
    fn new(
        py: Python<'_>,
        name: &str,
        config_toml: &str,
        listen_port: Option<u16>,
        telemetry: bool,
    ) -> PyResult<Self> {
        init_logging();
        if name.is_empty() {
            return Err(PyValueError::new_err("agent name must not be empty"));
        }
        let mut config = Config::from_toml(config_toml).map_err(err)?;
        if let Some(port) = listen_port {
            config
                .tcp
                .listen_unless_set(std::net::SocketAddr::from(([0, 0, 0, 0], port)));
            config.accept_pushes_unless_set(true);
            if let Some(list) = &mut config.backends {
                if !list.iter().any(|b| b == "tcp") {
                    list.push("tcp".into());
                }
            }
        }
        let name = name.to_owned();
        let agent = py
            .allow_threads(|| {
                config
                    .backends()
                    .and_then(|b| config.agent_builder(name).backends(b).build())
            })
            .map_err(err)?;
        if listen_port.is_some() {
            // NIXL's listen thread is the tcp listener here: without it, peers could neither
            // fetch this agent's metadata nor send theirs, so say why instead of going on.
            if let Some(s) = agent.backends().iter().find(|s| s.name == BackendName::Tcp) {
                if let Some(why) = &s.unavailable {
                    agent.shutdown();
                    return Err(nixlBackendError::new_err(format!(
                        "the listen thread (tcp listener on {}) cannot run: {why}",
                        config.tcp.listen.map_or("?".into(), |a| a.to_string())
                    )));
                }
            }
        }
        Ok(PyAgent {
            shared: Arc::new(Shared {
                agent: Arc::new(agent),
                etcd: Mutex::new(None),
                auth: config.auth(),
                telemetry,
                costs: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn name(&self) -> String {
        self.shared.agent.name().to_owned()
    }

    /// Every backend given to the agent: `(name, None)` when running, `(name, reason)` when not.
    fn backends(&self) -> Vec<(String, Option<String>)> {
        self.shared
            .agent
            .backends()
            .iter()
            .map(|s| (s.name.as_str().to_owned(), s.unavailable.clone()))
            .collect()
    }

    /// The port of the `tcp` listener (None when it runs none).
    fn listen_port(&self) -> Option<u16> {
        listen_addrs_in(&self.shared.agent.metadata())
            .first()
            .map(|a| a.port())
    }

    /// Registers the descriptors (with the named backends only, when given).
    #[pyo3(signature = (descs, backends = Vec::new()))]
    fn register(&self, py: Python<'_>, descs: &RegDList, backends: Vec<String>) -> PyResult<()> {
        let list = list_of(descs.kind, &descs.descs)?;
        let names = backends
            .iter()
            .map(|b| backend_of(Some(b)).map(|n| n.expect("some")))
            .collect::<PyResult<Vec<_>>>()?;
        let a = &self.shared.agent;
        let reg = py.allow_threads(|| {
            // SAFETY: NIXL's contract, which `register_memory` documents and this package's
            // README repeats: the memory described stays allocated, readable and writable
            // until it is deregistered (or the agent goes), and peers may read and write it
            // at any time meanwhile. File, block and object descriptors carry no such contract.
            unsafe {
                if names.is_empty() {
                    a.register(&list)
                } else {
                    a.register_with(&list, &names)
                }
            }
        });
        // Registrations live until deregistered by descriptor, as in NIXL and the C ABI.
        reg.map_err(err)?.forget();
        Ok(())
    }

    /// Deregisters by the exact descriptors registered, waiting for transfers that use them.
    fn deregister(&self, py: Python<'_>, descs: &RegDList) -> PyResult<()> {
        let a = &self.shared.agent;
        py.allow_threads(|| a.deregister(descs.kind, &descs.descs))
            .map_err(err)
    }

    fn local_md<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.shared.agent.metadata_bytes())
    }

    /// Metadata of the regions holding `descs` (and the connection info).
    fn partial_md<'py>(&self, py: Python<'py>, descs: &RegDList) -> PyResult<Bound<'py, PyBytes>> {
        let list = list_of(descs.kind, &descs.descs)?;
        let md = self.shared.agent.partial_metadata(&list).map_err(err)?;
        Ok(PyBytes::new(py, &md.encode()))
    }

    fn load_remote_md(&self, md: &[u8]) -> PyResult<String> {
        self.shared.agent.load_remote(md).map_err(err)
    }

    fn invalidate_remote(&self, name: &str) -> PyResult<()> {
        self.shared.agent.invalidate_remote(name).map_err(err)
    }

    /// Whether peer `name` is loaded and describes every descriptor of `descs`.
    #[pyo3(signature = (name, descs = None))]
    fn check_remote(&self, name: &str, descs: Option<&XferDList>) -> bool {
        let list = match descs {
            Some(d) => match DescList::from_descs(d.kind, d.descs.clone()) {
                Ok(l) => l,
                Err(_) => return false,
            },
            None => DescList::new(MemKind::Dram),
        };
        self.shared.agent.check_remote(name, &list).is_ok()
    }

    /// The etcd endpoints this agent would use (`NIXL_ETCD_ENDPOINTS`), or None.
    #[staticmethod]
    fn etcd_endpoints() -> Option<String> {
        etcd_env().map(|c| c.endpoints.join(","))
    }

    /// Publishes this agent's metadata in etcd (NIXL's `send_local_metadata()` with no
    /// address), kept up to date until `etcd_unpublish` or the agent's end; again: at once.
    fn etcd_publish(&self, py: Python<'_>) -> PyResult<()> {
        let s = &self.shared;
        py.allow_threads(|| {
            let mut guard = s.etcd.lock();
            let (reg, publication) = etcd_state(&mut guard)?;
            match publication {
                Some(p) => p.refresh().map_err(etcd_err),
                None => {
                    *publication = Some(reg.publish(&s.agent).map_err(etcd_err)?);
                    Ok(())
                }
            }
        })
    }

    /// Deletes this agent's metadata from etcd (NIXL's `invalidate_local_metadata()` with no
    /// address): peers watching it drop it; peers that loaded it keep it until they are told
    /// otherwise. Not published is no error.
    fn etcd_unpublish(&self, py: Python<'_>) -> PyResult<()> {
        let s = &self.shared;
        py.allow_threads(|| {
            let p = s.etcd.lock().as_mut().and_then(|(_, p)| p.take());
            drop(p); // revokes the lease: the key goes
        });
        Ok(())
    }

    /// Loads `name`'s metadata from etcd (NIXL's `fetch_remote_metadata(name)` with no
    /// address): `True` when it was there and is loaded. When it is not there yet, a
    /// background thread keeps looking for `wait_ms` and loads it when it appears, so that
    /// `check_remote_metadata` turns true then (NIXL's fetch is asynchronous too).
    fn etcd_fetch(&self, py: Python<'_>, name: &str, wait_ms: u64) -> PyResult<bool> {
        let s = &self.shared;
        let reg = py.allow_threads(|| {
            let mut guard = s.etcd.lock();
            etcd_state(&mut guard).map(|(r, _)| r.clone())
        })?;
        if py
            .allow_threads(|| reg.load_peer(&s.agent, name))
            .map_err(etcd_err)?
        {
            return Ok(true);
        }
        let weak = Arc::downgrade(&s.agent);
        let name = name.to_owned();
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        std::thread::Builder::new()
            .name("nixl-etcd-fetch".into())
            .spawn(move || {
                while Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                    let Some(agent) = weak.upgrade() else { return };
                    match reg.load_peer(&agent, &name) {
                        Ok(true) => return,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(peer = %name, error = %e, "etcd: fetching a peer failed");
                            return;
                        }
                    }
                }
                tracing::warn!(peer = %name, "etcd: the peer did not appear in time");
            })
            .map_err(|e| nixlBackendError::new_err(format!("etcd: cannot start a thread: {e}")))?;
        Ok(false)
    }

    /// Fetches the metadata of the agent listening at `ip:port` (retrying while nothing
    /// listens there yet, until `timeout_ms`), loads it, and returns its name.
    fn fetch_remote_md(
        &self,
        py: Python<'_>,
        ip: &str,
        port: u16,
        timeout_ms: u64,
    ) -> PyResult<String> {
        let addr = port_addr(ip, port);
        let s = &self.shared;
        py.allow_threads(|| {
            let deadline = Instant::now() + Duration::from_millis(timeout_ms);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match fetch_metadata(&addr, &s.auth, left.max(Duration::from_millis(100))) {
                    Ok(md) => return s.agent.load_remote(&md),
                    Err(e)
                        if not_listening(&e)
                            && Instant::now() + Duration::from_millis(50) < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => return Err(e),
                }
            }
        })
        .map_err(err)
    }

    /// Pushes this agent's metadata (or the part describing `descs`) to the listener at
    /// `ip:port`, which loads it; returns the name it loaded it as.
    #[pyo3(signature = (ip, port, timeout_ms, descs = None))]
    fn send_md(
        &self,
        py: Python<'_>,
        ip: &str,
        port: u16,
        timeout_ms: u64,
        descs: Option<&RegDList>,
    ) -> PyResult<String> {
        let md = match descs {
            Some(d) => {
                let list = list_of(d.kind, &d.descs)?;
                self.shared
                    .agent
                    .partial_metadata(&list)
                    .map_err(err)?
                    .encode()
            }
            None => self.shared.agent.metadata_bytes(),
        };
        let addr = port_addr(ip, port);
        let auth = &self.shared.auth;
        py.allow_threads(|| {
            let deadline = Instant::now() + Duration::from_millis(timeout_ms);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match push_metadata(&addr, auth, &md, left.max(Duration::from_millis(100))) {
                    Err(e)
                        if not_listening(&e)
                            && Instant::now() + Duration::from_millis(50) < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    r => return r,
                }
            }
        })
        .map_err(err)
    }

    /// Asks the listener at `ip:port` to drop this agent's metadata (which it does only for the
    /// agent its connection proved, and only if it accepts pushes); returns whether it had it
    /// loaded. Nothing listening there is `False`: a gone peer holds nothing of this agent.
    fn invalidate_md(
        &self,
        py: Python<'_>,
        ip: &str,
        port: u16,
        timeout_ms: u64,
    ) -> PyResult<bool> {
        let addr = port_addr(ip, port);
        let s = &self.shared;
        let me = PeerIdentity::new(s.agent.name(), s.agent.instance_id());
        py.allow_threads(|| {
            match invalidate_metadata(&addr, &s.auth, &me, Duration::from_millis(timeout_ms)) {
                Err(e) if not_listening(&e) => Ok(false),
                r => r,
            }
        })
        .map_err(err)
    }

    /// Creates a request from two descriptor lists.
    #[pyo3(signature = (op, local, remote, peer, notif = None, backend = None))]
    #[allow(clippy::too_many_arguments)]
    fn create_xfer(
        &self,
        py: Python<'_>,
        op: &str,
        local: &XferDList,
        remote: &XferDList,
        peer: &str,
        notif: Option<Vec<u8>>,
        backend: Option<&str>,
    ) -> PyResult<XferReq> {
        let op = op_of(op)?;
        let local = list_of(local.kind, &local.descs)?;
        let remote = list_of(remote.kind, &remote.descs)?;
        let backend = backend_of(backend)?;
        XferReq::create(
            py,
            &self.shared,
            op,
            local,
            remote,
            peer.to_owned(),
            notif,
            backend,
        )
    }

    /// Prepares a descriptor list for `make_prepped`: `agent_name` empty means local.
    fn prep_dlist(&self, py: Python<'_>, agent_name: &str, descs: &XferDList) -> PreppedDlist {
        let peer = if agent_name.is_empty() || agent_name == "NIXL_INIT_AGENT" {
            None
        } else {
            Some(agent_name.to_owned())
        };
        let a = &self.shared.agent;
        let core = py.allow_threads(|| {
            let list = DescList::from_descs(descs.kind, descs.descs.clone()).ok()?;
            let prepped = match &peer {
                None => a.prep_local(&list),
                Some(p) => a.prep_remote(p, &list),
            };
            prepped.ok().map(Arc::new)
        });
        PreppedDlist {
            peer,
            kind: descs.kind,
            descs: Arc::new(descs.descs.clone()),
            released: AtomicBool::new(false),
            core,
        }
    }

    /// Creates a request from entries of two prepared lists, picked by index.
    #[pyo3(signature = (op, local, local_idx, remote, remote_idx, notif = None, backend = None))]
    #[allow(clippy::too_many_arguments)]
    fn make_prepped(
        &self,
        py: Python<'_>,
        op: &str,
        local: &PreppedDlist,
        local_idx: &Bound<'_, PyAny>,
        remote: &PreppedDlist,
        remote_idx: &Bound<'_, PyAny>,
        notif: Option<Vec<u8>>,
        backend: Option<&str>,
    ) -> PyResult<XferReq> {
        let op = op_of(op)?;
        if local.peer.is_some() {
            return Err(invalid(
                "the local side was prepared for a remote agent (prepare it with \"NIXL_INIT_AGENT\")",
            ));
        }
        let peer = remote
            .peer
            .clone()
            .ok_or_else(|| invalid("the remote side was prepared as local (name its agent)"))?;
        let pick = |p: &PreppedDlist, idx: &Bound<'_, PyAny>, side: &str| -> PyResult<Picked> {
            if p.released.load(Ordering::Acquire) {
                return Err(invalid(format!("the {side} prepared list was released")));
            }
            let idx = indices_from(idx, p.descs.len(), side)?;
            Ok(Picked {
                kind: p.kind,
                descs: Arc::clone(&p.descs),
                idx,
            })
        };
        let l = pick(local, local_idx, "local")?;
        let r = pick(remote, remote_idx, "remote")?;
        let backend = backend_of(backend)?;
        if let (Some(lp), Some(rp)) = (&local.core, &remote.core) {
            // From the core's prepared lists: one pass over the indices. Should that fail (a
            // region deregistered and registered again since the list was prepared, the peer's
            // metadata reloaded), the request is made from the descriptors below, whose answer
            // (request or error) is the one given.
            let opts = XferOptions {
                notif: notif.clone().filter(|n| !n.is_empty()),
                backend,
                deadline: None,
            };
            let a = &self.shared.agent;
            if let Ok(req) =
                py.allow_threads(|| a.create_xfer_prepped(op, lp, &l.idx, rp, &r.idx, opts))
            {
                return Ok(XferReq::new(
                    &self.shared,
                    req,
                    op,
                    Lists::Picked(l, r),
                    peer,
                    notif,
                    backend,
                ));
            }
        }
        let (l, r) = (l.list()?, r.list()?);
        XferReq::create(py, &self.shared, op, l, r, peer, notif, backend)
    }

    /// The notifications received since the last call: `{agent name: [bytes, ...]}`.
    fn get_notifs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for n in self.shared.agent.take_notifs() {
            let key = n.from.as_str();
            let msg = PyBytes::new(py, &n.msg);
            match out.get_item(key)? {
                Some(l) => l.downcast::<PyList>()?.append(msg)?,
                None => out.set_item(key, PyList::new(py, [msg])?)?,
            }
        }
        Ok(out)
    }

    /// Sends a notification of its own to `peer`.
    fn gen_notif(&self, py: Python<'_>, peer: &str, msg: &[u8]) -> PyResult<()> {
        let a = &self.shared.agent;
        py.allow_threads(|| a.send_notif(peer, msg)).map_err(err)
    }

    /// Names of the loaded peers.
    fn peers(&self) -> Vec<String> {
        self.shared.agent.peers()
    }
}

/// A descriptor list prepared for `make_prepped` (NIXL's prepped dlist handle).
#[pyclass(module = "nixl._bindings", name = "nixlPreppedDList", frozen)]
#[derive(Debug)]
struct PreppedDlist {
    /// The remote agent; `None` for the local side.
    peer: Option<String>,
    kind: MemKind,
    descs: Arc<Vec<Desc>>,
    released: AtomicBool,
    /// The list prepared in the core (`prep_local` / `prep_remote`) when that succeeded at
    /// `prep_dlist` time: requests are then made by index in one pass with no region lookups.
    /// `None` (memory not registered yet, the peer not loaded yet): requests are made from the
    /// descriptors, checked when they are made, as before.
    core: Option<Arc<PreppedList>>,
}

#[pymethods]
impl PreppedDlist {
    fn release(&self) {
        self.released.store(true, Ordering::Release);
    }
    fn __len__(&self) -> usize {
        self.descs.len()
    }
}

/// Per-request telemetry, as NIXL's `nixlXferTelemetry` (times in microseconds).
#[pyclass(module = "nixl._bindings", name = "nixlXferTelemetry", frozen, get_all)]
#[derive(Debug, Clone)]
struct Telemetry {
    #[pyo3(name = "startTime")]
    start_time: u64,
    #[pyo3(name = "postDuration")]
    post_duration: u64,
    #[pyo3(name = "xferDuration")]
    xfer_duration: u64,
    #[pyo3(name = "totalBytes")]
    total_bytes: u64,
    #[pyo3(name = "descCount")]
    desc_count: u64,
    /// nixl-rs: the backend that carried the request.
    backend: String,
}

#[derive(Debug)]
struct XState {
    req: Option<Arc<XferRequest>>,
    op: XferOp,
    /// What the request moves (to make it again with another notification).
    lists: Lists,
    peer: String,
    notif: Option<Vec<u8>>,
    backend: Option<BackendName>,
    /// Wall clock (µs since the epoch) and monotonic time of the last post.
    posted: Option<(u64, Instant)>,
    post_us: u64,
    done_us: Option<u64>,
    /// This request's last completed post durations (µs).
    samples: std::collections::VecDeque<u64>,
}

/// A transfer request: created once, posted many times. It holds its agent alive.
#[pyclass(module = "nixl._bindings", name = "nixlXferReq", frozen)]
#[derive(Debug)]
struct XferReq {
    shared: Arc<Shared>,
    st: Mutex<XState>,
}

const DONE: i32 = 0;
const PROC: i32 = 1;

fn status_of(st: XferStatus) -> PyResult<i32> {
    match st {
        XferStatus::Idle => Err(nixlNotPostedError::new_err("the request was never posted")),
        XferStatus::InProgress => Ok(PROC),
        XferStatus::Done => Ok(DONE),
        other => Err(err(other.into_result().expect_err("a failed state"))),
    }
}

impl XferReq {
    #[allow(clippy::too_many_arguments)]
    fn create(
        py: Python<'_>,
        shared: &Arc<Shared>,
        op: XferOp,
        local: DescList,
        remote: DescList,
        peer: String,
        notif: Option<Vec<u8>>,
        backend: Option<BackendName>,
    ) -> PyResult<XferReq> {
        let opts = XferOptions {
            notif: notif.clone().filter(|n| !n.is_empty()),
            backend,
            deadline: None,
        };
        let a = &shared.agent;
        let req = py
            .allow_threads(|| a.create_xfer(op, &local, &remote, &peer, opts))
            .map_err(err)?;
        Ok(XferReq::new(
            shared,
            req,
            op,
            Lists::Built(local, remote),
            peer,
            notif,
            backend,
        ))
    }

    fn new(
        shared: &Arc<Shared>,
        req: XferRequest,
        op: XferOp,
        lists: Lists,
        peer: String,
        notif: Option<Vec<u8>>,
        backend: Option<BackendName>,
    ) -> XferReq {
        let notif = notif.filter(|n| !n.is_empty());
        XferReq {
            shared: Arc::clone(shared),
            st: Mutex::new(XState {
                req: Some(Arc::new(req)),
                op,
                lists,
                peer,
                notif,
                backend,
                posted: None,
                post_us: 0,
                done_us: None,
                samples: std::collections::VecDeque::new(),
            }),
        }
    }
}

/// One side of a request made by index from a prepared list.
#[derive(Debug)]
struct Picked {
    kind: MemKind,
    descs: Arc<Vec<Desc>>,
    idx: Vec<u32>,
}

impl Picked {
    /// The descriptors the indices pick, as a list.
    fn list(&self) -> PyResult<DescList> {
        let v: Vec<Desc> = self.idx.iter().map(|&i| self.descs[i as usize]).collect();
        list_of(self.kind, &v)
    }
}

/// What a request moves: lists, or indices into prepared lists (made into lists only when the
/// request must be made again).
#[derive(Debug)]
enum Lists {
    Built(DescList, DescList),
    Picked(Picked, Picked),
}

impl Lists {
    fn get(&self) -> PyResult<(DescList, DescList)> {
        match self {
            Lists::Built(l, r) => Ok((l.clone(), r.clone())),
            Lists::Picked(l, r) => Ok((l.list()?, r.list()?)),
        }
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

impl XferReq {
    /// Notes a completed post's duration: for this request, and for its backend's fit.
    fn record(&self, st: &mut XState, req: &XferRequest, us: u64) {
        if st.samples.len() == OWN_SAMPLES {
            st.samples.pop_front();
        }
        st.samples.push_back(us);
        let mut costs = self.shared.costs.lock();
        costs
            .entry(req.backend())
            .or_default()
            .add(req.info().bytes, us);
    }

    /// The request, unless released. The state lock is only ever taken with the GIL held and
    /// never across a call that lets the GIL go, so it cannot deadlock against the GIL.
    fn req(&self) -> PyResult<Arc<XferRequest>> {
        self.st
            .lock()
            .req
            .clone()
            .ok_or_else(|| invalid("the request was released"))
    }
}

#[pymethods]
impl XferReq {
    /// Posts the request (with a new notification message when `notif` is not empty):
    /// `"DONE"` when it completed inline, `"PROC"` when it is in progress; the error otherwise.
    #[pyo3(signature = (notif = None))]
    fn post<'py>(&self, py: Python<'py>, notif: Option<&[u8]>) -> PyResult<Bound<'py, PyString>> {
        let mut req = self.req()?;
        if let Some(n) = notif.filter(|n| !n.is_empty()) {
            let (changed, op, local, remote, peer, backend) = {
                let st = self.st.lock();
                if st.notif.as_deref() == Some(n) {
                    (false, st.op, None, None, String::new(), None)
                } else {
                    let (l, r) = st.lists.get()?;
                    (true, st.op, Some(l), Some(r), st.peer.clone(), st.backend)
                }
            };
            if changed {
                // The message is part of a prepared request: prepare it again with this one.
                if matches!(req.status(), XferStatus::InProgress) {
                    return Err(err(Error::InFlight));
                }
                let opts = XferOptions {
                    notif: Some(n.to_vec()),
                    backend,
                    deadline: None,
                };
                let (local, remote) = (local.expect("set"), remote.expect("set"));
                let a = &self.shared.agent;
                let new = py
                    .allow_threads(|| a.create_xfer(op, &local, &remote, &peer, opts))
                    .map_err(err)?;
                let new = Arc::new(new);
                let old = {
                    let mut st = self.st.lock();
                    st.notif = Some(n.to_vec());
                    st.req.replace(Arc::clone(&new))
                };
                if let Some(old) = old {
                    py.allow_threads(|| old.release());
                }
                req = new;
            }
        }
        let t0 = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(micros)
            .unwrap_or(0);
        py.allow_threads(|| req.post()).map_err(err)?;
        let post_us = micros(t0.elapsed());
        let code = status_of(req.status());
        let mut st = self.st.lock();
        st.posted = Some((wall, t0));
        st.post_us = post_us;
        st.done_us = matches!(code, Ok(DONE)).then_some(post_us);
        if st.done_us.is_some() {
            self.record(&mut st, &req, post_us);
        }
        Ok(match code? {
            DONE => intern!(py, "DONE").clone(),
            _ => intern!(py, "PROC").clone(),
        })
    }

    /// `"DONE"` or `"PROC"` (NIXL's `check_xfer_state`); its error otherwise.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyString>> {
        Ok(match self.status()? {
            DONE => intern!(py, "DONE").clone(),
            _ => intern!(py, "PROC").clone(),
        })
    }

    /// 0 when the last post is done, 1 while in progress; its error otherwise.
    fn status(&self) -> PyResult<i32> {
        let mut st = self.st.lock();
        let Some(req) = st.req.as_ref() else {
            return Err(invalid("the request was released"));
        };
        let code = status_of(req.status())?;
        if code == DONE && st.done_us.is_none() {
            st.done_us = st.posted.map(|(_, t)| micros(t.elapsed()));
            if let (Some(us), Some(req)) = (st.done_us, st.req.clone()) {
                self.record(&mut st, &req, us);
            }
        }
        Ok(code)
    }

    /// `(duration µs, error margin µs, how)` of one post (NIXL's `estimateXferCost`): from this
    /// request's own completed posts when it has some (median, and the spread), else from the
    /// fit of its backend's posts in this agent (and the fit's residual, at least 10 %), else
    /// from the backend's configured latency and bandwidth (margin: the estimate itself).
    fn estimate(&self) -> PyResult<(u64, u64, &'static str)> {
        let st = self.st.lock();
        let req = st
            .req
            .as_ref()
            .ok_or_else(|| invalid("the request was released"))?;
        if !st.samples.is_empty() {
            let mut v: Vec<u64> = st.samples.iter().copied().collect();
            v.sort_unstable();
            let med = v[v.len() / 2];
            let spread = (v[v.len() - 1] - med).max(med - v[0]).max(1);
            return Ok((med, spread, "MEASURED_REQUEST"));
        }
        let bytes = req.info().bytes as f64;
        let fit = self.shared.costs.lock().get(&req.backend()).copied();
        if let Some((a, b, rms)) = fit.and_then(|f| f.line()) {
            let d = a + b * bytes;
            return Ok((
                d.round() as u64,
                rms.max(d * 0.1).round().max(1.0) as u64,
                "MEASURED_BACKEND",
            ));
        }
        let (lat, per_us) = cost_prior(req.backend());
        let d = (lat + bytes / per_us).round() as u64;
        Ok((d, d.max(1), "CONFIGURED"))
    }

    /// Blocks (without the GIL) until the last post ends or `timeout_ms` passes (< 0: no
    /// limit); then as `status`. A nixl-rs extension.
    fn wait(&self, py: Python<'_>, timeout_ms: i64) -> PyResult<i32> {
        let req = self.req()?;
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        py.allow_threads(|| req.wait_blocking(timeout));
        self.status()
    }

    /// Cancels the post in flight (it ends cancelled unless it had ended already).
    fn abort(&self) -> PyResult<()> {
        self.req()?.cancel();
        Ok(())
    }

    /// Cancels the post in flight, if any, and waits until no backend touches its memory.
    fn release(&self, py: Python<'_>) {
        let req = self.st.lock().req.take();
        if let Some(r) = req {
            py.allow_threads(|| r.release());
        }
    }

    /// The backend that carries the request ("shm", "tcp", ...).
    fn backend(&self) -> PyResult<String> {
        Ok(self.req()?.backend().as_str().to_owned())
    }

    /// Whether the request's device memory is staged through host memory (by which backend).
    fn staged(&self) -> PyResult<Option<String>> {
        Ok(self.req()?.info().staged.map(|b| b.as_str().to_owned()))
    }

    fn telemetry(&self) -> PyResult<Telemetry> {
        if !self.shared.telemetry {
            return Err(nixlNoTelemetryError::new_err(
                "telemetry is off (nixl_agent_config(capture_telemetry=True) turns it on)",
            ));
        }
        let _ = self.status();
        let st = self.st.lock();
        let req = st
            .req
            .as_ref()
            .ok_or_else(|| invalid("the request was released"))?;
        let (start, _) = st
            .posted
            .ok_or_else(|| nixlNotPostedError::new_err("the request was never posted"))?;
        Ok(Telemetry {
            start_time: start,
            post_duration: st.post_us,
            xfer_duration: st.done_us.unwrap_or(0),
            total_bytes: req.info().bytes,
            desc_count: req.info().descs as u64,
            backend: req.backend().as_str().to_owned(),
        })
    }
}

/// The backend names this build knows, with the memory types each registers locally.
#[pyfunction]
fn known_backends() -> HashMap<&'static str, Vec<&'static str>> {
    BackendName::ALL
        .iter()
        .map(|b| {
            let kinds: &[&str] = match b {
                BackendName::Local | BackendName::Shm | BackendName::Tcp => &["DRAM_SEG"],
                BackendName::Rdma => &["DRAM_SEG", "VRAM_SEG"],
                BackendName::Cuda => &["VRAM_SEG"],
                BackendName::Uring | BackendName::Posix => &["FILE_SEG", "BLK_SEG"],
                BackendName::Gds => &["VRAM_SEG", "DRAM_SEG", "FILE_SEG"],
                BackendName::Object => &["DRAM_SEG", "OBJ_SEG"],
                #[allow(unreachable_patterns)]
                _ => &[],
            };
            (b.as_str(), kinds.to_vec())
        })
        .collect()
}

#[pymodule]
fn _bindings(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyAgent>()?;
    m.add_class::<XferDList>()?;
    m.add_class::<RegDList>()?;
    m.add_class::<PreppedDlist>()?;
    m.add_class::<XferReq>()?;
    m.add_class::<Telemetry>()?;
    m.add_function(wrap_pyfunction!(deserialize_descs_safe, m)?)?;
    m.add_function(wrap_pyfunction!(known_backends, m)?)?;
    for (name, e) in [
        ("nixlNotPostedError", py.get_type::<nixlNotPostedError>()),
        (
            "nixlInvalidParamError",
            py.get_type::<nixlInvalidParamError>(),
        ),
        ("nixlBackendError", py.get_type::<nixlBackendError>()),
        ("nixlNotFoundError", py.get_type::<nixlNotFoundError>()),
        ("nixlMismatchError", py.get_type::<nixlMismatchError>()),
        ("nixlNotAllowedError", py.get_type::<nixlNotAllowedError>()),
        (
            "nixlRepostActiveError",
            py.get_type::<nixlRepostActiveError>(),
        ),
        ("nixlUnknownError", py.get_type::<nixlUnknownError>()),
        (
            "nixlNotSupportedError",
            py.get_type::<nixlNotSupportedError>(),
        ),
        (
            "nixlRemoteDisconnectError",
            py.get_type::<nixlRemoteDisconnectError>(),
        ),
        ("nixlCancelledError", py.get_type::<nixlCancelledError>()),
        (
            "nixlNoTelemetryError",
            py.get_type::<nixlNoTelemetryError>(),
        ),
        ("nixlTimeoutError", py.get_type::<nixlTimeoutError>()),
    ] {
        m.add(name, e)?;
    }
    for (name, v) in [
        ("DRAM_SEG", MemKind::Dram),
        ("VRAM_SEG", MemKind::Vram),
        ("BLK_SEG", MemKind::Block),
        ("OBJ_SEG", MemKind::Object),
        ("FILE_SEG", MemKind::File),
    ] {
        m.add(name, v.code())?;
    }
    m.add("NIXL_READ", 0)?;
    m.add("NIXL_WRITE", 1)?;
    m.add("NIXL_SUCCESS", DONE)?;
    m.add("NIXL_IN_PROG", PROC)?;
    m.add("NIXL_INIT_AGENT", "")?;
    m.add("DEFAULT_COMM_PORT", 8888)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_descs_round_trip_and_lies_are_refused() {
        let descs = vec![Desc::new(1, 2, 3), Desc::new(4, 5, 6)];
        let metas = vec!["a".to_owned(), "/tmp/x".to_owned()];
        let b = encode_descs(MemKind::File, true, &descs, &metas);
        let (k, reg, d, m) = decode_descs(&b).unwrap();
        assert_eq!((k, reg, &d, &m), (MemKind::File, true, &descs, &metas));
        let x = encode_descs(MemKind::Dram, false, &descs, &[]);
        assert_eq!(decode_descs(&x).unwrap().2, descs);
        // Every truncation, a huge count, bad magic, trailing bytes: errors, never a panic.
        for n in 0..x.len() {
            assert!(decode_descs(&x[..n]).is_err(), "prefix {n}");
        }
        let mut huge = x.clone();
        huge[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_descs(&huge).unwrap_err().contains("exceeds"));
        let mut bad = x.clone();
        bad[0] = b'X';
        assert!(decode_descs(&bad).is_err());
        let mut long = x;
        long.push(0);
        assert!(decode_descs(&long).is_err());
        assert!(decode_descs(b"\x80\x04pickle").is_err());
    }

    #[test]
    fn addresses_with_ports() {
        assert_eq!(port_addr("10.0.0.1", 5), "10.0.0.1:5");
        assert_eq!(port_addr("::1", 5), "[::1]:5");
        assert_eq!(port_addr("[::1]", 5), "[::1]:5");
    }
}
