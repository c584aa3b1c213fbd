//! Calibrated passes on the eval runtime: GPTQ, AWQ, Wanda and SparseGPT observe the
//! runtime's block-by-block trace ([`Decoder::trace`]: every site's input, then a rewrite of the
//! block in place, the rewritten block feeding the next) as [`Observer`]s and return what they
//! computed, by tensor name, for [`Pass::provide`]. The algorithms know no architecture; the
//! runtime does.

use std::collections::BTreeMap;

use indicatif::{ProgressBar, ProgressStyle};
use mcompress_core::ModelSource;
use mcompress_core::arch::{DECODERS, Family};
use mcompress_eval::calibrate::{Prior, WindowSpec, windows};
use mcompress_eval::decoder::{Block, Decoder, Observer, Site};
use mcompress_eval::linalg::{Strides, sgemm};
use mcompress_eval::{Error, Result, weights};

use crate::quant::gptq;
use crate::quant::scheme::scale_dtype;
use crate::{Calibrated, Calibration, CalibrationMethod, ParamMeta, Pass, Plan, prune};

/// The windows a [`Calibration`] asks for.
pub fn window_spec(c: &Calibration) -> WindowSpec<'_> {
    WindowSpec { set: &c.set, samples: c.samples, seq_len: c.seq_len, seed: c.seed }
}

/// The windows a `[calibration]` table of a pass's settings asks for.
pub fn config_window_spec(c: &crate::quant::CalibrationConfig) -> WindowSpec<'_> {
    WindowSpec { set: &c.set, samples: c.samples, seq_len: c.seq_len, seed: c.seed }
}

