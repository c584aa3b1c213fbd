//! GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
//! Transformers", 2022): quantize a matrix one input column at a time and spread each column's
//! rounding error over the columns not yet quantized, weighted by the inverse Hessian
//! `H = Σ xᵀx` of the layer's calibration inputs, so the layer's output on those inputs moves as
//! little as possible.
//!
//! This module is the data-free core (matrix + Hessian → packed [`Quantized`], the same layout as
//! RTN); capturing Hessians layer by layer on calibration text is the eval runtime's job
//! (`mcompress_eval::calibrate`). Follows the reference implementation's steps: dead inputs,
//! optional act-order, relative dampening, the upper Cholesky factor of `H⁻¹`, blocks of columns
//! with lazy updates of the rest.
#![allow(clippy::many_single_char_names)] // the paper's names: w, h, q, u

use mcompress_core::DType;
use rayon::prelude::*;

use super::rtn::Quantized;
use super::scheme::{QScheme, dequant_value, group_params, quant_value};

/// GPTQ settings beyond the scheme.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqOptions {
    /// Added to the Hessian's diagonal, relative to its mean (0.01 in the paper).
    pub dampening: f64,
    /// Columns per block of lazy updates (128 in the paper; any value gives the same result up
    /// to rounding).
    pub block_size: usize,
    /// Quantize columns in order of decreasing Hessian diagonal (inputs with the most energy
    /// first). Group parameters are then fixed from the original weights up front.
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions { dampening: 0.01, block_size: 128, act_order: false }
    }
}

/// Quantizes `w` (`[rows, cols]` row-major f32) against the Hessian `h` (`[cols, cols]`
/// row-major, `Σ xᵀx` over calibration inputs of the layer; consumed). Scales are rounded to
/// `sdt` before codes are chosen, as RTN does.
pub fn gptq(
    s: &QScheme,
    sdt: DType,
    shape: &[usize],
    w: &[f32],
    h: Vec<f64>,
    opts: &GptqOptions,
) -> Result<Quantized, String> {
    gptq_masked(s, sdt, shape, w, h, opts, None)
}

