//! `mcompress compare OLD NEW`: diff two runs (report.json files or bundle dirs) and gate on
//! regressions in size, accuracy and latency.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::{Error, Result, io};

/// A threshold: relative (`"5%"`) or absolute (a number, or a size like `"10MiB"` for sizes).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Threshold {
    /// Percent of the old value.
    Percent(f64),
    /// In the quantity's own unit.
    Absolute(f64),
}

impl Threshold {
    /// Parses `"5%"`, `"0.01"`, `"10MiB"`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return p.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).map(Threshold::Percent);
        }
        if let Ok(v) = s.parse::<f64>() {
            return (v.is_finite() && v >= 0.0).then_some(Threshold::Absolute(v));
        }
        mcompress_recipe::ByteSize::parse(s).map(|b| Threshold::Absolute(b.0 as f64))
    }

    fn allows(self, old: f64, worsening: f64) -> bool {
        match self {
            Threshold::Percent(p) => worsening <= old.abs() * p / 100.0 + 1e-12,
            Threshold::Absolute(a) => worsening <= a + 1e-12,
        }
    }
}

/// Limits for [`compare`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Largest allowed growth of the bundle size.
    pub max_size_growth: Option<Threshold>,
    /// Largest allowed accuracy drop (direction known per metric).
    pub max_accuracy_drop: Option<Threshold>,
    /// Largest allowed latency growth (measured eval p50, else estimated time per token per target).
    pub max_latency_growth: Option<Threshold>,
}

/// One compared quantity.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What.
    pub quantity: String,
    /// Old value.
    pub old: Option<f64>,
    /// New value.
    pub new: Option<f64>,
    /// new − old.
    pub delta: Option<f64>,
    /// Relative change in percent.
    pub delta_percent: Option<f64>,
    /// `PASS`/`FAIL` when a limit applies, else `-`.
    pub check: String,
    /// The limit applied.
    pub limit: Option<String>,
}

/// Result of [`compare`].
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// Old report path.
    pub old: PathBuf,
    /// New report path.
    pub new: PathBuf,
    /// Rows.
    pub rows: Vec<Row>,
    /// No limit was exceeded.
    pub passed: bool,
}

fn load(path: &Path) -> Result<(PathBuf, Value)> {
    let file = if path.is_dir() { path.join("report.json") } else { path.to_path_buf() };
    let text = crate::read_json_file(&file).map_err(io(&file))?;
    let v: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::BadBundle { path: file.clone(), reason: format!("not JSON: {e}") })?;
    if !v["schema"].as_str().is_some_and(|s| s.starts_with("mcompress.report/")) {
        return Err(Error::BadBundle {
            path: file,
            reason: "not an mcompress report (no mcompress.report schema)".into(),
        });
    }
    Ok((file, v))
}

fn higher_is_better(metric: &str) -> bool {
    matches!(metric, "accuracy" | "cosine" | "spearman")
}

/// Compares two reports.
pub fn compare(old: &Path, new: &Path, limits: &Limits) -> Result<Comparison> {
    let (old_path, a) = load(old)?;
    let (new_path, b) = load(new)?;
    Ok(compare_reports(old_path, &a, new_path, &b, limits))
}

