//! Decoder language models of every family in [`mcompress_core::arch`] (llama, Qwen2, Gemma 3):
//! RMSNorm (Gemma's `1 + w` gain folded in at load), rotary embeddings in the Hugging Face
//! `rotate_half` layout, grouped-query attention with optional q/k/v biases, q/k norms and
//! sliding windows, SwiGLU or GeGLU MLPs, Gemma's post-norms and embedding scale, tied or separate
//! lm_head. Plain f32 Rust (the CPU reference), following the numpy oracle in
//! shared/fixtures/llama_ppl.py step for step for llama, and transformers' modeling files for the
//! other families. Tensor names come from the architecture table, never spelled here.
#![allow(clippy::many_single_char_names)] // the usual names: q, k, v, h, n, x

use rayon::prelude::*;

use std::collections::BTreeMap;

use mcompress_core::DType;
use mcompress_core::arch::{Geometry, Role};
use mcompress_format::Calibrated;
use mcompress_format::quant::{QScheme, quantize};

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
    /// Per-head RMSNorm of queries and keys (Gemma 3).
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// RMSNorm of the attention output before the residual add (Gemma 3).
    post_attn: Option<Vec<f32>>,
    /// The norm in front of the MLP.
    ln_ffn: Vec<f32>,
    /// RMSNorm of the MLP output before the residual add (Gemma 3).
    post_ffn: Option<Vec<f32>>,
    gate: Lin,
    up: Lin,
    down: Lin,
    /// Sliding window, `None` for full attention.
    window: Option<usize>,
    /// Rotary frequencies of this layer (Gemma's local layers have their own base).
    inv_freq: Vec<f64>,
}

/// A loaded decoder.
pub struct Decoder {
    g: Geometry,
    embed: Vec<f32>,
    lm_head: Lin,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// Added to every norm gain at load (Gemma's `1 + w`), taken off again when norms are
    /// written back (AWQ).
    norm_add: f32,
    eps: f32,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("family", &self.g.family)
            .field("layers", &self.layers.len())
            .field("hidden", &self.g.hidden)
            .finish_non_exhaustive()
    }
}

fn inv_freq(theta: f64, hd: usize) -> Vec<f64> {
    (0..hd / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / hd as f64)).collect()
}

