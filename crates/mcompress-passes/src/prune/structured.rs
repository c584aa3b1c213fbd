//! `prune-structured`: remove whole feed-forward neurons, attention heads or layers, so the
//! matrices (or the layer count) really shrink, the bundle gets smaller and every runtime runs
//! the smaller model faster without sparse kernels.
//!
//! **Neurons.** A neuron `j` of a feed-forward block is row `j` of the input projection(s)
//! (llama: `gate_proj` and `up_proj`; BERT: `intermediate.dense` and its bias; MLP: hidden layer
//! `i`'s weight and bias) and column `j` of the output projection (llama `down_proj`, BERT
//! `output.dense`, MLP layer `i + 1`). In Phi-3's fused `gate_up_proj` it is row `j` of each
//! half; in a mixture, each expert is a block of its own (the same count goes from each).
//!
//! **Heads.** A head is `head_dim` consecutive rows of the query projection (and of the key and
//! value projections when it has its own KV head: BERT, llama without grouped-query attention)
//! and the same columns of the output projection. With grouped-query attention the KV heads stay
//! and every KV group loses the same number of query heads, so the config stays a valid
//! grouped-query config (llama: `num_attention_heads` shrinks, `head_dim` is written; BERT:
//! transformers' `pruned_heads`).
//!
//! Importance of a neuron or head is `‖in‖₂ · ‖out‖₂` (the norm of the weights that produce it
//! times the norm of those that read it; data free). The same number is removed from every block
//! (and every KV group), so config.json stays a standard config; which ones go is chosen per
//! block, lowest importance first, ties by index.
//!
//! **Layers.** Whole decoder / encoder layers go, scored by ShortGPT's block influence
//! `1 − E[cos(x_in, x_out)]` of each layer's residual stream on calibration text (measured by
//! `mcompress_eval::calibrate::layer_scores`): the layers that change their input least are
//! removed and the rest renumbered (a [`LayerMap`] over the model's tensor names).
//!
//! **Experts.** In a mixture of experts (Mixtral) the same number of experts goes from every
//! block, scored on calibration text by REAP's router-weighted activation (the mean over tokens
//! of the router weight times the norm of the expert's output, a token counting for the experts
//! it is routed to): the lowest go, the rest are renumbered (the [`LayerMap`]'s expert map), the
//! router loses their rows and `num_local_experts` shrinks. At least `num_experts_per_tok`
//! experts stay.

use std::collections::BTreeMap;

use mcompress_core::ModelSource;
use mcompress_core::arch::{self, BertGeometry, BertRole, DECODERS, Family, MlpGeometry, ModelKind, Role};
use mcompress_recipe::Recipe;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::quant::CalibrationConfig;
use crate::{Applied, Need, Param, ParamMeta, Pass, PassError, PassInfo, Plan, Provided, Status};

/// `prune-structured` settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StructuredConfig {
    /// What to remove: `"neurons"` (feed-forward neurons), `"heads"` (attention heads),
    /// `"layers"` (whole decoder / encoder layers) or `"experts"` (whole experts of a mixture).
    pub unit: String,
    /// Fraction to remove, in [0, 1): of each feed-forward block's neurons, of each layer's
    /// heads (of each KV group's query heads under grouped-query attention), or of the layers.
    pub sparsity: f64,
    /// The text units are scored on: required for `"layers"` (block influence) and `"experts"`
    /// (router-weighted activation); optional for
    /// `"neurons"` and `"heads"` of llama and BERT models (activation-weighted scores instead of
    /// weight norms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationConfig>,
}

/// A tensor whose rows carry a block's units, and where in its rows each run of the block's
/// `size × width` unit rows starts: one run at 0 for a plain projection; Phi-3's fused
/// `gate_up_proj` has two (gate's, up's), its `qkv_proj` one per part that loses rows (the query
/// part alone under grouped-query attention; the rows of the other parts stay: `extra` of them).
#[derive(Clone, Debug)]
struct Rows {
    name: String,
    at: Vec<usize>,
    extra: usize,
}

impl Rows {
    fn plain(name: String) -> Rows {
        Rows { name, at: vec![0], extra: 0 }
    }
}

/// Which side of a tensor carries a block's units.
#[derive(Clone, Debug)]
enum Side {
    /// Rows, in runs starting at these rows ([`Rows::at`]).
    Rows(Vec<usize>),
    Columns,
}

/// What a unit of one block is made of: the tensors whose rows carry it and those whose columns
/// do.
#[derive(Clone, Debug)]
struct Block {
    rows_of: Vec<Rows>,
    cols_of: Vec<String>,
    /// Units in the block (neurons or heads).
    size: usize,
    /// Rows (columns) per unit: 1 for a neuron, `head_dim` for a head.
    width: usize,
    /// The units fall into this many equal, contiguous groups, each keeping the same number
    /// (KV groups under grouped-query attention; 1 otherwise).
    groups: usize,
    /// BERT heads: the original index of each current head (transformers' `pruned_heads`
    /// numbers heads as they were before any pruning).
    original: Vec<usize>,
}

impl Block {
    fn keep_count(&self, sparsity: f64) -> usize {
        let per = self.size / self.groups;
        (per - (per as f64 * sparsity).floor() as usize) * self.groups
    }
}

