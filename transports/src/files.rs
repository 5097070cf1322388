//! What the file backends (`posix`, `uring`) need to know about a caller's fd: that it is an
//! open regular file or block device, how it was opened (read, write, `O_DIRECT`), and for
//! `O_DIRECT` the alignment the kernel requires of memory, offsets and lengths, so a misaligned
//! request is refused when it is created, naming the descriptor and the alignment, instead of
//! failing with a bare `EINVAL` half-way through.
//!
//! And what they share to run a request: `prepare_files` checks the file regions and cuts
//! the request into I/O operations (`IoOp`, at most [`MAX_IOV`] pieces each), and a `Post`
//! tracks one post of them across the threads that run them (the `posix` workers, the `uring`
//! ring thread, the `gds` workers); the last operation to finish completes the request.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use nixl_core::region::{enter_all, leave_all, Ticket};
use nixl_core::{
    BackendName, Completion, Desc, Error, MemKind, PeerInfo, Region, Result, TargetHandle, XferOp,
    XferPlan,
};
use parking_lot::Mutex;

/// How an fd was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// Opened for reading.
    pub readable: bool,
    /// Opened for writing.
    pub writable: bool,
    /// Opened with `O_DIRECT`.
    pub direct: bool,
    /// For `O_DIRECT`: required alignment of memory addresses (bytes).
    pub mem_align: u64,
    /// For `O_DIRECT`: required alignment of file offsets and lengths (bytes).
    pub offset_align: u64,
}

/// The agent a storage backend (`uring`, `posix`, `object`) serves: storage is reached only by
/// its own agent, which names itself as the remote. Holds the agent's target handle from
/// `start` to `shutdown` and answers `conn_info`, `can_reach` and the check in `connect`.
#[derive(Debug, Default)]
pub struct OwnAgent {
    target: Mutex<Option<TargetHandle>>,
}

impl OwnAgent {
    /// Set at start.
    pub fn set(&self, target: TargetHandle) {
        *self.target.lock() = Some(target);
    }

    /// Cleared at shutdown.
    pub fn clear(&self) {
        self.target.lock().take();
    }

    /// The connection info: the agent's instance id.
    pub fn conn_info(&self) -> Vec<u8> {
        let instance = self.target.lock().as_ref().map_or(0, |t| t.instance_id());
        instance.to_le_bytes().to_vec()
    }

    /// Only the agent itself is reachable.
    pub fn can_reach(&self, conn_info: &[u8], what: &str) -> std::result::Result<(), String> {
        if conn_info == self.conn_info().as_slice() {
            Ok(())
        } else {
            Err(format!(
                "{what} are reached by their own agent only (name the agent itself as the remote)"
            ))
        }
    }

    /// The target handle for a connection to `peer`, which must be the agent itself.
    pub fn connect(&self, backend: BackendName, peer: &PeerInfo<'_>) -> Result<TargetHandle> {
        let target = self
            .target
            .lock()
            .clone()
            .ok_or_else(|| Error::Shutdown(format!("{backend} backend not started")))?;
        if peer.instance_id != target.instance_id() {
            return Err(Error::Backend {
                backend,
                op: "connect",
                reason: format!(
                    "'{}' is another agent: {backend} reaches this agent's storage only",
                    peer.name
                ),
            });
        }
        Ok(target)
    }
}