impl Decoder {
    /// Builds the model from config.json and weights (names as transformers' `…ForCausalLM` of
    /// the family has them), with its linear layers (and lm_head, tied or not) on `device`.
    /// Every tensor must be accounted for: one the forward pass would not read is an error (a
    /// Qwen2 read as a llama would silently lose its biases).
    pub fn load(config: &serde_json::Value, w: &Weights, device: &Device) -> Result<Self> {
        let g = Geometry::from_config(config).map_err(|e| Error::Model(format!("decoder: {e}")))?;
        let f = g.family;
        let bad = |m: String| Error::Model(format!("{}: {m}", f.model_type()));
        g.check_tensors(w.shapes()).map_err(bad)?;
        let norm_add = f.gguf_norm_offset();
        let get = |role: Role, l: usize| {
            let mut v = w.get(&f.hf(role, l), &g.shape(role)).map_err(bad)?;
            if role.is_norm() && norm_add != 0.0 {
                for x in &mut v {
                    *x += norm_add;
                }
            }
            Ok::<_, Error>(v)
        };
        let opt = |role: Role, l: usize| if f.has(role) { get(role, l).map(Some) } else { Ok(None) };
        let lin = |role: Role, bias: Option<Role>, l: usize| {
            let s = g.shape(role);
            let b = match bias {
                Some(b) if f.has(b) => Some(get(b, l)?),
                _ => None,
            };
            Lin::new(w.matrix(&f.hf(role, l), s[0], s[1]).map_err(bad)?, s[0], s[1], b, device)
        };
        let layers = (0..g.layers)
            .map(|i| {
                let window = g.windows[i];
                Ok(Layer {
                    ln_in: get(Role::AttnNorm, i)?,
                    q: lin(Role::Q, Some(Role::QBias), i)?,
                    k: lin(Role::K, Some(Role::KBias), i)?,
                    v: lin(Role::V, Some(Role::VBias), i)?,
                    o: lin(Role::O, None, i)?,
                    q_norm: opt(Role::QNorm, i)?,
                    k_norm: opt(Role::KNorm, i)?,
                    post_attn: opt(Role::PostAttnNorm, i)?,
                    ln_ffn: get(Role::FfnNorm, i)?,
                    post_ffn: opt(Role::PostFfnNorm, i)?,
                    gate: lin(Role::Gate, None, i)?,
                    up: lin(Role::Up, None, i)?,
                    down: lin(Role::Down, None, i)?,
                    window,
                    inv_freq: inv_freq(g.layer_rope_theta(i), g.head_dim),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = get(Role::Embed, 0)?;
        // Tied embeddings: lm_head is the embedding matrix (kept packed if the bundle quantized it).
        let head = if w.contains(&f.hf(Role::Output, 0)) { Role::Output } else { Role::Embed };
        let s = g.shape(Role::Output);
        let lm_head = Lin::new(w.matrix(&f.hf(head, 0), s[0], s[1]).map_err(bad)?, s[0], s[1], None, device)?;
        #[allow(clippy::cast_possible_truncation)]
        Ok(Decoder { embed, lm_head, layers, norm: get(Role::OutputNorm, 0)?, norm_add, eps: g.eps as f32, g })
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.g.vocab
    }

    /// The geometry it was built with.
    pub fn geometry(&self) -> &Geometry {
        &self.g
    }

    fn rms(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let d = w.len();
        let mut out = Vec::with_capacity(x.len());
        for r in x.chunks(d) {
            let ms = r.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            out.extend(r.iter().zip(w).map(|(v, g)| v * inv * g));
        }
        out
    }

    fn rope(&self, x: &mut [f32], n: usize, heads: usize, inv_freq: &[f64]) {
        let hd = self.g.head_dim;
        let half = hd / 2;
        for t in 0..n {
            for (i, f) in inv_freq.iter().enumerate() {
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

    /// Causal grouped-query attention over `n` positions (keys within `window` of the query when
    /// the layer slides): per head, scores `Q Kᵀ · scale` as one sgemm, a masked softmax per row,
    /// then `P V` as another; heads in parallel, each into its own buffer (fixed work per head, so
    /// results do not depend on the thread count).
    fn attention(&self, q: &[f32], k: &[f32], v: &[f32], n: usize, window: Option<usize>) -> Vec<f32> {
        let hd = self.g.head_dim;
        let (heads, kv_heads) = (self.g.heads, self.g.kv_heads);
        let group = heads / kv_heads;
        let (qs, ks) = (heads * hd, kv_heads * hd);
        #[allow(clippy::cast_possible_truncation)]
        let scale = self.g.attn_scale as f32;
        let outs: Vec<Vec<f32>> = (0..heads)
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
                    let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
                    row[..lo].fill(0.0);
                    let live = &mut row[lo..=i];
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
        for (head, out) in outs.iter().enumerate() {
            for (i, row) in out.chunks(hd).enumerate() {
                ctx[i * qs + head * hd..i * qs + (head + 1) * hd].copy_from_slice(row);
            }
        }
        ctx
    }

    /// Embeddings of a token sequence, `[n, hidden]`.
    fn embed_ids(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let (h, scale) = (self.g.hidden, self.g.embed_scale());
        let mut x = Vec::with_capacity(ids.len() * h);
        for &id in ids {
            let id = id as usize;
            if id >= self.g.vocab {
                return Err(Error::Model(format!("decoder: token id {id} outside the vocabulary of {}", self.g.vocab)));
            }
            x.extend(self.embed[id * h..(id + 1) * h].iter().map(|v| v * scale));
        }
        Ok(x)
    }

    /// Attention context of block `l` for residual stream `x` (the input of `o_proj`).
    fn attn_context(&self, l: &Layer, x: &[f32]) -> Result<Vec<f32>> {
        let n = x.len() / self.g.hidden;
        let a = self.rms(x, &l.ln_in);
        let mut q = l.q.apply(&a)?;
        let mut k = l.k.apply(&a)?;
        let v = l.v.apply(&a)?;
        if let Some(w) = &l.q_norm {
            q = self.rms(&q, w);
        }
        if let Some(w) = &l.k_norm {
            k = self.rms(&k, w);
        }
        self.rope(&mut q, n, self.g.heads, &l.inv_freq);
        self.rope(&mut k, n, self.g.kv_heads, &l.inv_freq);
        Ok(self.attention(&q, &k, &v, n, l.window))
    }

    /// `y`, through a post-norm where the block has one (Gemma's after attention and MLP).
    fn post_norm(&self, y: Vec<f32>, norm: Option<&Vec<f32>>) -> Vec<f32> {
        match norm {
            Some(w) => self.rms(&y, w),
            None => y,
        }
    }

    /// What block `l`'s attention adds to the residual stream, from its context.
    fn attn_out(&self, l: &Layer, ctx: &[f32]) -> Result<Vec<f32>> {
        Ok(self.post_norm(l.o.apply(ctx)?, l.post_attn.as_ref()))
    }

    /// The gated activation of block `l`'s MLP for its normed input `a` (the input of
    /// `down_proj`): SwiGLU, or GeGLU with tanh-approximated GELU (Gemma).
    fn mlp_act(&self, l: &Layer, a: &[f32]) -> Result<Vec<f32>> {
        let g = l.gate.apply(a)?;
        let u = l.up.apply(a)?;
        Ok(if self.g.family.gelu_mlp() {
            const C: f32 = 0.797_884_6; // √(2/π)
            g.iter().zip(&u).map(|(g, u)| 0.5 * g * (1.0 + (C * (g + 0.044_715 * g * g * g)).tanh()) * u).collect()
        } else {
            g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect()
        })
    }

    /// What block `l`'s MLP adds to the residual stream, from its activation.
    fn mlp_out(&self, l: &Layer, act: &[f32]) -> Result<Vec<f32>> {
        Ok(self.post_norm(l.down.apply(act)?, l.post_ffn.as_ref()))
    }

    /// `x += attention(x)`: block `l`'s attention half on the residual stream.
    fn add_attention(&self, l: &Layer, x: &mut [f32]) -> Result<()> {
        let o = self.attn_out(l, &self.attn_context(l, x)?)?;
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        Ok(())
    }

    /// `x += mlp(norm(x))`: block `l`'s MLP half on the residual stream.
    fn add_mlp(&self, l: &Layer, x: &mut [f32]) -> Result<()> {
        let d = self.mlp_out(l, &self.mlp_act(l, &self.rms(x, &l.ln_ffn))?)?;
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
                a.add(&before, &x, self.g.hidden);
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
            let last = &lg[lg.len() - self.g.vocab..];
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
        let f = self.g.family;
        let mut xs: Vec<Vec<f32>> = windows.iter().map(|w| self.embed_ids(w)).collect::<Result<_>>()?;
        for li in 0..self.layers.len() {
            // q, k, v: inputs are the normed residual stream.
            let mut hq = Hessian::new(self.g.hidden);
            for x in &xs {
                hq.add(&self.rms(x, &self.layers[li].ln_in));
            }
            let l = &mut self.layers[li];
            for (lin, r) in [(&mut l.q, Role::Q), (&mut l.k, Role::K), (&mut l.v, Role::V)] {
                requantize(lin, &f.hf(r, li), hq.h.clone(), &mut quantize)?;
            }
            // o: inputs are the attention contexts (computed with the quantized q, k, v).
            let ctxs: Vec<Vec<f32>> =
                xs.iter().map(|x| self.attn_context(&self.layers[li], x)).collect::<Result<_>>()?;
            let mut ho = Hessian::new(self.layers[li].o.inp);
            for c in &ctxs {
                ho.add(c);
            }
            requantize(&mut self.layers[li].o, &f.hf(Role::O, li), ho.h, &mut quantize)?;
            let mut hm = Hessian::new(self.g.hidden);
            for (x, c) in xs.iter_mut().zip(&ctxs) {
                let o = self.attn_out(&self.layers[li], c)?;
                x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
                hm.add(&self.rms(x, &self.layers[li].ln_ffn));
            }
            drop(ctxs);
            let l = &mut self.layers[li];
            for (lin, r) in [(&mut l.gate, Role::Gate), (&mut l.up, Role::Up)] {
                requantize(lin, &f.hf(r, li), hm.h.clone(), &mut quantize)?;
            }
            // down: inputs are the gated activations (from the quantized gate and up).
            let mut hd = Hessian::new(self.layers[li].down.inp);
            for x in &xs {
                hd.add(&self.mlp_act(&self.layers[li], &self.rms(x, &self.layers[li].ln_ffn))?);
            }
            requantize(&mut self.layers[li].down, &f.hf(Role::Down, li), hd.h, &mut quantize)?;
            for x in &mut xs {
                self.add_mlp(&self.layers[li], x)?;
            }
            progress();
        }
        Ok(())
    }

    /// A norm gain as stored (without the `1 + w` offset added at load).
    fn stored_norm(&self, w: &[f32]) -> Calibrated {
        Calibrated::Dense(w.iter().map(|v| v - self.norm_add).collect())
    }

    /// AWQ, one block at a time: for each group of linear layers sharing an input (q/k/v;
    /// gate/up; down) whose members are all `selected`, search `s = mean|x|^α` on a grid of α,
    /// minimising the group's output error after rounding `W·diag(s)` (α = 0 is plain RTN, so
    /// the search never does worse than RTN on its objective), fold `1/s` into the producer of
    /// the input (the norms in front of attention and MLP; `up_proj`'s rows for `down_proj`),
    /// and finally round every selected matrix of the block. Returns the quantized matrices and
    /// the rewritten dense tensors. `selected(name)` gives the dtype and shape of a tensor to
    /// quantize.
    pub fn awq(
        &mut self,
        windows: &[Vec<u32>],
        scheme: &QScheme,
        grid: usize,
        selected: Selected<'_>,
        progress: &dyn Fn(),
    ) -> Result<BTreeMap<String, Calibrated>> {
        let f = self.g.family;
        let mut out = BTreeMap::new();
        let mut xs: Vec<Vec<f32>> = windows.iter().map(|w| self.embed_ids(w)).collect::<Result<_>>()?;
        let h = self.g.hidden;
        for li in 0..self.layers.len() {
            let all = |rs: &[Role]| rs.iter().all(|r| selected(&f.hf(*r, li)).is_some());
            // q, k, v: scales folded into the attention norm.
            if all(&[Role::Q, Role::K, Role::V]) {
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
                out.insert(f.hf(Role::AttnNorm, li), self.stored_norm(&self.layers[li].ln_in));
            }
            for x in &mut xs {
                self.add_attention(&self.layers[li], x)?;
            }
            // gate, up: scales folded into the norm in front of the MLP.
            if all(&[Role::Gate, Role::Up]) {
                let a: Vec<f32> = xs.iter().flat_map(|x| self.rms(x, &self.layers[li].ln_ffn)).collect();
                let l = &self.layers[li];
                let s = awq_search(&a, h, &[dense(&l.gate)?, dense(&l.up)?], scheme, grid);
                let l = &mut self.layers[li];
                for (g, s) in l.ln_ffn.iter_mut().zip(&s) {
                    *g /= s;
                }
                for lin in [&mut l.gate, &mut l.up] {
                    scale_columns(lin, &s)?;
                }
                out.insert(f.hf(Role::FfnNorm, li), self.stored_norm(&self.layers[li].ln_ffn));
            }
            // down: scales folded into up_proj's rows (the gated product is linear in up).
            if all(&[Role::Down]) {
                let l = &self.layers[li];
                let mut act = Vec::new();
                for x in &xs {
                    act.extend(self.mlp_act(l, &self.rms(x, &l.ln_ffn))?);
                }
                let s = awq_search(&act, l.down.inp, &[dense(&l.down)?], scheme, grid);
                let l = &mut self.layers[li];
                scale_columns(&mut l.down, &s)?;
                let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
                scale_rows(&mut l.up, &inv)?;
                if selected(&f.hf(Role::Up, li)).is_none() {
                    out.insert(f.hf(Role::Up, li), Calibrated::Dense(dense(&l.up)?.to_vec()));
                }
            }
            for x in &mut xs {
                self.add_mlp(&self.layers[li], x)?;
            }
            // Round every selected matrix of the block, scaled or not.
            let l = &self.layers[li];
            let lins = [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down];
            for (lin, role) in lins.into_iter().zip(Role::LINEAR) {
                let full = f.hf(role, li);
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
        let f = self.g.family;
        let mut xs: Vec<Vec<f32>> = windows.iter().map(|w| self.embed_ids(w)).collect::<Result<_>>()?;
        let tokens = windows.iter().map(Vec::len).sum::<usize>().max(1) as f64;
        let mut out = BTreeMap::new();
        let mut put = |name: String, m: &[f64]| {
            out.insert(name, m.iter().map(|v| (v / tokens) as f32).collect::<Vec<f32>>());
        };
        for (li, l) in self.layers.iter().enumerate() {
            let (mut m_in, mut m_o) = (vec![0f64; self.g.hidden], vec![0f64; l.o.inp]);
            let (mut m_post, mut m_down) = (vec![0f64; self.g.hidden], vec![0f64; l.down.inp]);
            for x in &mut xs {
                acc(&mut m_in, &self.rms(x, &l.ln_in));
                let c = self.attn_context(l, x)?;
                acc(&mut m_o, &c);
                let o = self.attn_out(l, &c)?;
                x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
                let a = self.rms(x, &l.ln_ffn);
                acc(&mut m_post, &a);
                let act = self.mlp_act(l, &a)?;
                acc(&mut m_down, &act);
                let d = self.mlp_out(l, &act)?;
                x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
            }
            for r in [Role::Q, Role::K, Role::V] {
                put(f.hf(r, li), &m_in);
            }
            put(f.hf(Role::O, li), &m_o);
            put(f.hf(Role::Gate, li), &m_post);
            put(f.hf(Role::Up, li), &m_post);
            put(f.hf(Role::Down, li), &m_down);
        }
        // The output head (lm_head, or the tied embedding) reads the final normed stream.
        let mut m = vec![0f64; self.g.hidden];
        for x in &xs {
            acc(&mut m, &self.rms(x, &self.norm));
        }
        put(f.hf(Role::Output, 0), &m);
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
                .par_chunks(self.g.vocab)
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
        *lin = lin.with_dense(new)?;
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
    *lin = lin.with_dense(w)?;
    Ok(())
}

/// `diag(s)·W`: row `r` times `s[r]` (and its bias, so the layer's output row scales by `s[r]`).
fn scale_rows(lin: &mut Lin, s: &[f32]) -> Result<()> {
    let mut w = dense(lin)?.to_vec();
    for (row, s) in w.chunks_mut(lin.inp).zip(s) {
        for v in row {
            *v *= s;
        }
    }
    let bias = lin.bias().map(|b| b.iter().zip(s).map(|(b, s)| b * s).collect());
    *lin = Lin::new(crate::linear::Matrix::Dense(w), lin.out, lin.inp, bias, &Device::Cpu)?;
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
