//! Linear layers on an eval [`Device`]: dense f32 or quantized in the bundle's packed layout,
//! on the CPU or on the wgpu device.
//!
//! The CPU path for packed weights is fused the same way as the WGSL kernel: it decodes a tile
//! of 64 weight rows at a time ([`Quantized::dequantize_row`]) and multiplies it at once, so a
//! quantized matrix is never expanded to f32 in full.
#![allow(clippy::many_single_char_names)] // BLAS names: x, y, w, k, m, n

use std::sync::Arc;

use crate::Result;
use crate::linalg;
use mcompress_format::quant::Quantized;

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
            Device::Cpu => format!("CPU ({}), f32", std::env::consts::ARCH),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(g) => g.describe(),
        }
    }

    /// `xᵀx` of `x [n, k]`, `[k, k]` in f32: on the CPU one sgemm (the same sums at any thread
    /// count); on wgpu the matmul kernel with `xᵀ` as both operands.
    ///
    /// # Errors
    /// The GPU failed.
    pub fn gram(&self, x: &[f32], k: usize) -> Result<Vec<f32>> {
        let n = x.len() / k.max(1);
        match self {
            Device::Cpu => {
                let mut g = vec![0f32; k * k];
                linalg::sgemm(
                    (k, n, k),
                    x,
                    linalg::Strides::transposed(k),
                    x,
                    linalg::Strides::row_major(k),
                    &mut g,
                    linalg::Strides::row_major(k),
                    false,
                );
                Ok(g)
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu(gpu) => {
                let mut xt = vec![0f32; n * k];
                for (r, row) in x.chunks_exact(k).enumerate() {
                    for (c, v) in row.iter().enumerate() {
                        xt[c * n + r] = *v;
                    }
                }
                crate::gpu::GpuLinear::dense(gpu, &xt, k, n, None)?.apply(&xt)
            }
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
    /// Dense f32 kept on the CPU (calibration reads and rewrites it) and multiplied on the GPU.
    #[cfg(feature = "wgpu")]
    Mirror(Vec<f32>, crate::gpu::GpuLinear),
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
    /// W8A8 FP8: inputs quantized to FP8 per token before the matmul, as the runtime does.
    act_fp8: bool,
}

impl Lin {
    /// Places `matrix` (and `bias`) on `device`; on wgpu this uploads the weights once.
    pub fn new(matrix: Matrix, out: usize, inp: usize, bias: Option<Vec<f32>>, device: &Device) -> Result<Self> {
        let act_fp8 = matches!(&matrix, Matrix::Packed(q) if q.scheme.dynamic_act());
        let exec = match device {
            Device::Cpu => Exec::Cpu(matrix),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(g) => Exec::Gpu(match &matrix {
                Matrix::Dense(w) => crate::gpu::GpuLinear::dense(g, w, out, inp, bias.as_deref())?,
                Matrix::Packed(q) => crate::gpu::GpuLinear::packed(g, q, bias.as_deref())?,
            }),
        };
        Ok(Lin { out, inp, bias, exec, act_fp8 })
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// Dense weights held on the CPU for a calibrated pass to read and rewrite, multiplied on
    /// `device` (on wgpu: a copy uploaded beside them).
    pub fn mirrored(w: Vec<f32>, out: usize, inp: usize, bias: Option<Vec<f32>>, device: &Device) -> Result<Self> {
        let exec = match device {
            Device::Cpu => Exec::Cpu(Matrix::Dense(w)),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(g) => {
                let gpu = crate::gpu::GpuLinear::dense(g, &w, out, inp, bias.as_deref())?;
                Exec::Mirror(w, gpu)
            }
        };
        Ok(Lin { out, inp, bias, exec, act_fp8: false })
    }

    /// The same layer with other dense weights and bias, where it ran: a mirrored layer stays
    /// mirrored (the GPU copy uploaded again), any other lands on the CPU.
    pub fn with_dense_bias(&self, w: Vec<f32>, bias: Option<Vec<f32>>) -> Result<Lin> {
        match &self.exec {
            #[cfg(feature = "wgpu")]
            Exec::Mirror(_, g) => Lin::mirrored(w, self.out, self.inp, bias, &Device::Wgpu(Arc::clone(g.gpu()))),
            _ => Lin::new(Matrix::Dense(w), self.out, self.inp, bias, &Device::Cpu),
        }
    }

    /// The same layer (bias kept) with other dense weights ([`Lin::with_dense_bias`]).
    pub fn with_dense(&self, w: Vec<f32>) -> Result<Lin> {
        self.with_dense_bias(w, self.bias.clone())
    }

    /// The weights, when they are dense f32 on the CPU.
    pub fn dense(&self) -> Option<&[f32]> {
        match &self.exec {
            Exec::Cpu(Matrix::Dense(w)) => Some(w),
            #[cfg(feature = "wgpu")]
            Exec::Mirror(w, _) => Some(w),
            _ => None,
        }
    }

    /// `x [n, inp]` → `[n, out]`.
    pub fn apply(&self, x: &[f32]) -> Result<Vec<f32>> {
        let quantized;
        let x = if self.act_fp8 {
            quantized = mcompress_format::quant::fp8::fake_quant_rows(x, self.inp);
            &quantized[..]
        } else {
            x
        };
        match &self.exec {
            Exec::Cpu(Matrix::Dense(w)) => Ok(linalg::linear(x, w, self.bias.as_deref(), self.inp, self.out)),
            Exec::Cpu(Matrix::Packed(q)) => Ok(linear_packed(x, q, self.bias.as_deref())),
            #[cfg(feature = "wgpu")]
            Exec::Gpu(g) | Exec::Mirror(_, g) => g.apply(x),
        }
    }
}

/// `x [n, cols] · dequant(q)ᵀ (+ b)` → `[n, rows]`, decoding one tile of weight rows at a time
/// ([`linalg::linear_tiles`]).
pub fn linear_packed(x: &[f32], q: &Quantized, bias: Option<&[f32]>) -> Vec<f32> {
    let k = q.cols;
    linalg::linear_tiles(x, k, q.rows, bias, |j0, j1, buf: &mut Vec<f32>| {
        buf.resize((j1 - j0) * k, 0.0);
        for (j, row) in (j0..j1).zip(buf.chunks_mut(k)) {
            q.dequantize_row(j, row);
        }
    })
}

/// Test helpers shared with the GPU tests: quantized matrices of every scheme.
#[cfg(test)]
pub(crate) mod testing {
    use mcompress_core::DType;
    use mcompress_format::quant::{Fp4Format, Fp8Strategy, QScheme, Quantized, quantize};

    /// Deterministic values in about [-1, 1] with some larger outliers.
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                if i % 97 == 0 { v * 8.0 } else { v }
            })
            .collect()
    }

    /// Every bit width, symmetric and asymmetric, per channel and grouped (including a group
    /// that does not divide the row and one that straddles packed words).
    pub(crate) fn schemes() -> Vec<QScheme> {
        let mut out = Vec::new();
        for bits in QScheme::BITS {
            for symmetric in [true, false] {
                for group_size in [0, 32, 40] {
                    out.push(QScheme::int(bits, group_size, symmetric));
                }
            }
        }
        // FP8 E4M3 codes (8 bits, no offset) with their three scale layouts.
        for strategy in [Fp8Strategy::Tensor, Fp8Strategy::Channel, Fp8Strategy::Block] {
            out.push(QScheme::fp8(strategy, false));
        }
        out
    }

    /// Every scheme with the input width to test it at: `cols` for those of [`schemes`], the
    /// nearest multiple of 32 below it for FP4 (NVFP4, MXFP4), whose blocks must divide a row.
    pub(crate) fn cases(cols: usize) -> Vec<(QScheme, usize)> {
        let mut out: Vec<_> = schemes().into_iter().map(|s| (s, cols)).collect();
        for format in [Fp4Format::Nv, Fp4Format::Mx] {
            out.push((QScheme::fp4(format), cols / 32 * 32));
        }
        out
    }

    pub(crate) fn quantized(s: &QScheme, rows: usize, cols: usize, seed: u64) -> Quantized {
        let v = values(rows * cols, seed);
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        quantize(s, DType::F32, &[rows, cols], &bytes).expect("finite values quantize")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{cases, quantized, values};
    use super::*;

    /// The Hessian products of calibration on wgpu (llvmpipe where no GPU exists) agree with
    /// the CPU's, and a mirrored layer multiplies on the GPU what it holds on the CPU.
    #[cfg(feature = "wgpu")]
    #[test]
    fn test_gram_and_mirrored_layers_on_wgpu_match_the_cpu() {
        let Ok(gpu) = crate::gpu::device() else { return };
        let dev = Device::Wgpu(gpu);
        for (n, k) in [(1, 5), (37, 64), (300, 96)] {
            let x = values(n * k, 4);
            let (want, got) = (Device::Cpu.gram(&x, k).unwrap(), dev.gram(&x, k).unwrap());
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in want.iter().zip(&got) {
                assert!((a - b).abs() <= 1e-5 * scale, "gram {n}x{k}: {a} vs {b}");
            }
        }
        let (rows, cols) = (33, 48);
        let (w, bias, x) = (values(rows * cols, 5), values(rows, 6), values(7 * cols, 7));
        let cpu = Lin::new(Matrix::Dense(w.clone()), rows, cols, Some(bias.clone()), &Device::Cpu).unwrap();
        let mut lin = Lin::mirrored(w.clone(), rows, cols, Some(bias.clone()), &dev).unwrap();
        assert_eq!(lin.dense(), Some(&w[..]));
        let w2: Vec<f32> = w.iter().map(|v| v * 0.5).collect();
        for _ in 0..2 {
            let want = cpu.with_dense(lin.dense().unwrap().to_vec()).unwrap().apply(&x).unwrap();
            for (a, b) in want.iter().zip(&lin.apply(&x).unwrap()) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "mirrored: {a} vs {b}");
            }
            lin = lin.with_dense(w2.clone()).unwrap();
            assert!(matches!(lin.exec, Exec::Mirror(..)), "a rewritten mirrored layer stays on the GPU");
        }
    }

    #[test]
    fn test_fused_cpu_matches_dequantize_then_matmul() {
        let (n, rows) = (7, 37);
        let bias = values(rows, 2);
        for (s, cols) in cases(100) {
            let x = values(n * cols, 1);
            let q = quantized(&s, rows, cols, 3);
            let want = linalg::linear(&x, &q.dequantize(), Some(&bias), cols, rows);
            let lin = Lin::new(Matrix::Packed(Arc::new(q)), rows, cols, Some(bias.clone()), &Device::Cpu).unwrap();
            let got = lin.apply(&x).unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{}: y[{i}] fused {a} vs {b}", s.label());
            }
        }
    }
}
