//! `distill`: trains the model as the recipe's earlier passes leave it (the student) against the
//! model before the pipeline, or a named model (the teacher). The training itself lives in
//! `mcompress-distill` (burn autodiff on CPU or wgpu); this pass carries the settings, selects the
//! trained tensors, and writes what the training produced while the weights stream, in the form
//! the tensor arrived in (a sparse-bitmask matrix stays sparse with the same mask).

use std::collections::BTreeMap;
use std::path::PathBuf;

use mcompress_core::arch;
use mcompress_recipe::Recipe;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::select::ParamSelector;
use crate::{Applied, Calibrated, Need, Param, ParamMeta, Pass, PassError, PassInfo, Plan, Provided, Status};

/// `distill` settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DistillConfig {
    /// Training set, relative to the recipe: plain text (llama: token windows), one sentence per
    /// line (BERT), or a labelled CSV whose features are used (MLP; labels are ignored).
    pub set: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// AdamW learning rate (default 1e-4), constant after `warmup` linear warm-up steps.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Warm-up steps (default 0).
    #[serde(default)]
    pub warmup: usize,
    /// AdamW decoupled weight decay (default 0).
    #[serde(default)]
    pub weight_decay: f64,
    /// Samples per step: token windows, sentences or rows (default 8).
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Tokens per window (llama) or at most per sentence (BERT) (default 128).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Softmax temperature of the logit KL (default 2.0; the loss is scaled by T²).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight of the last hidden state's mean squared error added to the loss (default 0; llama
    /// and BERT). BERT has no logits: its loss is 1 − cosine of the pooled sentence embeddings
    /// plus this term.
    #[serde(default)]
    pub hidden_weight: f64,
    /// Seed of the batch order: the same seed gives the same batches, so the same student.
    #[serde(default)]
    pub seed: u64,
    /// `"cpu"` (default; deterministic) or `"wgpu"` (a GPU through Vulkan/Metal/DX12).
    #[serde(default = "default_device")]
    pub device: String,
    /// Write a checkpoint every N steps (default 50; 0 = never). `mcompress run --resume`
    /// continues from the last one.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// Where checkpoints go, relative to the recipe (default: `.distill-pass<N>` in the output
    /// directory).
    pub checkpoint_dir: Option<PathBuf>,
    /// Teacher model (directory, safetensors or GGUF), relative to the recipe; default: the
    /// recipe's model before any pass.
    pub teacher: Option<PathBuf>,
    /// Tensors to train (default: every float matrix and bias except embeddings and the output
    /// head; norms stay frozen).
    pub targets: Option<Vec<String>>,
    /// Tensors to keep frozen.
    #[serde(default)]
    pub ignore: Vec<String>,
}

/// `format` of a distill checkpoint's `checkpoint.json`.
pub const CHECKPOINT_FORMAT: &str = "mcompress-distill-checkpoint/1";
/// The files of a distill checkpoint directory.
pub const CHECKPOINT_FILES: [&str; 2] = ["checkpoint.json", "state.safetensors"];

/// Why `dir` cannot hold a distill pass's checkpoints, or `None` when it can: it is absent, an
/// empty directory, or a checkpoint this tool wrote. Checkpoints replace the directory's contents
/// and are removed when the bundle is done, so anything else there would be lost.
pub fn checkpoint_dir_problem(dir: &std::path::Path) -> Option<String> {
    if let Some(problem) =
        mcompress_core::fsutil::own_dir_problem(dir, "distill checkpoint", |n| CHECKPOINT_FILES.contains(&n))
    {
        return Some(problem);
    }
    let json = dir.join(CHECKPOINT_FILES[0]);
    if json.exists() {
        let ok = mcompress_core::fsutil::read_regular(&json, 1 << 20)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["format"] == CHECKPOINT_FORMAT);
        if !ok {
            return Some(format!("{} is not an mcompress distill checkpoint ({CHECKPOINT_FORMAT})", json.display()));
        }
    }
    None
}

fn default_lr() -> f64 {
    1e-4
}
fn default_batch() -> usize {
    8
}
fn default_seq_len() -> usize {
    128
}
fn default_temperature() -> f64 {
    2.0
}
fn default_device() -> String {
    "cpu".into()
}
fn default_checkpoint_every() -> usize {
    50
}

/// Where the training runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainDevice {
    /// burn's pure-Rust CPU backend (flex); bit-reproducible for a given seed.
    Cpu,
    /// burn's wgpu backend.
    Wgpu,
}

/// What a distillation pass asks the bundle runner to train.
#[derive(Clone, Debug)]
pub struct Distillation {
    /// Resolved settings (paths resolved against the recipe).
    pub config: DistillConfig,
    /// Parsed `device`.
    pub device: TrainDevice,
    /// Index of the pass in the recipe (names the default checkpoint directory).
    pub index: usize,
}

/// `distill`.
#[derive(Debug)]
pub struct Distill {
    settings: serde_json::Value,
    distillation: Distillation,
    selector: ParamSelector,
    /// Trained values by tensor name, and the training's figures; empty until provided.
    results: BTreeMap<String, Vec<f32>>,
    outcome: Option<serde_json::Value>,
}

impl Distill {
    /// Whether the training updates `name` (a float tensor of `shape`).
    pub fn trains(&self, name: &str, shape: &[usize]) -> bool {
        let matrix = shape.len() == 2 && !arch::is_embedding_name(name) && !arch::is_output_head_name(name);
        let bias = shape.len() == 1 && name.rsplit('.').next() == Some("bias") && !arch::is_norm_name(name);
        self.selector.select(name, matrix || bias).is_some() && shape.iter().all(|&d| d > 0)
    }
}

