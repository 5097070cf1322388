//! Bulk memory copies for the backends that copy with the CPU (`local`, `shm`'s mapped path).
//!
//! Two facts measured on our machines drive this (numbers in BENCHMARKS.md): glibc's memcpy
//! switches to non-temporal (streaming) stores only above a large threshold (here somewhere above
//! 32 MiB), so a big transfer cut into pieces for several threads loses 40% of its speed if each
//! piece goes through memcpy; and a copy with streaming stores runs at full memory bandwidth at
//! any piece size. So pieces of big transfers are copied with streaming stores, and small
//! transfers (whose destination is likely read soon, from cache) with memcpy.
//!
//! A third: glibc's memcpy copies mid-sized blocks with `rep movsb`, which on the AMD EPYC
//! machines we run on drops from 15–35 GB/s to under 1 GB/s when the destination lies 1 to 31
//! bytes past the source modulo 4 KiB (4K aliasing in the microcode loop). Heap buffers end up
//! there all the time (malloc returns addresses 16 bytes into a page; a memfd mapping is page
//! aligned), so an `shm` READ into a malloc'd buffer hit it on every post. Such copies go
//! through a plain SIMD load/store loop instead ([`ALIASING`]), which runs at memcpy speed.
//!
//! The thread pool that runs big copies in pieces on several threads is in `copy/pool.rs`
//! ([`CopyPool`], [`CopyPlan`]).

mod pool;
pub(crate) use pool::{CopyOp, CopyPlan, CopyPool, INLINE_MAX};

use std::sync::LazyLock;

/// Copies of at least this many bytes use streaming stores.
pub(crate) const STREAM_MIN: usize = 1 << 20;

/// Distances `(dst - src) mod 4096` below this go through a plain SIMD loop rather than memcpy.
pub(crate) const ALIASING: usize = 64;
/// Copies shorter than this always use memcpy (no `rep movsb` there).
const ALIAS_MIN: usize = 256;

/// Whether memcpy would run into the 4K-aliasing slow path for this pair of addresses.
fn aliased(dst: *mut u8, src: *const u8, len: usize) -> bool {
    let d = (dst as usize).wrapping_sub(src as usize) & 4095;
    len >= ALIAS_MIN && d != 0 && d < ALIASING
}

/// A copy for cache-resident destinations: memcpy, or the SIMD loop where memcpy would alias.
///
/// # Safety
/// As [`copy_bytes`].
pub(crate) unsafe fn copy_cached(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if aliased(dst, src, len) {
        // SAFETY: forwarded contract.
        unsafe { simd_copy(dst, src, len) };
        return;
    }
    // SAFETY: forwarded contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// Copies `len` bytes from `src` to `dst`; regions may not overlap (use [`copy_overlapping`]).
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and the two ranges must not
/// overlap. Other threads or processes may write the same memory concurrently (that is the
/// one-sided model): the bytes then are unspecified, but memory safety holds since only raw
/// pointer accesses are made.
pub(crate) unsafe fn copy_bytes(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= STREAM_MIN {
        // SAFETY: forwarded contract.
        unsafe { stream_copy(dst, src, len) };
        return;
    }
    // SAFETY: forwarded contract.
    unsafe { copy_cached(dst, src, len) };
}

/// Copies `len` bytes from `src` to `dst`, which may overlap.
///
/// # Safety
/// As [`copy_bytes`], except that the ranges may overlap.
pub(crate) unsafe fn copy_overlapping(dst: *mut u8, src: *const u8, len: usize) {
    let (d, s) = (dst as usize, src as usize);
    if d.abs_diff(s) >= len {
        // SAFETY: the ranges are disjoint; the rest is the caller's contract.
        unsafe { copy_bytes(dst, src, len) };
    } else {
        // SAFETY: the caller's contract; ptr::copy handles overlap.
        unsafe { std::ptr::copy(src, dst, len) };
    }
}

/// A plain copy loop, 64 bytes per round (all loads, then all stores), with the widest vectors
/// the CPU has; the tail goes through memcpy (short, no `rep movsb`).
///
/// # Safety
/// As [`copy_bytes`].
#[cfg(target_arch = "x86_64")]
unsafe fn simd_copy(dst: *mut u8, src: *const u8, len: usize) {
    static AVX2: LazyLock<bool> = LazyLock::new(|| std::arch::is_x86_feature_detected!("avx2"));
    if *AVX2 {
        // SAFETY: AVX2 is present (checked above); the rest is the forwarded contract.
        unsafe { simd_copy_avx2(dst, src, len) };
        return;
    }
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};
    let mut i = 0;
    while i + 64 <= len {
        // SAFETY: `i + 64 <= len` keeps the four 16-byte loads and stores inside the ranges
        // (unaligned forms); SSE2 is part of the x86_64 baseline.
        unsafe {
            let s = src.add(i) as *const __m128i;
            let d = dst.add(i) as *mut __m128i;
            let (a, b, c, e) = (
                _mm_loadu_si128(s),
                _mm_loadu_si128(s.add(1)),
                _mm_loadu_si128(s.add(2)),
                _mm_loadu_si128(s.add(3)),
            );
            _mm_storeu_si128(d, a);
            _mm_storeu_si128(d.add(1), b);
            _mm_storeu_si128(d.add(2), c);
            _mm_storeu_si128(d.add(3), e);
        }
        i += 64;
    }
    // SAFETY: the tail `i..len` lies inside both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i) };
}

