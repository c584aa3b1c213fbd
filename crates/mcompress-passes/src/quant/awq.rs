//! AWQ (Lin et al. 2024) on the runtime's block trace: for each site whose reading layers are
//! all selected and whose input has a producer a scale folds into (the norms in front of
//! attention and MLP; `up_proj`'s rows for `down_proj`), search `s = mean|x|^α` on a grid of α,
//! minimising the group's output error after rounding `W·diag(s)` (α = 0 is plain RTN, so the
//! search never does worse than RTN on its objective), fold `1/s` into the producer, and when the
//! block is done round every selected matrix. The trace continues with the scaled, unrounded
//! block (scaling is exact up to rounding), as the reference implementation does. Which layers
//! share an input and what produces it come from the runtime ([`Site`]), not from here.

use std::collections::BTreeMap;

use mcompress_core::DType;
use mcompress_eval::decoder::{Block, Observer, Producer, Site};
use mcompress_eval::linalg::linear;
use mcompress_eval::{Error, Result};

use crate::Calibrated;
use crate::quant::{QScheme, quantize};

/// Which tensors a calibrated pass changes: dtype and shape of the selected ones.
pub type Selected<'a> = &'a dyn Fn(&str) -> Option<(DType, Vec<usize>)>;

/// Rows of calibration input the scale search scores each candidate on.
const AWQ_ROWS: usize = 2048;

/// The AWQ observer: scales per site, then the rounded matrices per block.
pub struct Awq<'a> {
    scheme: QScheme,
    grid: usize,
    selected: Selected<'a>,
    /// The current site's inputs, every window's rows (only for a site AWQ scales).
    acts: Vec<f32>,
    out: BTreeMap<String, Calibrated>,
    /// Layers whose site had no row (experts no token reached): rounded unscaled.
    unseen: Vec<String>,
}

impl<'a> Awq<'a> {
    /// AWQ to `scheme` with `grid` exponents, on the tensors `selected` names.
    pub fn new(scheme: QScheme, grid: usize, selected: Selected<'a>) -> Self {
        Awq { scheme, grid, selected, acts: Vec::new(), out: BTreeMap::new(), unseen: Vec::new() }
    }

    /// The quantized matrices and the rewritten dense tensors (norms, `up_proj`), by name; and
    /// the layers that were rounded without scales because their input had no row.
    pub fn into_results(self) -> (BTreeMap<String, Calibrated>, Vec<String>) {
        (self.out, self.unseen)
    }

    /// Rounds a layer of the block, if selected, into the results.
    fn round(&mut self, block: &Block<'_>, role: mcompress_core::arch::Role) -> Result<()> {
        let full = block.name(role);
        let Some((dtype, shape)) = (self.selected)(&full) else { return Ok(()) };
        let bytes = dtype
            .encode_f32(block.weights(role)?)
            .ok_or_else(|| Error::Model(format!("{full}: cannot encode as {dtype}")))?;
        let q = quantize(&self.scheme, dtype, &shape, &bytes).map_err(|e| Error::Model(format!("{full}: {e:?}")))?;
        self.out.insert(full, Calibrated::Quantized(q));
        Ok(())
    }

    /// Whether AWQ scales at `site`: every reader selected and a producer to fold into.
    fn scales(&self, site: &Site) -> bool {
        site.producer != Producer::Opaque && site.readers.iter().all(|r| (self.selected)(&site.name(*r)).is_some())
    }
}

impl std::fmt::Debug for Awq<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Awq").field("scheme", &self.scheme).field("grid", &self.grid).finish_non_exhaustive()
    }
}