/// Which layers survive: renames `<prefix><old>.` to `<prefix><new>.` and drops the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerMap {
    /// `"model.layers."` (llama) or `"encoder.layer."` (BERT).
    pub prefix: &'static str,
    /// Surviving layers' original indices, ascending; the new index is the position here.
    pub kept: Vec<usize>,
    /// Removed layers' original indices, ascending.
    pub removed: Vec<usize>,
    /// Experts removed instead (every layer kept): the family naming them and, per block, the
    /// surviving experts' original indices, ascending (new index = position).
    pub experts: Option<(Family, Vec<Vec<usize>>)>,
}

impl LayerMap {
    /// The tensor's name after the removal, `None` if its layer (or expert) is removed.
    pub fn rename(&self, name: &str) -> Option<String> {
        if let Some((family, kept)) = &self.experts {
            let Some(slot) = family.slot_hf(name).filter(|s| s.role.per_expert()) else {
                return Some(name.to_string());
            };
            let (layer, expert) = (slot.layer?, slot.expert?);
            let new = kept.get(layer)?.iter().position(|&k| k == expert)?;
            return Some(family.hf_expert(slot.role, layer, new));
        }
        let Some(rest) = name.strip_prefix(self.prefix) else { return Some(name.to_string()) };
        let Some((index, tail)) = rest.split_once('.') else { return Some(name.to_string()) };
        let Ok(old) = index.parse::<usize>() else { return Some(name.to_string()) };
        let new = self.kept.iter().position(|&k| k == old)?;
        Some(format!("{}{new}.{tail}", self.prefix))
    }

    /// config.json with the smaller `num_hidden_layers` (per-layer keys renumbered), or the
    /// smaller `num_local_experts`.
    pub fn config(&self, config: &Value) -> Value {
        if let Some((_, kept)) = &self.experts {
            let mut c = config.clone();
            c["num_local_experts"] = kept.first().map_or(0, Vec::len).into();
            return c;
        }
        mcompress_core::arch::config_keeping_layers(config, &self.kept)
    }
}

/// `prune-structured`.
#[derive(Debug)]
pub struct Structured {
    config: StructuredConfig,
    state: State,
}

#[derive(Debug, Default)]
struct State {
    /// Per block: kept units, ascending (filled by [`Pass::prepare`], or with `calibration` when
    /// the activation statistics are provided).
    kept: Vec<Vec<usize>>,
    blocks: Vec<Block>,
    /// Tensor → (block, the side that carries its units); an MLP's middle layer has both roles.
    role: BTreeMap<String, Vec<(usize, Side)>>,
    /// Heads: the model type and its attention geometry before pruning.
    heads: Option<(ModelKind, Geometry)>,
    /// Layers: how many go, and (once the layer scores are provided) the scores and the map.
    layers_to_remove: usize,
    layer_scores: Vec<f64>,
    layer_map: Option<LayerMap>,
    /// Experts: how many go per block, and (once scored) per block each expert's score and
    /// routed tokens.
    experts_to_remove: usize,
    expert_scores: Vec<Vec<(f64, usize)>>,
}

/// Attention geometry of a layer: query heads, KV heads, head width.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    heads: usize,
    kv: usize,
    hd: usize,
}

/// The feed-forward blocks of a decoder (one per layer; one per expert of a mixture), BERT or
/// MLP model.
fn neuron_blocks(model: &ModelSource, config: &Value) -> Result<Vec<Block>, String> {
    let has = |n: &str| model.tensors().iter().any(|r| model.info(r).name == n);
    let size_of = |n: &str| -> Result<usize, String> {
        model
            .tensors()
            .iter()
            .find(|r| model.info(r).name == n)
            .map(|r| model.info(r).shape[0])
            .ok_or(format!("{n} missing"))
    };
    let block = |rows_of: Vec<Rows>, cols_of: Vec<String>, size| Block {
        rows_of,
        cols_of,
        size,
        width: 1,
        groups: 1,
        original: Vec::new(),
    };
    let mut out = Vec::new();
    match ModelKind::of_config(config) {
        Some(ModelKind::Decoder(f)) if f.is_moe() => {
            // Each expert its own block: the same count goes from every expert (one
            // intermediate size in config.json), which ones per expert.
            let g = arch::Geometry::from_config(config)?;
            for i in 0..g.layers {
                for e in 0..g.experts {
                    let gate = f.hf_expert(Role::ExpertGate, i, e);
                    let size = size_of(&gate)?;
                    let rows = vec![Rows::plain(gate), Rows::plain(f.hf_expert(Role::ExpertUp, i, e))];
                    out.push(block(rows, vec![f.hf_expert(Role::ExpertDown, i, e)], size));
                }
            }
        }
        Some(ModelKind::Decoder(f)) if f.fuses_projections() => {
            // Neuron j is row j of the gate half and row size + j of the up half.
            for i in 0..ModelKind::Decoder(f).blocks(config)? {
                let gu = f.hf(Role::GateUp, i);
                let rows = size_of(&gu)?;
                if !rows.is_multiple_of(2) {
                    return Err(format!("{gu}: {rows} rows, an even count (gate and up) expected"));
                }
                let size = rows / 2;
                let rows = vec![Rows { name: gu, at: vec![0, size], extra: 0 }];
                out.push(block(rows, vec![f.hf(Role::Down, i)], size));
            }
        }
        Some(ModelKind::Decoder(f)) => {
            for i in 0..ModelKind::Decoder(f).blocks(config)? {
                let g = f.hf(Role::Gate, i);
                let size = size_of(&g)?;
                out.push(block(vec![Rows::plain(g), Rows::plain(f.hf(Role::Up, i))], vec![f.hf(Role::Down, i)], size));
            }
        }
        Some(ModelKind::Bert) => {
            for i in 0..ModelKind::Bert.blocks(config)? {
                let w = BertRole::Inter.weight(i);
                let size = size_of(&w)?;
                let mut rows_of = vec![Rows::plain(w)];
                let b = BertRole::Inter.bias(i);
                if has(&b) {
                    rows_of.push(Rows::plain(b));
                }
                out.push(block(rows_of, vec![BertRole::Out.weight(i)], size));
            }
        }
        Some(ModelKind::Mlp) => {
            let names = MlpGeometry::from_config(config)?.layers;
            for w in names.windows(2) {
                let (this, next) = (format!("{}.weight", w[0]), format!("{}.weight", w[1]));
                let size = size_of(&this)?;
                let mut rows_of = vec![Rows::plain(this)];
                let b = format!("{}.bias", w[0]);
                if has(&b) {
                    rows_of.push(Rows::plain(b));
                }
                out.push(block(rows_of, vec![next], size));
            }
        }
        None => {
            return Err(format!(
                "model_type {:?}: structured pruning knows the decoders ({DECODERS}), bert and mlp models",
                arch::model_type(config)
            ));
        }
    }
    if out.is_empty() {
        return Err("no feed-forward blocks found".into());
    }
    Ok(out)
}

