//! Streams a model through passes into one safetensors file.
//!
//! 1. Plan: every pass plans its effect on every tensor's metadata, in order. The final metadata
//!    fixes the output layout (header and offsets) before any data is produced.
//! 2. Stream: tensors are visited in input file order (sequential reads through the mapping);
//!    each is rewritten by the passes that planned a change, written at its offset, and its input
//!    pages are released. Peak memory is the tensor in flight and its outputs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use mcompress_core::{ModelSource, SafetensorsLayout, SafetensorsWriter, TensorRef};
use serde::Serialize;
use serde_json::Value;

use crate::{DenseTensors, Error, Param, ParamMeta, Pass, Plan, Result};
pub use mcompress_format::compressed_tensors::{COMPRESSED_TENSORS_VERSION, quantization_config};

/// One tensor's error after a pass.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct TensorStat {
    /// Tensor name (as in the input).
    pub name: String,
    /// Relative RMSE of the pass's output against its input (dequantized where quantized).
    pub rel_rmse: f64,
}

/// A tensor a pass was told to touch but could not.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct Skipped {
    /// Tensor name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// Per-pass results.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct PassReport {
    /// Position in the recipe.
    pub index: usize,
    /// Pass type.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Resolved settings.
    pub settings: Value,
    /// Wall seconds spent in this pass: streaming, plus (in `mcompress run`) its scoring,
    /// calibration or training before the weights stream (measured; `None` in reproducible
    /// mode).
    pub seconds: Option<f64>,
    /// Peak resident memory, in bytes, while this pass's calibration, scoring or training ran
    /// before the weights streamed (in `mcompress run`, on Linux; `None` for passes that only
    /// rewrite tensors as they stream, and in reproducible mode).
    pub peak_rss: Option<u64>,
    /// Where a calibrated pass's calibration ran (its blocks' matmuls and Hessians): `cpu`, or
    /// `wgpu` with the adapter (the adapter left out in reproducible mode); `None` for other
    /// passes. `--backend` / `[eval] backend` choose it.
    pub backend: Option<String>,
    /// Tensors rewritten, with their error.
    pub tensors: Vec<TensorStat>,
    /// Largest relative RMSE.
    pub rel_rmse_max: f64,
    /// Mean relative RMSE over rewritten tensors.
    pub rel_rmse_mean: f64,
    /// Tensors selected explicitly but skipped.
    pub skipped: Vec<Skipped>,
}

/// Progress of a run, for progress bars.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Tensors done.
    pub tensors_done: usize,
    /// Tensors in all.
    pub tensors_total: usize,
    /// Input bytes done.
    pub bytes_done: u64,
    /// Input bytes in all.
    pub bytes_total: u64,
}

/// The planned outcome of all passes.
#[derive(Debug)]
pub struct Planned {
    /// Final metadata per input tensor, by name.
    pub params: BTreeMap<String, ParamMeta>,
    /// For each input tensor (in `model.tensors()` order): indices of passes that change it.
    changes: Vec<Vec<usize>>,
    skipped: Vec<Vec<Skipped>>,
}

/// Plans every pass over every tensor.
pub fn plan(model: &ModelSource, passes: &[Box<dyn Pass>]) -> Planned {
    let mut params = BTreeMap::new();
    let mut changes = Vec::with_capacity(model.tensors().len());
    let mut skipped = vec![Vec::new(); passes.len()];
    for r in model.tensors() {
        let info = model.info(r);
        let mut meta = ParamMeta::Dense { dtype: info.dtype, shape: info.shape.clone() };
        let mut mine = Vec::new();
        for (i, p) in passes.iter().enumerate() {
            match p.plan(&info.name, &meta) {
                Plan::Keep => {}
                Plan::Change(m) => {
                    meta = m;
                    mine.push(i);
                }
                Plan::Skip(reason) => skipped[i].push(Skipped { name: info.name.clone(), reason }),
            }
        }
        changes.push(mine);
        params.insert(info.name.clone(), meta);
    }
    Planned { params, changes, skipped }
}

