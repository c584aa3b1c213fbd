//! Llama decoder (`model_type = "llama"`, e.g. SmolLM2 from its GGUF): RMSNorm, rotary
//! embeddings in the Hugging Face `rotate_half` layout, grouped-query attention, SwiGLU MLP,
//! tied or separate lm_head. Plain f32 Rust (the CPU reference), following the numpy oracle in
//! shared/fixtures/llama_ppl.py step for step.
#![allow(clippy::many_single_char_names)] // the usual names: q, k, v, h, n, x

use rayon::prelude::*;

use std::collections::BTreeMap;

use mcompress_core::DType;
use mcompress_passes::Calibrated;
use mcompress_passes::quant::{QScheme, quantize};

use crate::linalg::{Strides, linear, sgemm};
use crate::linear::{Device, Lin};
use crate::weights::Weights;
use crate::{Error, Result};

struct Layer {
    ln_in: Vec<f32>,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    ln_post: Vec<f32>,
    gate: Lin,
    up: Lin,
    down: Lin,
}

/// A loaded llama model.
pub struct Llama {
    embed: Vec<f32>,
    lm_head: Lin,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    /// Per-head width: config.json's `head_dim`, else `hidden / heads` (differs once structured
    /// pruning removed heads).
    hd: usize,
    vocab: usize,
    eps: f32,
    inv_freq: Vec<f64>,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("layers", &self.layers.len())
            .field("hidden", &self.hidden)
            .finish_non_exhaustive()
    }
}