/// Checks a storage region at registration: FILE regions name a regular file or a block
/// device; BLOCK regions name a block device (`(offset, len, fd)` of a raw device, e.g. an
/// NVMe namespace or a loop device, usually opened with `O_DIRECT`) and must lie inside it.
pub fn check_storage_region(kind: MemKind, desc: &Desc) -> Result<()> {
    match kind {
        MemKind::File => inspect_fd(desc.dev_id).map(drop),
        MemKind::Block => {
            inspect_fd(desc.dev_id)?;
            let size = block_device_size(desc.dev_id)?;
            let end = desc.addr.checked_add(desc.len);
            if end.is_none_or(|e| e > size) {
                return Err(Error::InvalidArgument(format!(
                    "BLOCK region {:#x}+{} ends past the end of the device behind fd {} ({size}                      bytes)",
                    desc.addr, desc.len, desc.dev_id
                )));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The size of the block device open as `fd` (`BLKGETSIZE64`); an error if `fd` is not one.
pub fn block_device_size(fd: u64) -> Result<u64> {
    let raw = i32::try_from(fd)
        .map_err(|_| Error::InvalidArgument(format!("BLOCK descriptor: fd {fd} is not an fd")))?;
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer; an invalid fd is reported, not UB.
    if unsafe { libc::fstat(raw, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFBLK {
        return Err(Error::InvalidArgument(format!(
            "BLOCK descriptor: fd {fd} is not an open block device (register files as FILE)"
        )));
    }
    /// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`.
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`, on a block device checked above.
    if unsafe { libc::ioctl(raw, BLKGETSIZE64, &mut size) } != 0 {
        return Err(Error::io(
            format!("ioctl(BLKGETSIZE64) on fd {fd}"),
            io::Error::last_os_error(),
        ));
    }
    Ok(size)
}

/// Alignment assumed for `O_DIRECT` when the kernel does not say (`statx` without
/// `STATX_DIOALIGN`, before Linux 6.1): the page size covers every common device.
const FALLBACK_ALIGN: u64 = 4096;

/// Inspects `fd` (the `dev_id` of a FILE descriptor).
pub fn inspect_fd(fd: u64) -> Result<FileInfo> {
    let raw = i32::try_from(fd).map_err(|_| {
        Error::InvalidArgument(format!("FILE descriptor: fd {fd} is not a file descriptor"))
    })?;
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer; an invalid fd is reported, not UB.
    if unsafe { libc::fstat(raw, &mut st) } != 0 {
        return Err(Error::InvalidArgument(format!(
            "FILE descriptor: fd {fd} is not an open file descriptor ({})",
            io::Error::last_os_error()
        )));
    }
    let fmt = st.st_mode & libc::S_IFMT;
    if fmt != libc::S_IFREG && fmt != libc::S_IFBLK {
        return Err(Error::InvalidArgument(format!(
            "FILE descriptor: fd {fd} is not a regular file or block device"
        )));
    }
    // SAFETY: F_GETFL takes no argument and only reads the fd's flags.
    let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if fl < 0 {
        return Err(Error::io(
            format!("fcntl(F_GETFL) on fd {fd}"),
            io::Error::last_os_error(),
        ));
    }
    let acc = fl & libc::O_ACCMODE;
    let direct = fl & libc::O_DIRECT != 0;
    let (mem_align, offset_align) = if direct { dio_align(raw) } else { (1, 1) };
    Ok(FileInfo {
        readable: acc == libc::O_RDONLY || acc == libc::O_RDWR,
        writable: acc == libc::O_WRONLY || acc == libc::O_RDWR,
        direct,
        mem_align,
        offset_align,
    })
}

/// `O_DIRECT` alignment of memory and offsets, from `statx(STATX_DIOALIGN)`.
fn dio_align(fd: i32) -> (u64, u64) {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: empty path with AT_EMPTY_PATH names `fd` itself; `stx` is writable.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0 {
        (
            u64::from(stx.stx_dio_mem_align.max(1)),
            u64::from(stx.stx_dio_offset_align),
        )
    } else {
        (FALLBACK_ALIGN, FALLBACK_ALIGN)
    }
}

/// Checks that `fd` can serve `op`, and for `O_DIRECT` that every (memory, file) pair of the
/// request is aligned as the kernel requires.
pub fn check_request(
    info: &FileInfo,
    fd: u64,
    op: XferOp,
    pairs: &[(usize, Desc, Desc)],
) -> Result<()> {
    match op {
        XferOp::Write if !info.writable => {
            return Err(Error::InvalidArgument(format!(
                "WRITE into fd {fd}, which is not open for writing"
            )))
        }
        XferOp::Read if !info.readable => {
            return Err(Error::InvalidArgument(format!(
                "READ from fd {fd}, which is not open for reading"
            )))
        }
        _ => {}
    }
    if !info.direct {
        return Ok(());
    }
    for (index, mem, file) in pairs {
        if mem.addr % info.mem_align != 0 {
            return Err(Error::InvalidArgument(format!(
                "descriptor {index}: fd {fd} is O_DIRECT, which needs memory aligned to {} bytes; \
                 address {:#x} is not (allocate aligned, or open the file without O_DIRECT)",
                info.mem_align, mem.addr
            )));
        }
        if file.addr % info.offset_align != 0 || file.len % info.offset_align != 0 {
            return Err(Error::InvalidArgument(format!(
                "descriptor {index}: fd {fd} is O_DIRECT, which needs offsets and lengths in \
                 multiples of {} bytes; this one is offset {} length {} (pad it, or open the \
                 file without O_DIRECT)",
                info.offset_align, file.addr, file.len
            )));
        }
    }
    Ok(())
}

/// Most pieces in one `preadv`/`pwritev` (Linux's `IOV_MAX`).
pub const MAX_IOV: usize = 1024;

/// One `preadv`/`pwritev`: file range `[offset, offset + len)` of `fd`, to or from `pieces`.
#[derive(Clone, Debug)]
pub(crate) struct IoOp {
    pub(crate) fd: i32,
    pub(crate) offset: u64,
    /// (address, length) in registered DRAM, in file order.
    pub(crate) pieces: Vec<(u64, u64)>,
}

impl IoOp {
    pub(crate) fn len(&self) -> u64 {
        self.pieces.iter().map(|p| p.1).sum()
    }
}

/// Cuts the segments into operations: contiguous file ranges on one fd are merged (up to
/// `MAX_IOV` pieces and `max_io` bytes), long ones split.
pub(crate) fn plan_ops(segments: &[(Desc, Desc)], max_io: u64) -> Vec<IoOp> {
    let mut ops: Vec<IoOp> = Vec::new();
    for (mem, file) in segments {
        let mut done = 0u64;
        while done < mem.len {
            let (addr, off) = (mem.addr + done, file.addr + done);
            let fd = file.dev_id as i32;
            let room = match ops.last() {
                Some(op)
                    if op.fd == fd
                        && op.offset + op.len() == off
                        && op.pieces.len() < MAX_IOV
                        && op.len() < max_io =>
                {
                    max_io - op.len()
                }
                _ => {
                    ops.push(IoOp {
                        fd,
                        offset: off,
                        pieces: Vec::new(),
                    });
                    max_io
                }
            };
            let take = room.min(mem.len - done);
            let op = ops.last_mut().expect("pushed above");
            match op.pieces.last_mut() {
                Some(last) if last.0 + last.1 == addr => last.1 += take,
                _ => op.pieces.push((addr, take)),
            }
            done += take;
        }
    }
    ops
}

/// The I/O operations of a request and the file regions each post holds.
pub(crate) type FilePlan = (Arc<[IoOp]>, Arc<[Arc<Region>]>);

/// (index in the request, memory, file) of one descriptor pair.
pub(crate) type Pair = (usize, Desc, Desc);

/// What the file backends prepare from a plan: the owner-side check of every file region
/// (held on each post), the per-fd checks, and the I/O operations. `mem` is the memory kind
/// the backend moves to and from files (DRAM, or VRAM for `gds`).
pub(crate) fn prepare_files(
    backend: BackendName,
    target: &TargetHandle,
    plan: &XferPlan,
    max_io: usize,
    mem: MemKind,
) -> Result<FilePlan> {
    if plan.local_kind != mem || !matches!(plan.remote_kind, MemKind::File | MemKind::Block) {
        return Err(Error::InvalidArgument(format!(
            "{backend} moves {mem} <-> FILE or BLOCK, not {} <-> {}",
            plan.local_kind, plan.remote_kind
        )));
    }
    let mut remote_regions = Vec::with_capacity(plan.remote_regions.len());
    for (i, r) in plan.remote_regions.iter().enumerate() {
        let access = target
            .check(r.kind, &r.desc, r.key)
            .map_err(|denied| Error::Denied {
                peer: target.name().to_owned(),
                reason: format!("file region {i} {:?}: {denied}", r.desc),
            })?;
        remote_regions.push(Arc::clone(access.region()));
    }
    check_files(plan)?;
    let segs: Vec<(Desc, Desc)> = plan.segments.iter().map(|s| (s.local, s.remote)).collect();
    let ops = plan_ops(&segs, max_io.max(1) as u64);
    Ok((ops.into(), remote_regions.into()))
}

/// Checks every fd of the request: open for the operation, and for `O_DIRECT` every
/// descriptor aligned. Checked when the request is created rather than cached at
/// registration, since fd numbers are reused.
pub(crate) fn check_files(plan: &XferPlan) -> Result<()> {
    let mut by_fd: Vec<(u64, Vec<Pair>)> = Vec::new();
    for (i, s) in plan.segments.iter().enumerate() {
        let fd = s.remote.dev_id;
        match by_fd.iter_mut().find(|(f, _)| *f == fd) {
            Some((_, v)) => v.push((i, s.local, s.remote)),
            None => by_fd.push((fd, vec![(i, s.local, s.remote)])),
        }
    }
    for (fd, pairs) in &by_fd {
        let mut info = inspect_fd(*fd)?;
        if plan.local_kind != MemKind::Dram {
            // Device memory reaches O_DIRECT files through its backend's own alignment rules
            // (cuFile bounces what is not aligned); only file offsets are checked here.
            info.mem_align = 1;
        }
        check_request(&info, *fd, plan.op, pairs)?;
    }
    Ok(())
}

/// One post in progress: shared by the threads that run its operations (the `posix` workers,
/// or the `uring` ring thread). The last operation to finish completes the request.
pub(crate) struct Post {
    pub(crate) op: XferOp,
    pub(crate) ops: Arc<[IoOp]>,
    left: AtomicUsize,
    failed: Mutex<Option<Error>>,
    done: Mutex<Option<Completion>>,
    abandoned: AtomicBool,
    regions: Arc<[Arc<Region>]>,
    ticket: Option<Ticket>,
    /// The backend is stopping (shared with its workers).
    pub(crate) stopping: Arc<AtomicBool>,
}

impl Drop for Post {
    fn drop(&mut self) {
        leave_all(&self.regions, |r| &r.gate, self.ticket);
    }
}

impl Post {
    /// Holds the file regions and starts a post of `ops`; `Err` gives the completion back
    /// with the reason when a region was deregistered.
    pub(crate) fn start(
        op: XferOp,
        ops: &Arc<[IoOp]>,
        regions: &Arc<[Arc<Region>]>,
        done: Completion,
        stopping: &Arc<AtomicBool>,
    ) -> Option<Arc<Post>> {
        let ticket = match enter_all(regions, |r| &r.gate) {
            Ok(t) => t,
            Err(i) => {
                let peer = done.info().peer.to_string();
                done.complete(Err(Error::Denied {
                    peer,
                    reason: format!("file region {:?} was deregistered", regions[i].desc),
                }));
                return None;
            }
        };
        Some(Arc::new(Post {
            op,
            ops: Arc::clone(ops),
            left: AtomicUsize::new(ops.len()),
            failed: Mutex::new(None),
            done: Mutex::new(Some(done)),
            abandoned: AtomicBool::new(false),
            regions: Arc::clone(regions),
            ticket,
            stopping: Arc::clone(stopping),
        }))
    }

    /// Whether the next operation should not run: the post failed, was cancelled or timed
    /// out, or the backend is stopping (which fails the post as Cancelled).
    pub(crate) fn should_skip(&self) -> bool {
        if self.stopping.load(Ordering::Acquire) && !self.abandoned.swap(true, Ordering::AcqRel) {
            self.record(Err(Error::Cancelled));
        }
        self.abandoned.load(Ordering::Acquire)
            || self
                .done
                .lock()
                .as_ref()
                .is_none_or(Completion::is_abandoned)
    }

    /// Records an operation's outcome (the first error wins).
    pub(crate) fn record(&self, r: Result<()>) {
        if let Err(e) = r {
            self.abandoned.store(true, Ordering::Release);
            let mut f = self.failed.lock();
            if f.is_none() {
                *f = Some(e);
            }
        }
    }

    /// One operation is over (run, failed or skipped); the last one completes the request.
    pub(crate) fn finish_one(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A cancelled or timed-out post has already ended: `complete` then changes nothing.
            let outcome = match self.failed.lock().take() {
                Some(e) => Err(e),
                None => Ok(()),
            };
            if let Some(done) = self.done.lock().take() {
                done.complete(outcome);
            }
        }
    }
}

impl fmt::Debug for Post {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Post")
            .field("ops", &self.ops.len())
            .field("left", &self.left.load(Ordering::Relaxed))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn bad_fds_are_refused_with_the_reason() {
        let e = inspect_fd(987_654).unwrap_err().to_string();
        assert!(e.contains("not an open file descriptor"), "{e}");
        let e = inspect_fd(u64::MAX).unwrap_err().to_string();
        assert!(e.contains("not a file descriptor"), "{e}");
        let dir = std::fs::File::open("/").unwrap();
        let e = inspect_fd(dir.as_raw_fd() as u64).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn direct_io_misalignment_names_the_descriptor_and_the_alignment() {
        let info = FileInfo {
            readable: true,
            writable: true,
            direct: true,
            mem_align: 512,
            offset_align: 4096,
        };
        let ok = (0, Desc::new(8192, 4096, 0), Desc::new(4096, 4096, 3));
        assert!(check_request(&info, 3, XferOp::Read, &[ok]).is_ok());
        let e = check_request(
            &info,
            3,
            XferOp::Read,
            &[ok, (1, Desc::new(8193, 4096, 0), Desc::new(0, 4096, 3))],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("descriptor 1") && e.contains("512"), "{e}");
        let e = check_request(
            &info,
            3,
            XferOp::Write,
            &[(2, Desc::new(0, 100, 0), Desc::new(0, 100, 3))],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("descriptor 2") && e.contains("4096"), "{e}");
        let ro = FileInfo {
            writable: false,
            direct: false,
            ..info
        };
        let e = check_request(&ro, 3, XferOp::Write, &[ok])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not open for writing"), "{e}");
    }

    fn seg(addr: u64, off: u64, len: u64, fd: u64) -> (Desc, Desc) {
        (Desc::new(addr, len, 0), Desc::new(off, len, fd))
    }

    #[test]
    fn contiguous_file_ranges_merge_and_long_ones_split() {
        // Two pieces adjacent in the file (not in memory), then a jump.
        let ops = plan_ops(
            &[
                seg(1000, 0, 10, 3),
                seg(5000, 10, 20, 3),
                seg(9000, 100, 5, 3),
            ],
            1 << 20,
        );
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].pieces, vec![(1000, 10), (5000, 20)]);
        assert_eq!((ops[1].offset, ops[1].len()), (100, 5));
        // Another fd never merges.
        let ops = plan_ops(&[seg(0, 0, 10, 3), seg(10, 10, 10, 4)], 1 << 20);
        assert_eq!(ops.len(), 2);
        // Adjacent in memory and file: one piece.
        let ops = plan_ops(&[seg(0, 0, 10, 3), seg(10, 10, 10, 3)], 1 << 20);
        assert_eq!(ops[0].pieces, vec![(0, 20)]);
        // Split at max_io, every byte once, in order.
        let ops = plan_ops(&[seg(0, 0, 25, 3)], 10);
        let lens: Vec<u64> = ops.iter().map(IoOp::len).collect();
        assert_eq!(lens, vec![10, 10, 5]);
        assert_eq!(ops[2].offset, 20);
        assert_eq!(ops[2].pieces, vec![(20, 5)]);
    }

    #[test]
    fn iov_max_bounds_one_operation() {
        let segs: Vec<_> = (0..2500u64).map(|i| seg(i * 100, i * 10, 10, 3)).collect();
        let ops = plan_ops(&segs, 1 << 30);
        assert_eq!(ops.len(), 3);
        assert!(ops.iter().all(|o| o.pieces.len() <= MAX_IOV));
        assert_eq!(ops.iter().map(IoOp::len).sum::<u64>(), 25_000);
    }
}
