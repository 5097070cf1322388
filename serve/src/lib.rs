//! nixl-serve: the serving stack over nixl-rs, thin clients over the data layer.
//!
//! - [`model`]: a small deterministic reference transformer (byte-level, GQA, RoPE, RMSNorm).
//! - [`cache`]: its paged KV cache in registered memory laid out per `nixl_kv::KvLayout`.
pub mod cache;
pub mod model;
