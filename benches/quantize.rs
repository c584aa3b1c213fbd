//! Quantizer kernels: fast (row-parallel, vectorised) vs reference, on one TinyLlama MLP matrix
//! (5632 × 2048 BF16, 23 MB). Throughput is input bytes per second.
//!
//! `cargo bench --bench quantize`; the end-to-end streaming benchmark is scripts/bench.sh.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcompress_core::DType;
use mcompress_passes::quant::{QScheme, quantize, quantize_ref};

fn matrix(rows: usize, cols: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(rows * cols * 2);
    for _ in 0..rows * cols {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04;
        out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    }
    out
}

fn bench(c: &mut Criterion) {
    let (rows, cols) = (5632, 2048);
    let data = matrix(rows, cols);
    let shape = [rows, cols];
    let mut g = c.benchmark_group("quantize-rtn");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    for (label, s) in [
        ("int8-channel-sym", QScheme::int(8, 0, true)),
        ("int4-g128-sym", QScheme::int(4, 128, true)),
        ("int4-g128-asym", QScheme::int(4, 128, false)),
    ] {
        g.bench_function(format!("fast/{label}"), |b| {
            b.iter(|| quantize(&s, DType::BF16, &shape, &data).unwrap());
        });
        g.bench_function(format!("reference/{label}"), |b| {
            b.iter(|| quantize_ref(&s, DType::BF16, &shape, &data).unwrap());
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
