//! The three architectures mcompress evaluates, written again on burn tensors so autodiff can
//! train them: an MLP, a BERT encoder with mean pooling, and a llama decoder. Every weight is a
//! rank-2 tensor (vectors as `[1, n]`, which broadcast over rows), looked up by its safetensors
//! name; the same code runs the teacher (plain tensors) and the student (tensors that require
//! gradients).

// Tensor code reads best with the usual short names (b, t, h, x, q, k, v).
#![allow(clippy::many_single_char_names)]

use std::collections::BTreeMap;

use burn::tensor::activation::{gelu, relu, silu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};

use mcompress_core::arch::{BertGeometry, BertRole, DECODERS, Geometry, MlpGeometry, ModelKind, Role, model_type};

use crate::{Error, Result};

/// One model's weights on a device.
#[derive(Debug, Clone)]
pub(crate) struct Net {
    pub(crate) arch: Arch,
    pub(crate) w: BTreeMap<String, Tensor<2>>,
}

/// Architecture and the config values its forward pass needs.
#[derive(Debug, Clone)]
pub(crate) enum Arch {
    Mlp {
        layers: Vec<String>,
        input_scale: f32,
    },
    Bert {
        layers: usize,
        heads: usize,
        eps: f64,
    },
    /// A decoder of any family the architecture module knows (llama, Qwen2, Gemma 3).
    Decoder(Box<Geometry>),
}

/// What a forward pass returns: logits (MLP, llama) and the last hidden state (BERT, llama).
pub(crate) struct Out {
    pub(crate) logits: Option<Tensor<2>>,
    pub(crate) hidden: Tensor<2>,
}

/// A training batch on the device.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Batch {
    /// MLP rows `[b, features]`.
    Rows(Tensor<2>),
    /// Token ids `[b, t]` with a 0/1 mask of real tokens `[b, t]` (BERT pads; llama does not).
    Tokens { ids: Tensor<2, Int>, mask: Tensor<2>, b: usize, t: usize },
}

impl Arch {
    /// Reads the architecture from config.json.
    pub(crate) fn from_config(config: &serde_json::Value) -> Result<Arch> {
        match ModelKind::of_config(config) {
            Some(ModelKind::Mlp) => {
                let g = MlpGeometry::from_config(config).map_err(Error::Model)?;
                Ok(Arch::Mlp { layers: g.layers, input_scale: g.input_scale })
            }
            Some(ModelKind::Bert) => {
                let g = BertGeometry::from_config(config).map_err(Error::Model)?;
                Ok(Arch::Bert { layers: g.layers, heads: g.heads, eps: g.eps })
            }
            Some(ModelKind::Decoder(_)) => {
                Ok(Arch::Decoder(Box::new(Geometry::from_config(config).map_err(Error::Model)?)))
            }
            None => Err(Error::Model(format!(
                "distillation trains mlp, bert and decoder ({DECODERS}) models; this model_type is {:?}",
                model_type(config)
            ))),
        }
    }
}

impl Net {
    /// Uploads the tensors the architecture uses (vectors as `[1, n]`).
    pub(crate) fn load(arch: Arch, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, device: &Device) -> Result<Net> {
        let mut w = BTreeMap::new();
        for (name, (shape, data)) in tensors {
            let shape2 = match shape.as_slice() {
                [n] => [1, *n],
                [r, c] => [*r, *c],
                _ => continue,
            };
            w.insert(name.clone(), Tensor::<2>::from_data(TensorData::new(data.clone(), shape2), device));
        }
        let net = Net { arch, w };
        net.check()?;
        Ok(net)
    }

    fn check(&self) -> Result<()> {
        let need: Vec<String> = match &self.arch {
            Arch::Mlp { layers, .. } => {
                layers.iter().flat_map(|l| [format!("{l}.weight"), format!("{l}.bias")]).collect()
            }
            Arch::Bert { layers, .. } => {
                let mut v: Vec<String> = BertRole::EMBEDDINGS.iter().map(|r| r.weight(0)).collect();
                for i in 0..*layers {
                    for r in [BertRole::Query, BertRole::Key, BertRole::Value, BertRole::Inter, BertRole::Out] {
                        v.push(r.weight(i));
                    }
                }
                v
            }
            // Every tensor of the family except the output matrix (a model without one reads
            // the embedding as its head).
            Arch::Decoder(g) => g.expected().into_iter().filter(|e| e.1 != Role::Output).map(|e| e.0).collect(),
        };
        match need.iter().find(|n| !self.w.contains_key(*n)) {
            Some(n) => Err(Error::Model(format!("{n} missing"))),
            None => Ok(()),
        }
    }

