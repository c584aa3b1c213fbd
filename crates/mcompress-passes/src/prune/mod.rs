//! Pruning: zero weights so a model gets sparse, by weight magnitude (`prune-magnitude`, data
//! free), by magnitude times input norm (`prune-wanda`), or by SparseGPT's second-order
//! reconstruction (`prune-sparsegpt`); unstructured or N:M (`"2:4"`: 2 of every 4 consecutive
//! inputs of a row kept).
//!
//! The data-free cores live here (matrix [+ Hessian] → pruned matrix), so they are testable
//! without a model; Wanda's and SparseGPT's Hessians come from the eval runtime's block-by-block
//! calibration (`mcompress_eval::calibrate`), as GPTQ's do. Masks are chosen deterministically:
//! equal scores are broken by position, so the same inputs prune the same weights.
#![allow(clippy::many_single_char_names)] // the papers' names: w, h, m, n

use std::cmp::Ordering;

pub mod structured;

use mcompress_recipe::Recipe;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use mcompress_core::DType;

use crate::quant::{CalibrationConfig, gptq};
use crate::{
    Applied, Calibrated, Calibration, CalibrationMethod, Param, ParamMeta, ParamSelector, Pass, PassInfo, Plan, Status,
};

/// What is kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pattern {
    /// A fraction of each matrix (magnitude: of the whole matrix; Wanda: of each row; SparseGPT:
    /// of each block of columns) is zeroed.
    Unstructured(f64),
    /// In every group of `m` consecutive inputs of a row, `n` are kept.
    NofM {
        /// Kept per group.
        n: usize,
        /// Group size.
        m: usize,
    },
}

impl Pattern {
    /// Parses `pattern` (`"unstructured"` or `"N:M"`) with `sparsity`.
    pub fn parse(pattern: &str, sparsity: Option<f64>) -> Result<Self, String> {
        if let Some(s) = sparsity
            && !(s.is_finite() && (0.0..1.0).contains(&s))
        {
            return Err(format!("sparsity = {s}: must be in [0, 1)"));
        }
        if pattern == "unstructured" {
            return sparsity
                .map(Pattern::Unstructured)
                .ok_or_else(|| "sparsity is required for pattern = \"unstructured\"".into());
        }
        let bad = || format!("pattern {pattern:?}: expected \"unstructured\" or \"N:M\" (e.g. \"2:4\")");
        let (n, m) = pattern.split_once(':').ok_or_else(bad)?;
        let (n, m): (usize, usize) = (n.trim().parse().map_err(|_| bad())?, m.trim().parse().map_err(|_| bad())?);
        if n == 0 || n >= m || m > 256 {
            return Err(format!("pattern {pattern:?}: N:M keeps N of every M; needs 0 < N < M ≤ 256"));
        }
        let implied = 1.0 - n as f64 / m as f64;
        if let Some(s) = sparsity
            && (s - implied).abs() > 1e-9
        {
            return Err(format!("sparsity = {s} contradicts pattern {pattern:?} (which prunes {implied})"));
        }
        Ok(Pattern::NofM { n, m })
    }

    /// Fraction zeroed.
    pub fn sparsity(self) -> f64 {
        match self {
            Pattern::Unstructured(s) => s,
            Pattern::NofM { n, m } => 1.0 - n as f64 / m as f64,
        }
    }

    /// Whether rows of `cols` inputs can be pruned this way.
    pub fn check(self, cols: usize) -> Result<(), String> {
        match self {
            Pattern::NofM { m, .. } if !cols.is_multiple_of(m) => {
                Err(format!("pattern {}:{m} does not divide rows of {cols} inputs", self.kept()))
            }
            _ => Ok(()),
        }
    }

    fn kept(self) -> usize {
        match self {
            Pattern::NofM { n, .. } => n,
            Pattern::Unstructured(_) => 0,
        }
    }
}

/// Ascending score, then position: the order weights are pruned in.
fn by_score(score: &[f32]) -> impl Fn(&usize, &usize) -> Ordering + '_ {
    move |&a, &b| score[a].total_cmp(&score[b]).then(a.cmp(&b))
}

