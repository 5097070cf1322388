//! Sizes as people write them in configuration files and on command lines (`64KiB`, `1GiB`),
//! parsed once for every crate: the agent's configuration, the daemon's jobs, the CLIs, the
//! benchmarks.

use std::fmt;

/// A size that could not be parsed: the text as given and what was wrong with it. Its text
/// reads `bad size "4XB": unknown unit "xb" (B, KiB, MiB, GiB, TiB, or KB, MB, GB)`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad size {input:?}: {problem}")]
pub struct ParseSizeError {
    /// The text, trimmed.
    pub input: String,
    /// What is wrong with it.
    pub problem: SizeProblem,
}

/// What is wrong with a size ([`ParseSizeError`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SizeProblem {
    /// No number in front.
    NoNumber,
    /// A unit that is not one of ours (lower case, as compared).
    UnknownUnit(String),
    /// Zero bytes.
    Zero,
    /// More than 64 bits hold, or more than fits in memory where a length in memory is asked.
    TooLarge,
}

impl fmt::Display for SizeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeProblem::NoNumber => f.write_str("expected a number and a unit, e.g. 64KiB"),
            SizeProblem::UnknownUnit(u) => write!(
                f,
                "unknown unit {u:?} (B, KiB, MiB, GiB, TiB, or KB, MB, GB)"
            ),
            SizeProblem::Zero => f.write_str("must be more than 0 bytes"),
            SizeProblem::TooLarge => f.write_str("too large"),
        }
    }
}

/// Parses `123`, `64KiB`/`64K`, `1MiB`/`1M`, `1GiB`/`1G`, `1TiB`/`1T` (binary multiples; also
/// `KB`/`MB`/`GB` as powers of 1000; units case-insensitive, a space allowed before them).
/// Zero is refused, and so is a size that does not fit in 64 bits.
pub fn parse_size(s: &str) -> Result<u64, ParseSizeError> {
    let s = s.trim();
    let bad = |problem| ParseSizeError {
        input: s.to_owned(),
        problem,
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad(SizeProblem::NoNumber))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => return Err(bad(SizeProblem::UnknownUnit(u.to_owned()))),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(bad(SizeProblem::Zero)),
        Some(v) => Ok(v),
        None => Err(bad(SizeProblem::TooLarge)),
    }
}

/// A length of memory in this process, written as [`parse_size`] reads it: also refused when
/// it does not fit in `usize`.
pub fn parse_len(s: &str) -> Result<usize, ParseSizeError> {
    let v = parse_size(s)?;
    usize::try_from(v).map_err(|_| ParseSizeError {
        input: s.trim().to_owned(),
        problem: SizeProblem::TooLarge,
    })
}

/// A comma-separated list of lengths (`4KiB,1MiB`, see [`parse_len`]); an empty item is
/// refused (so is an empty list: it is one empty item).
pub fn parse_lens(list: &str) -> Result<Vec<usize>, ParseSizeError> {
    list.split(',').map(parse_len).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_every_unit_and_the_mistakes() {
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size(" 8 MiB "), Ok(8 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        let e = parse_size("4XB").unwrap_err();
        assert_eq!(e.problem, SizeProblem::UnknownUnit("xb".into()));
        assert_eq!(
            e.to_string(),
            "bad size \"4XB\": unknown unit \"xb\" (B, KiB, MiB, GiB, TiB, or KB, MB, GB)"
        );
        let e = parse_size("KiB").unwrap_err();
        assert_eq!(e.problem, SizeProblem::NoNumber);
        assert!(e
            .to_string()
            .starts_with("bad size \"KiB\": expected a number"));
        assert_eq!(parse_size(" 0KiB").unwrap_err().problem, SizeProblem::Zero);
        assert!(parse_size("0KiB")
            .unwrap_err()
            .to_string()
            .contains("more than 0"));
        assert_eq!(
            parse_size("99999999999GiB").unwrap_err().problem,
            SizeProblem::TooLarge
        );
        // It is an error with a source-less chain, usable as `Box<dyn Error + Send + Sync>`.
        let boxed: Box<dyn std::error::Error + Send + Sync> = parse_size("x").unwrap_err().into();
        assert!(boxed.source().is_none());
    }

    #[test]
    fn lengths_and_lists_of_them() {
        assert_eq!(
            parse_lens("4KiB,1MiB,64MiB").unwrap(),
            [4096, 1 << 20, 64 << 20]
        );
        assert_eq!(parse_len("100"), Ok(100));
        assert_eq!(
            parse_lens("4KiB,,1MiB").unwrap_err().problem,
            SizeProblem::NoNumber
        );
        assert!(parse_lens("").is_err());
        if usize::BITS < 64 {
            assert_eq!(
                parse_len("1TiB").unwrap_err().problem,
                SizeProblem::TooLarge
            );
        }
    }
}
