//! [`ShmBuffer`]: host memory backed by a memfd, which a peer on the same node may map.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::LazyLock;

use nixl_core::Desc;
use parking_lot::Mutex;

use super::sys;

/// Live buffers of this process: start address -> (length, fd, id).
type Registry = Mutex<BTreeMap<u64, (u64, RawFd, u64)>>;
static LIVE: LazyLock<Registry> = LazyLock::new(|| Mutex::new(BTreeMap::new()));
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Host memory backed by a memfd (optionally huge pages). Registered with an agent, it lets a
/// peer on the same node map it and copy with plain loads and stores, the fastest path between
/// processes. Unmapped and closed on drop (deregister it first).
#[derive(Debug)]
pub struct ShmBuffer {
    ptr: *mut u8,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the buffer is plain shared memory owned by this value; access goes through &self /
// &mut self like a Vec<u8>.
unsafe impl Send for ShmBuffer {}
// SAFETY: as above; shared references only give shared slices.
unsafe impl Sync for ShmBuffer {}

impl ShmBuffer {
    /// A zeroed buffer of `len` bytes in ordinary pages.
    pub fn new(len: usize) -> io::Result<ShmBuffer> {
        ShmBuffer::create(len, false)
    }

    /// A zeroed buffer of `len` bytes in huge pages (`len` a multiple of the huge page size);
    /// fails where no huge pages are reserved (`vm.nr_hugepages`).
    pub fn with_huge_pages(len: usize) -> io::Result<ShmBuffer> {
        ShmBuffer::create(len, true)
    }

    fn create(len: usize, huge: bool) -> io::Result<ShmBuffer> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "zero-length buffer",
            ));
        }
        let fd = sys::memfd(len, huge)?;
        let ptr = sys::map_shared(fd.as_raw_fd(), len, false)?;
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LIVE.lock()
            .insert(ptr as u64, (len as u64, fd.as_raw_fd(), id));
        Ok(ShmBuffer { ptr, len, fd })
    }

    /// Start address.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Start address, writable.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero (never: zero-length buffers are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is our live mapping, initialized (zeroed by the kernel).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access within this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// A DRAM descriptor of the whole buffer (with write permission).
    pub fn desc(&mut self) -> Desc {
        Desc::new(self.ptr as u64, self.len as u64, 0)
    }
}

impl Drop for ShmBuffer {
    fn drop(&mut self) {
        LIVE.lock().remove(&(self.ptr as u64));
        // SAFETY: (ptr, len) is the mapping made in `create`; the buffer is going away, and
        // slices borrowed from it cannot outlive it.
        unsafe { sys::unmap(self.ptr, self.len) };
        let _ = &self.fd; // closed by OwnedFd's drop
    }
}

/// The live buffer containing `desc`: (buffer start, buffer length, fd, id).
pub(crate) fn find(desc: &Desc) -> Option<(u64, u64, RawFd, u64)> {
    let live = LIVE.lock();
    let (&start, &(len, fd, id)) = live.range(..=desc.addr).next_back()?;
    let end = desc.end()?;
    (end <= start + len).then_some((start, len, fd, id))
}

/// Runs `f` with the fd of buffer `id` at `start` while it cannot be closed.
pub(crate) fn with_fd<T>(start: u64, id: u64, f: impl FnOnce(RawFd, u64) -> T) -> Option<T> {
    let live = LIVE.lock();
    match live.get(&start) {
        Some(&(len, fd, bid)) if bid == id => Some(f(fd, len)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_is_zeroed_registered_and_forgotten_on_drop() {
        let mut b = ShmBuffer::new(10_000).unwrap();
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[9_999] = 7;
        let d = b.desc();
        let (start, len, _, _) = find(&Desc::new(d.addr + 5, 100, 0)).unwrap();
        assert_eq!((start, len), (d.addr, 10_000));
        assert!(
            find(&Desc::new(d.addr + 9_990, 11, 0)).is_none(),
            "past the end"
        );
        drop(b);
        assert!(find(&Desc::new(d.addr, 1, 0)).is_none());
        assert!(ShmBuffer::new(0).is_err());
    }
}