/// Zeroes `w` (`rows × cols`) where `score` is lowest: unstructured over the whole matrix
/// (`per_row = false`) or within each row (`per_row = true`), or N:M within each row. Returns the
/// mask of kept weights.
pub fn prune_by_score(
    w: &mut [f32],
    score: &[f32],
    cols: usize,
    p: Pattern,
    per_row: bool,
) -> Result<Vec<bool>, String> {
    if cols == 0 || !w.len().is_multiple_of(cols) || score.len() != w.len() {
        return Err(format!("{} weights, {} scores, rows of {cols}", w.len(), score.len()));
    }
    p.check(cols)?;
    let mut keep = vec![true; w.len()];
    let mut zero = |w: &mut [f32], idx: &[usize]| {
        for &i in idx {
            w[i] = 0.0;
            keep[i] = false;
        }
    };
    match p {
        Pattern::Unstructured(s) if !per_row => {
            let k = (w.len() as f64 * s).floor() as usize;
            let mut idx: Vec<usize> = (0..w.len()).collect();
            if k > 0 {
                idx.select_nth_unstable_by(k - 1, by_score(score));
                zero(w, &idx[..k]);
            }
        }
        Pattern::Unstructured(s) => {
            let k = (cols as f64 * s).floor() as usize;
            for r in 0..w.len() / cols {
                let mut idx: Vec<usize> = (r * cols..(r + 1) * cols).collect();
                if k > 0 {
                    idx.select_nth_unstable_by(k - 1, by_score(score));
                    zero(w, &idx[..k]);
                }
            }
        }
        Pattern::NofM { n, m } => {
            for g in 0..w.len() / m {
                let mut idx: Vec<usize> = (g * m..(g + 1) * m).collect();
                idx.sort_by(by_score(score));
                zero(w, &idx[..m - n]);
            }
        }
    }
    Ok(keep)
}

/// Magnitude pruning: the smallest `|w|` of the matrix (unstructured) or of each group (N:M).
pub fn magnitude(w: &mut [f32], cols: usize, p: Pattern) -> Result<Vec<bool>, String> {
    let score: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    prune_by_score(w, &score, cols, p, false)
}

/// Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023):
/// score `|W_ij| · ‖X_j‖₂`, compared within each output row (unstructured) or each N:M group.
/// `hdiag` is the diagonal of the calibration Hessian `Σ xᵀx`, so `‖X_j‖₂ = √hdiag_j`.
pub fn wanda(w: &mut [f32], cols: usize, hdiag: &[f64], p: Pattern) -> Result<Vec<bool>, String> {
    if hdiag.len() != cols {
        return Err(format!("{} input norms for rows of {cols}", hdiag.len()));
    }
    let norms: Vec<f32> = hdiag.iter().map(|h| h.max(0.0).sqrt() as f32).collect();
    let score: Vec<f32> = w.iter().enumerate().map(|(i, v)| v.abs() * norms[i % cols]).collect();
    prune_by_score(w, &score, cols, p, true)
}

/// SparseGPT settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseGptOptions {
    /// Added to the Hessian's diagonal, relative to its mean (0.01 in the paper).
    pub dampening: f64,
    /// Columns per block: the unstructured mask is chosen per block of columns, and updates
    /// beyond the block are applied lazily (128 in the paper).
    pub block_size: usize,
}

impl Default for SparseGptOptions {
    fn default() -> Self {
        SparseGptOptions { dampening: 0.01, block_size: 128 }
    }
}

/// SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
/// in One-Shot", 2023): walk the input columns; pick the mask by `w² / [H⁻¹]_jj²` (per block of
/// columns over all rows for unstructured, per group for N:M), zero the masked weights and
/// spread each column's error over the columns not yet visited through the upper Cholesky factor
/// of `H⁻¹` — GPTQ's update with pruning in place of rounding. Each block zeroes exactly
/// `⌊rows · block columns · sparsity⌋` weights. Returns the pruned matrix and its mask.
pub fn sparsegpt(
    w: &[f32],
    cols: usize,
    h: Vec<f64>,
    p: Pattern,
    opts: &SparseGptOptions,
) -> Result<(Vec<f32>, Vec<bool>), String> {
    if cols == 0 || !w.len().is_multiple_of(cols) || h.len() != cols * cols {
        return Err(format!("{} weights in rows of {cols} and a {}-element Hessian", w.len(), h.len()));
    }
    p.check(cols)?;
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(format!("row {} contains NaN or infinity", i / cols));
    }
    if h.iter().any(|v| !v.is_finite()) {
        return Err("the calibration Hessian contains NaN or infinity (activations overflowed)".into());
    }
    let rows = w.len() / cols;
    let mut h = h;
    let mut wt = gptq::columns(w, rows, cols, &mut h);
    let u = gptq::inverse_cholesky_upper(&h, cols, opts.dampening)?;
    drop(h);
    let bs = match p {
        // Groups must not straddle blocks.
        Pattern::NofM { m, .. } => opts.block_size.max(1).div_ceil(m) * m,
        Pattern::Unstructured(_) => opts.block_size.max(1),
    };
    let mut keep = vec![true; cols * rows]; // column-major like wt
    let mut err = vec![0f32; bs * rows];
    for i1 in (0..cols).step_by(bs) {
        let i2 = (i1 + bs).min(cols);
        if let Pattern::Unstructured(s) = p {
            // Mask for the whole block from the weights as they are on entering it.
            let n = (i2 - i1) * rows;
            let k = (n as f64 * s).floor() as usize;
            let score: Vec<f32> = (0..n)
                .map(|i| {
                    let d = u[(i1 + i / rows) * cols + i1 + i / rows] as f32;
                    let v = wt[i1 * rows + i];
                    v * v / (d * d)
                })
                .collect();
            if k > 0 {
                let mut idx: Vec<usize> = (0..n).collect();
                idx.select_nth_unstable_by(k - 1, by_score(&score));
                for &i in &idx[..k] {
                    keep[i1 * rows + i] = false;
                }
            }
        }
        for c in i1..i2 {
            if let Pattern::NofM { n, m } = p
                && (c - i1).is_multiple_of(m)
            {
                // Mask of the group starting here, from the current (updated) weights.
                for r in 0..rows {
                    let score: Vec<f32> = (c..c + m)
                        .map(|cc| {
                            let d = u[cc * cols + cc] as f32;
                            let v = wt[cc * rows + r];
                            v * v / (d * d)
                        })
                        .collect();
                    let mut idx: Vec<usize> = (0..m).collect();
                    idx.sort_by(by_score(&score));
                    for &j in &idx[..m - n] {
                        keep[(c + j) * rows + r] = false;
                    }
                }
            }
            let d = u[c * cols + c] as f32;
            let (col, rest) = wt[c * rows..].split_at_mut(rows);
            let e = &mut err[(c - i1) * rows..(c - i1 + 1) * rows];
            for r in 0..rows {
                let q = if keep[c * rows + r] { col[r] } else { 0.0 };
                e[r] = (col[r] - q) / d;
                col[r] = q;
            }
            gptq::update_block_rest(rest, rows, &u[c * cols + c + 1..c * cols + i2], e);
        }
        gptq::lazy_update(&mut wt, rows, cols, &u, i1, i2, &err[..(i2 - i1) * rows]);
    }
    let mut out = vec![0f32; rows * cols];
    let mut mask = vec![false; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            // Pruned weights stay exactly zero; kept ones carry the compensation.
            let k = keep[c * rows + r];
            out[r * cols + c] = if k { wt[c * rows + r] } else { 0.0 };
            mask[r * cols + c] = k;
        }
    }
    Ok((out, mask))
}

/// Which of the three passes, for the kept-count arithmetic the tests hold the masks to.
#[cfg(test)]
#[derive(Clone, Copy, Debug)]
enum Kind {
    Magnitude,
    SparseGpt(usize),
}

/// Weights a pass keeps in a `rows × cols` matrix: exact, so the sparse layout is fixed before
/// the weights stream.
#[cfg(test)]
fn kept_count(kind: Kind, p: Pattern, rows: usize, cols: usize) -> usize {
    let cut = |n: usize, s: f64| n - (n as f64 * s).floor() as usize;
    match (p, kind) {
        (Pattern::NofM { n, m }, _) => rows * (cols / m) * n,
        (Pattern::Unstructured(s), Kind::Magnitude) => cut(rows * cols, s),
        (Pattern::Unstructured(s), Kind::SparseGpt(bs)) => {
            (0..cols).step_by(bs.max(1)).map(|c| cut((bs.max(1).min(cols - c)) * rows, s)).sum()
        }
    }
}

