//! Property tests of the metadata wire format (`nixl_core::metadata`).
//!
//! The format is re-implemented here from its documentation (`RawMd`), independently of
//! `AgentMetadata::encode`, so that the tests also pin the byte layout, can build inputs the
//! encoder never writes (unknown backends, bad fields) and know where every count and length sits.
//!
//! Every decode of untrusted bytes goes through [`checked`], which asserts what must hold for any
//! input whatsoever: no panic, bounded time, allocation bounded by the input length, and, when the
//! decode succeeds, that the value re-encodes canonically and decodes to itself.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use nixl_core::metadata::{
    AgentMetadata, BackendInfo, DecodeError, RegionInfo, MAGIC, MAX_BACKENDS, MAX_BLOB_BYTES,
    MAX_METADATA_BYTES, MAX_NAME_BYTES, MAX_REGIONS, VERSION,
};
use nixl_core::{BackendName, Desc, MemKind};
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------------------------------------
// Allocation accounting: bytes requested by the current thread while `TRACKING` is set.

#[derive(Debug)]
struct CountingAlloc;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(bytes: usize) {
    // `try_with`: allocations can happen while a thread's locals are being torn down. These
    // locals are const-initialised and have no destructor, so this never allocates itself.
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(bytes)));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the only
// addition is bookkeeping in thread-locals, which neither allocates nor touches the memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded verbatim; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded verbatim; the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` (every allocation above forwards to it).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc(new_size);
        // SAFETY: `ptr` came from `System`; the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Runs `f`, returning its value and the bytes it asked the allocator for (frees not subtracted,
/// so this bounds the peak from above).
fn count_allocs<T>(f: impl FnOnce() -> T) -> (T, usize) {
    ALLOCATED.with(|a| a.set(0));
    TRACKING.with(|t| t.set(true));
    let v = f();
    TRACKING.with(|t| t.set(false));
    (v, ALLOCATED.with(Cell::get))
}

/// What a decode of `n` input bytes may allocate. The decoder's in-memory entries are larger than
/// their smallest encodings (a 5-byte backend entry becomes a 32-byte `BackendInfo` or tuple, a
/// 34-byte region a `RegionInfo` of about 64), so allow a fixed multiple of the input plus a
/// constant for the name and error messages.
fn alloc_budget(n: usize) -> usize {
    8 * n + 16 * 1024
}

/// Generous wall-clock bound for one decode of the inputs used here (at most a few hundred KiB,
/// debug build, shared CPU). A decoder that loops on a count or length read from the input would
/// take far longer than this on the huge values the tests write into those fields.
const DECODE_TIME_LIMIT: Duration = Duration::from_secs(2);

/// Decodes untrusted `bytes`, asserting what holds for every input: bounded time and memory, and
/// for a successful decode, `decode(encode(md)) == md` with the encoding canonical (the only
/// thing a decode drops is entries of unknown backends, at least 5 bytes each).
fn checked(bytes: &[u8]) -> Result<AgentMetadata, DecodeError> {
    let start = Instant::now();
    let (res, allocated) = count_allocs(|| AgentMetadata::decode(bytes));
    let took = start.elapsed();
    assert!(
        took < DECODE_TIME_LIMIT,
        "decode of {} bytes took {took:?}",
        bytes.len()
    );
    assert!(
        allocated <= alloc_budget(bytes.len()),
        "decode of {} bytes allocated {allocated} bytes (budget {})",
        bytes.len(),
        alloc_budget(bytes.len())
    );
    if let Ok(md) = &res {
        let again = md.encode();
        assert_eq!(
            AgentMetadata::decode(&again).as_ref(),
            Ok(md),
            "decode(encode(md)) != md"
        );
        if again.len() == bytes.len() {
            assert_eq!(again, bytes, "a decoded input does not re-encode to itself");
        } else {
            assert!(
                again.len() < bytes.len(),
                "re-encoding grew {} -> {}",
                bytes.len(),
                again.len()
            );
        }
    }
    res
}

// ---------------------------------------------------------------------------------------------
// The wire format, written from its documentation.

const HEADER_LEN: usize = 12;
const BODY_LEN_AT: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FieldKind {
    BodyLen,
    NameLen,
    BackendCount,
    BackendBlobLen,
    RegionCount,
    RegionBackendCount,
    RegionBlobLen,
}

impl FieldKind {
    /// The decoder's limit on this field (`None`: checked against the input length only).
    fn limit(self) -> Option<usize> {
        match self {
            FieldKind::BodyLen => None,
            FieldKind::NameLen => Some(MAX_NAME_BYTES),
            FieldKind::BackendCount | FieldKind::RegionBackendCount => Some(MAX_BACKENDS),
            FieldKind::BackendBlobLen | FieldKind::RegionBlobLen => Some(MAX_BLOB_BYTES),
            FieldKind::RegionCount => Some(MAX_REGIONS),
        }
    }
}

