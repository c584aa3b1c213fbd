//! Calibrated passes on the eval runtime: GPTQ, AWQ, Wanda and SparseGPT observe the
//! runtime's block-by-block trace ([`Decoder::calibrate`]: each selected linear layer's weights
//! and input Hessian, the rewritten block feeding the next) and return what they computed, by
//! tensor name, for [`Pass::provide`]. The algorithms know no architecture; the runtime does.

use std::collections::BTreeMap;

use indicatif::{ProgressBar, ProgressStyle};
use mcompress_core::ModelSource;
use mcompress_core::arch::Family;
use mcompress_eval::calibrate::{Prior, WindowSpec, windows};
use mcompress_eval::decoder::Decoder;
use mcompress_eval::linear::Device;
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
/// passes): the tensors it produced, by name, for [`Pass::provide`]. Decoder families of
/// [`Family`] only.
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
            mcompress_core::arch::model_type(&config)
        )));
    }
    let windows = windows(model, window_spec(cal))?;
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
    let mut llama = Decoder::load(&config, &weights, &Device::Cpu)?;
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