/// `prune-magnitude` settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MagnitudeConfig {
    /// Fraction of each matrix to zero, in [0, 1) (implied by an N:M pattern).
    pub sparsity: Option<f64>,
    /// `"unstructured"` (default) or `"N:M"`, e.g. `"2:4"`: N of every M consecutive inputs kept.
    #[serde(default = "default_pattern")]
    pub pattern: String,
    /// `"dense"` (the only value): the zeros stay in a dense tensor. Sparse-bitmask output is
    /// no longer written: no runtime loads it (vLLM dropped it in 2026, compressed-tensors ≥ 0.15
    /// neither writes nor decompresses it, and transformers loads such a checkpoint with random
    /// weights). Quantize after pruning to make the bundle smaller.
    #[serde(default)]
    pub storage: Storage,
    /// Tensors to prune (globs or `re:` regexes). Default: float matrices named `*weight`,
    /// except embeddings and the output head (`*embed*`, `lm_head*`).
    pub targets: Option<Vec<String>>,
    /// Tensors to leave alone.
    #[serde(default)]
    pub ignore: Vec<String>,
}

/// `prune-wanda` / `prune-sparsegpt` settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CalibratedPruneConfig {
    /// Fraction of each matrix to zero, in [0, 1) (implied by an N:M pattern).
    pub sparsity: Option<f64>,
    /// `"unstructured"` (default) or `"N:M"`, e.g. `"2:4"`.
    #[serde(default = "default_pattern")]
    pub pattern: String,
    /// `"dense"` (the only value; see `prune-magnitude`).
    #[serde(default)]
    pub storage: Storage,
    /// SparseGPT only: Hessian dampening relative to its mean diagonal (default 0.01).
    pub dampening: Option<f64>,
    /// SparseGPT only: columns per block (default 128).
    pub block_size: Option<usize>,
    /// Calibration text and sampling.
    pub calibration: CalibrationConfig,
    /// Tensors to prune (default: the linear layers of the decoder blocks).
    pub targets: Option<Vec<String>>,
    /// Tensors to leave alone.
    #[serde(default)]
    pub ignore: Vec<String>,
}

/// How pruned matrices are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Storage {
    /// Dense, zeros included: what every runtime loads.
    #[default]
    Dense,
}

fn default_pattern() -> String {
    "unstructured".into()
}

/// Which tensors a pruning pass takes: float matrices named `*weight` but not embeddings or the
/// output head, unless `targets` says otherwise.
#[derive(Debug)]
struct Select {
    selector: ParamSelector,
    storage: Storage,
}

impl Select {
    fn new(targets: Option<&[String]>, ignore: &[String], storage: Storage) -> Result<Self, String> {
        Ok(Select { selector: ParamSelector::new(targets, ignore)?, storage })
    }

    /// The stored form of a pruned matrix: dense, zeros included ([`Storage`]).
    fn output(&self, dtype: DType, shape: &[usize]) -> ParamMeta {
        let Storage::Dense = self.storage;
        ParamMeta::Dense { dtype, shape: shape.to_vec() }
    }

    /// `param` (pruned values `w`) in the planned stored form (dense).
    fn store<'a>(&self, dtype: DType, shape: Vec<usize>, w: &[f32], _keep: &[bool]) -> Result<Param<'a>, String> {
        let Storage::Dense = self.storage;
        let bytes = dtype.encode_f32(w).ok_or_else(|| format!("cannot encode {dtype}"))?;
        Ok(Param::Dense { dtype, shape, data: bytes.into() })
    }

    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan {
        let (ParamMeta::Dense { dtype, shape } | ParamMeta::Sparse { dtype, shape, .. }) = meta else {
            return if self.selector.select(name, false) == Some(true) {
                Plan::Skip("already quantized: prune before quantizing".into())
            } else {
                Plan::Keep
            };
        };
        let eligible = dtype.is_float() && shape.len() == 2 && shape.iter().all(|&d| d > 0);
        let default = eligible
            && name.ends_with("weight")
            && !mcompress_core::arch::is_embedding_name(name)
            && !mcompress_core::arch::is_output_head_name(name)
            && !mcompress_core::arch::is_router_name(name);
        match self.selector.select(name, default) {
            None => Plan::Keep,
            // A pattern that does not divide the rows is an error at apply time (or in the
            // calibration), naming the tensor: never a silent skip.
            Some(_) if eligible => Plan::Change(self.output(*dtype, shape)),
            Some(_) => Plan::Skip(format!("{dtype} tensor of shape {shape:?}: only float matrices are pruned")),
        }
    }
}

