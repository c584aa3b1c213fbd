//! The one kernel the CPU reference models need: `y = x · Wᵀ (+ b)` for row-major `x [n, k]` and
//! PyTorch-layout `W [m, k]`. Four rows of `x` share each load of a `W` row, and eight
//! independent lanes per dot product let the compiler keep sums in vector registers. Compiled
//! for AVX2 as well as baseline x86-64 (no FMA: both versions give identical results).
#![allow(clippy::many_single_char_names)] // BLAS names: x, w, b, k, m, n

use rayon::prelude::*;

const LANES: usize = 8;

/// `x [n, k] · w[m, k]ᵀ + b` → `[n, m]`.
pub fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, k: usize, m: usize) -> Vec<f32> {
    let n = x.len() / k;
    let mut y = vec![0f32; n * m];
    y.par_chunks_mut(4 * m).zip(x.par_chunks(4 * k)).for_each(|(yb, xb)| block(xb, w, b, k, m, yb));
    y
}

/// [`linear`] on the calling thread only (for callers that parallelise over weight blocks).
pub fn linear_serial(x: &[f32], w: &[f32], b: Option<&[f32]>, k: usize, m: usize) -> Vec<f32> {
    let n = x.len() / k;
    let mut y = vec![0f32; n * m];
    for (yb, xb) in y.chunks_mut(4 * m).zip(x.chunks(4 * k)) {
        block(xb, w, b, k, m, yb);
    }
    y
}

#[multiversion::multiversion(targets("x86_64+avx+avx2"))]
fn block(xb: &[f32], w: &[f32], b: Option<&[f32]>, k: usize, m: usize, yb: &mut [f32]) {
    let rows = xb.len() / k;
    if rows == 4 {
        let (x0, x1, x2, x3) = (&xb[..k], &xb[k..2 * k], &xb[2 * k..3 * k], &xb[3 * k..]);
        for j in 0..m {
            let wr = &w[j * k..(j + 1) * k];
            let d = dot4(wr, x0, x1, x2, x3);
            let bias = b.map_or(0.0, |b| b[j]);
            for (r, dv) in d.iter().enumerate() {
                yb[r * m + j] = dv + bias;
            }
        }
    } else {
        for r in 0..rows {
            let xr = &xb[r * k..(r + 1) * k];
            for j in 0..m {
                yb[r * m + j] = dot(&w[j * k..(j + 1) * k], xr) + b.map_or(0.0, |b| b[j]);
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::inline_always)] // inlined into the AVX2 copy of `block`
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, at) = a.as_chunks::<LANES>();
    let (bc, bt) = b.as_chunks::<LANES>();
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in at.iter().zip(bt) {
        s += x * y;
    }
    s
}

#[inline(always)]
#[allow(clippy::inline_always)] // inlined into the AVX2 copy of `block`
fn dot4(w: &[f32], x0: &[f32], x1: &[f32], x2: &[f32], x3: &[f32]) -> [f32; 4] {
    let mut acc = [[0f32; LANES]; 4];
    let (wc, wt) = w.as_chunks::<LANES>();
    let xs = [x0.as_chunks::<LANES>(), x1.as_chunks::<LANES>(), x2.as_chunks::<LANES>(), x3.as_chunks::<LANES>()];
    for (c, wv) in wc.iter().enumerate() {
        for (r, (xc, _)) in xs.iter().enumerate() {
            for l in 0..LANES {
                acc[r][l] += wv[l] * xc[c][l];
            }
        }
    }
    let mut out = [0f32; 4];
    for (r, (_, xt)) in xs.iter().enumerate() {
        out[r] = acc[r].iter().sum::<f32>() + wt.iter().zip(*xt).map(|(a, b)| a * b).sum::<f32>();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_linear_matches_naive() {
        let (n, k, m) = (7, 19, 5);
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.25).collect();
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.5).collect();
        let b: Vec<f32> = (0..m).map(|i| i as f32).collect();
        let y = linear(&x, &w, Some(&b), k, m);
        for r in 0..n {
            for j in 0..m {
                let want: f64 =
                    (0..k).map(|c| f64::from(x[r * k + c]) * f64::from(w[j * k + c])).sum::<f64>() + f64::from(b[j]);
                assert!((f64::from(y[r * m + j]) - want).abs() < 1e-4, "{r},{j}");
            }
        }
    }
}
