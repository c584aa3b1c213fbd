//! Eval runtime: runs the reference model and the compressed bundle on the same eval set, on the
//! same backend, and reports metric, drop and latency.
//!
//! # Overview
//! - [`weights`]: weights from a model source, or from a bundle (quantized matrices kept in the
//!   documented packed layout).
//! - [`linear`]: linear layers on a [`linear::Device`]: the CPU (plain f32 Rust, rayon; packed
//!   weights decoded 16 rows at a time) or, with the `wgpu` feature, [`gpu`]: WGSL kernels that
//!   multiply straight from the packed layout (fused dequantize) on a GPU or Mesa's llvmpipe.
//! - [`sets`]: eval-set readers with errors naming file, line and column.
//! - [`mlp`], [`bert`], [`decoder`]: the architectures, from config.json.
//! - [`evaluate`]: metric for both models on the same device, the drop, and per-batch latency
//!   (p50/p95). Combinations that are not implemented answer [`Outcome::Unsupported`] so the
//!   caller can say so instead of pretending an eval ran.
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

pub mod bert;
pub mod calibrate;
pub mod decoder;
#[cfg(feature = "wgpu")]
pub mod gpu;
pub mod linalg;
pub mod linear;
pub mod mlp;
pub mod sets;
pub mod spill;
pub mod weights;

use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use linear::Device;
use mcompress_core::ModelSource;
use mcompress_core::arch::{DECODERS, ModelKind};
use mcompress_recipe::{Backend, EvalSection, Metric};
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
    /// The compute backend could not be opened or failed.
    #[error("backend: {0}")]
    Backend(String),
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
    /// Backend that ran both models: `cpu` or `wgpu`.
    pub backend: String,
    /// Backend the recipe (or `--backend`) asked for: `auto`, `cpu` or `wgpu`.
    pub requested_backend: Backend,
    /// Why `auto` chose what it chose.
    pub backend_note: Option<String>,
    /// Compute adapter: the GPU (name, type, API, driver) or the CPU.
    pub adapter: String,
    /// CPU worker threads of the run (the models' results do not depend on it).
    pub threads: usize,
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
    /// Metric-specific extras (e.g. `top1_agreement` for `kl`).
    pub extra: std::collections::BTreeMap<String, f64>,
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
    // Perplexity and KL are lower-is-better.
    matches!(metric, Metric::Accuracy | Metric::Cosine | Metric::Spearman)
}

/// How [`evaluate_with`] runs.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Overrides `[eval] backend` (the CLI's `--backend`).
    pub backend: Option<Backend>,
    /// Draw progress bars on stderr (only when it is a terminal).
    pub progress: bool,
}

/// Runs the eval of `section` on the reference `model` and the bundle in `bundle_dir`.
pub fn evaluate(section: &EvalSection, model: &ModelSource, bundle_dir: &Path) -> Result<Outcome> {
    evaluate_with(section, model, bundle_dir, &Options::default())
}

/// [`evaluate`] with a backend override and progress bars.
pub fn evaluate_with(section: &EvalSection, model: &ModelSource, bundle_dir: &Path, opts: &Options) -> Result<Outcome> {
    let config = model.config().cloned().unwrap_or_default();
    let model_type = mcompress_core::arch::model_type(&config);
    // The decoder families of the architecture module all run through one decoder.
    let kind = match ModelKind::of_config(&config) {
        Some(ModelKind::Decoder(_)) => "decoder",
        Some(ModelKind::Bert) => "bert",
        Some(ModelKind::Mlp) => "mlp",
        None => "",
    };
    let supported = matches!(
        (kind, section.metric),
        ("mlp", Metric::Accuracy)
            | ("bert", Metric::Cosine | Metric::Spearman)
            | ("decoder", Metric::Perplexity | Metric::Kl)
    );
    if !supported {
        return Ok(Outcome::Unsupported(if matches!(kind, "mlp" | "bert" | "decoder") {
            format!(
                "metric {:?} is not implemented for {model_type} models (mlp: accuracy; bert: cosine, spearman; \
                 {DECODERS}: perplexity, kl)",
                section.metric
            )
        } else {
            format!("eval for model_type {model_type:?} is not implemented yet (mlp, bert, {DECODERS} are)")
        }));
    }
    let requested = opts.backend.unwrap_or(section.backend);
    let (device, note) = resolve_device(requested)?;
    let ctx = Ctx { section, model, bundle_dir, device: &device, progress: opts.progress };
    let mut r = match (kind, section.metric) {
        ("mlp", _) => eval_mlp_accuracy(&ctx)?,
        ("bert", Metric::Cosine) => eval_bert_cosine(&ctx)?,
        ("bert", _) => eval_bert_spearman(&ctx)?,
        (_, Metric::Perplexity) => eval_llama_perplexity(&ctx)?,
        _ => eval_llama_kl(&ctx)?,
    };
    r.backend = device.name().into();
    r.adapter = device.adapter();
    r.requested_backend = requested;
    r.backend_note = note;
    Ok(Outcome::Ran(r))
}