/// [`simd_copy`] with 32-byte AVX2 vectors, 128 bytes per round.
///
/// # Safety
/// As [`copy_bytes`], and the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn simd_copy_avx2(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_storeu_si256};
    let mut i = 0;
    while i + 128 <= len {
        // SAFETY: `i + 128 <= len` keeps the four 32-byte loads and stores inside the ranges
        // (unaligned forms); the caller checked AVX2.
        unsafe {
            let s = src.add(i) as *const __m256i;
            let d = dst.add(i) as *mut __m256i;
            let (a, b, c, e) = (
                _mm256_loadu_si256(s),
                _mm256_loadu_si256(s.add(1)),
                _mm256_loadu_si256(s.add(2)),
                _mm256_loadu_si256(s.add(3)),
            );
            _mm256_storeu_si256(d, a);
            _mm256_storeu_si256(d.add(1), b);
            _mm256_storeu_si256(d.add(2), c);
            _mm256_storeu_si256(d.add(3), e);
        }
        i += 128;
    }
    // SAFETY: the tail `i..len` lies inside both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i) };
}

/// SSE2 streaming copy: unaligned 16-byte loads, aligned non-temporal stores, then a fence so
/// the data is globally visible before anything that follows (a completion, a notification).
///
/// # Safety
/// As [`copy_bytes`].
#[cfg(target_arch = "x86_64")]
unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let head = ((16 - (dst as usize & 15)) & 15).min(len);
    // SAFETY: `head <= len`, inside both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
    let mut i = head;
    while i + 64 <= len {
        // SAFETY: `i + 64 <= len` keeps all four 16-byte loads and stores inside the ranges;
        // `dst + i` is 16-byte aligned (the head brought it there, and `i` advances by 64);
        // SSE2 is part of the x86_64 baseline, so the intrinsics are always available.
        unsafe {
            let s = src.add(i) as *const __m128i;
            let d = dst.add(i) as *mut __m128i;
            let a = _mm_loadu_si128(s);
            let b = _mm_loadu_si128(s.add(1));
            let c = _mm_loadu_si128(s.add(2));
            let e = _mm_loadu_si128(s.add(3));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
        i += 64;
    }
    // SAFETY: the tail `i..len` lies inside both ranges; the fence orders the streaming stores
    // before later stores (SSE2 baseline).
    unsafe {
        std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alignment_and_length_copies_exactly() {
        let src: Vec<u8> = (0..(3 * STREAM_MIN + 200))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for (soff, doff, len) in [
            (0, 0, 0),
            (1, 0, 17),
            (0, 3, 100),
            (5, 11, STREAM_MIN),
            (1, 15, STREAM_MIN + 63),
            (0, 0, 3 * STREAM_MIN),
            (7, 9, 2 * STREAM_MIN + 1),
        ] {
            let mut dst = vec![0u8; len + 32];
            // SAFETY: both ranges are inside their vectors and do not overlap.
            unsafe { copy_bytes(dst.as_mut_ptr().add(doff), src.as_ptr().add(soff), len) };
            assert_eq!(
                &dst[doff..doff + len],
                &src[soff..soff + len],
                "{soff} {doff} {len}"
            );
            assert!(dst[..doff].iter().all(|&b| b == 0));
            assert!(dst[doff + len..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn aliased_copies_take_the_loop_and_copy_exactly() {
        let src: Vec<u8> = (0..70_000).map(|i| (i * 7 % 253) as u8).collect();
        let mut dst = vec![0u8; 70_000 + 8192];
        let base = dst.as_mut_ptr() as usize;
        for dist in [1usize, 16, 31, 63, 64, 100] {
            for len in [255usize, 256, 257, 1000, 4096 + 13, 65_536 + 7] {
                dst.fill(0);
                // A destination `dist` past the source modulo 4 KiB.
                let want = (src.as_ptr() as usize + dist) & 4095;
                let off = (want + 4096 - base % 4096) % 4096;
                let d = dst[off..].as_mut_ptr();
                assert_eq!(
                    (d as usize).wrapping_sub(src.as_ptr() as usize) & 4095,
                    dist
                );
                assert_eq!(aliased(d, src.as_ptr(), len), dist < ALIASING && len >= 256);
                // SAFETY: both ranges lie inside their vectors and do not overlap.
                unsafe { copy_bytes(d, src.as_ptr(), len) };
                assert!(dst[off..off + len] == src[..len], "{dist} {len}");
                assert!(dst[..off].iter().all(|&b| b == 0));
                assert!(dst[off + len..].iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn overlapping_copy_is_a_memmove() {
        let mut v: Vec<u8> = (0..200u8).collect();
        let p = v.as_mut_ptr();
        // SAFETY: both ranges lie inside `v`.
        unsafe { copy_overlapping(p.add(10), p, 100) };
        assert_eq!(v[10..110], (0..100u8).collect::<Vec<_>>()[..]);
    }
}
