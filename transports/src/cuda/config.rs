//! The `cuda` backend's settings (`[cuda]` in the agent's configuration).

use super::*;

use crate::config::de;

/// Settings of the `cuda` backend.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CudaConfig {
    /// Streams per device that a transfer's copies are spread over.
    pub streams_per_device: usize,
    /// Most descriptors one prepared transfer may have.
    pub max_batch: usize,
    /// Chunk size of the staged path (VRAM carried by a DRAM backend).
    pub staging_buffer_size: usize,
    /// Chunks in flight per staged request (its pinned buffer holds this many).
    pub staging_buffers: usize,
    /// Where the agent's Unix socket lives (created with mode 0700).
    pub socket_dir: PathBuf,
    /// Publish and use fabric handles when the device and the allocation support them.
    pub allow_fabric: bool,
    /// How long a request on a peer's socket (fd grant, announcement, notification) may take;
    /// also how long a deregistration waits for peers to give up their mappings, and how long a
    /// peer waits for its copies in flight before giving one up.
    #[serde(rename = "op_timeout_ms", deserialize_with = "de::millis")]
    pub op_timeout: Duration,
    /// How long `post` itself may poll the copies of a request of at most
    /// [`INLINE_MAX_BYTES`] (plus a microsecond per MB, the copy's own time at about 1 TB/s)
    /// before handing them to the completion thread; a request done by then completes on the
    /// posting thread, with no thread hand-off (measured on an H200: a 4 KiB request's median
    /// latency from 27 µs to 13 µs, against 11 µs for the bare copy). Zero turns it off.
    #[serde(rename = "inline_wait_us", deserialize_with = "de::micros")]
    pub inline_wait: Duration,
    /// Enqueue a request's copies with `cuMemcpyBatchAsync` (CUDA 12.8+; one driver call per
    /// 4096 copies) instead of one `cuMemcpyDtoDAsync` each. On by default: measured on an H200,
    /// 1024 scattered 64 KiB blocks took 5.0 ms as single copies (about 5 µs a call).
    pub batch_copies: bool,
    /// Copy a request's many small runs with one launch of a gather kernel (its table uploaded
    /// once, when the request is prepared) instead of a driver call per run: used for a part of
    /// at least `copy::GATHER_MIN_RUNS` runs averaging at most `copy::GATHER_MAX_AVG` bytes.
    pub gather_kernel: bool,
}

/// Largest request whose copies `post` polls itself (see [`CudaConfig::inline_wait`]).
pub const INLINE_MAX_BYTES: u64 = 64 << 20;

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            streams_per_device: 4,
            max_batch: 1 << 20,
            staging_buffer_size: 8 << 20,
            staging_buffers: 4,
            socket_dir: crate::unix::default_socket_dir(),
            allow_fabric: true,
            op_timeout: Duration::from_secs(5),
            inline_wait: Duration::from_micros(20),
            batch_copies: true,
            gather_kernel: true,
        }
    }
}