/// [`gptq`] keeping a pruning mask: weights where `keep` is false get the code of 0 (the zero
/// point) whatever the updates made of them, and their error is spread over the columns not yet
/// quantized like any other (quantizing a pruned matrix without refilling its zeros, as
/// SparseGPT's joint sparsification and quantization does).
pub fn gptq_masked(
    s: &QScheme,
    sdt: DType,
    shape: &[usize],
    w: &[f32],
    mut h: Vec<f64>,
    opts: &GptqOptions,
    keep: Option<&[bool]>,
) -> Result<Quantized, String> {
    let rows = shape.first().copied().unwrap_or(0);
    let cols = shape.iter().skip(1).product::<usize>();
    if rows == 0 || cols == 0 || w.len() != rows * cols || h.len() != cols * cols {
        return Err(format!("shape {shape:?} does not match {} weights and a {}-element Hessian", w.len(), h.len()));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(format!("row {} contains NaN or infinity", i / cols));
    }
    if h.iter().any(|v| !v.is_finite()) {
        return Err("the calibration Hessian contains NaN or infinity (activations overflowed)".into());
    }
    if keep.is_some_and(|k| k.len() != w.len()) {
        return Err("pruning mask and weights differ in length".into());
    }
    let (groups, gl) = (s.groups(cols), s.group_len(cols));
    let (qmin, qmax) = s.qrange();
    // FP8 and FP4 grids: the scales (and NVFP4's global scale) are those RTN chooses from the
    // original weights, fixed before the columns are walked; GPTQ chooses the codes.
    let float_q = if s.is_float() {
        let data: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut q = super::quantize(s, DType::F32, shape, &data).map_err(|e| format!("{e:?}"))?;
        if s.is_fp8() {
            // FP8 scales are stored in the source's float type: fit the codes to the rounded ones.
            q.scale.iter_mut().for_each(|v| *v = sdt.round_f32(*v));
            q.scale_dtype = sdt;
        }
        Some(q)
    } else {
        None
    };
    // One weight on the grid: (code, dequantized value).
    let round = |x: f32, sc: f32, zp: i32| -> (i32, f32) {
        if s.is_float() {
            let (code, v) = s.float_round(x, sc);
            (i32::from(code), v)
        } else {
            let q = quant_value(x, sc, zp, qmin, qmax);
            (q, dequant_value(q, sc, zp))
        }
    };

    let mut wt = columns(w, rows, cols, &mut h);
    // Processing order.
    let mut perm: Vec<usize> = (0..cols).collect();
    if opts.act_order {
        perm.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]).then(a.cmp(&b)));
        let wt0 = wt.clone();
        let h0 = h.clone();
        for (p, &c) in perm.iter().enumerate() {
            wt[p * rows..(p + 1) * rows].copy_from_slice(&wt0[c * rows..(c + 1) * rows]);
            for (q, &d) in perm.iter().enumerate() {
                h[p * cols + q] = h0[c * cols + d];
            }
        }
    }
    let u = inverse_cholesky_upper(&h, cols, opts.dampening)?;
    drop(h);

    let mut scale = float_q.as_ref().map_or_else(|| vec![0f32; rows * groups], |q| q.scale.clone());
    let mut zero = vec![0i8; rows * groups];
    let static_groups = opts.act_order || s.group_size == 0 || float_q.is_some();
    let set_group = |g: usize, vals_of_row: &dyn Fn(usize) -> Vec<f32>, scale: &mut [f32], zero: &mut [i8]| {
        for r in 0..rows {
            let (sc, zp) = group_params(s, &vals_of_row(r), sdt).unwrap_or((0.0, 0));
            scale[r * groups + g] = sc;
            zero[r * groups + g] = zp as i8;
        }
    };
    if static_groups && float_q.is_none() {
        for g in 0..groups {
            let (lo, hi) = (g * gl, ((g + 1) * gl).min(cols));
            set_group(g, &|r| w[r * cols + lo..r * cols + hi].to_vec(), &mut scale, &mut zero);
        }
    }

    let mut codes = vec![0i32; rows * cols];
    let bs = opts.block_size.max(1);
    let mut err = vec![0f32; bs * rows];
    for i1 in (0..cols).step_by(bs) {
        let i2 = (i1 + bs).min(cols);
        for p in i1..i2 {
            let c = perm[p];
            if !static_groups && c.is_multiple_of(gl) {
                // Dynamic groups: parameters from the current (error-compensated) columns.
                let hi = (c + gl).min(cols);
                let wt_ref = &wt;
                set_group(c / gl, &|r| (c..hi).map(|cc| wt_ref[cc * rows + r]).collect(), &mut scale, &mut zero);
            }
            let d = u[p * cols + p] as f32;
            let g = c / gl;
            let (col, rest) = wt[p * rows..].split_at_mut(rows);
            let e = &mut err[(p - i1) * rows..(p - i1 + 1) * rows];
            for r in 0..rows {
                let (sc, zp) = (scale[r * groups + g], i32::from(zero[r * groups + g]));
                let pruned = keep.is_some_and(|k| !k[r * cols + c]);
                // A pruned weight gets the code of 0: the zero point, or the float grid's zero.
                let (q, deq) =
                    if pruned { (if float_q.is_some() { 0 } else { zp }, 0.0) } else { round(col[r], sc, zp) };
                codes[r * cols + c] = q;
                e[r] = (col[r] - deq) / d;
            }
            // Within the block: update the remaining columns right away.
            update_block_rest(rest, rows, &u[p * cols + p + 1..p * cols + i2], e);
        }
        // Beyond the block: one lazy update per later column, in parallel (each column is
        // independent; the sum over the block's columns runs in a fixed order).
        lazy_update(&mut wt, rows, cols, &u, i1, i2, &err[..(i2 - i1) * rows]);
    }

    if let Some(mut q) = float_q {
        // The float codes in the packed rows: a byte each (FP8) or a nibble each (FP4).
        let rb = s.packed_row_bytes(cols);
        q.packed.fill(0);
        let (mut err2, mut ref2) = (0f64, 0f64);
        for r in 0..rows {
            for c in 0..cols {
                let code = codes[r * cols + c] as u8;
                s.put_float_code(&mut q.packed[r * rb..(r + 1) * rb], c, code);
                let deq = s.float_value(code, q.scale[r * groups + c / gl]);
                let x = w[r * cols + c];
                err2 += f64::from(x - deq).powi(2);
                ref2 += f64::from(x).powi(2);
            }
        }
        q.err2 = err2;
        q.ref2 = ref2;
        return Ok(q);
    }
    let (mut err2, mut ref2) = (0f64, 0f64);
    for r in 0..rows {
        for c in 0..cols {
            let g = r * groups + c / gl;
            let deq = dequant_value(codes[r * cols + c], scale[g], i32::from(zero[g]));
            let x = w[r * cols + c];
            err2 += f64::from(x - deq).powi(2);
            ref2 += f64::from(x).powi(2);
        }
    }
    Ok(Quantized::from_codes(s, shape, &codes, scale, (!s.symmetric).then_some(zero), sdt, err2, ref2))
}