impl Llama {
    /// Builds the model from config.json and weights (names as in transformers' LlamaForCausalLM),
    /// with its linear layers (and lm_head, tied or not) on `device`.
    pub fn load(config: &serde_json::Value, w: &Weights, device: &Device) -> Result<Self> {
        let bad = |m: String| Error::Model(format!("llama: {m}"));
        let u = |k: &str| mcompress_core::config::dim(config, k).map_err(bad);
        let (hidden, heads, n_layers, inter, vocab) = (
            u("hidden_size")?,
            u("num_attention_heads")?,
            u("num_hidden_layers")?,
            u("intermediate_size")?,
            u("vocab_size")?,
        );
        let kv_heads = config["num_key_value_heads"].as_u64().map_or(heads, |v| v as usize);
        let hd = match config["head_dim"].as_u64() {
            Some(d) => d as usize,
            None if heads > 0 && hidden % heads == 0 => hidden / heads,
            None => return Err(bad(format!("{heads} heads do not divide hidden size {hidden} (and no head_dim)"))),
        };
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || hd == 0 || hd % 2 != 0 {
            return Err(bad(format!("{heads} heads / {kv_heads} KV heads / head_dim {hd} are not a valid geometry")));
        }
        let get = |n: &str, shape: &[usize]| w.get(n, shape).map_err(bad);
        let lin =
            |n: &str, out: usize, inp: usize| Lin::new(w.matrix(n, out, inp).map_err(bad)?, out, inp, None, device);
        let layers = (0..n_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    ln_in: get(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                    q: lin(&format!("{p}.self_attn.q_proj.weight"), heads * hd, hidden)?,
                    k: lin(&format!("{p}.self_attn.k_proj.weight"), kv_heads * hd, hidden)?,
                    v: lin(&format!("{p}.self_attn.v_proj.weight"), kv_heads * hd, hidden)?,
                    o: lin(&format!("{p}.self_attn.o_proj.weight"), hidden, heads * hd)?,
                    ln_post: get(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
                    gate: lin(&format!("{p}.mlp.gate_proj.weight"), inter, hidden)?,
                    up: lin(&format!("{p}.mlp.up_proj.weight"), inter, hidden)?,
                    down: lin(&format!("{p}.mlp.down_proj.weight"), hidden, inter)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let theta = config["rope_theta"].as_f64().unwrap_or(10000.0);
        let inv_freq = (0..hd / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / hd as f64)).collect();
        let embed = get("model.embed_tokens.weight", &[vocab, hidden])?;
        // Tied embeddings: lm_head is the embedding matrix (kept packed if the bundle quantized it).
        let head_name = if w.contains("lm_head.weight") { "lm_head.weight" } else { "model.embed_tokens.weight" };
        let lm_head = lin(head_name, vocab, hidden)?;
        Ok(Llama {
            embed,
            lm_head,
            layers,
            norm: get("model.norm.weight", &[hidden])?,
            hidden,
            heads,
            kv_heads,
            hd,
            vocab,
            eps: config["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
            inv_freq,
        })
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    fn rms(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len());
        for r in x.chunks(self.hidden) {
            let ms = r.iter().map(|v| v * v).sum::<f32>() / self.hidden as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            out.extend(r.iter().zip(w).map(|(v, g)| v * inv * g));
        }
        out
    }

    fn rope(&self, x: &mut [f32], n: usize, heads: usize) {
        let hd = self.hd;
        let half = hd / 2;
        for t in 0..n {
            for (i, f) in self.inv_freq.iter().enumerate() {
                let a = t as f64 * f;
                let (c, s) = (a.cos() as f32, a.sin() as f32);
                for h in 0..heads {
                    let base = t * heads * hd + h * hd;
                    let (x1, x2) = (x[base + i], x[base + i + half]);
                    x[base + i] = x1 * c - x2 * s;
                    x[base + i + half] = x2 * c + x1 * s;
                }
            }
        }
    }

    /// Causal grouped-query attention over `n` positions: per head, scores `Q Kᵀ / √d` as one
    /// sgemm, a causal softmax per row, then `P V` as another; heads in parallel, each into its own
    /// buffer (fixed work per head, so results do not depend on the thread count).
    fn attention(&self, q: &[f32], k: &[f32], v: &[f32], n: usize) -> Vec<f32> {
        let hd = self.hd;
        let group = self.heads / self.kv_heads;
        let (qs, ks) = (self.heads * hd, self.kv_heads * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let heads: Vec<Vec<f32>> = (0..self.heads)
            .into_par_iter()
            .map(|head| {
                let kvh = head / group;
                let mut s = vec![0f32; n * n];
                sgemm(
                    (n, hd, n),
                    &q[head * hd..],
                    Strides::row_major(qs),
                    &k[kvh * hd..],
                    Strides::transposed(ks),
                    &mut s,
                    Strides::row_major(n),
                    false,
                );
                for (i, row) in s.chunks_mut(n).enumerate() {
                    let live = &mut row[..=i];
                    let m = live.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v * scale));
                    let mut z = 0f32;
                    for x in live.iter_mut() {
                        *x = (*x * scale - m).exp();
                        z += *x;
                    }
                    for x in live.iter_mut() {
                        *x /= z;
                    }
                    row[i + 1..].fill(0.0);
                }
                let mut out = vec![0f32; n * hd];
                sgemm(
                    (n, n, hd),
                    &s,
                    Strides::row_major(n),
                    &v[kvh * hd..],
                    Strides::row_major(ks),
                    &mut out,
                    Strides::row_major(hd),
                    false,
                );
                out
            })
            .collect();
        let mut ctx = vec![0f32; n * qs];
        for (head, out) in heads.iter().enumerate() {
            for (i, row) in out.chunks(hd).enumerate() {
                ctx[i * qs + head * hd..i * qs + (head + 1) * hd].copy_from_slice(row);
            }
        }
        ctx
    }

    /// Embeddings of a token sequence, `[n, hidden]`.
    fn embed_ids(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.hidden;
        let mut x = Vec::with_capacity(ids.len() * h);
        for &id in ids {
            let id = id as usize;
            if id >= self.vocab {
                return Err(Error::Model(format!("llama: token id {id} outside the vocabulary of {}", self.vocab)));
            }
            x.extend_from_slice(&self.embed[id * h..(id + 1) * h]);
        }
        Ok(x)
    }

    /// Attention context of block `l` for residual stream `x` (the input of `o_proj`).
    fn attn_context(&self, l: &Layer, x: &[f32]) -> Result<Vec<f32>> {
        let n = x.len() / self.hidden;
        let a = self.rms(x, &l.ln_in);
        let mut q = l.q.apply(&a)?;
        let mut k = l.k.apply(&a)?;
        let v = l.v.apply(&a)?;
        self.rope(&mut q, n, self.heads);
        self.rope(&mut k, n, self.kv_heads);
        Ok(self.attention(&q, &k, &v, n))
    }

    /// SwiGLU activation of block `l` for residual stream `x` (the input of `down_proj`).
    fn mlp_act(l: &Layer, a: &[f32]) -> Result<Vec<f32>> {
        let g = l.gate.apply(a)?;
        let u = l.up.apply(a)?;
        Ok(g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect())
    }

    /// `x += o_proj(attention(x))`: block `l`'s attention half on the residual stream.
    fn add_attention(&self, l: &Layer, x: &mut [f32]) -> Result<()> {
        let o = l.o.apply(&self.attn_context(l, x)?)?;
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        Ok(())
    }

    /// `x += down_proj(swiglu(post_norm(x)))`: block `l`'s MLP half on the residual stream.
    fn add_mlp(&self, l: &Layer, x: &mut [f32]) -> Result<()> {
        let d = l.down.apply(&Self::mlp_act(l, &self.rms(x, &l.ln_post))?)?;
        x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        Ok(())
    }

    /// Logits `[n, vocab]` for a token sequence (causal, positions from 0).
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut x = self.embed_ids(ids)?;
        for l in &self.layers {
            self.add_attention(l, &mut x)?;
            self.add_mlp(l, &mut x)?;
        }
        let x = self.rms(&x, &self.norm);
        self.lm_head.apply(&x)
    }

    /// Per layer, the mean cosine between each token's residual stream before and after the
    /// layer, over every window (what block influence is computed from).
    pub fn layer_cosines(&self, windows: &[Vec<u32>]) -> Result<Vec<f64>> {
        let mut acc = vec![crate::calibrate::CosMean::default(); self.layers.len()];
        for w in windows {
            let mut x = self.embed_ids(w)?;
            for (l, a) in self.layers.iter().zip(&mut acc) {
                let before = x.clone();
                self.add_attention(l, &mut x)?;
                self.add_mlp(l, &mut x)?;
                a.add(&before, &x, self.hidden);
            }
        }
        Ok(acc.into_iter().map(crate::calibrate::CosMean::mean).collect())
    }

    /// Greedy decoding: `ids` followed by `steps` argmax tokens (full recompute per step; a
    /// check, not a server).
    pub fn greedy(&self, ids: &[u32], steps: usize) -> Result<Vec<u32>> {
        let mut ids = ids.to_vec();
        for _ in 0..steps {
            let lg = self.logits(&ids)?;
            let last = &lg[lg.len() - self.vocab..];
            ids.push(last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32));
        }
        Ok(ids)
    }

