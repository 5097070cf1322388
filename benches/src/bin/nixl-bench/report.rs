//! What a row prints beside its own figures with `--compare`: the ceiling and the peer measured
//! in the same run, and the row's ratio to each.

use super::*;

/// Adds the `--compare` fields to a JSON row of `gbps`: the ceiling (`baseline`) and, when one
/// ran, the peer, each with its GB/s, the row's ratio to it, and why it is missing if it is.
pub(crate) fn put_compared(
    o: &mut serde_json::Value,
    gbps: f64,
    (name, baseline): (&str, &Measured),
    peer: Option<(&str, &Measured)>,
) {
    let ratio = |m: &Measured| m.gbps().map(|c| gbps / c);
    o["baseline"] = name.into();
    o["baseline_gbps"] = baseline.gbps().into();
    o["ratio"] = ratio(baseline).into();
    if let Measured::Missing(why) = baseline {
        o["baseline_missing"] = why.clone().into();
    }
    if let Some((name, m)) = peer {
        o["peer"] = name.into();
        o["peer_gbps"] = m.gbps().into();
        o["peer_ratio"] = ratio(m).into();
        if let Measured::Missing(why) = m {
            o["peer_missing"] = why.clone().into();
        }
    }
}

/// A comparison's two table cells: its GB/s and the row's ratio to it, or `-` for both.
pub(crate) fn compared_cells(gbps: f64, m: Option<&Measured>) -> (String, String) {
    match m.and_then(Measured::gbps) {
        Some(g) => (format!("{g:.2}"), format!("{:.2}", gbps / g)),
        None => ("-".into(), "-".into()),
    }
}
