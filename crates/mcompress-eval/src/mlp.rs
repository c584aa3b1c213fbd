//! A multi-layer perceptron: `x · input_scale → Linear → ReLU → … → Linear`, PyTorch layout
//! (`weight [out, in]`), as described by config.json (`model_type = "mlp"`, `layer_names`,
//! `input_size`, `num_labels`, `input_scale`, `hidden_act = "relu"`).

use rayon::prelude::*;

use crate::weights::Weights;
use crate::{Error, Result};

/// One dense layer.
#[derive(Clone, Debug)]
struct Layer {
    w: Vec<f32>,
    b: Vec<f32>,
    out: usize,
    inp: usize,
}

/// A loaded MLP.
#[derive(Clone, Debug)]
pub struct Mlp {
    layers: Vec<Layer>,
    input_scale: f32,
}

impl Mlp {
    /// Builds the MLP from config.json and weights, checking every shape.
    pub fn load(config: &serde_json::Value, weights: &Weights) -> Result<Self> {
        let bad = |m: String| Error::Model(format!("config.json / weights: {m}"));
        if config["hidden_act"].as_str().is_some_and(|a| a != "relu") {
            return Err(bad(format!("hidden_act {} is not supported (relu is)", config["hidden_act"])));
        }
        let names: Vec<&str> = config["layer_names"]
            .as_array()
            .ok_or_else(|| bad("layer_names missing".into()))?
            .iter()
            .map(|v| v.as_str().ok_or_else(|| bad("layer_names must be strings".into())))
            .collect::<Result<_>>()?;
        let mut layers = Vec::new();
        for n in names {
            let (ws, w) = weights.get(&format!("{n}.weight")).ok_or_else(|| bad(format!("{n}.weight missing")))?;
            let (bs, b) = weights.get(&format!("{n}.bias")).ok_or_else(|| bad(format!("{n}.bias missing")))?;
            if ws.len() != 2 || bs.as_slice() != [ws[0]] {
                return Err(bad(format!("{n}: weight {ws:?} and bias {bs:?} do not form a linear layer")));
            }
            if let Some(prev) = layers.last().map(|l: &Layer| l.out)
                && prev != ws[1]
            {
                return Err(bad(format!("{n}: input {} does not match the previous layer's output {prev}", ws[1])));
            }
            layers.push(Layer { w: w.clone(), b: b.clone(), out: ws[0], inp: ws[1] });
        }
        if layers.is_empty() {
            return Err(bad("no layers".into()));
        }
        let input_scale = config["input_scale"].as_f64().unwrap_or(1.0) as f32;
        Ok(Mlp { layers, input_scale })
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
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let n = x.len() / self.input_size();
        let mut h: Vec<f32> = x.iter().map(|v| v * self.input_scale).collect();
        for (li, l) in self.layers.iter().enumerate() {
            let last = li + 1 == self.layers.len();
            let mut next = vec![0f32; n * l.out];
            next.par_chunks_mut(l.out).zip(h.par_chunks(l.inp)).for_each(|(o, xi)| {
                for (j, oj) in o.iter_mut().enumerate() {
                    let row = &l.w[j * l.inp..(j + 1) * l.inp];
                    let s: f32 = row.iter().zip(xi).map(|(a, b)| a * b).sum::<f32>() + l.b[j];
                    *oj = if last { s } else { s.max(0.0) };
                }
            });
            h = next;
        }
        h
    }

    /// Predicted class per sample.
    pub fn predict(&self, x: &[f32]) -> Vec<usize> {
        let k = self.num_labels();
        self.forward(x)
            .chunks(k)
            .map(|r| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i))
            .collect()
    }
}
