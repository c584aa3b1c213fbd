//! Quantization passes.

pub mod gptq;
pub mod load;
pub mod rtn;
pub mod scheme;

use mcompress_recipe::Recipe;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use gptq::{GptqOptions, gptq};
pub use load::{load_quantized, schemes_from_config};
pub use rtn::{QuantError, Quantized, quantize, quantize_ref};
pub use scheme::QScheme;

use crate::{Applied, Calibration, Param, ParamMeta, ParamSelector, Pass, PassInfo, Plan, Status};

/// `quantize-rtn` settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RtnConfig {
    /// Bits per weight: 8, 4, 3 or 2.
    pub bits: u8,
    /// 0: one scale per output channel (row). N: one scale per N consecutive input columns.
    #[serde(default)]
    pub group_size: usize,
    /// Symmetric (zero point 0) or asymmetric (per-group zero point).
    #[serde(default = "yes")]
    pub symmetric: bool,
    /// Tensors to quantize: globs or `re:` regexes over full names. Default: every float tensor
    /// of rank ≥ 2 whose name ends in `weight`.
    pub targets: Option<Vec<String>>,
    /// Tensors to leave alone, same syntax.
    #[serde(default)]
    pub ignore: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Round-to-nearest integer quantization.
#[derive(Debug)]
pub struct Rtn {
    config: RtnConfig,
    scheme: QScheme,
    selector: ParamSelector,
}

impl Rtn {
    /// Validates a config.
    pub fn new(config: RtnConfig) -> Result<Self, String> {
        if !QScheme::BITS.contains(&config.bits) {
            return Err(format!("bits = {}: supported values are 8, 4, 3 and 2", config.bits));
        }
        let selector = ParamSelector::new(config.targets.as_deref(), &config.ignore)?;
        let scheme = QScheme { bits: config.bits, group_size: config.group_size, symmetric: config.symmetric };
        Ok(Self { config, scheme, selector })
    }
}

fn build_rtn(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let config: RtnConfig = recipe.pass_config(index)?;
    Rtn::new(config).map(|p| Box::new(p) as Box<dyn Pass>).map_err(|e| recipe.pass_error(index, e))
}

/// Registry entry of `quantize-rtn`.
pub const RTN_INFO: PassInfo = PassInfo {
    name: "quantize-rtn",
    summary: "Round-to-nearest integer quantization (int8/4/3/2; per-channel or grouped; symmetric or asymmetric)",
    docs: include_str!("rtn.md"),
    status: Status::Stable,
    build: build_rtn,
    schema: || schemars::schema_for!(RtnConfig),
};

impl Pass for Rtn {
    fn name(&self) -> &'static str {
        RTN_INFO.name
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("config is JSON")
    }

    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan {
        let ParamMeta::Dense { dtype, shape } = meta else {
            return if self.selector.select(name, false) == Some(true) {
                Plan::Skip("already quantized".into())
            } else {
                Plan::Keep
            };
        };
        let eligible = dtype.is_float() && shape.len() >= 2 && shape.iter().all(|&d| d > 0);
        let default = eligible && name.ends_with("weight");
        match self.selector.select(name, default) {
            None => Plan::Keep,
            Some(_) if eligible => Plan::Change(ParamMeta::Quantized {
                scheme: self.scheme,
                shape: shape.clone(),
                scale_dtype: scheme::scale_dtype(*dtype),
            }),
            Some(_) => Plan::Skip(if dtype.is_float() {
                format!("rank {} tensor {shape:?}: only matrices are quantized", shape.len())
            } else {
                format!("dtype {dtype} is not a float type")
            }),
        }
    }

    fn apply<'a>(&self, _name: &str, param: Param<'a>) -> Result<Applied<'a>, String> {
        let Param::Dense { dtype, shape, data } = param else {
            return Err("already quantized".into());
        };
        let q = quantize(&self.scheme, dtype, &shape, &data).map_err(|e| match e {
            QuantError::NonFinite { row } => format!("row {row} contains NaN or infinity"),
            QuantError::BadInput(m) => m,
        })?;
        let rel = q.rel_rmse();
        Ok(Applied { param: Param::Quantized(q), rel_rmse: Some(rel) })
    }
}

/// `calibration = { … }` of a calibrated pass.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CalibrationConfig {
    /// Plain UTF-8 text, relative to the recipe (`${VAR}` expanded).
    pub set: std::path::PathBuf,
    /// Token windows drawn from the text (default 128).
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Tokens per window (default 512).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Seed of the window choice (default 0): same seed, same windows, same bundle.
    #[serde(default)]
    pub seed: u64,
}

fn default_samples() -> usize {
    128
}

fn default_seq_len() -> usize {
    512
}