/// `prune-magnitude`.
#[derive(Debug)]
pub struct Magnitude {
    settings: serde_json::Value,
    pattern: Pattern,
    select: Select,
}

/// Relative RMSE of `after` against `before` (0 for an all-zero `before`).
pub(crate) fn stat(before: &[f32], after: &[f32]) -> f64 {
    let (mut e, mut r) = (0f64, 0f64);
    for (a, b) in before.iter().zip(after) {
        e += f64::from(a - b).powi(2);
        r += f64::from(*a).powi(2);
    }
    if r == 0.0 { 0.0 } else { (e / r).sqrt() }
}

impl Pass for Magnitude {
    fn name(&self) -> &'static str {
        MAGNITUDE_INFO.name
    }
    fn leaves_zeros(&self) -> bool {
        true
    }

    fn settings(&self) -> serde_json::Value {
        self.settings.clone()
    }

    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan {
        self.select.plan(name, meta)
    }

    fn apply<'a>(&self, _name: &str, param: Param<'a>) -> Result<Applied<'a>, String> {
        let (dtype, shape, mut w) =
            param.dense_f32().ok_or("already quantized (prune before quantizing) or not a float tensor")?;
        let before = w.clone();
        let keep = magnitude(&mut w, shape[1], self.pattern)?;
        let rel = stat(&before, &w);
        Ok(Applied { param: self.select.store(dtype, shape, &w, &keep)?, rel_rmse: Some(rel) })
    }
}

/// `prune-wanda` and `prune-sparsegpt`: masks from the calibration, applied while streaming.
#[derive(Debug)]
pub struct CalibratedPrune {
    info: &'static PassInfo,
    settings: serde_json::Value,
    select: Select,
    calibration: Calibration,
    /// The masks and compensated values, by tensor name; `None` until provided.
    results: Option<crate::Results>,
}

impl Pass for CalibratedPrune {
    fn name(&self) -> &'static str {
        self.info.name
    }
    fn leaves_zeros(&self) -> bool {
        true
    }

    fn settings(&self) -> serde_json::Value {
        self.settings.clone()
    }

    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan {
        let plan = self.select.plan(name, meta);
        let Some(results) = self.results.as_ref() else { return plan };
        match plan {
            Plan::Change(_) if results.kind(name).is_none() => Plan::Skip(
                "not a linear layer of a decoder block (calibrated pruning reaches those; prune-magnitude prunes any matrix)"
                    .into(),
            ),
            other => other,
        }
    }

    fn apply<'a>(&self, name: &str, param: Param<'a>) -> Result<Applied<'a>, String> {
        let (dtype, shape, before) =
            param.dense_f32().ok_or("already quantized (prune before quantizing) or not a float tensor")?;
        let Calibrated::Pruned { values, keep } = crate::calibrated_result(self.results.as_ref(), name)? else {
            return Err("a quantization result given to a pruning pass".into());
        };
        let rel = stat(&before, &values);
        Ok(Applied { param: self.select.store(dtype, shape, &values, &keep)?, rel_rmse: Some(rel) })
    }

    fn needs(&self) -> crate::Need<'_> {
        crate::Need::Calibration(&self.calibration)
    }

    fn provide(&mut self, _model: &mcompress_core::ModelSource, what: crate::Provided) -> Result<(), crate::PassError> {
        match what {
            crate::Provided::Tensors(results) => {
                self.results = Some(results);
                Ok(())
            }
            other => Err(crate::PassError::Provided(format!("needs calibrated tensors, was given {}", other.kind()))),
        }
    }
}

