//! The `cast` pass: converts float tensors to f16, bf16 or f32.

use std::borrow::Cow;

use mcompress_core::DType;
use mcompress_recipe::Recipe;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Applied, Param, ParamMeta, ParamSelector, Pass, PassInfo, Plan, Status};

/// Target float type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CastDType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single precision.
    F32,
}

impl CastDType {
    fn dtype(self) -> DType {
        match self {
            CastDType::F16 => DType::F16,
            CastDType::Bf16 => DType::BF16,
            CastDType::F32 => DType::F32,
        }
    }
}

/// `cast` settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CastConfig {
    /// `f16`, `bf16` or `f32`.
    pub dtype: CastDType,
    /// Tensors to cast (globs or `re:` regexes). Default: every float tensor not quantized.
    pub targets: Option<Vec<String>>,
    /// Tensors to leave alone.
    #[serde(default)]
    pub ignore: Vec<String>,
}

/// Float cast.
#[derive(Debug)]
pub struct Cast {
    config: CastConfig,
    selector: ParamSelector,
}

fn build(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let config: CastConfig = recipe.pass_config(index)?;
    let selector =
        ParamSelector::new(config.targets.as_deref(), &config.ignore).map_err(|e| recipe.pass_error(index, e))?;
    Ok(Box::new(Cast { config, selector }))
}

/// Registry entry of `cast`.
pub const INFO: PassInfo = PassInfo {
    name: "cast",
    summary: "Cast float tensors (those quantization left) to f16, bf16 or f32",
    docs: include_str!("cast.md"),
    status: Status::Stable,
    build,
    schema: || schemars::schema_for!(CastConfig),
};

impl Pass for Cast {
    fn name(&self) -> &'static str {
        INFO.name
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("config is JSON")
    }

    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan {
        let to = self.config.dtype.dtype();
        match meta {
            ParamMeta::Dense { dtype, shape } => match self.selector.select(name, dtype.is_float()) {
                None => Plan::Keep,
                Some(_) if !dtype.is_float() => Plan::Skip(format!("dtype {dtype} is not a float type")),
                Some(_) if *dtype == to => Plan::Keep,
                Some(_) => Plan::Change(ParamMeta::Dense { dtype: to, shape: shape.clone() }),
            },
            ParamMeta::Sparse { dtype, shape, nnz } => match self.selector.select(name, true) {
                None => Plan::Keep,
                Some(_) if *dtype == to => Plan::Keep,
                Some(_) => Plan::Change(ParamMeta::Sparse { dtype: to, shape: shape.clone(), nnz: *nnz }),
            },
            ParamMeta::Quantized { .. } => match self.selector.select(name, false) {
                Some(true) => Plan::Skip("quantized tensors keep their scale dtype".into()),
                _ => Plan::Keep,
            },
        }
    }

    fn apply<'a>(&self, _name: &str, param: Param<'a>) -> Result<Applied<'a>, String> {
        let to = self.config.dtype.dtype();
        if let Param::Sparse(t) = &param {
            // The kept values change dtype; the mask stays.
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let dense = t.to_dense();
            let rel = rel_rounding(&dense, to);
            let cast = crate::sparse::SparseTensor::from_dense(to, rows, cols, &dense, &t.keep())
                .ok_or("cannot cast to a non-float type")?;
            return Ok(Applied { param: Param::Sparse(cast), rel_rmse: Some(rel) });
        }
        let Param::Dense { dtype, shape, data } = param else {
            return Err("cannot cast a quantized tensor".into());
        };
        let mut v = vec![0f32; shape.iter().product()];
        if !dtype.decode_f32(&data, &mut v) {
            return Err(format!("cannot read {dtype} as float"));
        }
        let rel = rel_rounding(&v, to);
        let bytes = to.encode_f32(&v).expect("float dtype");
        Ok(Applied { param: Param::Dense { dtype: to, shape, data: Cow::Owned(bytes) }, rel_rmse: Some(rel) })
    }
}

/// Relative RMSE of rounding `v` to `to`.
fn rel_rounding(v: &[f32], to: mcompress_core::DType) -> f64 {
    let (mut e, mut w) = (0f64, 0f64);
    for &x in v {
        let d = f64::from(x - to.round_f32(x));
        e += d * d;
        w += f64::from(x) * f64::from(x);
    }
    if w > 0.0 { (e / w).sqrt() } else { 0.0 }
}
