//! Calibration for calibrated passes (GPTQ): draw token windows from a text, run the model
//! block by block, and hand each selected linear layer's weights and input Hessian to the pass's
//! quantizer; the quantized block feeds the next one.

use std::collections::BTreeMap;

use indicatif::{ProgressBar, ProgressStyle};
use mcompress_core::ModelSource;
use mcompress_passes::prune;
use mcompress_passes::quant::gptq;
use mcompress_passes::quant::scheme::scale_dtype;
use mcompress_passes::{Calibrated, Calibration, CalibrationMethod, ParamMeta, Pass, Plan};

use crate::linear::Device;
use mcompress_core::arch::Family;

use crate::{Error, Result, decoder, model_tokenizer, sets, weights};

/// Where calibration windows come from.
#[derive(Clone, Copy, Debug)]
pub struct WindowSpec<'a> {
    /// Plain UTF-8 text.
    pub set: &'a std::path::Path,
    /// Windows.
    pub samples: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Seed of the window offsets.
    pub seed: u64,
}

impl<'a> From<&'a Calibration> for WindowSpec<'a> {
    fn from(c: &'a Calibration) -> Self {
        WindowSpec { set: &c.set, samples: c.samples, seq_len: c.seq_len, seed: c.seed }
    }
}

impl<'a> From<&'a mcompress_passes::quant::CalibrationConfig> for WindowSpec<'a> {
    fn from(c: &'a mcompress_passes::quant::CalibrationConfig) -> Self {
        WindowSpec { set: &c.set, samples: c.samples, seq_len: c.seq_len, seed: c.seed }
    }
}

/// `samples` windows of `seq_len` tokens from the text at `cal.set`, at offsets drawn with
/// SplitMix64 from `cal.seed` (the same seed always gives the same windows).
pub fn windows(model: &ModelSource, cal: WindowSpec<'_>) -> Result<Vec<Vec<u32>>> {
    let text = sets::load_text(cal.set)?;
    let tokenizer = model_tokenizer(model)?;
    let ids: Vec<u32> = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| Error::Set(format!("{}: tokenizing: {e}", cal.set.display())))?
        .get_ids()
        .to_vec();
    if ids.len() < cal.seq_len {
        return Err(Error::Set(format!(
            "{}: {} tokens, fewer than calibration.seq-len = {}",
            cal.set.display(),
            ids.len(),
            cal.seq_len
        )));
    }
    let span = (ids.len() - cal.seq_len + 1) as u64;
    let mut state = cal.seed;
    Ok((0..cal.samples)
        .map(|_| {
            // SplitMix64.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let start = (z % span) as usize;
            ids[start..start + cal.seq_len].to_vec()
        })
        .collect())
}

/// The model as the recipe's earlier passes leave it: what a later calibrated pass calibrates on
/// (a GPTQ after a pruning pass sees the pruned weights and keeps their zeros).
#[derive(Debug)]
pub struct Prior {
    /// config.json after the earlier passes.
    pub config: serde_json::Value,
    /// Every float tensor after the earlier passes, as f32, with its shape.
    pub tensors: mcompress_passes::pipeline::DenseTensors,
    /// An earlier pass pruned: exact zeros are pruned weights that quantization must keep zero.
    pub keep_zeros: bool,
}