fn build_magnitude(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let config: MagnitudeConfig = recipe.pass_config(index)?;
    let pattern = Pattern::parse(&config.pattern, config.sparsity).map_err(|e| recipe.pass_error(index, e))?;
    let select = Select::new(config.targets.as_deref(), &config.ignore, config.storage)
        .map_err(|e| recipe.pass_error(index, e))?;
    let settings = serde_json::to_value(&config).expect("config is JSON");
    Ok(Box::new(Magnitude { settings, pattern, select }))
}

fn build_calibrated(
    recipe: &Recipe,
    index: usize,
    info: &'static PassInfo,
    sparsegpt: bool,
) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let mut config: CalibratedPruneConfig = recipe.pass_config(index)?;
    let err = |e: String| recipe.pass_error(index, e);
    if !sparsegpt && (config.dampening.is_some() || config.block_size.is_some()) {
        return Err(err("dampening and block-size are prune-sparsegpt settings".into()));
    }
    let pattern = Pattern::parse(&config.pattern, config.sparsity).map_err(err)?;
    let block_size = config.block_size.unwrap_or(128).max(1);
    let select = Select::new(config.targets.as_deref(), &config.ignore, config.storage).map_err(err)?;
    config.calibration = crate::quant::calibration_config(recipe, index, config.calibration)?;
    let dampening = config.dampening.unwrap_or(0.01);
    if !(0.0..1.0e3).contains(&dampening) {
        return Err(err(format!("dampening = {dampening}: must be ≥ 0")));
    }
    let method = if sparsegpt {
        CalibrationMethod::SparseGpt { pattern, opts: SparseGptOptions { dampening, block_size } }
    } else {
        CalibrationMethod::Wanda(pattern)
    };
    let c = &config.calibration;
    let calibration = Calibration { set: c.set.clone(), samples: c.samples, seq_len: c.seq_len, seed: c.seed, method };
    let settings = serde_json::to_value(&config).expect("config is JSON");
    Ok(Box::new(CalibratedPrune { info, settings, select, calibration, results: None }))
}

fn build_wanda(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    build_calibrated(recipe, index, &WANDA_INFO, false)
}

fn build_sparsegpt(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    build_calibrated(recipe, index, &SPARSEGPT_INFO, true)
}

/// Registry entry of `prune-magnitude`.
pub const MAGNITUDE_INFO: PassInfo = PassInfo {
    name: "prune-magnitude",
    summary: "Zero the smallest weights: unstructured (per matrix) or N:M such as 2:4 (data free)",
    docs: include_str!("prune.md"),
    status: Status::Preview,
    build: build_magnitude,
    schema: || schemars::schema_for!(MagnitudeConfig),
};

/// Registry entry of `prune-wanda`.
pub const WANDA_INFO: PassInfo = PassInfo {
    name: "prune-wanda",
    summary: "Wanda: prune by |weight| x input norm from calibration, per row or N:M (decoder models)",
    docs: include_str!("prune.md"),
    status: Status::Preview,
    build: build_wanda,
    schema: || schemars::schema_for!(CalibratedPruneConfig),
};

