//! The C ABI of nixl-rs: **not built yet**.
//!
//! This crate will produce `libnixl.so` / `libnixl.a` and the cbindgen header `ffi/include/nixl.h`
//! with the fixed contract of issue 4 (opaque `nixl_agent` / `nixl_xfer` handles, numbered status
//! codes, `catch_unwind` at every export). It exports nothing today.
