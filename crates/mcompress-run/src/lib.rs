//! The orchestrator: [`run`] takes a recipe through its passes and writes one bundle per target.
//!
//! # Overview
//! [`Plan::new`] reads everything a run can fail on before any work — the passes, targets and
//! their formats, the sets, the model and its architecture, the output location, the planned
//! layout — so `mcompress recipe check` and `mcompress run` refuse the same recipes. [`run`] then
//! scores and calibrates (the passes' algorithms on the eval runtime's trace), trains (distill),
//! streams the weights once into the safetensors payload and every GGUF, evaluates each, and
//! writes `<out>/<target>/` with `model.safetensors`, `config.json`, the tokenizer files,
//! `report.json`, `report.md`, `report.html` and `manifest.json` (written last). Each bundle is
//! staged in a hidden temp dir beside its final place and renamed into place when complete, so
//! a killed run never leaves a bundle that looks complete.
//!
//! The bundle crate below writes and reads bundles without the runtimes (no eval, no burn); this
//! crate is where calibration, training and evaluation meet the writers.
//!
//! # Example
//! ```no_run
//! use mcompress_run::{run, RunOptions};
//! let recipe = mcompress_recipe::Recipe::load("recipes/quickstart.toml".as_ref())?;
//! let summary = run(&recipe, &RunOptions::default(), &mut |_| {})?;
//! assert!(summary.targets.iter().all(|t| t.passed));
//! # Ok::<(), mcompress_bundle::Error>(())
//! ```
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use mcompress_bundle::manifest::{self, FileEntry, Manifest};
use mcompress_bundle::report::{self, Gate, Report, TargetReport};
use mcompress_bundle::{
    Error, EvalOutcome, Result, check_output, check_output_safe, clean_stale, conformance, copy_payload, replace_dir,
    ship, sign, targets, write_payload,
};
use mcompress_core::{ModelSource, fsutil};
use mcompress_passes::pipeline::{self, Progress};
use mcompress_passes::{Need, Pass, PassError, Provided};
use mcompress_recipe::{MaxSize, Recipe};
use serde_json::Value;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Options of [`run`] that do not come from the recipe.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Overrides the recipe's `[output] dir`.
    pub out: Option<PathBuf>,
    /// Leave wall-clock measurements out of the bundle (`seconds: null`), so two runs give
    /// byte-identical bundles including reports and manifest.
    pub reproducible: bool,
    /// Sign each bundle's manifest with this Ed25519 key (`manifest.sig`).
    pub sign: Option<ed25519_dalek::SigningKey>,
    /// Overrides `[eval] backend`.
    pub backend: Option<mcompress_recipe::Backend>,
    /// Progress bars for the eval on stderr (drawn only on a terminal).
    pub progress: bool,
    /// `distill` passes continue from their last checkpoint.
    pub resume: bool,
    /// Overrides every `distill` pass's `device`.
    pub distill_device: Option<mcompress_passes::distill::TrainDevice>,
    /// `distill` passes stop after this many steps of this process, leaving a checkpoint (the
    /// run then fails; `--resume` continues). For tests of interrupted runs.
    pub distill_stop_after: Option<usize>,
    /// Bytes of activations a calibrated pass keeps in memory; past it they go to an unlinked
    /// scratch file in the output directory. `None`: [`DEFAULT_CALIBRATION_MEMORY`].
    pub calibration_memory: Option<u64>,
    /// Calibrated passes stop after this many blocks of this process, leaving a checkpoint
    /// (the run then fails; `--resume` continues). For tests of interrupted runs.
    pub calibrate_stop_after: Option<usize>,
}

/// Least time between two checkpoints of a calibrated pass's activations (its results are
/// written as they are produced; a checkpoint also follows the last block).
pub const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// What a calibrated pass keeps of its activations in memory when the run does not say: 1 GiB.
pub const DEFAULT_CALIBRATION_MEMORY: u64 = 1 << 30;

/// Outcome for one target.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TargetOutcome {
    /// Target name.
    pub name: String,
    /// Bundle directory.
    pub dir: PathBuf,
    /// Bytes of the deployable files (everything but manifest and reports).
    pub bundle_bytes: u64,
    /// All gates passed.
    pub passed: bool,
    /// Gates evaluated.
    pub gates: Vec<Gate>,
}

/// Outcome of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunSummary {
    /// Per target.
    pub targets: Vec<TargetOutcome>,
    /// Model parameters.
    pub params: u64,
    /// Input weight bytes.
    pub model_bytes: u64,
    /// Wall seconds of the whole run (measured even in reproducible mode; not written to bundles then).
    pub seconds: f64,
    /// Warnings for the user (e.g. an `[eval]` this version does not execute).
    pub warnings: Vec<String>,
}

