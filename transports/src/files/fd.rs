//! Whether a caller's fd can serve a request: that it is an open regular file or block device,
//! how it was opened (read, write, `O_DIRECT`), and for `O_DIRECT` the alignment the kernel
//! requires of memory, offsets and lengths, so a misaligned request is refused when it is
//! created, naming the descriptor and the alignment, instead of failing with a bare `EINVAL`
//! half-way through.

use std::io;

use nixl_core::{Desc, Error, MemKind, Result, XferOp};

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

/// Checks a storage region at registration: FILE regions name a regular file or a block
/// device; BLOCK regions name a block device (`(offset, len, fd)` of a raw device, e.g. an
/// NVMe namespace or a loop device, usually opened with `O_DIRECT`) and must lie inside it.
pub(crate) fn check_storage_region(kind: MemKind, desc: &Desc) -> Result<()> {
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
pub(crate) fn block_device_size(fd: u64) -> Result<u64> {
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
pub(crate) fn check_request(
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
}
