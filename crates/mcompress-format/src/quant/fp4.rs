//! FP4 E2M1 weights in the two block formats runtimes load: NVFP4 (`nvfp4-pack-quantized`) and
//! MXFP4 (`mxfp4-pack-quantized`) — the codec and the weight quantizer of `quantize-fp4`, as
//! compressed-tensors 0.20.1 computes them.
//!
//! E2M1: 1 sign, 2 exponent, 1 mantissa bit; the magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4, 6. A code
//! is the magnitude's index (0..=7) with the sign in bit 3. Two codes share a byte, the even
//! column in the low nibble (`weight_packed`, `U8 [rows, cols / 2]`). Rounding is to nearest, ties
//! to even, as `cast_to_fp4`; a negative value that rounds to zero keeps its sign bit (`0x8`), as
//! compressed-tensors' packer writes it.
//!
//! - **NVFP4**: groups of 16 along the input dim. A per-tensor `weight_global_scale`
//!   `G = 448 · 6 / max|W|` (F32 `[1]`) lets the per-group scale use FP8's range: the group scale
//!   `s = e4m3(G · max|group| / 6)` is stored as FP8 E4M3 (`weight_scale`, `[rows, cols / 16]`;
//!   a zero scale is replaced by FP8's epsilon 0.125), and `w' = code · (s / G)`.
//! - **MXFP4** (OCP microscaling): groups of 32, the scale a power of two stored as its biased
//!   exponent (E8M0, `U8 [rows, cols / 32]`, `2^(e - 127)`), chosen as compressed-tensors does:
//!   the group's max rounded to a power of two (up when its mantissa is ≥ 1.75), divided by 4.

use mcompress_core::DType;

use super::rtn::{QuantError, Quantized};
use super::scheme::{Fp4Format, QKind, QScheme};

/// Largest E2M1 magnitude.
pub const FP4_MAX: f32 = 6.0;
/// Magnitudes of the 8 non-negative codes.
pub const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
/// FP8 E4M3's epsilon: compressed-tensors' stand-in for a zero NVFP4 group scale.
const NV_ZERO_SCALE: f32 = 0.125;

/// The f32 value of a 4-bit code (low nibble of `code`).
#[inline]
pub fn e2m1_to_f32(code: u8) -> f32 {
    let v = E2M1[usize::from(code & 7)];
    if code & 8 != 0 { -v } else { v }
}

/// The E2M1 code nearest to `x` (ties to even), saturating at ±6. NaN maps to 0.
#[inline]
pub fn f32_to_e2m1(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let sign = if x < 0.0 { 8u8 } else { 0 };
    let a = x.abs();
    // compressed-tensors' cast_to_fp4 thresholds: inclusive bounds round to the even code.
    let idx = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | idx
}

/// NVFP4's per-tensor global scale from the tensor's `max|w|` (1 when the tensor is all zeros).
pub fn nv_global_scale(amax: f32) -> f32 {
    let g = super::fp8::FP8_MAX * FP4_MAX / amax.max(f32::MIN_POSITIVE);
    if g.is_finite() { g } else { 1.0 }
}

/// MXFP4's biased exponent (E8M0) for a group whose `max|w|` is `amax`.
pub fn mx_exponent(amax: f32) -> u8 {
    if amax == 0.0 || !amax.is_finite() {
        return 0;
    }
    // round_to_power_2: add a quarter of the exponent's step to the mantissa and keep the
    // exponent, so a mantissa ≥ 1.75 rounds up.
    let bits = (amax.to_bits() + (1 << 21)) & 0x7f80_0000;
    let e = (bits >> 23) as i32 - 127;
    // Subnormal maxima (bits == 0) have exponent -127; the element offset is log2(6) floored, 2.
    let e = if bits == 0 { -127 } else { e };
    (127 + e - 2).clamp(0, 255) as u8
}

/// `2^(e - 127)` as an f32 (exact, subnormal below 2^-126).
pub fn mx_scale(e: u8) -> f32 {
    if e == 0 { f32::from_bits(1 << 22) } else { f32::from_bits(u32::from(e) << 23) }
}

/// Quantizes a matrix to NVFP4 or MXFP4 in the packed form of [`Quantized`]: codes two per byte
/// (dense nibbles, the same bit stream as 4-bit integer codes), effective scales `rows × groups`
/// (`s / G` for NVFP4, `2^(e - 127)` for MXFP4), `global_scale` = `G` for NVFP4.
pub fn quantize_fp4(s: &QScheme, dtype: DType, shape: &[usize], data: &[u8]) -> Result<Quantized, QuantError> {
    let QKind::Fp4 { format } = s.kind else {
        return Err(QuantError::BadInput("not an FP4 scheme".into()));
    };
    let (rows, cols) = super::rtn::check_input(dtype, shape, data)?;
    if !s.divides(cols) {
        return Err(QuantError::BadInput(format!(
            "{cols} columns are not a multiple of the group size {}",
            s.group_size
        )));
    }
    let mut w = vec![0f32; rows * cols];
    dtype.decode_f32(data, &mut w);
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite { row: i / cols });
    }
    let gl = s.group_size;
    let groups = cols / gl;
    let global = match format {
        Fp4Format::Nv => Some(nv_global_scale(w.iter().fold(0f32, |m, v| m.max(v.abs())))),
        Fp4Format::Mx => None,
    };
    let mut scale = vec![0f32; rows * groups];
    for (sc, g) in scale.iter_mut().zip(w.chunks(gl)) {
        let amax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
        *sc = match global {
            Some(gs) => {
                let code = super::fp8::f32_to_e4m3(gs * (amax / FP4_MAX));
                let stored = super::fp8::e4m3_to_f32(code);
                (if stored == 0.0 { NV_ZERO_SCALE } else { stored }) / gs
            }
            None => mx_scale(mx_exponent(amax)),
        };
    }
    let (packed, err2, ref2) = super::rtn::float_codes(s, &w, &scale, rows, cols);
    let scale_dtype = s.scale_dtype_for(dtype);
    Ok(Quantized { global_scale: global, err2, ref2, ..Quantized::from_parts(*s, shape, packed, scale, scale_dtype) })
}