/// Result of [`run`].
#[derive(Debug)]
pub struct Output {
    /// Per-pass reports.
    pub passes: Vec<PassReport>,
    /// Final metadata per input tensor.
    pub params: BTreeMap<String, ParamMeta>,
    /// Size of the safetensors file (written or, with no `out`, as it would be).
    pub bytes: u64,
}

impl Output {
    /// Parameters of the output model (fewer than the input's after structured pruning;
    /// quantized and sparse ones count at their full shape).
    pub fn param_count(&self) -> u64 {
        self.params.values().map(|m| m.shape().iter().product::<usize>() as u64).sum()
    }
}

/// Another consumer of the pipeline's output tensors (a GGUF writer), fed each final parameter
/// as it streams past.
pub trait Sink {
    /// Takes one parameter (input name, after every pass).
    fn accept(&mut self, name: &str, param: &Param<'_>) -> Result<()>;
    /// Called once after the last parameter.
    fn finish(&mut self) -> Result<()>;
}

/// Runs `passes` over `model`, writing `out` (a `.safetensors` path; `None` writes none) and
/// feeding every `sinks` entry.
pub fn run(
    model: &ModelSource,
    passes: &[Box<dyn Pass>],
    out: Option<&Path>,
    sinks: &mut [&mut dyn Sink],
    measure_time: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<Output> {
    let planned = plan(model, passes);
    let entries = planned.params.iter().flat_map(|(name, m)| m.entries(name)).collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let layout = SafetensorsLayout::new(entries, &metadata)?;
    let bytes = layout.total_bytes();
    let mut writer = out.map(|out| SafetensorsWriter::create(out, layout)).transpose()?;

    // Input file order, so the mapping is read front to back.
    let index: std::collections::HashMap<String, usize> =
        model.tensors().iter().enumerate().map(|(i, r)| (model.info(r).name.clone(), i)).collect();
    let order: Vec<(usize, TensorRef)> =
        model.read_order().into_iter().map(|r| (index[&model.info(&r).name], r)).collect();

    let total = Progress {
        tensors_done: 0,
        tensors_total: order.len(),
        bytes_done: 0,
        bytes_total: model.tensors().iter().map(|r| model.info(r).nbytes() as u64).sum(),
    };
    let mut seconds = vec![0f64; passes.len()];
    let mut stats: Vec<Vec<TensorStat>> = vec![Vec::new(); passes.len()];
    let mut done = total;
    for (i, r) in &order {
        let (i, r) = (*i, r);
        let view = model.view(r);
        let bytes_in = view.data.len() as u64;
        let mut param = Param::Dense { dtype: view.dtype, shape: view.shape.to_vec(), data: view.data };
        for &pi in &planned.changes[i] {
            let t0 = Instant::now();
            let applied = passes[pi].apply(view.name, param).map_err(|reason| Error::Tensor {
                index: pi,
                pass: passes[pi].name(),
                tensor: view.name.to_string(),
                reason,
            })?;
            seconds[pi] += t0.elapsed().as_secs_f64();
            param = applied.param;
            if let Some(rel_rmse) = applied.rel_rmse {
                stats[pi].push(TensorStat { name: view.name.to_string(), rel_rmse });
            }
        }
        debug_assert_eq!(Some(&param.meta()), planned.params.get(view.name));
        for sink in sinks.iter_mut() {
            sink.accept(view.name, &param)?;
        }
        if let Some(writer) = &mut writer {
            for (entry, data) in param.into_entries(view.name) {
                writer.write_tensor(&entry.name, &data)?;
            }
        }
        model.release(r);
        done.tensors_done += 1;
        done.bytes_done += bytes_in;
        progress(done);
    }
    if let Some(writer) = writer {
        writer.finish()?;
    }
    for sink in sinks.iter_mut() {
        sink.finish()?;
    }

    let mut skipped = planned.skipped;
    let reports = passes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut tensors = std::mem::take(&mut stats[i]);
            tensors.sort_by(|a, b| a.name.cmp(&b.name));
            let max = tensors.iter().map(|t| t.rel_rmse).fold(0f64, f64::max);
            let mean = if tensors.is_empty() {
                0.0
            } else {
                tensors.iter().map(|t| t.rel_rmse).sum::<f64>() / tensors.len() as f64
            };
            PassReport {
                index: i,
                kind: p.name(),
                settings: p.settings(),
                seconds: measure_time.then_some(seconds[i]),
                peak_rss: None,
                backend: None,
                tensors,
                rel_rmse_max: max,
                rel_rmse_mean: mean,
                skipped: std::mem::take(&mut skipped[i]),
            }
        })
        .collect();
    Ok(Output { passes: reports, params: planned.params, bytes })
}

