//! Compression passes for mcompress.
//!
//! # Overview
//! A [`Pass`] rewrites the parameters its [`ParamSelector`] picks. Passes are data-free and
//! tensor-local here, which lets [`pipeline::run`] stream a model one tensor at a time: every
//! pass first *plans* its effect on each tensor's metadata (so the output file layout is known
//! before any data is produced), then *applies* itself to each tensor as it streams by.
//!
//! The registry [`PASSES`] is a static table: `mcompress passes` prints it, recipes look pass
//! types up in it, and `mcompress recipe schema` is generated from it.
//!
//! # Example
//! ```
//! let names: Vec<_> = mcompress_passes::PASSES.iter().map(|p| p.name).collect();
//! assert!(names.contains(&"quantize-rtn"));
//! ```
#![deny(missing_docs)]

pub mod calibrate;
pub mod cast;
pub mod distill;
pub mod pipeline;
pub mod prune;
pub mod quant;
mod select;

use std::fmt;

use mcompress_recipe::Recipe;

pub use mcompress_format::{Calibrated, DenseTensors, Param, ParamMeta, ResultKind, Results, sparse};
pub use quant::{Fp4Format, Fp8Strategy, QKind, QScheme, Quantized};
pub use select::ParamSelector;

/// Errors while running passes. Each names the pass and the tensor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A recipe problem found while building passes.
    #[error(transparent)]
    Recipe(#[from] mcompress_recipe::Error),
    /// Reading or writing tensors failed.
    #[error(transparent)]
    Core(#[from] mcompress_core::Error),
    /// An output writer (the GGUF export) could not take a tensor; the message names it.
    #[error("{0}")]
    Export(String),
    /// A pass could not process a tensor.
    #[error("pass[{index}] {pass}: tensor {tensor:?}: {reason}")]
    Tensor {
        /// Pass position in the recipe.
        index: usize,
        /// Pass type.
        pass: &'static str,
        /// Tensor name.
        tensor: String,
        /// What went wrong.
        reason: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a pass will do to one parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Not selected, or nothing to do.
    Keep,
    /// Rewritten into this.
    Change(ParamMeta),
    /// Selected explicitly by `targets` but not applicable; the reason goes into the report.
    Skip(String),
}

/// Result of applying a pass to one parameter.
#[derive(Debug)]
pub struct Applied<'a> {
    /// The new parameter.
    pub param: Param<'a>,
    /// Relative RMSE of the new values against the old (dequantized where quantized).
    pub rel_rmse: Option<f64>,
}

/// A compression pass. Implementations are built from a recipe by their [`PassInfo`].
pub trait Pass: fmt::Debug + Send + Sync {
    /// Registry key (kebab-case).
    fn name(&self) -> &'static str;
    /// Resolved settings, defaults filled in, for the manifest and report.
    fn settings(&self) -> serde_json::Value;
    /// Planned effect on one parameter. Must agree with [`Pass::apply`] on the resulting metadata.
    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan;
    /// Rewrites one parameter for which [`Pass::plan`] returned [`Plan::Change`].
    fn apply<'a>(&self, name: &str, param: Param<'a>) -> std::result::Result<Applied<'a>, String>;
    /// What the pass needs from the whole model before the weights stream. The runner computes
    /// it and hands it over with [`Pass::provide`].
    fn needs(&self) -> Need<'_> {
        Need::Nothing
    }
    /// Reads what the pass needs to know about the model before anything runs on it (geometry,
    /// units, whether the settings fit); cheap, and called for every pass before any statistic,
    /// calibration or training. Structured pruning without calibration chooses its units here.
    fn prepare(&mut self, _model: &mcompress_core::ModelSource) -> std::result::Result<(), PassError> {
        Ok(())
    }
    /// Receives what [`Pass::needs`] asked for, computed on `model` (the model as the passes
    /// before this one leave it).
    fn provide(&mut self, _model: &mcompress_core::ModelSource, what: Provided) -> std::result::Result<(), PassError> {
        Err(PassError::Provided(format!("asked for nothing, was given {}", what.kind())))
    }
    /// The whole layers this pass removed (structured pruning's `unit = "layers"`, after its
    /// [`Need::LayerScores`] were provided): every later step sees the renumbered model.
    fn layer_map(&self) -> Option<&prune::structured::LayerMap> {
        None
    }
    /// Whether the pass changes parameter shapes from what it reads of the model (structured
    /// pruning): the output layout is known, and checked, only after [`Pass::prepare`].
    fn reshapes(&self) -> bool {
        false
    }
    /// Whether the pass leaves exact zeros that later passes must keep zero (unstructured and
    /// N:M pruning; a later GPTQ keeps them at the zero point, a later distill does not train
    /// them).
    fn leaves_zeros(&self) -> bool {
        false
    }
    /// Edits the bundle's config.json for what the pass changed (structured pruning's sizes).
    fn update_config(&self, _config: &mut serde_json::Value) {}
    /// A caution about what this pass will do to `model`, for `mcompress run` to print,
    /// phrased to follow the pass's name (`prune-structured scores decoder units by …`).
    fn warning(&self, _model: &mcompress_core::ModelSource) -> Option<String> {
        None
    }
}

