//! Checkpoint and restore of ready-to-serve state: **not built yet**.
//!
//! This crate will capture named registered regions, artifacts and a manifest to a file tree or
//! an object store at storage speed, and restore them into freshly registered memory (or from a
//! peer that holds them), verified, through the public `nixl_core::Agent` API. Nothing here works
//! today; it exists so the workspace has its final shape.
