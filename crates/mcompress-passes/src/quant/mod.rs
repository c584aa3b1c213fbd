//! Quantization passes.

pub mod awq;
pub mod gptq;

use mcompress_recipe::Recipe;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use gptq::{GptqOptions, gptq};
pub use mcompress_format::quant::{
    Fp4Format, Fp8Strategy, QKind, QScheme, QuantError, Quantized, fp4, fp8, load, load_quantized, quantize,
    quantize_ref, rtn, scheme, schemes_from_config,
};

use mcompress_core::ModelSource;

use crate::{
    Applied, Calibrated, Calibration, CalibrationMethod, Need, Param, ParamMeta, ParamSelector, Pass, PassError,
    PassInfo, Plan, Provided, Status,
};

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
    /// of rank ≥ 2 whose name ends in `weight`, except embeddings and mixture-of-experts routers.
    pub targets: Option<Vec<String>>,
    /// Tensors to leave alone, same syntax.
    #[serde(default)]
    pub ignore: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Round-to-nearest quantization: integers (`quantize-rtn`) or FP8 (`quantize-fp8`).
#[derive(Debug)]
pub struct Rtn {
    info: &'static PassInfo,
    settings: serde_json::Value,
    scheme: QScheme,
    selector: ParamSelector,
}

impl Rtn {
    /// Validates a config.
    pub fn new(config: &RtnConfig) -> Result<Self, String> {
        if !QScheme::BITS.contains(&config.bits) {
            return Err(format!("bits = {}: supported values are 8, 4, 3 and 2", config.bits));
        }
        let selector = ParamSelector::new(config.targets.as_deref(), &config.ignore)?;
        let scheme = QScheme::int(config.bits, config.group_size, config.symmetric);
        let settings = serde_json::to_value(config).expect("config is JSON");
        Ok(Self { info: &RTN_INFO, settings, scheme, selector })
    }

    /// Validates an FP8 config.
    pub fn fp8(config: &Fp8Config) -> Result<Self, String> {
        let selector = ParamSelector::new(config.targets.as_deref(), &config.ignore)?;
        let strategy = match config.strategy.as_str() {
            "tensor" => Fp8Strategy::Tensor,
            "channel" => Fp8Strategy::Channel,
            "block" => Fp8Strategy::Block,
            s => return Err(format!("strategy = {s:?}: supported values are \"channel\", \"tensor\" and \"block\"")),
        };
        let dynamic_act = match config.activations.as_str() {
            "dynamic" => true,
            "none" => false,
            a => return Err(format!("activations = {a:?}: supported values are \"dynamic\" (W8A8) and \"none\"")),
        };
        let settings = serde_json::to_value(config).expect("config is JSON");
        Ok(Self { info: &FP8_INFO, settings, scheme: QScheme::fp8(strategy, dynamic_act), selector })
    }
}

/// `quantize-fp8` settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Fp8Config {
    /// Weight scales: `"channel"` (default, one per output channel), `"tensor"` (one per matrix)
    /// or `"block"` (one per 128 × 128 block).
    #[serde(default = "default_fp8_strategy")]
    pub strategy: String,
    /// `"dynamic"` (default): W8A8, activations quantized to FP8 per token at run time (the
    /// FP8_DYNAMIC scheme vLLM serves on H100/H200/MI300); `"none"`: weight-only FP8.
    #[serde(default = "default_fp8_activations")]
    pub activations: String,
    /// Tensors to quantize (default: float matrices named `*weight`, except embeddings and
    /// mixture-of-experts routers).
    pub targets: Option<Vec<String>>,
    /// Tensors to leave alone.
    #[serde(default)]
    pub ignore: Vec<String>,
}

fn default_fp8_strategy() -> String {
    "channel".into()
}

fn default_fp8_activations() -> String {
    "dynamic".into()
}

fn build_fp8(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let config: Fp8Config = recipe.pass_config(index)?;
    Rtn::fp8(&config).map(|p| Box::new(p) as Box<dyn Pass>).map_err(|e| recipe.pass_error(index, e))
}

/// Registry entry of `quantize-fp8`.
pub const FP8_INFO: PassInfo = PassInfo {
    name: "quantize-fp8",
    summary: "FP8 E4M3 weights per channel, tensor or 128x128 block; W8A8 with dynamic per-token activations or weight-only",
    docs: include_str!("fp8.md"),
    status: Status::Preview,
    build: build_fp8,
    schema: || schemars::schema_for!(Fp8Config),
};

/// `quantize-fp4` settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Fp4Config {
    /// `"nvfp4"` (default: groups of 16, FP8 scales under a per-tensor global scale) or `"mxfp4"`
    /// (groups of 32, power-of-two scales).
    #[serde(default = "default_fp4_format")]
    pub format: String,
    /// Tensors to quantize (default: float matrices named `*weight`, except embeddings and
    /// mixture-of-experts routers).
    pub targets: Option<Vec<String>>,
    /// Tensors to leave alone.
    #[serde(default)]
    pub ignore: Vec<String>,
}

