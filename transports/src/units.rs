//! Sizes as people write them in configuration files and on command lines (`64KiB`, `1GiB`),
//! parsed once for every crate: the agent's configuration, the daemon's jobs, the CLIs, the
//! benchmarks.

/// Parses `123`, `64KiB`/`64K`, `1MiB`/`1M`, `1GiB`/`1G`, `1TiB`/`1T` (binary multiples; also
/// `KB`/`MB`/`GB` as powers of 1000; units case-insensitive, a space allowed before them).
/// Zero is refused, and so is a size that does not fit in 64 bits.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?}: expected a number and a unit, e.g. 64KiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => {
            return Err(format!(
                "bad size {s:?}: unknown unit {u:?} (B, KiB, MiB, GiB, TiB, or KB, MB, GB)"
            ))
        }
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!("bad size {s:?}: must be more than 0 bytes")),
        Some(v) => Ok(v),
        None => Err(format!("bad size {s:?}: too large")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_in_every_unit_and_the_mistakes() {
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size(" 8 MiB "), Ok(8 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert!(parse_size("4XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("KiB").unwrap_err().contains("bad size"));
        assert!(parse_size("0KiB").unwrap_err().contains("more than 0"));
        assert!(parse_size("99999999999GiB")
            .unwrap_err()
            .contains("too large"));
    }
}
