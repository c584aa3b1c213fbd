//! AWQ (Lin et al. 2024) on the runtime's block trace: for each site whose reading layers are
//! all selected and whose input has a producer a scale folds into (the norms in front of
//! attention and MLP; `up_proj`'s rows for `down_proj`), search `s = mean|x|^α` on a grid of α,
//! minimising the group's output error after rounding `W·diag(s)` (α = 0 is plain RTN, so the
//! search never does worse than RTN on its objective), fold `1/s` into the producer, and when the
//! block is done round every selected matrix. The trace continues with the scaled, unrounded
//! block (scaling is exact up to rounding), as the reference implementation does. Which layers
//! share an input and what produces it come from the runtime ([`Site`]), not from here.

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

/// A site's inputs as AWQ reads them: `Σ|x_c|` per channel over every row, and the rows
/// themselves (in memory up to a budget, past it appended to an unlinked scratch file), from
/// which the search draws its stride sample once the row count is known.
struct Acts {
    mean: Vec<f64>,
    rows: usize,
    mem: Vec<f32>,
    /// The scratch file and the rows in it (they follow the rows in memory).
    file: Option<(std::fs::File, usize)>,
    scratch: (std::path::PathBuf, u64),
}

impl Acts {
    fn new(scratch: (std::path::PathBuf, u64)) -> Self {
        Acts { mean: Vec::new(), rows: 0, mem: Vec::new(), file: None, scratch }
    }

    fn add(&mut self, x: &[f32], k: usize) -> Result<()> {
        if self.mean.len() != k {
            self.mean = vec![0f64; k];
        }
        for row in x.chunks(k) {
            for (m, v) in self.mean.iter_mut().zip(row) {
                *m += f64::from(v.abs());
            }
        }
        self.rows += x.len() / k;
        let io = |e: std::io::Error| Error::Model(format!("AWQ activations scratch file: {e}"));
        if self.file.is_none() && ((self.mem.len() + x.len()) * 4) as u64 <= self.scratch.1 {
            self.mem.extend_from_slice(x);
            return Ok(());
        }
        if self.file.is_none() {
            self.file = Some((tempfile::tempfile_in(&self.scratch.0).map_err(io)?, 0));
        }
        let (f, n) = self.file.as_mut().expect("opened");
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::os::unix::fs::FileExt::write_all_at(f, &bytes, (*n * k * 4) as u64).map_err(io)?;
        *n += x.len() / k;
        Ok(())
    }

    /// Every `stride`-th row (from row 0), `[⌈rows / stride⌉, k]`.
    fn sample(&self, k: usize, stride: usize) -> Result<Vec<f32>> {
        let in_mem = self.mem.len() / k.max(1);
        let mut out = Vec::new();
        let mut row = vec![0u8; k * 4];
        for r in (0..self.rows).step_by(stride.max(1)) {
            if r < in_mem {
                out.extend_from_slice(&self.mem[r * k..(r + 1) * k]);
            } else {
                let (f, _) = self.file.as_ref().expect("rows past memory are in the file");
                std::os::unix::fs::FileExt::read_exact_at(f, &mut row, ((r - in_mem) * k * 4) as u64)
                    .map_err(|e| Error::Model(format!("AWQ activations scratch file: {e}")))?;
                out.extend(row.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
        }
        Ok(out)
    }
}

/// The AWQ observer: scales per site, then the rounded matrices per block.
pub struct Awq<'a> {
    scheme: QScheme,
    grid: usize,
    selected: Selected<'a>,
    /// The current site's inputs (only for a site AWQ scales).
    acts: Acts,
    out: crate::Results,
    /// Layers whose site had no row (experts no token reached): rounded unscaled.
    unseen: Vec<String>,
}

impl<'a> Awq<'a> {
    /// AWQ to `scheme` with `grid` exponents, on the tensors `selected` names.
    /// Inputs past `scratch.1` bytes wait in a scratch file in `scratch.0`.
    pub fn new(
        scheme: QScheme,
        grid: usize,
        selected: Selected<'a>,
        out: crate::Results,
        scratch: (std::path::PathBuf, u64),
    ) -> Self {
        Awq { scheme, grid, selected, acts: Acts::new(scratch), out, unseen: Vec::new() }
    }

    /// The quantized matrices and the rewritten dense tensors (norms, `up_proj`), by name; and
    /// the layers that were rounded without scales because their input had no row.
    pub fn into_results(self) -> (crate::Results, Vec<String>) {
        (self.out, self.unseen)
    }

    /// The results so far and the layers rounded without scales (a checkpoint's view).
    pub(crate) fn outputs_mut(&mut self) -> (&crate::Results, &mut Vec<String>) {
        (&self.out, &mut self.unseen)
    }

    /// Rounds a layer of the block, if selected, into the results.
    fn round(&mut self, block: &Block<'_>, role: mcompress_core::arch::Role) -> Result<()> {
        let full = block.name(role);
        let Some((dtype, shape)) = (self.selected)(&full) else { return Ok(()) };
        let bytes = dtype
            .encode_f32(block.weights(role)?)
            .ok_or_else(|| Error::Model(format!("{full}: cannot encode as {dtype}")))?;
        let q = quantize(&self.scheme, dtype, &shape, &bytes).map_err(|e| Error::Model(format!("{full}: {e:?}")))?;
        self.out.insert(full, Calibrated::Quantized(q)).map_err(|e| Error::Model(e.to_string()))
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
            self.acts.add(x, site.width)?;
        }
        Ok(())
    }

    fn rewrite(&mut self, site: &Site, block: &mut Block<'_>) -> Result<()> {
        let fresh = Acts::new(self.acts.scratch.clone());
        let acts = std::mem::replace(&mut self.acts, fresh);
        if !self.scales(site) {
            return Ok(());
        }
        if acts.rows == 0 {
            self.unseen.extend(site.readers.iter().map(|r| site.name(*r)));
            return Ok(());
        }
        let ws = site.readers.iter().map(|r| block.weights(*r)).collect::<Result<Vec<_>>>()?;
        let k = site.width;
        let xs = acts.sample(k, acts.rows.div_ceil(AWQ_ROWS).max(1))?;
        let s = awq_search(&acts.mean, acts.rows, &xs, k, &ws, &self.scheme, self.grid);
        match site.producer {
            Producer::Norm(norm) => {
                let stored = block.divide_norm(norm, &s)?;
                for &r in site.readers {
                    block.scale_columns(r, &s)?;
                }
                self.out
                    .insert(block.name(norm), Calibrated::Dense(stored))
                    .map_err(|e| Error::Model(e.to_string()))?;
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
                    let w = block.weights(producer)?.to_vec();
                    self.out.insert(name, Calibrated::Dense(w)).map_err(|e| Error::Model(e.to_string()))?;
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

/// AWQ's scale search for layers `ws` (each `[m_i, k]`) sharing an input of `rows` rows whose
/// channels sum to `abs_sum` in absolute value: per-channel `s = mean|x|^α`, normalised by
/// `sqrt(max·min)`, for α on the grid; the α whose rounded `Q(W·diag(s))·diag(1/s)` gives the
/// smallest summed squared output error on `xs` (a stride sample of the input's rows) wins.
pub fn awq_search(
    abs_sum: &[f64],
    rows: usize,
    xs: &[f32],
    k: usize,
    ws: &[&[f32]],
    scheme: &QScheme,
    grid: usize,
) -> Vec<f32> {
    let mean = abs_sum;
    let base: Vec<Vec<f32>> = ws.iter().map(|w| linear(xs, w, None, k, w.len() / k)).collect();
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