/// A recipe checked against its model before any work: what `mcompress recipe check` reports
/// and what [`run`] starts from, so the two refuse the same recipes.
#[derive(Debug)]
pub struct Plan {
    /// The passes, built from the recipe.
    pub passes: Vec<Box<dyn Pass>>,
    /// Each target's hardware, resolved.
    pub resolved: Vec<targets::ResolvedTarget>,
    /// Each target's formats and GGUF settings, checked.
    pub shipping: Vec<ship::Shipping>,
    /// The model as given (architecture checked: every tensor accounted for).
    pub source: ModelSource,
    /// Cautions about the planned layout (what loads in some runtimes and not others); empty
    /// when a pass reshapes the model, whose layout is checked once it has read it.
    pub warnings: Vec<String>,
}

impl Plan {
    /// Checks everything a run of `recipe` into `out` (else `[output] dir`) can fail on before
    /// it reads a weight: the passes and their settings, the targets and their formats, the
    /// model and its architecture, the eval and calibration sets, the output location, and the
    /// planned layout (group sizes that divide, no quantized tied embedding). A pass that
    /// reshapes the model from what it reads ([`Pass::reshapes`]) has its layout checked by
    /// [`run`] once it has read it.
    pub fn new(recipe: &Recipe, out: Option<&Path>) -> Result<Self> {
        let passes = mcompress_passes::build_passes(recipe)?;
        let resolved = targets::resolve(recipe)?;
        let shipping = recipe
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| ship::Shipping::of(recipe, i, t))
            .collect::<Result<Vec<_>>>()?;
        let source = ModelSource::open(&recipe.model_path)?;
        check_sets(recipe, &passes)?;
        source.check_architecture()?;
        check_output(recipe, out, &source)?;
        let mut warnings =
            if passes.iter().any(|p| p.reshapes()) { Vec::new() } else { pipeline::check_plan(&source, &passes)? };
        warnings.extend(gguf_warnings(recipe, &shipping, &source));
        check_fused_heads(recipe, &passes, &shipping, &source)?;
        check_dtypes(recipe, &passes, &shipping, &resolved, &source)?;
        if let Some(i) = shipping.iter().position(|s| s.safetensors)
            && !passes.iter().any(|p| p.reshapes())
        {
            check_experts(&source, &passes).map_err(|m| Error::Recipe(recipe.target_error(i, m)))?;
        }
        Ok(Plan { passes, resolved, shipping, source, warnings })
    }
}

/// Phi-3 with attention heads removed and a GGUF target: llama.cpp's phi3 reads the fused
/// `attn_qkv` as if its query part were `hidden_size` wide, so such a GGUF would load wrongly (the
/// export refuses it); refused before any work, the pass and the target named.
fn check_fused_heads(
    recipe: &Recipe,
    passes: &[Box<dyn Pass>],
    shipping: &[ship::Shipping],
    source: &ModelSource,
) -> Result<()> {
    if !source
        .config()
        .and_then(mcompress_core::arch::Family::of_config)
        .is_some_and(mcompress_core::arch::Family::gguf_query_spans_hidden)
    {
        return Ok(());
    }
    let Some(t) = shipping.iter().position(|s| s.gguf.is_some()) else { return Ok(()) };
    for (spec, pass) in recipe.passes.iter().zip(passes) {
        if pass.reshapes() && pass.settings()["unit"] == "heads" {
            return Err(Error::Recipe(recipe.pass_error(
                spec.index,
                format!(
                    "removes attention heads of a fused qkv_proj (Phi-3), and target {:?} is GGUF: llama.cpp's phi3 \
                     reads attn_qkv as if the query part were hidden_size wide; ship safetensors for it, or prune \
                     neurons or layers",
                    recipe.targets[t].name
                ),
            )));
        }
    }
    Ok(())
}

/// A `max-size = "auto"` target whose hardware does not run the weight dtypes the passes leave
/// (bf16 on a T4 or a Raspberry Pi) cannot pass its fit gate: refused before any work, as the
/// gate would after it. The dtypes are the plan's (structured pruning changes shapes, not dtypes).
fn check_dtypes(
    recipe: &Recipe,
    passes: &[Box<dyn Pass>],
    shipping: &[ship::Shipping],
    resolved: &[targets::ResolvedTarget],
    source: &ModelSource,
) -> Result<()> {
    let mut dtypes = None;
    for (i, ((t, s), r)) in recipe.targets.iter().zip(shipping).zip(resolved).enumerate() {
        if !matches!(t.max_size, Some(MaxSize::Auto)) || !s.safetensors || r.weight_dtypes.is_none() {
            continue;
        }
        let dtypes = dtypes.get_or_insert_with(|| targets::weight_dtypes(&pipeline::plan(source, passes).params));
        if let Some(missing) = r.foreign_dtypes(dtypes) {
            return Err(Error::Recipe(recipe.target_error(
                i,
                format!(
                    "max-size = \"auto\": the bundle's weight dtypes {} do not run natively on {} (supported: {}); \
                     cast to one it runs (a cast pass) or drop max-size",
                    missing.join(", "),
                    r.hardware.as_deref().or(r.profile.as_deref()).unwrap_or("this target"),
                    r.weight_dtypes.as_deref().unwrap_or_default().join(", ")
                ),
            )));
        }
    }
    Ok(())
}