/// The float tensors of a model as `passes` leave it, one at a time, as f32 (quantized ones
/// dequantized, sparse ones expanded): what a calibrated pass later in the recipe calibrates on,
/// read block by block ([`mcompress_eval::decoder::Decoder::streamed`]) so that the transformed
/// model is never held whole.
pub struct Transformed<'a> {
    model: &'a ModelSource,
    passes: &'a [Box<dyn Pass>],
    refs: BTreeMap<String, TensorRef>,
    shapes: Vec<(String, Vec<usize>)>,
}

impl<'a> Transformed<'a> {
    /// `model` after `passes` (planned: shapes are the passes' output shapes).
    pub fn new(model: &'a ModelSource, passes: &'a [Box<dyn Pass>]) -> Self {
        let planned = plan(model, passes);
        let refs = model.tensors().iter().map(|r| (model.info(r).name.clone(), *r)).collect();
        let shapes = planned
            .params
            .iter()
            .filter(|(_, m)| match m {
                ParamMeta::Dense { dtype, .. } | ParamMeta::Sparse { dtype, .. } => dtype.is_float(),
                ParamMeta::Quantized { .. } => true,
            })
            .map(|(n, m)| (n.clone(), m.shape().to_vec()))
            .collect();
        Transformed { model, passes, refs, shapes }
    }

    /// One tensor after the passes, as f32 with its shape (`None`: not a float tensor).
    fn tensor(&self, r: &TensorRef) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let view = self.model.view(r);
        let mut meta = ParamMeta::Dense { dtype: view.dtype, shape: view.shape.to_vec() };
        let mut param = Param::Dense { dtype: view.dtype, shape: view.shape.to_vec(), data: view.data };
        for (pi, p) in self.passes.iter().enumerate() {
            if let Plan::Change(m) = p.plan(view.name, &meta) {
                param = p
                    .apply(view.name, param)
                    .map_err(|reason| Error::Tensor {
                        index: pi,
                        pass: p.name(),
                        tensor: view.name.to_string(),
                        reason,
                    })?
                    .param;
                meta = m;
            }
        }
        let values = match &param {
            Param::Quantized(q) => Some((q.shape.clone(), q.dequantize())),
            other => other.dense_f32().map(|(_, shape, v)| (shape, v)),
        };
        drop(param);
        self.model.release(r);
        Ok(values)
    }

    /// Every float tensor, by name (the whole model in memory: what training takes).
    ///
    /// # Errors
    /// A pass that fails on a tensor, named.
    pub fn all(&self) -> Result<DenseTensors> {
        let mut out = BTreeMap::new();
        for r in self.model.tensors() {
            if let Some(v) = self.tensor(r)? {
                out.insert(self.model.info(r).name.clone(), v);
            }
        }
        Ok(out)
    }
}

impl mcompress_eval::weights::TensorSource for Transformed<'_> {
    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.shapes.clone()
    }

    fn load(&self, names: &[String]) -> mcompress_eval::Result<mcompress_eval::weights::Weights> {
        let mut dense = BTreeMap::new();
        for name in names {
            let Some(r) = self.refs.get(name) else { continue };
            if let Some(v) = self.tensor(r).map_err(|e| mcompress_eval::Error::Model(e.to_string()))? {
                dense.insert(name.clone(), v);
            }
        }
        Ok(mcompress_eval::weights::Weights::from_dense(dense))
    }
}

/// Every float tensor of `model` as `passes` leave it, as f32, by name ([`Transformed::all`]):
/// the whole model in memory (what training takes).
///
/// # Errors
/// A pass that fails on a tensor, named.
pub fn transformed_f32(model: &ModelSource, passes: &[Box<dyn Pass>]) -> Result<DenseTensors> {
    Transformed::new(model, passes).all()
}

