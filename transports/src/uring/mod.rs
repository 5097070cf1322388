//! The `uring` backend: DRAM ↔ FILE through io_uring.
//!
//! Registrations and requests are those of [`crate::posix`] (FILE descriptors are
//! `(offset, length, fd)`; the agent names itself as the remote), and so are the checks made
//! when a request is created: the fd's mode, `O_DIRECT` alignment, the file regions' keys.
//!
//! The operations are planned when the request is created (one `readv`/`writev` per run of
//! contiguous file ranges on an fd, at most `max_io_bytes`). Posting puts them in the ring on the
//! posting thread, up to `queue_depth` in flight, all in one `io_uring_enter`, and reaps
//! whatever that already completed (buffered reads of cached pages finish inside the submit, so
//! such a request ends on the posting thread with no hand-off). A completion thread waits in the
//! kernel for the rest and refills the ring as completions arrive, rather than waiting op by
//! op. A completion that moved fewer
//! bytes than asked is resubmitted for the rest; `EINTR`/`EAGAIN` are retried; a read that
//! meets the end of the file, and every other error, fails the request with the fd and offset.
//!
//! At start the backend creates a ring: where io_uring is disabled (the
//! `kernel.io_uring_disabled` sysctl, a seccomp filter, an old kernel) it reports
//! `unavailable: <reason>` and the selection policy uses `posix` instead (the choice and the
//! reason are on the request). `[uring] enabled = false` turns it off by configuration.
//!
//! # Registered buffers and fixed files
//!
//! A FILE registration puts its fd in the ring's fixed-file table, so operations skip the
//! kernel's per-operation file lookup; a DRAM registration up to `max_fixed_buffer` bytes
//! becomes a registered buffer (its pages are pinned once, at registration, instead of on every
//! operation), and an operation whose memory is one piece inside such a buffer is sent as
//! `READ_FIXED`/`WRITE_FIXED`. Both tables are sparse (`fixed_files`, `fixed_buffers` entries)
//! and updated in place as regions come and go. Where the kernel refuses one (a memlock limit,
//! memory that cannot be pinned, a full table), that region simply goes through
//! `readv`/`writev`, and `debug` logs say so; nothing else changes. A fixed file refers to the
//! file that was registered: closing and reusing the fd number for another file does not
//! redirect the registration.

//!
//! The ring itself (slots, submission, completion thread) is in `ring`; the fixed-file and
//! registered-buffer tables in `fixed`. What every file backend shares (registrations,
//! connections, requests, posts) is [`crate::files`].

mod fixed;
mod ring;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::IoUring;
use nixl_core::{BackendName, Desc, Error, MemKind, Registered, Result, Unusable, XferPlan};

use crate::files::{check_storage_region, FileBackend, FileEngine, IoOp, Post};
use fixed::Fixed;
use ring::RingThread;

/// Settings of the `uring` backend (`[uring]` in the agent's configuration).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UringConfig {
    /// Operations kept in flight (and the ring's size).
    pub queue_depth: u32,
    /// Largest single operation.
    pub max_io_bytes: usize,
    /// `false` turns the backend off (it reports itself unavailable; `posix` serves files).
    pub enabled: bool,
    /// Entries of the fixed-file table (0: no fixed files).
    pub fixed_files: u32,
    /// Entries of the registered-buffer table (0: no registered buffers; the kernel allows
    /// 16384).
    pub fixed_buffers: u32,
    /// Largest DRAM registration made a registered buffer (the kernel's limit is 1 GiB).
    pub max_fixed_buffer: u64,
}

impl Default for UringConfig {
    fn default() -> UringConfig {
        UringConfig {
            queue_depth: 64,
            max_io_bytes: 1 << 20,
            enabled: true,
            fixed_files: 1024,
            fixed_buffers: 1024,
            max_fixed_buffer: 1 << 30,
        }
    }
}

/// The `uring` backend: the file skeleton run by an io_uring.
pub type UringBackend = FileBackend<UringEngine>;

impl UringBackend {
    /// A backend with these settings (the ring starts with the agent).
    pub fn new(cfg: UringConfig) -> UringBackend {
        FileBackend::with_engine(UringEngine { cfg })
    }

    /// Operations submitted since start: all of them, those that named a fixed file, and those
    /// sent as `READ_FIXED`/`WRITE_FIXED` from a registered buffer (zeros before start).
    pub fn op_counts(&self) -> UringCounts {
        self.running()
            .map(|r| {
                let c = &r.shared.counts;
                UringCounts {
                    ops: c[0].load(Ordering::Relaxed),
                    fixed_file_ops: c[1].load(Ordering::Relaxed),
                    fixed_buffer_ops: c[2].load(Ordering::Relaxed),
                }
            })
            .unwrap_or_default()
    }
}

/// The `uring` engine: one ring, filled by posting threads and a completion thread.
#[derive(Debug)]
pub struct UringEngine {
    cfg: UringConfig,
}

/// What [`UringBackend::op_counts`] reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringCounts {
    /// Operations submitted (resubmissions of partial ones included).
    pub ops: u64,
    /// Of those, naming a fixed file.
    pub fixed_file_ops: u64,
    /// Of those, reading or writing a registered buffer.
    pub fixed_buffer_ops: u64,
}