/// A mixture's safetensors bundle must load in transformers 5.25, which decompresses a
/// compressed-tensors checkpoint's experts all alike (every block's stacked experts through the
/// scheme of the first config group): the experts are all quantized with the scheme every other
/// quantized layer has, or none is. Refused before any work otherwise, naming two tensors that
/// differ.
fn check_experts(source: &ModelSource, passes: &[Box<dyn Pass>]) -> std::result::Result<(), String> {
    use mcompress_passes::ParamMeta;
    let Some(family) = source.config().and_then(mcompress_core::arch::Family::of_config) else { return Ok(()) };
    if !family.is_moe() {
        return Ok(());
    }
    // The plan only for a mixture: dense models pay nothing for this check.
    let params = &pipeline::plan(source, passes).params;
    let scheme = |m: &ParamMeta| match m {
        ParamMeta::Quantized { scheme, .. } => Some(*scheme),
        _ => None,
    };
    let experts: Vec<(&String, Option<_>)> = params
        .iter()
        .filter(|(n, _)| family.slot_hf(n).is_some_and(|s| s.role.per_expert()))
        .map(|(n, m)| (n, scheme(m)))
        .collect();
    let Some(quantized) = experts.iter().find(|e| e.1.is_some()) else { return Ok(()) };
    let other = experts
        .iter()
        .find(|e| e.1 != quantized.1)
        .map(|e| (e.0, e.1))
        .or_else(|| params.iter().map(|(n, m)| (n, scheme(m))).find(|(_, s)| s.is_some() && *s != quantized.1));
    match other {
        None => Ok(()),
        Some((name, s)) => Err(format!(
            "mixture of experts: transformers loads a compressed-tensors bundle's experts only when every expert is \
             quantized with the one scheme of every quantized layer; {} is {} but {name} is {} (quantize every \
             expert alike, or write GGUF targets only)",
            quantized.0,
            quantized.1.map_or("dense".into(), |s| s.label()),
            s.map_or("dense".into(), |s| s.label()),
        )),
    }
}

/// What a GGUF target will compute differently from the model (a Mistral's sliding window,
/// which llama.cpp does not apply; a Qwen3-MoE's un-renormalized expert weights, which
/// llama.cpp renormalizes).
fn gguf_warnings(recipe: &Recipe, shipping: &[ship::Shipping], model: &ModelSource) -> Vec<String> {
    let Some(g) = model.config().and_then(|c| mcompress_core::arch::Geometry::from_config(c).ok()) else {
        return Vec::new();
    };
    let arch = g.family.gguf_arch();
    let mut why = Vec::new();
    if let Some(w) = g.gguf_window_lost() {
        why.push(format!(
            "llama.cpp's {arch} attends over the whole context: beyond the sliding_window of {w} tokens (context {}) \
             its outputs differ from transformers'",
            g.max_positions
        ));
    }
    if g.experts > 0 && !g.norm_topk {
        why.push(format!(
            "llama.cpp's {arch} renormalizes the chosen experts' weights to sum to 1, which this model \
             (norm_topk_prob = false) does not"
        ));
    }
    let mut out = Vec::new();
    for (t, _) in recipe.targets.iter().zip(shipping).filter(|(_, s)| s.gguf.is_some()) {
        for w in &why {
            out.push(format!("target {}: {w}; the GGUF target's eval scores what llama.cpp computes", t.name));
        }
    }
    out
}