/// W's columns as rows (GPTQ and SparseGPT walk columns), with the inputs that never fired
/// (`H_cc = 0`) given weight 0 and unit curvature: they carry no information.
pub(crate) fn columns(w: &[f32], rows: usize, cols: usize, h: &mut [f64]) -> Vec<f32> {
    let mut wt = vec![0f32; cols * rows];
    for r in 0..rows {
        for c in 0..cols {
            wt[c * rows + r] = w[r * cols + c];
        }
    }
    for c in 0..cols {
        if h[c * cols + c] == 0.0 {
            h[c * cols + c] = 1.0;
            wt[c * rows..(c + 1) * rows].fill(0.0);
        }
    }
    wt
}

/// GPTQ's (and SparseGPT's) within-block step: after column `p` of a block changed by `e`
/// (already divided by `U[p, p]`), `rest` (the block's later columns, as rows of `rows` values)
/// moves by `−U[p, p+1+j] · e`; `u_row` is `U[p, p+1 .. block end]`.
pub(crate) fn update_block_rest(rest: &mut [f32], rows: usize, u_row: &[f64], e: &[f32]) {
    for (next, &f) in rest.chunks_mut(rows).zip(u_row) {
        let f = f as f32;
        for (v, e) in next.iter_mut().zip(e) {
            *v -= f * e;
        }
    }
}

/// The lazy update after block `[i1, i2)`: every later column `c` (a row of `wt`) moves by
/// `−Σ_t U[i1 + t, c] · err_t`, in parallel over columns (each independent; the sum over the
/// block's columns runs in a fixed order, so the result does not depend on the thread count).
pub(crate) fn lazy_update(wt: &mut [f32], rows: usize, cols: usize, u: &[f64], i1: usize, i2: usize, err: &[f32]) {
    wt[i2 * rows..].par_chunks_mut(rows).enumerate().for_each(|(j, next)| {
        let c = i2 + j;
        for (t, e) in err.chunks(rows).enumerate() {
            let f = u[(i1 + t) * cols + c] as f32;
            for (v, e) in next.iter_mut().zip(e) {
                *v -= f * e;
            }
        }
    });
}

/// The upper Cholesky factor `U` of `(H + λI)⁻¹` (`(H + λI)⁻¹ = Uᵀ U`), row-major, with
/// `λ = dampening · mean(diag H)`. A Hessian that is not positive definite after dampening gets
/// ten times more, up to three times, before giving up.
pub(crate) fn inverse_cholesky_upper(h: &[f64], n: usize, dampening: f64) -> Result<Vec<f64>, String> {
    let mean_diag = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    let mut damp = dampening.max(0.0) * mean_diag;
    for _ in 0..4 {
        let mut a = h.to_vec();
        for i in 0..n {
            a[i * n + i] += damp;
        }
        // At most three n × n matrices at once (with the caller's H): each intermediate is
        // dropped as soon as the next one is made, and U is L2ᵀ transposed in place.
        if cholesky_lower(&mut a, n).is_ok() {
            let linv_t = lower_inverse_transposed(&a, n);
            drop(a);
            let mut hinv = gram_of_rows(&linv_t, n);
            drop(linv_t);
            if cholesky_lower(&mut hinv, n).is_ok() {
                // U = L2ᵀ: the lower triangle moved to the upper (cholesky_lower zeroed it).
                for i in 0..n {
                    for j in 0..i {
                        hinv[j * n + i] = hinv[i * n + j];
                        hinv[i * n + j] = 0.0;
                    }
                }
                return Ok(hinv);
            }
        }
        damp = if damp > 0.0 { damp * 10.0 } else { 1e-6 * mean_diag.max(1e-12) };
    }
    Err("the calibration Hessian is not positive definite even with dampening (too few or degenerate samples)".into())
}