    /// Sequential calibration, one block at a time (GPTQ): every window's residual stream goes
    /// through block `i`; the inputs of each of its linear layers give a Hessian `Σ xᵀx` (f64);
    /// `quantize(name, weights, (out, in), hessian)` may return replacement weights (the
    /// dequantized result), which the block then uses to produce block `i + 1`'s inputs. Memory:
    /// the windows' residual streams and one block's attention contexts.
    pub fn calibrate<F>(&mut self, windows: &[Vec<u32>], mut quantize: F, progress: &dyn Fn()) -> Result<()>
    where
        F: FnMut(&str, &[f32], (usize, usize), Vec<f64>) -> Result<Option<Vec<f32>>>,
    {
        let mut xs: Vec<Vec<f32>> = windows.iter().map(|w| self.embed_ids(w)).collect::<Result<_>>()?;
        for li in 0..self.layers.len() {
            let p = format!("model.layers.{li}");
            // q, k, v: inputs are the normed residual stream.
            let mut hq = Hessian::new(self.hidden);
            for x in &xs {
                hq.add(&self.rms(x, &self.layers[li].ln_in));
            }
            let l = &mut self.layers[li];
            for (lin, n) in [(&mut l.q, "q_proj"), (&mut l.k, "k_proj"), (&mut l.v, "v_proj")] {
                requantize(lin, &format!("{p}.self_attn.{n}.weight"), hq.h.clone(), &mut quantize)?;
            }
            // o: inputs are the attention contexts (computed with the quantized q, k, v).
            let ctxs: Vec<Vec<f32>> =
                xs.iter().map(|x| self.attn_context(&self.layers[li], x)).collect::<Result<_>>()?;
            let mut ho = Hessian::new(self.layers[li].o.inp);
            for c in &ctxs {
                ho.add(c);
            }
            requantize(&mut self.layers[li].o, &format!("{p}.self_attn.o_proj.weight"), ho.h, &mut quantize)?;
            let mut hm = Hessian::new(self.hidden);
            for (x, c) in xs.iter_mut().zip(&ctxs) {
                let o = self.layers[li].o.apply(c)?;
                x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
                hm.add(&self.rms(x, &self.layers[li].ln_post));
            }
            drop(ctxs);
            let l = &mut self.layers[li];
            for (lin, n) in [(&mut l.gate, "gate_proj"), (&mut l.up, "up_proj")] {
                requantize(lin, &format!("{p}.mlp.{n}.weight"), hm.h.clone(), &mut quantize)?;
            }
            // down: inputs are the SwiGLU activations (from the quantized gate and up).
            let mut hd = Hessian::new(self.layers[li].down.inp);
            for x in &xs {
                hd.add(&Self::mlp_act(&self.layers[li], &self.rms(x, &self.layers[li].ln_post))?);
            }
            requantize(&mut self.layers[li].down, &format!("{p}.mlp.down_proj.weight"), hd.h, &mut quantize)?;
            for x in &mut xs {
                self.add_mlp(&self.layers[li], x)?;
            }
            progress();
        }
        Ok(())
    }