/// [`compare`] on two parsed reports (any JSON: a missing or malformed field is a value the
/// limits cannot evaluate, never a panic).
#[allow(clippy::many_single_char_names)] // a/b: old/new report, o/n: old/new value
pub fn compare_reports(old_path: PathBuf, a: &Value, new_path: PathBuf, b: &Value, limits: &Limits) -> Comparison {
    let mut rows = Vec::new();
    // A limit the user set must be judged: a value it needs that is missing from either report
    // fails it ("cannot evaluate"), and so does a limit no row could apply (checked below).
    let mut push = |quantity: String, o: Option<f64>, n: Option<f64>, limit: Option<(Threshold, bool)>| {
        let delta = o.zip(n).map(|(o, n)| n - o);
        let delta_percent = o.zip(delta).and_then(|(o, d)| (o != 0.0).then(|| d / o.abs() * 100.0));
        let (check, lim) = match (limit, o, n) {
            (Some((t, worse_if_up)), Some(o), Some(n)) => {
                let worsening = if worse_if_up { n - o } else { o - n };
                (if t.allows(o, worsening) { "PASS" } else { "FAIL" }.to_string(), Some(describe(t)))
            }
            (Some((t, _)), o, n) => {
                let missing = match (o, n) {
                    (None, None) => "both reports",
                    (None, _) => "the old report",
                    _ => "the new report",
                };
                (format!("FAIL (cannot evaluate: no value in {missing})"), Some(describe(t)))
            }
            _ => ("-".to_string(), None),
        };
        rows.push(Row { quantity, old: o, new: n, delta, delta_percent, check, limit: lim });
    };
    let num = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_f64);
    push(
        "bundle bytes".into(),
        num(a, "/bundle/bytes"),
        num(b, "/bundle/bytes"),
        limits.max_size_growth.map(|t| (t, true)),
    );
    push("weights bytes".into(), num(a, "/bundle/weights_bytes"), num(b, "/bundle/weights_bytes"), None);
    push("bits per parameter".into(), num(a, "/bundle/bits_per_param"), num(b, "/bundle/bits_per_param"), None);
    let metric =
        b.pointer("/eval/metric").and_then(Value::as_str).or(a.pointer("/eval/metric").and_then(Value::as_str));
    // Measured latency compares only on the same backend and adapter (reports before these
    // fields existed count as the same).
    let device = |v: &Value| {
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
        s("/eval/backend").map(|b| format!("{b} ({})", s("/eval/adapter").unwrap_or_default()))
    };
    let (dev_a, dev_b) = (device(a), device(b));
    let same_device = match (&dev_a, &dev_b) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    };
    // Whether any row applies the latency limit (a row that cannot evaluate it fails it).
    let mut latency_judged = false;
    let metric_of = |v: &Value| v.pointer("/eval/metric").and_then(Value::as_str).map(str::to_string);
    if let (Some(ma), Some(mb)) = (metric_of(a), metric_of(b))
        && ma != mb
    {
        // Different metrics are not comparable: an accuracy limit cannot be judged.
        push(format!("eval metric changed: {ma} vs {mb}"), None, None, limits.max_accuracy_drop.map(|t| (t, false)));
    } else if let Some(m) = metric {
        push(
            format!("eval {m} (compressed)"),
            num(a, "/eval/compressed"),
            num(b, "/eval/compressed"),
            limits.max_accuracy_drop.map(|t| (t, !higher_is_better(m))),
        );
        if same_device {
            latency_judged |= limits.max_latency_growth.is_some();
            push(
                "eval latency p50 ms".into(),
                num(a, "/eval/latency_ms/compressed/p50"),
                num(b, "/eval/latency_ms/compressed/p50"),
                limits.max_latency_growth.map(|t| (t, true)),
            );
        } else {
            // Different hardware: shown, not gated (the estimates below gate instead).
            push(
                format!(
                    "eval latency p50 ms, not comparable: {} vs {}",
                    dev_a.as_deref().unwrap_or("?"),
                    dev_b.as_deref().unwrap_or("?")
                ),
                num(a, "/eval/latency_ms/compressed/p50"),
                num(b, "/eval/latency_ms/compressed/p50"),
                None,
            );
        }
    } else if limits.max_accuracy_drop.is_some() {
        push("eval (accuracy)".into(), None, None, limits.max_accuracy_drop.map(|t| (t, false)));
    }
    let measured_latency = same_device
        && num(a, "/eval/latency_ms/compressed/p50").is_some()
        && num(b, "/eval/latency_ms/compressed/p50").is_some();
    let targets = |v: &Value| v["targets"].as_array().cloned().unwrap_or_default();
    // Old targets by name: one pass over each report, whatever their number.
    let old_targets: std::collections::HashMap<String, Value> =
        targets(a).into_iter().map(|t| (t["name"].as_str().unwrap_or("").to_string(), t)).collect();
    for tb in targets(b) {
        let name = tb["name"].as_str().unwrap_or("").to_string();
        let Some(ta) = old_targets.get(&name).cloned() else { continue };
        let ms = |t: &Value| {
            t.pointer("/estimates/decode_tokens_per_s").and_then(Value::as_f64).filter(|v| *v > 0.0).map(|v| 1000.0 / v)
        };
        let lat_limit = if measured_latency { None } else { limits.max_latency_growth.map(|t| (t, true)) };
        latency_judged |= lat_limit.is_some();
        push(format!("{name}: est. ms per decoded token"), ms(&ta), ms(&tb), lat_limit);
        push(
            format!("{name}: est. $/1M tokens managed"),
            ta.pointer("/estimates/usd_per_million_tokens_managed").and_then(Value::as_f64),
            tb.pointer("/estimates/usd_per_million_tokens_managed").and_then(Value::as_f64),
            None,
        );
        let fits = |t: &Value| t.pointer("/fit/fits").and_then(Value::as_bool).map(|f| if f { 1.0 } else { 0.0 });
        // A target the old bundle fitted and the new one does not is always a regression.
        let (fa, fb) = (fits(&ta), fits(&tb));
        let fit_limit = (fa.is_some() && fb.is_some()).then_some((Threshold::Absolute(0.0), false));
        push(format!("{name}: fits (1 yes, 0 no)"), fa, fb, fit_limit);
    }
    // A latency limit that no row could apply (no measured latency, no common target) fails.
    if let Some(t) = limits.max_latency_growth
        && !latency_judged
    {
        rows.push(Row {
            quantity: "latency ms".into(),
            old: None,
            new: None,
            delta: None,
            delta_percent: None,
            check: "FAIL (cannot evaluate: no measured latency or target estimate in both reports)".into(),
            limit: Some(describe(t)),
        });
    }
    let passed = rows.iter().all(|r| !r.check.starts_with("FAIL"));
    Comparison { old: old_path, new: new_path, rows, passed }
}

