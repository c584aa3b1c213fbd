//! `report.html`: one self-contained file (inline CSS and SVG, no scripts, no network) with
//! charts of size per target, error vs size, decode speed and cost per target.
#![allow(clippy::many_single_char_names, clippy::single_match_else)] // SVG geometry: x, y, w, h, s

use std::fmt::Write as _;

use mcompress_recipe::ByteSize;

use crate::report::Report;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const W: f64 = 720.0;
const LABEL: f64 = 190.0;
const ROW: f64 = 26.0;

/// Horizontal bar chart: one row per (label, value, note); `log` for values spanning decades.
fn bars(id: &str, title: &str, unit: &str, rows: &[(String, f64, String)], log: bool, color: &str) -> String {
    let mut s = String::new();
    let h = 40.0 + ROW * rows.len().max(1) as f64;
    let _ = write!(
        s,
        r#"<figure><figcaption>{}</figcaption><svg data-chart="{id}" role="img" aria-label="{}" viewBox="0 0 {W} {h}" width="{W}" height="{h}">"#,
        esc(title),
        esc(title)
    );
    let vals: Vec<f64> = rows.iter().map(|r| r.1).filter(|v| v.is_finite() && *v > 0.0).collect();
    if vals.is_empty() {
        let _ =
            write!(s, r##"<text x="10" y="30" fill="#666">no data for this chart in this run</text></svg></figure>"##);
        return s;
    }
    let max = vals.iter().copied().fold(0f64, f64::max);
    let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let span = W - LABEL - 120.0;
    let scale = |v: f64| -> f64 {
        if !(v.is_finite() && v > 0.0) {
            return 0.0;
        }
        if log {
            let lo = (min.log10().floor()).min(max.log10() - 1.0);
            ((v.log10() - lo) / (max.log10() - lo)).max(0.02) * span
        } else {
            v / max * span
        }
    };
    for (i, (label, v, note)) in rows.iter().enumerate() {
        let y = 20.0 + ROW * i as f64;
        let w = scale(*v);
        let _ = write!(
            s,
            r##"<text x="{x}" y="{ty}" text-anchor="end" font-size="12">{l}</text><rect x="{LABEL}" y="{y}" width="{w:.1}" height="{bh}" fill="{color}"><title>{l}: {v} {unit}</title></rect><text x="{tx:.1}" y="{ty}" font-size="11" fill="#333">{n}</text>"##,
            x = LABEL - 8.0,
            ty = y + 14.0,
            l = esc(label),
            bh = ROW - 8.0,
            tx = LABEL + w + 6.0,
            n = esc(note),
        );
    }
    let _ = write!(
        s,
        r##"<text x="{LABEL}" y="{}" font-size="11" fill="#666">{}{}</text></svg></figure>"##,
        h - 4.0,
        esc(unit),
        if log { " (log scale)" } else { "" }
    );
    s
}

/// Stacked memory bars (weights, KV cache, overhead) against each target's capacity.
fn memory_chart(r: &Report) -> String {
    let mut s = String::new();
    let h = 40.0 + ROW * r.targets.len().max(1) as f64;
    let _ = write!(
        s,
        r#"<figure><figcaption>Memory per target: weights, KV cache and runtime overhead as a share of capacity</figcaption><svg data-chart="size-per-target" role="img" aria-label="memory per target" viewBox="0 0 {W} {h}" width="{W}" height="{h}">"#
    );
    let span = W - LABEL - 120.0;
    for (i, t) in r.targets.iter().enumerate() {
        let y = 20.0 + ROW * i as f64;
        // Each row on its own scale (capacity, or use where it exceeds it), so fill is comparable.
        let max = t.fit.memory_bytes.unwrap_or(0).max(t.fit.memory_use_bytes).max(1) as f64;
        let px = |b: u64| b as f64 / max * span;
        let weights = r.bundle.weights_bytes;
        let parts = [
            (weights, "#3b6fb6", "weights"),
            (t.fit.kv_cache_bytes, "#e0a030", "KV cache"),
            (t.fit.overhead_bytes, "#9aa5b1", "overhead"),
        ];
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end" font-size="12">{}</text>"#,
            LABEL - 8.0,
            y + 14.0,
            esc(&t.name)
        );
        let mut x = LABEL;
        for (b, c, what) in parts {
            let w = px(b).max(if b > 0 { 1.0 } else { 0.0 });
            let _ = write!(
                s,
                r#"<rect x="{x:.1}" y="{y}" width="{w:.1}" height="{}" fill="{c}"><title>{what}: {}</title></rect>"#,
                ROW - 8.0,
                ByteSize(b)
            );
            x += w;
        }
        if let Some(m) = t.fit.memory_bytes {
            let cx = LABEL + px(m);
            let _ = write!(
                s,
                r##"<line x1="{cx:.1}" x2="{cx:.1}" y1="{}" y2="{}" stroke="#c0392b" stroke-width="2"><title>capacity {}</title></line>"##,
                y - 2.0,
                y + ROW - 6.0,
                ByteSize(m)
            );
        }
        let note = if t.fit.fits { "fits".to_string() } else { "does not fit".to_string() };
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" font-size="11" fill="{}">{note}</text>"#,
            W - 110.0,
            y + 14.0,
            if t.fit.fits { "#2e7d32" } else { "#c0392b" }
        );
    }
    let _ = write!(
        s,
        r##"<text x="{LABEL}" y="{}" font-size="11" fill="#666">blue weights · orange KV cache · grey overhead · red line capacity</text></svg></figure>"##,
        h - 4.0
    );
    s
}

