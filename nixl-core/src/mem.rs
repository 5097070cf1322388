//! Memory kinds and descriptors.

use std::fmt;

use crate::error::{Error, Result};

/// The kind of memory a descriptor points into (NIXL's five segment types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum MemKind {
    /// Host memory (DRAM) of the owning process; `addr` is a virtual address.
    Dram = 0,
    /// GPU memory; `addr` is a device address and `dev_id` the GPU ordinal.
    Vram = 1,
    /// A block device; `addr` is a byte offset and `dev_id` a volume id.
    Block = 2,
    /// An object in an object store; `addr` is a byte offset and `dev_id` the object id.
    Object = 3,
    /// A file; `addr` is a byte offset and `dev_id` a file id (an fd for POSIX files).
    File = 4,
}

impl MemKind {
    /// All kinds, in wire order.
    pub const ALL: [MemKind; 5] = [
        MemKind::Dram,
        MemKind::Vram,
        MemKind::Block,
        MemKind::Object,
        MemKind::File,
    ];

    /// The kind for a wire or C ABI code.
    pub fn from_code(code: u8) -> Option<MemKind> {
        MemKind::ALL.get(usize::from(code)).copied()
    }

    /// The wire and C ABI code of this kind.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Whether this kind is addressed by virtual address in the owner's address space
    /// (as opposed to an offset into a file, volume or object).
    pub fn is_addressable(self) -> bool {
        matches!(self, MemKind::Dram | MemKind::Vram)
    }
}

impl fmt::Display for MemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemKind::Dram => "DRAM",
            MemKind::Vram => "VRAM",
            MemKind::Block => "BLOCK",
            MemKind::Object => "OBJECT",
            MemKind::File => "FILE",
        })
    }
}

/// One contiguous piece of memory: an address (or offset), a length, and a device id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct Desc {
    /// Virtual address for DRAM/VRAM, byte offset for FILE/BLOCK/OBJECT.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// GPU ordinal for VRAM, file/volume/object id for the others, 0 for DRAM.
    pub dev_id: u64,
}

impl Desc {
    /// A descriptor.
    pub const fn new(addr: u64, len: u64, dev_id: u64) -> Desc {
        Desc { addr, len, dev_id }
    }

    /// A DRAM descriptor covering `buf`.
    pub fn from_slice(buf: &[u8]) -> Desc {
        Desc::new(buf.as_ptr() as u64, buf.len() as u64, 0)
    }

    /// A DRAM descriptor covering `buf`, for memory a transfer will write into (the pointer
    /// carries write permission, which one taken from a shared slice does not).
    pub fn from_mut_slice(buf: &mut [u8]) -> Desc {
        Desc::new(buf.as_mut_ptr() as u64, buf.len() as u64, 0)
    }

    /// One past the last byte, or `None` if `addr + len` overflows.
    pub fn end(&self) -> Option<u64> {
        self.addr.checked_add(self.len)
    }

    /// Whether `inner` lies entirely inside `self` (same device).
    pub fn contains(&self, inner: &Desc) -> bool {
        match (self.end(), inner.end()) {
            (Some(end), Some(inner_end)) => {
                self.dev_id == inner.dev_id && inner.addr >= self.addr && inner_end <= end
            }
            _ => false,
        }
    }

    /// Whether `self` and `other` share at least one byte (same device).
    pub fn overlaps(&self, other: &Desc) -> bool {
        match (self.end(), other.end()) {
            (Some(end), Some(other_end)) => {
                self.len > 0
                    && other.len > 0
                    && self.dev_id == other.dev_id
                    && self.addr < other_end
                    && other.addr < end
            }
            _ => false,
        }
    }
}

/// A list of descriptors that all point into memory of one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescList {
    kind: MemKind,
    descs: Vec<Desc>,
}

impl DescList {
    /// An empty list of `kind`.
    pub fn new(kind: MemKind) -> DescList {
        DescList {
            kind,
            descs: Vec::new(),
        }
    }

    /// A list of `kind` holding `descs`. Every descriptor must be non-empty and must not
    /// wrap around the address space.
    pub fn from_descs(kind: MemKind, descs: impl Into<Vec<Desc>>) -> Result<DescList> {
        let descs = descs.into();
        for (index, d) in descs.iter().enumerate() {
            check_desc(kind, index, d)?;
        }
        Ok(DescList { kind, descs })
    }

    /// Appends a descriptor (checked like [`DescList::from_descs`]).
    pub fn push(&mut self, desc: Desc) -> Result<()> {
        check_desc(self.kind, self.descs.len(), &desc)?;
        self.descs.push(desc);
        Ok(())
    }

    /// The memory kind of every descriptor in the list.
    pub fn kind(&self) -> MemKind {
        self.kind
    }

