//! Keys and ids from the OS random generator.

use crate::error::{Error, Result};

/// A random u64 from the OS generator (`getrandom`), or an error when it fails: region keys,
/// instance ids and nonces are never made of guessable bytes instead.
pub fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    fill_random(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub(super) fn random_u128() -> Result<u128> {
    let mut b = [0u8; 16];
    fill_random(&mut b)?;
    Ok(u128::from_le_bytes(b))
}

fn fill_random(buf: &mut [u8]) -> Result<()> {
    #[cfg(test)]
    if super::tests::RANDOM_FAILS.with(std::cell::Cell::get) {
        return Err(random_failed(std::io::Error::other("injected failure")));
    }
    getrandom::fill(buf).map_err(|e| random_failed(std::io::Error::other(e.to_string())))
}

fn random_failed(e: std::io::Error) -> Error {
    Error::io(
        "the OS random generator (getrandom) failed, so no unguessable key or id can be made",
        e,
    )
}