/// Accuracy against size when the eval ran (original model vs bundle); otherwise the weights'
/// relative RMSE against size, labelled as such.
fn error_vs_size(r: &Report) -> String {
    let mut s = String::new();
    let (w, h) = (W, 240.0);
    let ran = r.eval.as_ref().filter(|e| e["status"] == "ran");
    let (caption, ylabel, pts): (String, String, [(&str, f64, f64); 2]) = match ran {
        Some(e) => {
            let m = e["metric"].as_str().unwrap_or("metric").to_string();
            (
                format!(
                    "{m} vs size: the original model and this bundle on {}",
                    e["set"].as_str().unwrap_or("the eval set")
                ),
                m,
                [
                    ("original", r.model.bytes as f64, e["reference"].as_f64().unwrap_or(0.0)),
                    ("bundle", r.bundle.weights_bytes as f64, e["compressed"].as_f64().unwrap_or(0.0)),
                ],
            )
        }
        None => {
            let err: f64 = r.passes.iter().map(|p| p.rel_rmse_mean).fold(0.0, f64::max);
            (
                "Error vs size: mean relative RMSE of rewritten weights (0 for the original; no eval ran)".into(),
                "rel. RMSE".into(),
                [("original", r.model.bytes as f64, 0.0), ("bundle", r.bundle.weights_bytes as f64, err)],
            )
        }
    };
    let _ = write!(
        s,
        r#"<figure><figcaption>{}</figcaption><svg data-chart="accuracy-vs-size" role="img" aria-label="{}" viewBox="0 0 {w} {h}" width="{w}" height="{h}">"#,
        esc(&caption),
        esc(&caption)
    );
    let xmax = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.3;
    let ymax = pts.iter().map(|p| p.2).fold(0.0, f64::max).max(1e-6) * 1.25;
    let (x0, y0, pw, ph) = (70.0, 20.0, w - 110.0, h - 60.0);
    let _ = write!(
        s,
        r##"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}" stroke="#333"/>"##,
        y0 + ph,
        x0 + pw,
        y0 + ph,
        y0 + ph
    );
    for (label, x, y) in pts {
        let cx = x0 + x / xmax * pw;
        let cy = y0 + ph - y / ymax * ph;
        let _ = write!(
            s,
            r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="6" fill="#3b6fb6"><title>{label}: {}, {} {y:.4}</title></circle><text x="{:.1}" y="{:.1}" font-size="12">{label} ({y:.4})</text>"##,
            ByteSize(x as u64),
            esc(&ylabel),
            cx + 9.0,
            cy - 6.0
        );
    }
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" font-size="11" fill="#666" text-anchor="middle">weight bytes (0 – {})</text><text x="14" y="{}" font-size="11" fill="#666" transform="rotate(-90 14 {})" text-anchor="middle">{} (0 – {ymax:.3})</text></svg></figure>"##,
        x0 + pw / 2.0,
        h - 12.0,
        ByteSize(xmax as u64),
        y0 + ph / 2.0,
        y0 + ph / 2.0,
        esc(&ylabel)
    );
    s
}

