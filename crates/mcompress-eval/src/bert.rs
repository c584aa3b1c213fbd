//! BERT encoder with sentence-transformers mean pooling (`model_type = "bert"`, e.g.
//! all-MiniLM-L6-v2): embeddings → LayerNorm → N × (self-attention, GELU MLP, post-LayerNorms)
//! → mean over tokens (attention mask) → L2 normalisation. Plain f32 Rust, the CPU reference.
#![allow(clippy::many_single_char_names)] // the usual names: q, k, v, h, n, x

use mcompress_core::arch::{BertGeometry, BertRole, bert_pruned_heads};

use crate::linear::{Device, Lin};
use crate::weights::Weights;
use crate::{Error, Result};

#[derive(Clone, Debug)]
struct Norm {
    g: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn apply(&self, x: &mut [f32]) {
        let h = self.g.len();
        for r in x.chunks_mut(h) {
            let mean = r.iter().sum::<f32>() / h as f32;
            let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for (i, v) in r.iter_mut().enumerate() {
                *v = (*v - mean) * inv * self.g[i] + self.b[i];
            }
        }
    }
}

#[derive(Debug)]
struct Layer {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    ln1: Norm,
    up: Lin,
    down: Lin,
    ln2: Norm,
    /// Attention heads left in this layer (config.json's `pruned_heads` removed the others).
    heads: usize,
}

/// What one encoder layer computed for a batch, `[tokens, width]` each.
struct LayerTrace<'a> {
    index: usize,
    /// Hidden states in and out.
    input: &'a [f32],
    output: &'a [f32],
    /// Inputs of the attention output projection (the heads' contexts) and of the FFN output
    /// projection (the GELU activations).
    context: &'a [f32],
    activation: &'a [f32],
}

/// Sees every layer's trace.
type LayerObserver<'a> = dyn FnMut(&LayerTrace<'_>) + 'a;

/// A loaded BERT sentence encoder.
#[derive(Debug)]
pub struct Bert {
    word: Vec<f32>,
    pos: Vec<f32>,
    typ: Vec<f32>,
    ln: Norm,
    layers: Vec<Layer>,
    hidden: usize,
    /// Per-head width, `hidden / num_attention_heads`.
    hd: usize,
    max_pos: usize,
    vocab: usize,
}