/// What a pass needs computed on the whole model before the weights stream ([`Pass::needs`]).
#[derive(Clone, Copy, Debug)]
pub enum Need<'a> {
    /// Nothing: the pass is tensor-local (RTN, FP8, FP4, cast, magnitude pruning).
    Nothing,
    /// Activation statistics: `E[x_c²]` of every input column of every linear layer on
    /// calibration text (structured pruning of neurons or heads), as [`Provided::Moments`],
    /// after [`Pass::prepare`] and before [`Pass::plan`].
    Moments(&'a quant::CalibrationConfig),
    /// Each block's influence on calibration text, `1 − E[cos(x_in, x_out)]` (structured
    /// pruning of whole layers), as [`Provided::LayerScores`]; the pass then answers
    /// [`Pass::layer_map`].
    LayerScores(&'a quant::CalibrationConfig),
    /// Each expert's router-weighted output norm and token count on calibration text
    /// (structured pruning of experts), as [`Provided::ExpertScores`]; the pass then answers
    /// [`Pass::layer_map`] (experts renumbered).
    ExpertScores(&'a quant::CalibrationConfig),
    /// A calibration on the runtime's block trace (GPTQ, AWQ, Wanda, SparseGPT), as
    /// [`Provided::Tensors`].
    Calibration(&'a Calibration),
    /// Training against a teacher (distill), as [`Provided::Trained`].
    Training(&'a distill::Distillation),
}

impl Need<'_> {
    /// Whether the need runs the model on text after every pass has prepared (calibration,
    /// training), as opposed to statistics read while preparing.
    pub fn runs_model(&self) -> bool {
        matches!(self, Need::Calibration(_) | Need::Training(_))
    }
}

/// What the runner hands a pass for its [`Need`].
#[derive(Debug)]
pub enum Provided {
    /// For [`Need::Moments`]: by weight name, one value per input column.
    Moments(std::collections::BTreeMap<String, Vec<f32>>),
    /// For [`Need::LayerScores`]: one score per block, in order.
    LayerScores(Vec<f64>),
    /// For [`Need::ExpertScores`]: per block, per expert, (score, tokens routed to it).
    ExpertScores(Vec<Vec<(f64, usize)>>),
    /// For [`Need::Calibration`]: what the calibration produced, by tensor name.
    Tensors(Results),
    /// For [`Need::Training`]: the trained tensors, and what the training measured (steps,
    /// losses, speed) for the report.
    Trained {
        /// Trained values ([`Calibrated::Dense`]), by tensor name.
        tensors: std::collections::BTreeMap<String, Calibrated>,
        /// Training figures for the report.
        outcome: serde_json::Value,
    },
}

impl Provided {
    /// What this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Provided::Moments(_) => "activation statistics",
            Provided::LayerScores(_) => "layer scores",
            Provided::ExpertScores(_) => "expert scores",
            Provided::Tensors(_) => "calibrated tensors",
            Provided::Trained { .. } => "trained tensors",
        }
    }
}

/// Why a pass cannot work on a model, before anything streams ([`Pass::prepare`],
/// [`Pass::provide`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PassError {
    /// The pass's settings do not fit this model (a sparsity that removes nothing, a head count
    /// transformers refuses); the message names the setting.
    #[error("{0}")]
    Settings(String),
    /// The model lacks what the pass works on (its family, geometry, a tensor of the expected
    /// shape); the message names the tensor or config key.
    #[error("{0}")]
    Model(String),
    /// What the runner provided does not match the model or the need.
    #[error("{0}")]
    Provided(String),
}

/// The calibrated result `provide` gave a pass for tensor `name` (read back from its file if it
/// went there), or why there is none: what [`Pass::apply`] of a calibrated pass starts from.
fn calibrated_result(results: Option<&Results>, name: &str) -> std::result::Result<Calibrated, String> {
    results
        .map(|r| r.get(name))
        .transpose()
        .map_err(|e| format!("reading its calibrated result back: {e}"))?
        .flatten()
        .ok_or_else(|| "no calibrated result: the calibration did not reach this tensor".into())
}

/// What a calibration computes.
#[derive(Clone, Copy, Debug)]
pub enum CalibrationMethod {
    /// GPTQ with these settings, to this scheme.
    Gptq(quant::GptqOptions, QScheme),
    /// AWQ with a grid of this many exponents, to this scheme.
    Awq {
        /// Grid points over α in [0, 1).
        grid: usize,
        /// Target scheme.
        scheme: QScheme,
    },
    /// Wanda pruning.
    Wanda(prune::Pattern),
    /// SparseGPT pruning.
    SparseGpt {
        /// Mask pattern.
        pattern: prune::Pattern,
        /// Settings.
        opts: prune::SparseGptOptions,
    },
}