impl Report {
    /// A single self-contained HTML page.
    pub fn to_html(&self) -> String {
        let mut s = String::new();
        let status = if self.passed { "PASS" } else { "FAIL" };
        let _ = write!(
            s,
            r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mcompress report: {m} → {t} ({status})</title><style>
body{{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:980px;color:#222}}
h1{{font-size:1.4em}} .PASS{{color:#2e7d32}} .FAIL{{color:#c0392b}}
table{{border-collapse:collapse;margin:1em 0;font-size:13px}} td,th{{border:1px solid #ddd;padding:4px 8px;text-align:left}} td.n{{text-align:right}}
figure{{margin:1.5em 0}} figcaption{{font-weight:600;margin-bottom:.4em}} code{{font-size:12px}}
</style></head><body>"#,
            m = esc(&self.model.name),
            t = esc(&self.target.name)
        );
        let _ = write!(
            s,
            r#"<h1>{} → {} <span class="{status}">{status}</span></h1><p>Recipe <code>{}</code> (sha256 <code>{}</code>), mcompress {}.</p>"#,
            esc(&self.model.name),
            esc(&self.target.name),
            esc(&self.recipe.file),
            &self.recipe.sha256[..12],
            crate::TOOL_VERSION
        );
        let _ = write!(
            s,
            r#"<table><tr><th></th><th>model</th><th>bundle</th></tr><tr><td>weights</td><td class="n">{}</td><td class="n">{}</td></tr><tr><td>parameters</td><td class="n">{}</td><td class="n">{} ({} quantized)</td></tr><tr><td>bits / parameter</td><td class="n">{:.2}</td><td class="n">{:.2}</td></tr><tr><td>compression</td><td></td><td class="n">{:.2}×</td></tr></table>"#,
            ByteSize(self.model.bytes),
            ByteSize(self.bundle.weights_bytes),
            self.model.params,
            self.bundle.params,
            self.bundle.params_quantized,
            self.model.bytes as f64 * 8.0 / self.model.params.max(1) as f64,
            self.bundle.bits_per_param,
            self.bundle.compression_ratio
        );
        if !self.gates.is_empty() {
            s.push_str("<h2>Gates</h2><table><tr><th>gate</th><th>result</th><th>detail</th></tr>");
            for g in &self.gates {
                let r = if g.passed { "PASS" } else { "FAIL" };
                let _ = write!(
                    s,
                    r#"<tr><td>{}</td><td class="{r}">{r}</td><td>{}</td></tr>"#,
                    esc(&g.name),
                    esc(&g.detail)
                );
            }
            s.push_str("</table>");
        }
        if let Some(e) = self.eval.as_ref() {
            if e["status"] == "ran" {
                let f = |v: &serde_json::Value| v.as_f64().map_or_else(|| "–".to_string(), |x| format!("{x:.4}"));
                let _ = write!(
                    s,
                    r#"<h2>Eval</h2><p>{} on <code>{}</code> ({} samples), backend {} ({}); latency measured on this machine.</p><table><tr><th></th><th>reference</th><th>compressed</th></tr><tr><td>{}</td><td class="n">{}</td><td class="n">{}</td></tr><tr><td>latency p50 ms / batch</td><td class="n">{}</td><td class="n">{}</td></tr><tr><td>latency p95 ms / batch</td><td class="n">{}</td><td class="n">{}</td></tr><tr><td>samples/s</td><td class="n">{}</td><td class="n">{}</td></tr></table>"#,
                    esc(e["metric"].as_str().unwrap_or("")),
                    esc(e["set"].as_str().unwrap_or("")),
                    e["samples"],
                    esc(e["backend"].as_str().unwrap_or("")),
                    esc(e["adapter"].as_str().unwrap_or("")),
                    esc(e["metric"].as_str().unwrap_or("")),
                    f(&e["reference"]),
                    f(&e["compressed"]),
                    f(&e["latency_ms"]["reference"]["p50"]),
                    f(&e["latency_ms"]["compressed"]["p50"]),
                    f(&e["latency_ms"]["reference"]["p95"]),
                    f(&e["latency_ms"]["compressed"]["p95"]),
                    f(&e["throughput"]["reference"]),
                    f(&e["throughput"]["compressed"]),
                );
            } else {
                let _ = write!(
                    s,
                    "<h2>Eval</h2><p><strong>Not run</strong>: {}</p>",
                    esc(e["reason"].as_str().unwrap_or(""))
                );
            }
        }
        s.push_str("<h2>Where it runs</h2>");
        s.push_str(&memory_chart(self));
        let speed: Vec<(String, f64, String)> = self
            .targets
            .iter()
            .map(|t| {
                let e = t.estimates.as_ref();
                let v = e.map_or(0.0, |e| e.decode_tokens_per_s);
                (
                    t.name.clone(),
                    v,
                    e.map_or_else(|| "no figures".into(), |e| format!("{v:.1} tok/s ({})", e.decode_bound)),
                )
            })
            .collect();
        s.push_str(&bars(
            "latency",
            "Estimated decode speed per target (tokens/s, batch as configured)",
            "tokens/s",
            &speed,
            true,
            "#3b6fb6",
        ));
        let mut cost: Vec<(String, f64, String)> = Vec::new();
        for t in &self.targets {
            if let Some(e) = &t.estimates {
                for (kind, v) in [
                    ("managed", e.usd_per_million_tokens_managed),
                    ("self-hosted", e.usd_per_million_tokens_self_hosted),
                ] {
                    if let Some(v) = v {
                        cost.push((format!("{} {kind}", t.name), v, format!("${v:.3}")));
                    }
                }
            }
        }
        s.push_str(&bars("cost", "Estimated cost per 1M decoded tokens", "$ per 1M tokens", &cost, true, "#e0a030"));
        s.push_str(&error_vs_size(self));
        s.push_str("<h2>Targets</h2><table><tr><th>target</th><th>hardware</th><th>fits</th><th>decode tok/s</th><th>prefill tok/s</th><th>$/1M managed</th><th>$/1M self-hosted</th></tr>");
        for t in &self.targets {
            let e = t.estimates.as_ref();
            let money = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| format!("${v:.3}"));
            let _ = write!(
                s,
                r#"<tr><td>{}</td><td>{}</td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td></tr>"#,
                esc(&t.name),
                esc(t.hardware.hardware.as_deref().unwrap_or("custom")),
                if t.fit.fits { "yes".to_string() } else { format!("no: {}", esc(&t.fit.reasons.join("; "))) },
                e.map_or_else(|| "–".into(), |e| format!("{:.1}", e.decode_tokens_per_s)),
                e.map_or_else(|| "–".into(), |e| format!("{:.0}", e.prefill_tokens_per_s)),
                money(e.and_then(|e| e.usd_per_million_tokens_managed)),
                money(e.and_then(|e| e.usd_per_million_tokens_self_hosted)),
            );
        }
        let _ = write!(s, "</table><p><small>Estimates: {}</small></p>", esc(self.estimate_model));
        s.push_str("<h2>Passes</h2><table><tr><th>#</th><th>pass</th><th>tensors</th><th>rel. RMSE mean</th><th>rel. RMSE max</th><th>seconds</th></tr>");
        for p in &self.passes {
            let _ = write!(
                s,
                r#"<tr><td>{}</td><td>{}</td><td class="n">{}</td><td class="n">{:.3e}</td><td class="n">{:.3e}</td><td class="n">{}</td></tr>"#,
                p.index,
                p.kind,
                p.tensors.len(),
                p.rel_rmse_mean,
                p.rel_rmse_max,
                p.seconds.map_or_else(|| "–".into(), |t| format!("{t:.4}"))
            );
        }
        s.push_str("</table></body></html>\n");
        s
    }
}