/// In-place Cholesky `A = L Lᵀ` of a symmetric matrix; the lower triangle becomes `L`, the upper
/// is zeroed. `Err(i)` if the leading minor `i` is not positive.
fn cholesky_lower(a: &mut [f64], n: usize) -> Result<(), usize> {
    for i in 0..n {
        for j in 0..=i {
            let (ri, rj) = (i * n, j * n);
            let dot: f64 = (0..j).map(|p| a[ri + p] * a[rj + p]).sum();
            let v = a[ri + j] - dot;
            if i == j {
                if v <= 0.0 || !v.is_finite() {
                    return Err(i);
                }
                a[ri + i] = v.sqrt();
            } else {
                a[ri + j] = v / a[rj + j];
            }
        }
        a[i * n + i + 1..(i + 1) * n].fill(0.0);
    }
    Ok(())
}

/// `(L⁻¹)ᵀ` for lower-triangular `L` (row-major), so that its rows are `L⁻¹`'s columns.
fn lower_inverse_transposed(l: &[f64], n: usize) -> Vec<f64> {
    // Column j of L⁻¹ solves L x = e_j; x[i] = 0 for i < j. Stored as row j of the result.
    let mut t = vec![0f64; n * n];
    t.par_chunks_mut(n).enumerate().for_each(|(j, x)| {
        x[j] = 1.0 / l[j * n + j];
        for i in j + 1..n {
            let dot: f64 = (j..i).map(|p| l[i * n + p] * x[p]).sum();
            x[i] = -dot / l[i * n + i];
        }
    });
    t
}