fn default_fp4_format() -> String {
    "nvfp4".into()
}

impl Rtn {
    /// Validates an FP4 config.
    pub fn fp4(config: &Fp4Config) -> Result<Self, String> {
        let selector = ParamSelector::new(config.targets.as_deref(), &config.ignore)?;
        let format = match config.format.as_str() {
            "nvfp4" => Fp4Format::Nv,
            "mxfp4" => Fp4Format::Mx,
            f => return Err(format!("format = {f:?}: supported values are \"nvfp4\" and \"mxfp4\"")),
        };
        let settings = serde_json::to_value(config).expect("config is JSON");
        Ok(Self { info: &FP4_INFO, settings, scheme: QScheme::fp4(format), selector })
    }
}

fn build_fp4(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let config: Fp4Config = recipe.pass_config(index)?;
    Rtn::fp4(&config).map(|p| Box::new(p) as Box<dyn Pass>).map_err(|e| recipe.pass_error(index, e))
}

/// Registry entry of `quantize-fp4`.
pub const FP4_INFO: PassInfo = PassInfo {
    name: "quantize-fp4",
    summary: "FP4 E2M1 weights: NVFP4 (groups of 16, FP8 scales, global scale) or MXFP4 (groups of 32, E8M0 scales)",
    docs: include_str!("fp4.md"),
    status: Status::Preview,
    build: build_fp4,
    schema: || schemars::schema_for!(Fp4Config),
};

fn build_rtn(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let config: RtnConfig = recipe.pass_config(index)?;
    Rtn::new(&config).map(|p| Box::new(p) as Box<dyn Pass>).map_err(|e| recipe.pass_error(index, e))
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
        self.info.name
    }

    fn settings(&self) -> serde_json::Value {
        self.settings.clone()
    }

    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan {
        // A pruned (sparse-bitmask) matrix is quantized like a dense one: its zeros become codes.
        let (ParamMeta::Dense { dtype, shape } | ParamMeta::Sparse { dtype, shape, .. }) = meta else {
            return if self.selector.select(name, false) == Some(true) {
                Plan::Skip("already quantized".into())
            } else {
                Plan::Keep
            };
        };
        let eligible = dtype.is_float() && shape.len() >= 2 && shape.iter().all(|&d| d > 0);
        let default = eligible
            && name.ends_with("weight")
            && !mcompress_core::arch::is_embedding_name(name)
            && !mcompress_core::arch::is_router_name(name);
        match self.selector.select(name, default) {
            None => Plan::Keep,
            Some(_) if eligible => Plan::Change(ParamMeta::Quantized {
                scheme: self.scheme,
                shape: shape.clone(),
                scale_dtype: self.scheme.scale_dtype_for(*dtype),
            }),
            Some(_) => Plan::Skip(if dtype.is_float() {
                format!("rank {} tensor {shape:?}: only matrices are quantized", shape.len())
            } else {
                format!("dtype {dtype} is not a float type")
            }),
        }
    }

    fn apply<'a>(&self, _name: &str, param: Param<'a>) -> Result<Applied<'a>, String> {
        let param = match param {
            Param::Sparse(t) => {
                let data = t.dtype.encode_f32(&t.to_dense()).ok_or("not a float tensor")?;
                Param::Dense { dtype: t.dtype, shape: t.shape, data: data.into() }
            }
            other => other,
        };
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
    /// `"int"` (default: integers of `bits` bits), `"fp8"` (E4M3 with `strategy` scales and
    /// `activations`, as `quantize-fp8`), `"nvfp4"` or `"mxfp4"` (as `quantize-fp4`): the grid
    /// GPTQ rounds to; the scales are those round-to-nearest would choose.
    #[serde(default = "default_gptq_format")]
    pub format: String,
    /// Bits per weight for `format = "int"`: 8, 4, 3 or 2.
    pub bits: Option<u8>,
    /// FP8 scales: `"channel"` (default), `"tensor"` or `"block"`.
    pub strategy: Option<String>,
    /// FP8 activations: `"dynamic"` (default, W8A8) or `"none"`.
    pub activations: Option<String>,
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
    /// Tensors to quantize (default: float tensors of rank ≥ 2 named `*weight` but routers; only linear
    /// layers the eval runtime runs can be calibrated).
    pub targets: Option<Vec<String>>,
    /// Tensors to leave alone.
    #[serde(default)]
    pub ignore: Vec<String>,
}

fn default_gptq_format() -> String {
    "int".into()
}

fn default_dampening() -> f64 {
    0.01
}