/// Runs `pass`'s calibration on `model` (or on `prior`, the model after the recipe's earlier
/// passes): the tensors it produced, by name, for [`Pass::provide`]. Only llama models are
/// supported.
pub fn run(
    model: &ModelSource,
    pass: &dyn Pass,
    cal: &Calibration,
    prior: Option<Prior>,
    progress: bool,
) -> Result<BTreeMap<String, Calibrated>> {
    let config = prior.as_ref().map_or_else(|| model.config().cloned().unwrap_or_default(), |p| p.config.clone());
    if Family::of_config(&config).is_none() {
        return Err(Error::Model(format!(
            "{}: calibration runs decoder models (llama, qwen2, gemma3_text); this model_type is {:?}",
            model.path().display(),
            config["model_type"].as_str().unwrap_or("")
        )));
    }
    let windows = windows(model, cal.into())?;
    let mut dtypes: BTreeMap<String, (mcompress_core::DType, Vec<usize>)> = model
        .tensors()
        .iter()
        .map(|r| {
            let i = model.info(r);
            (i.name.clone(), (i.dtype, i.shape.clone()))
        })
        .collect();
    let keep_zeros = prior.as_ref().is_some_and(|p| p.keep_zeros);
    let weights = match prior {
        Some(p) => {
            for (name, (shape, _)) in &p.tensors {
                if let Some(d) = dtypes.get_mut(name) {
                    d.1.clone_from(shape);
                }
            }
            weights::Weights::from_dense(p.tensors)
        }
        None => weights::from_model(model),
    };
    let mut llama = decoder::Decoder::load(&config, &weights, &Device::Cpu)?;
    drop(weights);
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
    let mut out = BTreeMap::new();
    match cal.method {
        CalibrationMethod::Gptq(opts, scheme) => {
            bar.set_message(format!("gptq, {} x {} tokens", cal.samples, cal.seq_len));
            llama.calibrate(
                &windows,
                |name, w, (rows, cols), h| {
                    let Some((dtype, shape)) = selected(name) else { return Ok(None) };
                    debug_assert_eq!(rows * cols, w.len());
                    // After pruning: the zeros stay zeros (their codes are the zero point).
                    let keep: Option<Vec<bool>> =
                        (keep_zeros && w.contains(&0.0)).then(|| w.iter().map(|v| *v != 0.0).collect());
                    let q = gptq::gptq_masked(&scheme, scale_dtype(dtype), &shape, w, h, &opts, keep.as_deref())
                        .map_err(|e| Error::Model(format!("{name}: {e}")))?;
                    let deq = q.dequantize();
                    out.insert(name.to_string(), Calibrated::Quantized(q));
                    Ok(Some(deq))
                },
                &|| bar.inc(1),
            )?;
        }
        CalibrationMethod::Awq { grid, scheme } => {
            bar.set_message(format!("awq, {} x {} tokens", cal.samples, cal.seq_len));
            out = llama.awq(&windows, &scheme, grid, &selected, &|| bar.inc(1))?;
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
            llama.calibrate(
                &windows,
                |name, w, (_, cols), h| {
                    if selected(name).is_none() {
                        return Ok(None);
                    }
                    let fail = |e: String| Error::Model(format!("{name}: {e}"));
                    let (pruned, keep) = if let Some(opts) = &sparsegpt {
                        prune::sparsegpt(w, cols, h, pattern, opts).map_err(fail)?
                    } else {
                        let diag: Vec<f64> = (0..cols).map(|i| h[i * cols + i]).collect();
                        let mut p = w.to_vec();
                        let keep = prune::wanda(&mut p, cols, &diag, pattern).map_err(fail)?;
                        (p, keep)
                    };
                    out.insert(name.to_string(), Calibrated::Pruned { values: pruned.clone(), keep });
                    Ok(Some(pruned))
                },
                &|| bar.inc(1),
            )?;
        }
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Mean square of every input channel of every linear layer of a llama model over calibration
/// windows (`E[x_c²]`, the diagonal of the layer's input Hessian over the token count), by
/// weight name, from one dense forward pass: what the `fit` policy weighs quantization error by.
/// BERT models: the inputs of the attention and FFN output projections only.
pub fn input_moments(model: &ModelSource, spec: WindowSpec<'_>) -> Result<BTreeMap<String, Vec<f32>>> {
    let config = model.config().cloned().unwrap_or_default();
    match config["model_type"].as_str().unwrap_or("") {
        t if Family::from_model_type(t).is_some() => {
            let windows = windows(model, spec)?;
            decoder::Decoder::load(&config, &weights::from_model(model), &Device::Cpu)?.input_moments(&windows)
        }
        "bert" => {
            let windows = windows(model, spec)?;
            crate::bert::Bert::load(&config, &weights::from_model(model), &Device::Cpu)?.input_moments(&windows)
        }
        other => Err(Error::Model(format!(
            "{}: activation statistics are computed for decoder (llama, qwen2, gemma3_text) and bert models (this model_type is {other:?}); \
             use no calibration for others",
            model.path().display()
        ))),
    }
}

/// Block influence of every layer of a llama or BERT model on calibration windows (ShortGPT,
/// Men et al. 2024): `1 − E[cos(x_in, x_out)]` over every token, where `x_in` and `x_out` are
/// the residual stream before and after the layer. Small: the layer barely changes its input and
/// is the first candidate for removal. What `prune-structured`'s `unit = "layers"` ranks by.
pub fn layer_scores(model: &ModelSource, spec: WindowSpec<'_>) -> Result<Vec<f64>> {
    let config = model.config().cloned().unwrap_or_default();
    let windows = windows(model, spec)?;
    let w = weights::from_model(model);
    let cosines = match config["model_type"].as_str().unwrap_or("") {
        t if Family::from_model_type(t).is_some() => {
            decoder::Decoder::load(&config, &w, &Device::Cpu)?.layer_cosines(&windows)?
        }
        "bert" => crate::bert::Bert::load(&config, &w, &Device::Cpu)?.layer_cosines(&windows)?,
        other => {
            return Err(Error::Model(format!(
                "{}: layer scores are computed for decoder (llama, qwen2, gemma3_text) and bert models; this model_type is {other:?}",
                model.path().display()
            )));
        }
    };
    Ok(cosines.into_iter().map(|c| 1.0 - c).collect())
}

/// Accumulates the mean cosine between matching rows of two `[n, width]` streams.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CosMean {
    sum: f64,
    n: usize,
}

impl CosMean {
    pub(crate) fn add(&mut self, before: &[f32], after: &[f32], width: usize) {
        for (a, b) in before.chunks(width).zip(after.chunks(width)) {
            self.sum += crate::bert::cosine(a, b);
            self.n += 1;
        }
    }

    pub(crate) fn mean(self) -> f64 {
        if self.n == 0 { 1.0 } else { self.sum / self.n as f64 }
    }
}