    /// The descriptors.
    pub fn descs(&self) -> &[Desc] {
        &self.descs
    }

    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Sum of the descriptor lengths, saturating at `u64::MAX` (file descriptors on different
    /// devices may each be near the top of the range).
    pub fn total_bytes(&self) -> u64 {
        self.descs
            .iter()
            .fold(0u64, |acc, d| acc.saturating_add(d.len))
    }
}

/// Most descriptors one [`Strided`] may stand for (and one prepared list may hold): 2^24.
pub const MAX_STRIDED_COUNT: u64 = 1 << 24;

/// A regular run of equal descriptors: `count` pieces of `len` bytes, the `i`-th at
/// `addr + i·stride` (NIXL's strided descriptors). One KV block of every layer, or every block
/// of a layer, is one `Strided` instead of thousands of descriptors.
///
/// ```
/// use nixl_core::{Desc, DescList, MemKind, Strided};
/// let mut list = DescList::new(MemKind::Dram);
/// list.push_strided(Strided { addr: 0x1000, stride: 256, count: 3, len: 64, dev_id: 0 }).unwrap();
/// assert_eq!(list.descs()[2], Desc::new(0x1000 + 512, 64, 0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Strided {
    /// Address (or offset) of the first piece.
    pub addr: u64,
    /// Distance between the starts of consecutive pieces (0: the same piece repeated).
    pub stride: u64,
    /// Number of pieces, 1 to [`MAX_STRIDED_COUNT`].
    pub count: u64,
    /// Bytes per piece (non-zero).
    pub len: u64,
    /// Device id of every piece.
    pub dev_id: u64,
}

impl Strided {
    /// The smallest descriptor covering every piece, or an error if the run is empty, too long,
    /// or overflows the address space.
    pub fn span(&self) -> Result<Desc> {
        let bad = |reason: String| Error::InvalidDesc { index: 0, reason };
        if self.count == 0 || self.count > MAX_STRIDED_COUNT {
            return Err(bad(format!(
                "strided count {} is not in 1..={MAX_STRIDED_COUNT}",
                self.count
            )));
        }
        if self.len == 0 {
            return Err(bad("zero-length strided pieces".into()));
        }
        let end = self
            .stride
            .checked_mul(self.count - 1)
            .and_then(|o| o.checked_add(self.addr))
            .and_then(|a| a.checked_add(self.len))
            .ok_or_else(|| bad(format!("strided run {self:?} overflows the address space")))?;
        // The last piece starts at or after the first (stride >= 0), so it ends last.
        Ok(Desc::new(self.addr, end - self.addr, self.dev_id))
    }

    /// The pieces, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Desc> + '_ {
        (0..self.count as usize)
            .map(move |i| Desc::new(self.addr + i as u64 * self.stride, self.len, self.dev_id))
    }
}

impl DescList {
    /// Appends the pieces of a strided run (checked once for the whole run).
    pub fn push_strided(&mut self, s: Strided) -> Result<()> {
        s.span().map_err(|e| match e {
            Error::InvalidDesc { reason, .. } => Error::InvalidDesc {
                index: self.descs.len(),
                reason,
            },
            e => e,
        })?;
        let total = (self.descs.len() as u64).saturating_add(s.count);
        if total > MAX_STRIDED_COUNT {
            return Err(Error::InvalidArgument(format!(
                "a list of {total} descriptors is over the limit of {MAX_STRIDED_COUNT}"
            )));
        }
        self.descs.reserve(s.count as usize);
        self.descs.extend(s.iter());
        Ok(())
    }
}

fn check_desc(kind: MemKind, index: usize, d: &Desc) -> Result<()> {
    if d.len == 0 {
        return Err(Error::InvalidDesc {
            index,
            reason: format!("zero-length {kind} descriptor"),
        });
    }
    if d.end().is_none() {
        return Err(Error::InvalidDesc {
            index,
            reason: format!(
                "{kind} descriptor addr {:#x} + len {} overflows",
                d.addr, d.len
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_and_overlaps() {
        let r = Desc::new(100, 50, 0);
        assert!(r.contains(&Desc::new(100, 50, 0)));
        assert!(r.contains(&Desc::new(120, 30, 0)));
        assert!(!r.contains(&Desc::new(120, 31, 0)));
        assert!(!r.contains(&Desc::new(99, 2, 0)));
        assert!(!r.contains(&Desc::new(100, 10, 1)), "other device");
        assert!(!r.contains(&Desc::new(u64::MAX, 2, 0)), "overflow");
        assert!(r.overlaps(&Desc::new(149, 10, 0)));
        assert!(!r.overlaps(&Desc::new(150, 10, 0)));
        assert!(!r.overlaps(&Desc::new(90, 10, 0)));
        assert!(r.overlaps(&Desc::new(90, 11, 0)));
    }

    #[test]
    fn list_rejects_empty_and_wrapping() {
        let err = DescList::from_descs(MemKind::Dram, vec![Desc::new(1, 1, 0), Desc::new(5, 0, 0)])
            .unwrap_err();
        assert!(matches!(err, Error::InvalidDesc { index: 1, .. }), "{err}");
        let err = DescList::from_descs(MemKind::Dram, vec![Desc::new(u64::MAX, 1, 0)]).unwrap_err();
        assert!(matches!(err, Error::InvalidDesc { index: 0, .. }), "{err}");
        let list = DescList::from_descs(MemKind::File, vec![Desc::new(0, 10, 3)]).unwrap();
        assert_eq!(list.total_bytes(), 10);
        assert_eq!(list.kind(), MemKind::File);
    }

    #[test]
    fn kind_codes_round_trip() {
        for k in MemKind::ALL {
            assert_eq!(MemKind::from_code(k.code()), Some(k));
        }
        assert_eq!(MemKind::from_code(5), None);
    }
}