/// Runs a recipe: passes, then one bundle per target.
pub fn run(recipe: &Recipe, opts: &RunOptions, progress: &mut dyn FnMut(Progress)) -> Result<RunSummary> {
    let started = Instant::now();
    let Plan { mut passes, resolved, shipping, source, .. } = Plan::new(recipe, opts.out.as_deref())?;
    let prepare_err = |i: usize, e: PassError| Error::Prepare(format!("pass[{}] {}: {e}", i, recipe.passes[i].kind));
    // Per pass: wall seconds before the weights stream (scoring, calibration, training), added
    // to its streaming time in the report.
    let mut pre_seconds = vec![0f64; passes.len()];
    // Per pass: peak resident memory while that work ran (the kernel's high-water mark, reset
    // before each).
    let mut pre_rss: Vec<Option<u64>> = vec![None; passes.len()];
    // Per pass: layers its calibration rewrote without data (experts no token reached), for the
    // report.
    let mut uncalibrated: Vec<Vec<String>> = vec![Vec::new(); passes.len()];
    // Whole layers removed (structured pruning, always the first pass): scored on calibration
    // text, then every later step sees the smaller, renumbered model. `source` stays the model
    // as given: the eval's reference and the default distillation teacher.
    let mut restructured = None;
    if let Some(first) = passes.first_mut()
        && let Need::LayerScores(c) | Need::ExpertScores(c) = first.needs()
    {
        let t0 = Instant::now();
        mcompress_core::fsutil::reset_peak_rss();
        let experts = matches!(first.needs(), Need::ExpertScores(_));
        let c = c.clone();
        let spec = mcompress_passes::calibrate::config_window_spec(&c);
        first.prepare(&source).map_err(|e| prepare_err(0, e))?;
        let what = if experts { "expert scores" } else { "layer scores" };
        let scored = |e| Error::Calibration(format!("pass[0] {}: {what}: {e}", recipe.passes[0].kind));
        let provided = if experts {
            Provided::ExpertScores(mcompress_eval::calibrate::expert_scores(&source, spec).map_err(scored)?)
        } else {
            Provided::LayerScores(mcompress_eval::calibrate::layer_scores(&source, spec).map_err(scored)?)
        };
        first.provide(&source, provided).map_err(|e| prepare_err(0, e))?;
        let map = first.layer_map().ok_or_else(|| prepare_err(0, PassError::Provided("no layers chosen".into())))?;
        let config = map.config(&source.config().cloned().unwrap_or_default());
        restructured = Some(ModelSource::open(&recipe.model_path)?.restructured(|n| map.rename(n), config)?);
        pre_seconds[0] += t0.elapsed().as_secs_f64();
        pre_rss[0] = mcompress_core::fsutil::peak_rss();
    }
    let model = restructured.as_ref().unwrap_or(&source);
    // Passes that read the whole model first (structured pruning's importances).
    let mut early_warnings = Vec::new();
    // Side files that are links are not shipped (a link would ship whatever it points at).
    if source.path().is_dir() {
        for f in mcompress_core::AUX_FILES {
            let p = source.path().join(f);
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                early_warnings.push(format!(
                    "{}: a symbolic link: not copied into the bundle (bundles ship regular files only; copy the file \
                     itself into the model directory to ship it)",
                    p.display()
                ));
            }
        }
    }
    for (i, pass) in passes.iter_mut().enumerate() {
        if let Some(w) = pass.warning(model) {
            early_warnings.push(format!("pass[{i}] {} {w}", pass.name()));
        }
        if i == 0 && restructured.is_some() {
            continue;
        }
        let t0 = Instant::now();
        pass.prepare(model).map_err(|e| prepare_err(i, e))?;
        if let Need::Moments(c) = pass.needs() {
            mcompress_core::fsutil::reset_peak_rss();
            let moments =
                mcompress_eval::calibrate::input_moments(model, mcompress_passes::calibrate::config_window_spec(c))
                    .map_err(|e| {
                        Error::Calibration(format!("pass[{i}] {}: calibration: {e}", recipe.passes[i].kind))
                    })?;
            pass.provide(model, Provided::Moments(moments)).map_err(|e| prepare_err(i, e))?;
            pre_rss[i] = mcompress_core::fsutil::peak_rss();
        }
        pre_seconds[i] += t0.elapsed().as_secs_f64();
    }
    // What runtimes would reject (a short last group, a quantized tied embedding) fails here,
    // before minutes of calibration or training.
    early_warnings.extend(pipeline::check_plan(model, &passes)?);
    early_warnings.extend(gguf_warnings(recipe, &shipping, model));
    let out_dir = opts.out.clone().unwrap_or_else(|| recipe.output_dir.clone());
    fs_err::create_dir_all(&out_dir).map_err(io(&out_dir))?;
    let out_dir = fs_err::canonicalize(&out_dir).map_err(io(&out_dir))?;
    // Each training pass's checkpoint directory: absent, empty or ours (checked before any
    // work; an explicit `checkpoint-dir` was checked when the recipe was read), and whether it
    // was there before, so that only what this run created is removed when the bundles are done.
    let mut checkpoint_dirs = std::collections::BTreeMap::new();
    for pass in &passes {
        if let Need::Training(d) = pass.needs() {
            let dir =
                d.config.checkpoint_dir.clone().unwrap_or_else(|| out_dir.join(format!(".distill-pass{}", d.index)));
            if let Some(problem) = mcompress_passes::distill::checkpoint_dir_problem(&dir) {
                return Err(Error::UnsafeOutput {
                    path: dir,
                    reason: format!("pass[{}] distill checkpoint directory: {problem}", d.index),
                });
            }
            // The default directory is the tool's own; a directory the user named and that was
            // there before stays (emptied of the checkpoint's files).
            let keep_dir = d.config.checkpoint_dir.is_some() && dir.exists();
            checkpoint_dirs.insert(d.index, (dir, keep_dir));
        }
    }
    // Each calibrated pass's checkpoint directory (`.calibrate-pass<i>` beside the bundles):
    // absent, empty or ours, checked before any work.
    let mut calibration_checkpoints = std::collections::BTreeMap::new();
    for (i, pass) in passes.iter().enumerate() {
        if let Need::Calibration(_) = pass.needs() {
            let dir = out_dir.join(format!(".calibrate-pass{i}"));
            if let Some(problem) = mcompress_passes::calibrate::Checkpoint::problem(&dir) {
                return Err(Error::UnsafeOutput {
                    path: dir,
                    reason: format!("pass[{i}] calibration checkpoint directory: {problem}"),
                });
            }
            // What the checkpoint is of: the model and every pass up to this one.
            let settings: Vec<serde_json::Value> =
                passes[..=i].iter().map(|p| serde_json::json!([p.name(), p.settings()])).collect();
            let fingerprint = serde_json::json!({
                "model": recipe.model_path,
                "bytes": model.weight_bytes(),
                "tensors": model.tensors().len(),
                "passes": settings,
            })
            .to_string();
            calibration_checkpoints.insert(
                i,
                mcompress_passes::calibrate::Checkpoint {
                    dir,
                    fingerprint,
                    resume: opts.resume,
                    stop_after: opts.calibrate_stop_after,
                    interval: CHECKPOINT_INTERVAL,
                },
            );
        }
    }
    // Calibration activations past their memory budget go next to the bundles.
    let scratch = mcompress_eval::spill::Scratch {
        dir: out_dir.clone(),
        budget: opts.calibration_memory.unwrap_or(DEFAULT_CALIBRATION_MEMORY),
    };
    // Calibration runs where the eval does (`--backend`, else `[eval] backend`, else auto: a
    // hardware GPU if there is one).
    let mut cal_device: Option<(mcompress_eval::linear::Device, String)> = None;
    let mut cal_backend: Vec<Option<String>> = vec![None; passes.len()];
    // Calibrated passes (GPTQ, AWQ, Wanda, SparseGPT) and training passes (distill) run on the
    // model before anything streams, in recipe order.
    for i in 0..passes.len() {
        if !passes[i].needs().runs_model() {
            continue;
        }
        let spec = &recipe.passes[i];
        let t0 = Instant::now();
        mcompress_core::fsutil::reset_peak_rss();
        // Each calibrates or trains on the model as the passes before it leave it.
        let (earlier, rest) = passes.split_at_mut(i);
        let pass = &mut rest[0];
        // The earlier passes apply per tensor as the calibration reaches each block.
        let transformed = pipeline::Transformed::new(model, earlier);
        let prior = if earlier.is_empty() {
            None
        } else {
            Some(mcompress_eval::calibrate::Prior {
                config: pipeline::output_config(model, earlier).unwrap_or_default(),
                tensors: &transformed,
                // Unstructured and N:M pruning leave exact zeros that must stay zero; structured
                // pruning leaves none (its removed units are gone), and a zero it did not make
                // (a quantized input's grid point) must stay trainable.
                keep_zeros: earlier.iter().any(|p| p.leaves_zeros()),
            })
        };
        let provided = match pass.needs() {
            Need::Calibration(cal) => {
                if cal_device.is_none() {
                    let requested = opts.backend.or(recipe.eval.as_ref().map(|e| e.backend)).unwrap_or_default();
                    let (device, _) = mcompress_eval::resolve_device(requested).map_err(|e| {
                        Error::Calibration(format!("pass[{}] {}: calibration: {e}", spec.index, spec.kind))
                    })?;
                    let name = if opts.reproducible || matches!(device, mcompress_eval::linear::Device::Cpu) {
                        device.name().to_string()
                    } else {
                        format!("{} ({})", device.name(), device.adapter())
                    };
                    cal_device = Some((device, name));
                }
                let (device, name) = cal_device.as_ref().expect("resolved above");
                cal_backend[i] = Some(name.clone());
                let (tensors, unseen) = mcompress_passes::calibrate::run(
                    model,
                    pass.as_ref(),
                    cal,
                    prior.as_ref(),
                    &scratch,
                    calibration_checkpoints.get(&i),
                    device,
                    opts.progress,
                )
                .map_err(|e| Error::Calibration(format!("pass[{}] {}: calibration: {e}", spec.index, spec.kind)))?;
                if !unseen.is_empty() {
                    uncalibrated[i].clone_from(&unseen);
                    early_warnings.push(format!(
                        "pass[{}] {}: {} layer(s) saw no calibration token (experts the router never chose) and were \
                         rewritten without data (round-to-nearest / magnitude): {}",
                        spec.index,
                        spec.kind,
                        unseen.len(),
                        unseen.join(", ")
                    ));
                }
                Provided::Tensors(tensors)
            }
            Need::Training(d) => {
                let checkpoint_dir = checkpoint_dirs[&d.index].0.clone();
                let dopts = mcompress_distill::Options {
                    progress: opts.progress,
                    resume: opts.resume,
                    checkpoint_dir: checkpoint_dir.clone(),
                    reproducible: opts.reproducible,
                    stop_after: opts.distill_stop_after,
                };
                let mut d = d.clone();
                if let Some(dev) = opts.distill_device {
                    d.device = dev;
                }
                let trained = mcompress_distill::run(&source, pass.as_ref(), &d, prior, &dopts)
                    .map_err(|e| Error::Calibration(format!("pass[{}] {}: {e}", spec.index, spec.kind)))?;
                Provided::Trained { tensors: trained.tensors, outcome: trained.outcome }
            }
            _ => continue,
        };
        pass.provide(model, provided).map_err(|e| prepare_err(i, e))?;
        pre_seconds[i] += t0.elapsed().as_secs_f64();
        pre_rss[i] = pre_rss[i].max(mcompress_core::fsutil::peak_rss());
    }
    for t in &recipe.targets {
        check_output_safe(&out_dir.join(&t.name), model)?;
    }
    clean_stale(&out_dir);

    let pid = std::process::id();
    let stage = |name: &str| out_dir.join(format!(".{name}.mcompress-tmp-{pid}"));
    // The safetensors payload is shared by every target that ships it; it is staged once.
    let payload_dir = out_dir.join(format!(".payload.mcompress-tmp-{pid}"));
    let staged: Vec<PathBuf> = recipe.targets.iter().map(|t| stage(&t.name)).chain([payload_dir.clone()]).collect();
    for d in &staged {
        if d.exists() {
            fs_err::remove_dir_all(d).map_err(io(d))?;
        }
        fs_err::create_dir_all(d).map_err(io(d))?;
    }

    let result = (|| {
        let any_st = shipping.iter().any(|s| s.safetensors);
        // GGUF targets: tensor types planned (fit: solved) before the weights stream.
        let planned = pipeline::plan(model, &passes);
        let mut ggufs: Vec<Option<ship::GgufTarget>> = Vec::with_capacity(shipping.len());
        for (i, s) in shipping.iter().enumerate() {
            ggufs.push(match &s.gguf {
                Some(g) => {
                    // The fit policy weighs each tensor's error by its inputs' activation
                    // statistics on the target's calibration text (the model as given).
                    let mut g = g.clone();
                    if let Some(c) = g.calibration() {
                        let ws = mcompress_eval::calibrate::WindowSpec {
                            set: &c.set,
                            samples: c.samples.unwrap_or(32),
                            seq_len: c.seq_len.unwrap_or(512),
                            seed: c.seed.unwrap_or(0),
                        };
                        let moments = mcompress_eval::calibrate::input_moments(model, ws).map_err(|e| {
                            Error::Calibration(format!("target[{i}] {}: calibration: {e}", recipe.targets[i].name))
                        })?;
                        g.set_moments(moments);
                    }
                    Some(ship::GgufTarget::plan(recipe, i, model, &planned.params, &passes, &g, &resolved[i])?)
                }
                None => None,
            });
        }
        // Hash the inputs on a second thread while the passes stream the weights.
        let inputs = model.input_files();
        let (hashes, output) = std::thread::scope(|s| {
            let h = s.spawn(|| manifest::hash_inputs(model, &inputs));
            let out = (|| -> Result<pipeline::Output> {
                let mut sinks = Vec::new();
                for (g, t) in ggufs.iter().zip(&recipe.targets) {
                    if let Some(g) = g {
                        sinks.push(g.sink(&stage(&t.name).join("model.gguf"))?);
                    }
                }
                let mut refs: Vec<&mut dyn pipeline::Sink> =
                    sinks.iter_mut().map(|s| s as &mut dyn pipeline::Sink).collect();
                let st = any_st.then(|| payload_dir.join("model.safetensors"));
                Ok(pipeline::run(model, &passes, st.as_deref(), &mut refs, !opts.reproducible, progress)?)
            })();
            (h.join().expect("hash thread does not panic"), out)
        });
        let (hashes, mut output): (_, pipeline::Output) = (hashes?, output?);
        for ((((r, pre), unseen), rss), backend) in
            output.passes.iter_mut().zip(&pre_seconds).zip(&uncalibrated).zip(&pre_rss).zip(&cal_backend)
        {
            r.backend.clone_from(backend);
            if let Some(sec) = &mut r.seconds {
                *sec += pre;
                r.peak_rss = *rss;
            }
            if !unseen.is_empty()
                && let Some(s) = r.settings.as_object_mut()
            {
                s.insert("uncalibrated".into(), unseen.clone().into());
            }
        }

        // The safetensors payload and its eval, shared by the targets that ship it.
        let mut st_files = std::collections::BTreeMap::new();
        let mut st_eval = (None, None, Vec::new());
        if any_st {
            write_payload(model, &passes, &output, &payload_dir)?;
            st_files = manifest::hash_dir(&payload_dir)?;
            st_eval = run_eval(recipe, &source, &payload_dir, opts)?;
        }
        let mut warnings = st_eval.2.clone();
        // KV cache of the model as the passes leave it (fewer heads or layers after pruning).
        let kv = targets::KvGeometry::from_config(pipeline::output_config(model, &passes).as_ref());
        let st_dtypes = targets::weight_dtypes(&output.params);

        // Per target: its files, eval (GGUF: with fit retries) and fit.
        let mut shipped = Vec::with_capacity(shipping.len());
        for (i, (s, t)) in shipping.iter().zip(&recipe.targets).enumerate() {
            let dir = stage(&t.name);
            let mut files = std::collections::BTreeMap::new();
            let mut formats = Vec::new();
            let mut weights_bytes = 0;
            let mut dtypes = Vec::new();
            let mut est_dtypes = Vec::new();
            if s.safetensors {
                copy_payload(&payload_dir, &dir)?;
                files.extend(st_files.clone());
                formats.push("safetensors");
                weights_bytes += output.bytes;
                dtypes.extend(st_dtypes.clone());
            }
            let (mut eval_json, mut eval_gate) = (st_eval.0.clone(), st_eval.1.clone());
            let mut gguf_json = None;
            if let Some(g) = &mut ggufs[i] {
                let file = dir.join("model.gguf");
                let (e, gate, w) = g.evaluate(model, &passes, &file, &mut |f| run_eval(recipe, &source, f, opts))?;
                warnings.extend(w);
                let entry = FileEntry {
                    sha256: fsutil::sha256_file(&file)?,
                    bytes: fs_err::metadata(&file).map_err(io(&file))?.len(),
                };
                weights_bytes += entry.bytes;
                gguf_json = Some(g.summary(entry.bytes));
                files.insert("model.gguf".to_string(), entry);
                formats.push("gguf");
                est_dtypes.extend(g.dtypes());
                // The GGUF is what this target runs when it ships no safetensors; with both,
                // both evals are reported and both gate.
                if s.safetensors {
                    if let (Some(Value::Object(obj)), Some(e)) = (&mut eval_json, e) {
                        obj.insert("gguf".into(), e);
                    }
                    eval_gate = match (eval_gate, gate) {
                        (Some(a), Some(b)) => Some(if a.passed { b } else { a }),
                        (a, b) => a.or(b),
                    };
                } else {
                    eval_json = e;
                    eval_gate = gate;
                }
            }
            // llama.cpp runs every ggml type of a GGUF: only the safetensors dtypes are checked
            // against the target's weight-dtypes; estimates see all of them.
            est_dtypes.extend(dtypes.clone());
            est_dtypes.sort();
            est_dtypes.dedup();
            let bytes: u64 = files.values().map(|f| f.bytes).sum();
            shipped.push(ship::Shipped {
                dir,
                files,
                formats,
                weights_bytes,
                dtypes,
                est_dtypes,
                bytes,
                eval_json,
                eval_gate,
                gguf_json,
            });
        }
        // Where each bundle fits and what it would cost, for every target of the run.
        let reports: Vec<TargetReport> = resolved
            .iter()
            .zip(&shipped)
            .map(|(r, s)| TargetReport {
                name: r.name.clone(),
                hardware: r.clone(),
                fit: targets::fit(r, s.weights_bytes, &s.dtypes, &s.formats, kv),
                estimates: targets::estimate(r, s.weights_bytes, output.param_count(), &s.est_dtypes, kv),
            })
            .collect();
        let mut targets = Vec::new();
        for (i, (t, s)) in recipe.targets.iter().zip(shipped).enumerate() {
            let mut gates = Vec::new();
            match t.max_size {
                Some(MaxSize::Bytes(limit)) => gates.push(Gate::max_size(limit.0, s.bytes)),
                Some(MaxSize::Auto) => gates.push(Gate::fit(&reports[i].fit, s.weights_bytes)),
                None => {}
            }
            gates.extend(s.eval_gate.clone());
            // The bundle as its runtime will read it: a bundle that would not load never passes.
            gates.push(Gate::conformance(&conformance::check(&s.dir)));
            let passed = gates.iter().all(|g| g.passed);
            let report = Report::new(
                recipe,
                &source,
                &output,
                &reports[i],
                &reports,
                report::Shipped {
                    bytes: s.bytes,
                    weights_bytes: s.weights_bytes,
                    files: &s.files,
                    gguf: s.gguf_json.clone(),
                },
                gates.clone(),
                passed,
                s.eval_json.clone(),
            );
            let mut files = s.files.clone();
            let report_json = serde_json::to_vec_pretty(&report).expect("report is JSON");
            let report_md = report.to_markdown().into_bytes();
            let report_html = report.to_html().into_bytes();
            for (name, bytes) in
                [("report.json", &report_json), ("report.md", &report_md), ("report.html", &report_html)]
            {
                fsutil::write_atomic(&s.dir.join(name), bytes)?;
                files.insert(name.into(), FileEntry { sha256: fsutil::sha256_bytes(bytes), bytes: bytes.len() as u64 });
            }
            let m = Manifest::new(recipe, &hashes, &passes, t, files, passed);
            fsutil::write_atomic(
                &s.dir.join("manifest.json"),
                &serde_json::to_vec_pretty(&m).expect("manifest is JSON"),
            )?;
            if let Some(key) = &opts.sign {
                sign::sign_bundle(&s.dir, key)?;
            }
            targets.push((
                s.dir,
                TargetOutcome {
                    name: t.name.clone(),
                    dir: out_dir.join(&t.name),
                    bundle_bytes: s.bytes,
                    passed,
                    gates,
                },
            ));
        }
        // Every bundle is complete: move them into place.
        for (staged, t) in &targets {
            replace_dir(staged, &t.dir)?;
        }
        Ok((targets.into_iter().map(|(_, t)| t).collect(), warnings))
    })();
    let _ = fs_err::remove_dir_all(&payload_dir);
    let (targets, warnings) = match result {
        Ok(t) => {
            // The bundles are complete: the training checkpoints have served their purpose. Only
            // the checkpoint's own files go, and the directory only if this run created it.
            for (c, keep_dir) in checkpoint_dirs.values() {
                for f in mcompress_passes::distill::CHECKPOINT_FILES {
                    let _ = fs_err::remove_file(c.join(f));
                }
                if !keep_dir {
                    let _ = fs_err::remove_dir(c);
                }
            }
            for c in calibration_checkpoints.values() {
                for f in mcompress_passes::calibrate::Checkpoint::files(&c.dir) {
                    let _ = fs_err::remove_file(f);
                }
                let _ = fs_err::remove_dir(&c.dir);
            }
            t
        }
        Err(e) => {
            for d in &staged {
                let _ = fs_err::remove_dir_all(d);
            }
            return Err(e);
        }
    };
    early_warnings.extend(warnings);
    Ok(RunSummary {
        warnings: early_warnings,
        targets,
        params: source.params(),
        model_bytes: source.weight_bytes(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Runs `[eval]` on the reference model and the staged bundle: the report's `eval` object, the
/// `max-drop` gate, and warnings (an eval this version cannot run is reported as not run, never
/// silently skipped).
fn run_eval(recipe: &Recipe, model: &ModelSource, staged: &Path, opts: &RunOptions) -> Result<EvalOutcome> {
    let reproducible = opts.reproducible;
    let Some(section) = &recipe.eval else { return Ok((None, None, Vec::new())) };
    let set = section.set.file_name().map(|n| n.to_string_lossy().into_owned());
    let eval_opts = mcompress_eval::Options { backend: opts.backend, progress: opts.progress };
    match mcompress_eval::evaluate_with(section, model, staged, &eval_opts).map_err(|e| Error::Eval(e.to_string()))? {
        mcompress_eval::Outcome::Unsupported(reason) => {
            let json = serde_json::json!({
                "status": "not-run", "reason": reason, "metric": section.metric, "set": set,
                "backend": section.backend, "max_drop": section.max_drop,
            });
            let warning = format!(
                "[eval] not run: {reason}; no accuracy gate was applied (report.json eval.status = \"not-run\")"
            );
            Ok((Some(json), None, vec![warning]))
        }
        mcompress_eval::Outcome::Ran(r) => {
            let higher = mcompress_eval::higher_is_better(r.metric);
            let drop = if higher { r.reference - r.compressed } else { r.compressed - r.reference };
            let drop_percent = if r.reference == 0.0 { 0.0 } else { drop / r.reference.abs() * 100.0 };
            let gate =
                section.max_drop.map(|m| Gate::max_drop(r.metric, r.reference, r.compressed, drop, drop_percent, m));
            let mut json = serde_json::to_value(&r).expect("eval result is JSON");
            let obj = json.as_object_mut().expect("object");
            obj.insert("status".into(), "ran".into());
            obj.insert("drop".into(), drop.into());
            obj.insert("drop_percent".into(), drop_percent.into());
            obj.insert("max_drop".into(), serde_json::to_value(section.max_drop).expect("JSON"));
            obj.insert("passed".into(), gate.as_ref().is_none_or(|g| g.passed).into());
            if reproducible {
                obj.insert("latency_ms".into(), Value::Null);
                obj.insert("throughput".into(), Value::Null);
                obj.insert("threads".into(), Value::Null);
            }
            Ok((Some(json), gate, Vec::new()))
        }
    }
}

/// Checks the recipe's eval and calibration sets before any work: each a regular, non-empty file.
fn check_sets(recipe: &Recipe, passes: &[Box<dyn Pass>]) -> Result<()> {
    let check = |path: &Path, what: String| -> Result<()> {
        let bad = |reason: String| Error::BadBundle { path: path.to_path_buf(), reason: format!("{what}: {reason}") };
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(bad("no such file".into())),
            Err(e) => Err(bad(e.to_string())),
            Ok(m) if !m.is_file() => Err(bad("not a regular file".into())),
            Ok(m) if m.len() == 0 => Err(bad("empty file".into())),
            Ok(_) => Ok(()),
        }
    };
    if let Some(e) = &recipe.eval {
        check(&e.set, "[eval] set".into())?;
    }
    for (spec, pass) in recipe.passes.iter().zip(passes) {
        let set = match pass.needs() {
            Need::Calibration(c) => Some((&c.set, "calibration set")),
            Need::Moments(c) | Need::LayerScores(c) | Need::ExpertScores(c) => Some((&c.set, "calibration set")),
            Need::Training(d) => Some((&d.config.set, "training set")),
            Need::Nothing => None,
        };
        if let Some((set, what)) = set {
            check(set, format!("pass[{}] {}: {what}", spec.index, spec.kind))?;
        }
    }
    for t in &recipe.targets {
        if let Some(c) = &t.calibration {
            check(&c.set, format!("target {}: calibration set", t.name))?;
        }
    }
    Ok(())
}
