//! AWQ (Lin et al. 2024) on the runtime's block trace: for each site whose reading layers are
//! all selected and whose input has a producer a scale folds into (the norms in front of
//! attention and MLP; `up_proj`'s rows for `down_proj`), search `s = mean|x|^α` on a grid of α,
//! minimising the group's output error after rounding `W·diag(s)` (α = 0 is plain RTN, so the
//! search never does worse than RTN on its objective), fold `1/s` into the producer, and when the
//! block is done round every selected matrix. The trace continues with the scaled, unrounded
//! block (scaling is exact up to rounding), as the reference implementation does. Which layers
//! share an input and what produces it come from the runtime ([`Site`]), not from here.
//!
//! A mixture's norm in front of the MLP feeds the router and every expert's gate and up: one
//! scale for all of them ([`Observer::mixture`]), searched on the summed error of every expert
//! on the rows routed to it (each row weighted by its routing weight squared, what the expert's
//! error adds to the block's output), folded into the norm, the router's columns and every
//! expert's gate and up columns, as AutoAWQ scales Mixtral's `w1`/`w3` through the MoE block.

use mcompress_core::DType;
use mcompress_core::arch::Role;
use mcompress_eval::decoder::{Block, MixtureInput, Observer, Producer, Site};
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
    fn rewrites(&self, name: &str) -> bool {
        (self.selected)(name).is_some()
    }

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
        let group = Readers { xs: &xs, weights: None, ws };
        let s = awq_search(&acts.mean, acts.rows, k, &[group], &self.scheme, self.grid);
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

    fn mixture(&mut self, input: &MixtureInput<'_>, block: &mut Block<'_>) -> Result<()> {
        let (family, k, n) = (block.family(), input.width, block.experts());
        let selected = |role, e| (self.selected)(&family.hf_expert(role, input.layer, e)).is_some();
        if n == 0 || !(0..n).all(|e| selected(Role::ExpertGate, e) && selected(Role::ExpertUp, e)) {
            return Ok(());
        }
        // Σ|x| over every row, the stride sample, and each expert's sampled rows with weights.
        let stride = input.rows.div_ceil(AWQ_ROWS).max(1);
        let (mut abs_sum, mut xs, mut rows) = (vec![0f64; k], Vec::new(), 0usize);
        let mut routed: Vec<(Vec<usize>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n];
        let mut reached = vec![false; n];
        for (i, per_expert) in (0..input.normed.count()).zip(input.routes) {
            let x = input.normed.window(i)?;
            let first = rows;
            let mut at = Vec::new();
            for (t, row) in x.chunks_exact(k).enumerate() {
                for (m, v) in abs_sum.iter_mut().zip(row) {
                    *m += f64::from(v.abs());
                }
                let sampled = (first + t).is_multiple_of(stride);
                at.push(sampled.then(|| xs.len() / k));
                if sampled {
                    xs.extend_from_slice(row);
                }
            }
            rows += at.len();
            for (e, picks) in per_expert.iter().enumerate() {
                reached[e] |= !picks.is_empty();
                for (t, w) in picks {
                    if let Some(Some(r)) = at.get(*t) {
                        routed[e].0.push(*r);
                        routed[e].1.push(*w * *w);
                    }
                }
            }
        }
        if rows == 0 {
            return Ok(());
        }
        let router_selected = (self.selected)(&block.name(Role::Router)).is_some();
        let inputs: Vec<Vec<f32>> =
            routed.iter().map(|(r, _)| r.iter().flat_map(|r| &xs[r * k..(r + 1) * k]).copied().collect()).collect();
        let s = {
            let mut groups = Vec::new();
            if router_selected {
                groups.push(Readers { xs: &xs, weights: None, ws: vec![block.weights(Role::Router)?] });
            }
            for (e, (x, (_, w))) in inputs.iter().zip(&routed).enumerate() {
                if !w.is_empty() {
                    let ws = vec![block.expert_weights(e, Role::ExpertGate)?, block.expert_weights(e, Role::ExpertUp)?];
                    groups.push(Readers { xs: x, weights: Some(w), ws });
                }
            }
            awq_search(&abs_sum, rows, k, &groups, &self.scheme, self.grid)
        };
        let stored = block.divide_norm(Role::FfnNorm, &s)?;
        self.out
            .insert(block.name(Role::FfnNorm), Calibrated::Dense(stored))
            .map_err(|e| Error::Model(e.to_string()))?;
        block.scale_columns(Role::Router, &s)?;
        if !router_selected {
            // The router ships with its columns rescaled (it is rounded in block_done otherwise).
            let w = block.weights(Role::Router)?.to_vec();
            self.out.insert(block.name(Role::Router), Calibrated::Dense(w)).map_err(|e| Error::Model(e.to_string()))?;
        }
        for (e, reached) in reached.into_iter().enumerate() {
            let mut ex = block.expert(e);
            ex.scale_columns(Role::ExpertGate, &s)?;
            ex.scale_columns(Role::ExpertUp, &s)?;
            if !reached {
                // Scaled with the rest, but no row of its own was in the search.
                self.unseen.extend([Role::ExpertGate, Role::ExpertUp].map(|r| ex.name(r)));
            }
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

/// Layers that read one sample of a site's input, for [`awq_search`].
pub struct Readers<'a> {
    /// The sampled input rows, `[n, k]`.
    pub xs: &'a [f32],
    /// Each row's weight in the squared error (`None`: every row 1).
    pub weights: Option<&'a [f32]>,
    /// The layers' weights, each `[m_i, k]`.
    pub ws: Vec<&'a [f32]>,
}

/// AWQ's scale search for layers sharing an input of `rows` rows whose channels sum to
/// `abs_sum` in absolute value: per-channel `s = mean|x|^α`, normalised by `sqrt(max·min)`, for
/// α on the grid; the α whose rounded `Q(W·diag(s))·diag(1/s)` gives the smallest summed
/// (row-weighted) squared output error over `groups` (each a sample of the input's rows and
/// the layers scored on it) wins.
pub fn awq_search(
    abs_sum: &[f64],
    rows: usize,
    k: usize,
    groups: &[Readers<'_>],
    scheme: &QScheme,
    grid: usize,
) -> Vec<f32> {
    let mean = abs_sum;
    let base: Vec<Vec<Vec<f32>>> =
        groups.iter().map(|g| g.ws.iter().map(|w| linear(g.xs, w, None, k, w.len() / k)).collect()).collect();
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
        let mut err = 0f64;
        for (group, base) in groups.iter().zip(&base) {
            let x_div: Vec<f32> = group.xs.chunks(k).flat_map(|r| r.iter().zip(&s).map(|(v, s)| v / s)).collect();
            for (w, y) in group.ws.iter().zip(base) {
                let out = w.len() / k;
                let scaled: Vec<u8> =
                    w.chunks(k).flat_map(|r| r.iter().zip(&s).flat_map(|(v, s)| (v * s).to_le_bytes())).collect();
                let Ok(q) = quantize(scheme, DType::F32, &[out, k], &scaled) else { return vec![1f32; k] };
                let yq = linear(&x_div, &q.dequantize(), None, k, out);
                err += match group.weights {
                    None => y.iter().zip(&yq).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>(),
                    Some(rw) => y
                        .chunks(out.max(1))
                        .zip(yq.chunks(out.max(1)))
                        .zip(rw)
                        .map(|((a, b), w)| {
                            f64::from(*w) * a.iter().zip(b).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>()
                        })
                        .sum::<f64>(),
                };
            }
        }
        if err < best_err {
            (best, best_err) = (s, err);
        }
    }
    best
}