impl Quantized {
    /// FP4 codes as stored: `U8 [rows, cols / 2]` (the packed rows hold no padding: `cols` is a
    /// multiple of 16).
    pub fn fp4_bytes(&self) -> Vec<u8> {
        let rb = self.scheme.packed_row_bytes(self.cols);
        self.packed.chunks(rb.max(1)).flat_map(|r| &r[..self.cols / 2]).copied().collect()
    }

    /// FP4 scales as stored: FP8 E4M3 codes of `scale · G` (NVFP4) or biased exponents (MXFP4).
    pub fn fp4_stored_scale(&self) -> Vec<u8> {
        match self.global_scale {
            Some(g) => self.scale.iter().map(|&s| super::fp8::f32_to_e4m3(s * g)).collect(),
            None => self.scale.iter().map(|&s| mx_exponent_of_scale(s)).collect(),
        }
    }
}

/// The biased exponent of a power-of-two scale `2^(e - 127)`.
fn mx_exponent_of_scale(s: f32) -> u8 {
    let b = s.to_bits();
    if b >> 23 == 0 {
        // 2^-127 is the only subnormal scale (biased exponent 0).
        0
    } else {
        (b >> 23) as u8
    }
}

/// Effective scales of stored FP4 scales: `e4m3(code) / G` (NVFP4, `global` = `G`) or
/// `2^(e - 127)` (MXFP4). The inverse of [`Quantized::fp4_stored_scale`].
pub fn fp4_scales(stored: &[u8], global: Option<f32>) -> Vec<f32> {
    match global {
        Some(g) => stored.iter().map(|&c| super::fp8::e4m3_to_f32(c) / g).collect(),
        None => stored.iter().map(|&e| mx_scale(e)).collect(),
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    #[test]
    fn test_codes_round_trip_and_round_to_even() {
        for c in 0..16u8 {
            let v = e2m1_to_f32(c);
            let back = f32_to_e2m1(v);
            assert!(back == c || (v == 0.0 && back.trailing_zeros() >= 3), "{c} -> {v} -> {back}");
        }
        // Midpoints go to the even code (index 0, 2, 4, 6).
        for (x, idx) in [(0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6), (5.01, 7), (9.0, 7)]
        {
            assert_eq!(f32_to_e2m1(x), idx, "{x}");
            assert_eq!(f32_to_e2m1(-x), 8 | idx, "-{x}");
        }
        // A small negative keeps its sign bit, as compressed-tensors packs it.
        assert_eq!(f32_to_e2m1(-0.1), 8);
        assert_eq!(f32_to_e2m1(0.1), 0);
    }

    #[test]
    fn test_mx_exponent_rounds_up_from_one_point_seven_five() {
        // 1.0 → 2^0, minus the element offset 2 → 2^-2: biased 125.
        assert_eq!(mx_exponent(1.0), 125);
        assert_eq!(mx_exponent(1.74), 125);
        assert_eq!(mx_exponent(1.75), 126);
        assert_eq!(mx_exponent(0.0), 0);
        assert_eq!(mx_scale(125), 0.25);
        assert_eq!(mx_scale(0), 2f32.powi(-127));
        for e in 0..=254u8 {
            assert_eq!(mx_exponent_of_scale(mx_scale(e)), e);
        }
    }

    #[test]
    fn test_stored_scales_round_trip() {
        let (rows, cols) = (8, 64);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
        let data = DType::F32.encode_f32(&w).unwrap();
        for format in [Fp4Format::Nv, Fp4Format::Mx] {
            let s = QScheme::fp4(format);
            let q = quantize_fp4(&s, DType::F32, &[rows, cols], &data).unwrap();
            assert_eq!(fp4_scales(&q.fp4_stored_scale(), q.global_scale), q.scale, "{format:?}");
            assert_eq!(q.fp4_bytes().len(), rows * cols / 2);
            // Every value lands within its group's largest step (2 · scale) of the original.
            let d = q.dequantize();
            for (i, (a, b)) in w.iter().zip(&d).enumerate() {
                let sc = q.scale[i / s.group_size];
                assert!((a - b).abs() <= sc + 1e-6, "{format:?} {i}: {a} vs {b}");
            }
            assert!(q.rel_rmse() < 0.2, "{format:?} {}", q.rel_rmse());
        }
    }
}
