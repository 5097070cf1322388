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
//!
//! Files: `agent` (the agent handle and what its requests share), `descs` (descriptor lists
//! and their safe serialized form), `prepped` (prepared lists, indices), `xfer` (requests),
//! `cost` (the fit behind `estimate_xfer_cost`), `etcd` (the central metadata store),
//! `errors` (NIXL's exception classes).

#![allow(non_camel_case_types)]

use std::collections::HashMap;

use nixl_core::{BackendName, MemKind};
use pyo3::prelude::*;

use crate::agent::PyAgent;
use crate::descs::{deserialize_descs_safe, RegDList, XferDList};
use crate::prepped::PreppedDlist;
use crate::xfer::{Telemetry, XferReq, DONE, PROC};

mod agent;
mod cost;
mod descs;
mod errors;
mod etcd;
mod prepped;
mod xfer;

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
    m.add_class::<PyAgent>()?;
    m.add_class::<XferDList>()?;
    m.add_class::<RegDList>()?;
    m.add_class::<PreppedDlist>()?;
    m.add_class::<XferReq>()?;
    m.add_class::<Telemetry>()?;
    m.add_function(wrap_pyfunction!(deserialize_descs_safe, m)?)?;
    m.add_function(wrap_pyfunction!(known_backends, m)?)?;
    errors::add_to(m)?;
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
