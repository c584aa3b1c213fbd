//! Integer quantization scheme and the packed layout it is stored in.
//!
//! The layout follows compressed-tensors' naming (see docs/quantized-layout.md):
//! - `<name>_packed`: codes offset to unsigned (`q + 2^(bits-1)`) and packed densely into
//!   little-endian `I32` words, `[rows, ceil(cols · bits / 32)]`: code `c` of a row occupies bits
//!   `c·bits .. (c+1)·bits` of the row's bit stream (word `c·bits / 32`, lowest bits first; a 3-bit
//!   code may straddle two words). This is compressed-tensors' `pack-quantized` layout
//!   (`pack_to_int32`, dense since 0.18): 8-bit codes sit 4 to a word, 4-bit 8, 2-bit 16.
//! - `<name>_scale`: `[rows, groups]` in the source float dtype (F64 sources use F32).
//! - `<name>_zero_point` (asymmetric only): offset like the codes and packed the same way along
//!   dim 0 (down each group's column), `I32 [ceil(rows · bits / 32), groups]`.
//! - `<name>_shape`: `I64 [ndim]`, the original shape. Tensors of rank > 2 are quantized as
//!   `[shape[0], product of the rest]`.
//!
//! Dequantization: `w = (q - zero_point) * scale`, with the group of column `c` being `c / group_size`.

use mcompress_core::DType;
use serde::{Deserialize, Serialize};

/// Which scales an FP8 weight has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fp8Strategy {
    /// One scale for the whole matrix (stored `[1]`).
    Tensor,
    /// One scale per output channel (stored `[rows, 1]`).
    Channel,
    /// One scale per 128 × 128 block (stored `[⌈rows/128⌉, ⌈cols/128⌉]`).
    Block,
}

/// Which FP4 block format a weight is stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fp4Format {
    /// NVFP4: groups of 16, FP8 E4M3 group scales under a per-tensor F32 global scale.
    Nv,
    /// MXFP4: groups of 32, power-of-two (E8M0) group scales.
    Mx,
}

/// The number format of the codes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QKind {
    /// Integers of `bits` bits, offset and packed into int32 words (`pack-quantized`).
    #[default]
    Int,
    /// FP8 E4M3 codes (`float8_e4m3fn`) under the weight's own name ([`super::fp8`]).
    Fp8 {
        /// Scale granularity.
        strategy: Fp8Strategy,
        /// W8A8: activations are quantized to FP8 per token at run time (compressed-tensors
        /// `float-quantized`); otherwise weight-only (`naive-quantized`).
        dynamic_act: bool,
    },
    /// FP4 E2M1 codes, two per byte, with block scales ([`super::fp4`]); weight-only.
    Fp4 {
        /// NVFP4 or MXFP4.
        format: Fp4Format,
    },
}

/// Bits, grouping and symmetry of a quantizer, and its number format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QScheme {
    /// 2, 3, 4 or 8.
    pub bits: u8,
    /// 0: one scale per row (output channel); N: groups of N along the input (last) dim.
    /// FP8 blocks: 128.
    pub group_size: usize,
    /// Symmetric: zero point 0, codes in `[-(2^(b-1)-1), 2^(b-1)-1]`. Asymmetric: codes in
    /// `[-2^(b-1), 2^(b-1)-1]` with a per-group zero point. FP8 is symmetric.
    pub symmetric: bool,
    /// Integer or FP8.
    pub kind: QKind,
}

impl QScheme {
    /// Bit widths supported.
    pub const BITS: [u8; 4] = [2, 3, 4, 8];

    /// An integer scheme.
    pub const fn int(bits: u8, group_size: usize, symmetric: bool) -> Self {
        QScheme { bits, group_size, symmetric, kind: QKind::Int }
    }

    /// An FP8 E4M3 scheme.
    pub const fn fp8(strategy: Fp8Strategy, dynamic_act: bool) -> Self {
        let group_size = if matches!(strategy, Fp8Strategy::Block) { super::fp8::FP8_BLOCK } else { 0 };
        QScheme { bits: 8, group_size, symmetric: true, kind: QKind::Fp8 { strategy, dynamic_act } }
    }

    /// An FP4 E2M1 scheme: NVFP4 (groups of 16) or MXFP4 (groups of 32).
    pub const fn fp4(format: Fp4Format) -> Self {
        let group_size = match format {
            Fp4Format::Nv => 16,
            Fp4Format::Mx => 32,
        };
        QScheme { bits: 4, group_size, symmetric: true, kind: QKind::Fp4 { format } }
    }

