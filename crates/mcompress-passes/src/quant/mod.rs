//! Quantization passes.

pub mod load;
pub mod rtn;
pub mod scheme;

use mcompress_recipe::Recipe;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use load::{load_quantized, schemes_from_config};
pub use rtn::{QuantError, Quantized, quantize, quantize_ref};
pub use scheme::QScheme;

use crate::{Applied, Param, ParamMeta, ParamSelector, Pass, PassInfo, Plan, Status};

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
