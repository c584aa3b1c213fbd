//! Eval matmul kernels on one SmolLM2 MLP shape (x [256, 576] · W [1536, 576]ᵀ): the CPU f32
//! kernel, the fused CPU kernel on packed int8 / int4 g32, and the fused WGSL kernel on the same
//! (wgpu: a hardware GPU if present, else Mesa's llvmpipe). Throughput is in multiply-adds
//! ("elements" = n·k·m), so GFLOP/s = 2 × the reported Gelem/s.
//!
//! `cargo bench --bench matmul`; figures in docs/benchmarks.md.
#![allow(clippy::many_single_char_names, clippy::print_stderr)] // BLAS names; the adapter line

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcompress_core::DType;
use mcompress_eval::linear::{Device, Lin, Matrix};
use mcompress_passes::quant::{QScheme, quantize};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (n, k, m) = (256, 576, 1536);
    let x = values(n * k, 1);
    let w = values(m * k, 2);
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut devices = vec![("cpu", Device::Cpu)];
    match mcompress_eval::gpu::device() {
        Ok(g) => {
            eprintln!("wgpu adapter: {}", g.describe());
            devices.push(("wgpu", Device::Wgpu(g)));
        }
        Err(e) => eprintln!("wgpu benches skipped: {e}"),
    }
    let mut g = c.benchmark_group("matmul-256x576x1536");
    g.throughput(Throughput::Elements((n * k * m) as u64));
    g.sample_size(10);
    for (dev_name, dev) in &devices {
        let mut cases = vec![("f32", Matrix::Dense(w.clone()))];
        for (label, s) in [("int8-channel", QScheme::int(8, 0, true)), ("int4-g32-asym", QScheme::int(4, 32, false))] {
            cases.push((label, Matrix::Packed(Arc::new(quantize(&s, DType::F32, &[m, k], &bytes).unwrap()))));
        }
        for (label, matrix) in cases {
            let lin = Lin::new(matrix, m, k, None, dev).unwrap();
            g.bench_function(format!("{dev_name}/{label}"), |b| b.iter(|| lin.apply(&x).unwrap()));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
