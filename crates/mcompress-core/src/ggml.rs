//! ggml's reference block quantizers (`quantize_row_*_ref` in ggml-quants.c): Q8_0, Q4_0, Q4_1,
//! Q5_0, Q5_1 and the k-quants Q4_K, Q5_K, Q6_K. These are what `llama-quantize` writes when no
//! importance matrix is given, and what pip's `gguf` package reproduces for the legacy types.
//!
//! Every float operation follows ggml's C in order and precision (f32 throughout, no fused
//! multiply-add, f16 conversion with round-to-nearest-even, `nearest_int`'s magic-number
//! rounding), so the bytes equal gguf-py's `gguf.quants.quantize` for the types it implements
//! (checked in tests/python). Blocks are independent: [`quantize`] splits the input across
//! threads, and the output does not depend on how.

// ggml's names (x, l, d, w) and exact compares as ggml's; `inline(always)` so every kernel is
// compiled into the AVX2 entry point (`blocks_avx2`) as well as the generic one.
#![allow(clippy::many_single_char_names, clippy::float_cmp, clippy::inline_always)]

use half::f16;
use rayon::prelude::*;

use crate::gguf::GgmlType;

const QK_K: usize = 256;
const GROUP_MAX_EPS: f32 = 1e-15;

/// Quantizes `x` (a whole number of `ty` blocks; rows of a matrix laid end to end) into ggml's
/// block layout. `F32`, `F16` and `BF16` are stored as is. Returns `None` when `x.len()` is not a
/// multiple of the block size.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Option<Vec<u8>> {
    let (be, bb) = ty.block();
    if !x.len().is_multiple_of(be) {
        return None;
    }
    let mut out = vec![0u8; x.len() / be * bb];
    // Enough blocks per task to amortise scheduling; any split gives the same bytes.
    let per_task = (16_384 / be).max(1);
    out.par_chunks_mut(per_task * bb).zip(x.par_chunks(per_task * be)).for_each(|(o, x)| blocks(ty, x, o));
    Some(out)
}

/// Quantizes a `rows × cols` matrix whose rows `fill(r, buf)` writes as f32, without holding the
/// whole matrix in f32: rows are produced and quantized in parallel batches. `None` when `cols`
/// is not a multiple of the block size. Same bytes as [`quantize`] on the filled rows.
pub fn quantize_rows(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    fill: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Option<Vec<u8>> {
    let (be, bb) = ty.block();
    if cols == 0 || !cols.is_multiple_of(be) {
        return None;
    }
    let row_bytes = cols / be * bb;
    let mut out = vec![0u8; rows * row_bytes];
    let per_task = (16_384 / cols).max(1);
    out.par_chunks_mut(per_task * row_bytes).enumerate().for_each(|(task, o)| {
        let mut buf = vec![0f32; cols];
        for (k, orow) in o.chunks_exact_mut(row_bytes).enumerate() {
            fill(task * per_task + k, &mut buf);
            blocks(ty, &buf, orow);
        }
    });
    Some(out)
}

/// Bytes of `n` elements stored as `ty` (`n` a multiple of the block size).
pub fn nbytes(ty: GgmlType, n: usize) -> usize {
    let (be, bb) = ty.block();
    n / be * bb
}

/// Quantizes consecutive blocks, with AVX2 where the CPU has it (the same operations in wider
/// registers: lane-wise IEEE arithmetic, no FMA, so the bytes do not change).
fn blocks(ty: GgmlType, x: &[f32], o: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        #[allow(unsafe_code)]
        unsafe {
            blocks_avx2(ty, x, o);
        }
        return;
    }
    blocks_generic(ty, x, o);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn blocks_avx2(ty: GgmlType, x: &[f32], o: &mut [u8]) {
    blocks_generic(ty, x, o);
}

#[inline(always)]
fn blocks_generic(ty: GgmlType, x: &[f32], o: &mut [u8]) {
    // One loop per type, so each block function inlines into a tight loop of its own.
    macro_rules! each {
        ($f:expr) => {{
            let (be, bb) = ty.block();
            for (ob, xb) in o.chunks_exact_mut(bb).zip(x.chunks_exact(be)) {
                $f(xb, ob);
            }
        }};
    }
    match ty {
        GgmlType::Q8_0 => each!(q8_0),
        GgmlType::Q4_0 => each!(q4_0),
        GgmlType::Q4_1 => each!(q4_1),
        GgmlType::Q5_0 => each!(q5_0),
        GgmlType::Q5_1 => each!(q5_1),
        GgmlType::Q4_K => each!(|x, o| q4_k(x, o, false)),
        GgmlType::Q5_K => each!(|x, o| q4_k(x, o, true)),
        GgmlType::Q6_K => each!(q6_k),
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let (be, bb) = ty.block();
            for (ob, xb) in o.chunks_exact_mut(bb).zip(x.chunks_exact(be)) {
                block(ty, xb, ob);
            }
        }
    }
}