/// `M Mᵀ` for `M = (L⁻¹)ᵀ` given by rows: `(L⁻¹)ᵀ L⁻¹ = H⁻¹`, symmetric, row-major.
fn gram_of_rows(t: &[f64], n: usize) -> Vec<f64> {
    let mut g = vec![0f64; n * n];
    g.par_chunks_mut(n).enumerate().for_each(|(a, row)| {
        let ra = &t[a * n..(a + 1) * n];
        for (b, v) in row.iter_mut().enumerate() {
            let rb = &t[b * n..(b + 1) * n];
            // Both rows are zero before their own index (L⁻¹ is lower triangular).
            let from = a.max(b);
            *v = ra[from..].iter().zip(&rb[from..]).map(|(x, y)| x * y).sum();
        }
    });
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::rtn::quantize;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut x = seed | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Correlated inputs (a random mix of a few latent factors plus noise), as real activations are.
    fn inputs(n: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut r = rng(seed);
        let factors = 6;
        let mix: Vec<f32> = (0..factors * k).map(|_| r()).collect();
        let mut x = vec![0f32; n * k];
        for row in x.chunks_mut(k) {
            let z: Vec<f32> = (0..factors).map(|_| r() * 2.0).collect();
            for (c, v) in row.iter_mut().enumerate() {
                *v = (0..factors).map(|f| z[f] * mix[f * k + c]).sum::<f32>() + 0.1 * r();
            }
        }
        x
    }

    fn hessian(x: &[f32], k: usize) -> Vec<f64> {
        let mut h = vec![0f64; k * k];
        for row in x.chunks(k) {
            for a in 0..k {
                for b in 0..k {
                    h[a * k + b] += f64::from(row[a]) * f64::from(row[b]);
                }
            }
        }
        h
    }

    fn output_error(x: &[f32], w: &[f32], q: &Quantized, k: usize) -> f64 {
        let deq = q.dequantize();
        let m = w.len() / k;
        let mut e = 0f64;
        for row in x.chunks(k) {
            for j in 0..m {
                let a: f64 = (0..k).map(|c| f64::from(row[c]) * f64::from(w[j * k + c])).sum();
                let b: f64 = (0..k).map(|c| f64::from(row[c]) * f64::from(deq[j * k + c])).sum();
                e += (a - b).powi(2);
            }
        }
        e
    }

    #[test]
    fn test_cholesky_inverse_factor() {
        let n = 7;
        let x = inputs(40, n, 3);
        let h = hessian(&x, n);
        let u = inverse_cholesky_upper(&h, n, 0.0).unwrap();
        // Uᵀ U H = I.
        for i in 0..n {
            for j in 0..n {
                let uu = |a: usize, b: usize| (0..n).map(|p| u[p * n + a] * u[p * n + b]).sum::<f64>();
                let v: f64 = (0..n).map(|p| uu(i, p) * h[p * n + j]).sum();
                assert!((v - f64::from(u8::from(i == j))).abs() < 1e-8, "({i},{j}) {v}");
            }
        }
    }

    #[test]
    fn test_gptq_beats_rtn_on_the_layer_output() {
        let (m, k, n) = (24, 64, 256);
        let mut r = rng(9);
        let w: Vec<f32> = (0..m * k).map(|_| r() * 0.2).collect();
        let x = inputs(n, k, 10);
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        for s in [QScheme::int(4, 0, true), QScheme::int(4, 16, true), QScheme::int(3, 32, false)] {
            for act_order in [false, true] {
                let opts = GptqOptions { act_order, block_size: 24, ..GptqOptions::default() };
                let g = gptq(&s, DType::F32, &[m, k], &w, hessian(&x, k), &opts).unwrap();
                let rtn = quantize(&s, DType::F32, &[m, k], &bytes).unwrap();
                let (eg, er) = (output_error(&x, &w, &g, k), output_error(&x, &w, &rtn, k));
                assert!(eg < 0.7 * er, "{} act_order {act_order}: GPTQ {eg} vs RTN {er}", s.label());
                // Same layout and scheme as RTN: any reader of the packed format reads it.
                assert_eq!((g.packed.len(), g.scale.len()), (rtn.packed.len(), rtn.scale.len()));
            }
        }
    }

    #[test]
    fn test_gptq_on_float_grids_keeps_rtn_scales_and_beats_rtn() {
        use super::super::{Fp4Format, Fp8Strategy};
        let (m, k, n) = (24, 64, 256);
        let mut r = rng(11);
        let w: Vec<f32> = (0..m * k).map(|_| r() * 0.2).collect();
        let x = inputs(n, k, 12);
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        for (s, factor) in [
            (QScheme::fp8(Fp8Strategy::Channel, true), 0.9),
            (QScheme::fp8(Fp8Strategy::Block, false), 0.9),
            (QScheme::fp4(Fp4Format::Nv), 0.8),
            (QScheme::fp4(Fp4Format::Mx), 0.8),
        ] {
            for act_order in [false, true] {
                let opts = GptqOptions { act_order, block_size: 24, ..GptqOptions::default() };
                let g = gptq(&s, DType::F32, &[m, k], &w, hessian(&x, k), &opts).unwrap();
                let rtn = quantize(&s, DType::F32, &[m, k], &bytes).unwrap();
                let (eg, er) = (output_error(&x, &w, &g, k), output_error(&x, &w, &rtn, k));
                assert!(eg < factor * er, "{} act_order {act_order}: GPTQ {eg} vs RTN {er}", s.label());
                // The scales, dtypes and layout are RTN's: only the codes differ.
                assert_eq!((&g.scale, g.scale_dtype, g.global_scale), (&rtn.scale, rtn.scale_dtype, rtn.global_scale));
                assert_eq!(g.packed.len(), rtn.packed.len());
                assert_ne!(g.packed, rtn.packed);
            }
        }
    }

    #[test]
    fn test_block_size_does_not_change_the_result() {
        let (m, k) = (8, 40);
        let mut r = rng(5);
        let w: Vec<f32> = (0..m * k).map(|_| r()).collect();
        let x = inputs(100, k, 6);
        let s = QScheme::int(4, 0, true);
        let a = gptq(&s, DType::F32, &[m, k], &w, hessian(&x, k), &GptqOptions { block_size: 7, ..Default::default() });
        let b =
            gptq(&s, DType::F32, &[m, k], &w, hessian(&x, k), &GptqOptions { block_size: 128, ..Default::default() });
        let (a, b) = (a.unwrap(), b.unwrap());
        let again =
            gptq(&s, DType::F32, &[m, k], &w, hessian(&x, k), &GptqOptions { block_size: 7, ..Default::default() });
        assert_eq!(again.unwrap().packed, a.packed, "deterministic");
        let (a, b) = (a.dequantize(), b.dequantize());
        let diff = a.iter().zip(&b).filter(|(x, y)| (*x - *y).abs() > 1e-6).count();
        assert!(diff <= m * k / 50, "{diff} of {} weights differ", m * k);
    }

    #[test]
    fn test_bad_input_is_an_error_not_a_panic() {
        let s = QScheme::int(4, 0, true);
        assert!(
            gptq(
                &s,
                DType::F32,
                &[2, 2],
                &[1.0, f32::NAN, 0.0, 1.0],
                vec![1.0, 0.0, 0.0, 1.0],
                &GptqOptions::default()
            )
            .is_err()
        );
        assert!(gptq(&s, DType::F32, &[2, 2], &[1.0; 4], vec![1.0; 3], &GptqOptions::default()).is_err());
        assert!(gptq(&s, DType::F32, &[2, 2], &[1.0; 4], vec![f64::NAN; 4], &GptqOptions::default()).is_err());
    }
}