/// The model's config.json as the passes leave it (structured pruning shrinks sizes).
pub fn output_config(model: &ModelSource, passes: &[Box<dyn Pass>]) -> Option<Value> {
    let mut config = model.config().cloned()?;
    for p in passes {
        p.update_config(&mut config);
    }
    Some(config)
}

/// Group sizes (powers of two from 16, and 0 = per channel) that split `cols` into whole groups.
fn dividing_group_sizes(cols: usize) -> String {
    let mut v: Vec<String> =
        (4..=10).map(|e| 1usize << e).filter(|g| cols.is_multiple_of(*g)).map(|g| g.to_string()).collect();
    v.push("0 (one scale per output channel)".into());
    v.join(", ")
}

/// Checks the planned output against the layout rules every compressed-tensors runtime
/// enforces, before any calibration, training or streaming: a group size must divide a
/// quantized matrix's input columns (transformers and vLLM reject a short last group), and an
/// embedding tied to the output head is never quantized in place (runtimes look it up as the
/// head's weight). The first problem is returned, naming the pass and the tensor; what loads in
/// some runtimes but not others comes back as warnings.
pub fn check_plan(model: &ModelSource, passes: &[Box<dyn Pass>]) -> Result<Vec<String>> {
    let planned = plan(model, passes);
    // A decoder without its own output matrix reads the embedding as its head (arch's rule).
    let family = model.config().and_then(mcompress_core::arch::Family::of_config);
    let tied = model.config().is_some_and(mcompress_core::arch::ties_word_embeddings)
        || family.is_some_and(|f| {
            let head = f.hf(mcompress_core::arch::Role::Output, 0);
            !model.tensors().iter().any(|r| model.info(r).name == head)
        });
    for (r, changes) in model.tensors().iter().zip(&planned.changes) {
        let name = &model.info(r).name;
        let Some(ParamMeta::Quantized { scheme, shape, .. }) = planned.params.get(name) else { continue };
        let Some(&index) = changes.last() else { continue };
        let err = |reason: String| Error::Tensor { index, pass: passes[index].name(), tensor: name.clone(), reason };
        let cols: usize = shape[1..].iter().product();
        if !scheme.divides(cols) && scheme.is_fp4() {
            return Err(err(format!(
                "{} stores blocks of {} input columns and its {cols} input columns are not a multiple \
                 of {}: leave it out of `targets` or use quantize-rtn",
                scheme.label(),
                scheme.group_size,
                scheme.group_size
            )));
        }
        if !scheme.divides(cols) {
            return Err(err(format!(
                "group-size {} does not divide its {cols} input columns: compressed-tensors runtimes \
                 (transformers, vLLM) reject a short last group; group sizes that divide it: {}",
                scheme.group_size,
                dividing_group_sizes(cols)
            )));
        }
        if tied && mcompress_core::arch::is_embedding_name(name) {
            return Err(err("the input embedding is tied to the output head (tie_word_embeddings): runtimes cannot \
                 load it quantized in place; leave it out of `targets` (the default does)"
                .into()));
        }
    }
    let mut warnings = Vec::new();
    if planned.params.values().any(|m| matches!(m, ParamMeta::Quantized { scheme, .. } if !scheme.symmetric)) {
        warnings.push(
            "asymmetric schemes (zero points) load in vLLM, SGLang and compressed-tensors, but not in \
             transformers 5.25 with compressed-tensors 0.20.1 (its model expects unpacked zero points; \
             compressed-tensors' own asymmetric checkpoints fail the same way): use symmetric = true \
             for transformers"
                .to_string(),
        );
    }
    if planned
        .params
        .values()
        .any(|m| matches!(m, ParamMeta::Quantized { scheme, .. } if scheme.kind == crate::QKind::Int && !matches!(scheme.bits, 4 | 8)))
    {
        warnings.push(
            "3- and 2-bit integer weights load in transformers and compressed-tensors, but vLLM's \
             pack-quantized kernels take 4 and 8 bits only"
                .to_string(),
        );
    }
    Ok(warnings)
}