#[inline(always)]
fn block(ty: GgmlType, x: &[f32], o: &mut [u8]) {
    match ty {
        GgmlType::F32 => {
            for (o, v) in o.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, v) in o.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, v) in o.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::Q8_0 => q8_0(x, o),
        GgmlType::Q4_0 => q4_0(x, o),
        GgmlType::Q4_1 => q4_1(x, o),
        GgmlType::Q5_0 => q5_0(x, o),
        GgmlType::Q5_1 => q5_1(x, o),
        GgmlType::Q4_K => q4_k(x, o, false),
        GgmlType::Q5_K => q4_k(x, o, true),
        GgmlType::Q6_K => q6_k(x, o),
    }
}

#[inline(always)]
fn put_f16(o: &mut [u8], v: f32) {
    o[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// f32 → f16 → f32, as ggml reads back a scale it has just stored.
#[inline(always)]
fn via_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// ggml's `nearest_int`: round half to even through the 1.5·2²³ trick (exact for |v| < 2²²;
/// larger inputs give a meaningless value that callers clamp, never a panic).
#[allow(clippy::cast_possible_wrap)]
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// Largest magnitude and the signed value that has it (the first one, as ggml's strict `<`).
#[inline(always)]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    // Eight running maxima, then the first element that reaches the largest: the same value
    // ggml's sequential strict-`<` scan finds (a NaN never wins either way).
    let mut m = [0f32; 8];
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            if m[k] < c[k].abs() {
                m[k] = c[k].abs();
            }
        }
    }
    let amax = m.iter().fold(0f32, |a, &v| if a < v { v } else { a });
    let max = if amax > 0.0 { x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0) } else { 0.0 };
    (amax, max)
}

#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    // Order does not matter for strict comparisons (a NaN is never taken): eight lanes.
    let (mut lo, mut hi) = ([f32::MAX; 8], [-f32::MAX; 8]);
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            if c[k] < lo[k] {
                lo[k] = c[k];
            }
            if c[k] > hi[k] {
                hi[k] = c[k];
            }
        }
    }
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for k in 0..8 {
        if lo[k] < min {
            min = lo[k];
        }
        if hi[k] > max {
            max = hi[k];
        }
    }
    (min, max)
}

/// C's `roundf` (halves away from zero) as an integer, for |v| < 2³¹, in operations that
/// vectorize: the truncation and the fraction `v − trunc(v)` are exact. (Wraps where C's
/// conversion would be undefined.)
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
#[inline(always)]
fn round_away_i32(v: f32) -> i32 {
    let t = v as i32;
    let f = v - t as f32;
    t + i32::from(f >= 0.5) - i32::from(f <= -0.5)
}