/// A count or length field of an encoding: where it is, how wide, and what it counts.
#[derive(Clone, Copy, Debug)]
struct Field {
    at: usize,
    width: usize,
    kind: FieldKind,
}

#[derive(Clone, Debug)]
struct RawRegion {
    kind: u8,
    addr: u64,
    len: u64,
    dev_id: u64,
    key: u64,
    backends: Vec<(u8, Vec<u8>)>,
}

/// Metadata as raw wire fields, able to hold anything the format can express.
#[derive(Clone, Debug)]
struct RawMd {
    magic: [u8; 4],
    version: u16,
    flags: u16,
    name: Vec<u8>,
    instance_id: u128,
    generation: u64,
    backends: Vec<(u8, Vec<u8>)>,
    regions: Vec<RawRegion>,
}

impl RawMd {
    fn from_md(md: &AgentMetadata) -> RawMd {
        RawMd {
            magic: MAGIC,
            version: VERSION,
            flags: u16::from(md.partial),
            name: md.name.as_bytes().to_vec(),
            instance_id: md.instance_id,
            generation: md.generation,
            backends: md
                .backends
                .iter()
                .map(|b| (b.name.code(), b.conn_info.clone()))
                .collect(),
            regions: md
                .regions
                .iter()
                .map(|r| RawRegion {
                    kind: r.kind.code(),
                    addr: r.desc.addr,
                    len: r.desc.len,
                    dev_id: r.desc.dev_id,
                    key: r.key,
                    backends: r
                        .backends
                        .iter()
                        .map(|(n, p)| (n.code(), p.clone()))
                        .collect(),
                })
                .collect(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        self.encode_with_fields().0
    }

    /// The encoding and the position of every count and length field in it.
    fn encode_with_fields(&self) -> (Vec<u8>, Vec<Field>) {
        fn field(out: &mut Vec<u8>, fields: &mut Vec<Field>, kind: FieldKind, le: &[u8]) {
            fields.push(Field {
                at: out.len(),
                width: le.len(),
                kind,
            });
            out.extend_from_slice(le);
        }
        fn entries(
            out: &mut Vec<u8>,
            fields: &mut Vec<Field>,
            kind: FieldKind,
            list: &[(u8, Vec<u8>)],
        ) {
            for (code, blob) in list {
                out.push(*code);
                field(out, fields, kind, &(blob.len() as u32).to_le_bytes());
                out.extend_from_slice(blob);
            }
        }
        let mut out = Vec::new();
        let mut fields = Vec::new();
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        field(&mut out, &mut fields, FieldKind::BodyLen, &[0; 4]);
        let name_len = u16::try_from(self.name.len()).expect("name fits a u16");
        field(
            &mut out,
            &mut fields,
            FieldKind::NameLen,
            &name_len.to_le_bytes(),
        );
        out.extend_from_slice(&self.name);
        out.extend_from_slice(&self.instance_id.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        let backend_count = u16::try_from(self.backends.len()).expect("backends fit a u16");
        field(
            &mut out,
            &mut fields,
            FieldKind::BackendCount,
            &backend_count.to_le_bytes(),
        );
        entries(
            &mut out,
            &mut fields,
            FieldKind::BackendBlobLen,
            &self.backends,
        );
        let region_count = u32::try_from(self.regions.len()).expect("regions fit a u32");
        field(
            &mut out,
            &mut fields,
            FieldKind::RegionCount,
            &region_count.to_le_bytes(),
        );
        for r in &self.regions {
            out.push(r.kind);
            for v in [r.addr, r.len, r.dev_id, r.key] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            let bcount = u8::try_from(r.backends.len()).expect("region backends fit a u8");
            field(
                &mut out,
                &mut fields,
                FieldKind::RegionBackendCount,
                &[bcount],
            );
            entries(&mut out, &mut fields, FieldKind::RegionBlobLen, &r.backends);
        }
        let body_len = (out.len() - HEADER_LEN) as u32;
        out[BODY_LEN_AT..HEADER_LEN].copy_from_slice(&body_len.to_le_bytes());
        (out, fields)
    }
}

fn set_body_len(bytes: &mut [u8], body_len: usize) {
    bytes[BODY_LEN_AT..HEADER_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
}

/// Overwrites the `width`-byte little-endian field at `at` with `value` (truncated to the width).
fn overwrite(bytes: &mut [u8], at: usize, width: usize, value: u64) {
    bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
}

fn read_field(bytes: &[u8], f: Field) -> u64 {
    let mut le = [0u8; 8];
    le[..f.width].copy_from_slice(&bytes[f.at..f.at + f.width]);
    u64::from_le_bytes(le)
}

// ---------------------------------------------------------------------------------------------
// Strategies.

fn mem_kind() -> impl Strategy<Value = MemKind> {
    prop::sample::select(MemKind::ALL.to_vec())
}

/// 1..=`max_bytes` bytes of arbitrary UTF-8 without NUL (agent names never hold one; characters
/// that would pass the limit are skipped, so long names land on or near the limit).
fn name(max_chars: usize, max_bytes: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![3 => any::<char>(), 1 => prop::char::range('a', 'z')],
        1..=max_chars,
    )
    .prop_map(move |chars| {
        let mut s = String::new();
        for c in chars {
            if c != '\0' && s.len() + c.len_utf8() <= max_bytes {
                s.push(c);
            }
        }
        if s.is_empty() {
            s.push('a');
        }
        s
    })
}

/// splitmix64: a tiny deterministic generator for the bulk of the test data.
#[derive(Debug)]
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// An opaque blob of 0..=`max` bytes, mostly short. The decoder never looks inside blobs, so the
/// bytes come from a seeded generator: a per-byte strategy makes a value tree per byte, which
/// costs more in a debug build than everything else in these tests together.
fn blob(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![3 => 0..=max.min(16), 1 => 0..=max];
    (len, any::<u64>()).prop_map(|(len, seed)| Mix(seed).bytes(len))
}

/// 0..=9 distinct backends in any order, each with a blob.
fn backend_list(max_blob: usize) -> impl Strategy<Value = Vec<(BackendName, Vec<u8>)>> {
    prop::sample::subsequence(BackendName::ALL.to_vec(), 0..=BackendName::ALL.len())
        .prop_shuffle()
        .prop_flat_map(move |names| {
            let n = names.len();
            (Just(names), prop::collection::vec(blob(max_blob), n))
        })
        .prop_map(|(names, blobs)| names.into_iter().zip(blobs).collect())
}

/// A non-empty range that does not wrap, often touching either end of the address space.
fn valid_desc() -> impl Strategy<Value = Desc> {
    let len = prop_oneof![
        2 => 1u64..=4096,
        1 => 1u64..=u64::MAX,
        1 => Just(u64::MAX),
    ];
    (len, any::<u64>(), any::<u64>(), 0u8..4).prop_map(|(len, dev_id, addr, edge)| {
        let top = u64::MAX - len; // the highest start that does not wrap (len >= 1: no overflow)
        let addr = match edge {
            0 => 0,
            1 => top,
            _ => addr % (top + 1),
        };
        Desc::new(addr, len, dev_id)
    })
}

/// A region with 0..=9 distinct backends in any order. There can be 200 regions in a value, so
/// their backend lists come from one seed each rather than from strategies (several times
/// cheaper to generate in a debug build; shrinking still takes the count towards 0).
fn region(max_blob: usize) -> impl Strategy<Value = RegionInfo> {
    (
        mem_kind(),
        valid_desc(),
        any::<u64>(),
        0..=BackendName::ALL.len(),
        any::<u64>(),
    )
        .prop_map(move |(kind, desc, key, n, seed)| {
            let mut mix = Mix(seed);
            let mut names = BackendName::ALL;
            for i in (1..names.len()).rev() {
                names.swap(i, mix.below(i + 1));
            }
            let backends = names[..n]
                .iter()
                .map(|&name| {
                    let len = if mix.below(4) == 0 {
                        mix.below(max_blob + 1)
                    } else {
                        mix.below(max_blob.min(16) + 1)
                    };
                    (name, mix.bytes(len))
                })
                .collect();
            RegionInfo {
                kind,
                desc,
                key,
                backends,
            }
        })
}

fn metadata_with(
    name_chars: usize,
    max_conn_blob: usize,
    max_regions: usize,
    max_region_blob: usize,
) -> impl Strategy<Value = AgentMetadata> {
    (
        name(name_chars, MAX_NAME_BYTES),
        any::<u128>(),
        any::<u64>(),
        any::<bool>(),
        backend_list(max_conn_blob),
        prop::collection::vec(region(max_region_blob), 0..=max_regions),
    )
        .prop_map(
            |(name, instance_id, generation, partial, backends, regions)| AgentMetadata {
                name,
                instance_id,
                generation,
                partial,
                backends: backends
                    .into_iter()
                    .map(|(name, conn_info)| BackendInfo { name, conn_info })
                    .collect(),
                regions,
            },
        )
}

/// Full-size metadata: names up to 255 bytes, 0..=9 backends with blobs up to
/// 4 KiB, 0..=200 regions with 0..=9 backends each.
fn metadata() -> impl Strategy<Value = AgentMetadata> {
    metadata_with(255, 4096, 200, 64)
}

/// Small metadata, for tests that decode once per byte of the encoding.
fn small_metadata() -> impl Strategy<Value = AgentMetadata> {
    metadata_with(12, 24, 4, 8)
}

// ---------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// (a) Everything valid round-trips exactly, and `encode` writes the documented layout.
    #[test]
    fn valid_metadata_round_trips(md in metadata()) {
        let bytes = md.encode();
        prop_assert_eq!(&bytes, &RawMd::from_md(&md).encode(), "encode differs from the spec");
        prop_assert_eq!(checked(&bytes), Ok(md));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// (c) Every strict prefix fails, as is and with the body length patched to the cut
    /// (which makes the body parser itself hit the end). Sampled cuts on full-size metadata.
    #[test]
    fn sampled_prefixes_are_errors(md in metadata(), cuts in prop::collection::vec(any::<Index>(), 32)) {
        let bytes = md.encode();
        for cut in cuts {
            assert_prefix_fails(&bytes, cut.index(bytes.len()));
        }
    }

    /// (d) Single-byte changes at random places in full-size metadata.
    #[test]
    fn sampled_byte_changes_never_panic(
        md in metadata(),
        edits in prop::collection::vec((any::<Index>(), 1u8..=255), 24),
    ) {
        let bytes = md.encode();
        for (at, xor) in edits {
            let mut m = bytes.clone();
            let i = at.index(m.len());
            m[i] ^= xor;
            check_single_byte_change(&md, i, &m);
        }
    }

    /// (d) Count and length fields of full-size metadata overwritten with small,
    /// limit-straddling and huge values: the header's and top level's always, 8 of the rest.
    #[test]
    fn count_and_length_fields_overwritten(md in metadata(), picks in prop::collection::vec(any::<Index>(), 8)) {
        check_fields_overwritten(&md, Some(&picks));
    }

    /// (e) Appended bytes are `Trailing`, whether or not the body length counts them.
    #[test]
    fn appended_bytes_are_trailing(md in metadata(), tail in prop::collection::vec(any::<u8>(), 1..64)) {
        let mut bytes = md.encode();
        let body_len = bytes.len() - HEADER_LEN;
        bytes.extend_from_slice(&tail);
        prop_assert_eq!(checked(&bytes), Err(DecodeError::Trailing(tail.len())));
        set_body_len(&mut bytes, body_len + tail.len());
        prop_assert_eq!(checked(&bytes), Err(DecodeError::Trailing(tail.len())));
    }

    /// Backends unknown to this build are skipped, at the top level and in regions, wherever they
    /// sit in the lists; what remains is exactly the known part.
    #[test]
    fn unknown_backends_are_skipped(
        md in metadata_with(16, 64, 12, 16),
        top in prop::collection::vec((any::<Index>(), 9u8..=255, prop::collection::vec(any::<u8>(), 0..16)), 0..8),
        inner in prop::collection::vec((any::<Index>(), any::<Index>(), 9u8..=255, prop::collection::vec(any::<u8>(), 0..16)), 0..16),
    ) {
        let mut raw = RawMd::from_md(&md);
        for (at, code, blob) in top {
            let i = at.index(raw.backends.len() + 1);
            raw.backends.insert(i, (code, blob));
        }
        if !raw.regions.is_empty() {
            for (r, at, code, blob) in inner {
                let r = r.get_mut(&mut raw.regions);
                let i = at.index(r.backends.len() + 1);
                r.backends.insert(i, (code, blob));
            }
        }
        prop_assert_eq!(checked(&raw.encode()), Ok(md));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// (b) Arbitrary bytes: Ok or Err, within the time and memory bounds.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = checked(&bytes);
    }

    /// (b) A valid header and a random body, so the body parser sees the random bytes.
    #[test]
    fn valid_header_random_body_never_panics(
        partial in any::<bool>(),
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&u16::from(partial).to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&body);
        let _ = checked(&bytes);
    }

    /// Wrong magic, versions and flag bits are refused with the matching error.
    #[test]
    fn wrong_magic_version_or_flags_are_refused(
        md in small_metadata(),
        magic in any::<[u8; 4]>(),
        version in any::<u16>(),
        flags in any::<u16>(),
    ) {
        let bytes = md.encode();
        let mut m = bytes.clone();
        m[..4].copy_from_slice(&magic);
        prop_assert_eq!(checked(&m).is_ok(), magic == MAGIC);
        if magic != MAGIC {
            prop_assert_eq!(checked(&m), Err(DecodeError::BadMagic));
        }
        let mut m = bytes.clone();
        m[4..6].copy_from_slice(&version.to_le_bytes());
        if version == VERSION {
            prop_assert_eq!(checked(&m), Ok(md.clone()));
        } else {
            prop_assert_eq!(checked(&m), Err(DecodeError::Version(version)));
        }
        let mut m = bytes;
        m[6..8].copy_from_slice(&flags.to_le_bytes());
        match checked(&m) {
            Ok(got) => {
                prop_assert!(flags <= 1, "flags {flags:#x} accepted");
                prop_assert_eq!(got.partial, flags == 1);
                prop_assert_eq!(got, AgentMetadata { partial: flags == 1, ..md });
            }
            Err(e) => {
                prop_assert!(flags > 1, "flags {flags:#x} refused: {e}");
                prop_assert!(matches!(e, DecodeError::Invalid { field: "flags", .. }), "{e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// (c) Every strict prefix of small metadata fails with `Truncated`.
    #[test]
    fn every_strict_prefix_is_an_error(md in small_metadata()) {
        let bytes = md.encode();
        for cut in 0..bytes.len() {
            assert_prefix_fails(&bytes, cut);
        }
    }

    /// (d) Every byte of small metadata changed in three ways.
    #[test]
    fn every_single_byte_change_never_panics(md in small_metadata(), xor in 1u8..=255) {
        let bytes = md.encode();
        for i in 0..bytes.len() {
            for x in [xor, 0xff, 0x80] {
                let mut m = bytes.clone();
                m[i] ^= x;
                check_single_byte_change(&md, i, &m);
            }
        }
    }

    /// (d) Small metadata's count and length fields overwritten (regions of 0..=4 are where the
    /// counts are most often exactly at the edge of the bytes left).
    #[test]
    fn small_count_and_length_fields_overwritten(md in small_metadata()) {
        check_fields_overwritten(&md, None);
    }

    /// (b) A valid encoding cut anywhere, followed by random bytes and a consistent body length:
    /// random data in every field position.
    #[test]
    fn valid_prefix_random_tail_never_panics(
        md in small_metadata(),
        cut in any::<Index>(),
        tail in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let bytes = md.encode();
        let cut = HEADER_LEN + cut.index(bytes.len() - HEADER_LEN + 1);
        let mut m = bytes[..cut].to_vec();
        m.extend_from_slice(&tail);
        let body_len = m.len() - HEADER_LEN;
        set_body_len(&mut m, body_len);
        let _ = checked(&m);
    }
}

fn assert_prefix_fails(bytes: &[u8], cut: usize) {
    assert!(cut < bytes.len());
    let prefix = &bytes[..cut];
    let err = checked(prefix).expect_err("strict prefix decoded");
    assert!(
        matches!(err, DecodeError::Truncated { .. }),
        "prefix {cut}/{}: {err:?}",
        bytes.len()
    );
    if cut >= HEADER_LEN {
        // Claim the cut body is whole: the body parser must run out, not misread.
        let mut patched = prefix.to_vec();
        set_body_len(&mut patched, cut - HEADER_LEN);
        let err = checked(&patched).expect_err("strict prefix with patched length decoded");
        assert!(
            matches!(err, DecodeError::Truncated { .. }),
            "patched prefix {cut}/{}: {err:?}",
            bytes.len()
        );
    }
}

/// `m` is `md`'s encoding with the byte at `i` changed. Anything may come of it but a panic; in
/// the header, exactly which error is known.
fn check_single_byte_change(md: &AgentMetadata, i: usize, m: &[u8]) {
    let res = checked(m);
    match i {
        0..=3 => assert_eq!(res, Err(DecodeError::BadMagic), "byte {i}"),
        4..=5 => {
            let v = u16::from_le_bytes([m[4], m[5]]);
            assert_eq!(res, Err(DecodeError::Version(v)), "byte {i}");
        }
        6..=7 => {
            let flags = u16::from_le_bytes([m[6], m[7]]);
            if flags <= 1 {
                let want = AgentMetadata {
                    partial: flags == 1,
                    ..md.clone()
                };
                assert_eq!(res, Ok(want), "byte {i}");
            } else {
                assert!(
                    matches!(res, Err(DecodeError::Invalid { field: "flags", .. })),
                    "byte {i}: {res:?}"
                );
            }
        }
        8..=11 => {
            let got = u32::from_le_bytes(m[8..12].try_into().unwrap()) as usize;
            let real = m.len() - HEADER_LEN;
            let want = if got > real {
                Err(DecodeError::Truncated {
                    field: "body",
                    needed: got - real,
                })
            } else {
                Err(DecodeError::Trailing(real - got))
            };
            assert_eq!(res, want, "byte {i}");
        }
        _ => {}
    }
}

/// Overwrites count and length fields of `md`'s encoding (all of them, or the fixed-position
/// ones and those `picks` selects), one at a time, with a range of values, and checks the decode
/// (errors where the value is over a limit are known exactly).
fn check_fields_overwritten(md: &AgentMetadata, picks: Option<&[Index]>) {
    let raw = RawMd::from_md(md);
    let (bytes, all) = raw.encode_with_fields();
    assert_eq!(bytes, md.encode());
    let fields: Vec<Field> = match picks {
        None => all,
        Some(picks) => {
            let fixed = all.iter().filter(|f| {
                matches!(
                    f.kind,
                    FieldKind::BodyLen
                        | FieldKind::NameLen
                        | FieldKind::BackendCount
                        | FieldKind::RegionCount
                )
            });
            fixed
                .chain(picks.iter().map(|i| i.get(&all)))
                .copied()
                .collect()
        }
    };
    for f in fields {
        let width_max = if f.width == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * f.width)) - 1
        };
        let orig = read_field(&bytes, f);
        let left = (bytes.len() - f.at - f.width) as u64;
        let mut values = vec![
            0,
            1,
            orig.wrapping_add(1),
            orig.wrapping_sub(1),
            left,
            left + 1,
            left / 5,
            left / 5 + 1,
            left / 34 + 1,
            width_max,
            width_max - 1,
            width_max / 2 + 1,
        ];
        if let Some(limit) = f.kind.limit() {
            values.extend([limit as u64 - 1, limit as u64, limit as u64 + 1]);
        }
        for v in values {
            let v = v.min(width_max);
            let mut m = bytes.clone();
            overwrite(&mut m, f.at, f.width, v);
            let res = checked(&m);
            let over = f.kind.limit().is_some_and(|l| v > l as u64);
            if f.kind == FieldKind::BodyLen {
                let real = (bytes.len() - HEADER_LEN) as u64;
                let want = match v.cmp(&real) {
                    std::cmp::Ordering::Greater => Err(DecodeError::Truncated {
                        field: "body",
                        needed: (v - real) as usize,
                    }),
                    std::cmp::Ordering::Less => Err(DecodeError::Trailing((real - v) as usize)),
                    std::cmp::Ordering::Equal => Ok(md.clone()),
                };
                assert_eq!(res, want, "{f:?} = {v}");
            } else if over {
                // A count's or length's limit is checked before anything it counts is read.
                assert!(
                    matches!(res, Err(DecodeError::TooLarge { got, .. }) if got as u64 == v),
                    "{f:?} = {v}: {res:?}"
                );
            } else if v == orig {
                assert_eq!(res, Ok(md.clone()), "{f:?} = {v}");
            } else if v > left {
                // More bytes claimed than the input has left: the decode can only run out.
                assert!(
                    matches!(res, Err(DecodeError::Truncated { .. })),
                    "{f:?} = {v}: {res:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed cases.

#[test]
fn input_over_the_size_limit_is_refused_up_front() {
    // Zeroed pages are not touched until written, so this costs no real memory.
    let mut bytes = vec![0u8; MAX_METADATA_BYTES + 1];
    bytes[..4].copy_from_slice(&MAGIC);
    let (res, allocated) = count_allocs(|| AgentMetadata::decode(&bytes));
    assert_eq!(
        res,
        Err(DecodeError::TooLarge {
            field: "metadata",
            got: MAX_METADATA_BYTES + 1,
            limit: MAX_METADATA_BYTES,
        })
    );
    assert_eq!(allocated, 0);
}

#[test]
fn every_other_version_and_flag_value_is_refused() {
    let md = one_region_md();
    let bytes = md.encode();
    for v in 0..=u16::MAX {
        let mut m = bytes.clone();
        m[4..6].copy_from_slice(&v.to_le_bytes());
        let res = AgentMetadata::decode(&m);
        if v == VERSION {
            assert_eq!(res, Ok(md.clone()));
        } else {
            assert_eq!(res, Err(DecodeError::Version(v)));
        }
        let mut m = bytes.clone();
        m[6..8].copy_from_slice(&v.to_le_bytes());
        let res = AgentMetadata::decode(&m);
        if v <= 1 {
            assert_eq!(res.map(|md| md.partial), Ok(v == 1));
        } else {
            assert!(
                matches!(res, Err(DecodeError::Invalid { field: "flags", .. })),
                "flags {v:#x}: {res:?}"
            );
        }
    }
}

fn one_region_md() -> AgentMetadata {
    AgentMetadata {
        name: "peer".into(),
        instance_id: 1,
        generation: 2,
        partial: false,
        backends: vec![BackendInfo {
            name: BackendName::Tcp,
            conn_info: b"10.0.0.1:5000".to_vec(),
        }],
        regions: vec![RegionInfo {
            kind: MemKind::Vram,
            desc: Desc::new(0x7000_0000, 1 << 20, 3),
            key: 42,
            backends: vec![(BackendName::Cuda, vec![7; 8])],
        }],
    }
}

fn invalid(field: &'static str, res: Result<AgentMetadata, DecodeError>) {
    assert!(
        matches!(&res, Err(DecodeError::Invalid { field: f, .. }) if *f == field),
        "want Invalid {field}, got {res:?}"
    );
}

#[test]
fn invalid_fields_are_refused() {
    let base = RawMd::from_md(&one_region_md());
    assert_eq!(checked(&base.encode()), Ok(one_region_md()));

    let mut raw = base.clone();
    raw.name.clear();
    invalid("name", checked(&raw.encode()));

    for bad in [
        &[0xff][..],
        &[b'a', 0xc3],
        &[0xed, 0xa0, 0x80],
        &[0xf8, 0x88, 0x80, 0x80],
    ] {
        let mut raw = base.clone();
        raw.name = bad.to_vec();
        invalid("name", checked(&raw.encode()));
    }

    let mut raw = base.clone();
    raw.name = vec![b'n'; MAX_NAME_BYTES];
    assert_eq!(checked(&raw.encode()).unwrap().name.len(), MAX_NAME_BYTES);
    raw.name.push(b'n');
    assert!(matches!(
        checked(&raw.encode()),
        Err(DecodeError::TooLarge { field: "name", got, limit }) if got == MAX_NAME_BYTES + 1 && limit == MAX_NAME_BYTES
    ));

    let mut raw = base.clone();
    raw.backends.push((BackendName::Tcp.code(), vec![]));
    invalid("backends", checked(&raw.encode()));

    for kind in [5u8, 6, 0x80, 0xff] {
        let mut raw = base.clone();
        raw.regions[0].kind = kind;
        invalid("region kind", checked(&raw.encode()));
    }

    for (addr, len) in [
        (0, 0),
        (0x1000, 0),
        (u64::MAX, 0),
        (u64::MAX, 1),
        (1, u64::MAX),
        (u64::MAX / 2 + 1, u64::MAX / 2 + 1),
    ] {
        let mut raw = base.clone();
        raw.regions[0].addr = addr;
        raw.regions[0].len = len;
        invalid("region", checked(&raw.encode()));
    }
    // The last representable ranges are fine.
    for (addr, len) in [(0, u64::MAX), (u64::MAX - 1, 1)] {
        let mut raw = base.clone();
        raw.regions[0].addr = addr;
        raw.regions[0].len = len;
        assert_eq!(
            checked(&raw.encode()).unwrap().regions[0].desc,
            Desc::new(addr, len, 3)
        );
    }
}

#[test]
fn blobs_at_and_over_the_limit() {
    let mut raw = RawMd::from_md(&one_region_md());
    raw.backends[0].1 = vec![0xab; MAX_BLOB_BYTES];
    let md = checked(&raw.encode()).unwrap();
    assert_eq!(md.backends[0].conn_info.len(), MAX_BLOB_BYTES);
    // One byte over: refused from the length field alone.
    let (mut bytes, fields) = raw.encode_with_fields();
    let f = fields
        .iter()
        .find(|f| f.kind == FieldKind::BackendBlobLen)
        .unwrap();
    overwrite(&mut bytes, f.at, f.width, MAX_BLOB_BYTES as u64 + 1);
    assert!(matches!(
        checked(&bytes),
        Err(DecodeError::TooLarge { got, .. }) if got == MAX_BLOB_BYTES + 1
    ));
}

#[test]
fn backend_count_limits() {
    // MAX_BACKENDS entries (known ones once each, the rest unknown) are accepted; one more is not.
    let mut raw = RawMd::from_md(&one_region_md());
    raw.backends = (0..MAX_BACKENDS)
        .map(|i| {
            let code = if i < BackendName::ALL.len() {
                i as u8
            } else {
                100 + i as u8
            };
            (code, vec![i as u8])
        })
        .collect();
    let md = checked(&raw.encode()).unwrap();
    assert_eq!(md.backends.len(), BackendName::ALL.len());
    raw.backends.push((250, vec![]));
    assert!(matches!(
        checked(&raw.encode()),
        Err(DecodeError::TooLarge { field: "backend count", got, .. }) if got == MAX_BACKENDS + 1
    ));

    let mut raw = RawMd::from_md(&one_region_md());
    raw.regions[0].backends = (0..MAX_BACKENDS).map(|i| (200, vec![i as u8])).collect();
    assert!(checked(&raw.encode()).unwrap().regions[0]
        .backends
        .is_empty());
    raw.regions[0]
        .backends
        .push((BackendName::Local.code(), vec![]));
    assert!(matches!(
        checked(&raw.encode()),
        Err(DecodeError::TooLarge { field: "region backend count", got, .. }) if got == MAX_BACKENDS + 1
    ));
}

/// The inputs that make a decode allocate the most per input byte: counts as large as the bytes
/// left allow, entries as small as they can be. The allocation must stay proportional.
#[test]
fn worst_case_allocation_is_proportional_to_input() {
    let mut worst = 0.0f64;
    let mut measure = |bytes: &[u8]| {
        let (res, allocated) = count_allocs(|| AgentMetadata::decode(bytes));
        let ratio = allocated as f64 / bytes.len() as f64;
        worst = worst.max(ratio);
        assert!(
            allocated <= alloc_budget(bytes.len()),
            "{} bytes allocated {allocated}: {res:?}",
            bytes.len()
        );
        res
    };
    // 64 known-size backend entries, each the minimum 5 bytes (all of them known names would be
    // duplicates, so use one known name and unknown codes: the vector is sized by the count).
    let mut raw = RawMd::from_md(&one_region_md());
    raw.regions.clear();
    raw.backends = (0..MAX_BACKENDS)
        .map(|i| (if i == 0 { 0 } else { 99 }, vec![]))
        .collect();
    assert!(measure(&raw.encode()).is_ok());
    // Many minimal regions, each with 64 minimal region backend entries (one known name, the rest
    // unknown codes: a known name listed twice is refused).
    let mut raw = RawMd::from_md(&one_region_md());
    raw.backends.clear();
    raw.regions = (0..200)
        .map(|i| RawRegion {
            kind: 0,
            addr: i * 16,
            len: 16,
            dev_id: 0,
            key: 0,
            backends: (0..MAX_BACKENDS)
                .map(|i| (if i == 0 { 0 } else { 99 }, vec![]))
                .collect(),
        })
        .collect();
    assert!(measure(&raw.encode()).is_ok());
    // A region count as large as the bytes left allow, then bytes that fail the first region.
    let mut raw = RawMd::from_md(&one_region_md());
    raw.backends.clear();
    raw.regions.clear();
    let mut bytes = raw.encode();
    let n = 100_000;
    let count_at = bytes.len() - 4;
    bytes[count_at..].copy_from_slice(&(n as u32).to_le_bytes());
    bytes.resize(bytes.len() + n * 34, 0);
    let body_len = bytes.len() - HEADER_LEN;
    set_body_len(&mut bytes, body_len);
    invalid("region", measure(&bytes));
    // Same with regions of 64 region backends whose entries run out in the first region.
    let mut raw = RawMd::from_md(&one_region_md());
    raw.backends.clear();
    raw.regions[0].backends.clear();
    let (mut bytes, fields) = raw.encode_with_fields();
    let bc = fields
        .iter()
        .find(|f| f.kind == FieldKind::RegionBackendCount)
        .unwrap();
    overwrite(&mut bytes, bc.at, 1, MAX_BACKENDS as u64);
    // Exactly the 64 * 5 bytes the count check asks for, but the first entry's blob takes all
    // of them: the vector for 64 entries is made, then the second entry runs out.
    let blob = (MAX_BACKENDS * 5 - 5) as u32;
    bytes.push(BackendName::Local.code());
    bytes.extend_from_slice(&blob.to_le_bytes());
    bytes.resize(bytes.len() + blob as usize, 0);
    let body_len = bytes.len() - HEADER_LEN;
    set_body_len(&mut bytes, body_len);
    assert!(matches!(
        measure(&bytes),
        Err(DecodeError::Truncated { .. })
    ));
    // 64 five-byte backend entries become 64 32-byte entries: about 6.4 times the input.
    assert!(worst <= 8.0, "worst allocation ratio {worst:.2}");
}

#[test]
fn huge_counts_in_tiny_inputs() {
    // Body lengths, counts and blob lengths at their widest, with almost nothing after them.
    let mut raw = RawMd::from_md(&one_region_md());
    raw.regions[0].backends.clear();
    let (bytes, fields) = raw.encode_with_fields();
    for f in fields {
        for v in [u64::MAX, u64::from(u32::MAX), 1 << 31, 1 << 16, 1 << 8] {
            let width_max = (1u64 << (8 * f.width)) - 1;
            let mut m = bytes[..f.at + f.width].to_vec();
            overwrite(&mut m, f.at, f.width, v.min(width_max));
            let body_len = m.len() - HEADER_LEN;
            if f.kind != FieldKind::BodyLen {
                set_body_len(&mut m, body_len);
            }
            assert!(checked(&m).is_err(), "{f:?} = {v:#x}");
        }
    }
}
