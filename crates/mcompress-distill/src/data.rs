//! Training sets and batches. A batch is a function of `(seed, step)` only: the samples of step
//! `s` are drawn with SplitMix64 from `seed` and `s`, so a resumed run sees exactly the batches
//! the uninterrupted run would have.

use burn::tensor::{Device, Int, Tensor, TensorData};
use mcompress_core::ModelSource;
use mcompress_core::arch::{BertGeometry, MlpGeometry};
use mcompress_eval::calibrate::{WindowSpec, windows};
use mcompress_eval::{model_tokenizer, sets};
use mcompress_passes::distill::DistillConfig;

use crate::nets::{Arch, Batch};
use crate::{Error, Result};

/// A loaded training set.
pub(crate) enum Data {
    /// MLP feature rows.
    Rows { x: Vec<f32>, features: usize, n: usize },
    /// Token sequences: llama windows (all `seq-len` long) or BERT sentences (ragged, padded per
    /// batch).
    Tokens { seqs: Vec<Vec<u32>>, pad: u32 },
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `count` sample indices below `n` for step `step` (with replacement across steps, without
/// repeats inside one batch where `n` allows).
fn draw(seed: u64, step: usize, count: usize, n: usize) -> Vec<usize> {
    let mut state = seed ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let i = (splitmix(&mut state) % n as u64) as usize;
        if n < count || !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

impl Data {
    pub(crate) fn load(
        model: &ModelSource,
        arch: &Arch,
        config: &serde_json::Value,
        c: &DistillConfig,
    ) -> Result<Data> {
        let set = &c.set;
        match arch {
            Arch::Mlp { .. } => {
                let mlp = MlpGeometry::from_config(config).map_err(Error::Model)?;
                let (features, labels) = (mlp.input_size, mlp.num_labels);
                let s = sets::LabelledSet::load(set, features, labels).map_err(|e| Error::Set(format!("set: {e}")))?;
                if s.is_empty() {
                    return Err(Error::Set(format!("set: {}: no rows", set.display())));
                }
                let n = s.len();
                let x: Vec<f32> = s.batches(n).flat_map(|(x, _)| x.to_vec()).collect();
                Ok(Data::Rows { x, features, n })
            }
            Arch::Decoder(_) => {
                // Windows at offsets drawn from the seed, as calibration draws them; enough for
                // every step's batch to be distinct where the text allows.
                let samples = (c.steps * c.batch).clamp(1, 65_536);
                let spec = WindowSpec { set, samples, seq_len: c.seq_len, seed: c.seed };
                let seqs = windows(model, spec).map_err(|e| Error::Set(format!("set: {e}")))?;
                Ok(Data::Tokens { seqs, pad: 0 })
            }
            Arch::Bert { .. } => {
                let lines = sets::load_lines(set).map_err(|e| Error::Set(format!("set: {e}")))?;
                let tok = model_tokenizer(model).map_err(|e| Error::Set(e.to_string()))?;
                let max_pos = BertGeometry::from_config(config).map_err(Error::Model)?.max_positions;
                let limit = c.seq_len.min(max_pos);
                let mut seqs = Vec::with_capacity(lines.len());
                for (i, l) in lines.iter().enumerate() {
                    let e = tok
                        .encode(l.as_str(), true)
                        .map_err(|e| Error::Set(format!("set: {}: line {}: {e}", set.display(), i + 1)))?;
                    let mut ids = e.get_ids().to_vec();
                    if ids.len() > limit {
                        // Keep [CLS] … and the final [SEP].
                        let last = *ids.last().expect("non-empty");
                        ids.truncate(limit - 1);
                        ids.push(last);
                    }
                    if !ids.is_empty() {
                        seqs.push(ids);
                    }
                }
                if seqs.is_empty() {
                    return Err(Error::Set(format!("set: {}: no sentences", set.display())));
                }
                let pad = tok.token_to_id("[PAD]").unwrap_or(0);
                Ok(Data::Tokens { seqs, pad })
            }
        }
    }

    /// Step `step`'s batch on `device`.
    pub(crate) fn batch(&self, step: usize, c: &DistillConfig, device: &Device) -> Batch {
        match self {
            Data::Rows { x, features, n } => {
                let idx = draw(c.seed, step, c.batch, *n);
                let mut rows = Vec::with_capacity(idx.len() * features);
                for i in &idx {
                    rows.extend_from_slice(&x[i * features..(i + 1) * features]);
                }
                Batch::Rows(Tensor::from_data(TensorData::new(rows, [idx.len(), *features]), device))
            }
            Data::Tokens { seqs, pad } => {
                let idx = draw(c.seed, step, c.batch, seqs.len());
                let t = idx.iter().map(|&i| seqs[i].len()).max().unwrap_or(1);
                let b = idx.len();
                let mut ids = Vec::with_capacity(b * t);
                let mut mask = Vec::with_capacity(b * t);
                for &i in &idx {
                    let s = &seqs[i];
                    ids.extend(s.iter().map(|&v| i64::from(v)));
                    ids.extend(std::iter::repeat_n(i64::from(*pad), t - s.len()));
                    mask.extend(std::iter::repeat_n(1f32, s.len()));
                    mask.extend(std::iter::repeat_n(0f32, t - s.len()));
                }
                Batch::Tokens {
                    ids: Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), device),
                    mask: Tensor::from_data(TensorData::new(mask, [b, t]), device),
                    b,
                    t,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_draw_depends_on_seed_and_step_only() {
        assert_eq!(draw(7, 3, 8, 100), draw(7, 3, 8, 100));
        assert_ne!(draw(7, 3, 8, 100), draw(7, 4, 8, 100));
        assert_ne!(draw(7, 3, 8, 100), draw(8, 3, 8, 100));
        let d = draw(1, 0, 10, 10);
        let mut s = d.clone();
        s.sort_unstable();
        assert_eq!(s, (0..10).collect::<Vec<_>>(), "no repeats inside a batch when the set allows");
        assert_eq!(draw(1, 0, 5, 2).len(), 5);
    }
}
