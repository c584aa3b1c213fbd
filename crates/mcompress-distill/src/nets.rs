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
    Mlp { layers: Vec<String>, input_scale: f32 },
    Bert { layers: usize, heads: usize, eps: f64 },
    Llama { layers: usize, heads: usize, kv_heads: usize, hd: usize, eps: f64, theta: f64, tied: bool },
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

fn cfg_usize(config: &serde_json::Value, k: &str) -> Result<usize> {
    mcompress_core::config::dim(config, k).map_err(Error::Model)
}

impl Arch {
    /// Reads the architecture from config.json.
    pub(crate) fn from_config(config: &serde_json::Value) -> Result<Arch> {
        match config["model_type"].as_str().unwrap_or("") {
            "mlp" => {
                let layers = config["layer_names"]
                    .as_array()
                    .ok_or_else(|| Error::Model("config.json: layer_names missing".into()))?
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| Error::Model("config.json: layer_names must be strings".into()))?;
                let input_scale = mcompress_core::config::input_scale(config).map_err(Error::Model)?;
                Ok(Arch::Mlp { layers, input_scale })
            }
            "bert" => Ok(Arch::Bert {
                layers: cfg_usize(config, "num_hidden_layers")?,
                heads: cfg_usize(config, "num_attention_heads")?,
                eps: config["layer_norm_eps"].as_f64().unwrap_or(1e-12),
            }),
            "llama" => {
                let heads = cfg_usize(config, "num_attention_heads")?;
                let hidden = cfg_usize(config, "hidden_size")?;
                // Head-pruned models keep their head width in `head_dim`.
                let hd = config["head_dim"].as_u64().map_or(hidden / heads.max(1), |v| v as usize);
                Ok(Arch::Llama {
                    layers: cfg_usize(config, "num_hidden_layers")?,
                    heads,
                    kv_heads: config["num_key_value_heads"].as_u64().map_or(heads, |v| v as usize),
                    hd,
                    eps: config["rms_norm_eps"].as_f64().unwrap_or(1e-5),
                    theta: config["rope_theta"].as_f64().unwrap_or(10000.0),
                    tied: config["tie_word_embeddings"].as_bool().unwrap_or(false),
                })
            }
            other => Err(Error::Model(format!(
                "distillation trains mlp, bert and llama models; this model_type is {other:?}"
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
                let mut v: Vec<String> = ["word_embeddings", "position_embeddings", "token_type_embeddings"]
                    .iter()
                    .map(|n| format!("embeddings.{n}.weight"))
                    .collect();
                for i in 0..*layers {
                    let p = format!("encoder.layer.{i}");
                    for l in ["attention.self.query", "attention.self.key", "attention.self.value"] {
                        v.push(format!("{p}.{l}.weight"));
                    }
                    v.push(format!("{p}.intermediate.dense.weight"));
                    v.push(format!("{p}.output.dense.weight"));
                }
                v
            }
            Arch::Llama { layers, tied, .. } => {
                let mut v = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
                if !tied {
                    v.push("lm_head.weight".into());
                }
                for i in 0..*layers {
                    for n in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] {
                        v.push(format!("model.layers.{i}.{n}.weight"));
                    }
                    for n in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
                        v.push(format!("model.layers.{i}.{n}.weight"));
                    }
                }
                v
            }
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

    fn rms_norm(&self, name: &str, x: Tensor<2>, eps: f64) -> Tensor<2> {
        let ms = x.clone().square().mean_dim(1);
        x / ms.add_scalar(eps).sqrt() * self.get(name)
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
            (Arch::Llama { .. }, Batch::Tokens { ids, b, t, .. }) => Ok(self.llama(ids, *b, *t)),
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
        let word = self.get("embeddings.word_embeddings.weight");
        let h = word.dims()[1];
        let hd = h / heads;
        let flat = ids.clone().reshape([b * t]);
        let pos_ids = Tensor::<1, Int>::arange(0..t as i64, &device);
        let pos = self.get("embeddings.position_embeddings.weight").select(0, pos_ids); // [t, h]
        let typ = self.get("embeddings.token_type_embeddings.weight").narrow(0, 0, 1); // [1, h]
        let x = word.select(0, flat).reshape([b, t, h]) + pos.unsqueeze_dim::<3>(0) + typ.unsqueeze_dim::<3>(0);
        let mut x = self.layer_norm("embeddings.LayerNorm", x.reshape([b * t, h]), eps);
        // Padding keys get −10⁴ added to their scores (BERT's extended attention mask).
        let key_bias = mask.clone().sub_scalar(1.0).mul_scalar(1.0e4).reshape([b, 1, 1, t]);
        for i in 0..layers {
            let p = format!("encoder.layer.{i}");
            // Heads left in this layer (config.json's `pruned_heads` may have removed some).
            let lh = self.get(&format!("{p}.attention.self.query.weight")).dims()[0] / hd;
            let split = |y: Tensor<2>| y.reshape([b, t, lh, hd]).swap_dims(1, 2);
            let q = split(self.linear(&format!("{p}.attention.self.query"), x.clone()));
            let k = split(self.linear(&format!("{p}.attention.self.key"), x.clone()));
            let v = split(self.linear(&format!("{p}.attention.self.value"), x.clone()));
            let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (hd as f64).sqrt()) + key_bias.clone();
            let ctx = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b * t, lh * hd]);
            let a = self.linear(&format!("{p}.attention.output.dense"), ctx) + x;
            let a = self.layer_norm(&format!("{p}.attention.output.LayerNorm"), a, eps);
            let f = gelu(self.linear(&format!("{p}.intermediate.dense"), a.clone()));
            let y = self.linear(&format!("{p}.output.dense"), f) + a;
            x = self.layer_norm(&format!("{p}.output.LayerNorm"), y, eps);
        }
        Out { logits: None, hidden: x }
    }

    fn llama(&self, ids: &Tensor<2, Int>, b: usize, t: usize) -> Out {
        let Arch::Llama { layers, heads, kv_heads, hd, eps, theta, tied } = self.arch.clone() else {
            unreachable!("llama() runs llama nets")
        };
        let device = ids.device();
        let embed = self.get("model.embed_tokens.weight");
        let group = heads / kv_heads;
        let mut x = embed.clone().select(0, ids.clone().reshape([b * t]));
        // Rotary embeddings, Hugging Face rotate_half layout: cos/sin [1, 1, t, hd].
        let half = hd / 2;
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
        let cos = Tensor::<2>::from_data(TensorData::new(cos, [t, hd]), &device).reshape([1, 1, t, hd]);
        let sin = Tensor::<2>::from_data(TensorData::new(sin, [t, hd]), &device).reshape([1, 1, t, hd]);
        let rope = |x: Tensor<4>| {
            let x1 = x.clone().narrow(3, 0, half);
            let x2 = x.clone().narrow(3, half, half);
            let rot = Tensor::cat(vec![x2.neg(), x1], 3);
            x * cos.clone() + rot * sin.clone()
        };
        // Causal mask: −∞ above the diagonal.
        let mut m = vec![0f32; t * t];
        for i in 0..t {
            for j in i + 1..t {
                m[i * t + j] = f32::NEG_INFINITY;
            }
        }
        let causal = Tensor::<2>::from_data(TensorData::new(m, [t, t]), &device).reshape([1, 1, t, t]);
        for i in 0..layers {
            let p = format!("model.layers.{i}");
            let hn = self.rms_norm(&format!("{p}.input_layernorm.weight"), x.clone(), eps);
            let q =
                self.linear(&format!("{p}.self_attn.q_proj"), hn.clone()).reshape([b, t, heads, hd]).swap_dims(1, 2);
            let k =
                self.linear(&format!("{p}.self_attn.k_proj"), hn.clone()).reshape([b, t, kv_heads, hd]).swap_dims(1, 2);
            let v = self.linear(&format!("{p}.self_attn.v_proj"), hn).reshape([b, t, kv_heads, hd]).swap_dims(1, 2);
            let (q, k) = (rope(q), rope(k));
            // Grouped-query attention: each KV head serves `group` query heads.
            let expand = |y: Tensor<4>| {
                y.reshape([b, kv_heads, 1, t, hd]).expand([b, kv_heads, group, t, hd]).reshape([b, heads, t, hd])
            };
            let (k, v) = (expand(k), expand(v));
            let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (hd as f64).sqrt()) + causal.clone();
            let ctx = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b * t, heads * hd]);
            x = x + self.linear(&format!("{p}.self_attn.o_proj"), ctx);
            let hn = self.rms_norm(&format!("{p}.post_attention_layernorm.weight"), x.clone(), eps);
            let g = silu(self.linear(&format!("{p}.mlp.gate_proj"), hn.clone()))
                * self.linear(&format!("{p}.mlp.up_proj"), hn);
            x = x + self.linear(&format!("{p}.mlp.down_proj"), g);
        }
        let hidden = self.rms_norm("model.norm.weight", x, eps);
        let head = if tied { embed } else { self.get("lm_head.weight") };
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

    fn load(path: &std::path::Path) -> (serde_json::Value, mcompress_passes::pipeline::DenseTensors) {
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

    #[test]
    fn test_llama_matches_the_eval_runtime() {
        let Some(gguf) = fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
        let (config, tensors) = load(&gguf);
        let eval =
            mcompress_eval::decoder::Decoder::load(&config, &Weights::from_dense(tensors.clone()), &EvalDevice::Cpu)
                .unwrap();
        let ids: Vec<u32> = vec![1, 504, 3458, 282, 260, 1345, 28, 339, 2210, 30, 9, 14];
        let want = eval.logits(&ids).unwrap();
        let device = Device::flex();
        let net = Net::load(Arch::from_config(&config).unwrap(), &tensors, &device).unwrap();
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
        assert!(max_rel(&got, &want) < 1e-4, "max relative difference {}", max_rel(&got, &want));
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