/// Registry entry of `prune-sparsegpt`.
pub const SPARSEGPT_INFO: PassInfo = PassInfo {
    name: "prune-sparsegpt",
    summary: "SparseGPT: prune with second-order error compensation from calibration, unstructured or N:M (decoder models)",
    docs: include_str!("prune.md"),
    status: Status::Preview,
    build: build_sparsegpt,
    schema: || schemars::schema_for!(CalibratedPruneConfig),
};

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut x = seed | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    #[test]
    fn test_patterns_parse_and_reject() {
        assert_eq!(Pattern::parse("2:4", None).unwrap(), Pattern::NofM { n: 2, m: 4 });
        assert_eq!(Pattern::parse("2:4", Some(0.5)).unwrap().sparsity(), 0.5);
        assert!(Pattern::parse("4:4", None).unwrap_err().contains("0 < N < M"));
        assert!(Pattern::parse("2:4", Some(0.7)).unwrap_err().contains("contradicts"));
        assert!(Pattern::parse("unstructured", Some(1.0)).unwrap_err().contains("[0, 1)"));
        assert!(Pattern::parse("unstructured", Some(-0.1)).is_err());
        assert!(Pattern::parse("unstructured", None).unwrap_err().contains("required"));
        assert!(Pattern::parse("half", None).is_err());
        assert!(Pattern::NofM { n: 2, m: 4 }.check(6).unwrap_err().contains("does not divide"));
    }

    #[test]
    fn test_magnitude_counts_and_n_of_m() {
        let mut r = rng(3);
        let w0: Vec<f32> = (0..64 * 32).map(|_| r()).collect();
        let mut w = w0.clone();
        let keep = magnitude(&mut w, 32, Pattern::Unstructured(0.5)).unwrap();
        assert_eq!(keep.iter().filter(|k| !**k).count(), 1024);
        assert_eq!(kept_count(Kind::Magnitude, Pattern::Unstructured(0.5), 64, 32), 1024);
        // Every kept weight is at least as large as every pruned one.
        let kept_min = w.iter().filter(|v| **v != 0.0).map(|v| v.abs()).fold(f32::MAX, f32::min);
        let pruned_max = w0.iter().zip(&w).filter(|(_, b)| **b == 0.0).map(|(a, _)| a.abs()).fold(0.0, f32::max);
        assert!(kept_min >= pruned_max);
        let mut w = w0.clone();
        magnitude(&mut w, 32, Pattern::NofM { n: 2, m: 4 }).unwrap();
        for g in w.chunks(4) {
            assert_eq!(g.iter().filter(|v| **v != 0.0).count(), 2);
        }
    }

    #[test]
    fn test_wanda_weighs_by_input_norm() {
        // Same weights; input 0 carries 100x the energy, so Wanda keeps its column.
        let mut w = vec![0.1f32, 0.2, 0.1, 0.2];
        wanda(&mut w, 2, &[100.0, 1.0], Pattern::Unstructured(0.5)).unwrap();
        assert_eq!(w, vec![0.1, 0.0, 0.1, 0.0]);
    }

    #[test]
    fn test_sparsegpt_beats_magnitude_on_output_error() {
        let (rows, cols, n) = (32, 64, 512);
        let mut r = rng(9);
        let w: Vec<f32> = (0..rows * cols).map(|_| r()).collect();
        // Correlated inputs: x = z·A.
        let a: Vec<f32> = (0..cols * cols).map(|_| r()).collect();
        let mut x = vec![0f32; n * cols];
        for t in 0..n {
            let z: Vec<f32> = (0..cols).map(|_| r()).collect();
            for j in 0..cols {
                x[t * cols + j] = (0..cols).map(|k| z[k] * a[k * cols + j]).sum::<f32>() + 0.1 * r();
            }
        }
        let mut h = vec![0f64; cols * cols];
        for t in 0..n {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += f64::from(x[t * cols + i]) * f64::from(x[t * cols + j]);
                }
            }
        }
        let out_err = |p: &[f32]| {
            let mut e = 0f64;
            for t in 0..n {
                for o in 0..rows {
                    let d: f32 = (0..cols).map(|j| (w[o * cols + j] - p[o * cols + j]) * x[t * cols + j]).sum();
                    e += f64::from(d * d);
                }
            }
            e
        };
        for pat in [Pattern::Unstructured(0.5), Pattern::NofM { n: 2, m: 4 }] {
            let (s, keep) =
                sparsegpt(&w, cols, h.clone(), pat, &SparseGptOptions { dampening: 0.01, block_size: 16 }).unwrap();
            assert_eq!(s.iter().filter(|v| **v == 0.0).count(), rows * cols / 2, "{pat:?}");
            assert_eq!(keep.iter().filter(|k| **k).count(), kept_count(Kind::SparseGpt(16), pat, rows, cols));
            let mut m = w.clone();
            magnitude(&mut m, cols, pat).unwrap();
            let mut wd = w.clone();
            let hd: Vec<f64> = (0..cols).map(|i| h[i * cols + i]).collect();
            wanda(&mut wd, cols, &hd, pat).unwrap();
            let (es, em, ew) = (out_err(&s), out_err(&m), out_err(&wd));
            assert!(es < 0.7 * em && es < ew, "{pat:?}: sparsegpt {es}, magnitude {em}, wanda {ew}");
        }
        assert!(sparsegpt(&w, 6, vec![0.0; 36], Pattern::NofM { n: 2, m: 4 }, &SparseGptOptions::default()).is_err());
    }
}
