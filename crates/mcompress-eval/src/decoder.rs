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

use mcompress_core::arch::{Family, Geometry, Role};

use crate::linalg::{Strides, sgemm};
use crate::linear::{Device, Lin};
use crate::spill::{self, Scratch};
use crate::weights::{TensorSource, Weights};
use crate::{Error, Result};

/// q, k and v: three layers, or one fused layer (Phi-3's `qkv_proj`) whose output columns are
/// q's, k's and v's.
#[allow(clippy::large_enum_variant)] // one per block
enum Qkv {
    Split([Lin; 3]),
    Fused(Lin, [usize; 3]),
}

/// gate and up: two layers, or one fused layer (Phi-3's `gate_up_proj`, gate first).
#[allow(clippy::large_enum_variant)] // one per block
enum GateUp {
    Split([Lin; 2]),
    Fused(Lin),
}

/// One expert of a mixture: a SwiGLU MLP.
struct Expert {
    gate: Lin,
    up: Lin,
    down: Lin,
}

/// A block's MLP: dense, or a mixture of experts behind a router.
#[allow(clippy::large_enum_variant)] // one per block
enum Ffn {
    Dense {
        gate_up: GateUp,
        down: Lin,
    },
    /// Softmax over the router's logits, the `top_k` largest kept and renormalized (Mixtral's
    /// `MixtralTopKRouter`), each token's output the weighted sum of its experts'.
    Moe {
        router: Lin,
        experts: Vec<Expert>,
        top_k: usize,
    },
}

/// Per token, its `k` experts and their weights: softmax over `logits` (`[n, e]`, in f32 as
/// transformers computes it), the `k` largest (lower index first on ties), renormalized to sum
/// to 1 when `norm`.
fn route(logits: &[f32], e: usize, k: usize, norm: bool) -> Vec<Vec<(usize, f32)>> {
    logits
        .chunks(e)
        .map(|row| {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
            let z: f32 = p.iter().sum();
            let mut idx: Vec<usize> = (0..e).collect();
            idx.sort_by(|a, b| p[*b].total_cmp(&p[*a]).then(a.cmp(b)));
            idx.truncate(k);
            let top: Vec<f32> = idx.iter().map(|i| p[*i] / z).collect();
            let sum: f32 = if norm { top.iter().sum() } else { 1.0 };
            idx.into_iter().zip(top).map(|(i, w)| (i, w / sum)).collect()
        })
        .collect()
}

/// Per expert, the rows of `a` (`[n, hidden]`) routed to it and their weights.
fn routes(router: &Lin, experts: usize, (top_k, norm): (usize, bool), a: &[f32]) -> Result<Vec<Vec<(usize, f32)>>> {
    let mut per_expert = vec![Vec::new(); experts];
    for (t, picks) in route(&router.apply(a)?, experts, top_k, norm).into_iter().enumerate() {
        for (e, w) in picks {
            per_expert[e].push((t, w));
        }
    }
    Ok(per_expert)
}

/// What [`Decoder`]'s mixture shows of each expert that got rows: its index, its (row, weight)
/// pairs, its gated activations (its down projection's input) and its output rows.
type ExpertVisit<'a> = dyn FnMut(usize, &[(usize, f32)], &[f32], &[f32]) + 'a;

/// Rows `rows` of `x` (`[n, width]`), gathered.
fn gather(x: &[f32], width: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter().flat_map(|r| &x[r * width..(r + 1) * width]).copied().collect()
}

/// Splits `[n, Σ widths]` row-major into `[n, width]` parts.
fn split_cols(y: &[f32], widths: &[usize]) -> Vec<Vec<f32>> {
    let total: usize = widths.iter().sum::<usize>().max(1);
    let n = y.len() / total;
    let mut parts: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(n * w)).collect();
    for row in y.chunks(total) {
        let mut at = 0;
        for (p, w) in parts.iter_mut().zip(widths) {
            p.extend_from_slice(&row[at..at + w]);
            at += w;
        }
    }
    parts
}

struct Layer {
    ln_in: Vec<f32>,
    qkv: Qkv,
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
    ffn: Ffn,
    /// Sliding window, `None` for full attention.
    window: Option<usize>,
    /// Rotary frequencies of this layer (Gemma's local layers have their own base).
    inv_freq: Vec<f64>,
}

/// A loaded decoder: every block in memory ([`Decoder::load`]), or streamed from a
/// [`TensorSource`] one block at a time ([`Decoder::streamed`]: the block-by-block passes —
/// [`Decoder::trace`], [`Decoder::input_moments`], [`Decoder::layer_cosines`],
/// [`Decoder::expert_scores`] — load block `i` when they reach it and drop it when they leave
/// it, so a model larger than memory calibrates within one block's f32 weights).
pub struct Decoder<'s> {
    g: Geometry,
    /// The token embedding; empty in a streamed decoder except while its windows are embedded
    /// ([`Decoder::embedded`]).
    embed: Vec<f32>,
    /// The output head; `None` when streamed (the block-by-block passes do not read it).
    lm_head: Option<Lin>,
    /// Every block; a streamed decoder holds the one in flight.
    layers: Vec<Option<Layer>>,
    norm: Vec<f32>,
    /// Added to every norm gain at load (Gemma's `1 + w`), taken off again when norms are
    /// written back (AWQ).
    norm_add: f32,
    eps: f32,
    /// Where a streamed decoder's blocks come from, and each block's tensor names.
    source: Option<(&'s dyn TensorSource, Vec<Vec<String>>)>,
    /// Where the trace's activations go past their memory budget.
    scratch: Scratch,
    /// Where a streamed decoder's blocks multiply ([`Decoder::on`]).
    device: Device,
}

impl std::fmt::Debug for Decoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("family", &self.g.family)
            .field("layers", &self.layers.len())
            .field("hidden", &self.g.hidden)
            .field("streamed", &self.source.is_some())
            .finish_non_exhaustive()
    }
}

fn inv_freq(theta: f64, hd: usize) -> Vec<f64> {
    (0..hd / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / hd as f64)).collect()
}

/// Builds a decoder's parts from named weights (shapes checked against the geometry).
struct Parts<'a> {
    g: &'a Geometry,
    w: &'a Weights,
    device: &'a Device,
    /// Linear layers as [`Lin::mirrored`]: dense on the CPU for calibration, multiplied on
    /// `device`.
    mirror: bool,
}