    /// Whether the codes are FP4 (NVFP4 or MXFP4).
    pub fn is_fp4(&self) -> bool {
        matches!(self.kind, QKind::Fp4 { .. })
    }

    /// Whether the codes are floats (FP8 or FP4): stored as they are, scaled, no zero point.
    pub fn is_float(&self) -> bool {
        !matches!(self.kind, QKind::Int)
    }

    /// The value of a float code (FP8 or FP4) under `scale`.
    #[inline]
    pub fn float_value(&self, code: u8, scale: f32) -> f32 {
        match self.kind {
            QKind::Fp4 { .. } => super::fp4::e2m1_to_f32(code) * scale,
            _ => super::fp8::e4m3_to_f32(code) * scale,
        }
    }

    /// The float code (FP8 or FP4) of `x` under `scale` — nearest, ties to even, saturating at the
    /// grid's largest value; 0 for a zero scale — and its value.
    #[inline]
    pub fn float_round(&self, x: f32, scale: f32) -> (u8, f32) {
        if scale == 0.0 {
            return (0, 0.0);
        }
        let code = match self.kind {
            QKind::Fp4 { .. } => super::fp4::f32_to_e2m1((x / scale).clamp(-super::fp4::FP4_MAX, super::fp4::FP4_MAX)),
            _ => super::fp8::f32_to_e4m3((x / scale).clamp(-super::fp8::FP8_MAX, super::fp8::FP8_MAX)),
        };
        (code, self.float_value(code, scale))
    }

    /// Stores float code `code` of column `c` in a packed row: a byte (FP8) or a nibble, the even
    /// column low (FP4). The row must start zeroed.
    #[inline]
    pub fn put_float_code(&self, row: &mut [u8], c: usize, code: u8) {
        if self.is_fp4() {
            row[c / 2] |= code << (4 * (c % 2));
        } else {
            row[c] = code;
        }
    }

    /// Whether the codes are FP8.
    pub fn is_fp8(&self) -> bool {
        matches!(self.kind, QKind::Fp8 { .. })
    }

    /// Whether activations are quantized to FP8 per token at run time (W8A8).
    pub fn dynamic_act(&self) -> bool {
        matches!(self.kind, QKind::Fp8 { dynamic_act: true, .. })
    }

    /// Shape of the stored scale tensor of a `rows × cols` matrix.
    pub fn stored_scale_shape(&self, rows: usize, cols: usize) -> Vec<usize> {
        match self.kind {
            QKind::Fp8 { strategy: Fp8Strategy::Tensor, .. } => vec![1],
            QKind::Fp8 { strategy: Fp8Strategy::Block, .. } => {
                vec![rows.div_ceil(super::fp8::FP8_BLOCK), cols.div_ceil(super::fp8::FP8_BLOCK)]
            }
            _ => vec![rows, self.groups(cols)],
        }
    }

    /// Storage dtype of the scales for weights of dtype `src`: FP8 E4M3 for NVFP4, E8M0
    /// exponents (`U8`) for MXFP4, the source float type otherwise ([`scale_dtype`]).
    pub fn scale_dtype_for(&self, src: DType) -> DType {
        match self.kind {
            QKind::Fp4 { format: Fp4Format::Nv } => DType::F8_E4M3,
            QKind::Fp4 { format: Fp4Format::Mx } => DType::U8,
            _ => scale_dtype(src),
        }
    }

    /// Smallest and largest code.
    pub fn qrange(&self) -> (i32, i32) {
        let half = 1i32 << (self.bits - 1);
        if self.symmetric { (-(half - 1), half - 1) } else { (-half, half - 1) }
    }

    /// Offset added to a code before packing (compressed-tensors stores codes unsigned); 0 for
    /// FP8 and FP4, whose codes are stored as they are.
    pub fn offset(&self) -> i32 {
        if matches!(self.kind, QKind::Int) { 1i32 << (self.bits - 1) } else { 0 }
    }

    /// Dtype of the packed codes (and packed zero points): always `I32` words.
    pub fn packed_dtype(&self) -> DType {
        DType::I32
    }

    /// Columns in one group for a row of `cols` values.
    pub fn group_len(&self, cols: usize) -> usize {
        if self.group_size == 0 { cols.max(1) } else { self.group_size }
    }

    /// Groups per row.
    pub fn groups(&self, cols: usize) -> usize {
        cols.div_ceil(self.group_len(cols)).max(1)
    }