/// `quantize-gptq` settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GptqConfig {
    /// Bits per weight: 8, 4, 3 or 2.
    pub bits: u8,
    /// 0: one scale per output channel. N: one scale per N consecutive input columns.
    #[serde(default)]
    pub group_size: usize,
    /// Symmetric (zero point 0) or asymmetric (per-group zero point).
    #[serde(default = "yes")]
    pub symmetric: bool,
    /// Quantize input columns in order of decreasing activation energy.
    #[serde(default)]
    pub act_order: bool,
    /// Hessian dampening relative to its mean diagonal (default 0.01).
    #[serde(default = "default_dampening")]
    pub dampening: f64,
    /// Columns per block of lazy updates (default 128).
    #[serde(default = "default_block")]
    pub block_size: usize,
    /// Calibration text and sampling.
    pub calibration: CalibrationConfig,
    /// Tensors to quantize (default: float tensors of rank ≥ 2 named `*weight`; only linear
    /// layers the eval runtime runs can be calibrated).
    pub targets: Option<Vec<String>>,
    /// Tensors to leave alone.
    #[serde(default)]
    pub ignore: Vec<String>,
}

fn default_dampening() -> f64 {
    0.01
}

fn default_block() -> usize {
    128
}

/// GPTQ: error-compensating quantization against calibration activations.
#[derive(Debug)]
pub struct Gptq {
    config: GptqConfig,
    rtn: Rtn,
    calibration: Calibration,
    results: std::sync::Mutex<std::collections::BTreeMap<String, Quantized>>,
    /// Names the calibration quantized (set by [`Pass::provide`]); selected tensors outside it
    /// are skipped with a reason instead of failing.
    calibrated: std::sync::Mutex<Option<std::collections::BTreeSet<String>>>,
}

fn build_gptq(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let mut config: GptqConfig = recipe.pass_config(index)?;
    let err = |m: String| recipe.pass_error(index, m);
    if !(0.0..1.0e3).contains(&config.dampening) {
        return Err(err(format!("dampening = {}: must be ≥ 0", config.dampening)));
    }
    if config.calibration.samples == 0 {
        return Err(err("calibration.samples must be at least 1".into()));
    }
    if config.calibration.seq_len < 2 {
        return Err(err("calibration.seq-len must be at least 2 tokens".into()));
    }
    config.calibration.set = recipe.pass_path(index, &config.calibration.set, "calibration.set")?;
    let rtn = Rtn::new(RtnConfig {
        bits: config.bits,
        group_size: config.group_size,
        symmetric: config.symmetric,
        targets: config.targets.clone(),
        ignore: config.ignore.clone(),
    })
    .map_err(err)?;
    let calibration = Calibration {
        set: config.calibration.set.clone(),
        samples: config.calibration.samples,
        seq_len: config.calibration.seq_len,
        seed: config.calibration.seed,
        scheme: rtn.scheme,
        gptq: GptqOptions {
            dampening: config.dampening,
            block_size: config.block_size.max(1),
            act_order: config.act_order,
        },
    };
    Ok(Box::new(Gptq {
        config,
        rtn,
        calibration,
        results: std::sync::Mutex::default(),
        calibrated: std::sync::Mutex::default(),
    }))
}

/// Registry entry of `quantize-gptq`.
pub const GPTQ_INFO: PassInfo = PassInfo {
    name: "quantize-gptq",
    summary: "GPTQ: int8/4/3/2 with error compensation from calibration activations (llama models)",
    docs: include_str!("gptq.md"),
    status: Status::Preview,
    build: build_gptq,
    schema: || schemars::schema_for!(GptqConfig),
};

impl Pass for Gptq {
    fn name(&self) -> &'static str {
        GPTQ_INFO.name
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("config is JSON")
    }

    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan {
        let plan = self.rtn.plan(name, meta);
        let calibrated = self.calibrated.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (&plan, calibrated.as_ref()) {
            (Plan::Change(_), Some(done)) if !done.contains(name) => Plan::Skip(
                "not a linear layer of a llama block (GPTQ calibrates those; use quantize-rtn for the rest)".into(),
            ),
            _ => plan,
        }
    }

    fn apply<'a>(&self, name: &str, param: Param<'a>) -> Result<Applied<'a>, String> {
        let Param::Dense { .. } = param else {
            return Err("already quantized".into());
        };
        let q = self
            .results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name)
            .ok_or("no calibrated result: the calibration did not reach this tensor (only linear layers of the llama blocks are calibrated; ignore it or quantize it with quantize-rtn)")?;
        let rel = q.rel_rmse();
        Ok(Applied { param: Param::Quantized(q), rel_rmse: Some(rel) })
    }

    fn calibration(&self) -> Option<&Calibration> {
        Some(&self.calibration)
    }

    fn provide(&self, results: std::collections::BTreeMap<String, Quantized>) {
        *self.calibrated.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(results.keys().cloned().collect());
        *self.results.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = results;
    }
}
