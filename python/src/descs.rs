//! Descriptor lists from Python (`nixlXferDList`, `nixlRegDList`) and their safe serialized form.

use nixl_core::{Desc, DescList, MemKind};
use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::errors::{err, invalid};

pub(crate) fn kind_of(code: i64) -> PyResult<MemKind> {
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
pub(crate) const MAX_META: usize = 4096;

/// Descriptors from Python: packed native-endian u64 triplets (what `_api.py` makes of an Nx3
/// numpy array), or a sequence of `(addr, len, dev)` / `(addr, len, dev, meta)` tuples.
pub(crate) fn descs_from(
    obj: &Bound<'_, PyAny>,
    with_meta: bool,
) -> PyResult<(Vec<Desc>, Vec<String>)> {
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

pub(crate) fn list_of(kind: MemKind, descs: &[Desc]) -> PyResult<DescList> {
    DescList::from_descs(kind, descs.to_vec()).map_err(err)
}

/// The safe serialized form of a descriptor list: magic, kind, flags, count, rows.
pub(crate) const SAFE_MAGIC: &[u8; 8] = b"NIXLRSD1";
/// Most descriptors a serialized list may hold (a 64 MiB document at 24 bytes a row, or so).
pub(crate) const MAX_SERIAL_DESCS: usize = 1 << 22;

pub(crate) fn encode_descs(kind: MemKind, reg: bool, descs: &[Desc], metas: &[String]) -> Vec<u8> {
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

pub(crate) type Decoded = (MemKind, bool, Vec<Desc>, Vec<String>);

pub(crate) fn decode_descs(b: &[u8]) -> Result<Decoded, String> {
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
pub(crate) struct XferDList {
    pub(crate) kind: MemKind,
    pub(crate) descs: Vec<Desc>,
}

/// A list of registration descriptors `(addr, len, dev, meta)` of one memory type.
#[pyclass(module = "nixl._bindings", name = "nixlRegDList", frozen)]
#[derive(Debug)]
pub(crate) struct RegDList {
    pub(crate) kind: MemKind,
    pub(crate) descs: Vec<Desc>,
    metas: Vec<String>,
}

/// The position of row `i` (negative: from the end) of a list of `n`.
pub(crate) fn row(n: usize, i: isize) -> PyResult<usize> {
    let j = if i < 0 { i + n as isize } else { i };
    usize::try_from(j)
        .ok()
        .filter(|&j| j < n)
        .ok_or_else(|| PyIndexError::new_err("descriptor index out of range"))
}

/// What pickling stores of a list: its class and `(mem_type, rows)`.
pub(crate) fn reduce<'py>(
    obj: &Bound<'py, PyAny>,
    kind: MemKind,
    rows: Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyTuple>> {
    let args = (kind.code(), rows).into_pyobject(obj.py())?;
    PyTuple::new(obj.py(), [obj.get_type().into_any(), args.into_any()])
}

pub(crate) fn desc_tuple<'py>(py: Python<'py>, d: &Desc) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(py, [d.addr, d.len, d.dev_id])
}

/// The `#[pymethods]` of a descriptor list class (`$ty`, named `$name` in Python): the
/// methods both kinds of list have, and then the class's own (`$own`).
macro_rules! list_methods {
    ($ty:ident, $name:literal, $($own:tt)*) => {
        #[pymethods]
        impl $ty {
            fn __len__(&self) -> usize {
                self.descs.len()
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
            fn __repr__(&self) -> String {
                format!(concat!($name, "({}, {} descriptors)"), self.kind, self.descs.len())
            }
            $($own)*
        }
    };
}

list_methods! {
    XferDList, "nixlXferDList",
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
    fn __getitem__<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Bound<'py, PyTuple>> {
        desc_tuple(py, &self.descs[row(self.descs.len(), i)?])
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .downcast::<XferDList>()
            .is_ok_and(|o| o.get().kind == self.kind && o.get().descs == self.descs)
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

list_methods! {
    RegDList, "nixlRegDList",
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
    fn __getitem__<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Bound<'py, PyTuple>> {
        let j = row(self.descs.len(), i)?;
        let d = &self.descs[j];
        (d.addr, d.len, d.dev_id, self.metas[j].clone()).into_pyobject(py)
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
pub(crate) fn deserialize_descs_safe(py: Python<'_>, data: &[u8]) -> PyResult<PyObject> {
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
}