    /// Packed `I32` words per row of `cols` codes (dense: `ceil(cols · bits / 32)`).
    pub fn packed_cols(&self, cols: usize) -> usize {
        (cols * self.bits as usize).div_ceil(32)
    }

    /// Whether `group_size` splits `cols` into whole groups, as every compressed-tensors reader
    /// requires (a short last group is rejected by transformers and vLLM).
    pub fn divides(&self, cols: usize) -> bool {
        // FP8 blocks may end short: compressed-tensors pads block-quantized weights.
        self.group_size == 0 || self.is_fp8() || cols.is_multiple_of(self.group_size)
    }

    /// Bytes of one packed row.
    pub fn packed_row_bytes(&self, cols: usize) -> usize {
        self.packed_cols(cols) * self.packed_dtype().bits() / 8
    }

    /// Short label: `int4-g128-sym`, `int8-channel-asym`.
    pub fn label(&self) -> String {
        if let QKind::Fp8 { strategy, dynamic_act } = self.kind {
            let s = match strategy {
                Fp8Strategy::Tensor => "tensor",
                Fp8Strategy::Channel => "channel",
                Fp8Strategy::Block => "block128",
            };
            return format!("fp8-{s}{}", if dynamic_act { "-w8a8" } else { "" });
        }
        if let QKind::Fp4 { format } = self.kind {
            return match format {
                Fp4Format::Nv => "nvfp4".into(),
                Fp4Format::Mx => "mxfp4".into(),
            };
        }
        let g = if self.group_size == 0 { "channel".to_string() } else { format!("g{}", self.group_size) };
        format!("int{}-{g}-{}", self.bits, if self.symmetric { "sym" } else { "asym" })
    }
}

/// Scale dtype for a source dtype: the same float type, F32 for F64.
pub fn scale_dtype(src: DType) -> DType {
    match src {
        DType::F16 | DType::BF16 => src,
        _ => DType::F32,
    }
}

/// Scale and zero point for one group, the scale already rounded to its storage dtype (so codes
/// are chosen against the value a reader will use). `None` if the group holds NaN or infinity.
#[inline]
pub fn group_params(s: &QScheme, vals: &[f32], sdt: DType) -> Option<(f32, i32)> {
    let mut lo = 0f32;
    let mut hi = 0f32;
    let mut poison = 0f32;
    for &v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
        poison += v * 0.0;
    }
    if poison.is_nan() {
        return None;
    }
    Some(scale_and_zero(s, lo, hi, sdt))
}

/// Scale and zero point from a group's range `lo = min(w, 0)`, `hi = max(w, 0)`.
#[inline]
pub fn scale_and_zero(s: &QScheme, lo: f32, hi: f32, sdt: DType) -> (f32, i32) {
    let (qmin, qmax) = s.qrange();
    let raw = if s.symmetric { hi.max(-lo) / qmax as f32 } else { (hi - lo) / (qmax - qmin) as f32 };
    let mut scale = sdt.round_f32(raw);
    if raw > 0.0 && (scale == 0.0 || !scale.is_finite()) {
        // Out of the storage type's range: clamp to its extreme so codes saturate instead of
        // dividing by zero or producing infinities.
        scale = if scale == 0.0 { smallest_positive(sdt) } else { largest_finite(sdt) };
    }
    let zp = if s.symmetric || scale == 0.0 {
        0
    } else {
        ((qmin as f32 - lo / scale).round_ties_even() as i32).clamp(qmin, qmax)
    };
    (scale, zp)
}

/// Code for one value: `clamp(round_half_even(x / scale) + zp, qmin, qmax)`; `zp` for a zero scale.
#[inline]
pub fn quant_value(x: f32, scale: f32, zp: i32, qmin: i32, qmax: i32) -> i32 {
    if scale == 0.0 { zp } else { ((x / scale).round_ties_even() as i32 + zp).clamp(qmin, qmax) }
}

/// Dequantized value of one code.
#[inline]
pub fn dequant_value(q: i32, scale: f32, zp: i32) -> f32 {
    (q - zp) as f32 * scale
}

fn smallest_positive(d: DType) -> f32 {
    match d {
        DType::F16 => half::f16::from_bits(1).to_f32(),
        DType::BF16 => half::bf16::from_bits(1).to_f32(),
        _ => f32::from_bits(1),
    }
}

fn largest_finite(d: DType) -> f32 {
    match d {
        DType::F16 => half::f16::MAX.to_f32(),
        DType::BF16 => half::bf16::MAX.to_f32(),
        _ => f32::MAX,
    }
}
