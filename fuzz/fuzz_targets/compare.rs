//! `mcompress compare` on two report-shaped inputs: the first byte picks which limits are set
//! (bits 0–2: size, accuracy, latency; bit 3: absolute instead of percent), the rest is two JSON
//! documents separated by a NUL byte. No panic; a limit that was set always has a row that
//! judged it (PASS or FAIL, never skipped); `passed` is false whenever a row failed. The first
//! document is also read as a manifest (what `verify` parses).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcompress_bundle::compare::{Limits, Threshold, compare_reports};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let cut = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let (a, b) = (&rest[..cut], rest.get(cut + 1..).unwrap_or(&[]));
    let (Ok(a), Ok(b)) =
        (serde_json::from_slice::<serde_json::Value>(a), serde_json::from_slice::<serde_json::Value>(b))
    else {
        return;
    };
    let t = Some(if flags & 8 != 0 { Threshold::Absolute(0.5) } else { Threshold::Percent(5.0) });
    let set = [flags & 1 != 0, flags & 2 != 0, flags & 4 != 0];
    let limits = Limits {
        max_size_growth: t.filter(|_| set[0]),
        max_accuracy_drop: t.filter(|_| set[1]),
        max_latency_growth: t.filter(|_| set[2]),
    };
    let c = compare_reports("a".into(), &a, "b".into(), &b, &limits);
    let _ = c.to_markdown();
    for (on, what) in set.into_iter().zip(["bundle bytes", "eval", "ms"]) {
        if on {
            assert!(
                c.rows.iter().any(|r| r.limit.is_some()
                    && r.quantity.contains(what)
                    && (r.check == "PASS" || r.check.starts_with("FAIL"))),
                "{what}: {:?}",
                c.rows
            );
        }
    }
    assert!(!c.passed || c.rows.iter().all(|r| !r.check.starts_with("FAIL")), "{:?}", c.rows);
    let _ = serde_json::from_value::<mcompress_bundle::Manifest>(a);
});