/// The device for a requested backend: `cpu`; `wgpu` (any adapter, llvmpipe included; an error
/// if there is none); `auto` (a hardware GPU through wgpu if there is one, else the CPU, with a
/// note saying why).
pub fn resolve_device(backend: Backend) -> Result<(Device, Option<String>)> {
    match backend {
        Backend::Cpu => Ok((Device::Cpu, None)),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => Ok((Device::Wgpu(gpu::device()?), None)),
        #[cfg(not(feature = "wgpu"))]
        Backend::Wgpu => Err(Error::Backend(
            "backend \"wgpu\" was requested but this mcompress was built without the `wgpu` feature".into(),
        )),
        #[cfg(feature = "wgpu")]
        Backend::Auto => Ok(match gpu::device() {
            Ok(g) if g.is_hardware() => (Device::Wgpu(g), Some("auto: hardware GPU adapter found".into())),
            Ok(g) => (
                Device::Cpu,
                Some(format!(
                    "auto: the only wgpu adapter is a software one ({}); backend = \"wgpu\" would use it",
                    g.describe()
                )),
            ),
            Err(e) => (Device::Cpu, Some(format!("auto: no GPU ({e})"))),
        }),
        #[cfg(not(feature = "wgpu"))]
        Backend::Auto => Ok((Device::Cpu, Some("auto: built without the `wgpu` feature".into()))),
    }
}

/// What every eval needs.
struct Ctx<'a> {
    section: &'a EvalSection,
    model: &'a ModelSource,
    bundle_dir: &'a Path,
    device: &'a Device,
    progress: bool,
}