impl Parts<'_> {
    fn bad(&self, m: &str) -> Error {
        Error::Model(format!("{}: {m}", self.g.family.model_type()))
    }

    /// A tensor as f32 (a norm with the family's gain offset added).
    fn get(&self, role: Role, l: usize) -> Result<Vec<f32>> {
        let f = self.g.family;
        let mut v = self.w.get(&f.hf(role, l), &self.g.shape(role)).map_err(|m| self.bad(&m))?;
        let norm_add = f.gguf_norm_offset();
        if role.is_norm() && norm_add != 0.0 {
            for x in &mut v {
                *x += norm_add;
            }
        }
        Ok(v)
    }

    fn opt(&self, role: Role, l: usize) -> Result<Option<Vec<f32>>> {
        if self.g.family.has(role) { self.get(role, l).map(Some) } else { Ok(None) }
    }

    fn lin_named(&self, name: &str, role: Role, bias: Option<Vec<f32>>) -> Result<Lin> {
        let s = self.g.shape(role);
        match self.w.matrix(name, s[0], s[1]).map_err(|m| self.bad(&m))? {
            crate::linear::Matrix::Dense(w) if self.mirror => Lin::mirrored(w, s[0], s[1], bias, self.device),
            m => Lin::new(m, s[0], s[1], bias, self.device),
        }
    }

    fn lin(&self, role: Role, bias: Option<Role>, l: usize) -> Result<Lin> {
        let b = match bias {
            Some(b) if self.g.family.has(b) => Some(self.get(b, l)?),
            _ => None,
        };
        self.lin_named(&self.g.family.hf(role, l), role, b)
    }

    /// Block `i`.
    fn layer(&self, i: usize) -> Result<Layer> {
        let (g, f) = (self.g, self.g.family);
        let (qd, kvd) = (g.heads * g.head_dim, g.kv_heads * g.head_dim);
        let qkv = if f.has(Role::Qkv) {
            Qkv::Fused(self.lin(Role::Qkv, None, i)?, [qd, kvd, kvd])
        } else {
            Qkv::Split([
                self.lin(Role::Q, Some(Role::QBias), i)?,
                self.lin(Role::K, Some(Role::KBias), i)?,
                self.lin(Role::V, Some(Role::VBias), i)?,
            ])
        };
        let ffn = if f.is_moe() {
            let expert = |e: usize| {
                let lin = |role: Role| self.lin_named(&f.hf_expert(role, i, e), role, None);
                Ok::<_, Error>(Expert {
                    gate: lin(Role::ExpertGate)?,
                    up: lin(Role::ExpertUp)?,
                    down: lin(Role::ExpertDown)?,
                })
            };
            Ffn::Moe {
                router: self.lin(Role::Router, None, i)?,
                experts: (0..g.experts).map(expert).collect::<Result<_>>()?,
                top_k: g.experts_used,
            }
        } else {
            let gate_up = if f.has(Role::GateUp) {
                GateUp::Fused(self.lin(Role::GateUp, None, i)?)
            } else {
                GateUp::Split([self.lin(Role::Gate, None, i)?, self.lin(Role::Up, None, i)?])
            };
            Ffn::Dense { gate_up, down: self.lin(Role::Down, None, i)? }
        };
        Ok(Layer {
            ln_in: self.get(Role::AttnNorm, i)?,
            qkv,
            o: self.lin(Role::O, None, i)?,
            q_norm: self.opt(Role::QNorm, i)?,
            k_norm: self.opt(Role::KNorm, i)?,
            post_attn: self.opt(Role::PostAttnNorm, i)?,
            ln_ffn: self.get(Role::FfnNorm, i)?,
            post_ffn: self.opt(Role::PostFfnNorm, i)?,
            ffn,
            window: g.windows[i],
            inv_freq: inv_freq(g.layer_rope_theta(i), g.head_dim),
        })
    }
}

impl Decoder<'static> {
    /// Builds the model from config.json and weights (names as transformers' `…ForCausalLM` of
    /// the family has them), with its linear layers (and lm_head, tied or not) on `device`.
    /// Every tensor must be accounted for: one the forward pass would not read is an error (a
    /// Qwen2 read as a llama would silently lose its biases).
    pub fn load(config: &serde_json::Value, w: &Weights, device: &Device) -> Result<Self> {
        let g = Geometry::from_config(config).map_err(|e| Error::Model(format!("decoder: {e}")))?;
        let f = g.family;
        let parts = Parts { g: &g, w, device, mirror: false };
        g.check_tensors(w.shapes()).map_err(|m| parts.bad(&m))?;
        let layers = (0..g.layers).map(|i| parts.layer(i).map(Some)).collect::<Result<Vec<_>>>()?;
        let embed = parts.get(Role::Embed, 0)?;
        // Tied embeddings: lm_head is the embedding matrix (kept packed if the bundle quantized it).
        let head = if w.contains(&f.hf(Role::Output, 0)) { Role::Output } else { Role::Embed };
        let lm_head = parts.lin_named(&f.hf(head, 0), Role::Output, None)?;
        let norm = parts.get(Role::OutputNorm, 0)?;
        #[allow(clippy::cast_possible_truncation)]
        let eps = g.eps as f32;
        Ok(Decoder {
            embed,
            lm_head: Some(lm_head),
            layers,
            norm,
            norm_add: f.gguf_norm_offset(),
            eps,
            g,
            source: None,
            scratch: Scratch::default(),
            device: device.clone(),
        })
    }
}