/// The attention blocks (one per layer) of a decoder or BERT model, and the geometry before
/// pruning: (heads, KV heads, head width).
fn head_blocks(model: &ModelSource, config: &Value) -> Result<(Vec<Block>, Geometry), String> {
    let has = |n: &str| model.tensors().iter().any(|r| model.info(r).name == n);
    // `<module>.weight` of each module, and its `.bias` where the model has one, the unit rows
    // starting at `at`.
    let with_biases = |modules: &[String], at: &[usize], extra: usize| -> Vec<Rows> {
        let mut v = Vec::new();
        for m in modules {
            v.push(Rows { name: format!("{m}.weight"), at: at.to_vec(), extra });
            let b = format!("{m}.bias");
            if has(&b) {
                v.push(Rows { name: b, at: at.to_vec(), extra });
            }
        }
        v
    };
    let rows_of = |n: &str| model.tensors().iter().find(|r| model.info(r).name == n).map(|r| model.info(r).shape[0]);
    let mut out = Vec::new();
    match ModelKind::of_config(config) {
        Some(ModelKind::Decoder(f)) => {
            let g = arch::Geometry::from_config(config)?;
            let (heads, kv, hd) = (g.heads, g.kv_heads, g.head_dim);
            let module = |r: Role, i: usize| f.hf(r, i).trim_end_matches(".weight").to_string();
            for i in 0..g.layers {
                // Query heads that share a KV head are removed alone; a head with its own KV
                // head takes its key and value rows with it (and their biases, Qwen2's). In
                // Phi-3's qkv_proj those are the runs after the query part.
                let own_kv = kv == heads;
                let rows_of = if f.fuses_projections() {
                    let (at, extra): (&[usize], usize) =
                        if own_kv { (&[0, heads * hd, 2 * heads * hd], 0) } else { (&[0], 2 * kv * hd) };
                    with_biases(&[module(Role::Qkv, i)], at, extra)
                } else {
                    let roles: &[Role] = if own_kv { &[Role::Q, Role::K, Role::V] } else { &[Role::Q] };
                    with_biases(&roles.iter().map(|r| module(*r, i)).collect::<Vec<_>>(), &[0], 0)
                };
                out.push(Block {
                    rows_of,
                    cols_of: vec![f.hf(Role::O, i)],
                    size: heads,
                    width: hd,
                    groups: if own_kv { 1 } else { kv },
                    original: Vec::new(),
                });
            }
            Ok((out, Geometry { heads, kv, hd }))
        }
        Some(ModelKind::Bert) => {
            let g = BertGeometry::from_config(config)?;
            let (heads, hd) = (g.heads, g.head_dim());
            for i in 0..g.layers {
                let q = BertRole::Query.weight(i);
                let rows = rows_of(&q).ok_or_else(|| format!("{q} missing"))?;
                // Heads an earlier pruning removed (transformers' `pruned_heads`, original indices).
                let gone = mcompress_core::arch::bert_pruned_heads(config, i, heads)?;
                let original: Vec<usize> = (0..heads).filter(|h| !gone.contains(h)).collect();
                if rows != original.len() * hd {
                    return Err(format!("{q}: {rows} rows, {} heads of {hd} expected", original.len()));
                }
                out.push(Block {
                    rows_of: with_biases(
                        &[BertRole::Query, BertRole::Key, BertRole::Value].map(|r| r.module(i)),
                        &[0],
                        0,
                    ),
                    cols_of: vec![BertRole::AttnOut.weight(i)],
                    size: original.len(),
                    width: hd,
                    groups: 1,
                    original,
                });
            }
            Ok((out, Geometry { heads, kv: heads, hd }))
        }
        _ => Err(format!(
            "model_type {:?}: attention heads are pruned in decoder and bert models",
            arch::model_type(config)
        )),
    }
}

/// What to write instead when a sparsity removes none of `n` units.
fn removal_hint(n: usize) -> String {
    if n <= 1 { "a single one cannot be removed".into() } else { format!("use at least {}", smallest_removing(1, n)) }
}

