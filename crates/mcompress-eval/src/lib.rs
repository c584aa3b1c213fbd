//! Eval runtime: runs the reference model and the compressed bundle on the same eval set, on the
//! same backend, and reports metric, drop and latency.
//!
//! # Overview
//! - [`weights`]: f32 weights from a model source, or from a bundle (quantized matrices
//!   dequantized through the documented packed layout).
//! - [`sets`]: eval-set readers with errors naming file, line and column.
//! - [`mlp`]: the MLP architecture (`model_type = "mlp"`, e.g. the digits fixture) on the
//!   `cpu-reference` backend: plain f32 Rust, row-parallel with rayon.
//! - [`evaluate`]: metric for both models, the drop, and per-batch latency (p50/p95).
//!
//! Architectures beyond the MLP (BERT, llama) and the burn CPU/wgpu backends are issue #4's
//! remaining work; [`evaluate`] answers [`Outcome::Unsupported`] for them so the caller can say
//! so instead of pretending an eval ran.
//!
//! # Example
//! ```no_run
//! # fn main() -> Result<(), mcompress_eval::Error> {
//! let recipe = mcompress_recipe::Recipe::load("recipes/quickstart.toml".as_ref()).map_err(|e| mcompress_eval::Error::Set(e.to_string()))?;
//! let model = mcompress_core::ModelSource::open(&recipe.model_path)?;
//! let outcome = mcompress_eval::evaluate(recipe.eval.as_ref().unwrap(), &model, "dist/quickstart/default".as_ref())?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod mlp;
pub mod sets;
pub mod weights;

use std::path::Path;
use std::time::Instant;

use mcompress_core::ModelSource;
use mcompress_recipe::{EvalSection, Metric};
use serde::Serialize;

/// Errors from loading weights, eval sets or running models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Tensor I/O.
    #[error(transparent)]
    Core(#[from] mcompress_core::Error),
    /// A bad eval set (message names file and line).
    #[error("{0}")]
    Set(String),
    /// Weights that do not fit the architecture.
    #[error("{0}")]
    Model(String),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Latency of one model over the eval set.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct Latency {
    /// Median milliseconds per batch.
    pub p50: f64,
    /// 95th percentile milliseconds per batch.
    pub p95: f64,
}

/// A completed eval.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct EvalResult {
    /// Metric name.
    pub metric: Metric,
    /// Eval set file name.
    pub set: String,
    /// Samples evaluated.
    pub samples: usize,
    /// Backend that ran both models.
    pub backend: String,
    /// Compute adapter (CPU threads for the CPU backends).
    pub adapter: String,
    /// Metric of the reference model.
    pub reference: f64,
    /// Metric of the compressed bundle.
    pub compressed: f64,
    /// Per-batch latency, reference and compressed (measured).
    pub latency_ms: std::collections::BTreeMap<String, Latency>,
    /// Samples per second, reference and compressed (measured).
    pub throughput: std::collections::BTreeMap<String, f64>,
    /// Samples per batch.
    pub batch_size: usize,
}

/// What [`evaluate`] could do.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The eval ran.
    Ran(EvalResult),
    /// This architecture/metric/backend combination is not implemented yet; the reason says which.
    Unsupported(String),
}

/// Whether a larger value of `metric` is better.
pub fn higher_is_better(metric: Metric) -> bool {
    matches!(metric, Metric::Accuracy | Metric::Cosine | Metric::Spearman)
}

/// Runs the eval of `section` on the reference `model` and the bundle in `bundle_dir`.
pub fn evaluate(section: &EvalSection, model: &ModelSource, bundle_dir: &Path) -> Result<Outcome> {
    let model_type = model.config().and_then(|c| c["model_type"].as_str()).unwrap_or("");
    if model_type != "mlp" {
        return Ok(Outcome::Unsupported(format!(
            "eval for model_type {model_type:?} is not implemented yet (the MLP architecture is; BERT and llama come with the burn runtime)"
        )));
    }
    if section.metric != Metric::Accuracy {
        return Ok(Outcome::Unsupported(format!(
            "metric {:?} is not implemented for MLPs (accuracy is)",
            section.metric
        )));
    }
    if section.backend == mcompress_recipe::Backend::Wgpu {
        return Ok(Outcome::Unsupported("backend wgpu is not built into this version (cpu is)".into()));
    }
    let config = model.config().cloned().unwrap_or_default();
    let reference = mlp::Mlp::load(&config, &weights::from_model(model))?;
    let bundle = ModelSource::open(bundle_dir)?;
    let compressed = mlp::Mlp::load(&config, &weights::from_bundle(&bundle)?)?;
    let set = sets::LabelledSet::load_csv(&section.set, reference.input_size(), reference.num_labels())?;
    let batch = section.batch_size.map_or(64, |b| b.max(1) as usize);
    let (acc_ref, lat_ref, tput_ref) = run_accuracy(&reference, &set, batch);
    let (acc_new, lat_new, tput_new) = run_accuracy(&compressed, &set, batch);
    Ok(Outcome::Ran(EvalResult {
        metric: section.metric,
        set: section.set.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        samples: set.len(),
        backend: "cpu-reference".into(),
        adapter: format!("CPU, {} rayon threads, f32", rayon::current_num_threads()),
        reference: acc_ref,
        compressed: acc_new,
        latency_ms: [("reference".to_string(), lat_ref), ("compressed".to_string(), lat_new)].into(),
        throughput: [("reference".to_string(), tput_ref), ("compressed".to_string(), tput_new)].into(),
        batch_size: batch,
    }))
}

/// Accuracy, per-batch latency after one warm-up batch, and samples/s.
fn run_accuracy(model: &mlp::Mlp, set: &sets::LabelledSet, batch: usize) -> (f64, Latency, f64) {
    let mut correct = 0usize;
    let mut times = Vec::new();
    // Warm-up: caches and the thread pool, not counted.
    if let Some(first) = set.batches(batch).next() {
        let _ = model.predict(first.0);
    }
    let started = Instant::now();
    for (x, labels) in set.batches(batch) {
        let t0 = Instant::now();
        let pred = model.predict(x);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        correct += pred.iter().zip(labels).filter(|(p, l)| p == l).count();
    }
    let total = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times.get(((times.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    (
        correct as f64 / set.len().max(1) as f64,
        Latency { p50: pick(0.5), p95: pick(0.95) },
        set.len() as f64 / total.max(1e-9),
    )
}