fn inv(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

#[allow(clippy::cast_possible_truncation)]
#[inline(always)]
fn q8_0(x: &[f32], o: &mut [u8]) {
    // ggml's `MAX(amax, fabsf(v))` lets a NaN through depending on where it sits: lanes for
    // finite blocks (a lane sum of |v| turns NaN iff some v is), ggml's exact sequence otherwise.
    let (mut m, mut sum) = ([0f32; 8], [0f32; 8]);
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            let a = c[k].abs();
            m[k] = if m[k] > a { m[k] } else { a };
            sum[k] += a;
        }
    }
    let amax = if sum.iter().any(|v| v.is_nan()) {
        x.iter().fold(0f32, |a, v| if a > v.abs() { a } else { v.abs() })
    } else {
        m.iter().fold(0f32, |a, &v| if a > v { a } else { v })
    };
    let d = amax / 127.0;
    let id = inv(d);
    put_f16(o, d);
    for (q, v) in o[2..].iter_mut().zip(x) {
        *q = (round_away_i32(v * id) as i8).cast_unsigned();
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
#[inline(always)]
fn q4_0(x: &[f32], o: &mut [u8]) {
    let (_, max) = signed_absmax(x);
    let d = max / -8.0;
    let id = inv(d);
    put_f16(o, d);
    for j in 0..16 {
        // C: MIN(15, (int8_t)(v + 8.5f)), a truncation of a value in [0.5, 16.5].
        let lo = ((x[j] * id + 8.5) as i32).min(15) as u8;
        let hi = ((x[j + 16] * id + 8.5) as i32).min(15) as u8;
        o[2 + j] = lo | (hi << 4);
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
#[inline(always)]
fn q4_1(x: &[f32], o: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inv(d);
    put_f16(o, d);
    put_f16(&mut o[2..], min);
    for j in 0..16 {
        let lo = (((x[j] - min) * id + 0.5) as i32).min(15) as u8;
        let hi = (((x[j + 16] - min) * id + 0.5) as i32).min(15) as u8;
        o[4 + j] = lo | (hi << 4);
    }
}

/// The 5-bit layouts' low nibbles and the 32-bit mask of fifth bits.
#[inline(always)]
fn pack5(q: &[u8; 32], qh: &mut [u8], qs: &mut [u8]) {
    let mut h = 0u32;
    for j in 0..16 {
        qs[j] = (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4);
        h |= u32::from((q[j] & 0x10) >> 4) << j;
        h |= u32::from((q[j + 16] & 0x10) >> 4) << (j + 16);
    }
    qh[..4].copy_from_slice(&h.to_le_bytes());
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
#[inline(always)]
fn q5_0(x: &[f32], o: &mut [u8]) {
    let (_, max) = signed_absmax(x);
    let d = max / -16.0;
    let id = inv(d);
    put_f16(o, d);
    let mut q = [0u8; 32];
    for (q, v) in q.iter_mut().zip(x) {
        *q = ((v * id + 16.5) as i32).min(31) as u8;
    }
    let (qh, qs) = o[2..].split_at_mut(4);
    pack5(&q, qh, qs);
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
#[inline(always)]
fn q5_1(x: &[f32], o: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inv(d);
    put_f16(o, d);
    put_f16(&mut o[2..], min);
    let mut q = [0u8; 32];
    for (q, v) in q.iter_mut().zip(x) {
        *q = ((v - min) * id + 0.5) as i32 as u8;
    }
    let (qh, qs) = o[4..].split_at_mut(4);
    pack5(&q, qh, qs);
}

/// ggml's `make_qkx2_quants`: an asymmetric scale and min for one sub-block by a weighted grid
/// search; writes the levels to `l` and returns (scale, -min). The scalar original, kept as the
/// oracle of [`make_qkx2_quants_x8`].
#[cfg(test)]
#[allow(clippy::too_many_arguments, clippy::cast_sign_loss, clippy::cast_possible_truncation)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    w: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * f32::from(l[i]) + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let lf = q as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * f32::from(laux[i]) + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Scale and min of sub-block `j` from the 12 packed scale bytes (`get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K (`q5 = false`, 144-byte blocks) and Q5_K (`q5 = true`, 176 bytes).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
#[inline(always)]
fn q4_k(x: &[f32], o: &mut [u8], q5: bool) {
    let nmax: i32 = if q5 { 31 } else { 15 };
    let (rmin, rdelta, nstep) = if q5 { (-0.5, 0.1, 15) } else { (-1.0, 0.1, 20) };
    let mut l = [0u8; QK_K];
    let mut weights = [0f32; 32];
    let (mut xt, mut wt, mut lt) = ([[0f32; 8]; 32], [[0f32; 8]; 32], [[0u8; 8]; 32]);
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        for i in 0..32 {
            xt[i][j] = xs[i];
            wt[i][j] = weights[i];
        }
    }
    // The eight sub-blocks' searches run side by side, one per lane.
    let (sc8, mn8) = make_qkx2_quants_x8(nmax, &xt, &wt, &mut lt, rmin, rdelta, nstep);
    for j in 0..8 {
        for i in 0..32 {
            l[32 * j + i] = lt[i][j];
        }
        let (s, m) = (sc8[j], mn8[j]);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(o, max_scale / 63.0);
    put_f16(&mut o[2..], max_min / 63.0);
    let (d_all, m_all) = (via_f16(max_scale / 63.0), via_f16(max_min / 63.0));
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &sc);
        let d = d_all * f32::from(s);
        if d == 0.0 {
            continue;
        }
        let dm = m_all * f32::from(m);
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    o[4..16].copy_from_slice(&sc);
    if q5 {
        let (qh, ql) = o[16..].split_at_mut(32);
        qh.fill(0);
        let (mut m1, mut m2) = (1u8, 2u8);
        for n in 0..4 {
            for j in 0..32 {
                let mut l1 = l[64 * n + j];
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                let mut l2 = l[64 * n + j + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[32 * n + j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
    } else {
        let q = &mut o[16..];
        for n in 0..4 {
            for i in 0..32 {
                q[32 * n + i] = l[64 * n + i] | (l[64 * n + i + 32] << 4);
            }
        }
    }
}

/// [`make_qkx2_quants`] for eight sub-blocks at once: `x[i][lane]` is element `i` of sub-block
/// `lane`. Every lane does exactly the scalar function's operations in the same order (selects
/// where it branches), so each lane's result is bit-identical to the scalar one; laid out this
/// way the compiler keeps the eight lanes in one vector register.
#[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation, clippy::cast_precision_loss)]
#[inline(always)]
fn make_qkx2_quants_x8(
    nmax: i32,
    x: &[[f32; 8]; 32],
    w: &[[f32; 8]; 32],
    l: &mut [[u8; 8]; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> ([f32; 8], [f32; 8]) {
    const K: usize = 8;
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = [0f32; K];
    for k in 0..K {
        sum_x[k] = sum_w[k] * x[0][k];
    }
    for i in 1..32 {
        for k in 0..K {
            let v = x[i][k];
            if v < min[k] {
                min[k] = v;
            }
            if v > max[k] {
                max[k] = v;
            }
            sum_w[k] += w[i][k];
            sum_x[k] += w[i][k] * v;
        }
    }
    for m in &mut min {
        if *m > 0.0 {
            *m = 0.0;
        }
    }
    let min0 = min;
    let nmaxf = nmax as f32;
    let mut range = [0f32; K];
    let mut scale = [0f32; K];
    let mut iscale = [0f32; K];
    for k in 0..K {
        range[k] = max[k] - min[k];
        iscale[k] = nmaxf / range[k];
        scale[k] = 1.0 / iscale[k];
    }
    let mut best_error = [0f32; K];
    for i in 0..32 {
        for k in 0..K {
            let q = nearest_int(iscale[k] * (x[i][k] - min[k])).clamp(0, nmax);
            l[i][k] = q as u8;
            let diff = scale[k] * f32::from(l[i][k]) + min[k] - x[i][k];
            best_error[k] += w[i][k] * (diff * diff);
        }
    }
    let mut laux = [[0u8; K]; 32];
    for is in 0..=nstep {
        let mut sum_l = [0f32; K];
        let mut sum_l2 = [0f32; K];
        let mut sum_xl = [0f32; K];
        for k in 0..K {
            // ggml divides by the current `max - min`: `min` moves when a step improves.
            iscale[k] = (rmin + rdelta * is as f32 + nmaxf) / (max[k] - min[k]);
        }
        for i in 0..32 {
            for k in 0..K {
                let q = nearest_int(iscale[k] * (x[i][k] - min[k])).clamp(0, nmax);
                laux[i][k] = q as u8;
                let lf = q as f32;
                sum_l[k] += w[i][k] * lf;
                sum_l2[k] += w[i][k] * lf * lf;
                sum_xl[k] += w[i][k] * lf * x[i][k];
            }
        }
        let mut this_scale = [0f32; K];
        let mut this_min = [0f32; K];
        let mut ok = [false; K];
        for k in 0..K {
            let det = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
            ok[k] = det > 0.0;
            this_scale[k] = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / det;
            this_min[k] = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / det;
            if this_min[k] > 0.0 {
                this_min[k] = 0.0;
                this_scale[k] = sum_xl[k] / sum_l2[k];
            }
        }
        let mut cur_error = [0f32; K];
        for i in 0..32 {
            for k in 0..K {
                let diff = this_scale[k] * f32::from(laux[i][k]) + this_min[k] - x[i][k];
                cur_error[k] += w[i][k] * (diff * diff);
            }
        }
        let mut better = [false; K];
        for k in 0..K {
            better[k] = ok[k] && cur_error[k] < best_error[k];
            if better[k] {
                best_error[k] = cur_error[k];
                scale[k] = this_scale[k];
                min[k] = this_min[k];
            }
        }
        for i in 0..32 {
            for k in 0..K {
                if better[k] {
                    l[i][k] = laux[i][k];
                }
            }
        }
    }
    let mut neg_min = [0f32; K];
    for k in 0..K {
        // A constant sub-block: no levels, scale 0 (the scalar function's early return).
        if range[k] == 0.0 {
            for row in l.iter_mut() {
                row[k] = 0;
            }
            scale[k] = 0.0;
            min[k] = min0[k];
        }
        neg_min[k] = -min[k];
    }
    (scale, neg_min)
}

/// [`make_qx_quants`] for sixteen sub-blocks at once (`x[i][lane]`), lane by lane the scalar
/// function's operations in its order, as [`make_qkx2_quants_x8`].
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
#[inline(always)]
fn make_qx_quants_x16(nmax: i32, x: &[[f32; 16]; 16], l: &mut [[i8; 16]; 16]) -> [f32; 16] {
    const K: usize = 16;
    let (mut amax, mut max) = ([0f32; K], [0f32; K]);
    for row in x {
        for k in 0..K {
            let ax = row[k].abs();
            if ax > amax[k] {
                amax[k] = ax;
                max[k] = row[k];
            }
        }
    }
    let nmaxf = nmax as f32;
    let mut iscale = [0f32; K];
    for k in 0..K {
        iscale[k] = -nmaxf / max[k];
    }
    let (mut sumlx, mut suml2) = ([0f32; K], [0f32; K]);
    for i in 0..16 {
        for k in 0..K {
            let v = x[i][k];
            let q = nearest_int(iscale[k] * v).clamp(-nmax, nmax - 1);
            l[i][k] = (q + nmax) as i8;
            let w = v * v;
            let qf = q as f32;
            sumlx[k] += w * v * qf;
            suml2[k] += w * qf * qf;
        }
    }
    let (mut scale, mut best) = ([0f32; K], [0f32; K]);
    for k in 0..K {
        scale[k] = if suml2[k] == 0.0 { 0.0 } else { sumlx[k] / suml2[k] };
        best[k] = scale[k] * sumlx[k];
    }
    let mut laux = [[0i8; K]; 16];
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        for k in 0..K {
            iscale[k] = -(nmaxf + 0.1 * is as f32) / max[k];
        }
        let (mut slx, mut sl2) = ([0f32; K], [0f32; K]);
        for i in 0..16 {
            for k in 0..K {
                let v = x[i][k];
                let q = nearest_int(iscale[k] * v).clamp(-nmax, nmax - 1);
                laux[i][k] = (q + nmax) as i8;
                let qf = q as f32;
                let w = v * v;
                slx[k] += w * v * qf;
                sl2[k] += w * qf * qf;
            }
        }
        let mut better = [false; K];
        for k in 0..K {
            better[k] = sl2[k] > 0.0 && slx[k] * slx[k] > best[k] * sl2[k];
            if better[k] {
                scale[k] = slx[k] / sl2[k];
                best[k] = scale[k] * slx[k];
            }
        }
        for i in 0..16 {
            for k in 0..K {
                if better[k] {
                    l[i][k] = laux[i][k];
                }
            }
        }
    }
    // All-zero sub-blocks (the scalar function's early return).
    for k in 0..K {
        if amax[k] < GROUP_MAX_EPS {
            for row in l.iter_mut() {
                row[k] = 0;
            }
            scale[k] = 0.0;
        }
    }
    scale
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (weights x²): a
/// symmetric scale for one sub-block, levels in `l` offset by `nmax`. The scalar original, kept
/// as the oracle of [`make_qx_quants_x16`].
#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (li, &v) in l.iter_mut().zip(x) {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *li = (q + nmax) as i8;
        let w = v * v;
        let qf = q as f32;
        sumlx += w * v * qf;
        suml2 += w * qf * qf;
    }
    let mut scale = if suml2 == 0.0 { 0.0 } else { sumlx / suml2 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let qf = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * qf;
            suml2 += w * qf * qf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (li, &v) in l.iter_mut().zip(x) {
                *li = (nearest_int(iscale * v).clamp(-nmax, nmax - 1) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
#[inline(always)]
fn q6_k(x: &[f32], o: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    // The sixteen sub-blocks' searches side by side, one per lane.
    let mut xt = [[0f32; 16]; 16];
    for ib in 0..16 {
        for i in 0..16 {
            xt[i][ib] = x[16 * ib + i];
        }
    }
    let mut lt = [[0i8; 16]; 16];
    let scales = make_qx_quants_x16(32, &xt, &mut lt);
    for ib in 0..16 {
        for i in 0..16 {
            l[16 * ib + i] = lt[i][ib];
        }
        let s = scales[ib];
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        o.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(&mut o[208..], 1.0 / iscale);
    let d_all = via_f16(1.0 / iscale);
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        // C stores the int into an int8_t: truncation, as `as i8` does.
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..16 {
        let d = d_all * f32::from(sc[j]);
        if d == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    let lu = |i: usize| l[i].cast_unsigned();
    let (ql, rest) = o.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for n in 0..2 {
        let (j, ql, qh) = (128 * n, &mut ql[64 * n..], &mut qh[32 * n..]);
        for i in 0..32 {
            let (a, b, c, e) = (lu(j + i), lu(j + i + 32), lu(j + i + 64), lu(j + i + 96));
            ql[i] = (a & 0x0f) | ((c & 0x0f) << 4);
            ql[i + 32] = (b & 0x0f) | ((e & 0x0f) << 4);
            qh[i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
    for (o, s) in rest[..16].iter_mut().zip(sc) {
        *o = s.cast_unsigned();
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;
    use crate::gguf::dequantize;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // A few outliers per block, as real weights have.
                if i % 97 == 0 { u * 8.0 } else { u * 0.1 }
            })
            .collect()
    }

    #[test]
    fn test_round_trip_error_shrinks_with_bits() {
        let x = data(4096, 1);
        let rmse = |ty| {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len(), nbytes(ty, x.len()));
            let mut y = Vec::new();
            dequantize(ty, &q, &mut y);
            (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / x.len() as f32).sqrt()
        };
        let e = |ty| rmse(ty);
        assert!(e(GgmlType::Q4_0) > e(GgmlType::Q5_0));
        assert!(e(GgmlType::Q5_0) > e(GgmlType::Q8_0));
        assert!(e(GgmlType::Q4_1) > e(GgmlType::Q5_1));
        assert!(e(GgmlType::Q4_K) > e(GgmlType::Q5_K));
        assert!(e(GgmlType::Q5_K) > e(GgmlType::Q6_K));
        assert!(e(GgmlType::Q6_K) > e(GgmlType::Q8_0));
        assert!(e(GgmlType::Q8_0) < 0.01);
    }

    #[test]
    fn test_zero_and_constant_blocks() {
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            for v in [0.0f32, 0.25, -3.0] {
                let x = vec![v; 256];
                let mut y = Vec::new();
                dequantize(ty, &quantize(ty, &x).unwrap(), &mut y);
                for got in y {
                    assert!((got - v).abs() <= v.abs() * 0.07 + 1e-6, "{ty:?} {v}: {got}");
                }
            }
        }
    }

    #[test]
    fn test_split_does_not_change_bytes() {
        let x = data(256 * 300, 7);
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0] {
            let whole = quantize(ty, &x).unwrap();
            let mut parts = quantize(ty, &x[..256 * 7]).unwrap();
            parts.extend(quantize(ty, &x[256 * 7..]).unwrap());
            assert_eq!(whole, parts);
        }
        assert!(quantize(GgmlType::Q4_K, &x[..100]).is_none());
    }

    #[test]
    fn test_lane_searches_equal_the_scalar_originals() {
        for seed in 0..200 {
            let mut x = data(512, seed);
            if seed % 7 == 0 {
                x[..32].fill(0.0); // a constant sub-block
                x[256..272].fill(0.0);
            }
            if seed % 11 == 0 {
                x[32..64].fill(0.3);
            }
            for (nmax, rmin, rdelta, nstep) in [(15, -1.0, 0.1, 20), (31, -0.5, 0.1, 15)] {
                let (mut xt, mut wt, mut lt) = ([[0f32; 8]; 32], [[0f32; 8]; 32], [[0u8; 8]; 32]);
                for j in 0..8 {
                    for i in 0..32 {
                        xt[i][j] = x[32 * j + i];
                        wt[i][j] = x[32 * j + i].abs() + 0.01;
                    }
                }
                let (s8, m8) = make_qkx2_quants_x8(nmax, &xt, &wt, &mut lt, rmin, rdelta, nstep);
                for j in 0..8 {
                    let w: Vec<f32> = (0..32).map(|i| wt[i][j]).collect();
                    let (mut l, mut laux) = ([0u8; 32], [0u8; 32]);
                    let (s, m) =
                        make_qkx2_quants(nmax, &x[32 * j..32 * j + 32], &w, &mut l, &mut laux, rmin, rdelta, nstep);
                    assert_eq!((s.to_bits(), m.to_bits()), (s8[j].to_bits(), m8[j].to_bits()), "seed {seed} lane {j}");
                    assert!((0..32).all(|i| l[i] == lt[i][j]));
                }
            }
            let (mut xt, mut lt) = ([[0f32; 16]; 16], [[0i8; 16]; 16]);
            for j in 0..16 {
                for i in 0..16 {
                    xt[i][j] = x[256 + 16 * j + i];
                }
            }
            let s16 = make_qx_quants_x16(32, &xt, &mut lt);
            for j in 0..16 {
                let mut l = [0i8; 16];
                let s = make_qx_quants(32, &x[256 + 16 * j..256 + 16 * j + 16], &mut l);
                assert_eq!(s.to_bits(), s16[j].to_bits(), "seed {seed} lane {j}");
                assert!((0..16).all(|i| l[i] == lt[i][j]));
            }
        }
    }

    #[test]
    fn test_round_away_is_roundf() {
        let round_away = |v: f32| round_away_i32(v) as f32;
        for v in [0.5f32, -0.5, 1.5, 2.5, -2.5, 0.499_999_97, -0.499_999_97, 126.5, 127.0, -127.0, 0.0, -0.0, 3.7] {
            assert_eq!(round_away(v), v.round(), "{v}");
        }
        let mut s = 1u32;
        for _ in 0..100_000 {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = f32::from_bits(s);
            if v.is_finite() && v.abs() < 1e9 {
                assert_eq!(round_away(v), v.round(), "{v}");
            }
        }
    }

    #[test]
    fn test_rows_equal_whole() {
        let x = data(512 * 6, 3);
        for ty in [GgmlType::Q4_K, GgmlType::Q5_0, GgmlType::F16] {
            let rows = quantize_rows(ty, 6, 512, &|r, buf| buf.copy_from_slice(&x[r * 512..r * 512 + 512])).unwrap();
            assert_eq!(rows, quantize(ty, &x).unwrap());
        }
        assert!(quantize_rows(GgmlType::Q4_K, 2, 100, &|_, _| {}).is_none());
    }

    proptest::proptest! {
        #[test]
        fn test_any_floats_never_panic(x in proptest::collection::vec(proptest::prelude::any::<f32>(), 256)) {
            for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1,
                       GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
                let _ = quantize(ty, &x);
            }
        }
    }
}