/// The smallest sparsity with three decimals that removes `k` of `n` units (`⌊n · s⌋ ≥ k`):
/// k/n rounded up, so that the value suggested in an error really works.
fn smallest_removing(k: usize, n: usize) -> String {
    let mut milli = (k as f64 * 1000.0 / n.max(1) as f64).ceil() as u64;
    while (n as f64 * milli as f64 / 1000.0).floor() < k as f64 {
        milli += 1;
    }
    format!("{}.{:03}", milli / 1000, milli % 1000)
}

/// Reads a tensor as f32.
fn f32_of(model: &ModelSource, name: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
    let r = model.tensors().iter().find(|r| model.info(r).name == name).ok_or_else(|| format!("{name} missing"))?;
    let v = model.view(r);
    let data = v.to_f32().ok_or_else(|| format!("{name}: not a float tensor"))?;
    Ok((v.shape.to_vec(), data))
}

impl Structured {
    /// Scores every unit of every block and keeps the most important per group; with
    /// `moments` (`E[x_c²]` of every input column of every linear layer on the calibration
    /// text, by weight name), by each unit's expected contribution to the output.
    fn choose_units(&mut self, model: &ModelSource, moments: &BTreeMap<String, Vec<f32>>) -> Result<(), String> {
        let s = self.config.sparsity;
        let st = &mut self.state;
        let blocks = &st.blocks;
        st.kept.clear();
        st.role.clear();
        for (b, block) in blocks.iter().enumerate() {
            let (n, w) = (block.size, block.width);
            let mut imp_in = vec![0f64; n];
            let mut imp_out = vec![0f64; n];
            // With calibration: the expected norm of the unit's contribution to the output,
            // Σ_c E[x_c²] · ‖P[:, c]‖² over its input columns c of the output projection P.
            let mut act = vec![0f64; n];
            let mut have_act = false;
            for Rows { name, at, extra } in &block.rows_of {
                let (shape, v) = f32_of(model, name)?;
                let want = n * w * at.len() + extra;
                if shape[0] != want {
                    return Err(format!("{name}: {} rows, {want} expected ({n} units of {w})", shape[0]));
                }
                let cols = v.len() / shape[0].max(1);
                let rows: Vec<&[f32]> = v.chunks(cols.max(1)).collect();
                for &a in at {
                    for (r, row) in rows[a..a + n * w].iter().enumerate() {
                        imp_in[r / w] += row.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>();
                    }
                }
                st.role.entry(name.clone()).or_default().push((b, Side::Rows(at.clone())));
            }
            for name in &block.cols_of {
                let (shape, v) = f32_of(model, name)?;
                if shape.len() != 2 || shape[1] != n * w {
                    return Err(format!("{name}: shape {shape:?}, {} input columns expected", n * w));
                }
                let mut col = vec![0f64; n * w];
                for row in v.chunks(n * w) {
                    for (c, x) in row.iter().enumerate() {
                        col[c] += f64::from(*x) * f64::from(*x);
                    }
                }
                for (c, v) in col.iter().enumerate() {
                    imp_out[c / w] += v;
                }
                if !moments.is_empty() {
                    let m = moments.get(name).ok_or_else(|| format!("{name}: no activation statistics"))?;
                    if m.len() != n * w {
                        return Err(format!("{name}: {} activation statistics for {} columns", m.len(), n * w));
                    }
                    for (c, v) in col.iter().enumerate() {
                        act[c / w] += f64::from(m[c]) * v;
                    }
                    have_act = true;
                }
                st.role.entry(name.clone()).or_default().push((b, Side::Columns));
            }
            let score: Vec<f64> =
                if have_act { act } else { imp_in.iter().zip(&imp_out).map(|(a, b)| (a * b).sqrt()).collect() };
            let per = n / block.groups;
            let keep_per = block.keep_count(s) / block.groups;
            let mut kept = Vec::with_capacity(keep_per * block.groups);
            for g in 0..block.groups {
                let mut idx: Vec<usize> = (g * per..(g + 1) * per).collect();
                idx.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
                kept.extend_from_slice(&idx[..keep_per]);
            }
            kept.sort_unstable();
            st.kept.push(kept);
        }
        Ok(())
    }
}

impl Structured {
    /// Removes the layers of lowest block influence (the layer that changes its input least),
    /// ties by index.
    fn choose_layers(&mut self, model: &ModelSource, scores: &[f64]) -> Result<(), PassError> {
        let config = model.config().cloned().unwrap_or_default();
        let kind = ModelKind::of_config(&config).ok_or(PassError::Model("not a decoder or bert model".into()))?;
        let n = kind.blocks(&config).map_err(PassError::Model)?;
        if scores.len() != n {
            return Err(PassError::Provided(format!("{} layer scores for {n} layers", scores.len())));
        }
        let prefix = kind.blocks_prefix().ok_or(PassError::Model("an MLP has no blocks to remove".into()))?;
        let st = &mut self.state;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let mut removed = order[..st.layers_to_remove.min(n)].to_vec();
        removed.sort_unstable();
        let kept = (0..n).filter(|i| !removed.contains(i)).collect();
        st.layer_scores = scores.to_vec();
        st.layer_map = Some(LayerMap { prefix, kept, removed, experts: None });
        Ok(())
    }
}