    /// AWQ, one block at a time: for each group of linear layers sharing an input (q/k/v;
    /// gate/up; down) whose members are all `selected`, search `s = mean|x|^α` on a grid of α,
    /// minimising the group's output error after rounding `W·diag(s)` (α = 0 is plain RTN, so
    /// the search never does worse than RTN on its objective), fold `1/s` into the producer of
    /// the input (the norms; `up_proj`'s rows for `down_proj`), and finally round every selected
    /// matrix of the block. Returns the quantized matrices and the rewritten dense tensors.
    /// `selected(name)` gives the dtype and shape of a tensor to quantize.
    pub fn awq(
        &mut self,
        windows: &[Vec<u32>],
        scheme: &QScheme,
        grid: usize,
        selected: Selected<'_>,
        progress: &dyn Fn(),
    ) -> Result<BTreeMap<String, Calibrated>> {
        let mut out = BTreeMap::new();
        let mut xs: Vec<Vec<f32>> = windows.iter().map(|w| self.embed_ids(w)).collect::<Result<_>>()?;
        let h = self.hidden;
        for li in 0..self.layers.len() {
            let p = format!("model.layers.{li}");
            let name = |n: &str| format!("{p}.{n}.weight");
            let all = |ns: &[&str]| ns.iter().all(|n| selected(&name(n)).is_some());
            // q, k, v: scales folded into input_layernorm.
            if all(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]) {
                let a: Vec<f32> = xs.iter().flat_map(|x| self.rms(x, &self.layers[li].ln_in)).collect();
                let l = &self.layers[li];
                let s = awq_search(&a, h, &[dense(&l.q)?, dense(&l.k)?, dense(&l.v)?], scheme, grid);
                let l = &mut self.layers[li];
                for (g, s) in l.ln_in.iter_mut().zip(&s) {
                    *g /= s;
                }
                for lin in [&mut l.q, &mut l.k, &mut l.v] {
                    scale_columns(lin, &s)?;
                }
                out.insert(format!("{p}.input_layernorm.weight"), Calibrated::Dense(l.ln_in.clone()));
            }
            for x in &mut xs {
                self.add_attention(&self.layers[li], x)?;
            }
            // gate, up: scales folded into post_attention_layernorm.
            if all(&["mlp.gate_proj", "mlp.up_proj"]) {
                let a: Vec<f32> = xs.iter().flat_map(|x| self.rms(x, &self.layers[li].ln_post)).collect();
                let l = &self.layers[li];
                let s = awq_search(&a, h, &[dense(&l.gate)?, dense(&l.up)?], scheme, grid);
                let l = &mut self.layers[li];
                for (g, s) in l.ln_post.iter_mut().zip(&s) {
                    *g /= s;
                }
                for lin in [&mut l.gate, &mut l.up] {
                    scale_columns(lin, &s)?;
                }
                out.insert(format!("{p}.post_attention_layernorm.weight"), Calibrated::Dense(l.ln_post.clone()));
            }
            // down: scales folded into up_proj's rows (the SwiGLU product is linear in up).
            if all(&["mlp.down_proj"]) {
                let l = &self.layers[li];
                let mut act = Vec::new();
                for x in &xs {
                    act.extend(Self::mlp_act(l, &self.rms(x, &l.ln_post))?);
                }
                let s = awq_search(&act, l.down.inp, &[dense(&l.down)?], scheme, grid);
                let l = &mut self.layers[li];
                scale_columns(&mut l.down, &s)?;
                let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
                scale_rows(&mut l.up, &inv)?;
                if selected(&name("mlp.up_proj")).is_none() {
                    out.insert(name("mlp.up_proj"), Calibrated::Dense(dense(&l.up)?.to_vec()));
                }
            }
            for x in &mut xs {
                self.add_mlp(&self.layers[li], x)?;
            }
            // Round every selected matrix of the block, scaled or not.
            let l = &self.layers[li];
            for (lin, n) in [
                (&l.q, "self_attn.q_proj"),
                (&l.k, "self_attn.k_proj"),
                (&l.v, "self_attn.v_proj"),
                (&l.o, "self_attn.o_proj"),
                (&l.gate, "mlp.gate_proj"),
                (&l.up, "mlp.up_proj"),
                (&l.down, "mlp.down_proj"),
            ] {
                let full = name(n);
                let Some((dtype, shape)) = selected(&full) else { continue };
                let bytes = dtype
                    .encode_f32(dense(lin)?)
                    .ok_or_else(|| Error::Model(format!("{full}: cannot encode as {dtype}")))?;
                let q = quantize(scheme, dtype, &shape, &bytes).map_err(|e| Error::Model(format!("{full}: {e:?}")))?;
                out.insert(full, Calibrated::Quantized(q));
            }
            progress();
        }
        Ok(out)
    }

    /// `E[x_c²]` of every linear layer's input channels over `windows`, by weight name (one
    /// dense forward pass, one block's activations at a time).
    pub fn input_moments(&self, windows: &[Vec<u32>]) -> Result<BTreeMap<String, Vec<f32>>> {
        fn acc(m: &mut [f64], x: &[f32]) {
            for row in x.chunks_exact(m.len()) {
                for (m, v) in m.iter_mut().zip(row) {
                    *m += f64::from(v * v);
                }
            }
        }
        let mut xs: Vec<Vec<f32>> = windows.iter().map(|w| self.embed_ids(w)).collect::<Result<_>>()?;
        let tokens = windows.iter().map(Vec::len).sum::<usize>().max(1) as f64;
        let mut out = BTreeMap::new();
        let mut put = |name: String, m: &[f64]| {
            out.insert(name, m.iter().map(|v| (v / tokens) as f32).collect::<Vec<f32>>());
        };
        for (li, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{li}");
            let (mut m_in, mut m_o) = (vec![0f64; self.hidden], vec![0f64; l.o.inp]);
            let (mut m_post, mut m_down) = (vec![0f64; self.hidden], vec![0f64; l.down.inp]);
            for x in &mut xs {
                acc(&mut m_in, &self.rms(x, &l.ln_in));
                let c = self.attn_context(l, x)?;
                acc(&mut m_o, &c);
                let o = l.o.apply(&c)?;
                x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
                let a = self.rms(x, &l.ln_post);
                acc(&mut m_post, &a);
                let act = Self::mlp_act(l, &a)?;
                acc(&mut m_down, &act);
                let d = l.down.apply(&act)?;
                x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
            }
            for n in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] {
                put(format!("{p}.{n}.weight"), &m_in);
            }
            put(format!("{p}.self_attn.o_proj.weight"), &m_o);
            put(format!("{p}.mlp.gate_proj.weight"), &m_post);
            put(format!("{p}.mlp.up_proj.weight"), &m_post);
            put(format!("{p}.mlp.down_proj.weight"), &m_down);
        }
        // The output head (lm_head, or the tied embedding) reads the final normed stream.
        let mut m = vec![0f64; self.hidden];
        for x in &xs {
            acc(&mut m, &self.rms(x, &self.norm));
        }
        put("lm_head.weight".into(), &m);
        Ok(out)
    }

    /// Blocks (for progress).
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Sum of negative log-likelihoods of each next token and their count, over non-overlapping
    /// windows of `window` tokens (as llama_ppl.py scores them; log-softmax in f64).
    pub fn nll(&self, ids: &[u32], window: usize) -> Result<(f64, usize)> {
        let (mut nll, mut count) = (0f64, 0usize);
        for w in ids.chunks(window.max(2)) {
            if w.len() < 2 {
                break;
            }
            let lg = self.logits(w)?;
            // Per-position terms in parallel, summed in order (thread-count independent).
            let terms: Vec<f64> = lg
                .par_chunks(self.vocab)
                .take(w.len() - 1)
                .enumerate()
                .map(|(t, row)| {
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let z: f64 = row.iter().map(|v| f64::from(v - m).exp()).sum();
                    f64::from(row[w[t + 1] as usize] - m) - z.ln()
                })
                .collect();
            nll -= terms.iter().sum::<f64>();
            count += terms.len();
        }
        Ok((nll, count))
    }
}