impl Pass for Distill {
    fn name(&self) -> &'static str {
        INFO.name
    }

    fn settings(&self) -> serde_json::Value {
        let mut s = self.settings.clone();
        if let (Some(obj), Some(o)) = (s.as_object_mut(), self.outcome.clone()) {
            obj.insert("trained".into(), o);
        }
        s
    }

    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan {
        match meta {
            ParamMeta::Dense { dtype, shape } | ParamMeta::Sparse { dtype, shape, .. }
                if dtype.is_float() && self.trains(name, shape) =>
            {
                Plan::Change(meta.clone())
            }
            ParamMeta::Quantized { .. } if self.selector.select(name, false) == Some(true) => {
                Plan::Skip("already quantized: distil before quantizing".into())
            }
            _ => Plan::Keep,
        }
    }

    fn apply<'a>(&self, name: &str, param: Param<'a>) -> Result<Applied<'a>, String> {
        // Kept (not taken): a later calibrated or training pass replays this pass on the whole
        // model (`pipeline::transformed_f32`) before the weights stream.
        let values =
            self.results.get(name).cloned().ok_or("no trained values: the distillation did not reach this tensor")?;
        let (dtype, shape, before) = param.dense_f32().ok_or("not a float tensor")?;
        if values.len() != before.len() {
            return Err(format!("trained {} values for {} weights", values.len(), before.len()));
        }
        let rel_rmse = Some(crate::prune::stat(&before, &values));
        let param = match param {
            Param::Sparse(t) => {
                let keep = t.keep();
                crate::sparse::SparseTensor::from_dense(dtype, shape[0], shape[1], &values, &keep)
                    .map(Param::Sparse)
                    .ok_or_else(|| format!("cannot store {dtype} values sparse"))?
            }
            _ => Param::Dense {
                dtype,
                data: dtype.encode_f32(&values).ok_or_else(|| format!("cannot encode {dtype}"))?.into(),
                shape,
            },
        };
        Ok(Applied { param, rel_rmse })
    }

    fn needs(&self) -> Need<'_> {
        Need::Training(&self.distillation)
    }

    fn provide(&mut self, _model: &mcompress_core::ModelSource, what: Provided) -> Result<(), PassError> {
        let Provided::Trained { tensors, outcome } = what else {
            return Err(PassError::Provided(format!("needs trained tensors, was given {}", what.kind())));
        };
        for (k, v) in tensors {
            match v {
                Calibrated::Dense(v) => {
                    self.results.insert(k, v);
                }
                _ => return Err(PassError::Provided(format!("{k}: trained values must be dense"))),
            }
        }
        self.outcome = Some(outcome);
        Ok(())
    }
}

fn build(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let mut config: DistillConfig = recipe.pass_config(index)?;
    let err = |e: String| recipe.pass_error(index, e);
    if config.steps == 0 {
        return Err(err("steps must be at least 1".into()));
    }
    if config.batch == 0 {
        return Err(err("batch must be at least 1".into()));
    }
    if config.seq_len < 2 {
        return Err(err("seq-len must be at least 2 tokens".into()));
    }
    if !(config.lr.is_finite() && config.lr > 0.0 && config.lr < 1.0) {
        return Err(err(format!("lr = {}: must be in (0, 1)", config.lr)));
    }
    if !(config.temperature.is_finite() && config.temperature > 0.0) {
        return Err(err(format!("temperature = {}: must be > 0", config.temperature)));
    }
    if !(config.hidden_weight.is_finite() && config.hidden_weight >= 0.0) {
        return Err(err(format!("hidden-weight = {}: must be ≥ 0", config.hidden_weight)));
    }
    if !(config.weight_decay.is_finite() && (0.0..1.0).contains(&config.weight_decay)) {
        return Err(err(format!("weight-decay = {}: must be in [0, 1)", config.weight_decay)));
    }
    let device = match config.device.as_str() {
        "cpu" => TrainDevice::Cpu,
        "wgpu" => TrainDevice::Wgpu,
        other => return Err(err(format!("device = {other:?}: expected \"cpu\" or \"wgpu\""))),
    };
    config.set = recipe.pass_path(index, &config.set, "set")?;
    if !config.set.is_file() {
        return Err(err(format!("set: {}: no such file (the training set)", config.set.display())));
    }
    if let Some(t) = &config.teacher {
        let t = recipe.pass_path(index, t, "teacher")?;
        if !t.exists() {
            return Err(err(format!("teacher: {}: no such file or directory", t.display())));
        }
        config.teacher = Some(t);
    }
    if let Some(d) = &config.checkpoint_dir {
        let d = recipe.pass_path(index, d, "checkpoint-dir")?;
        if let Some(problem) = checkpoint_dir_problem(&d) {
            return Err(err(format!("checkpoint-dir: {}: {problem}", d.display())));
        }
        config.checkpoint_dir = Some(d);
    }
    let selector = ParamSelector::new(config.targets.as_deref(), &config.ignore).map_err(err)?;
    let settings = serde_json::to_value(&config).expect("config is JSON");
    Ok(Box::new(Distill {
        settings,
        distillation: Distillation { config, device, index },
        selector,
        results: BTreeMap::new(),
        outcome: None,
    }))
}

/// Registry entry of `distill`.
pub const INFO: PassInfo = PassInfo {
    name: "distill",
    summary: "Train the compressed model against its teacher (logit KL, hidden MSE) with burn autodiff, masks kept",
    docs: include_str!("distill.md"),
    status: Status::Preview,
    build,
    schema: || schemars::schema_for!(DistillConfig),
};
