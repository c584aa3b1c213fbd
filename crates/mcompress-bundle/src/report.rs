//! `report.json` and `report.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use mcompress_core::ModelSource;
use mcompress_passes::ParamMeta;
use mcompress_passes::pipeline::{Output, PassReport};
use mcompress_recipe::{ByteSize, Recipe};

use crate::targets::{Estimates, Fit, ResolvedTarget};
use serde::Serialize;
use serde_json::Value;

use crate::TOOL_VERSION;
use crate::manifest::{FileEntry, FileNamed, recipe_named};

/// Schema id of reports written by this version.
pub const REPORT_SCHEMA: &str = "mcompress.report/v1";

/// A pass/fail check on the run.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Gate {
    /// `max-size`, later `max-drop`.
    pub name: String,
    /// Limit.
    pub limit: f64,
    /// Measured value.
    pub value: f64,
    /// Whether the value is within the limit.
    pub passed: bool,
    /// One line for humans.
    pub detail: String,
}

impl Gate {
    /// The conformance check ([`crate::conformance`]): passed when there is no problem.
    pub fn conformance(problems: &[String]) -> Self {
        let detail = if problems.is_empty() {
            "loads as its runtime reads it (compressed-tensors layout, config, files)".to_string()
        } else {
            problems.join("; ")
        };
        Gate {
            name: "conformance".into(),
            limit: 0.0,
            value: problems.len() as f64,
            passed: problems.is_empty(),
            detail,
        }
    }

    /// The `max-size = "auto"` gate: the weights fit what the target's memory leaves them.
    pub fn fit(fit: &Fit, weights_bytes: u64) -> Self {
        let limit = fit.weights_budget_bytes.unwrap_or(0);
        let detail = if fit.fits {
            format!("weights {} fit the {} left for weights", ByteSize(weights_bytes), ByteSize(limit))
        } else {
            fit.reasons.join("; ")
        };
        Gate { name: "fit".into(), limit: limit as f64, value: weights_bytes as f64, passed: fit.fits, detail }
    }

    /// The eval's `max-drop` gate: the metric's drop from the reference within the limit.
    pub fn max_drop(
        metric: mcompress_recipe::Metric,
        reference: f64,
        compressed: f64,
        drop: f64,
        drop_percent: f64,
        max: mcompress_recipe::MaxDrop,
    ) -> Self {
        let (passed, limit, value, unit) = match max {
            mcompress_recipe::MaxDrop::Percent(p) => (drop_percent <= p + 1e-12, p, drop_percent, "%"),
            mcompress_recipe::MaxDrop::Absolute(a) => (drop <= a + 1e-12, a, drop, ""),
        };
        let name = serde_json::to_value(metric).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let detail = format!(
            "{name}: reference {reference:.4}, compressed {compressed:.4}, drop {value:.4}{unit} {} max-drop {limit}{unit}",
            if passed { "≤" } else { "exceeds" }
        );
        Gate { name: "max-drop".into(), limit, value, passed, detail }
    }

    /// The `max-size` gate: the bundle's bytes within the limit.
    pub fn max_size(limit: u64, value: u64) -> Self {
        let passed = value <= limit;
        let detail = if passed {
            format!("bundle {} ≤ max-size {}", ByteSize(value), ByteSize(limit))
        } else {
            format!("bundle {} exceeds max-size {} by {}", ByteSize(value), ByteSize(limit), ByteSize(value - limit))
        };
        Gate { name: "max-size".into(), limit: limit as f64, value: value as f64, passed, detail }
    }
}

/// One target in a report: its resolved hardware, whether the bundle fits, and estimates.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct TargetReport {
    /// Target name.
    pub name: String,
    /// Hardware figures after profile and overrides.
    pub hardware: ResolvedTarget,
    /// Fit.
    pub fit: Fit,
    /// Speed and cost estimates (`null` without bandwidth/compute figures).
    pub estimates: Option<Estimates>,
}

/// The model before compression.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct ModelInfo {
    /// Model directory or file name.
    pub name: String,
    /// Parameters (elements over all tensors).
    pub params: u64,
    /// Weight file bytes.
    pub bytes: u64,
    /// Tensors.
    pub tensors: usize,
    /// Tensor count per dtype.
    pub dtypes: BTreeMap<String, usize>,
    /// A mixture of experts: the parameters one token runs through (every tensor outside the
    /// experts plus `num_experts_per_tok` experts per block). Absent for dense models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_params: Option<u64>,
}

