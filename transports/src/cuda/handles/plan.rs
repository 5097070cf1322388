//! How a registered range is cut into exportable chunks, through the [`AllocationMap`] the
//! driver answers.

use super::*;

/// How memory at an address was allocated, as the driver tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AllocKind {
    /// `cudaMalloc` / `cuMemAlloc`: exported with `cuIpcGetMemHandle` on the base.
    Legacy {
        /// Whether legacy IPC works on it (false for stream-ordered pools).
        ipc_capable: bool,
    },
    /// A VMM mapping (`cuMemCreate` + `cuMemMap`): exported per physical allocation.
    Vmm {
        /// The handle types it was created with (`CU_MEM_HANDLE_TYPE_*` bits).
        handle_types: u32,
    },
}

/// The allocation holding an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AllocInfo {
    /// First byte of the allocation (legacy) or mapping (VMM).
    pub base: u64,
    /// Its size.
    pub size: u64,
    /// How it was allocated.
    pub kind: AllocKind,
}

/// Address → allocation: the driver in production, a fake in tests.
pub(crate) trait AllocationMap {
    /// The allocation holding `addr`, or why there is none.
    fn lookup(&self, addr: u64) -> Result<AllocInfo, String>;
}

/// A chunk as the walk finds it, before export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PlannedChunk {
    /// Offset in the region.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// The allocation (or mapping) it lies in.
    pub alloc: AllocInfo,
    /// Offset of the chunk in the allocation.
    pub alloc_offset: u64,
    /// Export fabric handles for it (VMM allocated with FABRIC, and asked for).
    pub fabric: bool,
}

/// Walks `[addr, addr + len)` allocation by allocation and checks each piece can be exported.
pub(crate) fn plan_chunks(
    map: &dyn AllocationMap,
    addr: u64,
    len: u64,
    allow_fabric: bool,
) -> Result<Vec<PlannedChunk>, String> {
    let end = addr
        .checked_add(len)
        .ok_or_else(|| format!("range {addr:#x}+{len} wraps"))?;
    let mut out = Vec::new();
    let mut cur = addr;
    while cur < end {
        if out.len() >= MAX_CHUNKS {
            return Err(format!(
                "range {addr:#x}+{len} spans more than {MAX_CHUNKS} allocations; register it in \
                 smaller regions"
            ));
        }
        let a = map.lookup(cur)?;
        let a_end = a.base.saturating_add(a.size);
        if a.size == 0 || cur < a.base || cur >= a_end {
            return Err(format!(
                "driver reports allocation {:#x}+{} for address {cur:#x}, which it does not hold",
                a.base, a.size
            ));
        }
        let fabric = match a.kind {
            AllocKind::Legacy { ipc_capable: true } => false,
            AllocKind::Legacy { ipc_capable: false } => {
                return Err(format!(
                    "memory at {cur:#x} cannot be shared with CUDA IPC (a cudaMallocAsync pool \
                     without IPC export?); allocate it with cudaMalloc, nixl's VmmBuffer, or \
                     PyTorch with expandable_segments:True"
                ))
            }
            AllocKind::Vmm { handle_types } => {
                if handle_types & (HANDLE_POSIX_FD | HANDLE_FABRIC) == 0 {
                    return Err(format!(
                        "VMM allocation {:#x}+{} at {cur:#x} was allocated without \
                         CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR (handle types {handle_types:#x}) \
                         and cannot be shared; use nixl's VmmBuffer, or allocate with \
                         requestedHandleTypes including POSIX_FILE_DESCRIPTOR (PyTorch's \
                         expandable segments do where the driver supports it)",
                        a.base, a.size
                    ));
                }
                allow_fabric && handle_types & HANDLE_FABRIC != 0
            }
        };
        let chunk_end = end.min(a_end);
        out.push(PlannedChunk {
            offset: cur - addr,
            len: chunk_end - cur,
            alloc: a,
            alloc_offset: cur - a.base,
            fabric,
        });
        cur = chunk_end;
    }
    Ok(out)
}