/// Runs `pass`'s calibration on `model` (or on `prior`, the model after the recipe's earlier
/// passes): the tensors it produced, by name, for [`Pass::provide`], and the layers whose input
/// had no calibration row (experts no token was routed to), which GPTQ, Wanda and SparseGPT
/// rewrote without data (an identity Hessian: round-to-nearest, magnitude pruning). Decoder
/// families of [`Family`] only. The model streams block by block ([`Decoder::streamed`]): one
/// block's weights in f32 at a time, earlier passes applied per tensor as it is read, and the
/// windows' activations within `scratch`'s budget (the rest in its scratch file).
pub fn run(
    model: &ModelSource,
    pass: &dyn Pass,
    cal: &Calibration,
    prior: Option<&Prior<'_>>,
    scratch: &mcompress_eval::spill::Scratch,
    progress: bool,
) -> Result<(crate::Results, Vec<String>)> {
    let config = prior.map_or_else(|| model.config().cloned().unwrap_or_default(), |p| p.config.clone());
    if Family::of_config(&config).is_none() {
        return Err(Error::Model(format!(
            "{}: calibration runs decoder models ({DECODERS}); this model_type is {:?}",
            model.path().display(),
            mcompress_core::arch::model_type(&config)
        )));
    }
    let windows = windows(model, window_spec(cal))?;
    let as_given = weights::ModelTensors::new(model);
    let source: &dyn weights::TensorSource = prior.map_or(&as_given, |p| p.tensors);
    // Each tensor's dtype in the input and its shape as the calibration sees it (after the
    // earlier passes).
    let shapes: BTreeMap<String, Vec<usize>> = source.shapes().into_iter().collect();
    let dtypes: BTreeMap<String, (mcompress_core::DType, Vec<usize>)> = model
        .tensors()
        .iter()
        .filter_map(|r| {
            let i = model.info(r);
            Some((i.name.clone(), (i.dtype, shapes.get(&i.name)?.clone())))
        })
        .collect();
    let keep_zeros = prior.is_some_and(|p| p.keep_zeros);
    let mut llama = Decoder::streamed(&config, source)?.with_scratch(scratch.clone());
    // Selected for quantization: the scale dtype its pass would give it.
    let selected = |name: &str| -> Option<(mcompress_core::DType, Vec<usize>)> {
        let (dtype, shape) = dtypes.get(name)?;
        let meta = ParamMeta::Dense { dtype: *dtype, shape: shape.clone() };
        matches!(pass.plan(name, &meta), Plan::Change(_)).then(|| (*dtype, shape.clone()))
    };
    let bar = if progress { ProgressBar::new(llama.layers() as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("  calibrate {msg} [{bar:30}] {pos}/{len} blocks eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let tick = || bar.inc(1);
    // Results past the memory budget wait for the weights to stream in the scratch file.
    let results = || crate::Results::spilling(scratch.dir.clone(), scratch.budget);
    let out = match cal.method {
        CalibrationMethod::Gptq(opts, scheme) => {
            bar.set_message(format!("gptq, {} x {} tokens", cal.samples, cal.seq_len));
            let mut obs = Rewrite::new(results(), |name: &str, w: &[f32], _: (usize, usize), h: Vec<f64>| {
                let Some((dtype, shape)) = selected(name) else { return Ok(None) };
                // After pruning: the zeros stay zeros (their codes are the zero point).
                let keep: Option<Vec<bool>> =
                    (keep_zeros && w.contains(&0.0)).then(|| w.iter().map(|v| *v != 0.0).collect());
                let q = gptq::gptq_masked(&scheme, scale_dtype(dtype), &shape, w, h, &opts, keep.as_deref())
                    .map_err(|e| format!("{name}: {e}"))?;
                let deq = q.dequantize();
                Ok(Some((Calibrated::Quantized(q), deq)))
            });
            llama.trace(&windows, &mut obs, &tick)?;
            (obs.out, obs.unseen)
        }
        CalibrationMethod::Awq { grid, scheme } => {
            bar.set_message(format!("awq, {} x {} tokens", cal.samples, cal.seq_len));
            let mut obs = crate::quant::awq::Awq::new(
                scheme,
                grid,
                &selected,
                results(),
                (scratch.dir.clone(), scratch.budget / 3),
            );
            llama.trace(&windows, &mut obs, &tick)?;
            obs.into_results()
        }
        CalibrationMethod::Wanda(pattern) | CalibrationMethod::SparseGpt { pattern, .. } => {
            let sparsegpt = match cal.method {
                CalibrationMethod::SparseGpt { opts, .. } => Some(opts),
                _ => None,
            };
            bar.set_message(format!(
                "{}, {} x {} tokens",
                if sparsegpt.is_some() { "sparsegpt" } else { "wanda" },
                cal.samples,
                cal.seq_len
            ));
            // Each pruned layer feeds the next one's inputs (block by block, as GPTQ).
            let mut obs = Rewrite::new(results(), |name: &str, w: &[f32], (_, cols): (usize, usize), h: Vec<f64>| {
                if selected(name).is_none() {
                    return Ok(None);
                }
                let fail = |e: String| format!("{name}: {e}");
                let (pruned, keep) = if let Some(opts) = &sparsegpt {
                    prune::sparsegpt(w, cols, h, pattern, opts).map_err(fail)?
                } else {
                    let diag: Vec<f64> = (0..cols).map(|i| h[i * cols + i]).collect();
                    let mut p = w.to_vec();
                    let keep = prune::wanda(&mut p, cols, &diag, pattern).map_err(fail)?;
                    (p, keep)
                };
                Ok(Some((Calibrated::Pruned { values: pruned.clone(), keep }, pruned)))
            });
            llama.trace(&windows, &mut obs, &tick)?;
            (obs.out, obs.unseen)
        }
    };
    bar.finish_and_clear();
    Ok(out)
}

/// `Σ xᵀx` over the rows of every input seen, in f64 (each call's product in f32 by sgemm).
struct Hessian {
    k: usize,
    h: Vec<f64>,
    rows: usize,
}

impl Hessian {
    fn new(k: usize) -> Self {
        Hessian { k, h: vec![0f64; k * k], rows: 0 }
    }

    /// The identity: what a layer whose input had no row is rewritten with (GPTQ becomes
    /// round-to-nearest, Wanda and SparseGPT magnitude pruning).
    fn identity(k: usize) -> Vec<f64> {
        let mut h = vec![0f64; k * k];
        for i in 0..k {
            h[i * k + i] = 1.0;
        }
        h
    }

    fn add(&mut self, x: &[f32]) {
        let k = self.k;
        let n = x.len() / k;
        if n == 0 {
            return;
        }
        self.rows += n;
        let mut g = vec![0f32; k * k];
        sgemm((k, n, k), x, Strides::transposed(k), x, Strides::row_major(k), &mut g, Strides::row_major(k), false);
        for (h, g) in self.h.iter_mut().zip(&g) {
            *h += f64::from(*g);
        }
    }
}

/// What a Hessian-based method does to one layer: `(name, weights, (out, in), Σ xᵀx)` → the
/// result to hand back and the weights the trace continues with, or `None` to leave the layer.
type RewriteFn<'a> = dyn FnMut(&str, &[f32], (usize, usize), Vec<f64>) -> std::result::Result<Option<(Calibrated, Vec<f32>)>, String>
    + 'a;

/// GPTQ, Wanda and SparseGPT on the trace: the Hessian of each site's input, then each reading
/// layer rewritten in turn (the rewritten layer is what later sites and blocks see).
struct Rewrite<'a> {
    hessian: Option<Hessian>,
    f: Box<RewriteFn<'a>>,
    out: crate::Results,
    /// Layers rewritten without data (their input had no row).
    unseen: Vec<String>,
}

impl<'a> Rewrite<'a> {
    fn new(
        out: crate::Results,
        f: impl FnMut(&str, &[f32], (usize, usize), Vec<f64>) -> std::result::Result<Option<(Calibrated, Vec<f32>)>, String>
        + 'a,
    ) -> Self {
        Rewrite { hessian: None, f: Box::new(f), out, unseen: Vec::new() }
    }
}

impl Observer for Rewrite<'_> {
    fn input(&mut self, site: &Site, x: &[f32]) -> Result<()> {
        self.hessian.get_or_insert_with(|| Hessian::new(site.width)).add(x);
        Ok(())
    }

    fn rewrite(&mut self, site: &Site, block: &mut Block<'_>) -> Result<()> {
        let hessian = self.hessian.take().unwrap_or_else(|| Hessian::new(site.width));
        let seen = hessian.rows > 0;
        let h = if seen { hessian.h } else { Hessian::identity(site.width) };
        for &role in site.readers {
            let name = block.name(role);
            let shape = block.shape(role)?;
            let Some(w) = block.dense(role)? else { continue };
            let Some((result, w)) = (self.f)(&name, w, shape, h.clone()).map_err(Error::Model)? else { continue };
            block.set_weights(role, w)?;
            if !seen {
                self.unseen.push(name.clone());
            }
            self.out.insert(name, result).map_err(|e| Error::Model(e.to_string()))?;
        }
        Ok(())
    }
}