    fn get(&self, name: &str) -> Tensor<2> {
        self.w[name].clone()
    }

    /// `x · Wᵀ (+ b)` for the linear layer `p` (`p.weight`, optional `p.bias`).
    fn linear(&self, p: &str, x: Tensor<2>) -> Tensor<2> {
        let y = x.matmul(self.get(&format!("{p}.weight")).transpose());
        match self.w.get(&format!("{p}.bias")) {
            Some(b) => y + b.clone(),
            None => y,
        }
    }

    fn layer_norm(&self, p: &str, x: Tensor<2>, eps: f64) -> Tensor<2> {
        let mean = x.clone().mean_dim(1);
        let c = x - mean;
        let var = c.clone().square().mean_dim(1);
        c / var.add_scalar(eps).sqrt() * self.get(&format!("{p}.weight")) + self.get(&format!("{p}.bias"))
    }

    /// The forward pass.
    pub(crate) fn forward(&self, batch: &Batch) -> Result<Out> {
        match (&self.arch, batch) {
            (Arch::Mlp { layers, input_scale }, Batch::Rows(x)) => {
                let mut x = x.clone().mul_scalar(*input_scale);
                for (i, l) in layers.iter().enumerate() {
                    x = self.linear(l, x);
                    if i + 1 < layers.len() {
                        x = relu(x);
                    }
                }
                Ok(Out { logits: Some(x.clone()), hidden: x })
            }
            (Arch::Bert { layers, heads, eps }, Batch::Tokens { ids, mask, b, t }) => {
                Ok(self.bert(*layers, *heads, *eps, ids, mask, *b, *t))
            }
            (Arch::Decoder(g), Batch::Tokens { ids, b, t, .. }) => Ok(self.decoder(g, ids, *b, *t)),
            _ => Err(Error::Model("batch does not match the architecture".into())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn bert(
        &self,
        layers: usize,
        heads: usize,
        eps: f64,
        ids: &Tensor<2, Int>,
        mask: &Tensor<2>,
        b: usize,
        t: usize,
    ) -> Out {
        let device = ids.device();
        let word = self.get(&BertRole::WordEmbed.weight(0));
        let h = word.dims()[1];
        let hd = h / heads;
        let flat = ids.clone().reshape([b * t]);
        let pos_ids = Tensor::<1, Int>::arange(0..t as i64, &device);
        let pos = self.get(&BertRole::PosEmbed.weight(0)).select(0, pos_ids); // [t, h]
        let typ = self.get(&BertRole::TypeEmbed.weight(0)).narrow(0, 0, 1); // [1, h]
        let x = word.select(0, flat).reshape([b, t, h]) + pos.unsqueeze_dim::<3>(0) + typ.unsqueeze_dim::<3>(0);
        let mut x = self.layer_norm(&BertRole::EmbedNorm.module(0), x.reshape([b * t, h]), eps);
        // Padding keys get −10⁴ added to their scores (BERT's extended attention mask).
        let key_bias = mask.clone().sub_scalar(1.0).mul_scalar(1.0e4).reshape([b, 1, 1, t]);
        for i in 0..layers {
            let m = |r: BertRole| r.module(i);
            // Heads left in this layer (config.json's `pruned_heads` may have removed some).
            let lh = self.get(&BertRole::Query.weight(i)).dims()[0] / hd;
            let split = |y: Tensor<2>| y.reshape([b, t, lh, hd]).swap_dims(1, 2);
            let q = split(self.linear(&m(BertRole::Query), x.clone()));
            let k = split(self.linear(&m(BertRole::Key), x.clone()));
            let v = split(self.linear(&m(BertRole::Value), x.clone()));
            let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (hd as f64).sqrt()) + key_bias.clone();
            let ctx = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b * t, lh * hd]);
            let a = self.linear(&m(BertRole::AttnOut), ctx) + x;
            let a = self.layer_norm(&m(BertRole::AttnNorm), a, eps);
            let f = gelu(self.linear(&m(BertRole::Inter), a.clone()));
            let y = self.linear(&m(BertRole::Out), f) + a;
            x = self.layer_norm(&m(BertRole::OutNorm), y, eps);
        }
        Out { logits: None, hidden: x }
    }

