//! `prune-structured`: remove whole feed-forward neurons, so the matrices really shrink, the
//! bundle gets smaller and every runtime runs the smaller model faster without sparse kernels.
//!
//! A neuron `j` of a feed-forward block is row `j` of the input projection(s) (llama: `gate_proj`
//! and `up_proj`; BERT: `intermediate.dense` and its bias; MLP: hidden layer `i`'s weight and
//! bias) and column `j` of the output projection (llama `down_proj`, BERT `output.dense`, MLP
//! layer `i + 1`). Its importance is `‖in_j‖₂ · ‖out_j‖₂` (the norm of the weights that produce it
//! times the norm of those that read it; data free). The same number of neurons is removed from
//! every block (`⌊size · sparsity⌋`), so config.json stays a valid config of the same
//! architecture with a smaller `intermediate_size` (MLP: `hidden_sizes`); which neurons go is
//! chosen per block, lowest importance first, ties by index.

use std::collections::BTreeMap;
use std::sync::Mutex;

use mcompress_core::ModelSource;
use mcompress_recipe::Recipe;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Applied, Param, ParamMeta, Pass, PassInfo, Plan, Status};

/// `prune-structured` settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StructuredConfig {
    /// What to remove: `"neurons"` (feed-forward neurons). Attention heads and whole layers are
    /// not implemented yet.
    pub unit: String,
    /// Fraction of each feed-forward block's neurons to remove, in [0, 1).
    pub sparsity: f64,
}

/// One feed-forward block: the tensors whose rows are its neurons, and those whose columns are.
#[derive(Clone, Debug)]
struct Block {
    rows_of: Vec<String>,
    cols_of: Vec<String>,
    size: usize,
}

/// `prune-structured`.
#[derive(Debug)]
pub struct Structured {
    config: StructuredConfig,
    /// Per block: kept neurons, ascending (filled by [`Pass::prepare`]).
    kept: Mutex<Vec<Vec<usize>>>,
    blocks: Mutex<Vec<Block>>,
    /// Tensor → (block, neurons on its rows (true) or columns (false)); an MLP's middle layer
    /// has both roles.
    role: Mutex<BTreeMap<String, Vec<(usize, bool)>>>,
}

impl Structured {
    fn keep_count(&self, size: usize) -> usize {
        size - (size as f64 * self.config.sparsity).floor() as usize
    }
}