/// The bundle.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct BundleInfo {
    /// Bytes of the deployable files (weights, config, tokenizer; not manifest or reports).
    pub bytes: u64,
    /// Bytes of the weight files (model.safetensors and/or model.gguf).
    pub weights_bytes: u64,
    /// model.bytes / weights_bytes.
    pub compression_ratio: f64,
    /// Parameters in the bundle (fewer than the model's after structured pruning).
    pub params: u64,
    /// Weight bits per bundle parameter.
    pub bits_per_param: f64,
    /// Parameters stored quantized.
    pub params_quantized: u64,
    /// Deployable files and their sizes.
    pub files: BTreeMap<String, u64>,
    /// The GGUF file, when the target ships one: policy, bits per weight, count per ggml type,
    /// the type of every tensor and, under `policy = "fit"`, each try.
    pub gguf: Option<Value>,
}

/// What a target's bundle holds, for its report.
pub struct Shipped<'a> {
    /// Deployable bytes.
    pub bytes: u64,
    /// Bytes of the weight files (model.safetensors and/or model.gguf).
    pub weights_bytes: u64,
    /// Deployable files.
    pub files: &'a BTreeMap<String, FileEntry>,
    /// The report's `gguf` object.
    pub gguf: Option<Value>,
}

/// `report.json`.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct Report {
    /// [`REPORT_SCHEMA`].
    pub schema: &'static str,
    /// Tool name and version.
    pub tool: BTreeMap<&'static str, &'static str>,
    /// Recipe file and hash.
    pub recipe: FileNamed,
    /// This bundle's target: hardware, fit and estimates.
    pub target: TargetReport,
    /// Every target of the run, for comparing where to host.
    pub targets: Vec<TargetReport>,
    /// How estimates are computed.
    pub estimate_model: &'static str,
    /// Input model.
    pub model: ModelInfo,
    /// Output bundle.
    pub bundle: BundleInfo,
    /// Passes with timings and per-tensor errors.
    pub passes: Vec<PassReport>,
    /// Eval results (filled by the eval runtime; `null` without `[eval]`).
    pub eval: Option<Value>,
    /// Gates.
    pub gates: Vec<Gate>,
    /// Every gate passed.
    pub passed: bool,
}