/// `Σ xᵀx` over the rows of every input seen, in f64 (each call's product in f32 by sgemm).
struct Hessian {
    k: usize,
    h: Vec<f64>,
}

impl Hessian {
    fn new(k: usize) -> Self {
        Hessian { k, h: vec![0f64; k * k] }
    }

    fn add(&mut self, x: &[f32]) {
        let k = self.k;
        let n = x.len() / k;
        let mut g = vec![0f32; k * k];
        sgemm((k, n, k), x, Strides::transposed(k), x, Strides::row_major(k), &mut g, Strides::row_major(k), false);
        for (h, g) in self.h.iter_mut().zip(&g) {
            *h += f64::from(*g);
        }
    }
}

/// Offers one linear layer to the calibration callback and swaps in what it returns.
fn requantize<F>(lin: &mut Lin, name: &str, h: Vec<f64>, quantize: &mut F) -> Result<()>
where
    F: FnMut(&str, &[f32], (usize, usize), Vec<f64>) -> Result<Option<Vec<f32>>>,
{
    let Some(w) = lin.dense() else { return Ok(()) };
    if let Some(new) = quantize(name, w, (lin.out, lin.inp), h)? {
        *lin = Lin::new(crate::linear::Matrix::Dense(new), lin.out, lin.inp, None, &Device::Cpu)?;
    }
    Ok(())
}

