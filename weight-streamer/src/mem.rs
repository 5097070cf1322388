//! Page-aligned anonymous host memory that is registered with the agent.
//!
//! This is the seam where the per-node daemon's pool plugs in: a buffer handed out by the daemon
//! (a memfd it shares) would replace the anonymous mapping, and everything above only sees a
//! base address and a length.

use std::fmt;

use crate::error::{Error, Result};

/// An anonymous private mapping of `len` bytes (zeroed), unmapped on drop.
pub struct HostMem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access through it is by raw pointer
// under the contracts of the methods, never through shared Rust references held across threads.
unsafe impl Send for HostMem {}
// SAFETY: as for Send: `&HostMem` only exposes the address and unsafe accessors.
unsafe impl Sync for HostMem {}

impl fmt::Debug for HostMem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostMem")
            .field("addr", &format_args!("{:#x}", self.ptr as usize))
            .field("len", &self.len)
            .finish()
    }
}

impl HostMem {
    /// Maps `len` bytes (at least one page).
    pub fn new(len: usize) -> Result<HostMem> {
        let len = len.max(4096);
        // SAFETY: an anonymous private mapping at an address of the kernel's choice touches no
        // existing memory; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io(
                format!("mapping {len} bytes of host memory"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(HostMem {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Base address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a mapping has at least one page).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The whole mapping, exclusively (before it is registered: nothing else can touch it).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, owned by `self`, and the
        // exclusive borrow of `self` excludes every other access through this value.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// `len` bytes at `off`, or an error if out of bounds.
    ///
    /// # Safety
    /// Nothing may write those bytes while the slice lives (no transfer into them in flight, no
    /// [`HostMem::write`] to them).
    pub unsafe fn slice(&self, off: u64, len: u64) -> Result<&[u8]> {
        self.check(off, len)?;
        // SAFETY: in bounds (checked); the caller guarantees no writer meanwhile.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.add(off as usize), len as usize) })
    }

    /// Copies `src` to `off`.
    ///
    /// # Safety
    /// No Rust reference to those bytes may be alive, and no transfer may write them meanwhile.
    pub unsafe fn write(&self, off: u64, src: &[u8]) -> Result<()> {
        self.check(off, src.len() as u64)?;
        // SAFETY: in bounds (checked); `src` is another allocation or not borrowed from these
        // bytes (the caller's contract excludes references into them).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off as usize), src.len())
        };
        Ok(())
    }

    fn check(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {off}+{len} outside a buffer of {} bytes",
                self.len
            ))),
        }
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this address and length, and is unmapped
        // once, here; registrations that use it hold an Arc to it, so none outlives it.
        let rc = unsafe { libc::munmap(self.ptr.cast(), self.len) };
        if rc != 0 {
            tracing::error!(
                "munmap of weight buffer failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
