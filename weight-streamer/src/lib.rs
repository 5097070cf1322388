//! Weight streaming across replicas: **not built yet**.
//!
//! This crate will hold the weight streamer: a source publishes a manifest of its registered
//! weights (tensor name, dtype, shape, byte range, checksum); replicas pull them with one-sided
//! READs through the public `nixl_core::Agent` API, verify them, and become sources themselves,
//! so scale-out fans out. Nothing here works today; it exists so the workspace has its final shape.