/// Which tensors a calibrated pass quantizes: dtype and shape of the selected ones.
pub type Selected<'a> = &'a dyn Fn(&str) -> Option<(DType, Vec<usize>)>;

fn dense(lin: &Lin) -> Result<&[f32]> {
    lin.dense().ok_or_else(|| Error::Model("calibration needs dense f32 weights on the CPU".into()))
}

/// `W·diag(s)`: every row's column `c` times `s[c]`.
fn scale_columns(lin: &mut Lin, s: &[f32]) -> Result<()> {
    let mut w = dense(lin)?.to_vec();
    for row in w.chunks_mut(lin.inp) {
        for (v, s) in row.iter_mut().zip(s) {
            *v *= s;
        }
    }
    *lin = Lin::new(crate::linear::Matrix::Dense(w), lin.out, lin.inp, None, &Device::Cpu)?;
    Ok(())
}

/// `diag(s)·W`: row `r` times `s[r]`.
fn scale_rows(lin: &mut Lin, s: &[f32]) -> Result<()> {
    let mut w = dense(lin)?.to_vec();
    for (row, s) in w.chunks_mut(lin.inp).zip(s) {
        for v in row {
            *v *= s;
        }
    }
    *lin = Lin::new(crate::linear::Matrix::Dense(w), lin.out, lin.inp, None, &Device::Cpu)?;
    Ok(())
}