fn describe(t: Threshold) -> String {
    match t {
        Threshold::Percent(p) => format!("≤ {p}%"),
        Threshold::Absolute(a) => format!("≤ {a}"),
    }
}

impl Comparison {
    /// Markdown for a CI job summary.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### mcompress compare: {}\n", if self.passed { "PASS" } else { "FAIL" });
        let _ = writeln!(
            s,
            "`{}` → `{}`\n",
            crate::report::md(&self.old.display().to_string()),
            crate::report::md(&self.new.display().to_string())
        );
        let _ = writeln!(s, "| quantity | old | new | Δ | Δ % | limit | check |\n|---|---:|---:|---:|---:|---|---|");
        let f = |v: Option<f64>| v.map_or_else(|| "–".to_string(), fmt_num);
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                crate::report::md(&r.quantity),
                f(r.old),
                f(r.new),
                f(r.delta),
                r.delta_percent.map_or_else(|| "–".to_string(), |p| format!("{p:+.2}%")),
                r.limit.as_deref().unwrap_or(""),
                if r.check.starts_with("FAIL") { format!("**{}**", r.check) } else { r.check.clone() }
            );
        }
        s
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{v:.0}") } else { format!("{v:.4}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// JSON shaped like reports: known keys with values of any type, nested a few levels.
    fn report_like() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |v| v.is_finite()).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z|`\n ]{0,12}".prop_map(Value::from),
        ];
        let keys = prop::sample::select(vec![
            "schema",
            "bundle",
            "bytes",
            "weights_bytes",
            "bits_per_param",
            "eval",
            "metric",
            "compressed",
            "backend",
            "adapter",
            "latency_ms",
            "p50",
            "targets",
            "name",
            "estimates",
            "decode_tokens_per_s",
            "usd_per_million_tokens_managed",
            "fit",
            "fits",
        ]);
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(keys.clone(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any two report-shaped documents under any limits: no panic, and a limit that was set
        /// never passes without a row that judged it.
        #[test]
        fn prop_compare_never_panics_and_never_passes_unjudged(
            a in report_like(), b in report_like(), size in any::<bool>(), acc in any::<bool>(), lat in any::<bool>()
        ) {
            let t = Some(Threshold::Percent(5.0));
            let limits = Limits {
                max_size_growth: t.filter(|_| size),
                max_accuracy_drop: t.filter(|_| acc),
                max_latency_growth: t.filter(|_| lat),
            };
            let c = compare_reports("a".into(), &a, "b".into(), &b, &limits);
            let _ = c.to_markdown();
            for (set, what) in [(size, "bundle bytes"), (acc, "eval"), (lat, "ms")] {
                if set {
                    prop_assert!(c.rows.iter().any(|r| r.limit.is_some() && r.quantity.contains(what)
                        && (r.check == "PASS" || r.check.starts_with("FAIL"))), "{what}: {:?}", c.rows);
                }
            }
        }
    }

    #[test]
    fn test_thresholds() {
        assert_eq!(Threshold::parse("5%"), Some(Threshold::Percent(5.0)));
        assert_eq!(Threshold::parse("0.01"), Some(Threshold::Absolute(0.01)));
        assert_eq!(Threshold::parse("1KiB"), Some(Threshold::Absolute(1024.0)));
        assert_eq!(Threshold::parse("-1%"), None);
        assert_eq!(Threshold::parse("lots"), None);
        assert!(Threshold::Percent(5.0).allows(100.0, 5.0));
        assert!(!Threshold::Percent(5.0).allows(100.0, 5.1));
        assert!(Threshold::Absolute(0.5).allows(10.0, -3.0));
    }
}