impl<'s> Decoder<'s> {
    /// The model of config.json over `source`, on the CPU, its blocks loaded one at a time by the
    /// block-by-block passes (the embedding and the final norm are held; the output head is not
    /// loaded). The completeness check reads the source's names and shapes, before any data.
    pub fn streamed(config: &serde_json::Value, source: &'s dyn TensorSource) -> Result<Self> {
        let g = Geometry::from_config(config).map_err(|e| Error::Model(format!("decoder: {e}")))?;
        let f = g.family;
        let shapes = source.shapes();
        g.check_tensors(shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())))
            .map_err(|m| Error::Model(format!("{}: {m}", f.model_type())))?;
        let mut blocks = vec![Vec::new(); g.layers];
        let mut top = Vec::new();
        for (name, _) in shapes {
            match f.parse_hf(&name) {
                Some((_, Some(l))) if l < g.layers => blocks[l].push(name),
                Some((Role::OutputNorm, None)) => top.push(name),
                _ => {}
            }
        }
        let w = source.load(&top)?;
        let norm = Parts { g: &g, w: &w, device: &Device::Cpu, mirror: false }.get(Role::OutputNorm, 0)?;
        #[allow(clippy::cast_possible_truncation)]
        let eps = g.eps as f32;
        Ok(Decoder {
            embed: Vec::new(),
            lm_head: None,
            layers: (0..g.layers).map(|_| None).collect(),
            norm,
            norm_add: f.gguf_norm_offset(),
            eps,
            g,
            source: Some((source, blocks)),
            scratch: Scratch::default(),
            device: Device::Cpu,
        })
    }

    /// Runs a streamed decoder's linear layers on `device` (their weights stay on the CPU too,
    /// for the passes to read and rewrite; on the CPU the results do not depend on threads, on
    /// a GPU they agree to float tolerance).
    #[must_use]
    pub fn on(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Keeps the trace's activations within `scratch.budget` bytes of memory, the rest in a
    /// scratch file in `scratch.dir` ([`Decoder::trace`]; the results are the same).
    #[must_use]
    pub fn with_scratch(mut self, scratch: Scratch) -> Self {
        self.scratch = scratch;
        self
    }

    /// Every window's embeddings, the residual streams the block-by-block passes carry (within
    /// the scratch budget).
    fn streams(&mut self, windows: &[Vec<u32>]) -> Result<spill::Windows> {
        let lens = windows.iter().map(|w| w.len() * self.g.hidden).collect();
        let mut xs = spill::Windows::new(lens, &self.scratch, self.scratch.budget)?;
        self.embedded(windows, &mut xs)?;
        Ok(xs)
    }

    /// Every window's embedded tokens into `xs`. A streamed decoder loads the embedding for
    /// this and drops it after (the block-by-block passes read it once, at the start).
    fn embedded(&mut self, windows: &[Vec<u32>], xs: &mut spill::Windows) -> Result<()> {
        let load = self.embed.is_empty() && self.source.is_some();
        if let Some((source, _)) = self.source.as_ref().filter(|_| load) {
            let name = self.g.family.hf(Role::Embed, 0);
            let w = source.load(std::slice::from_ref(&name))?;
            self.embed = Parts { g: &self.g, w: &w, device: &Device::Cpu, mirror: false }.get(Role::Embed, 0)?;
        }
        let done = windows.iter().enumerate().try_for_each(|(i, w)| xs.set(i, self.embed_ids(w)?));
        if load {
            self.embed = Vec::new();
        }
        done
    }

    /// Loads block `li` from the source of a streamed decoder (a loaded one has it).
    fn fetch(&mut self, li: usize) -> Result<()> {
        if self.layers[li].is_some() {
            return Ok(());
        }
        let Some((source, blocks)) = &self.source else {
            return Err(Error::Model(format!("decoder: block {li} is not loaded")));
        };
        let w = source.load(&blocks[li])?;
        let layer = Parts { g: &self.g, w: &w, device: &self.device, mirror: true }.layer(li)?;
        self.layers[li] = Some(layer);
        Ok(())
    }

    /// Drops block `li` of a streamed decoder (a loaded one keeps it).
    fn evict(&mut self, li: usize) {
        if self.source.is_some() {
            self.layers[li] = None;
        }
    }

    /// Block `li`, loaded ([`Decoder::fetch`]).
    fn layer(&self, li: usize) -> &Layer {
        self.layers[li].as_ref().expect("block fetched before use")
    }

    /// Every block, for passes that run a window through the whole model (a loaded decoder).
    fn all_layers(&self) -> Result<Vec<&Layer>> {
        self.layers
            .iter()
            .map(|l| l.as_ref().ok_or_else(|| Error::Model("decoder: streamed block by block; load it whole".into())))
            .collect()
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
        if self.embed.len() < self.g.vocab * h {
            return Err(Error::Model("decoder: a streamed decoder holds no embedding outside its passes".into()));
        }
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
        let (mut q, mut k, v) = match &l.qkv {
            Qkv::Split([q, k, v]) => (q.apply(&a)?, k.apply(&a)?, v.apply(&a)?),
            Qkv::Fused(w, widths) => {
                let mut p = split_cols(&w.apply(&a)?, widths).into_iter();
                let mut next = || p.next().unwrap_or_default();
                (next(), next(), next())
            }
        };
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

    /// The gated activation `act(gate) · up`: SwiGLU, or GeGLU with tanh-approximated GELU
    /// (Gemma).
    fn glu(&self, g: &[f32], u: &[f32]) -> Vec<f32> {
        if self.g.family.gelu_mlp() {
            const C: f32 = 0.797_884_6; // √(2/π)
            g.iter().zip(u).map(|(g, u)| 0.5 * g * (1.0 + (C * (g + 0.044_715 * g * g * g)).tanh()) * u).collect()
        } else {
            g.iter().zip(u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect()
        }
    }

    /// The gated activation of a dense MLP for its normed input `a` (the input of `down_proj`).
    fn mlp_act(&self, gate_up: &GateUp, a: &[f32]) -> Result<Vec<f32>> {
        let (g, u) = match gate_up {
            GateUp::Split([g, u]) => (g.apply(a)?, u.apply(a)?),
            GateUp::Fused(w) => {
                let mut p = split_cols(&w.apply(a)?, &[w.out / 2, w.out / 2]).into_iter();
                let mut next = || p.next().unwrap_or_default();
                (next(), next())
            }
        };
        Ok(self.glu(&g, &u))
    }

    /// An expert's gated activation for its rows `a`.
    fn expert_act(&self, e: &Expert, a: &[f32]) -> Result<Vec<f32>> {
        Ok(self.glu(&e.gate.apply(a)?, &e.up.apply(a)?))
    }

    /// What block `l`'s MLP adds to the residual stream for its normed input `a`. A mixture runs
    /// each expert on the rows routed to it and adds them back weighted, expert by expert in
    /// order (the same sums at any thread count).
    fn mlp(&self, l: &Layer, a: &[f32]) -> Result<Vec<f32>> {
        let y = match &l.ffn {
            Ffn::Dense { gate_up, down } => down.apply(&self.mlp_act(gate_up, a)?)?,
            Ffn::Moe { router, experts, top_k } => self.mixture(router, experts, *top_k, a, &mut |_, _, _, _| {})?,
        };
        Ok(self.post_norm(y, l.post_ffn.as_ref()))
    }

    /// A mixture's output for its normed input `a`: each expert on the rows routed to it, added
    /// back weighted, expert by expert in order (the same sums at any thread count). `visit`
    /// sees each expert that got rows: its index, its (row, weight) pairs and its output rows.
    fn mixture(
        &self,
        router: &Lin,
        experts: &[Expert],
        top_k: usize,
        a: &[f32],
        visit: &mut ExpertVisit<'_>,
    ) -> Result<Vec<f32>> {
        let h = self.g.hidden;
        let mut y = vec![0f32; a.len()];
        for (i, (e, rows)) in
            experts.iter().zip(routes(router, experts.len(), (top_k, self.g.norm_topk), a)?).enumerate()
        {
            if rows.is_empty() {
                continue;
            }
            let idx: Vec<usize> = rows.iter().map(|r| r.0).collect();
            let act = self.expert_act(e, &gather(a, h, &idx))?;
            let out = e.down.apply(&act)?;
            visit(i, &rows, &act, &out);
            for ((t, w), o) in rows.iter().zip(out.chunks(h)) {
                for (y, o) in y[t * h..(t + 1) * h].iter_mut().zip(o) {
                    *y += w * o;
                }
            }
        }
        Ok(y)
    }

    /// `x += attention(x)`: block `l`'s attention half on the residual stream.
    fn add_attention(&self, l: &Layer, x: &mut [f32]) -> Result<()> {
        let o = self.attn_out(l, &self.attn_context(l, x)?)?;
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        Ok(())
    }

    /// `x += mlp(norm(x))`: block `l`'s MLP half on the residual stream.
    fn add_mlp(&self, l: &Layer, x: &mut [f32]) -> Result<()> {
        let d = self.mlp(l, &self.rms(x, &l.ln_ffn))?;
        x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        Ok(())
    }

    /// Logits `[n, vocab]` for a token sequence (causal, positions from 0).
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut x = self.embed_ids(ids)?;
        for l in self.all_layers()? {
            self.add_attention(l, &mut x)?;
            self.add_mlp(l, &mut x)?;
        }
        let x = self.rms(&x, &self.norm);
        self.lm_head.as_ref().ok_or_else(|| Error::Model("decoder: streamed without its output head".into()))?.apply(&x)
    }

    /// Per block of a mixture, per expert: `(Σ g · ‖f_e(x)‖₂, tokens)` over the tokens routed to
    /// the expert in every window — its router weight `g` times the norm of its output, summed
    /// (the router-weighted activation that expert pruning ranks by; REAP, Lasby et al. 2025),
    /// and how many tokens reached it. Windows run block by block with the model as it is.
    pub fn expert_scores(&mut self, windows: &[Vec<u32>]) -> Result<Vec<Vec<(f64, usize)>>> {
        let h = self.g.hidden;
        let mut out = Vec::with_capacity(self.layers.len());
        let mut xs = self.streams(windows)?;
        for li in 0..self.layers.len() {
            self.fetch(li)?;
            let l = self.layer(li);
            let Ffn::Moe { router, experts, top_k } = &l.ffn else {
                return Err(Error::Model(format!("{}: expert scores of a dense MLP", self.g.family.model_type())));
            };
            let mut acc = vec![(0f64, 0usize); experts.len()];
            for i in 0..xs.len() {
                xs.update(i, |x| {
                    self.add_attention(l, x)?;
                    let a = self.rms(x, &l.ln_ffn);
                    // The block's output and the scores from one run of the experts.
                    let y = self.mixture(router, experts, *top_k, &a, &mut |e, rows, _, out| {
                        for ((_, w), row) in rows.iter().zip(out.chunks(h)) {
                            acc[e].0 += f64::from(*w) * row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
                        }
                        acc[e].1 += rows.len();
                    })?;
                    let d = self.post_norm(y, l.post_ffn.as_ref());
                    x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
                    Ok(())
                })?;
            }
            out.push(acc);
            self.evict(li);
        }
        Ok(out)
    }

    /// Per layer, the mean cosine between each token's residual stream before and after the
    /// layer, over every window (what block influence is computed from). Block by block, every
    /// window's stream held.
    pub fn layer_cosines(&mut self, windows: &[Vec<u32>]) -> Result<Vec<f64>> {
        let mut xs = self.streams(windows)?;
        let mut out = Vec::with_capacity(self.layers.len());
        for li in 0..self.layers.len() {
            self.fetch(li)?;
            let l = self.layer(li);
            let mut acc = crate::calibrate::CosMean::default();
            for i in 0..xs.len() {
                xs.update(i, |x| {
                    let before = x.clone();
                    self.add_attention(l, x)?;
                    self.add_mlp(l, x)?;
                    acc.add(&before, x, self.g.hidden);
                    Ok(())
                })?;
            }
            out.push(acc.mean());
            self.evict(li);
        }
        Ok(out)
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

    /// The block-by-block trace calibrated passes observe. Every window's residual stream goes
    /// through block `i` one input site at a time — the normed stream (read by q, k, v), the
    /// attention context (o), the normed stream after attention (gate, up), the gated activation
    /// (down) — and at each site `obs` first sees every window's input
    /// ([`Observer::input`]), then may rewrite the block's weights ([`Observer::rewrite`]); the
    /// trace continues with what it leaves, so a rewritten layer feeds the next site and block
    /// `i + 1`. [`Observer::block_done`] comes after the block's output is computed. Memory: the
    /// windows' residual streams and one block's attention contexts. The runtime knows the
    /// architecture; the observer sees roles, names and matrices only. The trace ends after the
    /// last block with a linear layer the observer rewrites ([`Observer::rewrites`]): what later
    /// blocks would compute changes nothing it produces.
    pub fn trace(&mut self, windows: &[Vec<u32>], obs: &mut dyn Observer, progress: &dyn Fn()) -> Result<()> {
        self.trace_from(windows, obs, progress, None)
    }

    /// [`Decoder::trace`] from block `start.block` on, with every window's residual stream
    /// entering it (a checkpoint's, [`Observer::checkpoint`]): blocks before it are neither
    /// loaded nor run. `None` starts at block 0.
    ///
    /// # Errors
    /// Streams that do not fit the windows, and what the trace reports.
    pub fn trace_from(
        &mut self,
        windows: &[Vec<u32>],
        obs: &mut dyn Observer,
        progress: &dyn Fn(),
        start: Option<TraceStart>,
    ) -> Result<()> {
        let family = self.g.family;
        let hidden = self.g.hidden;
        let rewritten = |b: usize| {
            family.linear_roles().any(|r| {
                if r.per_expert() {
                    (0..self.g.experts).any(|e| obs.rewrites(&family.hf_expert(r, b, e)))
                } else {
                    obs.rewrites(&family.hf(r, b))
                }
            })
        };
        let end = (0..self.layers.len()).rev().find(|b| rewritten(*b)).map_or(0, |b| b + 1);
        // The three sets held at once (residual streams, attention contexts, normed streams)
        // share the activation budget.
        let budget = self.scratch.budget / 3;
        let tokens: Vec<usize> = windows.iter().map(Vec::len).collect();
        let mut xs = spill::Windows::new(tokens.iter().map(|t| t * hidden).collect(), &self.scratch, budget)?;
        let first = match start {
            None => {
                self.embedded(windows, &mut xs)?;
                0
            }
            Some(TraceStart { block, streams }) => {
                let fits = block <= self.layers.len()
                    && streams.len() == windows.len()
                    && streams.iter().zip(&tokens).all(|(s, t)| s.len() == t * hidden);
                if !fits {
                    return Err(Error::Model(format!(
                        "resuming at block {block}: the saved streams do not fit {} windows of this model",
                        windows.len()
                    )));
                }
                for (i, x) in streams.into_iter().enumerate() {
                    xs.set(i, x)?;
                }
                for _ in 0..block {
                    progress();
                }
                block
            }
        };
        for _ in end.max(first)..self.layers.len() {
            progress();
        }
        for li in first..end {
            self.fetch(li)?;
            let site = |readers, producer, width| Site { family, layer: li, expert: None, readers, producer, width };
            // q, k, v: the normed residual stream.
            let s = site(family.attn_readers(), Producer::Norm(Role::AttnNorm), hidden);
            for i in 0..xs.len() {
                obs.input(&s, &self.rms(&xs.get(i)?, &self.layer(li).ln_in))?;
            }
            obs.rewrite(&s, &mut self.block(li, None))?;
            // o: the attention contexts (from q, k, v as rewritten).
            let width = self.layer(li).o.inp;
            let mut ctxs = spill::Windows::new(tokens.iter().map(|t| t * width).collect(), &self.scratch, budget)?;
            for i in 0..xs.len() {
                ctxs.set(i, self.attn_context(self.layer(li), &xs.get(i)?)?)?;
            }
            let s = site(&[Role::O][..], Producer::Opaque, width);
            for i in 0..ctxs.len() {
                obs.input(&s, &ctxs.get(i)?)?;
            }
            obs.rewrite(&s, &mut self.block(li, None))?;
            for i in 0..xs.len() {
                let o = self.attn_out(self.layer(li), &ctxs.get(i)?)?;
                xs.update(i, |x| {
                    x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
                    Ok(())
                })?;
            }
            drop(ctxs);
            let mut normed = spill::Windows::new(tokens.iter().map(|t| t * hidden).collect(), &self.scratch, budget)?;
            for i in 0..xs.len() {
                normed.set(i, self.rms(&xs.get(i)?, &self.layer(li).ln_ffn))?;
            }
            if family.is_moe() {
                // The norm the router and every expert read: a pass may fold one scale into it
                // (AWQ), and then the experts read the stream it leaves.
                let gain = self.layer(li).ln_ffn.clone();
                let Ffn::Moe { router, experts, top_k } = &self.layer(li).ffn else { unreachable!("mixture family") };
                let routes = (0..normed.len())
                    .map(|i| routes(router, experts.len(), (*top_k, self.g.norm_topk), &normed.get(i)?))
                    .collect::<Result<Vec<_>>>()?;
                let input = MixtureInput {
                    layer: li,
                    width: hidden,
                    rows: tokens.iter().sum(),
                    normed: &normed,
                    routes: &routes,
                };
                obs.mixture(&input, &mut self.block(li, None))?;
                if self.layer(li).ln_ffn != gain {
                    for i in 0..xs.len() {
                        normed.set(i, self.rms(&xs.get(i)?, &self.layer(li).ln_ffn))?;
                    }
                }
                self.trace_experts(li, &normed, obs)?;
            } else {
                // gate, up: the normed stream after attention.
                let s = site(family.mlp_readers(), Producer::Norm(Role::FfnNorm), hidden);
                for i in 0..normed.len() {
                    obs.input(&s, &normed.get(i)?)?;
                }
                obs.rewrite(&s, &mut self.block(li, None))?;
                // down: the gated activations (from the norm and gate and up as rewritten: AWQ
                // divides the norm's gain by the scales it multiplies gate's and up's columns by).
                // A fused gate/up has no rows of up alone to fold a scale into.
                let producer = if family.has(Role::Up) { Producer::Rows(Role::Up) } else { Producer::Opaque };
                let Ffn::Dense { down, .. } = &self.layer(li).ffn else { unreachable!("dense family") };
                let s = site(&[Role::Down][..], producer, down.inp);
                for i in 0..xs.len() {
                    let l = self.layer(li);
                    let Ffn::Dense { gate_up, .. } = &l.ffn else { unreachable!("dense family") };
                    obs.input(&s, &self.mlp_act(gate_up, &self.rms(&xs.get(i)?, &l.ln_ffn))?)?;
                }
                obs.rewrite(&s, &mut self.block(li, None))?;
            }
            drop(normed);
            // The block's output with every rewrite applied (the norm too).
            for i in 0..xs.len() {
                xs.update(i, |x| self.add_mlp(self.layer(li), x))?;
            }
            obs.block_done(li, &mut self.block(li, None))?;
            self.evict(li);
            obs.checkpoint(li, &xs)?;
            progress();
        }
        Ok(())
    }

    /// The mixture of block `li` on the trace: the router reads every token (its own site; a
    /// scale folded into the shared norm is [`Observer::mixture`]'s, before this); then, expert
    /// by expert, gate and up read the tokens routed to the expert (by the router as rewritten),
    /// down their activations. An expert no token reached sees sites with no rows. No site here
    /// has a norm for a producer, so `normed` stays what the experts read.
    fn trace_experts(&mut self, li: usize, normed: &spill::Windows, obs: &mut dyn Observer) -> Result<()> {
        let (family, hidden) = (self.g.family, self.g.hidden);
        let site = |expert, readers, producer, width| Site { family, layer: li, expert, readers, producer, width };
        let s = site(None, &[Role::Router][..], Producer::Opaque, hidden);
        for i in 0..normed.len() {
            obs.input(&s, &normed.get(i)?)?;
        }
        obs.rewrite(&s, &mut self.block(li, None))?;
        let Ffn::Moe { router, experts, top_k } = &self.layer(li).ffn else { unreachable!("mixture family") };
        let routes: Vec<Vec<Vec<usize>>> = (0..normed.len())
            .map(|i| {
                let r = routes(router, experts.len(), (*top_k, self.g.norm_topk), &normed.get(i)?)?;
                Ok(r.into_iter().map(|rows| rows.into_iter().map(|(t, _)| t).collect()).collect())
            })
            .collect::<Result<_>>()?;
        let n_experts = experts.len();
        for e in 0..n_experts {
            let s = site(Some(e), &[Role::ExpertGate, Role::ExpertUp][..], Producer::Opaque, hidden);
            for (i, r) in routes.iter().enumerate() {
                obs.input(&s, &gather(&normed.get(i)?, hidden, &r[e]))?;
            }
            obs.rewrite(&s, &mut self.block(li, Some(e)))?;
            let Ffn::Moe { experts, .. } = &self.layer(li).ffn else { unreachable!("mixture family") };
            let ex = &experts[e];
            let s = site(Some(e), &[Role::ExpertDown][..], Producer::Rows(Role::ExpertUp), ex.down.inp);
            for (i, r) in routes.iter().enumerate() {
                obs.input(&s, &self.expert_act(ex, &gather(&normed.get(i)?, hidden, &r[e]))?)?;
            }
            obs.rewrite(&s, &mut self.block(li, Some(e)))?;
        }
        Ok(())
    }

    /// Block `li`'s weights, for an observer to read and rewrite.
    fn block(&mut self, li: usize, expert: Option<usize>) -> Block<'_> {
        Block {
            layer: self.layers[li].as_mut().expect("block fetched before use"),
            index: li,
            expert,
            family: self.g.family,
            norm_add: self.norm_add,
        }
    }

    /// `E[x_c²]` of every linear layer's input channels over `windows`, by weight name (one
    /// dense forward pass, one block's activations at a time). A mixture's experts: over the rows
    /// routed to each, weighted by the routing weight squared, per token of the windows.
    pub fn input_moments(&mut self, windows: &[Vec<u32>]) -> Result<BTreeMap<String, Vec<f32>>> {
        fn acc(m: &mut [f64], x: &[f32]) {
            for row in x.chunks_exact(m.len()) {
                for (m, v) in m.iter_mut().zip(row) {
                    *m += f64::from(v * v);
                }
            }
        }
        /// `Σ w² x_c²` over the rows an expert was routed, each row weighted by its routing
        /// weight squared: what the expert's error adds to the block's output per token.
        fn acc_routed(m: &mut [f64], rows: &[(usize, f32)], x: &[f32]) {
            for ((_, w), row) in rows.iter().zip(x.chunks_exact(m.len())) {
                let w2 = f64::from(*w) * f64::from(*w);
                for (m, v) in m.iter_mut().zip(row) {
                    *m += w2 * f64::from(v * v);
                }
            }
        }
        let f = self.g.family;
        let mut xs = self.streams(windows)?;
        let tokens = windows.iter().map(Vec::len).sum::<usize>().max(1) as f64;
        let mut out = BTreeMap::new();
        let mut put = |name: String, m: &[f64]| {
            out.insert(name, m.iter().map(|v| (v / tokens) as f32).collect::<Vec<f32>>());
        };
        let h = self.g.hidden;
        for li in 0..self.layers.len() {
            self.fetch(li)?;
            let l = self.layer(li);
            let (mut m_in, mut m_o, mut m_post) = (vec![0f64; h], vec![0f64; l.o.inp], vec![0f64; h]);
            // Dense: the down projection's input. A mixture: per expert, its gate/up input and
            // its down input over the rows routed to it (the router reads m_post).
            let mut m_down = match &l.ffn {
                Ffn::Dense { down, .. } => vec![vec![0f64; down.inp]],
                Ffn::Moe { experts, .. } => experts.iter().map(|e| vec![0f64; e.down.inp]).collect(),
            };
            let mut m_expert_in = vec![vec![0f64; h]; m_down.len()];
            for i in 0..xs.len() {
                xs.update(i, |x| {
                    acc(&mut m_in, &self.rms(x, &l.ln_in));
                    let c = self.attn_context(l, x)?;
                    acc(&mut m_o, &c);
                    let o = self.attn_out(l, &c)?;
                    x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
                    let a = self.rms(x, &l.ln_ffn);
                    acc(&mut m_post, &a);
                    let y = match &l.ffn {
                        Ffn::Dense { gate_up, down } => {
                            let act = self.mlp_act(gate_up, &a)?;
                            acc(&mut m_down[0], &act);
                            down.apply(&act)?
                        }
                        Ffn::Moe { router, experts, top_k } => {
                            self.mixture(router, experts, *top_k, &a, &mut |e, rows, act, _| {
                                let idx: Vec<usize> = rows.iter().map(|r| r.0).collect();
                                acc_routed(&mut m_expert_in[e], rows, &gather(&a, h, &idx));
                                acc_routed(&mut m_down[e], rows, act);
                            })?
                        }
                    };
                    let d = self.post_norm(y, l.post_ffn.as_ref());
                    x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
                    Ok(())
                })?;
            }
            for &r in f.attn_readers() {
                put(f.hf(r, li), &m_in);
            }
            put(f.hf(Role::O, li), &m_o);
            if f.is_moe() {
                put(f.hf(Role::Router, li), &m_post);
                for (e, (m_e, m_d)) in m_expert_in.iter().zip(&m_down).enumerate() {
                    put(f.hf_expert(Role::ExpertGate, li, e), m_e);
                    put(f.hf_expert(Role::ExpertUp, li, e), m_e);
                    put(f.hf_expert(Role::ExpertDown, li, e), m_d);
                }
            } else {
                for &r in f.mlp_readers() {
                    put(f.hf(r, li), &m_post);
                }
                put(f.hf(Role::Down, li), &m_down[0]);
            }
            self.evict(li);
        }
        // The output head (lm_head, or the tied embedding) reads the final normed stream.
        let mut m = vec![0f64; self.g.hidden];
        for i in 0..xs.len() {
            acc(&mut m, &self.rms(&xs.get(i)?, &self.norm));
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

/// Who produces the input a [`Site`]'s layers read, for passes that fold a per-channel scale
/// into it (AWQ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Producer {
    /// A norm's gain: scaling the input's channels divides the gain.
    Norm(Role),
    /// A linear layer's rows: the gated product is linear in `up`'s rows.
    Rows(Role),
    /// Nothing a scale folds into (the attention context).
    Opaque,
}

/// One input site of a block: the linear layers that read the same input.
#[derive(Clone, Copy, Debug)]
pub struct Site {
    /// The model's family (names come from its table).
    pub family: Family,
    /// Block index.
    pub layer: usize,
    /// The expert whose layers these are (a mixture's per-expert roles), else `None`.
    pub expert: Option<usize>,
    /// The layers reading this input, in the order they are offered.
    pub readers: &'static [Role],
    /// Where the input comes from.
    pub producer: Producer,
    /// Input width (columns of the readers' weights).
    pub width: usize,
}

impl Site {
    /// A role's tensor name in this block (this expert's, for a per-expert role).
    pub fn name(&self, role: Role) -> String {
        name(self.family, role, self.layer, self.expert)
    }
}

fn name(family: Family, role: Role, layer: usize, expert: Option<usize>) -> String {
    match expert {
        Some(e) if role.per_expert() => family.hf_expert(role, layer, e),
        _ => family.hf(role, layer),
    }
}

/// Every window's residual stream between two blocks of a trace, as a checkpoint saves it.
pub trait Streams {
    /// Windows.
    fn count(&self) -> usize;
    /// Window `i`'s stream, `[tokens, hidden]`.
    ///
    /// # Errors
    /// Reading it back from the scratch file failed.
    fn window(&self, i: usize) -> Result<Vec<f32>>;
}

impl Streams for spill::Windows {
    fn count(&self) -> usize {
        self.len()
    }

    fn window(&self, i: usize) -> Result<Vec<f32>> {
        self.get(i).map(std::borrow::Cow::into_owned)
    }
}

/// Where [`Decoder::trace_from`] starts.
#[derive(Debug)]
pub struct TraceStart {
    /// The first block to run.
    pub block: usize,
    /// Every window's residual stream entering it.
    pub streams: Vec<Vec<f32>>,
}

/// A mixture block's MLP input as [`Observer::mixture`] sees it: the normed stream the router
/// and every expert read, and where the router (as the block has it then) sends each row.
pub struct MixtureInput<'a> {
    /// Block index.
    pub layer: usize,
    /// Input width (hidden size).
    pub width: usize,
    /// Rows over every window.
    pub rows: usize,
    /// Every window's normed stream, `[tokens, width]`.
    pub normed: &'a dyn Streams,
    /// Per window, per expert: `(row, routing weight)` of each row routed to it.
    pub routes: &'a [Vec<Vec<(usize, f32)>>],
}

/// A calibrated pass attached to [`Decoder::trace`].
pub trait Observer {
    /// One window's input at `site`, `[tokens, width]` row-major; windows come in order.
    fn input(&mut self, site: &Site, x: &[f32]) -> Result<()>;
    /// Every window's input at `site` was seen: rewrite what the pass changes.
    fn rewrite(&mut self, site: &Site, block: &mut Block<'_>) -> Result<()>;
    /// Whether the pass rewrites the linear layer `name` (the trace runs no block after the
    /// last one with such a layer). Default: every layer.
    fn rewrites(&self, _name: &str) -> bool {
        true
    }
    /// A mixture block's MLP input, before its router's and experts' sites: a pass that folds
    /// one per-channel scale into the norm in front of the router and every expert (AWQ)
    /// rewrites the norm, the router's columns and each expert's gate and up columns here; the
    /// experts then read the stream the rewritten norm gives.
    fn mixture(&mut self, _input: &MixtureInput<'_>, _block: &mut Block<'_>) -> Result<()> {
        Ok(())
    }
    /// Block `layer`'s output is computed (what the next block reads no longer changes).
    fn block_done(&mut self, _layer: usize, _block: &mut Block<'_>) -> Result<()> {
        Ok(())
    }
    /// Block `layer` is finished and dropped; `streams` are what block `layer + 1` reads (what a
    /// checkpoint saves to resume from, with the observer's results so far).
    fn checkpoint(&mut self, _layer: usize, _streams: &dyn Streams) -> Result<()> {
        Ok(())
    }
}

/// One block's weights as an [`Observer`] sees them: linear layers and norms by role.
pub struct Block<'a> {
    layer: &'a mut Layer,
    index: usize,
    /// The expert per-expert roles resolve to (a site of one expert), else `None`.
    expert: Option<usize>,
    family: Family,
    norm_add: f32,
}

impl Block<'_> {
    /// A role's tensor name in this block (the block's expert's, for a per-expert role).
    pub fn name(&self, role: Role) -> String {
        name(self.family, role, self.index, self.expert)
    }

    /// Experts of the block (0 for a dense MLP).
    pub fn experts(&self) -> usize {
        match &self.layer.ffn {
            Ffn::Moe { experts, .. } => experts.len(),
            Ffn::Dense { .. } => 0,
        }
    }

    /// The same block with per-expert roles resolving to expert `e`.
    pub fn expert(&mut self, e: usize) -> Block<'_> {
        Block { layer: self.layer, index: self.index, expert: Some(e), family: self.family, norm_add: self.norm_add }
    }

    /// The model's family (which linear roles a block has: [`Family::linear_roles`]).
    pub fn family(&self) -> Family {
        self.family
    }

    fn lin(&self, role: Role) -> Result<&Lin> {
        self.lin_at(role, self.expert)
    }

    fn lin_at(&self, role: Role, expert: Option<usize>) -> Result<&Lin> {
        let l = &*self.layer;
        let missing = || Error::Model(format!("{role:?} is not a linear layer of this block"));
        Ok(match (role, &l.qkv, &l.ffn) {
            (Role::Q, Qkv::Split(a), _) => &a[0],
            (Role::K, Qkv::Split(a), _) => &a[1],
            (Role::V, Qkv::Split(a), _) => &a[2],
            (Role::Qkv, Qkv::Fused(w, _), _) | (Role::GateUp, _, Ffn::Dense { gate_up: GateUp::Fused(w), .. }) => w,
            (Role::O, _, _) => &l.o,
            (Role::Gate, _, Ffn::Dense { gate_up: GateUp::Split(a), .. }) => &a[0],
            (Role::Up, _, Ffn::Dense { gate_up: GateUp::Split(a), .. }) => &a[1],
            (Role::Down, _, Ffn::Dense { down, .. }) => down,
            (Role::Router, _, Ffn::Moe { router, .. }) => router,
            (Role::ExpertGate | Role::ExpertUp | Role::ExpertDown, _, Ffn::Moe { experts, .. }) => {
                let e = experts.get(expert.ok_or_else(missing)?).ok_or_else(missing)?;
                match role {
                    Role::ExpertGate => &e.gate,
                    Role::ExpertUp => &e.up,
                    _ => &e.down,
                }
            }
            _ => return Err(missing()),
        })
    }

    fn lin_mut(&mut self, role: Role) -> Result<&mut Lin> {
        let l = &mut *self.layer;
        let missing = || Error::Model(format!("{role:?} is not a linear layer of this block"));
        Ok(match (role, &mut l.qkv, &mut l.ffn) {
            (Role::Q, Qkv::Split(a), _) => &mut a[0],
            (Role::K, Qkv::Split(a), _) => &mut a[1],
            (Role::V, Qkv::Split(a), _) => &mut a[2],
            (Role::Qkv, Qkv::Fused(w, _), _) | (Role::GateUp, _, Ffn::Dense { gate_up: GateUp::Fused(w), .. }) => w,
            (Role::O, _, _) => &mut l.o,
            (Role::Gate, _, Ffn::Dense { gate_up: GateUp::Split(a), .. }) => &mut a[0],
            (Role::Up, _, Ffn::Dense { gate_up: GateUp::Split(a), .. }) => &mut a[1],
            (Role::Down, _, Ffn::Dense { down, .. }) => down,
            (Role::Router, _, Ffn::Moe { router, .. }) => router,
            (Role::ExpertGate | Role::ExpertUp | Role::ExpertDown, _, Ffn::Moe { experts, .. }) => {
                let e = experts.get_mut(self.expert.ok_or_else(missing)?).ok_or_else(missing)?;
                match role {
                    Role::ExpertGate => &mut e.gate,
                    Role::ExpertUp => &mut e.up,
                    _ => &mut e.down,
                }
            }
            _ => return Err(missing()),
        })
    }

    /// `(out, in)` of a linear layer.
    pub fn shape(&self, role: Role) -> Result<(usize, usize)> {
        self.lin(role).map(|l| (l.out, l.inp))
    }

    /// A linear layer's weights, `[out, in]` row-major, when held dense in f32 on the CPU (as
    /// calibration loads them).
    pub fn dense(&self, role: Role) -> Result<Option<&[f32]>> {
        Ok(self.lin(role)?.dense())
    }

    /// A linear layer's dense weights, or an error naming the need.
    pub fn weights(&self, role: Role) -> Result<&[f32]> {
        self.weights_at(role, self.expert)
    }

    /// Expert `e`'s dense weights of a per-expert role (every expert's at once, where
    /// [`Block::expert`] gives one at a time).
    pub fn expert_weights(&self, e: usize, role: Role) -> Result<&[f32]> {
        self.weights_at(role, Some(e))
    }

    fn weights_at(&self, role: Role, expert: Option<usize>) -> Result<&[f32]> {
        self.lin_at(role, expert)?
            .dense()
            .ok_or_else(|| Error::Model("calibration needs dense f32 weights on the CPU".into()))
    }

    /// Replaces a linear layer's weights (its bias stays).
    pub fn set_weights(&mut self, role: Role, w: Vec<f32>) -> Result<()> {
        let lin = self.lin_mut(role)?;
        *lin = lin.with_dense(w)?;
        Ok(())
    }

    /// `W·diag(s)`: every row's column `c` times `s[c]`.
    pub fn scale_columns(&mut self, role: Role, s: &[f32]) -> Result<()> {
        let mut w = self.weights(role)?.to_vec();
        let inp = self.shape(role)?.1;
        for row in w.chunks_mut(inp) {
            for (v, s) in row.iter_mut().zip(s) {
                *v *= s;
            }
        }
        self.set_weights(role, w)
    }

    /// `diag(s)·W`: row `r` times `s[r]`, and its bias, so the layer's output row `r` scales by
    /// `s[r]`.
    pub fn scale_rows(&mut self, role: Role, s: &[f32]) -> Result<()> {
        let mut w = self.weights(role)?.to_vec();
        let (out, inp) = self.shape(role)?;
        for (row, s) in w.chunks_mut(inp).zip(s) {
            for v in row {
                *v *= s;
            }
        }
        debug_assert_eq!(w.len(), out * inp);
        let lin = self.lin_mut(role)?;
        let bias = lin.bias().map(|b| b.iter().zip(s).map(|(b, s)| b * s).collect());
        *lin = lin.with_dense_bias(w, bias)?;
        Ok(())
    }

    /// Divides a norm's gain by `s` per channel; returns the gain as stored in the model's file
    /// (Gemma's `1 + w` offset taken off again).
    pub fn divide_norm(&mut self, role: Role, s: &[f32]) -> Result<Vec<f32>> {
        let gain = match role {
            Role::AttnNorm => &mut self.layer.ln_in,
            Role::FfnNorm => &mut self.layer.ln_ffn,
            other => return Err(Error::Model(format!("{other:?} is not a norm in front of linear layers"))),
        };
        for (g, s) in gain.iter_mut().zip(s) {
            *g /= s;
        }
        Ok(gain.iter().map(|v| v - self.norm_add).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Random weights of every tensor a config's model has.
    fn tiny(config: &serde_json::Value) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let g = Geometry::from_config(config).unwrap();
        let mut seed = 11u64;
        g.expected()
            .into_iter()
            .map(|(name, role, shape)| {
                let v = (0..shape.iter().product::<usize>())
                    .map(|_| {
                        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                        let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                        if role.is_norm() { 1.0 + 0.2 * u } else { u * 0.6 }
                    })
                    .collect();
                (name, (shape, v))
            })
            .collect()
    }

    /// A source that records what each load asked for.
    struct Recorded {
        tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
        loads: Mutex<Vec<Vec<String>>>,
    }

    impl TensorSource for Recorded {
        fn shapes(&self) -> Vec<(String, Vec<usize>)> {
            self.tensors.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect()
        }

        fn load(&self, names: &[String]) -> Result<Weights> {
            self.loads.lock().unwrap().push(names.to_vec());
            Ok(Weights::from_dense(names.iter().map(|n| (n.clone(), self.tensors[n].clone())).collect()))
        }
    }

    /// Records every input it sees and halves every reader's weights (so that a rewrite changes
    /// what later sites and blocks see).
    #[derive(Default)]
    struct Halve {
        seen: Vec<(String, Vec<u32>)>,
        /// The streams after each block.
        saved: Vec<Vec<Vec<f32>>>,
    }

    impl Observer for Halve {
        fn input(&mut self, site: &Site, x: &[f32]) -> Result<()> {
            self.seen.push((site.name(site.readers[0]), x.iter().map(|v| v.to_bits()).collect()));
            Ok(())
        }

        fn rewrite(&mut self, site: &Site, block: &mut Block<'_>) -> Result<()> {
            for &role in site.readers {
                let w: Vec<f32> = block.weights(role)?.iter().map(|v| v * 0.5).collect();
                block.set_weights(role, w)?;
            }
            Ok(())
        }

        fn checkpoint(&mut self, _layer: usize, streams: &dyn Streams) -> Result<()> {
            self.saved.push((0..streams.count()).map(|i| streams.window(i)).collect::<Result<_>>()?);
            Ok(())
        }
    }

    /// Folds a per-channel scale into a mixture's shared norm (AWQ's fold, without rounding),
    /// recording the rows each expert's gate/up site sees and the streams after each block.
    struct Fold {
        scale: bool,
        seen: Vec<(String, usize)>,
        routed_rows: usize,
        saved: Vec<Vec<Vec<f32>>>,
    }

    impl Observer for Fold {
        fn input(&mut self, site: &Site, x: &[f32]) -> Result<()> {
            self.seen.push((site.name(site.readers[0]), x.len() / site.width));
            Ok(())
        }

        fn rewrite(&mut self, _site: &Site, _block: &mut Block<'_>) -> Result<()> {
            Ok(())
        }

        fn mixture(&mut self, input: &MixtureInput<'_>, block: &mut Block<'_>) -> Result<()> {
            self.routed_rows += input.routes.iter().flatten().map(Vec::len).sum::<usize>();
            assert_eq!(
                input.rows,
                (0..input.normed.count()).map(|i| input.normed.window(i).unwrap().len()).sum::<usize>() / input.width
            );
            if self.scale {
                let s: Vec<f32> = (0..input.width).map(|c| 0.25 + (c % 7) as f32 * 0.5).collect();
                block.divide_norm(Role::FfnNorm, &s)?;
                block.scale_columns(Role::Router, &s)?;
                for e in 0..block.experts() {
                    block.expert(e).scale_columns(Role::ExpertGate, &s)?;
                    block.expert(e).scale_columns(Role::ExpertUp, &s)?;
                }
            }
            Ok(())
        }

        fn checkpoint(&mut self, _layer: usize, streams: &dyn Streams) -> Result<()> {
            self.saved.push((0..streams.count()).map(|i| streams.window(i)).collect::<Result<_>>()?);
            Ok(())
        }
    }

    /// Rewrites the layers of one block only.
    struct OnlyBlock(&'static str, Halve);

    impl Observer for OnlyBlock {
        fn rewrites(&self, name: &str) -> bool {
            name.starts_with(self.0)
        }

        fn input(&mut self, site: &Site, x: &[f32]) -> Result<()> {
            self.1.input(site, x)
        }

        fn rewrite(&mut self, site: &Site, block: &mut Block<'_>) -> Result<()> {
            self.1.rewrite(site, block)
        }
    }

    #[test]
    fn test_the_trace_ends_after_the_last_block_the_observer_rewrites() {
        let config = serde_json::json!({"model_type": "mixtral", "hidden_size": 16, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 4, "intermediate_size": 24, "vocab_size": 40,
            "num_local_experts": 4, "num_experts_per_tok": 2});
        let source = Recorded { tensors: tiny(&config), loads: Mutex::new(Vec::new()) };
        let ticks = std::cell::Cell::new(0);
        let mut obs = OnlyBlock("model.layers.1.block_sparse_moe.experts.3.", Halve::default());
        let mut d = Decoder::streamed(&config, &source).unwrap();
        d.trace(&[vec![1, 2, 3]], &mut obs, &|| ticks.set(ticks.get() + 1)).unwrap();
        // The final norm, the embedding, blocks 0 and 1; the bar still reaches every block.
        let loads = source.loads.lock().unwrap().clone();
        assert_eq!(loads.len(), 4, "{loads:?}");
        assert!(loads[3].iter().all(|n| n.starts_with("model.layers.1.")));
        assert!(obs.1.seen.iter().any(|(n, _)| n.starts_with("model.layers.1.")));
        assert_eq!(ticks.get(), 4);
    }

    #[test]
    fn test_a_scale_folded_into_a_mixtures_norm_leaves_its_function_and_routing() {
        let windows = vec![vec![1u32, 5, 9, 3, 22, 17], vec![8, 39, 0, 12, 4, 4]];
        for (model_type, experts) in [("mixtral", "num_local_experts"), ("qwen3_moe", "num_experts")] {
            let config = serde_json::json!({"model_type": model_type, "hidden_size": 16, "num_attention_heads": 2,
                "num_key_value_heads": 1, "num_hidden_layers": 2, "intermediate_size": 24, "moe_intermediate_size": 12,
                "vocab_size": 40, experts: 4, "num_experts_per_tok": 2, "head_dim": 8});
            let tensors = tiny(&config);
            let run = |scale| {
                let mut d = Decoder::load(&config, &Weights::from_dense(tensors.clone()), &Device::Cpu).unwrap();
                let mut obs = Fold { scale, seen: Vec::new(), routed_rows: 0, saved: Vec::new() };
                d.trace(&windows, &mut obs, &|| {}).unwrap();
                obs
            };
            let (plain, folded) = (run(false), run(true));
            // Every row routed to top-2 experts, both times to the same experts.
            assert_eq!(plain.routed_rows, 2 * 2 * 12, "{model_type}");
            assert_eq!(folded.seen, plain.seen, "{model_type}: the same rows reach the same experts");
            for (a, b) in plain.saved.iter().flatten().flatten().zip(folded.saved.iter().flatten().flatten()) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{model_type}: stream {a} vs {b} after the fold");
            }
        }
    }

    #[test]
    fn test_streamed_and_spilled_passes_equal_the_loaded_model_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let windows = vec![vec![1u32, 5, 9, 3, 22, 17], vec![8, 39, 0, 12, 4, 4], vec![30, 2, 2]];
        for (model_type, extra) in [
            ("llama", serde_json::json!({})),
            ("phi3", serde_json::json!({})),
            ("mixtral", serde_json::json!({"num_local_experts": 4, "num_experts_per_tok": 2})),
        ] {
            let mut config = serde_json::json!({"model_type": model_type, "hidden_size": 16, "num_attention_heads": 2,
                "num_key_value_heads": 1, "num_hidden_layers": 3, "intermediate_size": 24, "vocab_size": 40});
            for (k, v) in extra.as_object().unwrap() {
                config[k] = v.clone();
            }
            let tensors = tiny(&config);
            let source = Recorded { tensors: tensors.clone(), loads: Mutex::new(Vec::new()) };
            let loaded = || Decoder::load(&config, &Weights::from_dense(tensors.clone()), &Device::Cpu).unwrap();
            let trace = |mut d: Decoder<'_>| {
                let mut obs = Halve::default();
                d.trace(&windows, &mut obs, &|| {}).unwrap();
                obs.seen
            };
            let mut full = Halve::default();
            loaded().trace(&windows, &mut full, &|| {}).unwrap();
            let expected = full.seen.clone();
            assert!(!expected.is_empty());
            // Resumed after block 1 from the streams saved there: blocks 2… see what they saw.
            let mut resumed = Halve::default();
            let start = TraceStart { block: 2, streams: full.saved[1].clone() };
            loaded().trace_from(&windows, &mut resumed, &|| {}, Some(start)).unwrap();
            let tail = &expected[expected.len() - resumed.seen.len()..];
            assert!(resumed.seen.len() < expected.len() && !resumed.seen.is_empty());
            assert!(tail[0].0.starts_with("model.layers.2."), "{model_type}: {}", tail[0].0);
            assert_eq!(resumed.seen, tail, "{model_type}: resumed");
            let streamed = Decoder::streamed(&config, &source).unwrap();
            assert_eq!(trace(streamed), expected, "{model_type}: streamed");
            let spilled = Decoder::streamed(&config, &source)
                .unwrap()
                .with_scratch(Scratch { dir: dir.path().to_path_buf(), budget: 0 });
            assert_eq!(trace(spilled), expected, "{model_type}: streamed, activations in the scratch file");
            // The final norm, the embedding (dropped once the windows are embedded), then one
            // block per load, each once per pass.
            let loads = source.loads.lock().unwrap().clone();
            assert_eq!(loads.len(), 2 * (2 + 3), "{model_type}: {loads:?}");
            assert_eq!(loads[1], ["model.embed_tokens.weight"], "{model_type}");
            for (i, names) in loads[2..5].iter().enumerate() {
                let prefix = format!("model.layers.{i}.");
                assert!(names.iter().all(|n| n.starts_with(&prefix)), "{model_type}: {names:?}");
            }
            let moments = loaded().input_moments(&windows).unwrap();
            let mut spilled = Decoder::streamed(&config, &source)
                .unwrap()
                .with_scratch(Scratch { dir: dir.path().to_path_buf(), budget: 0 });
            assert_eq!(spilled.input_moments(&windows).unwrap(), moments, "{model_type}: moments");
            assert_eq!(
                Decoder::streamed(&config, &source).unwrap().layer_cosines(&windows).unwrap(),
                loaded().layer_cosines(&windows).unwrap(),
                "{model_type}: layer cosines"
            );
            if model_type == "mixtral" {
                assert_eq!(
                    Decoder::streamed(&config, &source).unwrap().expert_scores(&windows).unwrap(),
                    loaded().expert_scores(&windows).unwrap()
                );
            }
            assert!(Decoder::streamed(&config, &source).unwrap().logits(&[1, 2]).is_err(), "no head when streamed");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "scratch files leave nothing behind");
    }
}
