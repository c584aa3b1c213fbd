//! FP8 E4M3 (`float8_e4m3fn`): the codec, the weight quantizer of `quantize-fp8`, and the dynamic
//! per-token activation quantization of W8A8 — as compressed-tensors and torch compute them.
//!
//! E4M3FN: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, `S.1111.111` is NaN, the
//! largest finite value is 448. Conversion from f32 rounds to nearest, ties to even (torch's
//! `.to(torch.float8_e4m3fn)`), after compressed-tensors clamps to ±448.
//!
//! Weights: `scale = max|w| / 448` per tensor, per output channel or per 128 × 128 block, rounded
//! to the scale's storage dtype before the codes are chosen; `code = e4m3(clamp(w / scale))`;
//! `w' = f32(code) · scale`.

use mcompress_core::DType;

use super::rtn::{QuantError, Quantized};
use super::scheme::{Fp8Strategy, QKind, QScheme, scale_dtype};

/// Largest finite E4M3FN value.
pub const FP8_MAX: f32 = 448.0;
/// Rows and columns of one block of the block strategy (DeepSeek-V3 style, vLLM's block FP8).
pub const FP8_BLOCK: usize = 128;

/// The f32 value of an E4M3FN code (NaN for `0x7f` / `0xff`).
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = i32::from((code >> 3) & 0x0f);
    let m = f32::from(code & 0x07);
    if e == 0x0f && code & 0x07 == 0x07 {
        return f32::NAN;
    }
    if e == 0 {
        // Subnormal: m/8 · 2^-6.
        sign * m * (1.0 / 512.0)
    } else {
        sign * (1.0 + m / 8.0) * f32::from_bits(((e - 7 + 127) as u32) << 23)
    }
}

/// The E4M3FN code nearest to `x` (ties to even), saturating at ±448 (compressed-tensors clamps
/// before it converts). NaN maps to 0.
#[inline]
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(FP8_MAX);
    // Smallest normal is 2^-6; below it the step is 2^-9 (subnormals, m/8 · 2^-6).
    if a < f32::from_bits((127 - 6) << 23) {
        let q = (a * 512.0).round_ties_even();
        // q == 8 rounds up into the smallest normal, code 0x08, which is 8 as well.
        return sign | q as u8;
    }
    let bits = a.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32 - 127; // -6..=8
    // Keep 3 mantissa bits, rounding the 20 dropped ones to nearest, ties to even.
    let mant = bits & 0x7f_ffff;
    let keep = mant >> 20;
    let rest = mant & 0xf_ffff;
    let half = 0x8_0000;
    let mut m = keep;
    let mut e = exp + 7;
    if rest > half || (rest == half && keep & 1 == 1) {
        m += 1;
        if m == 8 {
            m = 0;
            e += 1;
        }
    }
    // a ≤ 448 = 1.75 · 2^8 never rounds past the largest finite code 0x7e.
    sign | ((e as u8) << 3) | m as u8
}