/// Why io_uring cannot be used, in words an operator can act on: `e` (from `io_uring_setup`)
/// kept as the source, `sysctl` the text of `kernel.io_uring_disabled` where it could be read.
pub(crate) fn unavailable_reason(e: io::Error, sysctl: Option<&str>) -> Unusable {
    let disabled = sysctl.map(str::trim).filter(|v| *v != "0");
    let context = match (e.raw_os_error(), disabled) {
        (_, Some(v)) => {
            format!("io_uring is disabled on this host (kernel.io_uring_disabled = {v})")
        }
        (Some(libc::ENOSYS), _) => "this kernel has no io_uring".into(),
        (Some(libc::EPERM), _) => {
            "io_uring is not permitted here (a seccomp filter or container policy)".into()
        }
        _ => "io_uring_setup failed".into(),
    };
    Unusable::failed(context, e)
}

/// A ring of `depth` entries (at least 2), or why this host cannot give one.
fn new_ring(depth: u32) -> std::result::Result<IoUring, Unusable> {
    let ring = IoUring::new(depth.max(2)).map_err(|e| {
        let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok();
        unavailable_reason(e, sysctl.as_deref())
    })?;
    if !ring.params().is_feature_ext_arg() {
        // The completion thread waits with a timeout (IORING_ENTER_EXT_ARG).
        return Err("this kernel's io_uring lacks IORING_FEAT_EXT_ARG (Linux 5.11+)".into());
    }
    Ok(ring)
}

impl FileEngine for UringEngine {
    type Running = RingThread;
    type Resolved = ();
    const NAME: BackendName = BackendName::Uring;
    const LOCAL_KINDS: &'static [MemKind] = &[MemKind::Dram, MemKind::File, MemKind::Block];
    const PREFERENCE: u8 = 5;
    const REMOTE_KINDS: &'static [MemKind] = &[MemKind::File, MemKind::Block];
    const MEM: MemKind = MemKind::Dram;

    fn max_io(&self) -> usize {
        self.cfg.max_io_bytes
    }

    fn probe(&self) -> std::result::Result<(), Unusable> {
        if !self.cfg.enabled {
            return Err("turned off by configuration ([uring] enabled = false)".into());
        }
        if self.cfg.queue_depth == 0 || self.cfg.max_io_bytes == 0 {
            return Err("[uring] queue_depth and max_io_bytes must be positive".into());
        }
        new_ring(2).map(drop)
    }

    fn start(&self) -> Result<RingThread> {
        let ring = new_ring(self.cfg.queue_depth).map_err(|why| Error::Unavailable {
            backend: BackendName::Uring,
            reason: why,
        })?;
        let fixed = Fixed::new(&ring, &self.cfg);
        RingThread::start(ring, self.cfg.queue_depth, fixed)
    }

    fn register(&self, run: Option<&RingThread>, kind: MemKind, desc: &Desc) -> Result<()> {
        check_storage_region(kind, desc)?;
        if let Some(r) = run {
            let sh = &r.shared;
            let fx = &mut sh.state.lock().fixed;
            match kind {
                MemKind::File | MemKind::Block => fx.add_file(&sh.ring, desc.dev_id as i32),
                MemKind::Dram => fx.add_buffer(&sh.ring, desc, self.cfg.max_fixed_buffer),
                _ => {}
            }
        }
        Ok(())
    }

    fn deregister(&self, run: &RingThread, region: Registered<'_>) {
        let sh = &run.shared;
        let fx = &mut sh.state.lock().fixed;
        match region.kind {
            MemKind::File | MemKind::Block => fx.remove_file(&sh.ring, region.desc.dev_id as i32),
            MemKind::Dram => fx.remove_buffer(&sh.ring, &region.desc),
            _ => {}
        }
    }

    fn resolve(_run: &RingThread, _plan: &XferPlan, _ops: &[IoOp]) -> Result<()> {
        Ok(())
    }

    fn stopping(run: &RingThread) -> &Arc<AtomicBool> {
        &run.shared.stopping
    }

    fn submit(run: &RingThread, post: Arc<Post>, _resolved: &Arc<()>) {
        run.shared.post(post);
    }

    fn stop(run: &RingThread) {
        run.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_lookup_finds_only_ranges_wholly_inside_one_buffer() {
        let mut fx = Fixed::default();
        fx.bufs.insert(1000, (2000, 3, 1));
        fx.bufs.insert(4096, (8192, 7, 1));
        assert_eq!(fx.buffer_of(1000, 1000), Some(3));
        assert_eq!(fx.buffer_of(1500, 10), Some(3));
        assert_eq!(fx.buffer_of(1999, 2), None, "runs past the end");
        assert_eq!(fx.buffer_of(999, 1), None, "starts before the first");
        assert_eq!(fx.buffer_of(3000, 10), None, "between buffers");
        assert_eq!(fx.buffer_of(8000, 192), Some(7));
        assert_eq!(fx.buffer_of(u64::MAX - 1, 5), None, "overflow");
    }

    #[test]
    fn unavailable_reasons_say_what_to_do_and_keep_the_cause() {
        use std::error::Error as _;
        let eperm = || io::Error::from_raw_os_error(libc::EPERM);
        for (e, sysctl, says) in [
            (eperm(), Some("2\n"), "kernel.io_uring_disabled = 2"),
            (eperm(), Some("0\n"), "seccomp"),
            (
                io::Error::from_raw_os_error(libc::ENOSYS),
                None,
                "no io_uring",
            ),
            (
                io::Error::from_raw_os_error(libc::ENOMEM),
                None,
                "io_uring_setup failed",
            ),
        ] {
            let cause = e.to_string();
            let r = unavailable_reason(e, sysctl);
            let text = r.to_string();
            assert!(text.contains(says) && text.ends_with(&cause), "{text}");
            let source = r.source().expect("the io error is the source");
            assert_eq!(source.to_string(), cause);
        }
    }
}