/// A calibrated pass's request: calibration text and sampling, and what to compute.
#[derive(Clone, Debug)]
pub struct Calibration {
    /// Plain UTF-8 text (resolved path).
    pub set: std::path::PathBuf,
    /// Windows drawn from the text.
    pub samples: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Seed of the window choice.
    pub seed: u64,
    /// The method and its settings.
    pub method: CalibrationMethod,
}

/// Maturity of a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Settings and output are stable.
    Stable,
    /// May change.
    Preview,
}

/// Builds a pass from `recipe.passes[index]`.
pub type BuildFn = fn(&Recipe, usize) -> std::result::Result<Box<dyn Pass>, mcompress_recipe::Error>;

/// A registry entry.
pub struct PassInfo {
    /// Registry key, the recipe's `type`.
    pub name: &'static str,
    /// One line.
    pub summary: &'static str,
    /// Markdown: what it does, when to use it, config, example, references.
    pub docs: &'static str,
    /// Maturity.
    pub status: Status,
    /// Builds the pass from `recipe.passes[index]`.
    pub build: BuildFn,
    /// JSON schema of the config.
    pub schema: fn() -> schemars::Schema,
}

impl fmt::Debug for PassInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PassInfo").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Every pass, sorted by name.
pub static PASSES: &[PassInfo] = &[
    cast::INFO,
    distill::INFO,
    prune::MAGNITUDE_INFO,
    prune::SPARSEGPT_INFO,
    prune::structured::STRUCTURED_INFO,
    prune::WANDA_INFO,
    quant::AWQ_INFO,
    quant::FP4_INFO,
    quant::FP8_INFO,
    quant::GPTQ_INFO,
    quant::RTN_INFO,
];

/// Looks a pass up by name.
pub fn lookup(name: &str) -> Option<&'static PassInfo> {
    PASSES.iter().find(|p| p.name == name)
}

/// Builds every pass of a recipe. An unknown type lists the valid ones.
pub fn build_passes(recipe: &Recipe) -> std::result::Result<Vec<Box<dyn Pass>>, mcompress_recipe::Error> {
    recipe
        .passes
        .iter()
        .map(|spec| {
            if let Some(info) = lookup(&spec.kind) {
                (info.build)(recipe, spec.index)
            } else {
                let valid: Vec<&str> = PASSES.iter().map(|p| p.name).collect();
                Err(recipe.pass_error(
                    spec.index,
                    format!("unknown pass type {:?}; valid types: {}", spec.kind, valid.join(", ")),
                ))
            }
        })
        .collect()
}

/// The recipe JSON schema with every registered pass's config.
pub fn recipe_schema() -> serde_json::Value {
    let passes: Vec<_> = PASSES.iter().map(|p| (p.name, p.summary, (p.schema)())).collect();
    mcompress_recipe::json_schema(&passes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_registry_sorted_and_unique() {
        let names: Vec<_> = PASSES.iter().map(|p| p.name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
    }

    #[test]
    fn test_unknown_pass_lists_valid_names() {
        let src = "[model]\npath = \"m\"\n[[pass]]\ntype = \"quantize-rtm\"\n";
        let r = Recipe::parse("r.toml".as_ref(), src.into()).unwrap();
        let e = build_passes(&r).unwrap_err().to_string();
        assert_eq!(
            e,
            "r.toml:3:1: pass[0] quantize-rtm: unknown pass type \"quantize-rtm\"; valid types: cast, distill, prune-magnitude, prune-sparsegpt, prune-structured, prune-wanda, quantize-awq, quantize-fp4, quantize-fp8, quantize-gptq, quantize-rtn"
        );
    }

    #[test]
    fn test_schema_lists_passes() {
        let s = recipe_schema();
        let one_of = s["properties"]["pass"]["items"]["oneOf"].as_array().unwrap();
        assert_eq!(one_of.len(), PASSES.len());
        assert_eq!(one_of[10]["properties"]["type"]["const"], "quantize-rtn");
        assert!(one_of[10]["properties"]["bits"].is_object());
        assert_eq!(one_of[9]["properties"]["type"]["const"], "quantize-gptq");
        assert!(one_of[9]["properties"]["calibration"].is_object());
        assert_eq!(one_of[8]["properties"]["type"]["const"], "quantize-fp8");
        assert!(one_of[8]["properties"]["strategy"].is_object());
        assert_eq!(one_of[7]["properties"]["type"]["const"], "quantize-fp4");
        assert!(one_of[7]["properties"]["format"].is_object());
        assert_eq!(one_of[3]["properties"]["type"]["const"], "prune-sparsegpt");
        assert!(one_of[3]["properties"]["storage"].is_object());
        assert_eq!(one_of[1]["properties"]["type"]["const"], "distill");
        assert!(one_of[1]["properties"]["hidden-weight"].is_object());
    }
}
