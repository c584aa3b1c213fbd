//! Linear layers on an eval [`Device`]: dense f32 or quantized in the bundle's packed layout,
//! on the CPU or on the wgpu device.
//!
//! The CPU path for packed weights is fused the same way as the WGSL kernel: it decodes a block
//! of 16 weight rows at a time ([`Quantized::dequantize_row`]) and multiplies it at once, so a
//! quantized matrix is never expanded to f32 in full.

use std::sync::Arc;

use mcompress_passes::quant::Quantized;
use rayon::prelude::*;

use crate::Result;
use crate::linalg;

/// Where the models run.
#[derive(Clone, Debug, Default)]
pub enum Device {
    /// Plain f32 Rust on the CPU, row-parallel with rayon.
    #[default]
    Cpu,
    /// The wgpu device (hardware GPU or Mesa llvmpipe).
    #[cfg(feature = "wgpu")]
    Wgpu(Arc<crate::gpu::Gpu>),
}

impl Device {
    /// Backend name for the report: `cpu` or `wgpu`.
    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            #[cfg(feature = "wgpu")]
            Device::Wgpu(_) => "wgpu",
        }
    }

    /// The adapter, for the report.
    pub fn adapter(&self) -> String {
        match self {
            Device::Cpu => format!("CPU, {} rayon threads, f32", rayon::current_num_threads()),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(g) => g.describe(),
        }
    }
}

/// A weight matrix `[out, inp]`.
#[derive(Clone, Debug)]
pub enum Matrix {
    /// Row-major f32.
    Dense(Vec<f32>),
    /// Quantized codes, scales and zero points as stored in the bundle.
    Packed(Arc<Quantized>),
}

#[derive(Debug)]
enum Exec {
    Cpu(Matrix),
    #[cfg(feature = "wgpu")]
    Gpu(crate::gpu::GpuLinear),
}

/// A linear layer `y = x · Wᵀ (+ b)`, PyTorch layout, placed on a device.
#[derive(Debug)]
pub struct Lin {
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    bias: Option<Vec<f32>>,
    exec: Exec,
}

impl Lin {
    /// Places `matrix` (and `bias`) on `device`; on wgpu this uploads the weights once.
    pub fn new(matrix: Matrix, out: usize, inp: usize, bias: Option<Vec<f32>>, device: &Device) -> Result<Self> {
        let exec = match device {
            Device::Cpu => Exec::Cpu(matrix),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(g) => Exec::Gpu(match &matrix {
                Matrix::Dense(w) => crate::gpu::GpuLinear::dense(g, w, out, inp, bias.as_deref())?,
                Matrix::Packed(q) => crate::gpu::GpuLinear::packed(g, q, bias.as_deref())?,
            }),
        };
        Ok(Lin { out, inp, bias, exec })
    }

    /// `x [n, inp]` → `[n, out]`.
    pub fn apply(&self, x: &[f32]) -> Result<Vec<f32>> {
        match &self.exec {
            Exec::Cpu(Matrix::Dense(w)) => Ok(linalg::linear(x, w, self.bias.as_deref(), self.inp, self.out)),
            Exec::Cpu(Matrix::Packed(q)) => Ok(linear_packed(x, q, self.bias.as_deref())),
            #[cfg(feature = "wgpu")]
            Exec::Gpu(g) => g.apply(x),
        }
    }
}

/// Weight rows decoded per block by the fused CPU kernel.
const BLOCK_ROWS: usize = 16;

/// `x [n, cols] · dequant(q)ᵀ (+ b)` → `[n, rows]`, decoding [`BLOCK_ROWS`] weight rows at a time.
pub fn linear_packed(x: &[f32], q: &Quantized, bias: Option<&[f32]>) -> Vec<f32> {
    let (k, m) = (q.cols, q.rows);
    let n = x.len() / k;
    let blocks: Vec<Vec<f32>> = (0..m.div_ceil(BLOCK_ROWS))
        .into_par_iter()
        .map(|b| {
            let (j0, j1) = (b * BLOCK_ROWS, ((b + 1) * BLOCK_ROWS).min(m));
            let mut w = vec![0f32; (j1 - j0) * k];
            for (j, row) in (j0..j1).zip(w.chunks_mut(k)) {
                q.dequantize_row(j, row);
            }
            linalg::linear_serial(x, &w, bias.map(|b| &b[j0..j1]), k, j1 - j0)
        })
        .collect();
    let mut y = vec![0f32; n * m];
    for (b, block) in blocks.iter().enumerate() {
        let (j0, w) = (b * BLOCK_ROWS, block.len() / n.max(1));
        for (r, vals) in block.chunks(w.max(1)).enumerate() {
            y[r * m + j0..r * m + j0 + w].copy_from_slice(vals);
        }
    }
    y
}
