//! The ring's fixed-file and registered-buffer tables.

use std::collections::{BTreeMap, HashMap};

use io_uring::IoUring;
use nixl_core::Desc;

use super::UringConfig;

/// The ring's fixed-file and registered-buffer tables, updated in place as regions come and go.
#[derive(Debug, Default)]
pub(super) struct Fixed {
    /// fd → (table entry, registrations using it).
    pub(super) files: HashMap<i32, (u32, usize)>,
    free_files: Vec<u32>,
    /// Registered buffers by start address: (end, table entry, registrations using it).
    pub(super) bufs: BTreeMap<u64, (u64, u16, usize)>,
    free_bufs: Vec<u16>,
}

impl Fixed {
    /// Creates the sparse tables the configuration asks for; a table the kernel refuses is
    /// left empty (operations then name fds and map memory per operation, as before).
    pub(super) fn new(ring: &IoUring, cfg: &UringConfig) -> Fixed {
        let mut fx = Fixed::default();
        let sub = ring.submitter();
        if cfg.fixed_files > 0 {
            match sub.register_files_sparse(cfg.fixed_files) {
                Ok(()) => fx.free_files = (0..cfg.fixed_files).rev().collect(),
                Err(e) => tracing::info!(error = %e, "io_uring: no fixed-file table"),
            }
        }
        let nbufs = cfg.fixed_buffers.min(u32::from(u16::MAX));
        if nbufs > 0 {
            match sub.register_buffers_sparse(nbufs) {
                Ok(()) => fx.free_bufs = (0..nbufs as u16).rev().collect(),
                Err(e) => tracing::info!(error = %e, "io_uring: no registered-buffer table"),
            }
        }
        fx
    }

    pub(super) fn add_file(&mut self, ring: &IoUring, fd: i32) {
        if let Some(e) = self.files.get_mut(&fd) {
            e.1 += 1;
            return;
        }
        let Some(slot) = self.free_files.pop() else {
            tracing::debug!(
                fd,
                "io_uring: fixed-file table full; this fd goes by number"
            );
            return;
        };
        match ring.submitter().register_files_update(slot, &[fd]) {
            Ok(_) => {
                self.files.insert(fd, (slot, 1));
            }
            Err(e) => {
                tracing::debug!(fd, error = %e, "io_uring: fd not made a fixed file");
                self.free_files.push(slot);
            }
        }
    }

    pub(super) fn remove_file(&mut self, ring: &IoUring, fd: i32) {
        let Some(e) = self.files.get_mut(&fd) else {
            return;
        };
        e.1 -= 1;
        if e.1 > 0 {
            return;
        }
        let slot = e.0;
        self.files.remove(&fd);
        // The core removes a region only when no transfer uses it; an operation the kernel
        // still holds keeps its own reference to the file.
        if let Err(e) = ring.submitter().register_files_update(slot, &[-1]) {
            tracing::warn!(fd, error = %e, "io_uring: fixed-file entry not cleared; not reused");
            return;
        }
        self.free_files.push(slot);
    }

    pub(super) fn file_of(&self, fd: i32) -> Option<u32> {
        self.files.get(&fd).map(|e| e.0)
    }

    pub(super) fn add_buffer(&mut self, ring: &IoUring, desc: &Desc, max: u64) {
        if desc.len == 0 || desc.len > max || desc.len > usize::MAX as u64 {
            return;
        }
        let Some(end) = desc.addr.checked_add(desc.len) else {
            return;
        };
        if let Some(e) = self.bufs.get_mut(&desc.addr).filter(|e| e.0 == end) {
            e.2 += 1;
            return;
        }
        if self.bufs.contains_key(&desc.addr) {
            return;
        }
        let Some(slot) = self.free_bufs.pop() else {
            tracing::debug!(
                addr = desc.addr,
                len = desc.len,
                "io_uring: registered-buffer table full; this region maps per operation"
            );
            return;
        };
        let iov = libc::iovec {
            iov_base: desc.addr as *mut libc::c_void,
            iov_len: desc.len as usize,
        };
        // SAFETY: the range is DRAM the caller registered with the agent, valid until it is
        // deregistered (`Agent::register`'s contract); the kernel pins its pages now and keeps
        // them until the entry is replaced in `remove_buffer` and its last operation is done.
        match unsafe {
            ring.submitter()
                .register_buffers_update(u32::from(slot), &[iov], None)
        } {
            Ok(()) => {
                self.bufs.insert(desc.addr, (end, slot, 1));
            }
            Err(e) => {
                tracing::debug!(addr = desc.addr, len = desc.len, error = %e,
                    "io_uring: region not made a registered buffer; it maps per operation");
                self.free_bufs.push(slot);
            }
        }
    }

    pub(super) fn remove_buffer(&mut self, ring: &IoUring, desc: &Desc) {
        let end = desc.addr.wrapping_add(desc.len);
        let Some(e) = self.bufs.get_mut(&desc.addr).filter(|e| e.0 == end) else {
            return;
        };
        e.2 -= 1;
        if e.2 > 0 {
            return;
        }
        let slot = e.1;
        self.bufs.remove(&desc.addr);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: an empty entry names no memory; the kernel drops the old pages once the
        // operations still using them complete.
        match unsafe {
            ring.submitter()
                .register_buffers_update(u32::from(slot), &[empty], None)
        } {
            Ok(()) => self.free_bufs.push(slot),
            Err(e) => tracing::warn!(error = %e,
                "io_uring: registered buffer not cleared; its entry is not reused"),
        }
    }

    /// The registered buffer that holds `[addr, addr + len)`, if any.
    pub(super) fn buffer_of(&self, addr: u64, len: u64) -> Option<u16> {
        let (_, &(end, slot, _)) = self.bufs.range(..=addr).next_back()?;
        (addr.checked_add(len)? <= end).then_some(slot)
    }
}