fn default_block() -> usize {
    128
}

/// `quantize-awq` settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AwqConfig {
    /// Bits per weight: 8, 4, 3 or 2.
    pub bits: u8,
    /// 0: one scale per output channel. N: one scale per N consecutive input columns.
    #[serde(default)]
    pub group_size: usize,
    /// Symmetric (zero point 0) or asymmetric (per-group zero point; AWQ's usual choice).
    #[serde(default = "yes")]
    pub symmetric: bool,
    /// Points of the grid over the exponent α in [0, 1) (default 20).
    #[serde(default = "default_grid")]
    pub grid: usize,
    /// Calibration text and sampling.
    pub calibration: CalibrationConfig,
    /// Tensors to quantize (default: float tensors of rank ≥ 2 named `*weight` but routers; only linear
    /// layers the eval runtime runs can be calibrated).
    pub targets: Option<Vec<String>>,
    /// Tensors to leave alone.
    #[serde(default)]
    pub ignore: Vec<String>,
}

fn default_grid() -> usize {
    20
}

/// A calibrated quantization pass (GPTQ, AWQ): selection and layout as RTN, results computed
/// by the eval runtime's calibration before streaming and handed over with [`Pass::provide`].
#[derive(Debug)]
pub struct CalibratedQuant {
    info: &'static PassInfo,
    settings: serde_json::Value,
    rtn: Rtn,
    calibration: Calibration,
    /// What the calibration produced, by name (quantized matrices; rewritten dense weights such
    /// as a norm with AWQ's scales folded in); `None` until provided. Selected tensors outside
    /// it are skipped with a reason instead of failing.
    results: Option<crate::Results>,
}

/// Validates the shared calibration settings and resolves the set's path.
pub(crate) fn calibration_config(
    recipe: &Recipe,
    index: usize,
    mut c: CalibrationConfig,
) -> Result<CalibrationConfig, mcompress_recipe::Error> {
    if c.samples == 0 {
        return Err(recipe.pass_error(index, "calibration.samples must be at least 1"));
    }
    if c.seq_len < 2 {
        return Err(recipe.pass_error(index, "calibration.seq-len must be at least 2 tokens"));
    }
    c.set = recipe.pass_path(index, &c.set, "calibration.set")?;
    Ok(c)
}

fn build_calibrated(
    recipe: &Recipe,
    index: usize,
    info: &'static PassInfo,
    settings: serde_json::Value,
    rtn: &RtnConfig,
    c: &CalibrationConfig,
    method: impl FnOnce(QScheme) -> CalibrationMethod,
) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let rtn = Rtn::new(rtn).map_err(|e| recipe.pass_error(index, e))?;
    Ok(build_calibrated_with(info, settings, rtn, c, method))
}

fn build_calibrated_with(
    info: &'static PassInfo,
    settings: serde_json::Value,
    rtn: Rtn,
    c: &CalibrationConfig,
    method: impl FnOnce(QScheme) -> CalibrationMethod,
) -> Box<dyn Pass> {
    let calibration = Calibration {
        set: c.set.clone(),
        samples: c.samples,
        seq_len: c.seq_len,
        seed: c.seed,
        method: method(rtn.scheme),
    };
    Box::new(CalibratedQuant { info, settings, rtn, calibration, results: None })
}

fn build_gptq(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let mut config: GptqConfig = recipe.pass_config(index)?;
    if !(0.0..1.0e3).contains(&config.dampening) {
        return Err(recipe.pass_error(index, format!("dampening = {}: must be ≥ 0", config.dampening)));
    }
    config.calibration = calibration_config(recipe, index, config.calibration)?;
    let err = |e: String| recipe.pass_error(index, e);
    let float_only = |what: &str, set: bool| {
        if set && config.format != "fp8" {
            Err(err(format!("{what} applies to format = \"fp8\" only")))
        } else {
            Ok(())
        }
    };
    float_only("strategy", config.strategy.is_some())?;
    float_only("activations", config.activations.is_some())?;
    let rtn = match config.format.as_str() {
        "int" => {
            let bits = config.bits.ok_or_else(|| err("bits is required for format = \"int\" (8, 4, 3 or 2)".into()))?;
            Rtn::new(&RtnConfig {
                bits,
                group_size: config.group_size,
                symmetric: config.symmetric,
                targets: config.targets.clone(),
                ignore: config.ignore.clone(),
            })
        }
        f => {
            if config.bits.is_some() || config.group_size != 0 || !config.symmetric {
                return Err(err(format!(
                    "format = {f:?} fixes its own bits, blocks and symmetry: leave bits, group-size and symmetric out"
                )));
            }
            match f {
                "fp8" => Rtn::fp8(&Fp8Config {
                    strategy: config.strategy.clone().unwrap_or_else(default_fp8_strategy),
                    activations: config.activations.clone().unwrap_or_else(default_fp8_activations),
                    targets: config.targets.clone(),
                    ignore: config.ignore.clone(),
                }),
                "nvfp4" | "mxfp4" => Rtn::fp4(&Fp4Config {
                    format: f.to_string(),
                    targets: config.targets.clone(),
                    ignore: config.ignore.clone(),
                }),
                _ => Err(format!("format = {f:?}: supported values are \"int\", \"fp8\", \"nvfp4\" and \"mxfp4\"")),
            }
        }
    }
    .map_err(err)?;
    let opts =
        GptqOptions { dampening: config.dampening, block_size: config.block_size.max(1), act_order: config.act_order };
    let method = |scheme| CalibrationMethod::Gptq(opts, scheme);
    let settings = serde_json::to_value(&config).expect("config is JSON");
    Ok(build_calibrated_with(&GPTQ_INFO, settings, rtn, &config.calibration, method))
}