    /// RMSNorm with gain `offset + w` (Gemma: 1 + w) over the last dim of `[rows, d]`.
    fn rms_norm_off(&self, name: &str, x: Tensor<2>, eps: f64, offset: f32) -> Tensor<2> {
        let ms = x.clone().square().mean_dim(1);
        let w = self.get(name);
        let w = if offset == 0.0 { w } else { w.add_scalar(offset) };
        x / ms.add_scalar(eps).sqrt() * w
    }

    /// Block `i`'s mixture of experts on its normed input `[n, hidden]`, as a dense sum every
    /// expert computes: each token's weight for an expert is its softmax probability when the
    /// expert is among its `experts_used` largest (renormalized over them where the family does),
    /// else 0 — the eval's routing, with gradients through the router as transformers has them.
    /// Every expert runs on every token (`experts / experts_used` times the routed work; fine for
    /// the small mixtures distillation trains here).
    fn experts(&self, g: &Geometry, i: usize, hn: &Tensor<2>) -> Tensor<2> {
        let f = g.family;
        let [n, _] = hn.dims();
        let e = g.experts;
        let router = f.hf(Role::Router, i).trim_end_matches(".weight").to_string();
        let p = softmax(self.linear(&router, hn.clone()), 1);
        let kth = p.clone().topk(g.experts_used, 1).narrow(1, g.experts_used - 1, 1).expand([n, e]);
        let mut w = p.clone() * p.greater_equal(kth).float();
        if g.norm_topk {
            let sum = w.clone().sum_dim(1).expand([n, e]);
            w = w / sum;
        }
        let expert = |r: Role, x: usize| f.hf_expert(r, i, x).trim_end_matches(".weight").to_string();
        let mut out: Option<Tensor<2>> = None;
        for x in 0..e {
            let act = silu(self.linear(&expert(Role::ExpertGate, x), hn.clone()))
                * self.linear(&expert(Role::ExpertUp, x), hn.clone());
            let y = self.linear(&expert(Role::ExpertDown, x), act) * w.clone().narrow(1, x, 1).expand([n, g.hidden]);
            out = Some(match out {
                Some(o) => o + y,
                None => y,
            });
        }
        out.unwrap_or_else(|| hn.zeros_like())
    }