/// Rows of calibration input the AWQ search scores each candidate on.
const AWQ_ROWS: usize = 2048;

/// AWQ's scale search for layers `ws` (each `[m_i, k]`) sharing input `x` (`[n, k]`): per-channel
/// `s = mean|x|^α`, normalised by `sqrt(max·min)`, for α on the grid; the α whose rounded
/// `Q(W·diag(s))·diag(1/s)` gives the smallest summed squared output error on (a stride sample
/// of) `x` wins.
fn awq_search(x: &[f32], k: usize, ws: &[&[f32]], scheme: &QScheme, grid: usize) -> Vec<f32> {
    let n = x.len() / k;
    let mut mean = vec![0f64; k];
    for row in x.chunks(k) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += f64::from(v.abs());
        }
    }
    let stride = n.div_ceil(AWQ_ROWS).max(1);
    let xs: Vec<f32> = x.chunks(k).step_by(stride).flatten().copied().collect();
    let base: Vec<Vec<f32>> = ws.iter().map(|w| linear(&xs, w, None, k, w.len() / k)).collect();
    let (mut best, mut best_err) = (vec![1f32; k], f64::INFINITY);
    for g in 0..grid.max(1) {
        let alpha = g as f64 / grid.max(1) as f64;
        let mut s: Vec<f64> = mean.iter().map(|m| (m / n.max(1) as f64).max(1e-4).powf(alpha)).collect();
        let (lo, hi) = s.iter().fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let norm = (lo * hi).sqrt();
        for v in &mut s {
            *v /= norm;
        }
        let s: Vec<f32> = s.iter().map(|v| *v as f32).collect();
        let x_div: Vec<f32> = xs.chunks(k).flat_map(|r| r.iter().zip(&s).map(|(v, s)| v / s)).collect();
        let mut err = 0f64;
        for (w, y) in ws.iter().zip(&base) {
            let m = w.len() / k;
            let scaled: Vec<u8> =
                w.chunks(k).flat_map(|r| r.iter().zip(&s).flat_map(|(v, s)| (v * s).to_le_bytes())).collect();
            let Ok(q) = quantize(scheme, DType::F32, &[m, k], &scaled) else { return vec![1f32; k] };
            let yq = linear(&x_div, &q.dequantize(), None, k, m);
            err += y.iter().zip(&yq).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>();
        }
        if err < best_err {
            (best, best_err) = (s, err);
        }
    }
    best
}
