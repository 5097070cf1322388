//! Criterion benches of nixl-rs (`cargo bench -p nixl-benches`); see BENCHMARKS.md.
//!
//! - `core`: descriptor validation, request creation, create + post + complete of a 4 KiB local
//!   transfer, post + complete of a prepared one, metadata encode and decode.
//! - `transfer`: the `local` backend's READ and WRITE at 64 KiB, 1 MiB and 64 MiB, with memcpy of
//!   the same sizes in the same group, so each figure stands next to its ceiling.
//!
//! The two-process `shm` figures come from `nixl-agent demo`, which measures memcpy in the same
//! run too. The `nixl-bench` binary measures `tcp` between two network namespaces next to iperf3
//! and ucx_perftest run between the same namespaces (`nixl_tests::peers`).
