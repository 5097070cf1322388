//! nixl-serve: the serving stack over nixl-rs, thin clients over the data layer.
//!
//! - [`model`]: a small deterministic reference transformer (byte-level, GQA, RoPE, RMSNorm).
//! - [`cache`]: its paged KV cache in registered memory laid out per `nixl_kv::KvLayout`, the
//!   block allocator with prefix reuse, and KV events. Tensor parallelism is "compute in full,
//!   KV split by heads": a worker of TP `U` holds `U` agents and regions, rank `r`'s region
//!   holding its slice of the KV heads, and the compute gathers the heads from the slices.
//! - [`engine`]: a worker's engine thread (aggregated, prefill, decode roles; pull handoffs
//!   with `nixl_kv::handoff`).
//! - [`worker`]: the worker's internal HTTP API (generate, prefill, cancel, KV events, load,
//!   metrics).
//! - [`frontend`]: the OpenAI-compatible frontend, worker choice, and request migration.
//! - [`up`]: a whole deployment as child processes on one host.
pub mod cache;
pub mod client;
pub mod engine;
pub mod frontend;
pub mod metrics;
pub mod model;
pub mod up;
pub mod worker;
