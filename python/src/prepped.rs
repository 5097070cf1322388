//! Prepared descriptor lists and requests made from them by index.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nixl_core::{Desc, DescList, MemKind, PreppedList};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::descs::list_of;
use crate::errors::invalid;

/// Indices from Python: packed native-endian int32 (a numpy array) or a sequence of ints.
/// Indices into a list of `n` entries, as `u32`: packed int32 (`bytes`, what `_api.py` makes of
/// a numpy array) or any iterable of ints. One pass, no intermediate list: a 56,000-entry array
/// is read straight into its final vector (a larger one costs page faults on first touch).
pub(crate) fn indices_from(obj: &Bound<'_, PyAny>, n: usize, side: &str) -> PyResult<Vec<u32>> {
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
    pub(crate) idx: Vec<u32>,
}

impl Picked {
    /// The descriptors the indices pick, as a list.
    pub(crate) fn list(&self) -> PyResult<DescList> {
        let v: Vec<Desc> = self.idx.iter().map(|&i| self.descs[i as usize]).collect();
        list_of(self.kind, &v)
    }
}