impl Ctx<'_> {
    fn config(&self) -> serde_json::Value {
        self.model.config().cloned().unwrap_or_default()
    }

    /// The bundle's config.json (passes such as structured pruning change it; the reference's
    /// when the bundle has none) and weights.
    fn bundle(&self) -> Result<(serde_json::Value, weights::Weights)> {
        let b = ModelSource::open(self.bundle_dir)?;
        let config = b.config().cloned().unwrap_or_else(|| self.config());
        Ok((config, weights::from_bundle(&b)?))
    }

    /// Runs `step` on each of the `len` items under a progress bar, timing every call: the calls'
    /// latency percentiles (ms) and the total seconds.
    fn timed<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        len: usize,
        what: &str,
        mut step: impl FnMut(T) -> Result<()>,
    ) -> Result<(Latency, f64)> {
        let bar = self.bar(len, what);
        let mut times = Vec::with_capacity(len);
        let started = Instant::now();
        for item in items {
            let t0 = Instant::now();
            step(item)?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok((percentiles(times), started.elapsed().as_secs_f64()))
    }

    /// A progress bar over `len` steps (hidden unless asked for and stderr is a terminal).
    fn bar(&self, len: usize, what: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len as u64);
        bar.set_style(
            ProgressStyle::with_template("  eval {msg:<22} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("{what} ({})", self.device.name()));
        bar
    }
}

fn result(
    section: &EvalSection,
    samples: usize,
    batch: usize,
    (reference, lat_ref, tput_ref): (f64, Latency, f64),
    (compressed, lat_new, tput_new): (f64, Latency, f64),
) -> EvalResult {
    EvalResult {
        metric: section.metric,
        set: section.set.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        samples,
        backend: String::new(),
        requested_backend: section.backend,
        backend_note: None,
        adapter: String::new(),
        threads: rayon::current_num_threads(),
        reference,
        compressed,
        latency_ms: [("reference".to_string(), lat_ref), ("compressed".to_string(), lat_new)].into(),
        throughput: [("reference".to_string(), tput_ref), ("compressed".to_string(), tput_new)].into(),
        batch_size: batch,
        extra: std::collections::BTreeMap::new(),
    }
}

fn eval_mlp_accuracy(ctx: &Ctx) -> Result<EvalResult> {
    let config = ctx.config();
    let reference = mlp::Mlp::load(&config, &weights::from_model(ctx.model), ctx.device)?;
    let (bundle_config, bundle_weights) = ctx.bundle()?;
    let compressed = mlp::Mlp::load(&bundle_config, &bundle_weights, ctx.device)?;
    let set = sets::LabelledSet::load(&ctx.section.set, reference.input_size(), reference.num_labels())?;
    let batch = ctx.section.batch_size.map_or(64, |b| b.max(1) as usize);
    let r = run_accuracy(ctx, &reference, &set, batch, "reference")?;
    let c = run_accuracy(ctx, &compressed, &set, batch, "compressed")?;
    Ok(result(ctx.section, set.len(), batch, r, c))
}

/// Embedding fidelity: mean cosine between the bundle's and the reference's sentence embeddings
/// (the reference scores 1 by definition), one sentence per line of the set.
fn eval_bert_cosine(ctx: &Ctx) -> Result<EvalResult> {
    let sentences = sets::load_lines(&ctx.section.set)?;
    let items: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let (ids, reference, compressed) = bert_inputs(ctx, &items)?;
    let batch = ctx.section.batch_size.map_or(32, |b| b.max(1) as usize);
    let (e_ref, l_ref, t_ref) = embed_all(ctx, &reference, &ids, batch, "reference")?;
    let (e_new, l_new, t_new) = embed_all(ctx, &compressed, &ids, batch, "compressed")?;
    let fidelity = e_ref.iter().zip(&e_new).map(|(a, b)| bert::cosine(a, b)).sum::<f64>() / ids.len() as f64;
    Ok(result(ctx.section, ids.len(), batch, (1.0, l_ref, t_ref), (fidelity, l_new, t_new)))
}

/// Token ids of `items` and the reference and compressed BERT encoders, for the BERT metrics.
fn bert_inputs(ctx: &Ctx, items: &[&str]) -> Result<(Vec<Vec<u32>>, bert::Bert, bert::Bert)> {
    let config = ctx.config();
    let tokenizer = model_tokenizer(ctx.model)?;
    let ids = items
        .iter()
        .map(|s| tokenizer.encode(*s, true).map(|e| e.get_ids().to_vec()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Set(format!("{}: tokenizing: {e}", ctx.section.set.display())))?;
    let reference = bert::Bert::load(&config, &weights::from_model(ctx.model), ctx.device)?;
    let (bundle_config, bundle_weights) = ctx.bundle()?;
    let compressed = bert::Bert::load(&bundle_config, &bundle_weights, ctx.device)?;
    Ok((ids, reference, compressed))
}

/// Spearman correlation between the model's cosine similarity of each pair and the human scores,
/// for the reference and for the bundle (WordSim-353, SimLex-999).
fn eval_bert_spearman(ctx: &Ctx) -> Result<EvalResult> {
    let pairs = sets::load_pairs(&ctx.section.set)?;
    let mut items: Vec<&str> = pairs.iter().flat_map(|(a, b, _)| [a.as_str(), b.as_str()]).collect();
    items.sort_unstable();
    items.dedup();
    let (ids, reference, compressed) = bert_inputs(ctx, &items)?;
    let human: Vec<f64> = pairs.iter().map(|p| p.2).collect();
    let score = |emb: &[Vec<f32>]| {
        let at = |w: &str| &emb[items.binary_search(&w).expect("every item was embedded")];
        let cos: Vec<f64> = pairs.iter().map(|(a, b, _)| bert::cosine(at(a), at(b))).collect();
        sets::spearman(&cos, &human)
    };
    let batch = ctx.section.batch_size.map_or(32, |b| b.max(1) as usize);
    let (e_ref, l_ref, t_ref) = embed_all(ctx, &reference, &ids, batch, "reference")?;
    let (e_new, l_new, t_new) = embed_all(ctx, &compressed, &ids, batch, "compressed")?;
    Ok(result(ctx.section, pairs.len(), batch, (score(&e_ref), l_ref, t_ref), (score(&e_new), l_new, t_new)))
}

/// Perplexity of the reference and the bundle on the first `max-tokens` tokens (default 2048) of
/// a text, in non-overlapping windows of `window` tokens (default 512).
fn eval_llama_perplexity(ctx: &Ctx) -> Result<EvalResult> {
    let config = ctx.config();
    let (ids, window) = text_tokens(ctx.section, ctx.model)?;
    let run = |m: &decoder::Decoder, what: &str| -> Result<(f64, Latency, f64, usize)> {
        let (mut nll, mut n) = (0f64, 0usize);
        let (latency, secs) = ctx.timed(ids.chunks(window), ids.len().div_ceil(window), what, |w| {
            let (a, b) = m.nll(w, window)?;
            nll += a;
            n += b;
            Ok(())
        })?;
        Ok(((nll / n.max(1) as f64).exp(), latency, ids.len() as f64 / secs.max(1e-9), n))
    };
    let reference = decoder::Decoder::load(&config, &weights::from_model(ctx.model), ctx.device)?;
    let (ppl_ref, l_ref, t_ref, n) = run(&reference, "reference")?;
    drop(reference);
    let (bundle_config, bundle_weights) = ctx.bundle()?;
    let compressed = decoder::Decoder::load(&bundle_config, &bundle_weights, ctx.device)?;
    let (ppl_new, l_new, t_new, _) = run(&compressed, "compressed")?;
    Ok(result(ctx.section, n, window, (ppl_ref, l_ref, t_ref), (ppl_new, l_new, t_new)))
}

/// Mean KL divergence KL(reference ‖ bundle) of the next-token distributions over the same
/// windows as perplexity (the reference scores 0), with top-1 agreement alongside in `extra`.
fn eval_llama_kl(ctx: &Ctx) -> Result<EvalResult> {
    let config = ctx.config();
    let (ids, window) = text_tokens(ctx.section, ctx.model)?;
    let reference = decoder::Decoder::load(&config, &weights::from_model(ctx.model), ctx.device)?;
    let (bundle_config, bundle_weights) = ctx.bundle()?;
    let compressed = decoder::Decoder::load(&bundle_config, &bundle_weights, ctx.device)?;
    let vocab = reference.vocab();
    let (mut kl, mut agree, mut n) = (0f64, 0usize, 0usize);
    let (mut t_ref, mut t_new) = (Vec::new(), Vec::new());
    let bar = ctx.bar(ids.len().div_ceil(window), "both models");
    let started = Instant::now();
    for w in ids.chunks(window) {
        let t0 = Instant::now();
        let a = reference.logits(w)?;
        t_ref.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        let b = compressed.logits(w)?;
        t_new.push(t0.elapsed().as_secs_f64() * 1e3);
        for (ra, rb) in a.chunks(vocab).zip(b.chunks(vocab)) {
            let (pa, pb) = (log_softmax(ra), log_softmax(rb));
            kl += pa.iter().zip(&pb).map(|(la, lb)| la.exp() * (la - lb)).sum::<f64>();
            agree += usize::from(argmax(ra) == argmax(rb));
            n += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let per_model = ids.len() as f64 / (started.elapsed().as_secs_f64() / 2.0).max(1e-9);
    let mut r = result(
        ctx.section,
        n,
        window,
        (0.0, percentiles(t_ref), per_model),
        (kl / n as f64, percentiles(t_new), per_model),
    );
    r.extra.insert("top1_agreement".into(), agree as f64 / n as f64);
    Ok(r)
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z = row.iter().map(|v| f64::from(v - m).exp()).sum::<f64>().ln();
    row.iter().map(|v| f64::from(v - m) - z).collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

/// The first `max-tokens` tokens (default 2048) of a text set and the window (default 512).
fn text_tokens(section: &EvalSection, model: &ModelSource) -> Result<(Vec<u32>, usize)> {
    let tokenizer = model_tokenizer(model)?;
    let text = sets::load_text(&section.set)?;
    let max_tokens = section.max_tokens.map_or(2048, |t| t as usize);
    let window = section.window.map_or(512, |w| w as usize);
    if window < 2 {
        return Err(Error::Set("[eval] window must be at least 2 tokens".into()));
    }
    let enc = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| Error::Set(format!("{}: tokenizing: {e}", section.set.display())))?;
    let ids: Vec<u32> = enc.get_ids().iter().copied().take(max_tokens).collect();
    if ids.len() < 2 {
        return Err(Error::Set(format!("{}: {} tokens; at least 2 are needed", section.set.display(), ids.len())));
    }
    Ok((ids, window))
}

/// The model's tokenizer: its tokenizer.json, or the one derived from a GGUF's vocabulary.
pub fn model_tokenizer(model: &ModelSource) -> Result<tokenizers::Tokenizer> {
    if let Some((_, bytes)) = model.generated_files().iter().find(|(n, _)| n == "tokenizer.json") {
        let mut t = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Set(format!("{}: derived tokenizer: {e}", model.path().display())))?;
        t.with_padding(None);
        return Ok(t);
    }
    load_tokenizer(&model.path().join("tokenizer.json"))
}

/// Loads a Hugging Face tokenizer.json with padding and truncation off (MiniLM's pads to 128).
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    if !path.is_file() {
        return Err(Error::Set(format!(
            "{}: tokenizer missing (the eval needs the model's tokenizer.json)",
            path.display()
        )));
    }
    let mut t = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Set(format!("{}: {e}", path.display())))?;
    t.with_padding(None);
    t.with_truncation(None).map_err(|e| Error::Set(format!("{}: {e}", path.display())))?;
    Ok(t)
}

/// Embeddings of every item, `batch` sequences per forward pass (one warm-up batch first), with
/// per-batch latency and items/s.
fn embed_all(
    ctx: &Ctx,
    model: &bert::Bert,
    ids: &[Vec<u32>],
    batch: usize,
    what: &str,
) -> Result<(Vec<Vec<f32>>, Latency, f64)> {
    let batches: Vec<Vec<&[u32]>> = ids.chunks(batch).map(|c| c.iter().map(Vec::as_slice).collect()).collect();
    if let Some(first) = batches.first() {
        model.embed_batch(first)?; // warm-up
    }
    let mut out = Vec::with_capacity(ids.len());
    let (latency, secs) = ctx.timed(&batches, batches.len(), what, |b| {
        out.extend(model.embed_batch(b)?);
        Ok(())
    })?;
    Ok((out, latency, ids.len() as f64 / secs.max(1e-9)))
}

fn percentiles(mut times: Vec<f64>) -> Latency {
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times.get(((times.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    Latency { p50: pick(0.5), p95: pick(0.95) }
}

/// Accuracy, per-batch latency after one warm-up batch, and samples/s.
fn run_accuracy(
    ctx: &Ctx,
    model: &mlp::Mlp,
    set: &sets::LabelledSet,
    batch: usize,
    what: &str,
) -> Result<(f64, Latency, f64)> {
    // Warm-up: caches, the thread pool, GPU pipelines; not counted.
    if let Some(first) = set.batches(batch).next() {
        model.predict(first.0)?;
    }
    let mut correct = 0usize;
    let (latency, secs) = ctx.timed(set.batches(batch), set.len().div_ceil(batch), what, |(x, labels)| {
        correct += model.predict(x)?.iter().zip(labels).filter(|(p, l)| p == l).count();
        Ok(())
    })?;
    Ok((correct as f64 / set.len().max(1) as f64, latency, set.len() as f64 / secs.max(1e-9)))
}