impl Observer for Awq<'_> {
    fn input(&mut self, site: &Site, x: &[f32]) -> Result<()> {
        if self.scales(site) {
            self.acts.extend_from_slice(x);
        }
        Ok(())
    }

    fn rewrite(&mut self, site: &Site, block: &mut Block<'_>) -> Result<()> {
        let acts = std::mem::take(&mut self.acts);
        if !self.scales(site) {
            return Ok(());
        }
        if acts.is_empty() {
            self.unseen.extend(site.readers.iter().map(|r| site.name(*r)));
            return Ok(());
        }
        let ws = site.readers.iter().map(|r| block.weights(*r)).collect::<Result<Vec<_>>>()?;
        let s = awq_search(&acts, site.width, &ws, &self.scheme, self.grid);
        match site.producer {
            Producer::Norm(norm) => {
                let stored = block.divide_norm(norm, &s)?;
                for &r in site.readers {
                    block.scale_columns(r, &s)?;
                }
                self.out.insert(block.name(norm), Calibrated::Dense(stored));
            }
            Producer::Rows(producer) => {
                for &r in site.readers {
                    block.scale_columns(r, &s)?;
                }
                let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
                block.scale_rows(producer, &inv)?;
                // A producer that is not itself quantized ships with its rows rescaled.
                let name = block.name(producer);
                if (self.selected)(&name).is_none() {
                    self.out.insert(name, Calibrated::Dense(block.weights(producer)?.to_vec()));
                }
            }
            Producer::Opaque => {}
        }
        Ok(())
    }

    fn block_done(&mut self, _layer: usize, block: &mut Block<'_>) -> Result<()> {
        // Round every selected matrix of the block, scaled or not.
        for role in block.family().linear_roles() {
            if role.per_expert() {
                for e in 0..block.experts() {
                    self.round(&block.expert(e), role)?;
                }
            } else {
                self.round(block, role)?;
            }
        }
        Ok(())
    }
}

/// AWQ's scale search for layers `ws` (each `[m_i, k]`) sharing input `x` (`[n, k]`): per-channel
/// `s = mean|x|^α`, normalised by `sqrt(max·min)`, for α on the grid; the α whose rounded
/// `Q(W·diag(s))·diag(1/s)` gives the smallest summed squared output error on (a stride sample
/// of) `x` wins.
pub fn awq_search(x: &[f32], k: usize, ws: &[&[f32]], scheme: &QScheme, grid: usize) -> Vec<f32> {
    let rows = x.len() / k;
    let mut mean = vec![0f64; k];
    for row in x.chunks(k) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += f64::from(v.abs());
        }
    }
    let stride = rows.div_ceil(AWQ_ROWS).max(1);
    let xs: Vec<f32> = x.chunks(k).step_by(stride).flatten().copied().collect();
    let base: Vec<Vec<f32>> = ws.iter().map(|w| linear(&xs, w, None, k, w.len() / k)).collect();
    let (mut best, mut best_err) = (vec![1f32; k], f64::INFINITY);
    for g in 0..grid.max(1) {
        let alpha = g as f64 / grid.max(1) as f64;
        let mut s: Vec<f64> = mean.iter().map(|m| (m / rows.max(1) as f64).max(1e-4).powf(alpha)).collect();
        let (lo, hi) = s.iter().fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let norm = (lo * hi).sqrt();
        for v in &mut s {
            *v /= norm;
        }
        let s: Vec<f32> = s.iter().map(|v| *v as f32).collect();
        let x_div: Vec<f32> = xs.chunks(k).flat_map(|r| r.iter().zip(&s).map(|(v, s)| v / s)).collect();
        let mut err = 0f64;
        for (w, y) in ws.iter().zip(&base) {
            let out = w.len() / k;
            let scaled: Vec<u8> =
                w.chunks(k).flat_map(|r| r.iter().zip(&s).flat_map(|(v, s)| (v * s).to_le_bytes())).collect();
            let Ok(q) = quantize(scheme, DType::F32, &[out, k], &scaled) else { return vec![1f32; k] };
            let yq = linear(&x_div, &q.dequantize(), None, k, out);
            err += y.iter().zip(&yq).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>();
        }
        if err < best_err {
            (best, best_err) = (s, err);
        }
    }
    best
}
