//! A multi-layer perceptron: `x · input_scale → Linear → ReLU → … → Linear`, PyTorch layout
//! (`weight [out, in]`), as described by config.json (`model_type = "mlp"`, `layer_names`,
//! `input_size`, `num_labels`, `input_scale`, `hidden_act = "relu"`).

use crate::linear::{Device, Lin};
use crate::weights::Weights;
use crate::{Error, Result};

/// A loaded MLP.
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<Lin>,
    input_scale: f32,
}

impl Mlp {
    /// Builds the MLP from config.json and weights, checking every shape, on `device`.
    pub fn load(config: &serde_json::Value, weights: &Weights, device: &Device) -> Result<Self> {
        let bad = |m: String| Error::Model(format!("config.json / weights: {m}"));
        let g = mcompress_core::arch::MlpGeometry::from_config(config).map_err(bad)?;
        let mut layers: Vec<Lin> = Vec::new();
        for n in &g.layers {
            let (wn, bn) = (format!("{n}.weight"), format!("{n}.bias"));
            let (out, inp) = weights
                .shape2(&wn)
                .ok_or_else(|| bad(format!("{wn} missing or not a matrix (a linear layer's weight is [out, in])")))?;
            let b =
                weights.get(&bn, &[out]).map_err(|e| bad(format!("{n}: {e} (the bias of a [{out}, {inp}] layer)")))?;
            if let Some(prev) = layers.last().map(|l| l.out)
                && prev != inp
            {
                return Err(bad(format!("{n}: input {inp} does not match the previous layer's output {prev}")));
            }
            let w = weights.matrix(&wn, out, inp).map_err(bad)?;
            layers.push(Lin::new(w, out, inp, Some(b), device)?);
        }
        if layers.is_empty() {
            return Err(bad("no layers".into()));
        }
        Ok(Mlp { layers, input_scale: g.input_scale })
    }

    /// Features per sample.
    pub fn input_size(&self) -> usize {
        self.layers[0].inp
    }

    /// Classes.
    pub fn num_labels(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out)
    }

    /// Logits for a batch of row-major samples.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut h: Vec<f32> = x.iter().map(|v| v * self.input_scale).collect();
        for (li, l) in self.layers.iter().enumerate() {
            h = l.apply(&h)?;
            if li + 1 < self.layers.len() {
                for v in &mut h {
                    *v = v.max(0.0);
                }
            }
        }
        Ok(h)
    }

    /// Predicted class per sample.
    pub fn predict(&self, x: &[f32]) -> Result<Vec<usize>> {
        let k = self.num_labels();
        Ok(self
            .forward(x)?
            .chunks(k)
            .map(|r| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i))
            .collect())
    }
}