impl Bert {
    /// Builds the encoder from config.json and weights (names as in transformers' BertModel), with
    /// its linear layers on `device`.
    pub fn load(config: &serde_json::Value, w: &Weights, device: &Device) -> Result<Self> {
        let bad = |m: String| Error::Model(format!("BERT: {m}"));
        let g = BertGeometry::from_config(config).map_err(bad)?;
        let (hidden, heads, n_layers) = (g.hidden, g.heads, g.layers);
        let eps = g.eps as f32;
        let get = |n: &str, shape: &[usize]| w.get(n, shape).map_err(bad);
        let lin = |r: BertRole, i: usize, out: usize, inp: usize| -> Result<Lin> {
            let m = w.matrix(&r.weight(i), out, inp).map_err(bad)?;
            Lin::new(m, out, inp, Some(get(&r.bias(i), &[out])?), device)
        };
        let norm = |r: BertRole, i: usize| -> Result<Norm> {
            Ok(Norm { g: get(&r.weight(i), &[hidden])?, b: get(&r.bias(i), &[hidden])?, eps })
        };
        let (inter, vocab, max_pos, types) = (g.intermediate, g.vocab, g.max_positions, g.type_vocab);
        let hd = g.head_dim();
        let layers = (0..n_layers)
            .map(|i| {
                let lh = heads - bert_pruned_heads(config, i, heads).map_err(bad)?.len();
                let width = lh * hd;
                Ok(Layer {
                    q: lin(BertRole::Query, i, width, hidden)?,
                    k: lin(BertRole::Key, i, width, hidden)?,
                    v: lin(BertRole::Value, i, width, hidden)?,
                    o: lin(BertRole::AttnOut, i, hidden, width)?,
                    ln1: norm(BertRole::AttnNorm, i)?,
                    up: lin(BertRole::Inter, i, inter, hidden)?,
                    down: lin(BertRole::Out, i, hidden, inter)?,
                    ln2: norm(BertRole::OutNorm, i)?,
                    heads: lh,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert {
            word: get(&BertRole::WordEmbed.weight(0), &[vocab, hidden])?,
            pos: get(&BertRole::PosEmbed.weight(0), &[max_pos, hidden])?,
            typ: get(&BertRole::TypeEmbed.weight(0), &[types, hidden])?,
            ln: norm(BertRole::EmbedNorm, 0)?,
            layers,
            hidden,
            hd,
            max_pos,
            vocab,
        })
    }

    /// The L2-normalised, mask-mean-pooled sentence embedding of one token sequence.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.embed_batch(&[ids])?.pop().expect("one embedding per sequence"))
    }

    /// Per layer, the mean cosine between each token's hidden state before and after the layer
    /// (what block influence is computed from).
    pub fn layer_cosines(&self, seqs: &[Vec<u32>]) -> Result<Vec<f64>> {
        let mut acc = vec![crate::calibrate::CosMean::default(); self.layers.len()];
        let h = self.hidden;
        for s in seqs {
            // One sequence at a time, clipped to the position table.
            let ids = &s[..s.len().min(self.max_pos)];
            self.encode(&[ids], &mut |t| acc[t.index].add(t.input, t.output, h))?;
        }
        Ok(acc.into_iter().map(crate::calibrate::CosMean::mean).collect())
    }

    /// Mean square of every input channel of the attention and FFN output projections over
    /// `seqs` (`E[x_c²]`), by weight name: what structured pruning weighs a head's or a neuron's
    /// output columns by.
    pub fn input_moments(&self, seqs: &[Vec<u32>]) -> Result<std::collections::BTreeMap<String, Vec<f32>>> {
        let mut sums: Vec<(Vec<f64>, Vec<f64>)> =
            self.layers.iter().map(|l| (vec![0f64; l.heads * self.hd], vec![0f64; l.down.inp])).collect();
        let mut tokens = 0usize;
        for s in seqs {
            let ids = &s[..s.len().min(self.max_pos)];
            tokens += ids.len();
            self.encode(&[ids], &mut |t| {
                let (c, a) = &mut sums[t.index];
                for (sum, data) in [(c, t.context), (a, t.activation)] {
                    for row in data.chunks(sum.len()) {
                        for (acc, v) in sum.iter_mut().zip(row) {
                            *acc += f64::from(*v) * f64::from(*v);
                        }
                    }
                }
            })?;
        }
        let n = tokens.max(1) as f64;
        let mean = |v: &[f64]| v.iter().map(|x| (x / n) as f32).collect::<Vec<f32>>();
        let mut out = std::collections::BTreeMap::new();
        for (i, (c, a)) in sums.iter().enumerate() {
            out.insert(format!("encoder.layer.{i}.attention.output.dense.weight"), mean(c));
            out.insert(format!("encoder.layer.{i}.output.dense.weight"), mean(a));
        }
        Ok(out)
    }

    /// The final hidden states `[tokens, hidden]` of a ragged batch and each sequence's first row
    /// (plus the total); `observe` sees what every layer computed.
    fn encode(&self, seqs: &[&[u32]], observe: &mut LayerObserver<'_>) -> Result<(Vec<f32>, Vec<usize>)> {
        let h = self.hidden;
        let mut starts = Vec::with_capacity(seqs.len() + 1);
        let mut x = Vec::new();
        for ids in seqs {
            let n = ids.len();
            if n == 0 || n > self.max_pos {
                return Err(Error::Model(format!("BERT: {n} tokens (1 to {} supported)", self.max_pos)));
            }
            starts.push(x.len() / h);
            for (t, &id) in ids.iter().enumerate() {
                let id = id as usize;
                if id >= self.vocab {
                    return Err(Error::Model(format!("BERT: token id {id} outside the vocabulary of {}", self.vocab)));
                }
                x.extend((0..h).map(|d| self.word[id * h + d] + self.pos[t * h + d] + self.typ[d]));
            }
        }
        starts.push(x.len() / h);
        self.ln.apply(&mut x);
        for (li, l) in self.layers.iter().enumerate() {
            let (q, k, v) = (l.q.apply(&x)?, l.k.apply(&x)?, l.v.apply(&x)?);
            let width = l.heads * self.hd;
            let mut ctx = vec![0f32; x.len() / h * width];
            for w in starts.windows(2) {
                let r = w[0] * width..w[1] * width;
                self.attention(l.heads, &q[r.clone()], &k[r.clone()], &v[r.clone()], &mut ctx[r]);
            }
            let mut a = l.o.apply(&ctx)?;
            a.iter_mut().zip(&x).for_each(|(a, r)| *a += r);
            l.ln1.apply(&mut a);
            let mut f = l.up.apply(&a)?;
            for v in &mut f {
                // Exact GELU, as BERT's "gelu".
                *v = 0.5 * *v * (1.0 + libm::erff(*v / std::f32::consts::SQRT_2));
            }
            let mut y = l.down.apply(&f)?;
            y.iter_mut().zip(&a).for_each(|(y, r)| *y += r);
            l.ln2.apply(&mut y);
            observe(&LayerTrace { index: li, input: &x, output: &y, context: &ctx, activation: &f });
            x = y;
        }
        Ok((x, starts))
    }

    /// Embeddings of a batch of sequences of any lengths. The batch is ragged, not padded: every
    /// token of every sequence is one row of each linear layer's input (one matmul per layer for
    /// the whole batch), attention stays within its own sequence, and mean pooling covers exactly
    /// the sequence's tokens — what mean pooling with the attention mask computes on a padded
    /// batch.
    pub fn embed_batch(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let h = self.hidden;
        let (x, starts) = self.encode(seqs, &mut |_| {})?;
        Ok(starts
            .windows(2)
            .map(|w| {
                let mut e = vec![0f32; h];
                for t in w[0]..w[1] {
                    for d in 0..h {
                        e[d] += x[t * h + d];
                    }
                }
                // Mean over the sequence's tokens, then L2 normalisation; the 1/n of the mean
                // cancels in the normalisation.
                let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                e.iter().map(|v| v / norm).collect()
            })
            .collect())
    }

    /// Bidirectional multi-head attention of one sequence over `heads` heads (`q`, `k`, `v`,
    /// `ctx`: `[n, heads · head width]`).
    fn attention(&self, heads: usize, q: &[f32], k: &[f32], v: &[f32], ctx: &mut [f32]) {
        let hd = self.hd;
        let h = heads * hd;
        if h == 0 {
            return;
        }
        let n = q.len() / h;
        let scale = 1.0 / (hd as f32).sqrt();
        for head in 0..heads {
            let off = head * hd;
            for i in 0..n {
                let qi = &q[i * h + off..i * h + off + hd];
                let mut s: Vec<f32> = (0..n)
                    .map(|j| qi.iter().zip(&k[j * h + off..j * h + off + hd]).map(|(a, b)| a * b).sum::<f32>() * scale)
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut z = 0f32;
                for v in &mut s {
                    *v = (*v - m).exp();
                    z += *v;
                }
                for (j, p) in s.iter().enumerate() {
                    let vj = &v[j * h + off..j * h + off + hd];
                    for (c, vv) in ctx[i * h + off..i * h + off + hd].iter_mut().zip(vj) {
                        *c += p / z * vv;
                    }
                }
            }
        }
    }
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
}