    /// The decoder of the eval runtime (`mcompress_eval::decoder`), in burn: the same families,
    /// names from the architecture table.
    #[allow(clippy::too_many_lines)] // one forward pass, step for step as the eval's
    fn decoder(&self, g: &Geometry, ids: &Tensor<2, Int>, b: usize, t: usize) -> Out {
        let f = g.family;
        let (heads, kv_heads, hd, eps) = (g.heads, g.kv_heads, g.head_dim, g.eps);
        let off = f.gguf_norm_offset();
        let device = ids.device();
        let embed = self.get(&f.hf(Role::Embed, 0));
        let group = heads / kv_heads;
        let mut x = embed.clone().select(0, ids.clone().reshape([b * t]));
        if f.scales_embeddings() {
            x = x.mul_scalar(g.embed_scale());
        }
        // Rotary embeddings, Hugging Face rotate_half layout: cos/sin [1, 1, t, hd], per base.
        let half = hd / 2;
        let tables = |theta: f64| {
            let mut cos = Vec::with_capacity(t * hd);
            let mut sin = Vec::with_capacity(t * hd);
            for pos in 0..t {
                for j in 0..hd {
                    let inv = 1.0 / theta.powf((2 * (j % half)) as f64 / hd as f64);
                    let a = pos as f64 * inv;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
            let c = Tensor::<2>::from_data(TensorData::new(cos, [t, hd]), &device).reshape([1, 1, t, hd]);
            let s = Tensor::<2>::from_data(TensorData::new(sin, [t, hd]), &device).reshape([1, 1, t, hd]);
            (c, s)
        };
        // One table per distinct base (Gemma 3: the global and the local one).
        let mut rope_tables = BTreeMap::new();
        for i in 0..g.layers {
            let theta = g.layer_rope_theta(i);
            rope_tables.entry(theta.to_bits()).or_insert_with(|| tables(theta));
        }
        let rope = |x: Tensor<4>, (cos, sin): &(Tensor<4>, Tensor<4>)| {
            let x1 = x.clone().narrow(3, 0, half);
            let x2 = x.clone().narrow(3, half, half);
            let rot = Tensor::cat(vec![x2.neg(), x1], 3);
            x * cos.clone() + rot * sin.clone()
        };
        // Causal mask (−∞ above the diagonal), and per window size the sliding one.
        let mask = |window: Option<usize>| {
            let mut m = vec![0f32; t * t];
            for i in 0..t {
                for j in 0..t {
                    if j > i || window.is_some_and(|w| i - j >= w) {
                        m[i * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
            Tensor::<2>::from_data(TensorData::new(m, [t, t]), &device).reshape([1, 1, t, t])
        };
        let causal = mask(None);
        let mut masks: BTreeMap<usize, Tensor<4>> = BTreeMap::new();
        for w in g.windows.iter().flatten() {
            masks.entry(*w).or_insert_with(|| mask(Some(*w)));
        }
        let name = |r: Role, i: usize| f.hf(r, i);
        let module = |r: Role, i: usize| f.hf(r, i).trim_end_matches(".weight").to_string();
        for i in 0..g.layers {
            let hn = self.rms_norm_off(&name(Role::AttnNorm, i), x.clone(), eps, off);
            let (mut q, mut k, v) = if f.fuses_projections() {
                // Phi-3's qkv_proj: the query, key and value rows stacked.
                let qkv = self.linear(&module(Role::Qkv, i), hn);
                let (qd, kvd) = (heads * hd, kv_heads * hd);
                (qkv.clone().narrow(1, 0, qd), qkv.clone().narrow(1, qd, kvd), qkv.narrow(1, qd + kvd, kvd))
            } else {
                let q = self.linear(&module(Role::Q, i), hn.clone());
                (q, self.linear(&module(Role::K, i), hn.clone()), self.linear(&module(Role::V, i), hn))
            };
            let v = v.reshape([b, t, kv_heads, hd]).swap_dims(1, 2);
            if f.has(Role::QNorm) {
                q = self.rms_norm_off(&name(Role::QNorm, i), q.reshape([b * t * heads, hd]), eps, off);
                k = self.rms_norm_off(&name(Role::KNorm, i), k.reshape([b * t * kv_heads, hd]), eps, off);
            }
            let q = q.reshape([b, t, heads, hd]).swap_dims(1, 2);
            let k = k.reshape([b, t, kv_heads, hd]).swap_dims(1, 2);
            let window = g.windows[i];
            let table = &rope_tables[&g.layer_rope_theta(i).to_bits()];
            let (q, k) = (rope(q, table), rope(k, table));
            // Grouped-query attention: each KV head serves `group` query heads.
            let expand = |y: Tensor<4>| {
                y.reshape([b, kv_heads, 1, t, hd]).expand([b, kv_heads, group, t, hd]).reshape([b, heads, t, hd])
            };
            let (k, v) = (expand(k), expand(v));
            let m = window.map_or_else(|| causal.clone(), |w| masks[&w].clone());
            let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(g.attn_scale) + m;
            let ctx = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b * t, heads * hd]);
            let mut o = self.linear(&module(Role::O, i), ctx);
            if f.has(Role::PostAttnNorm) {
                o = self.rms_norm_off(&name(Role::PostAttnNorm, i), o, eps, off);
            }
            x = x + o;
            let hn = self.rms_norm_off(&name(Role::FfnNorm, i), x.clone(), eps, off);
            if f.is_moe() {
                x = x + self.experts(g, i, &hn);
                continue;
            }
            let (gate, up) = if f.fuses_projections() {
                // Phi-3's gate_up_proj: the gate rows, then the up rows.
                let gu = self.linear(&module(Role::GateUp, i), hn);
                let half = gu.dims()[1] / 2;
                (gu.clone().narrow(1, 0, half), gu.narrow(1, half, half))
            } else {
                (self.linear(&module(Role::Gate, i), hn.clone()), self.linear(&module(Role::Up, i), hn))
            };
            let act = if f.gelu_mlp() {
                // GELU, tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
                let inner = (gate.clone() + gate.clone().powi_scalar(3).mul_scalar(0.044_715)).mul_scalar(0.797_884_6);
                gate.mul_scalar(0.5) * inner.tanh().add_scalar(1.0)
            } else {
                silu(gate)
            };
            let mut d = self.linear(&module(Role::Down, i), act * up);
            if f.has(Role::PostFfnNorm) {
                d = self.rms_norm_off(&name(Role::PostFfnNorm, i), d, eps, off);
            }
            x = x + d;
        }
        let hidden = self.rms_norm_off(&name(Role::OutputNorm, 0), x, eps, off);
        let head = self.w.get(&name(Role::Output, 0)).cloned().unwrap_or(embed);
        let logits = hidden.clone().matmul(head.transpose());
        Out { logits: Some(logits), hidden }
    }
}

#[cfg(test)]
mod tests {
    //! The burn models against the eval runtime's (plain Rust) on the real fixtures: the student
    //! is trained on what the eval will measure.

    use std::path::PathBuf;

    use super::*;
    use mcompress_core::ModelSource;
    use mcompress_eval::linear::Device as EvalDevice;
    use mcompress_eval::weights::Weights;

    fn fixture(rel: &str) -> Option<PathBuf> {
        let base = std::env::var_os("MCOMPRESS_FIXTURES").map_or_else(
            || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/mcompress/fixtures"),
            PathBuf::from,
        );
        let p = base.join(rel);
        if p.exists() {
            Some(p)
        } else {
            assert!(std::env::var_os("CI").is_none(), "{} missing in CI", p.display());
            None
        }
    }

    fn load(path: &std::path::Path) -> (serde_json::Value, mcompress_passes::DenseTensors) {
        let m = ModelSource::open(path).unwrap();
        (m.config().cloned().unwrap(), mcompress_passes::pipeline::transformed_f32(&m, &[]).unwrap())
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn test_mlp_matches_the_eval_runtime() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/digits-mlp");
        let (config, tensors) = load(&dir);
        let eval =
            mcompress_eval::mlp::Mlp::load(&config, &Weights::from_dense(tensors.clone()), &EvalDevice::Cpu).unwrap();
        let x: Vec<f32> = (0..3 * 64).map(|i| (i * 7 % 17) as f32).collect();
        let want = eval.forward(&x).unwrap();
        let net = Net::load(Arch::from_config(&config).unwrap(), &tensors, &Device::flex()).unwrap();
        let out = net.forward(&Batch::Rows(Tensor::from_data(TensorData::new(x, [3, 64]), &Device::flex()))).unwrap();
        let got = out.logits.unwrap().into_data().try_to_vec::<f32>().unwrap();
        assert!(max_rel(&got, &want) < 1e-5, "{got:?} vs {want:?}");
    }

    /// The burn decoder's logits against the eval's on a dozen tokens of a real model.
    fn decoder_matches(rel: &str, ids: &[u32]) {
        let Some(gguf) = fixture(rel) else { return };
        let (config, tensors) = load(&gguf);
        logits_match(rel, &config, &tensors, ids);
    }

    /// The burn decoder's logits against the eval's on `ids`, within 1e-4 relative.
    fn logits_match(label: &str, config: &serde_json::Value, tensors: &mcompress_passes::DenseTensors, ids: &[u32]) {
        let eval =
            mcompress_eval::decoder::Decoder::load(config, &Weights::from_dense(tensors.clone()), &EvalDevice::Cpu)
                .unwrap();
        let want = eval.logits(ids).unwrap();
        let device = Device::flex();
        let net = Net::load(Arch::from_config(config).unwrap(), tensors, &device).unwrap();
        let t = ids.len();
        let batch = Batch::Tokens {
            ids: Tensor::<2, Int>::from_data(
                TensorData::new(ids.iter().map(|&v| i64::from(v)).collect(), [1, t]),
                &device,
            ),
            mask: Tensor::ones([1, t], &device),
            b: 1,
            t,
        };
        let got = net.forward(&batch).unwrap().logits.unwrap().into_data().try_to_vec::<f32>().unwrap();
        assert!(max_rel(&got, &want) < 1e-4, "{label}: max relative difference {}", max_rel(&got, &want));
    }

    #[test]
    fn test_llama_matches_the_eval_runtime() {
        decoder_matches(
            "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            &[1, 504, 3458, 282, 260, 1345, 28, 339, 2210, 30, 9, 14],
        );
    }

    #[test]
    fn test_qwen2_matches_the_eval_runtime() {
        decoder_matches(
            "qwen2/qwen2.5-coder-0.5b-instruct.gguf",
            &[785, 6722, 315, 9625, 374, 12095, 13, 12095, 374, 7407],
        );
    }

    #[test]
    fn test_gemma3_matches_the_eval_runtime() {
        decoder_matches("gemma3/gemma-3-270m-q4_k_m.gguf", &[2, 818, 5279, 529, 7001, 563, 506, 5279, 529, 506, 2891]);
    }

    /// A small decoder of pseudo-random weights (every tensor its config's geometry asks for).
    fn tiny_decoder(config: &serde_json::Value) -> mcompress_passes::DenseTensors {
        let g = Geometry::from_config(config).unwrap();
        let mut seed = 7u64;
        let mut out = mcompress_passes::DenseTensors::new();
        for (name, role, shape) in g.expected() {
            let v: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    if role.is_norm() { 1.0 + 0.2 * u } else { u * 0.6 }
                })
                .collect();
            out.insert(name, (shape, v));
        }
        out
    }

    /// Families no real fixture has: mixtures of experts, and Phi-3's fused projections.
    #[test]
    fn test_mixtures_and_fused_projections_match_the_eval_runtime() {
        for (model_type, extra) in [
            ("phi3", serde_json::json!({})),
            ("mixtral", serde_json::json!({"num_local_experts": 4, "num_experts_per_tok": 2})),
            (
                "qwen3_moe",
                serde_json::json!({"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": false,
                "moe_intermediate_size": 24, "head_dim": 8}),
            ),
        ] {
            let mut config = serde_json::json!({"model_type": model_type, "hidden_size": 16, "num_attention_heads": 2,
                "num_key_value_heads": 1, "num_hidden_layers": 2, "intermediate_size": 24, "vocab_size": 40});
            for (k, v) in extra.as_object().unwrap() {
                config[k] = v.clone();
            }
            let tensors = tiny_decoder(&config);
            logits_match(model_type, &config, &tensors, &[1, 5, 9, 3, 22, 17, 8, 39, 0, 12]);
        }
    }

    #[test]
    fn test_bert_matches_the_eval_runtime() {
        let Some(st) = fixture("all-MiniLM-L6-v2/model.safetensors") else { return };
        let (config, tensors) = load(st.parent().unwrap());
        let eval =
            mcompress_eval::bert::Bert::load(&config, &Weights::from_dense(tensors.clone()), &EvalDevice::Cpu).unwrap();
        // Two sentences of different lengths in one padded batch.
        let (a, b): (Vec<u32>, Vec<u32>) =
            (vec![101, 7592, 2088, 102], vec![101, 1996, 4937, 2938, 2006, 1996, 13523, 102]);
        let want = eval.embed_batch(&[&a, &b]).unwrap();
        let device = Device::flex();
        let net = Net::load(Arch::from_config(&config).unwrap(), &tensors, &device).unwrap();
        let t = b.len();
        let mut ids: Vec<i64> = a.iter().map(|&v| i64::from(v)).collect();
        ids.resize(t, 0);
        ids.extend(b.iter().map(|&v| i64::from(v)));
        let mut mask = vec![1f32; a.len()];
        mask.resize(t, 0.0);
        mask.extend(vec![1f32; t]);
        let batch = Batch::Tokens {
            ids: Tensor::<2, Int>::from_data(TensorData::new(ids, [2, t]), &device),
            mask: Tensor::from_data(TensorData::new(mask.clone(), [2, t]), &device),
            b: 2,
            t,
        };
        let hidden = net.forward(&batch).unwrap().hidden.into_data().try_to_vec::<f32>().unwrap();
        let h = hidden.len() / (2 * t);
        for (s, want) in want.iter().enumerate() {
            let mut e = vec![0f32; h];
            for p in 0..t {
                if mask[s * t + p] > 0.0 {
                    for d in 0..h {
                        e[d] += hidden[(s * t + p) * h + d];
                    }
                }
            }
            let n = e.iter().map(|v| v * v).sum::<f32>().sqrt();
            let e: Vec<f32> = e.iter().map(|v| v / n).collect();
            assert!(max_rel(&e, want) < 1e-4, "sentence {s}: {}", max_rel(&e, want));
        }
    }
}
