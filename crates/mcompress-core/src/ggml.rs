//! ggml's reference block quantizers (`quantize_row_*_ref` in ggml-quants.c): Q8_0, Q4_0, Q4_1,
//! Q5_0, Q5_1 and the k-quants Q4_K, Q5_K, Q6_K. These are what `llama-quantize` writes when no
//! importance matrix is given, and what pip's `gguf` package reproduces for the legacy types.
//!
//! Every float operation follows ggml's C in order and precision (f32 throughout, no fused
//! multiply-add, f16 conversion with round-to-nearest-even, `nearest_int`'s magic-number
//! rounding), so the bytes equal gguf-py's `gguf.quants.quantize` for the types it implements
//! (checked in tests/python). Blocks are independent: [`quantize`] splits the input across
//! threads, and the output does not depend on how.

#![allow(clippy::many_single_char_names, clippy::float_cmp)] // ggml's names (x, l, d, w); exact compares as ggml's

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
    out.par_chunks_mut(per_task * bb).zip(x.par_chunks(per_task * be)).for_each(|(o, x)| {
        for (o, x) in o.chunks_exact_mut(bb).zip(x.chunks_exact(be)) {
            block(ty, x, o);
        }
    });
    Some(out)
}

/// Bytes of `n` elements stored as `ty` (`n` a multiple of the block size).
pub fn nbytes(ty: GgmlType, n: usize) -> usize {
    let (be, bb) = ty.block();
    n / be * bb
}

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

fn put_f16(o: &mut [u8], v: f32) {
    o[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// f32 → f16 → f32, as ggml reads back a scale it has just stored.
fn via_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// ggml's `nearest_int`: round half to even through the 1.5·2²³ trick (exact for |v| < 2²²;
/// larger inputs give a meaningless value that callers clamp, never a panic).
#[allow(clippy::cast_possible_wrap)]
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// Largest magnitude and the signed value that has it (the first one, as ggml's strict `<`).
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inv(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

#[allow(clippy::cast_possible_truncation)]
fn q8_0(x: &[f32], o: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| if a > v.abs() { a } else { v.abs() });
    let d = amax / 127.0;
    let id = inv(d);
    put_f16(o, d);
    for (q, v) in o[2..].iter_mut().zip(x) {
        *q = ((v * id).round() as i8).cast_unsigned();
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn q4_0(x: &[f32], o: &mut [u8]) {
    let (_, max) = signed_absmax(x);
    let d = max / -8.0;
    let id = inv(d);
    put_f16(o, d);
    for j in 0..16 {
        let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let hi = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        o[2 + j] = lo | (hi << 4);
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn q4_1(x: &[f32], o: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inv(d);
    put_f16(o, d);
    put_f16(&mut o[2..], min);
    for j in 0..16 {
        let lo = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let hi = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        o[4 + j] = lo | (hi << 4);
    }
}

/// The 5-bit layouts' low nibbles and the 32-bit mask of fifth bits.
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
fn q5_0(x: &[f32], o: &mut [u8]) {
    let (_, max) = signed_absmax(x);
    let d = max / -16.0;
    let id = inv(d);
    put_f16(o, d);
    let mut q = [0u8; 32];
    for (q, v) in q.iter_mut().zip(x) {
        *q = ((v * id + 16.5) as i8).min(31) as u8;
    }
    let (qh, qs) = o[2..].split_at_mut(4);
    pack5(&q, qh, qs);
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn q5_1(x: &[f32], o: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inv(d);
    put_f16(o, d);
    put_f16(&mut o[2..], min);
    let mut q = [0u8; 32];
    for (q, v) in q.iter_mut().zip(x) {
        *q = ((v - min) * id + 0.5) as u8;
    }
    let (qh, qs) = o[4..].split_at_mut(4);
    pack5(&q, qh, qs);
}

/// ggml's `make_qkx2_quants`: an asymmetric scale and min for one sub-block by a weighted grid
/// search; writes the levels to `l` and returns (scale, -min).
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
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K (`q5 = false`, 144-byte blocks) and Q5_K (`q5 = true`, 176 bytes).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn q4_k(x: &[f32], o: &mut [u8], q5: bool) {
    let nmax: i32 = if q5 { 31 } else { 15 };
    let (rmin, rdelta, nstep) = if q5 { (-0.5, 0.1, 15) } else { (-1.0, 0.1, 20) };
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
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
        let (s, m) = make_qkx2_quants(nmax, xs, &weights, &mut l[32 * j..32 * j + 32], &mut laux, rmin, rdelta, nstep);
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

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (weights x²): a
/// symmetric scale for one sub-block, levels in `l` offset by `nmax`.
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
fn q6_k(x: &[f32], o: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
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