impl Report {
    /// The report of one target's bundle.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        recipe: &Recipe,
        model: &ModelSource,
        output: &Output,
        target: &TargetReport,
        targets: &[TargetReport],
        shipped: Shipped<'_>,
        gates: Vec<Gate>,
        passed: bool,
        eval: Option<Value>,
    ) -> Self {
        let mut dtypes = BTreeMap::new();
        for r in model.tensors() {
            *dtypes.entry(model.info(r).dtype.to_string()).or_insert(0) += 1;
        }
        let params = model.params();
        let params_quantized = match &shipped.gguf {
            // GGUF-only: every parameter in a block-quantized type.
            Some(g) if !shipped.files.contains_key("model.safetensors") => g["types"].as_object().map_or(0, |t| {
                t.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "F32" | "F16" | "BF16"))
                    .filter_map(|(_, v)| v["params"].as_u64())
                    .sum()
            }),
            _ => output
                .params
                .values()
                .filter_map(|m| match m {
                    ParamMeta::Quantized { shape, .. } => Some(shape.iter().product::<usize>() as u64),
                    ParamMeta::Dense { .. } | ParamMeta::Sparse { .. } => None,
                })
                .sum(),
        };
        let bundle_params = output.param_count();
        let weights_bytes = shipped.weights_bytes;
        let bundle_bytes = shipped.bytes;
        let files = shipped.files;
        let name = model.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Report {
            schema: REPORT_SCHEMA,
            tool: BTreeMap::from([("name", "mcompress"), ("version", TOOL_VERSION)]),
            recipe: recipe_named(recipe),
            target: target.clone(),
            targets: targets.to_vec(),
            estimate_model: crate::targets::ESTIMATE_MODEL,
            model: ModelInfo {
                name,
                params,
                bytes: model.weight_bytes(),
                tensors: model.tensors().len(),
                dtypes,
                active_params: model
                    .config()
                    .and_then(|c| mcompress_core::arch::Geometry::from_config(c).ok())
                    .filter(|g| g.experts > 0)
                    .map(|g| (params as f64 * g.active_share()).round() as u64),
            },
            bundle: BundleInfo {
                bytes: bundle_bytes,
                weights_bytes,
                compression_ratio: round6(model.weight_bytes() as f64 / weights_bytes.max(1) as f64),
                params: bundle_params,
                bits_per_param: round6(weights_bytes as f64 * 8.0 / bundle_params.max(1) as f64),
                params_quantized,
                files: files.iter().map(|(k, v)| (k.clone(), v.bytes)).collect(),
                gguf: shipped.gguf,
            },
            passes: output.passes.clone(),
            eval,
            gates,
            passed,
        }
    }

    /// Human-readable Markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let status = if self.passed { "PASS" } else { "FAIL" };
        let _ = writeln!(s, "# mcompress report: {} → {} ({status})\n", md(&self.model.name), md(&self.target.name));
        let _ = writeln!(
            s,
            "Recipe `{}` (sha256 `{}`), mcompress {}.\n",
            md(&self.recipe.file),
            &self.recipe.sha256[..12],
            TOOL_VERSION
        );
        let _ = writeln!(s, "| | model | bundle |\n|---|---:|---:|");
        let _ = writeln!(s, "| weights | {} | {} |", ByteSize(self.model.bytes), ByteSize(self.bundle.weights_bytes));
        let _ = writeln!(s, "| deployable files | | {} |", ByteSize(self.bundle.bytes));
        let _ = writeln!(
            s,
            "| parameters | {} | {} ({} quantized) |",
            self.model.params, self.bundle.params, self.bundle.params_quantized
        );
        let _ = writeln!(
            s,
            "| bits / parameter | {:.2} | {:.2} |",
            self.model.bytes as f64 * 8.0 / self.model.params.max(1) as f64,
            self.bundle.bits_per_param
        );
        let _ = writeln!(s, "| compression | | {:.2}× |\n", self.bundle.compression_ratio);
        if let Some(g) = &self.bundle.gguf {
            let _ = writeln!(
                s,
                "## GGUF\n\n`model.gguf`, {} bytes, policy `{}`, {:.3} bits per weight.\n\n| ggml type | tensors | parameters | bytes |\n|---|---:|---:|---:|",
                g["bytes"],
                g["policy"].as_str().unwrap_or(""),
                g["bits_per_weight"].as_f64().unwrap_or(0.0)
            );
            if let Some(types) = g["types"].as_object() {
                for (t, v) in types {
                    let _ = writeln!(s, "| {t} | {} | {} | {} |", v["tensors"], v["params"], v["bytes"]);
                }
            }
            s.push('\n');
            if let Some(tries) = g["fit"]["tries"].as_array() {
                let _ = writeln!(
                    s,
                    "Fit to {} bytes: {}.\n\n| try | bytes | metric | gate | types |\n|---:|---:|---:|---|---|",
                    g["fit"]["max_size"],
                    g["fit"]["solver"].as_str().unwrap_or("")
                );
                for t in tries {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} |",
                        t["try"],
                        t["bytes"],
                        t["compressed"].as_f64().map_or_else(|| "-".into(), |v| format!("{v:.4}")),
                        if t["passed"] == true { "PASS" } else { "FAIL" },
                        t["types"]
                    );
                }
                s.push('\n');
            }
        }
        if !self.gates.is_empty() {
            let _ = writeln!(s, "## Gates\n\n| gate | result | detail |\n|---|---|---|");
            for g in &self.gates {
                let _ = writeln!(s, "| {} | {} | {} |", g.name, if g.passed { "PASS" } else { "FAIL" }, md(&g.detail));
            }
            s.push('\n');
        }
        if let Some(e) = &self.eval {
            if e["status"] == "ran" {
                let _ = writeln!(
                    s,
                    "## Eval\n\n{} on `{}` ({} samples), backend {} ({})\n",
                    e["metric"].as_str().unwrap_or(""),
                    md(e["set"].as_str().unwrap_or("")),
                    e["samples"],
                    e["backend"].as_str().unwrap_or(""),
                    e["adapter"].as_str().unwrap_or("")
                );
                if let Some(note) = e["backend_note"].as_str() {
                    let _ = writeln!(s, "_Backend choice: {note}_\n");
                }
                let _ = writeln!(s, "| | reference | compressed |\n|---|---:|---:|");
                let f = |v: &Value| v.as_f64().map_or_else(|| "–".to_string(), |x| format!("{x:.4}"));
                let _ = writeln!(
                    s,
                    "| {} | {} | {} |",
                    e["metric"].as_str().unwrap_or(""),
                    f(&e["reference"]),
                    f(&e["compressed"])
                );
                for q in ["p50", "p95"] {
                    let _ = writeln!(
                        s,
                        "| latency {q} ms / batch of {} | {} | {} |",
                        e["batch_size"],
                        f(&e["latency_ms"]["reference"][q]),
                        f(&e["latency_ms"]["compressed"][q])
                    );
                }
                let _ = writeln!(
                    s,
                    "| samples/s | {} | {} |\n",
                    f(&e["throughput"]["reference"]),
                    f(&e["throughput"]["compressed"])
                );
            } else {
                let _ = writeln!(s, "## Eval\n\n**Not run**: {}\n", e["reason"].as_str().unwrap_or(""));
            }
        }
        let _ = writeln!(s, "## Targets\n");
        let _ = writeln!(
            s,
            "| target | hardware | fits | memory use | decode tok/s (bound) | prefill tok/s | $/1M tok managed | $/1M tok self-hosted |\n|---|---|---|---:|---:|---:|---:|---:|"
        );
        for t in &self.targets {
            let money = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| format!("${v:.3}"));
            let (dec, pre, man, own) = t.estimates.as_ref().map_or_else(
                || ("–".to_string(), "–".to_string(), "–".to_string(), "–".to_string()),
                |e| {
                    (
                        format!("{:.1} ({})", e.decode_tokens_per_s, e.decode_bound),
                        format!("{:.0}", e.prefill_tokens_per_s),
                        money(e.usd_per_million_tokens_managed),
                        money(e.usd_per_million_tokens_self_hosted),
                    )
                },
            );
            let mem = t.fit.memory_bytes.map_or_else(
                || ByteSize(t.fit.memory_use_bytes).to_string(),
                |m| format!("{} of {}", ByteSize(t.fit.memory_use_bytes), ByteSize(m)),
            );
            let fits = if t.fit.fits { "yes".to_string() } else { format!("**no**: {}", t.fit.reasons.join("; ")) };
            let _ = writeln!(
                s,
                "| {}{} | {} | {fits} | {mem} | {dec} | {pre} | {man} | {own} |",
                t.name,
                if t.name == self.target.name { " (this bundle)" } else { "" },
                t.hardware.hardware.as_deref().unwrap_or("custom"),
            );
        }
        let _ = writeln!(s, "\nEstimates: {}\n", self.estimate_model);
        let _ = writeln!(
            s,
            "## Passes\n\n| # | pass | tensors | rel. RMSE mean | rel. RMSE max | seconds |\n|---|---|---:|---:|---:|---:|"
        );
        for p in &self.passes {
            let secs = p.seconds.map_or_else(|| "–".to_string(), |t| format!("{t:.4}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.3e} | {:.3e} | {secs} |",
                p.index,
                p.kind,
                p.tensors.len(),
                p.rel_rmse_mean,
                p.rel_rmse_max
            );
        }
        for p in &self.passes {
            if p.tensors.is_empty() && p.skipped.is_empty() {
                continue;
            }
            let _ = writeln!(s, "\n### pass[{}] {}\n\n| tensor | rel. RMSE |\n|---|---:|", p.index, p.kind);
            for t in &p.tensors {
                let _ = writeln!(s, "| `{}` | {:.3e} |", md(&t.name), t.rel_rmse);
            }
            for t in &p.skipped {
                let _ = writeln!(s, "| `{}` | skipped: {} |", md(&t.name), md(&t.reason));
            }
        }
        s
    }
}

/// Untrusted text (tensor names from a model file, paths, messages that quote them) as one
/// Markdown table cell or code span: control characters (a newline would end the table row and
/// start raw Markdown) escaped as text, `|` escaped, backticks replaced so a code span cannot end.
pub fn md(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '`' => out.push('\''),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

/// `x` rounded to 6 decimals (reports keep figures readable and stable).
pub fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}