impl Structured {
    /// Removes the lowest-scoring experts of every block (ties by index); the router keeps the
    /// rows of the survivors.
    fn choose_experts(&mut self, model: &ModelSource, scores: &[Vec<(f64, usize)>]) -> Result<(), PassError> {
        let config = model.config().cloned().unwrap_or_default();
        let g = arch::Geometry::from_config(&config).map_err(PassError::Model)?;
        if scores.len() != g.layers || scores.iter().any(|b| b.len() != g.experts) {
            return Err(PassError::Provided(format!(
                "expert scores for {} blocks, {} × {} expected",
                scores.len(),
                g.layers,
                g.experts
            )));
        }
        let st = &mut self.state;
        let mut kept_all = Vec::with_capacity(g.layers);
        for (b, s) in scores.iter().enumerate() {
            let mut order: Vec<usize> = (0..g.experts).collect();
            order.sort_by(|&x, &y| s[y].0.total_cmp(&s[x].0).then(x.cmp(&y)));
            let mut kept = order[..g.experts - st.experts_to_remove].to_vec();
            kept.sort_unstable();
            let router = g.family.hf(Role::Router, b);
            st.role.insert(router.clone(), vec![(b, Side::Rows(vec![0]))]);
            st.blocks.push(Block {
                rows_of: vec![Rows::plain(router)],
                cols_of: Vec::new(),
                size: g.experts,
                width: 1,
                groups: 1,
                original: Vec::new(),
            });
            st.kept.push(kept.clone());
            kept_all.push(kept);
        }
        st.expert_scores = scores.to_vec();
        st.layer_map = Some(LayerMap {
            prefix: "model.layers.",
            kept: (0..g.layers).collect(),
            removed: Vec::new(),
            experts: Some((g.family, kept_all)),
        });
        Ok(())
    }
}

