//! What calibrated passes read from a model: token windows drawn from a text, the model as the
//! recipe's earlier passes leave it ([`Prior`]), activation statistics ([`input_moments`]) and
//! block influence ([`layer_scores`]). The block-by-block trace that may rewrite each block in
//! place is [`crate::decoder::Decoder::trace`]; the algorithms that observe it (GPTQ, AWQ, Wanda,
//! SparseGPT) live with the passes (`mcompress_passes::calibrate`).

use std::collections::BTreeMap;

use mcompress_core::ModelSource;

use crate::linear::Device;
use mcompress_core::arch::{DECODERS, ModelKind, model_type};

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
pub struct Prior<'a> {
    /// config.json after the earlier passes.
    pub config: serde_json::Value,
    /// Every float tensor after the earlier passes, as f32, with its shape, produced on demand
    /// (a block at a time for calibration).
    pub tensors: &'a dyn weights::TensorSource,
    /// An earlier pass pruned: exact zeros are pruned weights that quantization must keep zero.
    pub keep_zeros: bool,
}

/// Mean square of every input channel of every linear layer of a llama model over calibration
/// windows (`E[x_c²]`, the diagonal of the layer's input Hessian over the token count), by
/// weight name, from one dense forward pass: what the `fit` policy weighs quantization error by.
/// BERT models: the inputs of the attention and FFN output projections only.
pub fn input_moments(model: &ModelSource, spec: WindowSpec<'_>) -> Result<BTreeMap<String, Vec<f32>>> {
    let config = model.config().cloned().unwrap_or_default();
    match ModelKind::of_config(&config) {
        Some(ModelKind::Decoder(_)) => {
            let windows = windows(model, spec)?;
            let source = weights::ModelTensors::new(model);
            decoder::Decoder::streamed(&config, &source)?.input_moments(&windows)
        }
        Some(ModelKind::Bert) => {
            let windows = windows(model, spec)?;
            crate::bert::Bert::load(&config, &weights::from_model(model), &Device::Cpu)?.input_moments(&windows)
        }
        _ => Err(Error::Model(format!(
            "{}: activation statistics are computed for decoder ({DECODERS}) and bert models (this model_type is {:?}); \
             use no calibration for others",
            model.path().display(),
            model_type(&config)
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
    let cosines = match ModelKind::of_config(&config) {
        Some(ModelKind::Decoder(_)) => {
            let source = weights::ModelTensors::new(model);
            decoder::Decoder::streamed(&config, &source)?.layer_cosines(&windows)?
        }
        Some(ModelKind::Bert) => {
            crate::bert::Bert::load(&config, &weights::from_model(model), &Device::Cpu)?.layer_cosines(&windows)?
        }
        _ => {
            return Err(Error::Model(format!(
                "{}: layer scores are computed for decoder ({DECODERS}) and bert models; this model_type is {:?}",
                model.path().display(),
                model_type(&config)
            )));
        }
    };
    Ok(cosines.into_iter().map(|c| 1.0 - c).collect())
}

/// Per block of a mixture of experts, per expert: its router-weighted output norm summed over
/// the calibration tokens routed to it, divided by all tokens, and how many tokens reached it
/// ([`decoder::Decoder::expert_scores`]).
///
/// # Errors
/// A model that is not a mixture of experts, or what loading and running it report.
pub fn expert_scores(model: &ModelSource, spec: WindowSpec<'_>) -> Result<Vec<Vec<(f64, usize)>>> {
    let config = model.config().cloned().unwrap_or_default();
    if !mcompress_core::arch::Family::of_config(&config).is_some_and(mcompress_core::arch::Family::is_moe) {
        return Err(Error::Model(format!(
            "{}: experts are scored in mixtures of experts; this model_type is {:?}",
            model.path().display(),
            model_type(&config)
        )));
    }
    let windows = windows(model, spec)?;
    let tokens = windows.iter().map(Vec::len).sum::<usize>().max(1) as f64;
    let source = weights::ModelTensors::new(model);
    let scores = decoder::Decoder::streamed(&config, &source)?.expert_scores(&windows)?;
    Ok(scores.into_iter().map(|b| b.into_iter().map(|(s, n)| (s / tokens, n)).collect()).collect())
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
