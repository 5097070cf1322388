//! The one generator of test bytes: byte `k` of the pattern of `seed` depends on `k` and the
//! seed only, so a byte moved to the wrong place, or a range written at the wrong offset, shows;
//! and any range of it can be made or checked without the rest.

/// The pattern word at 8-byte index `i`.
pub fn word(i: usize, seed: u64) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Fills `buf` with the pattern of `seed` (byte `k` depends on `k` and the seed only).
pub fn fill(buf: &mut [u8], seed: u64) {
    fill_at(buf, 0, seed);
}

/// Fills `buf` with the bytes the pattern of `seed` has at offsets `start..start + buf.len()`.
pub fn fill_at(buf: &mut [u8], start: usize, seed: u64) {
    let mut k = start;
    let mut i = 0;
    // Head up to the next 8-byte boundary, then whole words, then the tail.
    while i < buf.len() && k % 8 != 0 {
        buf[i] = word(k / 8, seed).to_le_bytes()[k % 8];
        i += 1;
        k += 1;
    }
    let words = (buf.len() - i) / 8;
    for (j, c) in buf[i..i + words * 8].chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&word(k / 8 + j, seed).to_le_bytes());
    }
    i += words * 8;
    k += words * 8;
    while i < buf.len() {
        buf[i] = word(k / 8, seed).to_le_bytes()[k % 8];
        i += 1;
        k += 1;
    }
}

/// The first offset where `buf` differs from the pattern of `seed`, if any.
pub fn first_mismatch(buf: &[u8], seed: u64) -> Option<usize> {
    let mut expect = vec![0u8; 1 << 20];
    for (n, chunk) in buf.chunks(1 << 20).enumerate() {
        let e = &mut expect[..chunk.len()];
        fill_at(e, n << 20, seed);
        if chunk != e {
            let p = chunk
                .iter()
                .zip(e.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Some((n << 20) + p);
        }
    }
    None
}

/// `len` bytes of the pattern of `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(&mut v, seed);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_range_matches_the_whole() {
        let whole = pattern(9, 3000);
        let mut part = vec![0u8; 1001];
        fill_at(&mut part, 13, 9);
        assert_eq!(part, whole[13..1014]);
        assert_ne!(pattern(10, 3000), whole);
    }

    #[test]
    fn the_first_bad_byte_is_found() {
        let mut b = pattern(5, 1003);
        assert_eq!(first_mismatch(&b, 5), None);
        b[1001] ^= 1;
        assert_eq!(first_mismatch(&b, 5), Some(1001));
        b[17] ^= 1;
        assert_eq!(first_mismatch(&b, 5), Some(17));
    }
}
