//! Prepared descriptor lists and requests made from them by index.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nixl_core::{Desc, DescList, MemKind, PreppedList};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::descs::list_of;
use crate::errors::invalid;

/// Checked indices into a prepared list, as `u32`: the `bytes` Python gave (read in place, no
/// copy: a 56,000-entry array would otherwise cost another 220 KB of fresh memory, page faults
/// and all), or a vector.
#[derive(Debug)]
pub(crate) enum Indices {
    /// Packed native-endian int32 (what `_api.py` makes of a numpy array), 4-byte aligned, every
    /// value checked in range. A `bytes` object never changes, and this holds it alive.
    Packed(Py<PyBytes>),
    /// Any other iterable of ints, checked.
    Owned(Vec<u32>),
}

impl Indices {
    /// Indices into a list of `n` entries: packed int32 (`bytes`) or any iterable of ints. One
    /// pass; a packed array is checked where it is.
    pub(crate) fn from_py(obj: &Bound<'_, PyAny>, n: usize, side: &str) -> PyResult<Indices> {
        let out_of_range = |v: i64| {
            if v < 0 {
                invalid(format!("{side} index {v} is negative"))
            } else {
                invalid(format!(
                    "{side} index {v} out of range (the prepared list has {n})"
                ))
            }
        };
        if let Ok(b) = obj.downcast::<PyBytes>() {
            let raw = b.as_bytes();
            if raw.len() % 4 != 0 {
                return Err(invalid("packed indices: not a whole number of int32"));
            }
            if let Some(idx) = aligned_u32(raw) {
                // A negative int32 reads as 2^31 or more: out of range of any list of fewer.
                if let Some(&bad) = idx
                    .iter()
                    .find(|&&i| i as usize >= n || i > i32::MAX as u32)
                {
                    return Err(out_of_range(i64::from(bad as i32)));
                }
                return Ok(Indices::Packed(b.clone().unbind()));
            }
            return raw
                .chunks_exact(4)
                .map(|c| i32::from_ne_bytes(c.try_into().expect("4 bytes")))
                .map(|v| in_range(i64::from(v), n).ok_or_else(|| out_of_range(i64::from(v))))
                .collect::<PyResult<_>>()
                .map(Indices::Owned);
        }
        obj.try_iter()?
            .map(|x| {
                let v: i64 = x?.extract()?;
                in_range(v, n).ok_or_else(|| out_of_range(v))
            })
            .collect::<PyResult<_>>()
            .map(Indices::Owned)
    }

    /// The indices (the GIL held: a packed array is read where Python keeps it).
    pub(crate) fn as_slice<'a>(&'a self, py: Python<'a>) -> &'a [u32] {
        match self {
            Indices::Packed(b) => aligned_u32(b.as_bytes(py)).unwrap_or_default(),
            Indices::Owned(v) => v,
        }
    }
}

/// `v` as an index into a list of `n`, when in range. It fits in u32 unless the list is longer
/// than the core prepares (then the descriptors are used, and `u32::MAX` is never looked up).
fn in_range(v: i64, n: usize) -> Option<u32> {
    usize::try_from(v)
        .ok()
        .filter(|&i| i < n)
        .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
}

/// `raw` as native-endian u32s, in place, when it is 4-byte aligned and whole.
fn aligned_u32(raw: &[u8]) -> Option<&[u32]> {
    // SAFETY: every bit pattern is a valid u32; `align_to` puts in the middle only what is
    // aligned for it, and we take it only when nothing is left over at either end.
    let (pre, mid, post) = unsafe { raw.align_to::<u32>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// A descriptor list prepared for `make_prepped` (NIXL's prepped dlist handle).
#[pyclass(module = "nixl._bindings", name = "nixlPreppedDList", frozen)]
#[derive(Debug)]
pub(crate) struct PreppedDlist {
    /// The remote agent; `None` for the local side.
    pub(crate) peer: Option<String>,
    pub(crate) kind: MemKind,
    pub(crate) descs: Arc<Vec<Desc>>,
    pub(crate) released: AtomicBool,
    /// The list prepared in the core (`prep_local` / `prep_remote`) when that succeeded at
    /// `prep_dlist` time: requests are then made by index in one pass with no region lookups.
    /// `None` (memory not registered yet, the peer not loaded yet): requests are made from the
    /// descriptors, checked when they are made, as before.
    pub(crate) core: Option<Arc<PreppedList>>,
}

impl PreppedDlist {
    /// The entries of this list that `idx` picks (the `side` of a request).
    pub(crate) fn pick(&self, idx: &Bound<'_, PyAny>, side: &str) -> PyResult<Picked> {
        if self.released.load(Ordering::Acquire) {
            return Err(invalid(format!("the {side} prepared list was released")));
        }
        Ok(Picked {
            kind: self.kind,
            descs: Arc::clone(&self.descs),
            idx: Indices::from_py(idx, self.descs.len(), side)?,
        })
    }
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

/// One side of a request made by index from a prepared list.
#[derive(Debug)]
pub(crate) struct Picked {
    pub(crate) kind: MemKind,
    pub(crate) descs: Arc<Vec<Desc>>,
    pub(crate) idx: Indices,
}

impl Picked {
    /// The descriptors the indices pick, as a list.
    pub(crate) fn list(&self, py: Python<'_>) -> PyResult<DescList> {
        let idx = self.idx.as_slice(py);
        let v: Vec<Desc> = idx.iter().map(|&i| self.descs[i as usize]).collect();
        list_of(self.kind, &v)
    }
}