fn build_awq(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let mut config: AwqConfig = recipe.pass_config(index)?;
    if !(1..=1000).contains(&config.grid) {
        return Err(recipe.pass_error(index, format!("grid = {}: 1 to 1000 points", config.grid)));
    }
    config.calibration = calibration_config(recipe, index, config.calibration)?;
    let rtn = RtnConfig {
        bits: config.bits,
        group_size: config.group_size,
        symmetric: config.symmetric,
        targets: config.targets.clone(),
        ignore: config.ignore.clone(),
    };
    let grid = config.grid;
    let method = |scheme| CalibrationMethod::Awq { grid, scheme };
    let settings = serde_json::to_value(&config).expect("config is JSON");
    build_calibrated(recipe, index, &AWQ_INFO, settings, &rtn, &config.calibration, method)
}

/// Registry entry of `quantize-gptq`.
pub const GPTQ_INFO: PassInfo = PassInfo {
    name: "quantize-gptq",
    summary: "GPTQ: int8/4/3/2, FP8, NVFP4 or MXFP4 with error compensation from calibration activations (decoder models)",
    docs: include_str!("gptq.md"),
    status: Status::Preview,
    build: build_gptq,
    schema: || schemars::schema_for!(GptqConfig),
};

/// Registry entry of `quantize-awq`.
pub const AWQ_INFO: PassInfo = PassInfo {
    name: "quantize-awq",
    summary: "AWQ: activation-aware per-channel scales folded into norms/linears, then int8/4/3/2 (decoder models)",
    docs: include_str!("awq.md"),
    status: Status::Preview,
    build: build_awq,
    schema: || schemars::schema_for!(AwqConfig),
};

impl Pass for CalibratedQuant {
    fn name(&self) -> &'static str {
        self.info.name
    }

    fn settings(&self) -> serde_json::Value {
        self.settings.clone()
    }

    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan {
        let plan = self.rtn.plan(name, meta);
        let Some(done) = self.results.as_ref() else { return plan };
        match (done.kind(name), plan, meta) {
            (Some(crate::ResultKind::Dense), _, ParamMeta::Dense { .. }) => Plan::Change(meta.clone()),
            (None, Plan::Change(_), _) => Plan::Skip(
                "not a linear layer of a decoder block (calibrated passes reach those; use quantize-rtn for the rest)"
                    .into(),
            ),
            (_, plan, _) => plan,
        }
    }

    fn apply<'a>(&self, name: &str, param: Param<'a>) -> Result<Applied<'a>, String> {
        let (dtype, shape) = match param {
            Param::Dense { dtype, shape, .. } => (dtype, shape),
            Param::Sparse(t) => (t.dtype, t.shape),
            Param::Quantized(_) => return Err("already quantized".into()),
        };
        match crate::calibrated_result(self.results.as_ref(), name)? {
            Calibrated::Quantized(q) => {
                let rel = q.rel_rmse();
                Ok(Applied { param: Param::Quantized(q), rel_rmse: Some(rel) })
            }
            Calibrated::Dense(values) => {
                let bytes = dtype.encode_f32(&values).ok_or_else(|| format!("cannot encode {dtype}"))?;
                Ok(Applied {
                    param: Param::Dense { dtype, shape, data: std::borrow::Cow::Owned(bytes) },
                    rel_rmse: None,
                })
            }
            Calibrated::Pruned { .. } => Err("a pruning result given to a quantization pass".into()),
        }
    }

    fn needs(&self) -> Need<'_> {
        Need::Calibration(&self.calibration)
    }

    fn provide(&mut self, _model: &ModelSource, what: Provided) -> Result<(), PassError> {
        match what {
            Provided::Tensors(results) => {
                self.results = Some(results);
                Ok(())
            }
            other => Err(PassError::Provided(format!("needs calibrated tensors, was given {}", other.kind()))),
        }
    }
}