/// The feed-forward blocks of a llama, BERT or MLP model.
fn blocks(model: &ModelSource) -> Result<Vec<Block>, String> {
    let config = model.config().cloned().unwrap_or_default();
    let has = |n: &str| model.tensors().iter().any(|r| model.info(r).name == n);
    let size_of = |n: &str| model.tensors().iter().find(|r| model.info(r).name == n).map(|r| model.info(r).shape[0]);
    let n_layers = config["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    let mut out = Vec::new();
    match config["model_type"].as_str().unwrap_or("") {
        "llama" => {
            for i in 0..n_layers {
                let p = format!("model.layers.{i}.mlp");
                let g = format!("{p}.gate_proj.weight");
                let size = size_of(&g).ok_or_else(|| format!("{g} missing"))?;
                out.push(Block {
                    rows_of: vec![g, format!("{p}.up_proj.weight")],
                    cols_of: vec![format!("{p}.down_proj.weight")],
                    size,
                });
            }
        }
        "bert" => {
            for i in 0..n_layers {
                let p = format!("encoder.layer.{i}");
                let w = format!("{p}.intermediate.dense.weight");
                let size = size_of(&w).ok_or_else(|| format!("{w} missing"))?;
                let mut rows_of = vec![w];
                let b = format!("{p}.intermediate.dense.bias");
                if has(&b) {
                    rows_of.push(b);
                }
                out.push(Block { rows_of, cols_of: vec![format!("{p}.output.dense.weight")], size });
            }
        }
        "mlp" => {
            let names: Vec<String> = config["layer_names"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                .unwrap_or_default();
            for w in names.windows(2) {
                let (this, next) = (format!("{}.weight", w[0]), format!("{}.weight", w[1]));
                let size = size_of(&this).ok_or_else(|| format!("{this} missing"))?;
                let mut rows_of = vec![this];
                let b = format!("{}.bias", w[0]);
                if has(&b) {
                    rows_of.push(b);
                }
                out.push(Block { rows_of, cols_of: vec![next], size });
            }
        }
        other => return Err(format!("model_type {other:?}: structured pruning knows llama, bert and mlp models")),
    }
    if out.is_empty() {
        return Err("no feed-forward blocks found".into());
    }
    Ok(out)
}

/// Reads a tensor as f32.
fn f32_of(model: &ModelSource, name: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
    let r = model.tensors().iter().find(|r| model.info(r).name == name).ok_or_else(|| format!("{name} missing"))?;
    let v = model.view(r);
    let data = v.to_f32().ok_or_else(|| format!("{name}: not a float tensor"))?;
    Ok((v.shape.to_vec(), data))
}

impl Pass for Structured {
    fn name(&self) -> &'static str {
        STRUCTURED_INFO.name
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("config is JSON")
    }

    fn prepare(&self, model: &ModelSource) -> Result<(), String> {
        let blocks = blocks(model)?;
        let mut kept = Vec::with_capacity(blocks.len());
        let mut role = BTreeMap::new();
        for (b, block) in blocks.iter().enumerate() {
            let mut imp_in = vec![0f64; block.size];
            let mut imp_out = vec![0f64; block.size];
            for n in &block.rows_of {
                let (shape, w) = f32_of(model, n)?;
                if shape[0] != block.size {
                    return Err(format!("{n}: {} rows, {} neurons expected", shape[0], block.size));
                }
                let cols = w.len() / block.size;
                for (j, row) in w.chunks(cols.max(1)).enumerate() {
                    imp_in[j] += row.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>();
                }
                role.entry(n.clone()).or_insert_with(Vec::new).push((b, true));
            }
            for n in &block.cols_of {
                let (shape, w) = f32_of(model, n)?;
                if shape.len() != 2 || shape[1] != block.size {
                    return Err(format!("{n}: shape {shape:?}, {} input columns expected", block.size));
                }
                for row in w.chunks(block.size) {
                    for (j, v) in row.iter().enumerate() {
                        imp_out[j] += f64::from(*v) * f64::from(*v);
                    }
                }
                role.entry(n.clone()).or_insert_with(Vec::new).push((b, false));
            }
            let score: Vec<f64> = imp_in.iter().zip(&imp_out).map(|(a, b)| (a * b).sqrt()).collect();
            let mut idx: Vec<usize> = (0..block.size).collect();
            idx.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
            let mut k: Vec<usize> = idx[..self.keep_count(block.size)].to_vec();
            k.sort_unstable();
            kept.push(k);
        }
        *self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = kept;
        *self.blocks.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = blocks;
        *self.role.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = role;
        Ok(())
    }

    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan {
        let role = self.role.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(roles) = role.get(name) else { return Plan::Keep };
        let (ParamMeta::Dense { dtype, shape } | ParamMeta::Sparse { dtype, shape, .. }) = meta else {
            return Plan::Skip("already quantized: prune before quantizing".into());
        };
        let blocks = self.blocks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut shape = shape.clone();
        for &(b, rows) in roles {
            shape[usize::from(!rows)] = self.keep_count(blocks[b].size);
        }
        Plan::Change(ParamMeta::Dense { dtype: *dtype, shape })
    }

    fn apply<'a>(&self, name: &str, param: Param<'a>) -> Result<Applied<'a>, String> {
        let (dtype, shape, w) = param.dense_f32().ok_or("already quantized: prune before quantizing")?;
        let roles = self.role.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned();
        let roles = roles.ok_or("not a feed-forward tensor")?;
        let all_kept = self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut out, mut new_shape) = (w.clone(), shape.clone());
        for (b, rows) in roles {
            let kept = &all_kept[b];
            if rows {
                let cols: usize = new_shape[1..].iter().product();
                let mut next = Vec::with_capacity(kept.len() * cols);
                for &j in kept {
                    next.extend_from_slice(&out[j * cols..(j + 1) * cols]);
                }
                out = next;
                new_shape[0] = kept.len();
            } else {
                let cols = new_shape[1];
                let mut next = Vec::with_capacity(new_shape[0] * kept.len());
                for row in out.chunks(cols) {
                    next.extend(kept.iter().map(|&j| row[j]));
                }
                out = next;
                new_shape[1] = kept.len();
            }
        }
        // Relative size of what was removed.
        let total: f64 = w.iter().map(|v| f64::from(*v).powi(2)).sum();
        let left: f64 = out.iter().map(|v| f64::from(*v).powi(2)).sum();
        let rel = if total > 0.0 { ((total - left).max(0.0) / total).sqrt() } else { 0.0 };
        let bytes = dtype.encode_f32(&out).ok_or_else(|| format!("cannot encode {dtype}"))?;
        Ok(Applied { param: Param::Dense { dtype, shape: new_shape, data: bytes.into() }, rel_rmse: Some(rel) })
    }

    fn update_config(&self, config: &mut serde_json::Value) {
        let blocks = self.blocks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(obj) = config.as_object_mut() else { return };
        if obj.contains_key("intermediate_size")
            && let Some(b) = blocks.first()
        {
            obj.insert("intermediate_size".into(), self.keep_count(b.size).into());
        }
        if obj.contains_key("hidden_sizes") {
            let sizes: Vec<usize> = blocks.iter().map(|b| self.keep_count(b.size)).collect();
            obj.insert("hidden_sizes".into(), sizes.into());
        }
    }
}

fn build(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let config: StructuredConfig = recipe.pass_config(index)?;
    if config.unit != "neurons" {
        return Err(recipe.pass_error(
            index,
            format!("unit {:?}: \"neurons\" is implemented (attention heads and layers are not yet)", config.unit),
        ));
    }
    if !(config.sparsity.is_finite() && (0.0..1.0).contains(&config.sparsity)) {
        return Err(recipe.pass_error(index, format!("sparsity = {}: must be in [0, 1)", config.sparsity)));
    }
    Ok(Box::new(Structured { config, kept: Mutex::default(), blocks: Mutex::default(), role: Mutex::default() }))
}

/// Registry entry of `prune-structured`.
pub const STRUCTURED_INFO: PassInfo = PassInfo {
    name: "prune-structured",
    summary: "Remove feed-forward neurons (llama, BERT, MLP): smaller matrices and config, faster everywhere",
    docs: include_str!("structured.md"),
    status: Status::Preview,
    build,
    schema: || schemars::schema_for!(StructuredConfig),
};
