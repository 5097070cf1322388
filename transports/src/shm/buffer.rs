//! [`ShmBuffer`]: host memory backed by a memfd, which a peer on the same node may map, and the
//! process-wide registry of live buffers that registration consults.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use nixl_core::Desc;
use parking_lot::Mutex;

use super::sys;

/// A live buffer as the registry knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LiveBuffer {
    /// Start address in this process.
    pub start: u64,
    /// Mapped length (the file size).
    pub len: u64,
    /// The memfd.
    pub fd: RawFd,
    /// Process-unique id (a buffer freed and another made at the same address differ).
    pub id: u64,
    /// Page size of the memory (huge page size for hugetlb buffers).
    pub page: u64,
}

/// Live buffers of this process, by start address.
static LIVE: LazyLock<Mutex<BTreeMap<u64, LiveBuffer>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Host memory backed by a memfd (optionally in huge pages), zeroed at creation.
///
/// Registered with an agent that runs the `shm` backend, it lets a peer on the same node map it
/// and copy with plain loads and stores in its own process: the fastest path between processes,
/// with no round trip per transfer. Any other memory moves by cross-memory attach instead.
/// Unmapped and closed on drop; deregister it first (as any registered memory).
#[derive(Debug)]
pub struct ShmBuffer {
    ptr: *mut u8,
    len: usize,
    mapped: usize,
    fd: OwnedFd,
}

// SAFETY: the buffer is plain memory owned by this value; access goes through &self / &mut self
// as for a Vec<u8>.
unsafe impl Send for ShmBuffer {}
// SAFETY: as above; a shared reference gives only shared slices.
unsafe impl Sync for ShmBuffer {}

impl ShmBuffer {
    /// A zeroed buffer of `len` bytes in ordinary pages.
    pub fn new(len: usize) -> io::Result<ShmBuffer> {
        ShmBuffer::create(len, false)
    }

    /// A zeroed buffer of `len` bytes in huge pages (the memory taken is rounded up to the huge
    /// page size). Fails where no huge pages are reserved (`vm.nr_hugepages`): the pages are
    /// populated at creation, so a shortage is an error here and never a SIGBUS later.
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
        let page = if huge { huge_page_size() } else { sys::page_size() };
        let mapped = len
            .checked_next_multiple_of(page as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        let fd = sys::memfd(mapped, huge).map_err(|e| {
            if huge {
                io::Error::new(e.kind(), format!("memfd_create(MFD_HUGETLB): {e}"))
            } else {
                e
            }
        })?;
        let ptr = sys::map_shared(fd.as_raw_fd(), 0, mapped, huge).map_err(|e| {
            if huge {
                io::Error::new(
                    e.kind(),
                    format!("mapping {mapped} bytes of huge pages: {e} (are huge pages reserved? see vm.nr_hugepages)"),
                )
            } else {
                e
            }
        })?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        LIVE.lock().insert(
            ptr as u64,
            LiveBuffer {
                start: ptr as u64,
                len: mapped as u64,
                fd: fd.as_raw_fd(),
                id,
                page,
            },
        );
        Ok(ShmBuffer {
            ptr,
            len,
            mapped,
            fd,
        })
    }

    /// Start address.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Start address, writable.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes (as asked for).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero (never: zero-length buffers are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len lies in our live mapping, initialized (zeroed by the kernel).
        // Peers may write it concurrently through transfers (the one-sided model, as for any
        // registered memory): the caller synchronizes through completions and notifications.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above; &mut self gives exclusive access within this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// A DRAM descriptor of the whole buffer, for registration and transfers.
    pub fn desc(&self) -> Desc {
        Desc::new(self.ptr as u64, self.len as u64, 0)
    }
}

impl Drop for ShmBuffer {
    fn drop(&mut self) {
        // Removed under the registry lock first: a grant in progress (which sends the fd while
        // holding the lock) finishes before the fd is closed below.
        LIVE.lock().remove(&(self.ptr as u64));
        // SAFETY: (ptr, mapped) is the mapping made in `create`; slices borrowed from the buffer
        // cannot outlive it.
        unsafe { sys::unmap(self.ptr, self.mapped) };
        // The fd closes with `self.fd`.
        let _ = &self.fd;
    }
}

/// The huge page size (from /proc/meminfo; 2 MiB if unreadable).
fn huge_page_size() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Hugepagesize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(2 << 20, |kb| kb << 10)
}

/// The live buffer that contains all of `desc`, if any.
pub(crate) fn find(desc: &Desc) -> Option<LiveBuffer> {
    let end = desc.end()?;
    let live = LIVE.lock();
    let (_, b) = live.range(..=desc.addr).next_back()?;
    (end <= b.start + b.len).then_some(*b)
}

/// Runs `f` on buffer `id` at `start` while its fd cannot be closed (the registry stays locked:
/// keep `f` short).
pub(crate) fn with_buffer<T>(start: u64, id: u64, f: impl FnOnce(&LiveBuffer) -> T) -> Option<T> {
    let live = LIVE.lock();
    match live.get(&start) {
        Some(b) if b.id == id => Some(f(b)),
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
        assert_eq!(b.as_slice()[9_999], 7);
        let d = b.desc();
        assert_eq!(d.len, 10_000);
        let live = find(&Desc::new(d.addr + 5, 100, 0)).unwrap();
        assert_eq!(live.start, d.addr);
        assert!(live.len >= 10_000);
        assert!(find(&Desc::new(d.addr + live.len - 1, 2, 0)).is_none(), "past the end");
        assert!(with_buffer(live.start, live.id, |_| ()).is_some());
        assert!(with_buffer(live.start, live.id + 1, |_| ()).is_none());
        drop(b);
        assert!(find(&Desc::new(d.addr, 1, 0)).is_none());
        assert!(ShmBuffer::new(0).is_err());
    }

    #[test]
    fn huge_pages_either_work_or_say_why() {
        match ShmBuffer::with_huge_pages(1 << 20) {
            Ok(mut b) => {
                b.as_mut_slice()[0] = 1;
                assert_eq!(b.len(), 1 << 20);
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
