//! Benches of nixl-rs: the `nixl-bench` harness and the criterion benches
//! (`cargo bench -p nixl-benches`); see BENCHMARKS.md.
//!
//! - `nixl-bench` (`src/bin/nixl-bench/`: `main.rs` the flags, `setup.rs` the topologies,
//!   `transfer.rs`, `cuda.rs` and `storage.rs` their rows): one row per block size, batch and
//!   op, with GB/s, requests/s, post-to-complete latency and the backend actually used, for
//!   the `local` (one process), `shm` (two processes on one node) and `tcp` (two processes in
//!   two network namespaces) topologies; with `--compare`, the ceiling (memcpy for `local` and `shm`, iperf3
//!   for `tcp`) and the peer (ucx_perftest over shared memory or TCP) measured in the same run.
//!   The pieces it shares with its tests live in [`harness`]; the storage topology (`uring`,
//!   `posix` next to fio) in [`storage`], the object-store one in [`object`], the
//!   `cuda` one (two processes, VRAM to VRAM, next to `cuMemcpyDtoDAsync`) in [`cuda`].
//! - `core`: descriptor validation, request creation, create + post + complete of a 4 KiB local
//!   transfer, post + complete of a prepared one, metadata encode and decode.
//! - `transfer`: the `local` backend's READ and WRITE at 64 KiB, 1 MiB and 64 MiB, with memcpy of
//!   the same sizes in the same group, so each figure stands next to its ceiling.

pub mod cuda;
pub mod harness;
pub mod object;
pub mod storage;