/// Quantizes a matrix to FP8 E4M3 with `s`'s strategy, in the packed form of [`Quantized`]:
/// codes one byte each (row-major, each row padded to whole 32-bit words like 8-bit integer
/// codes), scales expanded to `rows × groups` (`groups` = 1, or ⌈cols/128⌉ for blocks, rows of
/// a 128-row block sharing their block's scale).
pub fn quantize_fp8(s: &QScheme, dtype: DType, shape: &[usize], data: &[u8]) -> Result<Quantized, QuantError> {
    let QKind::Fp8 { strategy, .. } = s.kind else {
        return Err(QuantError::BadInput("not an FP8 scheme".into()));
    };
    let (rows, cols) = super::rtn::check_input(dtype, shape, data)?;
    let mut w = vec![0f32; rows * cols];
    dtype.decode_f32(data, &mut w);
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite { row: i / cols });
    }
    let sdt = scale_dtype(dtype);
    let groups = s.groups(cols);
    let gl = s.group_len(cols);
    // amax per stored scale, then expanded per (row, group).
    let amax_of = |r0: usize, r1: usize, c0: usize, c1: usize| {
        let mut m = 0f32;
        for r in r0..r1 {
            for &v in &w[r * cols + c0..r * cols + c1] {
                m = m.max(v.abs());
            }
        }
        m
    };
    let to_scale = |amax: f32| sdt.round_f32(amax / FP8_MAX);
    let mut scale = vec![0f32; rows * groups];
    match strategy {
        Fp8Strategy::Tensor => scale.fill(to_scale(amax_of(0, rows, 0, cols))),
        Fp8Strategy::Channel => {
            for (r, sc) in scale.iter_mut().enumerate() {
                *sc = to_scale(amax_of(r, r + 1, 0, cols));
            }
        }
        Fp8Strategy::Block => {
            for rb in (0..rows).step_by(FP8_BLOCK) {
                let r1 = (rb + FP8_BLOCK).min(rows);
                for g in 0..groups {
                    let v = to_scale(amax_of(rb, r1, g * gl, ((g + 1) * gl).min(cols)));
                    for r in rb..r1 {
                        scale[r * groups + g] = v;
                    }
                }
            }
        }
    }
    let (packed, err2, ref2) = super::rtn::float_codes(s, &w, &scale, rows, cols);
    Ok(Quantized { err2, ref2, ..Quantized::from_parts(*s, shape, packed, scale, sdt) })
}

/// W8A8 dynamic per-token activations: each row of `x [n, k]` scaled by `max|row| / 448`,
/// rounded to E4M3 and scaled back, as compressed-tensors' forward does before the matmul.
pub fn fake_quant_rows(x: &[f32], k: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_mut(k.max(1)) {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / FP8_MAX;
        if scale == 0.0 || !scale.is_finite() {
            continue;
        }
        for v in row.iter_mut() {
            *v = e4m3_to_f32(f32_to_e4m3((*v / scale).clamp(-FP8_MAX, FP8_MAX))) * scale;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_code_round_trips() {
        for c in 0..=255u8 {
            let v = e4m3_to_f32(c);
            if v.is_nan() {
                assert!(c & 0x7f == 0x7f);
                continue;
            }
            let back = f32_to_e4m3(v);
            // ±0 both decode to 0.
            assert!(back == c || (v == 0.0 && back.trailing_zeros() >= 7), "{c:#x} -> {v} -> {back:#x}");
        }
        assert_eq!(e4m3_to_f32(0x7e).to_bits(), 448f32.to_bits());
        assert_eq!(e4m3_to_f32(0x01).to_bits(), (1.0f32 / 512.0).to_bits());
    }

    #[test]
    fn test_rounding_is_nearest_ties_even_and_saturates() {
        // Between 1.0 (0x38) and 1.125 (0x39) the midpoint 1.0625 goes to the even code 0x38.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.0626), 0x39);
        // 1.1875 lies between 1.125 (0x39, odd) and 1.25 (0x3a, even): ties to 0x3a.
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        assert_eq!(f32_to_e4m3(1e9), 0x7e);
        assert_eq!(f32_to_e4m3(-1e9), 0xfe);
        // Subnormals: 2^-9 steps; half of the smallest rounds to even (0).
        assert_eq!(f32_to_e4m3(1.0 / 1024.0), 0x00);
        assert_eq!(f32_to_e4m3(3.0 / 1024.0), 0x02);
        // Every value is within half a step of its code.
        for i in 0..20_000 {
            let x = (i as f32 - 10_000.0) * 0.0457;
            let c = f32_to_e4m3(x);
            let v = e4m3_to_f32(c);
            let step = if v.abs() < 1.0 / 64.0 { 1.0 / 512.0 } else { 2f32.powi(v.abs().log2().floor() as i32 - 3) };
            assert!((x.clamp(-448.0, 448.0) - v).abs() <= step * 0.5 + 1e-6 || x.abs() > 448.0, "{x} -> {v}");
        }
    }
}