impl Pass for Structured {
    fn name(&self) -> &'static str {
        STRUCTURED_INFO.name
    }
    fn reshapes(&self) -> bool {
        true
    }

    fn settings(&self) -> Value {
        let mut v = serde_json::to_value(&self.config).expect("config is JSON");
        let st = &self.state;
        if let (Some(map), Some(obj)) = (&st.layer_map, v.as_object_mut()) {
            if let Some((_, kept)) = &map.experts {
                let removed: Vec<Vec<usize>> = kept
                    .iter()
                    .zip(&st.expert_scores)
                    .map(|(k, s)| (0..s.len()).filter(|e| !k.contains(e)).collect())
                    .collect();
                obj.insert("removed_experts".into(), removed.into());
                let scores: Vec<Vec<f64>> =
                    st.expert_scores.iter().map(|b| b.iter().map(|s| (s.0 * 1e6).round() / 1e6).collect()).collect();
                obj.insert("expert_scores".into(), scores.into());
                let tokens: Vec<Vec<usize>> =
                    st.expert_scores.iter().map(|b| b.iter().map(|s| s.1).collect()).collect();
                obj.insert("expert_tokens".into(), tokens.into());
            } else {
                obj.insert("removed_layers".into(), map.removed.clone().into());
                obj.insert("block_influence".into(), st.layer_scores.clone().into());
            }
        }
        if let (Some((_, g)), Some(b), Some(obj)) = (&st.heads, st.blocks.first(), v.as_object_mut()) {
            obj.insert("heads_per_layer".into(), serde_json::json!([g.heads, b.keep_count(self.config.sparsity)]));
        }
        v
    }

    fn prepare(&mut self, model: &ModelSource) -> Result<(), PassError> {
        let config = model.config().cloned().unwrap_or_default();
        let s = self.config.sparsity;
        let mut st = State::default();
        match self.config.unit.as_str() {
            "neurons" => {
                st.blocks = neuron_blocks(model, &config).map_err(PassError::Model)?;
            }
            "heads" => {
                let (blocks, geometry) = head_blocks(model, &config).map_err(PassError::Model)?;
                if let Some(b) = blocks.first()
                    && b.keep_count(s) == b.size
                {
                    let per = b.size / b.groups;
                    return Err(PassError::Settings(format!(
                        "sparsity = {s} removes no head: {} per layer{}; {}",
                        b.size,
                        if b.groups > 1 { format!(" in {} KV groups of {per}", b.groups) } else { String::new() },
                        removal_hint(per)
                    )));
                }
                // A head count transformers' config class refuses: such a bundle would not load.
                let kind =
                    ModelKind::of_config(&config).ok_or(PassError::Model("not a decoder or bert model".into()))?;
                let model_type = arch::model_type(&config);
                if let (Some(b), ModelKind::Decoder(f)) = (blocks.first(), kind)
                    && f.hf_needs_heads_dividing_hidden()
                {
                    let hidden = arch::Geometry::from_config(&config).map_err(PassError::Model)?.hidden;
                    let left = b.keep_count(s);
                    if !hidden.is_multiple_of(left) {
                        let per = b.size / b.groups;
                        let ok: Vec<String> = (1..per)
                            .map(|k| k * b.groups)
                            .filter(|k| hidden.is_multiple_of(*k))
                            .map(|k| format!("{} ({k} heads)", smallest_removing((b.size - k) / b.groups, per)))
                            .collect();
                        return Err(PassError::Settings(format!(
                            "sparsity = {s} leaves {left} of {} heads, and transformers refuses a {model_type} config whose \
                             hidden_size {hidden} is not a multiple of the head count; sparsities that load: {}",
                            b.size,
                            if ok.is_empty() { "none".to_string() } else { ok.join(", ") }
                        )));
                    }
                }
                st.blocks = blocks;
                st.heads = Some((kind, geometry));
            }
            "layers" => {
                let Some(kind @ (ModelKind::Decoder(_) | ModelKind::Bert)) = ModelKind::of_config(&config) else {
                    return Err(PassError::Model(format!(
                        "model_type {:?}: whole layers are pruned in decoder ({DECODERS}) and bert models",
                        arch::model_type(&config)
                    )));
                };
                let n = kind.blocks(&config).map_err(PassError::Model)?;
                let remove = (n as f64 * s).floor() as usize;
                if remove == 0 {
                    return Err(PassError::Settings(format!(
                        "sparsity = {s} of {n} layers removes none; {}",
                        removal_hint(n)
                    )));
                }
                st.layers_to_remove = remove;
            }
            "experts" => {
                let g = Family::of_config(&config)
                    .filter(|f| f.is_moe())
                    .map(|_| arch::Geometry::from_config(&config))
                    .transpose()
                    .map_err(PassError::Model)?
                    .ok_or_else(|| {
                        PassError::Model(format!(
                            "model_type {:?}: experts are pruned in mixtures of experts (mixtral)",
                            arch::model_type(&config)
                        ))
                    })?;
                let remove = (g.experts as f64 * s).floor() as usize;
                if remove == 0 {
                    return Err(PassError::Settings(format!(
                        "sparsity = {s} of {} experts removes none; {}",
                        g.experts,
                        removal_hint(g.experts)
                    )));
                }
                if g.experts - remove < g.experts_used {
                    return Err(PassError::Settings(format!(
                        "sparsity = {s} leaves {} of {} experts, fewer than the {} each token is routed to \
                         (num_experts_per_tok)",
                        g.experts - remove,
                        g.experts,
                        g.experts_used
                    )));
                }
                st.experts_to_remove = remove;
            }
            other => return Err(PassError::Settings(format!("unit {other:?}"))),
        }
        self.state = st;
        // Without calibration the units are chosen by weight norms now; with it, once the
        // activation statistics are provided.
        if !matches!(self.config.unit.as_str(), "layers" | "experts") && self.config.calibration.is_none() {
            self.choose_units(model, &BTreeMap::new()).map_err(PassError::Model)?;
        }
        Ok(())
    }

    fn warning(&self, model: &ModelSource) -> Option<String> {
        let decoder = model.config().and_then(Family::of_config).is_some();
        (decoder && self.config.unit != "layers" && self.config.calibration.is_none()).then(|| {
            "scores decoder units by weight norms alone, which can remove the few neurons that carry massive \
             activations (SmolLM2, 25 % of neurons: perplexity 36.7 -> 734,000; with calibration 54.0): add \
             calibration = { set = \"<text>\" } to the pass"
                .into()
        })
    }

    fn needs(&self) -> Need<'_> {
        match (&self.config.calibration, self.config.unit.as_str()) {
            (None, _) => Need::Nothing,
            (Some(c), "layers") => Need::LayerScores(c),
            (Some(c), "experts") => Need::ExpertScores(c),
            (Some(c), _) => Need::Moments(c),
        }
    }

    fn provide(&mut self, model: &ModelSource, what: Provided) -> Result<(), PassError> {
        match what {
            Provided::Moments(moments) if matches!(self.needs(), Need::Moments(_)) => {
                self.choose_units(model, &moments).map_err(PassError::Provided)
            }
            Provided::LayerScores(scores) if matches!(self.needs(), Need::LayerScores(_)) => {
                self.choose_layers(model, &scores)
            }
            Provided::ExpertScores(scores) if matches!(self.needs(), Need::ExpertScores(_)) => {
                self.choose_experts(model, &scores)
            }
            other => Err(PassError::Provided(format!("unit = {:?} was given {}", self.config.unit, other.kind()))),
        }
    }

    fn layer_map(&self) -> Option<&LayerMap> {
        self.state.layer_map.as_ref()
    }

    fn plan(&self, name: &str, meta: &ParamMeta) -> Plan {
        let st = &self.state;
        let Some(roles) = st.role.get(name) else { return Plan::Keep };
        let (ParamMeta::Dense { dtype, shape } | ParamMeta::Sparse { dtype, shape, .. }) = meta else {
            return Plan::Skip("already quantized: prune before quantizing".into());
        };
        let mut shape = shape.clone();
        for (b, side) in roles {
            let block = &st.blocks[*b];
            let keep = block.keep_count(self.config.sparsity);
            match side {
                Side::Rows(at) => shape[0] -= (block.size - keep) * block.width * at.len(),
                Side::Columns => shape[1] = keep * block.width,
            }
        }
        Plan::Change(ParamMeta::Dense { dtype: *dtype, shape })
    }

    fn apply<'a>(&self, name: &str, param: Param<'a>) -> Result<Applied<'a>, String> {
        let (dtype, shape, w) = param.dense_f32().ok_or("already quantized: prune before quantizing")?;
        let st = &self.state;
        let roles = st.role.get(name).cloned().ok_or("not a tensor this pass prunes")?;
        let (mut out, mut new_shape) = (w.clone(), shape.clone());
        for (b, side) in roles {
            let (size, width) = (st.blocks[b].size, st.blocks[b].width);
            // Kept units → kept rows (columns).
            let kept: Vec<usize> = st.kept[b].iter().flat_map(|&j| j * width..(j + 1) * width).collect();
            if let Side::Rows(at) = side {
                // Rows outside the unit runs (a fused qkv_proj's key and value parts) stay.
                let mut keep = vec![true; new_shape[0]];
                for a in at {
                    keep[a..a + size * width].iter_mut().for_each(|k| *k = false);
                    for r in &kept {
                        keep[a + r] = true;
                    }
                }
                let cols: usize = new_shape[1..].iter().product();
                let mut next = Vec::with_capacity(keep.len() * cols);
                for (r, _) in keep.iter().enumerate().filter(|k| *k.1) {
                    next.extend_from_slice(&out[r * cols..(r + 1) * cols]);
                }
                out = next;
                new_shape[0] = keep.iter().filter(|k| **k).count();
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

    fn update_config(&self, config: &mut Value) {
        let st = &self.state;
        let s = self.config.sparsity;
        match self.config.unit.as_str() {
            "experts" => {
                if let Some(map) = &st.layer_map {
                    *config = map.config(config);
                }
            }
            "neurons" => {
                let widths: Vec<usize> = st.blocks.iter().map(|b| b.keep_count(s)).collect();
                arch::set_ffn_widths(config, &widths);
            }
            "heads" => {
                let Some((kind, g)) = &st.heads else { return };
                let Some(first) = st.blocks.first() else { return };
                if let ModelKind::Decoder(_) = kind {
                    let left = first.keep_count(s);
                    arch::set_decoder_heads(config, left, if g.kv == g.heads { left } else { g.kv }, g.hd);
                } else {
                    let gone: Vec<Vec<usize>> = st
                        .blocks
                        .iter()
                        .zip(&st.kept)
                        .map(|(block, kept)| {
                            let mut gone: Vec<usize> = (0..g.heads).filter(|h| !block.original.contains(h)).collect();
                            gone.extend((0..block.size).filter(|j| !kept.contains(j)).map(|j| block.original[j]));
                            gone.sort_unstable();
                            gone
                        })
                        .collect();
                    arch::set_bert_pruned_heads(config, &gone);
                }
            }
            _ => {}
        }
    }
}

fn build(recipe: &Recipe, index: usize) -> Result<Box<dyn Pass>, mcompress_recipe::Error> {
    let mut config: StructuredConfig = recipe.pass_config(index)?;
    if !matches!(config.unit.as_str(), "neurons" | "heads" | "layers" | "experts") {
        return Err(recipe.pass_error(
            index,
            format!("unit {:?}: one of \"neurons\", \"heads\", \"layers\", \"experts\"", config.unit),
        ));
    }
    if !(config.sparsity.is_finite() && (0.0..1.0).contains(&config.sparsity)) {
        return Err(recipe.pass_error(index, format!("sparsity = {}: must be in [0, 1)", config.sparsity)));
    }
    // Importances are read from the model as given: a second pass on the same structures
    // would score units the first one already removed.
    for j in 0..index {
        if recipe.passes[j].kind == STRUCTURED_INFO.name
            && let Ok(earlier) = recipe.pass_config::<StructuredConfig>(j)
            && earlier.unit == config.unit
            && !matches!(config.unit.as_str(), "layers" | "experts")
        {
            return Err(recipe.pass_error(
                index,
                format!(
                    "unit = {:?} is already pruned by pass[{j}]: use one pass with the total sparsity",
                    config.unit
                ),
            ));
        }
    }
    match (config.unit.as_str(), config.calibration.take()) {
        (unit @ ("layers" | "experts"), None) => {
            return Err(recipe.pass_error(
                index,
                format!("unit = {unit:?} needs calibration = {{ set = \"<text>\" }} to score the {unit} on"),
            ));
        }
        (unit @ ("layers" | "experts"), Some(c)) => {
            if index != 0 {
                return Err(recipe.pass_error(
                    index,
                    format!(
                        "unit = {unit:?} must be the recipe's first pass (it renumbers the {unit} later passes see)"
                    ),
                ));
            }
            config.calibration = Some(crate::quant::calibration_config(recipe, index, c)?);
        }
        (_, Some(c)) => config.calibration = Some(crate::quant::calibration_config(recipe, index, c)?),
        (_, None) => {}
    }
    Ok(Box::new(Structured { config, state: State::default() }))
}

/// Registry entry of `prune-structured`.
pub const STRUCTURED_INFO: PassInfo = PassInfo {
    name: "prune-structured",
    summary: "Remove feed-forward neurons, attention heads, whole layers (decoders, BERT; MLP neurons) or experts (mixtures): smaller matrices and config, faster everywhere",
    docs: include_str!("structured.md"),
    status: Status::Preview,
    build,
    schema: || schemars::schema_for!(StructuredConfig),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_map_renumbers_survivors_and_drops_the_rest() {
        let map = LayerMap { prefix: "model.layers.", kept: vec![0, 2, 3], removed: vec![1], experts: None };
        assert_eq!(
            map.rename("model.layers.0.mlp.up_proj.weight").as_deref(),
            Some("model.layers.0.mlp.up_proj.weight")
        );
        assert_eq!(map.rename("model.layers.1.mlp.up_proj.weight"), None);
        assert_eq!(
            map.rename("model.layers.3.input_layernorm.weight").as_deref(),
            Some("model.layers.2.input_layernorm.weight")
        );
        // Names outside the layers, or not numbered, pass through.
        assert_eq!(map.rename("model.norm.weight").as_deref(), Some("model.norm.weight"));
        assert_eq!(map.rename("model.layers.x.y").as_deref(), Some("model.layers.x.y"));
        let c = map.config(&serde_json::json!({"num_hidden_layers": 4, "pruned_heads": {"1": [0], "3": [2, 5]}}));
        assert_eq!(c["num_hidden_layers"], 3);
        assert_eq!(c["pruned_heads"], serde_json::json!({"2": [2, 5]}));
    }

    #[test]
    fn expert_map_renumbers_each_blocks_survivors() {
        let map = LayerMap {
            prefix: "model.layers.",
            kept: vec![0, 1],
            removed: vec![],
            experts: Some((Family::Mixtral, vec![vec![0, 2, 3], vec![1, 2, 3]])),
        };
        let e = |l: usize, x: usize| format!("model.layers.{l}.block_sparse_moe.experts.{x}.w2.weight");
        assert_eq!(map.rename(&e(0, 1)), None);
        assert_eq!(map.rename(&e(0, 3)), Some(e(0, 2)));
        assert_eq!(map.rename(&e(1, 0)), None);
        assert_eq!(map.rename(&e(1, 1)), Some(e(1, 0)));
        assert_eq!(map.rename(&e(2, 0)), None, "a block the map does not know");
        let router = "model.layers.1.block_sparse_moe.gate.weight";
        assert_eq!(map.rename(router).as_deref(), Some(router));
        let c = map.config(&serde_json::json!({"num_local_experts": 4, "num_hidden_layers": 2}));
        assert_eq!((c["num_local_experts"].as_u64(), c["num_hidden_layers"].as_u64()), (Some(3), Some(2)));
    }

    #[test]
    fn grouped_blocks_keep_the_same_count_per_group() {
        let b = Block { rows_of: vec![], cols_of: vec![], size: 9, width: 64, groups: 3, original: vec![] };
        assert_eq!(b.keep_count(0.34), 6);
        assert_eq!(b.keep_count(0.3), 9, "0.3 of 3 heads per group removes none");
        assert_eq!(b.keep_count(0.67), 3);
        let n = Block { rows_of: vec![], cols_of: vec![], size: 1536, width: 1, groups: 1, original: vec![] };
        assert_eq!(n.keep_count(0.5), 768);
    }

    /// A fused gate_up_proj (2 neurons of 4 in each half go) and a qkv_proj under grouped-query
    /// attention (the query part loses a head; the key and value rows stay): the plan's shapes
    /// are what apply writes, and the rows that stay are the kept units' in every run.
    #[test]
    fn fused_matrices_lose_a_units_rows_in_every_run() {
        let mut st = State::default();
        // gate_up: 4 neurons, rows 0..4 gate, 4..8 up, 2 columns; row r holds r.
        st.blocks.push(Block {
            rows_of: vec![Rows { name: "gu".into(), at: vec![0, 4], extra: 0 }],
            cols_of: vec![],
            size: 4,
            width: 1,
            groups: 1,
            original: vec![],
        });
        st.kept.push(vec![1, 3]);
        st.role.insert("gu".into(), vec![(0, Side::Rows(vec![0, 4]))]);
        // qkv: 2 query heads of width 2, then k and v (2 rows each) that stay.
        st.blocks.push(Block {
            rows_of: vec![Rows { name: "qkv".into(), at: vec![0], extra: 4 }],
            cols_of: vec![],
            size: 2,
            width: 2,
            groups: 1,
            original: vec![],
        });
        st.kept.push(vec![1]);
        st.role.insert("qkv".into(), vec![(1, Side::Rows(vec![0]))]);
        let pass = Structured {
            config: StructuredConfig { unit: "neurons".into(), sparsity: 0.5, calibration: None },
            state: st,
        };
        for (name, rows, want) in [("gu", 8, vec![1.0, 3.0, 5.0, 7.0]), ("qkv", 8, vec![2.0, 3.0, 4.0, 5.0, 6.0, 7.0])]
        {
            let data: Vec<f32> = (0..rows).flat_map(|r| [r as f32, r as f32]).collect();
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            let meta = ParamMeta::Dense { dtype: mcompress_core::DType::F32, shape: vec![rows, 2] };
            let Plan::Change(ParamMeta::Dense { shape, .. }) = pass.plan(name, &meta) else { panic!("{name}") };
            let param = Param::Dense { dtype: mcompress_core::DType::F32, shape: vec![rows, 2], data: bytes.into() };
            let out = pass.apply(name, param).unwrap().param;
            let (_, got_shape, got) = out.dense_f32().unwrap();
            assert_eq!(got_shape, shape, "{name}: plan and apply agree");
            let firsts: Vec<f32> = got.chunks(2).map(|r| r[0]).collect();
            assert_eq!(firsts, want, "{name}");
        }
    }

    #[test]
    fn suggested_sparsity_removes_one() {
        assert_eq!(removal_hint(1), "a single one cannot be removed");
        for (n, want) in [(2, "0.500"), (3, "0.334"), (12, "0.084"), (30, "0.034"), (1000, "0.001")] {
            let got = smallest_removing(1, n);
            assert_eq!(got, want, "{n}");
            let s: f64 = got.parse().unwrap();
            assert!((n as f64 * s).floor() >= 1.0, "{n}: {s}");
        }
    }
}
